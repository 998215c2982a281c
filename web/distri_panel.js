// Distri Patch Parallel: a sidebar panel showing the GPU worker pool and the current/last run.
// Live from the server's "distri.status" events, refreshed from GET /distri/status.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const fmtMB = (m) => (m == null ? "-" : m >= 1024 ? `${(m / 1024).toFixed(1)} GB` : `${Math.round(m)} MB`);
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));

let status = { state: "not started", workers: [] };
let root = null;
let previous = null; // the step log of the run before the current one, for comparison

// Seconds per step of a run as bars (exact/synchronous steps in amber), the longest time a rank
// was blocked on communication in each step in red at the bottom, the previous run as a grey line.
function chart(run) {
  const log = run.step_log || [];
  if (!log.length) return "";
  const W = 300, H = 90, base = H - 14;
  const n = Math.max(log.length, run.steps || 0, previous?.length || 0);
  const all = [...log, ...(previous || [])].map((s) => s.seconds);
  const top = Math.max(...all, 1e-6);
  const bw = W / n;
  const y = (v) => base - (v / top) * (base - 4);
  const bars = log.map((s, i) => {
    const wait = Math.max(0, ...(s.wait_s || []));
    return `<rect class="distri-bar" x="${(i * bw).toFixed(1)}" y="${y(s.seconds).toFixed(1)}" width="${Math.max(1, bw - 1).toFixed(1)}"
              height="${(base - y(s.seconds)).toFixed(1)}" fill="${s.sync ? "#d9a441" : "#4a90d9"}"><title>step ${s.step}: ${s.seconds.toFixed(3)} s${s.sync ? " (exact)" : ""}, blocked up to ${wait.toFixed(3)} s</title></rect>
            <rect x="${(i * bw).toFixed(1)}" y="${y(wait).toFixed(1)}" width="${Math.max(1, bw - 1).toFixed(1)}" height="${(base - y(wait)).toFixed(1)}" fill="#c0392b" opacity="0.8"/>`;
  }).join("");
  const line = previous?.length ? `<polyline fill="none" stroke="#999" stroke-width="1" points="${previous.map((s, i) =>
    `${(i * bw + bw / 2).toFixed(1)},${y(s.seconds).toFixed(1)}`).join(" ")}"/>` : "";
  return `<svg class="distri-chart" width="${W}" height="${H}" data-steps="${log.length}">
      ${bars}${line}
      <text x="0" y="${H - 2}" font-size="9" fill="#aaa">s/step (max ${top.toFixed(2)} s) · amber exact · red blocked · grey previous run</text>
    </svg>`;
}

function memoryText(mem) {
  if (!mem) return "-";
  return mem.cuda_mb != null ? `${fmtMB(mem.cuda_mb)} GPU, ${fmtMB(mem.rss_mb)} RAM` : fmtMB(mem.rss_mb);
}

function draw() {
  if (!root) return;
  const s = status;
  const cfg = s.config;
  const run = s.run || {};
  const rows = (s.workers || []).map((w) => `
      <tr class="${w.alive ? "" : "distri-dead"}">
        <td>${w.rank}</td><td>${esc(w.device)}</td><td>${w.pid}</td>
        <td>${w.alive ? "alive" : "dead"}</td><td>${memoryText(w.memory)}</td><td>${w.calls}</td>
        <td class="distri-err">${esc(w.last_error)}</td>
      </tr>`).join("");
  let runText = "no run yet";
  if (run.state === "running") {
    runText = `running: step ${run.step ?? 0} of ${run.steps ?? "?"}` +
      (run.sec_per_step ? `, ${run.sec_per_step.toFixed(2)} s/step` : "");
  } else if (run.state) {
    runText = `last run ${run.state}: ${run.steps ?? "?"} steps in ${(run.seconds ?? 0).toFixed(1)} s` +
      (run.sec_per_step ? `, ${run.sec_per_step.toFixed(2)} s/step` : "") +
      (run.speedup_estimate ? `, about ${run.speedup_estimate.toFixed(2)}x one GPU (busy GPU-seconds per second)` : "");
  }
  if (run.plan) {
    // mode auto: the plan of this run and what the planner predicted for it
    runText += ` — plan: ${esc(run.plan.reason)}; predicted ${run.plan.predicted_s_per_step.toFixed(3)} s/step ` +
      `against ${run.plan.one_device_s_per_step.toFixed(3)} on one device`;
  }
  root.innerHTML = `
    <div class="distri-panel">
      <h3>Distri Patch Parallel</h3>
      <div class="distri-state distri-state-${esc(s.state).replace(/\s/g, "-")}">pool: <b>${esc(s.state)}</b>
        ${s.backend ? ` (${esc(s.backend)})` : ""}</div>
      ${cfg ? `<div>${cfg.world_size} rank(s), ${esc(cfg.mode)}, warm-up ${cfg.warmup_steps}, comm ${esc(cfg.comm_dtype)}${cfg.compile && cfg.compile !== "off" ? `, ${esc(cfg.compile)}` : ""}</div>` : ""}
      <div>model: ${esc(s.model ?? "none loaded")}${s.model_mb ? ` (${fmtMB(s.model_mb)} per worker)` : ""}</div>
      <div class="distri-run">${esc(runText)}</div>
      ${chart(run)}
      ${s.last_error ? `<div class="distri-err">last error: ${esc(s.last_error)}</div>` : ""}
      <table class="distri-workers">
        <thead><tr><th>rank</th><th>device</th><th>pid</th><th>state</th><th>memory</th><th>calls</th><th>error</th></tr></thead>
        <tbody>${rows || `<tr><td colspan="7">no workers (they start with the first Distri run)</td></tr>`}</tbody>
      </table>
    </div>`;
}

async function refresh() {
  try {
    const res = await api.fetchApi("/distri/status");
    if (res.ok) {
      const fresh = await res.json();
      status = { ...fresh, run: status.run?.state ? status.run : fresh.run };
      draw();
    }
  } catch (e) {
    console.warn("distri: status unavailable", e);
  }
}

const style = document.createElement("style");
style.textContent = `
  .distri-panel { padding: 8px 12px; font-size: 13px; }
  .distri-panel h3 { margin: 4px 0 8px; }
  .distri-workers { border-collapse: collapse; margin-top: 8px; width: 100%; }
  .distri-workers td, .distri-workers th { border: 1px solid var(--border-color, #444); padding: 2px 6px; text-align: left; }
  .distri-dead { opacity: 0.6; }
  .distri-err { color: #f66; }
  .distri-state-ready b { color: #6c6; }
  .distri-state-broken b { color: #f66; }
  .distri-run { margin: 6px 0; }
`;
document.head.appendChild(style);

app.registerExtension({
  name: "distri.PatchParallel.Panel",
  async setup() {
    api.addEventListener("distri.status", (event) => {
      const run = event.detail.run;
      if (run?.started && status.run?.started && run.started !== status.run.started && status.run.step_log?.length) {
        previous = status.run.step_log;
      }
      status = { ...status, ...event.detail };
      draw();
    });
    app.extensionManager.registerSidebarTab({
      id: "distri-patch-parallel",
      icon: "pi pi-th-large",
      title: "Distri",
      tooltip: "Distri Patch Parallel: GPU workers and runs",
      type: "custom",
      render: (el) => {
        root = el;
        draw();
        refresh();
      },
      destroy: () => {
        root = null;
      },
    });
    setInterval(() => root && refresh(), 5000);
  },
});
