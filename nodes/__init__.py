"""ComfyUI side of the pack: V3 nodes that translate between ComfyUI and distri_core."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .config_node import PatchParallelConfigNode
from .sampler_nodes import DistriModelNode, DistriSamplerNode
from .server_routes import register

register()

NODES = [PatchParallelConfigNode, DistriSamplerNode, DistriModelNode]


class DistriExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> DistriExtension:
    return DistriExtension()
