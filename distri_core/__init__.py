"""distri_core: DistriFusion's displaced patch parallelism for SD-family UNets, in plain PyTorch.

No ComfyUI import anywhere in this package: ComfyUI specifics arrive as arguments (a weight
accessor, a conditioning key), so everything here runs and is tested on a bare torch install.
"""

from .config import CommDtype, Compile, Mode, PatchParallelConfig
from .layout import BandPlan, CallLayout, make_layout, plan_bands

__all__ = ["CommDtype", "Compile", "Mode", "PatchParallelConfig", "BandPlan", "CallLayout", "make_layout", "plan_bands"]
