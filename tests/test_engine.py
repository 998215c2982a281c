"""The engine on gloo ranks against one device: diffusers' UNet and ComfyUI's own UNetModel.

The oracle is exactness: `full_sync` must equal the single-device output up to float32
rounding (max abs difference < 1e-4 on unit-scale outputs) for any rank count, even and
uneven bands, and CFG split. The stale modes must beat `naive_patch` by a wide margin.
"""

from __future__ import annotations

import pytest
import tasks

EXACT = 1e-4

# (family, model kind, latent height, latent width): H != W catches row/column mix-ups.
MODELS = [
    pytest.param("diffusers", "micro", 48, 40, id="diffusers-micro"),
    pytest.param("comfy", "sd15", 48, 40, id="comfy-sd15"),
    pytest.param("comfy", "sdxl", 48, 32, id="comfy-sdxl"),
    pytest.param("builtin", "tiny", 48, 32, id="builtin-tiny"),  # distri_core.unet: the GPU check's model
    pytest.param("comfy", "flux", 48, 32, id="comfy-flux"),  # ComfyUI's Flux class: a DiT, joint attention
    pytest.param("builtin", "flux-tiny", 48, 32, id="builtin-flux"),  # distri_core.dit: the bench's Flux
]
UNETS = [p for p in MODELS if "flux" not in p.id]  # models with convolutions and GroupNorms


@pytest.fixture
def comfy_arg(request):
    """comfy_path keyword for tasks (skips comfy cases where ComfyUI is absent)."""
    family = request.node.callspec.params.get("family")
    if family != "comfy":
        return {}
    return {"comfy_path": str(request.getfixturevalue("comfy_root"))}


@pytest.mark.parametrize("family, kind, height, width", MODELS)
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_full_sync_equals_single_device(cluster, comfy_arg, family, kind, height, width, ranks):
    r = cluster.run(tasks.call_errors, family, kind, 2, height, width, 2, mode="full_sync", cfg_split=False,
                    size=ranks, **comfy_arg)[0]
    assert max(r["errors"]) < EXACT, r
    assert r["scale"] > 0.1  # a real output, not zeros
    if ranks > 1:
        assert r["stats"]["bytes_sent"] > 0


@pytest.mark.parametrize("family, kind, height, width", MODELS)
def test_uneven_bands_are_exact(cluster, comfy_arg, family, kind, height, width):
    # 3 ranks over 40 rows and 4 ranks over 44 rows give bands of unequal height.
    for ranks, h in ((3, 40), (4, 44)):
        if kind != "micro":
            h = {40: 40, 44: 52}[h]  # comfy tiny models halve twice: heights multiple of 4
        r = cluster.run(tasks.call_errors, family, kind, 1, h, width, 2, mode="full_sync", size=ranks, **comfy_arg)[0]
        assert max(r["errors"]) < EXACT, (ranks, h, r)
    # Bands sized by device speed (mode auto on mixed GPUs): a 3:1 split of 48 rows
    r = cluster.run(tasks.call_errors, family, kind, 1, 48, width, 2, mode="full_sync", band_shares=(3.0, 1.0),
                    size=2, **comfy_arg)[0]
    assert max(r["errors"]) < EXACT, r


@pytest.mark.parametrize("family, kind, height, width", MODELS)
@pytest.mark.parametrize("ranks", [2, 4])
def test_cfg_split_equals_unsplit(cluster, comfy_arg, family, kind, height, width, ranks):
    r = cluster.run(tasks.call_errors, family, kind, 2, height, width, 2, mode="full_sync", cfg_split=True,
                    size=ranks, **comfy_arg)[0]
    assert max(r["errors"]) < EXACT, r


@pytest.mark.parametrize("family, kind, height, width", MODELS)
def test_stale_modes_after_warmup_beat_naive_patch(cluster, comfy_arg, family, kind, height, width):
    variants = family == "diffusers"  # the GroupNorm variants once; the three main modes on every UNet
    modes = ["full_sync", "corrected_async_gn", "naive_patch"] + (["sync_gn", "stale_gn", "separate_gn"] if variants else [])
    r = cluster.run(tasks.denoise, family, kind, 1, height, width, 8, modes, 2, size=2, **comfy_arg)[0]
    err = {m: e[1] for m, e in r["errors"].items()}  # mean abs error of the final latent
    assert r["errors"]["full_sync"][0] < 1e-3 * max(1.0, r["scale"]), r
    naive = err["naive_patch"]
    # The split matters for this model and size (the DDIM loop drives Flux, a flow model, to large
    # latents: its relative floor is lower).
    assert naive > (0.01 if "flux" in kind else 0.05) * r["scale"], r
    assert err["corrected_async_gn"] < naive / 5, r
    if variants:
        assert err["sync_gn"] < naive / 5, r
        for mode in ("stale_gn", "separate_gn"):
            assert err[mode] < naive / 2, (mode, r)
        # DistriFusion's correction beats both uncorrected estimates
        assert err["corrected_async_gn"] < min(err["stale_gn"], err["separate_gn"]), r


@pytest.mark.parametrize("family, kind, height, width", UNETS)
def test_input_convolution_is_exact_at_every_step(cluster, comfy_arg, family, kind, height, width):
    # Every rank holds the whole current input latent, so the first convolution takes its halo
    # rows from it, in every mode and every step (it used to read them from the previous step's
    # exchange in displaced steps: the rows that change most from step to step). The displaced
    # modes share the convolutions' path; sync_gn interleaves it with blocking GroupNorms.
    modes = ["full_sync", "corrected_async_gn", "sync_gn"]
    for r in cluster.run(tasks.input_conv_errors, family, kind, height, width, modes, size=3, **comfy_arg):
        for mode, errors in r.items():
            assert max(errors) < 1e-5, (mode, errors)


@pytest.mark.parametrize("family, kind, height, width", UNETS)
def test_a_resblock_half_pays_one_blocking_exchange(cluster, comfy_arg, family, kind, height, width):
    # In a synchronous step a GroupNorm followed (through SiLU) by a conv sends its statistics and
    # the conv's halo rows in one exchange: every such pair saves one blocking collective.
    collectives, exchanging, carriers = cluster.run(tasks.sync_collectives, family, kind, size=2, **comfy_arg)[0]
    assert carriers >= 4, carriers  # every ResBlock has two halves
    assert collectives == exchanging - carriers, (collectives, exchanging, carriers)


@pytest.mark.parametrize("family, kind, height, width", MODELS)
def test_displaced_steps_with_an_unchanged_input_are_exact(cluster, comfy_arg, family, kind, height, width):
    # corrected_extrapolated (UNets only): its storages take turns, so the second displaced call
    # reads a prediction made in place over the older version (equal to the latest here).
    modes = ["corrected_async_gn", "stale_gn", "sync_gn"] + ([] if "flux" in kind else ["corrected_extrapolated"])
    r = cluster.run(tasks.unchanged_input_errors, family, kind, height, width, modes, size=3, **comfy_arg)[0]
    for mode, errors in r.items():
        assert max(errors) < EXACT, (mode, errors)


@pytest.mark.parametrize("family, kind, height, width", [m for m in MODELS if "flux" not in m.id])
def test_copied_and_in_place_publishing_agree(cluster, comfy_arg, family, kind, height, width):
    # Under compile=cuda_graphs (GPU only) the layers cannot write into their stale slots inside the
    # graphs and hand over fresh tensors instead: the same path, run eagerly here, gives the same
    # bits in every call, synchronous and displaced. (The DiTs' joint attention never writes in
    # place: nothing to compare there.)
    r = cluster.run(tasks.copied_vs_in_place, family, kind, height, width, size=3, **comfy_arg)[0]
    assert r == [0.0] * 4, r


@pytest.mark.parametrize("mode", ["corrected_extrapolated", "stale_gn"])
def test_copied_and_in_place_publishing_agree_in_other_modes(cluster, mode):
    # The same with the extrapolating buffers, whose target storage the layers write into, and
    # with stale_gn, whose GroupNorm sums its own slot after writing its fresh moments there
    # (copied: into its stacked copy of the stale moments).
    r = cluster.run(tasks.copied_vs_in_place, "diffusers", "micro", 48, 40, mode=mode, size=3)[0]
    assert r == [0.0] * 4, r


def test_extrapolation_is_refused_on_flow_models():
    # On the flow-matching DiT the extrapolated K/V were further from one device than the stale
    # ones (docs/bench/extrapolate.md): the engine says so instead of running it.
    from distri_core import PatchParallelConfig, zoo
    from distri_core.runtime.engine import DistriUNet

    model = zoo.build_builtin("flux-tiny")
    with pytest.raises(ValueError, match="flow-matching model.*mode='corrected_async_gn'"):
        DistriUNet(model, PatchParallelConfig(world_size=1, mode="corrected_extrapolated"))


def test_warmup_and_stale_state_are_per_key(cluster):
    # cond and uncond arrive as separate calls: each key has its own warm-up and stale state,
    # so the first (1 + warmup) calls of EACH key are exact.
    out = cluster.run(tasks.keyed_calls, "diffusers", "micro", 48, 40, 2, size=2)[0]
    for key, step, err in out:
        if step <= 2:
            assert err < EXACT, (key, step, err)
        else:
            assert 0 < err < 1.0, (key, step, err)


@pytest.mark.parametrize("ranks", [2, 3])
def test_control_residuals_are_sliced_per_band(cluster, comfy_root, ranks):
    import torch

    g = torch.Generator().manual_seed(3)
    # ComfyUI's control dict: per-level residuals at full resolution (ControlNet/T2I outputs).
    control = {"input": [torch.randn(1, 32, 48, 40, generator=g), None, torch.randn(1, 64, 24, 20, generator=g)],
               "middle": [torch.randn(1, 64, 12, 10, generator=g)],
               "output": [torch.randn(1, 32, 48, 40, generator=g), torch.randn(1, 64, 12, 10, generator=g)]}
    r = cluster.run(tasks.call_errors, "comfy", "sd15", 1, 48, 40, 2, mode="full_sync", extra={"control": control},
                    comfy_path=str(comfy_root), size=ranks)[0]
    assert max(r["errors"]) < EXACT, r


@pytest.mark.parametrize("family, kind, height, width, ranks, extra, fragment", [
    ("diffusers", "micro", 49, 40, 2, {}, "latent height 49 is not a multiple of 2"),
    ("diffusers", "micro", 4, 40, 4, {}, "holds only 2 block(s) of 2 rows"),
    ("comfy", "sd15", 50, 40, 2, {}, "latent height 50 is not a multiple of 4"),
    ("diffusers", "micro", 48, 40, 2, "mask", "attention_mask cannot be split"),
    ("comfy", "sd15", 48, 40, 2, "patch", "patches.attn1_patch"),
    ("comfy", "flux", 48, 32, 2, "reference", "reference latents (Flux Kontext"),
    ("comfy", "flux", 48, 32, 2, "patch", "patches.attn1_patch"),
    ("comfy", "flux", 47, 32, 2, {}, "latent height 47 is not a multiple of 2"),
])
def test_bad_inputs_are_refused_on_every_rank_and_the_cluster_survives(cluster, comfy_arg, family, kind, height,
                                                                        width, ranks, extra, fragment):
    import torch

    if extra == "mask":
        extra = {"attention_mask": torch.ones(1, 7)}
    elif extra == "patch":
        extra = {"transformer_options": {"patches": {"attn1_patch": [tasks.identity_attn1_patch]}}}
    elif extra == "reference":
        extra = {"ref_latents": [torch.randn(1, 16, height, width)]}
    results = cluster.run(tasks.expect_error, family, kind, 1, height, width, extra, size=ranks, **comfy_arg)
    for r in results:
        assert r is not None and fragment in r[1], results
    # the ranks are still in step: an exact run works right after
    r = cluster.run(tasks.call_errors, "diffusers", "micro", 1, 48, 40, 1, mode="full_sync", size=ranks)[0]
    assert max(r["errors"]) < EXACT


@pytest.mark.parametrize("ranks", [2, 3])
def test_flux_controlnet_residuals_are_cut_to_the_band_tokens(cluster, comfy_root, ranks):
    import torch

    g = torch.Generator().manual_seed(3)
    tokens = (48 // 2) * (32 // 2)  # 2x2 patches of a 48x32 latent
    control = {"input": [torch.randn(1, tokens, 64, generator=g), None],
               "output": [torch.randn(1, tokens, 64, generator=g)]}
    r = cluster.run(tasks.call_errors, "comfy", "flux", 1, 48, 32, 2, mode="full_sync", extra={"control": control},
                    comfy_path=str(comfy_root), size=ranks)[0]
    assert max(r["errors"]) < EXACT, r


def test_unsupported_model_is_refused_and_left_untouched():
    import torch
    from torch import nn

    from distri_core import PatchParallelConfig
    from distri_core.layers.base import LayerHost
    from distri_core.runtime.engine import DistriUNet
    from distri_core.surgery.walk import UnsupportedModelError, install_layers

    with pytest.raises(UnsupportedModelError, match="not a supported UNet"):
        DistriUNet(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)), PatchParallelConfig())
    video = nn.Sequential(nn.GroupNorm(2, 4), nn.Conv3d(4, 4, 3, padding=1))
    with pytest.raises(UnsupportedModelError, match="Conv3d, which this package cannot split"):
        install_layers(video, LayerHost())
    assert all("forward" not in m.__dict__ for m in video.modules())
    reflect = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(UnsupportedModelError, match="padding_mode='reflect'"):
        install_layers(reflect, LayerHost())
    assert all("forward" not in m.__dict__ for m in reflect.modules())
    x = torch.randn(1, 4, 8, 8)
    assert reflect(x).shape == x.shape


@pytest.mark.parametrize("model", ["micro", "builtin-tiny"])
def test_the_hot_path_never_makes_the_host_wait(cluster, model):
    # On a GPU, an item(), a tensor built from Python data or a copy between devices stalls the
    # host until the device catches up; GroupNorm used to build one per layer per call. Counted
    # here as dispatched operators (the same ones on CPU), for sync and displaced steps.
    from distri_core.profile import profile_task

    modes = ["full_sync", "corrected_async_gn", "sync_gn", "stale_gn", "corrected_extrapolated"]
    r = cluster.run(profile_task, model, 16, modes, size=2)[0]
    assert r["plain"]["host_waits"] == {}, r["plain"]
    # The profiler's count (the one that also sees compiled calls) agrees with the dispatch counter
    # on eager calls, but for the launches of the stale buckets' all-gathers (a few per call), which
    # only the profiler sees.
    assert r["plain"]["dispatches"] == r["plain"]["ops"], r["plain"]
    displaced = r["corrected_async_gn"]["displaced"]
    assert displaced["ops"] <= displaced["dispatches"] <= displaced["ops"] + 8, displaced
    # Extrapolating costs a few operators per bucket (the factor, one lerp per block of rows), not
    # per exchange: its storages' views stay put, so the layers' memos hold (measured: +22, 1072
    # against 1050 on the bench's tiny).
    extrapolated = r["corrected_extrapolated"]["displaced"]["ops"]
    assert extrapolated <= displaced["ops"] * 1.05, (extrapolated, displaced)
    # A displaced GroupNorm fills the buffers it keeps per stale key (16 operators where channels
    # outnumber groups, 15 where not; 13 and 12 for stale_gn), not separate tensors (29): a stale
    # state whose views it could not see as one [P, n] view would fall back to those, silently.
    for mode, most in (("corrected_async_gn", 16), ("stale_gn", 13), ("corrected_extrapolated", 16)):
        per_layer = r[mode]["displaced"]["ops_per_layer"]
        assert 0 < per_layer["DistriGroupNorm"] <= most, (mode, per_layer)
    # A synchronous GroupNorm fills its own buffers too (on builtin tiny 40 operators where it
    # carries the conv's halo, 27 where not; 47 and 29 where its statistics are kept as stale
    # state), where separate tensors took 72 and 37: the synchronous steps of every mode, sync_gn's
    # displaced steps.
    for mode in modes:
        for kind, step in r[mode].items():
            if kind == "sync" or mode == "sync_gn":
                assert 0 < step["ops_per_layer"]["DistriGroupNorm"] <= 45, (mode, kind, step["ops_per_layer"])
    for mode in modes:
        for kind, step in r[mode].items():
            assert step["host_waits"] == {}, (mode, kind, step)
            assert step.get("first_call_host_waits", {}) == {}, (mode, kind, step)
            assert step["ops"] > r["plain"]["ops"]  # the counter sees the engine's work


def test_displaced_steps_build_nothing_per_rank(cluster):
    # A displaced step reads the stale state through views made once per stale key and writes its
    # fresh tensors into its own slots in place: the operators it dispatches do not grow with the
    # ranks (they used to: every exchange built a view per rank per call, 3893 operators a step on
    # builtin-tiny against 1811 now). Rank 0 is an edge band at 2 and at 3 ranks alike.
    from distri_core.profile import profile_task

    modes = ["corrected_async_gn", "stale_gn"]
    two, three = (cluster.run(profile_task, "builtin-tiny", 48, modes, size=n)[0] for n in (2, 3))
    for mode in modes:
        assert two[mode]["displaced"]["ops"] == three[mode]["displaced"]["ops"], (mode, two[mode], three[mode])
        assert two[mode]["displaced"]["ops"] < two[mode]["sync"]["ops"], (mode, two[mode])


def test_compiled_displaced_steps_equal_eager_and_compile_once(cluster, comfy_root):
    """compile=torch_compile on ComfyUI's SD1.5 UNet class: TorchInductor (CPU here) compiles the
    displaced steps' band UNet between the layers' exchanges. Every call equals the eager engine's
    within float32 rounding; synchronous calls compile nothing; the first displaced call compiles
    (the second one graph more, see below), later ones never do: not for another stale key, not in
    the next sampling run (new stale buffers). Another input shape compiles once more (measured on
    the three-level model, 93 -> 175 graphs; the test uses two levels, see tasks.compiled_calls).
    ComfyUI's CPU attention sizes its chunks from the free memory, which changes at every call:
    compiled, it would recompile every call, so the engine runs it eagerly. (compile=cuda_graphs
    captures the same graphs on a GPU; refused on CPU.)"""
    rows, launched, plain = cluster.run(tasks.compiled_calls, "comfy", "sd15", 24, 16, comfy_path=str(comfy_root),
                                        size=2)[0]
    for key, i, err, scale, _ in rows:
        assert err <= 1e-4 * max(scale, 1.0), (key, i, err)
    graphs = [r[-1] for r in rows]
    a, b, a_again, next_run = graphs[:4], graphs[4:7], graphs[7:9], graphs[9:]
    # The synchronous first call runs eagerly; the first displaced call compiles. The second compiles
    # one more graph (measured 76 -> 77): the input convolution's own frame, which Dynamo first met
    # inside a model frame it gave up on at a graph break in a loop. Never again after that.
    assert a[0] == 0 and a[1] > 0 and a[2] - a[1] <= 2 and a[2] == a[3], a
    assert b == [a[3]] * 3 and a_again == [a[3]] * 2  # another key, then key "a" again: nothing new
    assert next_run == [a[3]] * 3  # the next sampling run reuses the graphs
    # The layers write their fresh tensors into their stale slots inside the compiled graphs (no
    # copy between graphs), and read the stale views in the graph: a compiled displaced call
    # launches about what the eager plain UNet does (measured 735 against 662 here, most of the
    # rest ComfyUI's CPU attention, which runs eagerly; tiny 1.02x, and 1.50x there when every
    # write was an eager copy), where an eager displaced call launches about 3x.
    assert launched["aten::copy_"] == 0, launched
    assert sum(launched.values()) <= 1.3 * sum(plain.values()), (launched, plain)


def test_cuda_graphs_are_refused_on_cpu():
    from distri_core import PatchParallelConfig

    with pytest.raises(ValueError, match="compile=cuda_graphs needs CUDA devices"):
        PatchParallelConfig(world_size=2, devices=("cpu", "cpu"), compile="cuda_graphs")
    with pytest.raises(ValueError, match="compile='fast' is not valid; use one of: off, torch_compile, cuda_graphs"):
        PatchParallelConfig(world_size=2, compile="fast")
