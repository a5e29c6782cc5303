// EriDiffusion: a live loss chart inside the Train steps node (raw loss, smoothed loss, learning rate against
// the step) with step / total, it/s and ETA above it.
// Fed by the "eridiffusion.step" websocket event the node sends after every optimizer step. The server keeps
// each node's history (GET /eridiffusion/history[/<node id>]), so a reloaded page draws the whole run again.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_TYPE = "EriTrainSteps";
const CHART_WIDGET = "eri_loss_chart";
const CHART_HEIGHT = 180;
const SMOOTHING = 0.9;

// node id (string) -> {prompt_id, steps[], losses[], lrs[], total, it_per_s, eta_s, running, drawn}
const runs = new Map();
const state = { runs, stepEvents: 0 };   // stepEvents: received since this page loaded
window.EriDiffusion = state;            // for tests and the curious

function formatEta(seconds) {
  if (seconds == null || !isFinite(seconds)) return "?";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(r).padStart(2, "0")}s` : `${r}s`;
}

function formatNumber(v) {
  if (v == null || !isFinite(v)) return "?";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toPrecision(3);
}

function progressText(run) {
  if (!run || !run.steps.length) return "waiting for the first step";
  const step = run.steps[run.steps.length - 1], loss = run.losses[run.losses.length - 1];
  if (!run.running && step >= run.total) return `done: ${step} steps  loss ${formatNumber(loss)}`;
  return `step ${step}/${run.total}  loss ${formatNumber(loss)}  ${(run.it_per_s ?? 0).toFixed(2)} it/s  ` +
    `ETA ${formatEta(run.eta_s)}`;
}

function fromHistory(h) {
  return { prompt_id: h.prompt_id, steps: [...h.steps], losses: [...h.losses], lrs: [...h.lrs], total: h.total,
           it_per_s: h.it_per_s, eta_s: h.eta_s, running: h.running, drawn: 0 };
}

// A history from the server replaces what we have unless ours is of a newer run or already further along.
function mergeHistory(nodeId, h) {
  const mine = runs.get(nodeId);
  const theirs = fromHistory(h);
  if (mine && mine.prompt_id === h.prompt_id) {
    const last = theirs.steps.length ? theirs.steps[theirs.steps.length - 1] : -Infinity;
    mine.steps.forEach((s, i) => {
      if (s > last) { theirs.steps.push(s); theirs.losses.push(mine.losses[i]); theirs.lrs.push(mine.lrs[i]); }
    });
    if (mine.steps.length && mine.steps[mine.steps.length - 1] > last) {
      Object.assign(theirs, { total: mine.total, it_per_s: mine.it_per_s, eta_s: mine.eta_s, running: mine.running });
    }
    theirs.drawn = mine.drawn;   // the chart on screen is still the one drawn from ours, until the next frame
  } else if (mine && mine.running && !h.running) {
    return;   // a newer run started here since the server wrote that history
  }
  runs.set(nodeId, theirs);
}

async function fetchHistory(nodeId) {
  try {
    const route = nodeId == null ? "/eridiffusion/history" : `/eridiffusion/history/${encodeURIComponent(nodeId)}`;
    const response = await api.fetchApi(route);
    if (!response.ok) return;
    const body = await response.json();
    if (nodeId == null) for (const [id, h] of Object.entries(body)) mergeHistory(id, h);
    else mergeHistory(String(nodeId), body);
    for (const id of nodeId == null ? runs.keys() : [String(nodeId)]) redrawChart(id);
  } catch (error) {
    console.warn("EriDiffusion: could not fetch the training history", error);
  }
}

function onStep({ detail }) {
  state.stepEvents += 1;
  const id = String(detail.node);
  let run = runs.get(id);
  if (!run || run.prompt_id !== detail.prompt_id) {
    run = { prompt_id: detail.prompt_id, steps: [], losses: [], lrs: [], drawn: 0 };
    runs.set(id, run);
    fetchHistory(id);   // earlier steps: of this run before the page loaded, of the adapter before this node
  }
  const last = run.steps.length ? run.steps[run.steps.length - 1] : -Infinity;
  if (detail.step > last) {
    run.steps.push(detail.step); run.losses.push(detail.loss); run.lrs.push(detail.lr);
  }
  Object.assign(run, { total: detail.total, it_per_s: detail.it_per_s, eta_s: detail.eta_s,
                       running: detail.step < detail.total });
  redrawChart(id);
}

// The chart is drawn where the node is drawn. On the classic canvas LiteGraph calls the widget's draw in its
// next frame once the canvas is dirty. With Nodes 2.0 (Vue nodes) LiteGraph draws no node: the frontend's
// WidgetLegacy component draws the widget into a <canvas> of its own, only when it mounts or resizes, and
// hangs its redraw on the widget as triggerDraw (1.32 and 1.49 alike), so without that call the chart stays
// as first drawn. One path for both: mark the canvas dirty and call triggerDraw where it exists.
// At most once a frame: a fast run sends more steps than a screen shows, and triggerDraw redraws at once.
const chartsToRedraw = new Set();

function redrawChart(nodeId) {
  if (!chartsToRedraw.size) requestAnimationFrame(redrawCharts);
  chartsToRedraw.add(String(nodeId));
}

function redrawCharts() {
  for (const id of chartsToRedraw) {
    const node = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
    node?.widgets?.find((w) => w.name === CHART_WIDGET)?.triggerDraw?.();
    node?.setDirtyCanvas?.(true, false);
  }
  chartsToRedraw.clear();
  app.graph?.setDirtyCanvas?.(true, false);
}

function smoothed(values) {
  const out = [];
  let avg = null;
  for (const v of values) { avg = avg == null ? v : SMOOTHING * avg + (1 - SMOOTHING) * v; out.push(avg); }
  return out;
}

function drawSeries(ctx, xs, ys, x0, y0, w, h, xmin, xmax, ymin, ymax) {
  const sx = (v) => x0 + (xmax > xmin ? (v - xmin) / (xmax - xmin) : 0.5) * w;
  const sy = (v) => y0 + h - (ymax > ymin ? (v - ymin) / (ymax - ymin) : 0.5) * h;
  ctx.beginPath();
  xs.forEach((x, i) => (i ? ctx.lineTo(sx(x), sy(ys[i])) : ctx.moveTo(sx(x), sy(ys[i]))));
  ctx.stroke();
}

function drawChart(ctx, node, width, y, height) {
  const run = runs.get(String(node.id));
  reserveHeight(ctx.canvas, height);
  const margin = 10, x0 = margin + 34, x1 = width - margin - 30;
  const top = y + 20, bottom = y + height - 18;
  ctx.save();
  ctx.fillStyle = "#1b1d22";
  ctx.beginPath();
  ctx.roundRect?.(margin, y, width - 2 * margin, height - 4, 6) ?? ctx.rect(margin, y, width - 2 * margin, height - 4);
  ctx.fill();
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#cdd";
  ctx.textAlign = "left";
  ctx.fillText(progressText(run), margin + 6, y + 13);
  if (run && run.steps.length) {
    const { steps, losses, lrs } = run;
    const finite = losses.filter((v) => isFinite(v));
    let lo = Math.min(...finite), hi = Math.max(...finite);
    if (hi === lo) { hi += Math.abs(hi) * 0.1 || 1; lo -= Math.abs(lo) * 0.1 || 1; }
    const xmin = steps[0], xmax = Math.max(steps[steps.length - 1], xmin + 1);
    const lrMax = Math.max(...lrs, 0);
    const w = x1 - x0, h = bottom - top;
    ctx.strokeStyle = "#444"; ctx.lineWidth = 1;
    ctx.strokeRect(x0, top, w, h);
    ctx.lineWidth = 1; ctx.strokeStyle = "rgba(120, 170, 255, 0.35)";
    drawSeries(ctx, steps, losses, x0, top, w, h, xmin, xmax, lo, hi);
    ctx.lineWidth = 2; ctx.strokeStyle = "#6af";
    drawSeries(ctx, steps, smoothed(losses), x0, top, w, h, xmin, xmax, lo, hi);
    if (lrMax > 0) {
      ctx.lineWidth = 1; ctx.strokeStyle = "#e96"; ctx.setLineDash([4, 3]);
      drawSeries(ctx, steps, lrs, x0, top, w, h, xmin, xmax, 0, lrMax * 1.05);
      ctx.setLineDash([]);
    }
    ctx.fillStyle = "#999"; ctx.font = "10px sans-serif";
    ctx.textAlign = "right";
    ctx.fillText(formatNumber(hi), x0 - 3, top + 8);
    ctx.fillText(formatNumber(lo), x0 - 3, bottom);
    ctx.textAlign = "left";
    ctx.fillStyle = "#e96";
    if (lrMax > 0) ctx.fillText(`lr ${formatNumber(lrMax)}`, x1 + 3, top + 8);
    ctx.fillStyle = "#999";
    ctx.fillText(String(xmin), x0, bottom + 12);
    ctx.textAlign = "center";
    ctx.fillText("step", (x0 + x1) / 2, bottom + 12);
    ctx.textAlign = "right";
    ctx.fillText(String(steps[steps.length - 1]), x1, bottom + 12);
    run.drawn = steps.length;
  }
  ctx.restore();
}

// Nodes 2.0 on frontend 1.32: WidgetLegacy's <canvas> is absolutely positioned in a container of no height,
// so the node's sample images, laid out below the widgets, cover the chart (1.49 sizes that container
// itself). Reserving the chart's height on the container keeps it in the node's layout. Never the graph's
// own canvas: its parent is the whole page.
function reserveHeight(canvas, height) {
  const container = canvas?.parentElement;
  if (!container || canvas === app.canvas?.canvas || !container.closest?.("[data-node-id]")) return;
  const minHeight = `${height}px`;
  if (container.style.minHeight !== minHeight) container.style.minHeight = minHeight;
}

function addChart(node) {
  if (node.widgets?.some((w) => w.name === CHART_WIDGET)) return;
  // Not serialized: the chart is no input and never enters the saved workflow or the prompt.
  node.addCustomWidget({
    name: CHART_WIDGET, type: CHART_WIDGET, value: null, serialize: false, options: { serialize: false },
    draw(ctx, n, width, y) { drawChart(ctx, n, width, y, CHART_HEIGHT); },
    computeSize(width) { return [width, CHART_HEIGHT]; },
  });
  const min = node.computeSize();
  if (node.size[1] < min[1] || node.size[0] < min[0]) {
    node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  }
}

app.registerExtension({
  name: "eridiffusion.TrainProgress",
  setup() {
    api.addEventListener("eridiffusion.step", onStep);
    api.addEventListener("reconnected", () => fetchHistory(null));
    fetchHistory(null);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      addChart(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      addChart(this);
      const min = this.computeSize();
      if (this.size[1] < min[1]) this.setSize([Math.max(this.size[0], min[0]), min[1]]);
      return result;
    };
  },
});
