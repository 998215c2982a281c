"""The GPU check's markdown summary, from its JSON."""

from __future__ import annotations


def _mb(n) -> str:
    return "" if n is None else f"{n / 2 ** 20:.1f}" if isinstance(n, int) and n > 4096 else str(n)


def markdown(report: dict) -> str:
    env = report.get("env", {})
    gpus = env.get("gpus") or []
    machine = ", ".join(f"{g['name']} ({g['memory_gb']} GB)" for g in gpus) or "no CUDA device"
    lines = [f"# GPU check: {report.get('name', '')}", "",
             f"Machine: {machine}; driver {env.get('driver')}, CUDA {env.get('cuda')}, NCCL {env.get('nccl')}, "
             f"torch {env.get('torch')}. Mode: {'quick' if report.get('quick') else 'full'}.", "",
             "| section | status | seconds | notes |", "|---|---|---|---|"]
    for name, sec in report.get("sections", {}).items():
        lines.append(f"| {name} | {sec.get('status')} | {sec.get('seconds', '')} | {_notes(name, sec)} |")
    timing = report.get("sections", {}).get("timing", {}).get("rows") or []
    if timing:
        lines += ["", "Compute-bound ceiling (SDXL fp16, batch 2; one rank's band with whole-image K/V, CUDA events):",
                  "", "| image | bands | ms/call | speedup ceiling | MB sent/call/rank | stale MB | peak MB | host syncs/call |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in timing:
            lines.append(f"| {r['size']}² | {r['bands']} | {r['ms']} | {r['speedup_ceiling']}x | "
                         f"{r['bytes_per_call'] / 2 ** 20:.1f} | {r['stale_mb']} | {r['peak_mb']} | "
                         f"{r['host_syncs_per_call']} |")
    compiled = report.get("sections", {}).get("compile", {}).get("rows") or []
    if compiled:
        lines += ["", "compile (SDXL fp16, batch 2, one rank's displaced band of 2):", "",
                  "| image | compile | ms/call | first call s | graphs | max diff vs off | host syncs/call |",
                  "|---|---|---|---|---|---|---|"]
        for r in compiled:
            if "error" in r:
                lines.append(f"| {r['size']}² | {r['compile']} | error: {r['error'][:120]} | | | | |")
                continue
            lines.append(f"| {r['size']}² | {r['compile']} | {r['ms']} | {r['first_call_s']} | {r['graphs']} | "
                         f"{r['max_abs_diff_vs_off']:.3g} | {r['host_syncs_per_call']} |")
    return "\n".join(lines) + "\n"


def _notes(name: str, sec: dict) -> str:
    if sec.get("status") == "skip":
        return sec.get("reason", "")
    if sec.get("error"):
        return sec["error"].splitlines()[-1][:200]
    if name in ("pool", "shared"):
        parts = [f"{len(sec.get('devices', []))} rank(s), {sec.get('backend')}, start {sec.get('start_s')} s"]
        for dtype, d in sec.get("dtypes", {}).items():
            parts.append(f"{dtype}: max diff {d['max_abs_diff']:.3g} (dtype rounding {d['rounding_of_dtype']:.3g})")
        for mode, calls in sec.get("displaced", {}).items():
            worst = max(c["max_abs_diff"] for c in calls)
            parts.append(f"{mode} displaced, unchanged input: {'exact' if all(c['exact'] for c in calls) else 'WRONG'} "
                         f"(max diff {worst:.3g})")
        if "kill" in sec:
            k = sec["kill"]
            parts.append(f"killed worker seen in {k.get('seconds_to_error')} s, next run "
                         f"{'exact' if k.get('next_run', {}).get('exact') else 'WRONG'}")
        return "; ".join(parts)
    if name == "comfy":
        parts = []
        for m in sec.get("modes", []):
            host = m.get("host_after_distri", {})
            parts.append(f"{m['vram_mode']} (dynamic on: {m.get('dynamic_vram_enabled')}): same latent "
                         f"{m.get('same_latent')} (rel diff {m.get('max_rel_diff', float('nan')):.2g}), ComfyUI GPU "
                         f"{host.get('torch_allocated_mb')} MB after Distri vs "
                         f"{m.get('host_after_ksampler', {}).get('torch_allocated_mb')} MB after KSampler")
        return "; ".join(parts)
    if name == "env":
        return ", ".join(f"{g['name']}" for g in sec.get("gpus", [])) or "no GPU"
    return ""
