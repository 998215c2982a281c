"""Tables and plots from benchmark JSON: `python -m distri_core.bench_report a.json b.json --out docs/bench`.

Writes speedup.png, fidelity.png and memory.png (one group of bars per benchmark file) and prints a
markdown table per file. Needs matplotlib (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _label(report: dict) -> str:
    a = report["args"]
    rounds = a.get("repeat", 1)
    return f"{a['model']} {a['size']}px" + (f" (median of {rounds} rounds)" if rounds > 1 else "")


def table(report: dict) -> str:
    rows = ["| ranks | mode | s/step | s/step after warm-up | speedup | mean abs err | PSNR dB | MB sent/step "
            "| peak RSS/rank MB | stale state/rank MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        rss = max(m.get("peak_rss_mb", m.get("rss_mb", 0)) for m in r["memory_per_rank"])
        psnr = "exact" if r["psnr_db"] is None else ("exact (>140)" if r["psnr_db"] > 140 else f"{r['psnr_db']:.1f}")
        mode = r["mode"] + (f" + {r['compile']}" if r.get("compile", "off") != "off" else "")
        rows.append(f"| {r['ranks']} | {mode} | {r['sec_per_step']:.3f} | {r['sec_per_step_after_warmup']:.3f} | "
                    f"{r['speedup']:.2f}x | {r['mean_abs_err']:.2g} | {psnr} | "
                    f"{r['bytes_per_step'] / 2 ** 20:.2f} | {rss:.0f} | "
                    f"{max(m.get('stale_mb', 0) for m in r['memory_per_rank']):.1f} |")
    return "\n".join(rows)


def plots(reports: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def bars(name: str, ylabel: str, value, skip_single: bool = False, log: bool = False):
        fig, ax = plt.subplots(figsize=(10, 3.6))
        width = 0.8 / max(1, len(reports))
        modes = []
        for rep in reports:
            for r in rep["results"]:
                key = f"{r['ranks']}x {r['mode']}"
                if key not in modes and not (skip_single and r["ranks"] == 1):
                    modes.append(key)
        for i, rep in enumerate(reports):
            by_key = {f"{r['ranks']}x {r['mode']}": r for r in rep["results"]}
            xs = [j + i * width for j in range(len(modes))]
            ys = [value(by_key[m]) if m in by_key else 0 for m in modes]
            ax.bar(xs, ys, width, label=_label(rep))
        ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(modes))])
        ax.set_xticklabels(modes, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    bars("speedup", "speedup over 1 rank (same run)", lambda r: r["speedup"])
    bars("fidelity", "mean |error| of final latent vs 1 rank", lambda r: max(r["mean_abs_err"], 1e-7),
         skip_single=True, log=True)
    bars("memory", "peak RSS per rank (MB)",
         lambda r: max(m.get("peak_rss_mb", m.get("rss_mb", 0)) for m in r["memory_per_rank"]))
    return written


PLAN = "distri_core.bench --plan auto"


def plan_table(report: dict) -> str:
    """One row per (size, cfg, steps) of a `--plan auto` report: auto's choice, its predicted and
    measured s/step, the best allowed fixed layout, and auto's error against one device."""
    rows = ["| model | size | cfg | steps | auto chose | predicted s/step | measured | prediction error | best fixed "
            "layout (allowed) | auto / best | auto mean abs err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        rows.append(f"| {r['model']} | {r['size']} | {r.get('cfg', 5.0):g} | {r['steps']} | {r['auto_layout']} | "
                    f"{r['auto_predicted_s_per_step']:.3f} | {r['auto_measured_s_per_step']:.3f} | "
                    f"{r['auto_prediction_error']:+.0%} | {r['best_allowed_layout']} | {r['auto_over_best_allowed']:.2f} | "
                    f"{r['auto_mean_abs_err']:.2g} |")
    return "\n".join(rows)


SHORT = {"full_sync": "exact", "CFG split, full_sync": "CFG split",
         "corrected_async_gn": "displaced"}


def _short(layout: str) -> str:
    if layout == "one device":
        return "1 dev"
    n, _, rest = layout.partition(" devices, ")
    return f"{n}x {SHORT.get(rest, rest)}"


def plan_compact(reports: list[dict]) -> str:
    """The README's table: per model, size and cfg, auto's choice at each step count, its measured
    time over the best allowed fixed layout's, and its prediction error."""
    res = [r for rep in reports for r in rep["results"]]
    steps = sorted({r["steps"] for r in res})
    rows = ["| model, image, cfg | " + " | ".join(f"{s} steps" for s in steps) + " |",
            "|---" * (len(steps) + 1) + "|"]
    groups: dict[tuple, dict] = {}
    for r in res:
        groups.setdefault((r["model"], r["size"], r.get("cfg", 5.0)), {})[r["steps"]] = r
    for (model, size, cfg), by_steps in groups.items():
        cells = []
        for s in steps:
            r = by_steps.get(s)
            cells.append("" if r is None else f"{_short(r['auto_layout'])} ({r['auto_over_best_allowed']:.2f}, "
                                              f"{r['auto_prediction_error']:+.0%})")
        rows.append(f"| {model} {size}², cfg {cfg:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plan_summary(report: dict) -> dict:
    """How close the planner came over a whole report."""
    res = report["results"]
    every = [abs(lay["predicted_over_measured"] - 1) for r in res for lay in r["layouts"]]
    return {"cases": len(res), "auto_within_25pct": sum(abs(r["auto_prediction_error"]) <= 0.25 for r in res),
            "auto_within_10pct_of_best": sum(r["auto_over_best_allowed"] <= 1.10 for r in res),
            "max_auto_over_best": max(r["auto_over_best_allowed"] for r in res),
            "layouts_within_25pct": sum(e <= 0.25 for e in every), "layouts": len(every)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distri_core.bench_report", description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="JSON files written by python -m distri_core.bench --json")
    p.add_argument("--out", default="docs/bench", help="folder for the PNG plots")
    args = p.parse_args(argv)
    reports = [json.loads(Path(f).read_text()) for f in args.reports]
    plans = [r for r in reports if r.get("benchmark") == PLAN]
    reports = [r for r in reports if r.get("benchmark") != PLAN]
    for rep in plans:
        print(f"### --plan auto, {rep['model']} on {len(rep['devices'])} ranks\n\n{plan_table(rep)}\n\n"
              f"{json.dumps(plan_summary(rep))}\n")
    if not reports:
        return 0
    for rep in reports:
        print(f"### {_label(rep)}\n\n{table(rep)}\n")
    for path in plots(reports, Path(args.out)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
