// EriDiffusion: a title and a one-sentence description for each example workflow in the template browser.
//
// ComfyUI lists a custom node pack's example_workflows/*.json by file name alone (GET /api/workflow_templates:
// {module: [name, ...]}), and the frontend (1.32 and 1.49 read the same) shows that name as the card's title
// and again, with "-" and "_" as spaces, as its description ("sdxl lora"). Only the frontend's own templates
// (GET /templates/index.json: categories of {name, title, description, mediaType, mediaSubtype}) carry a
// title and a description. So the pack hands its examples to the frontend as one more category of that index
// (web/templates.json, in the index's own format) whose moduleName is this pack's module: the frontend then
// fetches the workflow and its thumbnail (<name>.jpg beside it) from /api/workflow_templates/<module>/, as it
// does for any pack, and the plain entries of the same names are taken out of the module's list so that each
// example shows once.
// Only the answers of two ComfyApi methods change; where a frontend has neither, or web/templates.json cannot
// be read, the browser shows the examples by file name as before, thumbnails and category name included
// (those need nothing from here: <name>.jpg and locales/en/main.json).
import { api } from "../../../scripts/api.js";

// The folder ComfyUI loaded the pack from: it serves this file at /extensions/<module>/js/templates.js and
// the examples at /api/workflow_templates/<module>/.
const served = new URL(import.meta.url).pathname.split("/extensions/")[1];
const MODULE = served ? decodeURIComponent(served.split("/")[0]) : null;
const INDEX_URL = new URL("../templates.json", import.meta.url);

let described;   // a promise of the pack's category, or of null when the index cannot be read
function packCategory() {
  described ??= fetch(INDEX_URL)
    .then((response) => (response.ok ? response.json() : null))
    .then((category) => (Array.isArray(category?.templates) ? { ...category, moduleName: MODULE } : null))
    .catch((error) => {
      console.warn("EriDiffusion: the example workflows show by file name:", error);
      return null;
    });
  return described;
}

function patch(method, rewrite) {
  const original = api[method];
  if (!MODULE || typeof original !== "function") return;
  api[method] = async function (...args) {
    const answer = await original.apply(this, args);
    const category = await packCategory();
    return category ? rewrite(answer, category) : answer;
  };
}

// {module: [name, ...]} without the examples the pack's category describes.
patch("getWorkflowTemplates", (modules, category) => {
  if (!Array.isArray(modules?.[MODULE])) return modules;
  const names = new Set(category.templates.map((t) => t.name));
  const plain = modules[MODULE].filter((name) => !names.has(name));
  const rest = { ...modules };
  if (plain.length) rest[MODULE] = plain;
  else delete rest[MODULE];
  return rest;
});

// The frontend's categories and the pack's, once (a localised index falls back to the English one through
// this same method).
patch("getCoreWorkflowTemplates", (categories, category) => {
  if (!Array.isArray(categories) || categories.some((c) => c?.moduleName === MODULE)) return categories;
  return [...categories, category];
});
