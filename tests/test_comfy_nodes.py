"""The nodes inside real ComfyUI (in this process), against KSampler on the same model.

Distri Sampler in full_sync must reproduce KSampler's latent (float rounding) for ComfyUI's
samplers and schedulers, img2img, inpainting (noise mask and 9-channel models), weight patches
and ControlNet; the stale modes must stay close; interrupts, incompatible patches and pool
failures must behave as a user expects.
"""

from __future__ import annotations

import json
import os
import signal

import comfy_host
import pytest
import torch
from comfy_host import H, W, rel_err, run_pair, settings


@pytest.fixture(scope="module")
def sd15():
    return comfy_host.patcher("sd15")


@pytest.mark.parametrize("scheduler", ["karras", "normal"])
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "heun", "ddim"])
def test_full_sync_matches_ksampler(env, sd15, sampler, scheduler):
    out, ref = run_pair(env, sd15, settings(env), sampler=sampler, scheduler=scheduler)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("ranks, cfg_split", [(2, "on"), (3, "auto")])
def test_full_sync_matches_ksampler_on_sdxl(env, ranks, cfg_split):
    model = comfy_host.patcher("sdxl")
    out, ref = run_pair(env, model, settings(env, ranks=ranks, cfg_split=cfg_split), kind="sdxl",
                        sampler="dpmpp_2m", scheduler="karras")
    assert rel_err(out, ref) < 1e-4


def test_full_sync_matches_ksampler_on_sd2_v_prediction(env):
    model = comfy_host.patcher("sd2")
    assert model.model.model_type.name == "V_PREDICTION"
    out, ref = run_pair(env, model, settings(env, ranks=3), kind="sd2", sampler="euler_ancestral",
                        scheduler="normal")
    assert rel_err(out, ref) < 1e-4


def test_img2img_and_noise_mask_inpainting(env, sd15):
    lat = comfy_host.latent(H, W, seed=9)
    out, ref = run_pair(env, sd15, settings(env), latent=lat, denoise=0.55)
    assert rel_err(out, ref) < 1e-4
    mask = torch.zeros(1, 1, H * 8, W * 8)
    mask[:, :, 40:160, 30:120] = 1.0
    out, ref = run_pair(env, sd15, settings(env), latent={**lat, "noise_mask": mask}, denoise=0.8)
    assert rel_err(out, ref) < 1e-4
    assert torch.allclose(out[..., :2, :], lat["samples"][..., :2, :], atol=1e-3)  # unmasked rows kept


def test_nine_channel_inpaint_model(env):
    model = comfy_host.patcher("sd15", in_channels=9)
    g = torch.Generator().manual_seed(4)
    extra = {"concat_latent_image": torch.randn(1, 4, H, W, generator=g),
             "concat_mask": (torch.rand(1, 1, H * 8, W * 8, generator=g) > 0.5).float()}
    pos = comfy_host.conditioning("sd15", 1, H, W, **extra)
    neg = comfy_host.conditioning("sd15", 2, H, W, **extra)
    out, ref = run_pair(env, model, settings(env), positive=pos, negative=neg)
    assert rel_err(out, ref) < 1e-4


def test_weight_patches_reach_the_workers_and_strength_changes_the_result(env, sd15):
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    delta = torch.randn_like(sd15.model.state_dict()[key]) * 0.5
    results = {}
    for strength in (0.8, 0.2):
        patched = sd15.clone()
        patched.add_patches({key: (delta,)}, strength)
        out, ref = run_pair(env, patched, settings(env))
        assert rel_err(out, ref) < 1e-4
        results[strength] = out
    plain, _ = run_pair(env, sd15, settings(env))
    assert rel_err(results[0.8], results[0.2]) > 1e-3 and rel_err(results[0.2], plain) > 1e-4


def test_controlnet_residuals_are_split_per_band(env, sd15):
    import nodes as comfy_nodes

    cnet = comfy_host.controlnet("sd15")
    hint = torch.rand(1, H * 8, W * 8, 3, generator=torch.Generator().manual_seed(2))
    pos, neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        comfy_host.conditioning("sd15", 1, H, W), comfy_host.conditioning("sd15", 2, H, W), cnet, hint, 0.9, 0.0, 1.0)
    for ranks in (2, 3):
        out, ref = run_pair(env, sd15, settings(env, ranks=ranks), positive=pos, negative=neg)
        assert rel_err(out, ref) < 1e-4
    plain, _ = run_pair(env, sd15, settings(env))
    assert rel_err(out, plain) > 1e-3  # the ControlNet did change the result


def test_displaced_modes_stay_close(env, sd15):
    # corrected_extrapolated through the nodes and the pool: the workers extrapolate along the
    # timesteps ComfyUI's euler hands the UNet (nothing else tells them the schedule).
    errs = {}
    for mode in ("corrected_async_gn", "corrected_extrapolated", "naive_patch"):
        out, ref = run_pair(env, sd15, settings(env, mode=mode), steps=12, sampler="euler", scheduler="normal")
        errs[mode] = float((out - ref).abs().mean() / ref.abs().mean())
    assert errs["corrected_async_gn"] < errs["naive_patch"] / 3, errs
    assert errs["corrected_extrapolated"] < errs["naive_patch"] / 3, errs
    assert errs["corrected_extrapolated"] != errs["corrected_async_gn"], errs


def test_distri_model_drives_sampler_custom_advanced(env, sd15):
    from comfy_extras import nodes_custom_sampler as cs

    def sample(model):
        guider = cs.CFGGuider.execute(model, comfy_host.conditioning("sd15", 1, H, W),
                                      comfy_host.conditioning("sd15", 2, H, W), 4.0).args[0]
        sampler = cs.KSamplerSelect.execute("dpmpp_2m").args[0]
        sigmas = cs.BasicScheduler.execute(model, "karras", 6, 1.0).args[0]
        noise = cs.RandomNoise.execute(7).args[0]
        return cs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, comfy_host.latent(H, W)).args[0]

    ref = sample(sd15)["samples"]
    patched = env.Model.execute(sd15, settings(env)).args[0]
    assert patched is not sd15 and "distri_patch_parallel" not in sd15.model_options["transformer_options"]
    assert rel_err(sample(patched)["samples"], ref) < 1e-4


def test_interrupt_stops_within_a_step_and_the_next_run_works(env, sd15):
    import comfy.model_management as mm
    import comfy.patcher_extension

    calls = []

    def interrupt_after_three(executor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            mm.interrupt_current_processing(True)
        return executor(*args, **kwargs)

    model = sd15.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_interrupt", interrupt_after_three)
    config = settings(env, mode="corrected_async_gn")
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_pair(env, model, config, steps=10)
    finally:
        mm.interrupt_current_processing(False)
    calls.clear()
    expected = env.Sampler.execute(sd15, config, 5, 6, 5.0, "euler", "karras", comfy_host.conditioning("sd15", 1, H, W),
                                     comfy_host.conditioning("sd15", 2, H, W), comfy_host.latent(H, W), 1.0).args[0]
    again = env.Sampler.execute(sd15, config, 5, 6, 5.0, "euler", "karras", comfy_host.conditioning("sd15", 1, H, W),
                                  comfy_host.conditioning("sd15", 2, H, W), comfy_host.latent(H, W), 1.0).args[0]
    assert torch.equal(expected["samples"], again["samples"])


def test_incompatible_patch_is_refused_or_run_on_one_device(env, sd15):
    from comfy_extras.nodes_freelunch import FreeU_V2

    freeu = FreeU_V2.execute(sd15, 1.3, 1.4, 0.9, 0.2).args[0]
    with pytest.raises(ValueError, match=r"output block patch \(FreeU, Kohya Deep Shrink\).*single_device"):
        run_pair(env, freeu, settings(env))
    out, ref = run_pair(env, freeu, settings(env, unsupported="single_device"))
    assert torch.equal(out, ref)


def test_unsupported_model_family_is_refused(env):

    class NotAUnet(torch.nn.Module):
        pass

    fake = comfy_host.patcher("sd15")
    fake.model.diffusion_model = NotAUnet()
    with pytest.raises(ValueError, match=r"the model is BaseModel \(NotAUnet\); supported are SD1.x, SD2.x and SDXL "
                       r"UNets and Flux.*single_device"):
        env.Model.execute(fake, settings(env))


def test_dead_worker_is_a_node_error_and_the_next_prompt_works(env, sd15):
    from distri_core.runtime.pool import WorkerError, current_pool

    config = settings(env)
    run_pair(env, sd15, config, steps=2)
    os.kill(current_pool().status()["workers"][1]["pid"], signal.SIGKILL)
    with pytest.raises(WorkerError, match="died: killed by SIGKILL"):
        run_pair(env, sd15, config, steps=2)
    out, ref = run_pair(env, sd15, config, steps=2)
    assert rel_err(out, ref) < 1e-4


def test_auto_plans_each_run_and_few_steps_stay_exact(env, sd15, tmp_path, monkeypatch):
    """mode auto: the first run measures the machine (cached on disk), every run gets a plan; a
    6-step run is exact (equal to KSampler) whatever layout wins, a 12-step run may be displaced
    but is synchronous at its first step and never predicted slower than one device."""
    from distri_patch_parallel_pack.nodes import planning

    monkeypatch.setenv("DISTRI_CACHE_DIR", str(tmp_path / "profiles"))
    planning._profiles.clear()
    config = settings(env, mode="auto", cfg_split="auto")
    out, ref = run_pair(env, sd15, config, steps=6)
    assert rel_err(out, ref) < 1e-4
    plan = dict(planning.last_plan)
    assert plan["mode"] == "full_sync" and plan["steps"] == 6 and plan["batch"] == 2
    assert plan["predicted_s_per_step"] <= plan["one_device_s_per_step"] * (1 + 1e-9)
    assert {c["label"] for c in plan["candidates"]} >= {"one device", "2 devices, full_sync"}
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1  # measured once, cached
    planning._profiles.clear()  # the next run reads the disk cache instead of measuring again
    out, ref = run_pair(env, sd15, config, steps=12, sampler="dpmpp_2m")
    plan = dict(planning.last_plan)
    assert plan["steps"] == 12 and 0 in plan["sync_steps"]
    assert rel_err(out, ref) < (1e-4 if plan["mode"] == "full_sync" else 0.5)
    # Another batch and size: the cached profile gets a calibration there (a few calls), no new profile
    (cached,) = (tmp_path / "profiles").glob("*.json")
    before = json.loads(cached.read_text())
    out, ref = run_pair(env, sd15, config, steps=4, cfg=1.0, latent=comfy_host._latent(16, W))
    assert rel_err(out, ref) < 1e-4 and planning.last_plan["batch"] == 1
    after = json.loads(cached.read_text())
    assert after["measured"] == before["measured"]
    assert [(c["batch"], c["height"], c["width"]) for c in after["calibrations"]] == [(2, H, W), (1, 16, W)]
    # The Config node's preview (/distri/plan) shows the plan auto would choose, with its candidates
    from distri_patch_parallel_pack.nodes.server_routes import split_plan

    preview = split_plan("cpu", 2, W * 8, H * 8, "auto", True, "auto", 12)
    assert preview["auto"]["plan"]["candidates"] and "s/step predicted" in preview["auto"]["text"]
    assert preview["ranks"] == len(preview["auto"]["plan"]["ranks"]) and preview["auto"]["last_run"]["steps"] == 4


def test_compile_is_an_optional_config_input(env):
    """Patch Parallel Config's `compile` reaches the pool's configuration; prompts saved before it
    existed (no `compile` input) still validate and run uncompiled; cuda_graphs on CPU ranks is a
    validation error that names the fix."""
    from distri_patch_parallel_pack.nodes.config_node import PatchParallelConfigNode

    schema = PatchParallelConfigNode.define_schema()
    (compile_input,) = [i for i in schema.inputs if i.id == "compile"]
    assert compile_input.optional and compile_input.default == "off"
    args = ("cpu", 2, "corrected_async_gn", 2, "off", "auto", "error")
    assert PatchParallelConfigNode.validate_inputs(*args) is True
    assert env.build_settings(*args).config.compile.value == "off"
    assert env.build_settings(*args, "torch_compile").config.compile.value == "torch_compile"
    refusal = PatchParallelConfigNode.validate_inputs(*args, compile="cuda_graphs")
    assert "compile=cuda_graphs needs CUDA devices" in refusal and "torch_compile" in refusal
