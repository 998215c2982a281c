"""The benchmark command and its report: the JSON promised in the README, measured in one run."""

from __future__ import annotations

import json
import subprocess
import sys

from distri_core import bench_report


def test_bench_writes_json_with_speedup_error_bytes_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "distri_core.bench", "--model", "micro", "--size", "128", "--ranks", "1,2",
         "--modes", "full_sync", "--steps", "3", "--warmup", "1", "--repeat", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout) == report
    rows = {(r["ranks"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(1, "single_device"), (2, "full_sync")}
    single, exact = rows[1, "single_device"], rows[2, "full_sync"]
    assert single["speedup"] == 1.0 and single["max_abs_err"] == 0.0
    for row in rows.values():
        assert len(row["rounds_sec_per_step"]) == 2 and row["sec_per_step"] > 0
        assert len(row["memory_per_rank"]) == row["ranks"]
        assert all(m["peak_rss_mb"] > 0 for m in row["memory_per_rank"])
    # The speedup divides the median times of this run.
    assert abs(exact["speedup"] - single["sec_per_step"] / exact["sec_per_step"]) < 0.01 * exact["speedup"]
    assert exact["max_abs_err"] < 1e-4 and (exact["psnr_db"] is None or exact["psnr_db"] > 100)
    assert exact["bytes_per_step"] > 0 and exact["collectives_per_step"] > 1
    table = bench_report.table(report)
    assert "| 2 | full_sync |" in table and "exact" in table


def test_bench_profile_reports_operators_dispatches_and_host_time(tmp_path):
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [sys.executable, "-m", "distri_core.bench", "--profile", "--model", "micro", "--size", "256", "--ranks", "2",
         "--modes", "corrected_async_gn,naive_patch", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["profile"]
    assert [r["latent"] for r in rows] == [32]  # 16 rows a rank, and --size / 8: the same latent
    row = rows[0]
    assert row["plain"]["ops"] == row["plain"]["dispatches"] > 0 and row["plain"]["ms"] > 0
    displaced = row["corrected_async_gn"]["displaced"]
    assert displaced["host_waits"] == {} and displaced["first_call_host_waits"] == {}
    assert displaced["ops_vs_plain"] == round(displaced["ops"] / row["plain"]["ops"], 2) > 1
    assert row["naive_patch"]["displaced"]["ops"] < displaced["ops"]
    assert not any(k.endswith("+torch_compile") for k in row)  # only with --compile torch_compile


def test_bench_rejects_bad_arguments():
    done = subprocess.run([sys.executable, "-m", "distri_core.bench", "--repeat", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "--repeat=0: use 1 or more" in done.stderr
    done = subprocess.run([sys.executable, "-m", "distri_core.bench", "--model", "huge"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'huge'" in done.stderr


def test_plan_bench_measures_every_layout_next_to_the_planner(tmp_path):
    """bench --plan auto: for each size, cfg and step count, every fixed layout measured through the
    pool, the planner's prediction for each, and auto's choice (allowed by the fidelity rule: exact
    at 4 steps) with its error against one device; bench_report turns it into a table."""
    out = tmp_path / "plan.json"
    done = subprocess.run([sys.executable, "-m", "distri_core.bench", "--plan", "auto", "--model", "tiny", "--sizes",
                           "128", "--step-counts", "4,12", "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert [(r["cfg"], r["steps"]) for r in results] == [(5.0, 4), (5.0, 12), (1.0, 4), (1.0, 12)]
    for r in results:
        labels = [lay["layout"] for lay in r["layouts"]]
        assert labels[0] == "one device" and "2 devices, corrected_async_gn" in labels
        assert ("2 devices, CFG split, full_sync" in labels) == (r["cfg"] != 1.0)
        assert r["auto_layout"] in labels and all(lay["predicted_s_per_step"] > 0 for lay in r["layouts"])
        one = r["layouts"][0]
        assert one["mean_abs_err"] == 0.0
        exact = [lay for lay in r["layouts"] if lay["mode"] == "full_sync"]
        assert all(lay["max_abs_err"] < 1e-3 for lay in exact)
        if r["steps"] <= 10:
            assert "corrected_async_gn" not in r["auto_layout"] and r["auto_mean_abs_err"] < 1e-3
    assert "profile" in results[-1]
    table = bench_report.plan_table(report)
    assert table.count("\n") == 1 + len(results) and "auto chose" in table
