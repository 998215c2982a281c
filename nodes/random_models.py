"""Random full-size ComfyUI models written with ComfyUI's own classes and saving code (there is no
model hub here): SD1.5 and SDXL checkpoints, their ControlNets, LoRAs. Used by the tests and by
the GPU acceptance check; loaded by file path (in ComfyUI's process the top-level `nodes` is
ComfyUI's nodes.py). Run it with ComfyUI importable."""

from __future__ import annotations

from pathlib import Path

import torch

SD15_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def write_sd15(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """An SD1.5-shaped checkpoint (UNet 860M, VAE, CLIP-L) with random weights, in the original
    single-file layout ComfyUI's CheckpointLoaderSimple detects (about 2.1 GB in fp16)."""
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from distri_core.zoo import randomize

    sd = {}
    config = comfy.supported_models.SD15(dict(SD15_UNET))
    config.set_inference_dtype(torch.float32, None)
    unet = config.get_model({}).diffusion_model
    randomize(unet, seed)
    sd.update({"model.diffusion_model." + k: v.to(dtype) for k, v in unet.state_dict().items()})
    del unet
    vae = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
    randomize(vae, seed + 1)
    sd.update({"first_stage_model." + k: v.to(dtype) for k, v in vae.state_dict().items()})
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    randomize(clip.transformer, seed + 2)
    sd.update({"cond_stage_model.transformer." + k: (v.to(dtype) if v.is_floating_point() else v)
               for k, v in clip.transformer.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path




def write_lora(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0, rank: int = 4) -> Path:
    """A kohya-format LoRA (lora_unet_*.lora_up/lora_down/alpha) for the given UNet weights."""
    import comfy.utils

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        key = "lora_unet_" + name.replace(".", "_")
        out_ch, in_ch = shape[0], shape[1]
        kernel = tuple(shape[2:])
        sd[key + ".lora_down.weight"] = (torch.randn(rank, in_ch, *kernel, generator=g) * 0.05).half()
        sd[key + ".lora_up.weight"] = (torch.randn(out_ch, rank, *([1] * len(kernel)), generator=g) * 0.05).half()
        sd[key + ".alpha"] = torch.tensor(float(rank)).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file(sd, str(path))
    return path


def write_sd15_lora(path: Path, seed: int = 0) -> Path:
    """A random LoRA on a few SD1.5 UNet layers (conv and linear)."""
    shapes = {"input_blocks.1.1.proj_in": (320, 320, 1, 1), "input_blocks.4.0.in_layers.2": (640, 320, 3, 3),
              "middle_block.1.transformer_blocks.0.attn1.to_q": (1280, 1280),
              "output_blocks.5.1.proj_out": (640, 640, 1, 1)}
    return write_lora(path, shapes, seed)


def write_sd15_controlnet(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """An SD1.5 ControlNet (control_model.* layout, hint 3 channels) with random weights."""
    return _write_controlnet(path, SD15_UNET, seed, dtype)


def _write_controlnet(path: Path, unet_config: dict, seed: int, dtype: torch.dtype) -> Path:
    import comfy.cldm.cldm
    import comfy.ops
    import comfy.utils

    from distri_core.zoo import randomize

    cfg = {k: v for k, v in unet_config.items() if k not in ("transformer_depth_output", "out_channels")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", **cfg)
    randomize(net, seed)
    sd = {"control_model." + k: v.to(dtype).contiguous() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file(sd, str(path))
    return path


SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False}


def write_sdxl(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """An SDXL-shaped checkpoint (UNet 2.6B, VAE, CLIP-L and CLIP-G) with random weights, laid out
    by ComfyUI's own saving code as CheckpointSave writes it (about 6.9 GB in fp16)."""
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from distri_core.zoo import randomize

    config = comfy.supported_models.SDXL(dict(SDXL_UNET))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    randomize(model.diffusion_model, seed)
    unet_sd = model.diffusion_model.state_dict()
    clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=dtype)
    randomize(clip, seed + 2)
    clip_sd = {k: v for k, v in clip.state_dict().items()}
    vae = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
    randomize(vae, seed + 1)
    vae_sd = {k: v.to(dtype) for k, v in vae.state_dict().items()}
    sd = model.state_dict_for_saving(unet_sd, clip_sd, vae_sd)  # adds model.diffusion_model. itself
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_sdxl_controlnet(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """An SDXL ControlNet (control_model.* layout, hint 3 channels) with random weights."""
    return _write_controlnet(path, SDXL_UNET, seed, dtype)


# The smallest Flux.1 ComfyUI's loader detects as Flux: its detection fixes 128-wide heads with
# rotary axes 16+56+56 and reads the widths from the weights. Text and pooled inputs are 768 wide,
# so an SD1.5 checkpoint's CLIP-L can condition it (there is no T5-XXL here).
FLUX_SMALL = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 768,
              "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
              "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
              "txt_ids_dims": []}


def write_flux_small(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """A diffusion-model-only Flux.1 file (UNETLoader's models/diffusion_models) with random weights."""
    import comfy.ops
    import comfy.utils
    from comfy.ldm.flux.model import Flux

    from distri_core.zoo import randomize

    model = Flux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu", **FLUX_SMALL)
    randomize(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
