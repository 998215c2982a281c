"""Random full-size checkpoints written with ComfyUI's own classes (no model hub here)."""

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
