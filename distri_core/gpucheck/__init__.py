"""The GPU acceptance check: `python -m distri_core.gpucheck --out docs/gpu/<name>.json`.

Runs on any machine with NVIDIA GPUs and no network, with torch 2.11 or newer and this package
(plus ComfyUI where one is found: $COMFYUI_PATH, ~/comfy/ComfyUI, or the ComfyUI this pack is
installed in). Without CUDA every GPU section is skipped with the reason. Sections:

- env:     GPUs, driver, CUDA, NCCL, torch;
- pool:    an NCCL pool over every visible GPU: rendezvous, communicators, one full UNet run
           (full_sync equals one device), a worker killed mid-run, the next run;
- shared:  two ranks on one GPU through gloo (a test-only layout) on an SDXL-shaped UNet in fp16
           and bf16: the multi-rank CUDA code on a one-GPU machine, full_sync against one device;
- timing:  SDXL fp16, batch 2, at 1024^2, 2048^2, 4096^2: one device on the whole latent against
           one rank's band at 2, 4, 8 bands (CUDA events): the compute-bound speedup ceiling,
           bytes per call, stale and peak memory, host syncs per call;
- comfy:   Distri Sampler with a ControlNet against KSampler on a random SDXL checkpoint, dynamic
           VRAM on and off: the same latent, and no UNet weights on ComfyUI's GPU.

It writes JSON (after every section, so a cut-short run keeps what it measured) and a markdown
table beside it. `--quick` runs a subset in under 2 minutes on one H200.
"""
