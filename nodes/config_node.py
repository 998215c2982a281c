"""Patch Parallel Config: how many ranks, on which devices, with which DistriFusion mode."""

from __future__ import annotations

from comfy_api.latest import io

from distri_core import CommDtype, Compile, Mode, PatchParallelConfig

from .bridge import DistriSettings, host_device, resolve_devices

CONFIG_TYPE = io.Custom("PATCH_PARALLEL_CONFIG")
CFG_SPLIT = {"auto": None, "on": True, "off": False}


def build_settings(devices: str, ranks: int, mode: str, warmup_steps: int, cfg_split: str, comm_dtype: str,
                   unsupported: str, compile: str = "off") -> DistriSettings:
    resolved = resolve_devices(devices, ranks)
    config = PatchParallelConfig(world_size=len(resolved), mode=mode, warmup_steps=warmup_steps,
                                 cfg_split=CFG_SPLIT[cfg_split], comm_dtype=comm_dtype, devices=resolved,
                                 host_device=host_device(), compile=compile)
    return DistriSettings(config, resolved, unsupported)


class PatchParallelConfigNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DistriPatchParallelConfig",
            display_name="Patch Parallel Config",
            category="sampling/distri",
            description=(
                "Chooses the devices and the DistriFusion mode for Distri Sampler and Distri Model: the image "
                "is cut into row bands, one per GPU, and each GPU reuses its neighbours' activations from the "
                "previous step so the exchange hides behind computation. auto (default) picks the devices, CFG "
                "split and mode per run from a profile it measures once; full_sync is exact (equal to one GPU); "
                "corrected_async_gn is DistriFusion's default."
            ),
            inputs=[
                io.String.Input("devices", default="auto",
                                tooltip="'auto' = every GPU (2 CPU ranks if there is none), 'cpu' = CPU ranks, or "
                                        "a list such as 'cuda:0,cuda:1'."),
                io.Int.Input("ranks", default=0, min=0, max=64,
                             tooltip="How many devices to use; 0 = all that 'devices' names."),
                io.Combo.Input("mode", options=[m.value for m in Mode], default=Mode.AUTO.value,
                               tooltip="auto: per run, the fastest layout measured on this machine that keeps the "
                                       "image faithful (exact below 11 steps; never slower than one GPU). "
                                       "full_sync: exact. corrected_async_gn: DistriFusion default. "
                                       "corrected_extrapolated: corrected_async_gn with the other GPUs' stale "
                                       "activations extrapolated along the timesteps (SD1.5/SDXL, 20+ steps: "
                                       "closer to one GPU, 2x the stale memory; refused on Flux). "
                                       "sync_gn/stale_gn/separate_gn: other GroupNorm variants. naive_patch: no "
                                       "communication (visible seams; a speed reference only)."),
                io.Int.Input("warmup_steps", default=4, min=0, max=1000,
                             tooltip="Steps after the first that run exactly before stale activations are used "
                                     "(DistriFusion: 4 of 50); in auto, the least warm-up a displaced run gets."),
                io.Combo.Input("cfg_split", options=list(CFG_SPLIT), default="auto",
                               tooltip="Give the positive and negative prompts to two halves of the GPUs. auto: "
                                       "whenever the GPU count is even and CFG is on."),
                io.Combo.Input("comm_dtype", options=[c.value for c in CommDtype], default=CommDtype.AUTO.value,
                               tooltip="Precision of exchanged activations; fp16/bf16 halve the traffic on PCIe "
                                       "machines. auto = the model's own."),
                io.Combo.Input("unsupported", options=["error", "single_device"], default="error",
                               tooltip="When a model or patch (FreeU, HyperTile, ...) cannot be split: stop with an "
                                       "explanation, or run that model on one device."),
                io.Combo.Input("compile", options=[c.value for c in Compile], default=Compile.OFF.value,
                               optional=True,
                               tooltip="Compile the displaced steps on the workers (after warm-up; the exchanges "
                                       "stay outside the compiled graphs). torch_compile: TorchInductor, once per "
                                       "image size (the first displaced step waits for it). cuda_graphs: the "
                                       "same, replayed as CUDA graphs (GPUs only). Exact steps run uncompiled."),
            ],
            outputs=[CONFIG_TYPE.Output("config", tooltip="Connect to Distri Sampler or Distri Model.")],
        )

    @classmethod
    def validate_inputs(cls, devices, ranks, mode, warmup_steps, cfg_split, comm_dtype, unsupported,
                        compile="off") -> bool | str:
        try:
            build_settings(devices, ranks, mode, warmup_steps, cfg_split, comm_dtype, unsupported, compile)
        except (ValueError, RuntimeError) as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, devices, ranks, mode, warmup_steps, cfg_split, comm_dtype, unsupported,
                compile="off") -> io.NodeOutput:
        return io.NodeOutput(build_settings(devices, ranks, mode, warmup_steps, cfg_split, comm_dtype, unsupported,
                                            compile))
