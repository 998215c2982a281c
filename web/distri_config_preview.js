// Distri Patch Parallel: under each Patch Parallel Config node, draw how the image will be cut
// (each GPU's row band in its own colour, CFG halves side by side, band heights in pixels) for the
// size of the latent the connected sampler receives, with one line of text below.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const WIDGETS = ["devices", "ranks", "cfg_split"];
const COLOURS = ["#4682b4", "#3caa71", "#daa520", "#cd5c5c", "#8a6dc9", "#2bb0b8", "#d98040", "#9aa0a6"];

// The image as a rectangle per CFG branch, each band filled in its rank's colour.
function drawPlan(canvas, plan) {
  const g = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, gap = 10, top = 16;
  g.clearRect(0, 0, W, H);
  g.font = "11px sans-serif";
  const n = plan.groups.length;
  const slot = (W - gap * (n + 1)) / n;
  const aspect = plan.height / plan.width;
  const bh = Math.min(H - top - 4, slot * aspect), bw = bh / aspect;
  plan.groups.forEach((group, gi) => {
    const x0 = gap + gi * (slot + gap) + (slot - bw) / 2;
    g.fillStyle = "#ccc";
    g.fillText(group.branch === "both" ? `${plan.width}x${plan.height}` : `${group.branch} (${plan.width}x${plan.height})`, x0, 11);
    for (const band of group.bands) {
      const [r0, r1] = band.rows_px;
      const y = top + (bh * r0) / plan.height, h = (bh * (r1 - r0)) / plan.height;
      g.fillStyle = COLOURS[band.rank % COLOURS.length];
      g.fillRect(x0, y, bw, Math.max(1, h - 1));
      if (h >= 12) {
        g.fillStyle = "#fff";
        g.fillText(`${band.device}: ${r1 - r0} px${band.shares_comfyui_gpu ? " (ComfyUI's GPU)" : ""}`, x0 + 4,
                   y + Math.min(h / 2 + 4, h - 2));
      }
    }
  });
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// Follow config -> Distri Sampler/Model -> sampler -> latent source (EmptyLatentImage) for a size.
function latentSize(node) {
  const graph = node.graph ?? app.graph;
  const seen = new Set();
  const queue = [];
  for (const out of node.outputs ?? []) for (const id of out.links ?? []) queue.push(graph.links[id]?.target_id);
  while (queue.length) {
    const n = graph.getNodeById(queue.shift());
    if (!n || seen.has(n.id)) continue;
    seen.add(n.id);
    for (const inp of n.inputs ?? []) {
      if (!["latent_image", "samples"].includes(inp.name) || inp.link == null) continue;
      const src = graph.getNodeById(graph.links[inp.link]?.origin_id);
      const w = widget(src ?? {}, "width");
      const h = widget(src ?? {}, "height");
      if (w && h) return { width: w.value, height: h.value, cfg: widget(n, "cfg")?.value ?? 1,
                           steps: widget(n, "steps")?.value ?? 20 };
    }
    for (const out of n.outputs ?? []) for (const id of out.links ?? []) queue.push(graph.links[id]?.target_id);
  }
  return { width: 1024, height: 1024, cfg: 2, steps: 20, guessed: true };
}

async function update(node, view) {
  const size = latentSize(node);
  const q = new URLSearchParams({
    devices: widget(node, "devices")?.value ?? "auto",
    ranks: widget(node, "ranks")?.value ?? 0,
    cfg_split: widget(node, "cfg_split")?.value ?? "auto",
    width: size.width, height: size.height, cfg: size.cfg === 1 ? "off" : "on",
    mode: widget(node, "mode")?.value ?? "auto", steps: size.steps ?? 20,
    warmup_steps: widget(node, "warmup_steps")?.value ?? 4,
  });
  try {
    const plan = await (await api.fetchApi(`/distri/plan?${q}`)).json();
    if (plan.error) {
      view.canvas.style.display = "none";
      view.text.textContent = `Split for ${size.width}x${size.height}: ${plan.error}`;
      return;
    }
    view.canvas.style.display = "";
    drawPlan(view.canvas, plan);
    view.canvas.dataset.bands = plan.groups.reduce((n, g) => n + g.bands.length, 0);
    view.text.textContent = `${plan.width}x${plan.height}${size.guessed ? " (no latent connected yet)" : ""}: ` +
      `${plan.ranks} rank(s)${plan.cfg_split ? ", CFG split" : ""}; bands in rows of ${plan.unit_px} px ` +
      `(${plan.unit_from})` + (plan.auto ? `\n${plan.auto.text}` : "");
  } catch (e) {
    view.text.textContent = "split preview unavailable";
  }
}

app.registerExtension({
  name: "distri.PatchParallel.ConfigPreview",
  async nodeCreated(node) {
    if (node.comfyClass !== "DistriPatchParallelConfig") return;
    const el = document.createElement("div");
    el.className = "distri-split-preview";
    el.style.cssText = "font-size: 11px; padding: 2px 4px;";
    const canvas = document.createElement("canvas");
    canvas.className = "distri-split-picture";
    canvas.width = 280;
    canvas.height = 150;
    canvas.style.cssText = "width: 100%; max-width: 280px; display: block;";
    const text = document.createElement("div");
    text.style.cssText = "white-space: pre-wrap; opacity: 0.85;";
    el.append(canvas, text);
    node.addDOMWidget("split_preview", "distri_preview", el, {
      serialize: false, hideOnZoom: true, getMinHeight: () => 190, getMaxHeight: () => 190,
    });
    node.setSize?.([Math.max(node.size[0], 300), node.computeSize()[1]]);
    const refresh = () => update(node, { canvas, text });
    for (const name of WIDGETS) {
      const w = widget(node, name);
      if (!w) continue;
      const cb = w.callback;
      w.callback = function (...args) {
        const r = cb?.apply(this, args);
        refresh();
        return r;
      };
    }
    const onConnectionsChange = node.onConnectionsChange;
    node.onConnectionsChange = function (...args) {
      const r = onConnectionsChange?.apply(this, args);
      setTimeout(refresh, 0);
      return r;
    };
    setTimeout(refresh, 100);
  },
});
