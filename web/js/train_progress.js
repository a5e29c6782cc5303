// EriDiffusion: a live loss chart inside the Train steps node (raw loss, smoothed loss, learning rate and, with
// a held-out set, the validation loss as dots, against the step) with step / total, it/s and ETA above it.
// Fed by the "eridiffusion.step" websocket event the node sends after every optimizer step. The server keeps
// each node's history (GET /eridiffusion/history[/<node id>]), so a reloaded page draws the whole run again.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_TYPE = "EriTrainSteps";
const SAVE_NODE_TYPE = "EriSaveAdapter";
const CHART_WIDGET = "eri_loss_chart";
const CHART_HEIGHT = 180;
const SMOOTHING = 0.9;

// workflow id + "/" + node id -> the node's latest run in that workflow:
// {workflow, node, prompt_id, steps[], losses[], lrs[], val_steps[], val_losses[], total, first_step, it_per_s,
//  eta_s, elapsed_s,
//  state, running, saved, error, images[], drawn}
// state: running | finished | cancelled | failed | lost (the server restarted during the run)
// A run belongs to the workflow it was queued from (the server gets the workflow's id with the prompt), so two
// workflows whose Train steps nodes share a node id keep separate charts.
const runs = new Map();
const state = { runs, stepEvents: 0, runOf, keyOf, workflowId, progressLines };   // for tests and the curious
window.EriDiffusion = state;

function workflowId() { return (app.rootGraph ?? app.graph)?.id ?? ""; }
function keyOf(workflow, node) { return `${workflow ?? ""}/${node}`; }
function runOf(node) { return runs.get(keyOf(workflowId(), node)); }

function formatDuration(seconds) {
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

function lastStep(run) { return run.steps.length ? run.steps[run.steps.length - 1] : run.first_step ?? 0; }

// The run's state in words: the header's first line, and a second one for where the adapter went or the error.
function progressLines(run) {
  if (!run) return ["waiting for the first step"];
  const loss = run.losses.length ? `  loss ${formatNumber(run.losses[run.losses.length - 1])}` : "";
  const step = run.stopped_step ?? lastStep(run);
  const saved = run.saved ? `saved as ${run.saved}` : "not saved (set save_every to keep a stopped run)";
  switch (run.state) {
    case "finished":
      return [`done: ${step} steps in ${formatDuration(run.elapsed_s)}${loss}`];
    case "cancelled":
      return [`cancelled at step ${step}/${run.total} after ${formatDuration(run.elapsed_s)}${loss}`, saved];
    case "failed":
      return [`failed at step ${step}/${run.total}: ${run.error ?? "see the error dialog"}`,
              run.saved ? saved : ""].filter(Boolean);
    case "lost":
      return [`stopped at step ${step}/${run.total}: the server restarted during the run`];
  }
  if (!run.steps.length || lastStep(run) < (run.first_step ?? 0)) return ["waiting for the first step"];
  return [`step ${step}/${run.total}${loss}  ${(run.it_per_s ?? 0).toFixed(2)} it/s  ` +
          `${formatDuration(run.elapsed_s)}, ETA ${formatDuration(run.eta_s)}`];
}

function fromHistory(h) {
  return { workflow: h.workflow ?? "", node: String(h.node), prompt_id: h.prompt_id, steps: [...h.steps],
           losses: [...h.losses], lrs: [...h.lrs], val_steps: [...(h.val_steps ?? [])],
           val_losses: [...(h.val_losses ?? [])], total: h.total, first_step: h.first_step,
           it_per_s: h.it_per_s, eta_s: h.eta_s, elapsed_s: h.elapsed_s, state: h.state ?? (h.running ? "running" : "finished"),
           running: h.running, saved: h.saved, error: h.error, stopped_step: h.stopped_step,
           images: [...(h.images ?? [])], drawn: 0 };
}

// A history from the server replaces what we have unless ours is of a newer run or already further along.
function mergeHistory(h) {
  const key = keyOf(h.workflow, h.node);
  const mine = runs.get(key);
  const theirs = fromHistory(h);
  if (mine && mine.prompt_id === h.prompt_id) {
    const last = theirs.steps.length ? theirs.steps[theirs.steps.length - 1] : -Infinity;
    mine.steps.forEach((s, i) => {
      if (s > last) { theirs.steps.push(s); theirs.losses.push(mine.losses[i]); theirs.lrs.push(mine.lrs[i]); }
    });
    const lastVal = theirs.val_steps.length ? theirs.val_steps[theirs.val_steps.length - 1] : -Infinity;
    mine.val_steps.forEach((s, i) => {
      if (s > lastVal) { theirs.val_steps.push(s); theirs.val_losses.push(mine.val_losses[i]); }
    });
    if (mine.steps.length && mine.steps[mine.steps.length - 1] > last) {
      Object.assign(theirs, { total: mine.total, it_per_s: mine.it_per_s, eta_s: mine.eta_s,
                              elapsed_s: mine.elapsed_s });
    }
    if (mine.state !== "running" && theirs.state === "running") {   // our run event came after that answer
      Object.assign(theirs, { state: mine.state, running: false, saved: mine.saved, error: mine.error,
                              stopped_step: mine.stopped_step, elapsed_s: mine.elapsed_s });
    }
    if (mine.images.length > theirs.images.length) theirs.images = mine.images;
    theirs.drawn = mine.drawn;   // the chart on screen is still the one drawn from ours, until the next frame
  } else if (mine && mine.running && !h.running) {
    return;   // a newer run started here since the server wrote that history
  }
  runs.set(key, theirs);
}

async function fetchHistory(workflow, node) {
  try {
    const one = node != null;
    const route = one ? `/eridiffusion/history/${encodeURIComponent(node)}?workflow=${encodeURIComponent(workflow)}`
                      : "/eridiffusion/history";
    const response = await api.fetchApi(route);
    if (!response.ok) return;
    const body = await response.json();
    const kept = one ? [body] : body;
    for (const h of kept) mergeHistory(h);
    if (!one) {   // runs the server no longer knows of were lost with it (it restarted)
      const known = new Set(kept.map((h) => keyOf(h.workflow, h.node)));
      for (const [key, run] of runs) {
        if (run.running && !known.has(key)) Object.assign(run, { state: "lost", running: false });
      }
    }
    for (const [key, run] of runs) {
      if (!one || key === keyOf(workflow, node)) { showSamples(run); redrawChart(key); }
    }
  } catch (error) {
    console.warn("EriDiffusion: could not fetch the training history", error);
  }
}

// After a reload the canvas has no outputs: give the node its samples again, as ComfyUI's own "executed"
// message does while the run goes on.
function showSamples(run) {
  if (!run.images?.length || run.workflow !== workflowId()) return;
  const node = app.graph?.getNodeById?.(Number(run.node)) ?? app.graph?.getNodeById?.(run.node);
  if (!node || node.type !== NODE_TYPE || node.imgs?.length || run.samplesShown === node) return;
  run.samplesShown = node;
  api.dispatchCustomEvent("executed", { node: run.node, display_node: run.node, output: { images: run.images },
                                        prompt_id: run.prompt_id });
}

function runFor(detail) {
  const key = keyOf(detail.workflow, detail.node);
  let run = runs.get(key);
  if (!run || run.prompt_id !== detail.prompt_id) {
    run = { workflow: detail.workflow ?? "", node: String(detail.node), prompt_id: detail.prompt_id, steps: [],
            losses: [], lrs: [], val_steps: [], val_losses: [], images: [], state: "running", running: true,
            total: detail.total, drawn: 0 };
    runs.set(key, run);
    fetchHistory(run.workflow, run.node);   // earlier steps: of this run before the page loaded, of the adapter
  }
  return [key, run];
}

function onStep({ detail }) {
  state.stepEvents += 1;
  const [key, run] = runFor(detail);
  const last = run.steps.length ? run.steps[run.steps.length - 1] : -Infinity;
  if (detail.step > last) {
    run.steps.push(detail.step); run.losses.push(detail.loss); run.lrs.push(detail.lr);
  }
  const lastVal = run.val_steps.length ? run.val_steps[run.val_steps.length - 1] : -Infinity;
  if (detail.val_loss != null && detail.step > lastVal) {   // sent on the steps the held-out set is evaluated
    run.val_steps.push(detail.step); run.val_losses.push(detail.val_loss);
  }
  Object.assign(run, { total: detail.total, it_per_s: detail.it_per_s, eta_s: detail.eta_s,
                       elapsed_s: detail.elapsed_s });
  redrawChart(key);
}

function onRun({ detail }) {
  const [key, run] = runFor(detail);
  Object.assign(run, { state: detail.state, running: detail.state === "running", total: detail.total,
                       elapsed_s: detail.elapsed_s, saved: detail.saved, error: detail.error });
  if (detail.state === "running") run.first_step = detail.step;
  else run.stopped_step = detail.step;
  redrawChart(key);
}

function onExecuted({ detail }) {   // the samples of a run as they are made, for a reload's sake
  const images = detail?.output?.images;
  if (!images) return;
  for (const run of runs.values()) {
    if (run.prompt_id === detail.prompt_id && run.node === String(detail.node)) run.images = [...images];
  }
}

// The chart is drawn where the node is drawn. On the classic canvas LiteGraph calls the widget's draw in its
// next frame once the canvas is dirty. With Nodes 2.0 (Vue nodes) LiteGraph draws no node: the frontend's
// WidgetLegacy component draws the widget into a <canvas> of its own, only when it mounts or resizes, and
// hangs its redraw on the widget as triggerDraw (1.32 and 1.49 alike), so without that call the chart stays
// as first drawn. One path for both: mark the canvas dirty and call triggerDraw where it exists.
// At most once a frame: a fast run sends more steps than a screen shows, and triggerDraw redraws at once.
const chartsToRedraw = new Set();

function redrawChart(key) {
  if (!chartsToRedraw.size) requestAnimationFrame(redrawCharts);
  chartsToRedraw.add(key);
}

function redrawCharts() {
  for (const key of chartsToRedraw) {
    const run = runs.get(key);
    if (!run || run.workflow !== workflowId()) continue;   // another workflow's run: drawn when it is shown
    const node = app.graph?.getNodeById?.(Number(run.node)) ?? app.graph?.getNodeById?.(run.node);
    node?.widgets?.find((w) => w.name === CHART_WIDGET)?.triggerDraw?.();
    node?.setDirtyCanvas?.(true, false);
  }
  chartsToRedraw.clear();
  app.graph?.setDirtyCanvas?.(true, false);
}

function smoothed(values) {
  const out = [];
  let avg = null;
  for (const v of values) {
    if (!isFinite(v)) { out.push(avg); continue; }
    avg = avg == null ? v : SMOOTHING * avg + (1 - SMOOTHING) * v;
    out.push(avg);
  }
  return out;
}

function quantile(sorted, q) {
  const i = (sorted.length - 1) * q, lo = Math.floor(i), hi = Math.ceil(i);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (i - lo);
}

// The loss axis: the smoothed curve whole, the raw losses from their 2nd to 98th percentile (a few outliers
// would squeeze the curve people read into a line); raw points beyond it are clipped at the plot's edge.
function lossRange(losses, smooth, validation = []) {
  const raw = losses.filter((v) => isFinite(v)).sort((a, b) => a - b);
  const curve = smooth.concat(validation).filter((v) => v != null && isFinite(v));
  let lo = Math.min(quantile(raw, 0.02), ...curve), hi = Math.max(quantile(raw, 0.98), ...curve);
  if (hi === lo) { hi += Math.abs(hi) * 0.1 || 1; lo -= Math.abs(lo) * 0.1 || 1; }
  const pad = (hi - lo) * 0.05;
  return [lo - pad, hi + pad];
}

function drawSeries(ctx, xs, ys, x0, y0, w, h, xmin, xmax, ymin, ymax) {
  const sx = (v) => x0 + (xmax > xmin ? (v - xmin) / (xmax - xmin) : 0.5) * w;
  const sy = (v) => y0 + h - (ymax > ymin ? (v - ymin) / (ymax - ymin) : 0.5) * h;
  ctx.beginPath();
  let pen = false;
  xs.forEach((x, i) => {
    const y = ys[i];
    if (y == null || !isFinite(y)) { pen = false; return; }
    if (pen) ctx.lineTo(sx(x), sy(y)); else ctx.moveTo(sx(x), sy(y));
    pen = true;
  });
  ctx.stroke();
}

// Text that fits in `width` pixels, cut with an ellipsis: nothing is drawn outside the node.
function fitted(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let cut = text;
  while (cut.length > 1 && ctx.measureText(cut + "…").width > width) cut = cut.slice(0, -1);
  return cut + "…";
}

const COLORS = { raw: "rgba(120, 170, 255, 0.35)", smooth: "#6af", lr: "#e96", text: "#cdd", dim: "#999",
                 stage: "#8c8", validation: "#fc4" };
const DOT_RADIUS = 2.5;

function drawDots(ctx, xs, ys, x0, y0, w, h, xmin, xmax, ymin, ymax) {
  const sx = (v) => x0 + (xmax > xmin ? (v - xmin) / (xmax - xmin) : 0.5) * w;
  const sy = (v) => y0 + h - (ymax > ymin ? (v - ymin) / (ymax - ymin) : 0.5) * h;
  xs.forEach((x, i) => {
    if (ys[i] == null || !isFinite(ys[i])) return;
    ctx.beginPath(); ctx.arc(sx(x), sy(ys[i]), DOT_RADIUS, 0, 2 * Math.PI); ctx.fill();
  });
}

function drawLegend(ctx, x, y, right, validation) {
  const items = [["loss", COLORS.raw, 1, []], ["smoothed", COLORS.smooth, 2, []], ["lr", COLORS.lr, 1, [4, 3]]];
  if (validation) items.push(["validation", COLORS.validation, 0, null]);
  ctx.font = "10px sans-serif"; ctx.textAlign = "left";
  for (const [label, color, width, dash] of items) {
    const needed = 16 + ctx.measureText(label).width + 10;
    if (x + needed > right) break;
    if (dash === null) {   // a dot, as the series is drawn
      ctx.fillStyle = color; ctx.beginPath(); ctx.arc(x + 6, y - 3, DOT_RADIUS, 0, 2 * Math.PI); ctx.fill();
    } else {
      ctx.strokeStyle = color; ctx.lineWidth = width; ctx.setLineDash(dash);
      ctx.beginPath(); ctx.moveTo(x, y - 3); ctx.lineTo(x + 12, y - 3); ctx.stroke();
    }
    ctx.setLineDash([]);
    ctx.fillStyle = COLORS.dim; ctx.fillText(label, x + 16, y);
    x += needed;
  }
}

function drawChart(ctx, node, width, y, height) {
  const run = runOf(node.id);
  reserveHeight(ctx.canvas, height);
  const margin = 10, left = margin + 6, right = width - margin - 6;
  ctx.save();
  ctx.fillStyle = "#1b1d22";
  ctx.beginPath();
  ctx.roundRect?.(margin, y, width - 2 * margin, height - 4, 6) ?? ctx.rect(margin, y, width - 2 * margin, height - 4);
  ctx.fill();
  ctx.font = "11px sans-serif";
  ctx.textAlign = "left";
  const lines = progressLines(run);
  lines.forEach((line, i) => {
    ctx.fillStyle = i === 0 ? (run?.state === "failed" ? "#f88" : COLORS.text) : COLORS.dim;
    ctx.fillText(fitted(ctx, line, right - left), left, y + 13 + 13 * i);
  });
  if (run && run.steps.length) {
    const { steps, losses, lrs } = run;
    const valSteps = run.val_steps ?? [], valLosses = run.val_losses ?? [];
    const smooth = smoothed(losses);
    const [lo, hi] = lossRange(losses, smooth, valLosses);
    ctx.font = "10px sans-serif";
    const ticks = [formatNumber(hi), formatNumber(lo)];
    const x0 = left + Math.max(...ticks.map((t) => ctx.measureText(t).width)) + 4, x1 = right;
    const top = y + 8 + 13 * lines.length, bottom = y + height - 32;
    const xmin = steps[0], xmax = Math.max(steps[steps.length - 1], xmin + 1);
    const lrMax = Math.max(...lrs.filter((v) => isFinite(v)), 0);
    const w = x1 - x0, h = bottom - top;
    ctx.strokeStyle = "#444"; ctx.lineWidth = 1;
    ctx.strokeRect(x0, top, w, h);
    ctx.save();
    ctx.beginPath(); ctx.rect(x0, top, w, h); ctx.clip();
    const first = run.first_step;
    if (first != null && first > xmin && first < xmax) {   // a chained stage: where this node took over
      const sx = x0 + (first - xmin) / (xmax - xmin) * w;
      ctx.strokeStyle = COLORS.stage; ctx.setLineDash([2, 3]);
      ctx.beginPath(); ctx.moveTo(sx, top); ctx.lineTo(sx, bottom); ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = COLORS.stage; ctx.textAlign = "left";
      ctx.fillText(`this node from ${first}`, sx + 3, bottom - 4);
    }
    ctx.lineWidth = 1; ctx.strokeStyle = COLORS.raw;
    drawSeries(ctx, steps, losses, x0, top, w, h, xmin, xmax, lo, hi);
    ctx.lineWidth = 2; ctx.strokeStyle = COLORS.smooth;
    drawSeries(ctx, steps, smooth, x0, top, w, h, xmin, xmax, lo, hi);
    if (lrMax > 0) {
      ctx.lineWidth = 1; ctx.strokeStyle = COLORS.lr; ctx.setLineDash([4, 3]);
      drawSeries(ctx, steps, lrs, x0, top, w, h, xmin, xmax, 0, lrMax * 1.05);
      ctx.setLineDash([]);
      ctx.fillStyle = COLORS.lr; ctx.textAlign = "right";
      ctx.fillText(`lr ≤ ${formatNumber(lrMax)}`, x1 - 3, top + 11);
    }
    if (valSteps.length) {
      ctx.fillStyle = COLORS.validation;
      drawDots(ctx, valSteps, valLosses, x0, top, w, h, xmin, xmax, lo, hi);
    }
    ctx.restore();
    ctx.font = "10px sans-serif";
    ctx.fillStyle = COLORS.dim; ctx.textAlign = "right";
    ctx.fillText(ticks[0], x0 - 3, top + 8);
    ctx.fillText(ticks[1], x0 - 3, bottom);
    ctx.textAlign = "left";
    ctx.fillText(String(xmin), x0, bottom + 11);
    ctx.textAlign = "center";
    ctx.fillText("step", (x0 + x1) / 2, bottom + 11);
    ctx.textAlign = "right";
    ctx.fillText(String(steps[steps.length - 1]), x1, bottom + 11);
    drawLegend(ctx, x0, bottom + 24, x1, valSteps.length > 0);
    run.drawn = steps.length;
    run.drawnValidation = valSteps.length;
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
  fitNode(node);
}

function fitNode(node) {
  const min = node.computeSize();
  if (node.size[1] < min[1] || node.size[0] < min[0]) {
    node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  }
}

// Save adapter: the file it wrote (name, step, size), on the node. The text comes in the node's "text" output.
const SAVED_WIDGET = "eri_saved_file";

function showSaved(node, lines) {
  let widget = node.widgets?.find((w) => w.name === SAVED_WIDGET);
  if (!widget) {
    widget = node.addCustomWidget({
      name: SAVED_WIDGET, type: SAVED_WIDGET, value: null, serialize: false, options: { serialize: false },
      lines: [],
      draw(ctx, n, width, y) {
        ctx.save();
        ctx.font = "11px sans-serif"; ctx.textAlign = "left";
        this.lines.forEach((line, i) => {
          ctx.fillStyle = i === 0 ? "#9d9" : "#cb8";
          ctx.fillText(fitted(ctx, line, width - 32), 16, y + 14 + 14 * i);
        });
        ctx.restore();
      },
      computeSize(width) { return [width, 8 + 14 * Math.max(1, this.lines.length)]; },
    });
  }
  widget.lines = lines;
  widget.value = lines.join("\n");
  fitNode(node);
  widget.triggerDraw?.();
  node.setDirtyCanvas?.(true, true);
}

// ComfyUI's error dialog titles an execution error with the node's class name ("EriTrainingImages"); the
// canvas calls it "Training images". The socket's messages all pass through api.dispatchCustomEvent: an error
// of one of our nodes gets its display name there (the class name after it, for searching). Frontend 1.49's
// Errors panel shows a generic "Node threw an error" and the traceback, not the exception's message, which is
// what says which input to change: the message goes first in the traceback, where the panel shows it
// without scrolling.
const DISPLAY_NAMES = new Map();

function withDisplayNames() {
  const dispatch = api.dispatchCustomEvent;
  if (typeof dispatch !== "function" || dispatch.eriDisplayNames) return;
  const named = function (type, detail) {
    const display = type === "execution_error" ? DISPLAY_NAMES.get(detail?.node_type) : undefined;
    if (display) {
      const message = `${detail.exception_type ?? "Error"}: ${detail.exception_message ?? ""}\n\n`;
      const traceback = Array.isArray(detail.traceback) ? [message, ...detail.traceback] : detail.traceback;
      detail = { ...detail, node_type: `${display} (${detail.node_type})`, traceback };
    }
    return dispatch.call(this, type, detail);
  };
  named.eriDisplayNames = true;
  api.dispatchCustomEvent = named;
}

app.registerExtension({
  name: "eridiffusion.TrainProgress",
  setup() {
    withDisplayNames();
    api.addEventListener("eridiffusion.step", onStep);
    api.addEventListener("eridiffusion.run", onRun);
    api.addEventListener("executed", onExecuted);
    api.addEventListener("reconnected", () => fetchHistory());
    fetchHistory();
  },
  afterConfigureGraph() {   // a workflow was loaded or a tab switched: its charts and samples
    for (const [key, run] of runs) {
      if (run.workflow !== workflowId()) continue;
      run.samplesShown = null;
      showSamples(run);
      redrawChart(key);
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.python_module?.startsWith?.("custom_nodes.") && nodeData.name?.startsWith("Eri") &&
        nodeData.display_name) {
      DISPLAY_NAMES.set(nodeData.name, nodeData.display_name);
    }
    if (nodeData.name === SAVE_NODE_TYPE) {
      const onExecutedBefore = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        onExecutedBefore?.apply(this, arguments);
        const text = output?.text?.join?.("\n");
        if (text) showSaved(this, text.split("\n"));
      };
      return;
    }
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
      fitNode(this);
      return result;
    };
  },
});
