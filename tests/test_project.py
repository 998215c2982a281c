"""The project's own rules: lint clean, `distri_core` never imports ComfyUI, and the engine and
pool import in a Python that has no ComfyUI at all."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "nodes", "folder_paths", "server",
                 "execution", "latent_preview", "node_helpers"}


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed: pip install -e '.[test]'")
    done = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_distri_core_never_imports_comfyui():
    offenders = []
    for path in sorted((ROOT / "distri_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[0] in COMFY_MODULES]
    assert not offenders, "distri_core must stay plain torch:\n" + "\n".join(offenders)


def test_engine_and_pool_import_without_comfyui(tmp_path):
    # A fresh interpreter that can see neither ComfyUI nor this repo's nodes/ (only distri_core)
    # must import the engine, the pool and the pack's root module.
    code = (
        "import sys, importlib.util\n"
        f"sys.path = [p for p in sys.path if 'ComfyUI' not in p and p not in ('', {str(ROOT)!r})]\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import distri_core, distri_core.runtime.pool, distri_core.runtime.engine, distri_core.surgery\n"
        "assert importlib.util.find_spec('comfy') is None, 'ComfyUI is visible'\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(ROOT / '__init__.py')!r})\n"
        "pack = importlib.util.module_from_spec(spec); spec.loader.exec_module(pack)\n"
        "assert not hasattr(pack, 'comfy_entrypoint'), 'nodes exposed without ComfyUI'\n"
        "print('ok')\n"
    )
    (tmp_path / "distri_core").symlink_to(ROOT / "distri_core")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_unsupported_platform_gets_one_clear_message_and_no_nodes():
    code = (
        "import sys, logging, importlib.util\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "sys.platform = 'win32'\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(ROOT / '__init__.py')!r})\n"
        "pack = importlib.util.module_from_spec(spec); spec.loader.exec_module(pack)\n"
        "print('entrypoint' if hasattr(pack, 'comfy_entrypoint') else 'no nodes')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "no nodes", done.stdout + done.stderr
    assert "ERROR Distri Patch Parallel needs Linux (this is win32)" in done.stderr
    assert "WSL2" in done.stderr


def test_registry_validation_passes_offline():
    import os

    comfy = shutil.which("comfy", path=str(Path(sys.executable).parent)) or shutil.which("comfy")
    if comfy is None:
        pytest.skip("comfy-cli is not installed: pip install -e '.[test]'")
    env = dict(os.environ, DO_NOT_TRACK="1", COMFY_NO_UPDATE_CHECK="1")
    done = subprocess.run([comfy, "--skip-prompt", "node", "validate"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert done.returncode == 0 and "All validation checks passed" in done.stdout + done.stderr, done.stdout + done.stderr
