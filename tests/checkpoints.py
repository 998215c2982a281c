"""The pack's random model writers (nodes/random_models.py), loaded by file path: in the tests the
top-level `nodes` module is ComfyUI's nodes.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "nodes" / "random_models.py"
_spec = importlib.util.spec_from_file_location("distri_random_models", _PATH)
random_models = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = random_models
_spec.loader.exec_module(random_models)

write_sd15 = random_models.write_sd15
write_sd15_lora = random_models.write_sd15_lora
write_sd15_controlnet = random_models.write_sd15_controlnet
write_flux_small = random_models.write_flux_small
