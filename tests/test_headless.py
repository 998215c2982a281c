"""Every API-format example workflow, made small, through a real ComfyUI server: POST /prompt,
comfy-cli's `comfy run`, and the pack's own `distri-run` client."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import workflow_runs


@pytest.mark.parametrize("name", workflow_runs.runnable())
def test_api_workflow_runs_through_post_prompt(comfy_server, name):
    entry = comfy_server.run(workflow_runs.small_api(name))
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = comfy_server.images(entry)
    assert images and all(p.stat().st_size > 0 for p in images)


# comfy-cli is a route to the same server: one workflow shows it (every workflow runs through POST
# /prompt above and through the browser; each run through comfy-cli cost the same again, 57 s in all).
@pytest.mark.parametrize("name", ["sdxl_txt2img_2048"])
def test_api_workflow_runs_through_comfy_cli(comfy_server, name, tmp_path):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(workflow_runs.small_api(name)))
    env = dict(os.environ, DO_NOT_TRACK="1", COMFY_NO_UPDATE_CHECK="1", COMFY_NO_WATCH="1")
    done = subprocess.run([sys.executable, "-m", "comfy_cli", "--skip-prompt", "run", "--workflow", str(path),
                           "--host", "127.0.0.1", "--port", str(comfy_server.port), "--wait", "--where", "local",
                           "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert events, done.stdout[-2000:]
    final = events[-1]
    assert final.get("ok") is True and not final.get("error"), final


def test_distri_run_client_saves_images_and_reports_failures(comfy_server, tmp_path):
    from distri_core import client

    path = tmp_path / "wf.json"
    path.write_text(json.dumps(workflow_runs.small_api("sdxl_txt2img_2048")))
    out = tmp_path / "images"
    assert client.main([str(path), "--server", f"127.0.0.1:{comfy_server.port}", "--out", str(out),
                        "--set", "6.seed=9"]) == 0
    assert [p.suffix for p in out.iterdir()] == [".png"]
    # an input the server rejects, and a bad override: exit codes 1 and 2
    assert client.main([str(path), "--server", f"127.0.0.1:{comfy_server.port}", "--set", "1.ckpt_name=nope.safetensors"]) == 1
    assert client.main([str(path), "--set", "99.seed=1"]) == 2
