"""The host side inside real ComfyUI: where the sampler runs and what loads on ComfyUI's GPU,
how ComfyUI batches conds, when the workers give memory back, and which weights and patches the
workers can take (fp8 yes, as fp8; quantized loaders, emb patches and torch.compile no, by name).

This machine has no GPU, so ComfyUI's "GPU" here is the CPU: where a test can only check the
invariant that decides GPU placement (load_device unchanged, no UNet bytes loaded), it says so;
the GPU acceptance check (python -m distri_core.gpucheck) runs the same runs on a real GPU.
"""

from __future__ import annotations

import logging

import comfy_host
import pytest
import torch
from comfy_host import H, W, conditioning, rel_err, run_pair, settings

from distri_core.layers.attention import UnsupportedInputError


@pytest.fixture(scope="module")
def sd15():
    return comfy_host.patcher("sd15")


def _record_batches(model):
    """A clone whose APPLY_MODEL wrapper records each UNet call's batch size and device."""
    import comfy.patcher_extension

    calls = []

    def record(executor, x, *args, **kwargs):
        calls.append((x.shape[0], x.device))
        return executor(x, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_record", record)
    return m, calls


def test_sampler_stays_on_comfyui_device_and_the_unet_never_loads_there(env, sd15):
    # The old clone set load_device to the CPU, so with a classic ModelPatcher ComfyUI ran the
    # whole sampler (noise, latents, ControlNet inputs, previews) on the CPU. The clone now keeps
    # ComfyUI's device and loads no UNet weight: what ComfyUI accounts for it is the rest.
    import comfy.model_management as mm
    from distri_patch_parallel_pack.nodes.host import HostWithoutUNet

    model, calls = _record_batches(sd15)
    patched = env.Model.execute(model, settings(env)).args[0]
    assert isinstance(patched, HostWithoutUNet) and patched.load_device == model.load_device
    unet_bytes = sum(p.nbytes for p in sd15.model.diffusion_model.parameters())
    assert patched.model_size() < unet_bytes / 10
    out, ref = run_pair(env, patched, settings(env))  # patched passes through Distri Sampler again
    assert rel_err(out, ref) < 1e-4
    assert calls and all(device == patched.load_device for _, device in calls)
    loaded = [lm for lm in mm.current_loaded_models if lm.model is not None and isinstance(lm.model, HostWithoutUNet)]
    assert loaded and all(lm.model.loaded_size() == 0 for lm in loaded)
    assert all(p.device.type == "cpu" for p in sd15.model.diffusion_model.parameters())
    # A LoRA added after Distri Model keeps the class (clones do) and reaches the workers.
    lora = patched.clone()
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    lora.add_patches({key: (torch.randn_like(sd15.model.state_dict()[key]) * 0.5,)}, 0.7)
    assert isinstance(lora, HostWithoutUNet)


def test_cond_and_uncond_arrive_in_one_call_when_comfyui_memory_is_short(env, sd15, monkeypatch):
    # ComfyUI batches cond and uncond only when its estimate of the UNet's memory fits in free
    # GPU memory; a big image on a busy GPU splits them, and CFG split never engages. The UNet
    # runs in the pool, so a Distri run estimates only what crosses to it. Free memory is pinned
    # low here as a busy GPU would report it.
    import comfy.model_management as mm

    free = 200 * 2 ** 20
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (free, free) if torch_free_too
                        else free)
    model, calls = _record_batches(sd15)
    env.ksampler(model, 1, 2, 5.0, "euler", "normal", conditioning("sd15", 1, H, W), conditioning("sd15", 2, H, W),
                 comfy_host.latent(H, W))
    assert {b for b, _ in calls} == {1}  # KSampler: separate calls, the memory estimate says so
    calls.clear()
    env.Sampler.execute(model, settings(env, cfg_split="on"), 1, 2, 5.0, "euler", "normal",
                        conditioning("sd15", 1, H, W), conditioning("sd15", 2, H, W), comfy_host.latent(H, W), 1.0)
    assert {b for b, _ in calls} == {2}  # Distri: one call with both, split over the two ranks
    assert "memory_required" not in sd15.model.__dict__  # the estimate is restored after the run


def test_workers_release_memory_when_comfyui_frees_memory(env, sd15):
    import comfy.model_management as mm

    from distri_core.runtime.pool import current_pool

    run_pair(env, sd15, settings(env), steps=2)
    before = current_pool().status()["releases"]
    mm.unload_all_models()  # what POST /free {"unload_models": true} and an out-of-memory retry do
    assert current_pool().status()["releases"] > before


def test_fp8_weights_ship_as_fp8_and_match_ksampler(env):
    # An fp8 checkpoint (UNETLoader weight_dtype fp8_e4m3fn) is computed in a wider dtype through
    # ComfyUI's manual_cast ops. The workers store the same fp8 bytes (half the GPU memory of
    # fp16) and cast per call the same way.
    from distri_patch_parallel_pack.nodes.weights import effective_weights

    from distri_core.runtime.pool import current_pool

    model = comfy_host.patcher("sd15", dtype=torch.float8_e4m3fn, compute=torch.float32)
    dtypes = {d for _, _, d in effective_weights(model).entries}
    assert dtypes == {torch.float8_e4m3fn}, dtypes
    out, ref = run_pair(env, model, settings(env), steps=4)
    assert rel_err(out, ref) < 1e-4
    unet_mb = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 2 ** 20
    assert current_pool().status()["model_mb"] == pytest.approx(unet_mb, rel=0.01)


def test_fp16_weights_ship_without_a_float32_copy(env):
    from distri_patch_parallel_pack.nodes.weights import effective_weights

    model = comfy_host.patcher("sd15", dtype=torch.float16, compute=torch.float32)
    weights = effective_weights(model)
    assert {d for _, _, d in weights.entries} == {torch.float16}
    name = weights.entries[0][0]
    assert weights.get(name).dtype == torch.float16


def test_quantized_and_custom_operations_are_refused_by_name(env):
    import comfy.ops
    from distri_patch_parallel_pack.nodes.support import unsupported_reasons

    class GGMLOps(comfy.ops.manual_cast):
        pass

    gguf = comfy_host.patcher("sd15")
    gguf.model.model_config.custom_operations = GGMLOps
    assert "custom layer operations (GGMLOps: GGUF, NF4" in unsupported_reasons(gguf)[0]
    scaled = comfy_host.patcher("sd15")
    scaled.model.model_config.quant_config = {"mixed_ops": True}
    assert "quantized checkpoint (scaled fp8" in unsupported_reasons(scaled)[0]
    fast = comfy_host.patcher("sd15")
    for m in list(fast.model.diffusion_model.modules()):
        if type(m) is comfy.ops.disable_weight_init.Linear:
            m.__class__ = comfy.ops.fp8_ops.Linear  # what UNETLoader fp8_e4m3fn_fast builds
    reasons = unsupported_reasons(fast)
    assert any("fp8 matrix multiplication" in r for r in reasons), reasons
    with pytest.raises(UnsupportedInputError, match="custom layer operations"):
        env.Model.execute(gguf, settings(env))


def test_emb_patch_is_refused_not_dropped(env, sd15):
    # An emb_patch changes the timestep embedding on the host; the workers never receive host
    # functions, so it used to be accepted and silently ignored.
    model = sd15.clone()
    model.set_model_emb_patch(lambda emb, channels, transformer_options: emb * 2)
    with pytest.raises(UnsupportedInputError, match=r"timestep-embedding patch .*\(emb_patch\)"):
        env.Model.execute(model, settings(env))
    out, ref = run_pair(env, model, settings(env, unsupported="single_device"), steps=2)
    assert torch.equal(out, ref)


def test_torch_compile_before_is_removed_with_a_warning_and_after_is_refused(env, sd15, caplog):
    from comfy_extras import nodes_custom_sampler as cs
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    compiled = TorchCompileModel.execute(sd15, "inductor").args[0]
    with caplog.at_level(logging.WARNING, logger="distri_patch_parallel"):
        patched = env.Model.execute(compiled, settings(env)).args[0]
    assert "TorchCompileModel has no effect on a Distri model" in caplog.text
    assert "torch.compile" not in patched.wrappers.get("apply_model", {})
    out, ref = run_pair(env, patched, settings(env), steps=2)
    assert rel_err(out, ref) < 1e-4

    after = TorchCompileModel.execute(env.Model.execute(sd15, settings(env)).args[0], "inductor").args[0]
    guider = cs.CFGGuider.execute(after, conditioning("sd15", 1, H, W), conditioning("sd15", 2, H, W), 4.0).args[0]
    sampler = cs.KSamplerSelect.execute("euler").args[0]
    sigmas = cs.BasicScheduler.execute(after, "normal", 2, 1.0).args[0]
    noise = cs.RandomNoise.execute(1).args[0]
    with pytest.raises(UnsupportedInputError, match="TorchCompileModel is connected after Distri Model"):
        cs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, comfy_host.latent(H, W))


def test_split_preview_cuts_as_the_engine_does(env):
    # The preview used a fixed 64-pixel unit (SD1.x) for every model: for SDXL on 3 ranks at 2048 px
    # it showed 704/704/640 px while the run used 704/672/672.
    from distri_patch_parallel_pack.nodes.server_routes import split_plan

    from distri_core import make_layout

    plan = split_plan("cpu", 3, 2048, 2048, "off", True)
    heights = [b["rows_px"][1] - b["rows_px"][0] for b in plan["groups"][0]["bands"]]
    engine = make_layout(3, 2, 256, plan["unit_px"] // 8, False).bands.heights
    assert heights == [h * 8 for h in engine] and plan["unit_px"] in (32, 64), (heights, plan)
    if plan["unit_px"] == 32:
        assert heights == [704, 672, 672]
