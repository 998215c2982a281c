"""distri-doctor on a machine without a GPU: the whole report (CPU ranks), as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_doctor_checks_this_machine_end_to_end(tmp_path):
    out = tmp_path / "doctor.json"
    done = subprocess.run([sys.executable, "-m", "distri_core.doctor", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    if not report["env"]["cuda_available"]:
        assert report["devices"] == ["cpu", "cpu"] and "checking with 2 CPU ranks" in done.stdout
    assert report["pool"]["status"] == "pass" and all(d["exact"] for d in report["pool"]["dtypes"].values())
    assert report["speed"]["one_device_s"] > 0 and report["speed"]["all_devices_s"] > 0
    assert report["shared_memory"]["free"] > 0 and report["shared_memory"]["needed"] > 0
    # mode auto's predictions from the machine profile measured here, at 1024, 2048 and 4096
    predicted = report["speed"]["predicted"]
    assert [p["size"] for p in predicted] == [1024, 2048, 4096]
    assert all(0 < p["predicted_s_per_step"] <= p["one_device_s_per_step"] * (1 + 1e-9) for p in predicted)
    assert "mode auto, the built-in tiny model (SDXL needs a GPU here) at 4096x4096" in done.stdout
    verdict = report["verdict"]
    assert verdict["ok"] and verdict["settings"]["mode"] == "auto"
    assert done.stdout.splitlines()[-1].startswith("use in Patch Parallel Config:")


def test_doctor_names_the_fix_for_a_small_dev_shm():
    from distri_core.doctor import verdict

    report = {"devices": ["cuda:0", "cuda:1"], "transport": [],
              "shared_memory": {"ok": False, "fix": "give the container more shared memory (docker run --shm-size=2g)"},
              "pool": {"status": "fail", "error": "WorkerError: NCCL error: unhandled system error"}}
    v = verdict(report)
    assert not v["ok"] and any("--shm-size" in f for f in v["fixes"]) and any("NCCL_P2P_DISABLE" in f for f in v["fixes"])
