// EriDiffusion: shows step, loss, it/s and ETA on the Train steps node while it trains.
// Fed by the "eridiffusion.step" websocket event that the node sends after every optimizer step.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

function formatEta(seconds) {
  if (seconds == null || !isFinite(seconds)) return "?";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(r).padStart(2, "0")}s` : `${r}s`;
}

app.registerExtension({
  name: "eridiffusion.TrainProgress",
  setup() {
    api.addEventListener("eridiffusion.step", ({ detail }) => {
      const node = app.graph?.getNodeById?.(Number(detail.node)) ?? app.graph?.getNodeById?.(detail.node);
      if (!node) return;
      node.eriProgress = `step ${detail.step}/${detail.total}  loss ${detail.loss.toFixed(4)}  ` +
        `${detail.it_per_s.toFixed(2)} it/s  ETA ${formatEta(detail.eta_s)}`;
      node.setDirtyCanvas?.(true, false);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "EriTrainSteps") return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      if (this.eriProgress && !this.flags?.collapsed) {
        ctx.save();
        ctx.font = "12px sans-serif";
        ctx.fillStyle = "#9ad";
        ctx.fillText(this.eriProgress, 8, this.size[1] - 8);
        ctx.restore();
      }
      return result;
    };
  },
});
