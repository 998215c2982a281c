// Distri Patch Parallel: under each Patch Parallel Config node, show how the image will be cut
// (row bands per GPU, CFG split) for the size of the latent the connected sampler receives.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const WIDGETS = ["devices", "ranks", "cfg_split"];

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
      if (w && h) return { width: w.value, height: h.value, cfg: widget(n, "cfg")?.value ?? 1 };
    }
    for (const out of n.outputs ?? []) for (const id of out.links ?? []) queue.push(graph.links[id]?.target_id);
  }
  return { width: 1024, height: 1024, cfg: 2, guessed: true };
}

async function update(node, el) {
  const size = latentSize(node);
  const q = new URLSearchParams({
    devices: widget(node, "devices")?.value ?? "auto",
    ranks: widget(node, "ranks")?.value ?? 0,
    cfg_split: widget(node, "cfg_split")?.value ?? "auto",
    width: size.width, height: size.height, cfg: size.cfg === 1 ? "off" : "on",
  });
  try {
    const plan = await (await api.fetchApi(`/distri/plan?${q}`)).json();
    if (plan.error) {
      el.textContent = `Split for ${size.width}x${size.height}: ${plan.error}`;
      return;
    }
    const lines = [`${plan.width}x${plan.height}${size.guessed ? " (no latent connected yet)" : ""}: ` +
                   `${plan.ranks} rank(s)${plan.cfg_split ? ", CFG split" : ""}`];
    for (const g of plan.groups) {
      const bands = g.bands.map((b) => `${b.device} rows ${b.rows_px[0]}-${b.rows_px[1]}`).join("; ");
      lines.push(`${g.branch}: ${bands}`);
    }
    el.textContent = lines.join("\n");
  } catch (e) {
    el.textContent = "split preview unavailable";
  }
}

app.registerExtension({
  name: "distri.PatchParallel.ConfigPreview",
  async nodeCreated(node) {
    if (node.comfyClass !== "DistriPatchParallelConfig") return;
    const el = document.createElement("div");
    el.className = "distri-split-preview";
    el.style.cssText = "white-space: pre-wrap; font-size: 11px; opacity: 0.85; padding: 2px 4px;";
    node.addDOMWidget("split_preview", "distri_preview", el, { serialize: false, hideOnZoom: true });
    const refresh = () => update(node, el);
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
