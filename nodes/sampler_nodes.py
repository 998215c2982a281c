"""Distri Sampler (KSampler with the UNet on several GPUs) and Distri Model (the same as a model
patch, for any sampler node)."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from .bridge import parallel_model
from .config_node import CONFIG_TYPE


class DistriModelNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DistriModel",
            display_name="Distri Model",
            category="sampling/distri",
            description=(
                "Makes the model's UNet run patch-parallel on the configured devices, for any sampler node "
                "(KSamplerAdvanced, SamplerCustomAdvanced, custom guiders). The sampler, CFG and previews stay "
                "ComfyUI's own; only the UNet evaluation moves to the GPU workers."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x or SDXL model (LoRAs applied before this node work)."),
                CONFIG_TYPE.Input("config", tooltip="From Patch Parallel Config."),
            ],
            outputs=[io.Model.Output(tooltip="The model, patched to sample on several devices.")],
        )

    @classmethod
    def execute(cls, model, config) -> io.NodeOutput:
        return io.NodeOutput(parallel_model(model, config))


class DistriSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DistriSampler",
            display_name="Distri Sampler",
            category="sampling/distri",
            description=(
                "KSampler that splits each denoising step of one image over several GPUs (DistriFusion). Same "
                "inputs and output as KSampler plus a Patch Parallel Config; in full_sync mode the result equals "
                "KSampler's."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising the input latent."),
                CONFIG_TYPE.Input("config", tooltip="From Patch Parallel Config: devices and mode."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of denoising steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES,
                               tooltip="The sampling algorithm (any of ComfyUI's)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES,
                               tooltip="How noise is removed over the steps."),
                io.Conditioning.Input("positive", tooltip="What to include in the image."),
                io.Conditioning.Input("negative", tooltip="What to exclude from the image."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (empty for txt2img)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Less than 1 keeps the structure of the input latent (img2img, hires fix)."),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    def execute(cls, model, config, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise=1.0) -> io.NodeOutput:
        import nodes as comfy_nodes  # ComfyUI's nodes.py

        patched = parallel_model(model, config)
        (out,) = comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                              latent_image, denoise=denoise)
        return io.NodeOutput(out)
