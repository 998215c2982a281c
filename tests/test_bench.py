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


def test_bench_rejects_bad_arguments():
    done = subprocess.run([sys.executable, "-m", "distri_core.bench", "--repeat", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "--repeat=0: use 1 or more" in done.stderr
    done = subprocess.run([sys.executable, "-m", "distri_core.bench", "--model", "huge"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'huge'" in done.stderr
