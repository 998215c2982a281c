"""The config, band plans and layouts: validation that names the value and the fix."""

from __future__ import annotations

import pytest

from distri_core import CommDtype, Mode, PatchParallelConfig, make_layout, plan_bands


def test_defaults_are_distrifusion():
    c = PatchParallelConfig(world_size=4)
    assert c.mode is Mode.CORRECTED_ASYNC_GN and c.warmup_steps == 4 and c.comm_dtype is CommDtype.AUTO
    assert c.split_cfg_possible


def test_strings_coerce_to_enums_and_config_is_hashable():
    c = PatchParallelConfig(world_size=2, mode="full_sync", comm_dtype="auto")
    assert c.mode is Mode.FULL_SYNC
    assert hash(c) == hash(PatchParallelConfig(world_size=2, mode=Mode.FULL_SYNC))
    with pytest.raises(AttributeError):
        c.world_size = 3  # frozen


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(world_size=0), "world_size=0"),
    (dict(world_size=2.0), "world_size=2.0"),
    (dict(world_size=True), "world_size=True"),
    (dict(mode="fast"), "mode='fast' is not valid; use one of: auto, full_sync"),
    (dict(warmup_steps=-1), "warmup_steps=-1"),
    (dict(comm_dtype="int8"), "comm_dtype='int8'"),
    (dict(world_size=3, cfg_split=True), "cfg_split=True needs an even number of ranks"),
    (dict(world_size=2, mode="full_sync", comm_dtype="fp16"), "use comm_dtype='auto'"),
    (dict(world_size=2, devices=("cuda:0",)), "give one device per rank"),
    (dict(world_size=2, devices=("cuda:0", "cuda:0")), "cuda:0 is listed more than once"),
    (dict(world_size=1, devices=("gpu7",)), "'gpu7' is not a torch device name"),
    (dict(cfg_split="yes"), "cfg_split='yes'"),
])
def test_invalid_configs_name_value_and_fix(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        PatchParallelConfig(**kwargs)
    assert fragment in str(e.value)


def test_devices_accept_a_comma_list_and_cpu_repeats():
    c = PatchParallelConfig(world_size=3, devices="cpu, cpu,cpu")
    assert c.devices == ("cpu", "cpu", "cpu")


def test_odd_world_with_auto_split_runs_unsplit():
    assert not PatchParallelConfig(world_size=3).split_cfg_possible
    assert not PatchParallelConfig(world_size=4, cfg_split=False).split_cfg_possible


def test_warmup_schedule_per_mode():
    c = PatchParallelConfig(world_size=2, warmup_steps=2)
    assert [c.is_sync_call(i) for i in range(5)] == [True, True, True, False, False]
    assert all(PatchParallelConfig(world_size=2, mode="full_sync").is_sync_call(i) for i in range(5))
    assert not any(PatchParallelConfig(world_size=2, mode="naive_patch").is_sync_call(i) for i in range(5))


def test_bands_even_uneven_and_aligned():
    assert plan_bands(256, 2, 8).heights == (128, 128)
    p = plan_bands(256, 3, 8)
    assert p.heights == (88, 88, 80) and p.total == 256 and all(h % 8 == 0 for h in p.heights)
    assert p.rows(1) == (88, 176)
    assert plan_bands(96, 8, 8).heights == (16, 16, 16, 16, 8, 8, 8, 8)  # SD2 768^2 on 8 ranks
    assert plan_bands(64, 5, 1).heights == (13, 13, 13, 13, 12)
    # sized by shares (relative device speeds), every band at least one block
    assert plan_bands(48, 2, 4, shares=(3.0, 1.0)).heights == (36, 12)
    assert plan_bands(32, 4, 8, shares=(100.0, 1.0, 1.0, 1.0)).heights == (8, 8, 8, 8)
    assert plan_bands(64, 4, 8, shares=(10.0, 1.0, 1.0, 1.0)).heights == (40, 8, 8, 8)
    assert sum(plan_bands(256, 3, 8, shares=(1.0, 0.7, 0.45)).heights) == 256


def test_band_errors_say_what_to_do():
    with pytest.raises(ValueError, match=r"latent height 125 is not a multiple of 8: .*\(64 pixels with an 8x VAE\)"):
        plan_bands(125, 2, 8)
    with pytest.raises(ValueError) as e:
        plan_bands(32, 8, 8)
    assert "only 4 block(s) of 8 rows" in str(e.value) and "use at most 4 ranks" in str(e.value)


def test_scaled_sizes_follow_band_ratio():
    p = plan_bands(48, 3, 4)  # 16 rows each
    assert p.scaled(2, 8, 0) == 8
    p = plan_bands(40, 3, 2)  # 14, 14, 12
    assert p.heights == (14, 14, 12)
    assert p.scaled(2, 7, 0) == 6


def test_cfg_split_layout():
    lay = make_layout(4, 2, 64, 8, split_batch=True)
    assert lay.groups == ((0, 1), (2, 3)) and lay.chunks == ((0, 1), (1, 2))
    assert lay.locate(3) == (1, 1)
    # odd batch, or split off: every rank shares the whole batch
    assert make_layout(4, 1, 64, 8, split_batch=True).groups == ((0, 1, 2, 3),)
    assert make_layout(4, 2, 64, 8, split_batch=False).chunks == ((0, 2),)
