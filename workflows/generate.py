"""Writes the example workflows: UI format (drag into ComfyUI, listed in its template browser) at
the top of workflows/, their API-format twins in workflows/api/, and a .jpg thumbnail for each.

    python workflows/generate.py

Each workflow is declared once below; both formats come from that declaration, and
tests/test_workflows.py checks them against ComfyUI's own node definitions (and, in the browser
test, against the frontend's own UI-to-API conversion).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTROL = "control_after_generate"  # the extra widget ComfyUI adds after a seed
UPLOAD = "upload"  # LoadImage's upload button widget
NOTE = "Note"  # the frontend's own sticky note (a virtual node: never in the API format)
WIDTH, COLUMN, GAP, TITLE_BAR = 320, 360, 40, 30  # node width, column pitch, gap, title bar height
TALL = {"CLIPTextEncode": 200, NOTE: 180}  # nodes whose widgets are taller than one line each

# Node types used by the workflows: link inputs (name, type), widgets in ComfyUI's order, outputs.
NODE_TYPES: dict[str, dict] = {
    "CheckpointLoaderSimple": dict(inputs=[], widgets=["ckpt_name"],
                                   outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": dict(inputs=[("clip", "CLIP")], widgets=["text"], outputs=[("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": dict(inputs=[], widgets=["width", "height", "batch_size"], outputs=[("LATENT", "LATENT")]),
    "KSampler": dict(inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                             ("latent_image", "LATENT")],
                     widgets=["seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                     outputs=[("LATENT", "LATENT")]),
    "DistriPatchParallelConfig": dict(inputs=[], widgets=["devices", "ranks", "mode", "warmup_steps", "cfg_split",
                                                          "comm_dtype", "unsupported", "compile"],
                                      outputs=[("config", "PATCH_PARALLEL_CONFIG")]),
    "DistriSampler": dict(inputs=[("model", "MODEL"), ("config", "PATCH_PARALLEL_CONFIG"),
                                  ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
                          widgets=["seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                          outputs=[("LATENT", "LATENT")]),
    "DistriModel": dict(inputs=[("model", "MODEL"), ("config", "PATCH_PARALLEL_CONFIG")], widgets=[],
                        outputs=[("MODEL", "MODEL")]),
    "VAEDecode": dict(inputs=[("samples", "LATENT"), ("vae", "VAE")], widgets=[], outputs=[("IMAGE", "IMAGE")]),
    "VAEEncode": dict(inputs=[("pixels", "IMAGE"), ("vae", "VAE")], widgets=[], outputs=[("LATENT", "LATENT")]),
    "SaveImage": dict(inputs=[("images", "IMAGE")], widgets=["filename_prefix"], outputs=[]),
    "LatentUpscaleBy": dict(inputs=[("samples", "LATENT")], widgets=["upscale_method", "scale_by"],
                            outputs=[("LATENT", "LATENT")]),
    "LoadImage": dict(inputs=[], widgets=["image", UPLOAD], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "ImageScaleBy": dict(inputs=[("image", "IMAGE")], widgets=["upscale_method", "scale_by"],
                         outputs=[("IMAGE", "IMAGE")]),
    "InpaintModelConditioning": dict(inputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                             ("vae", "VAE"), ("pixels", "IMAGE"), ("mask", "MASK")],
                                     widgets=["noise_mask"],
                                     outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                              ("latent", "LATENT")]),
    "LoraLoader": dict(inputs=[("model", "MODEL"), ("clip", "CLIP")],
                       widgets=["lora_name", "strength_model", "strength_clip"],
                       outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP")]),
    "ControlNetLoader": dict(inputs=[], widgets=["control_net_name"], outputs=[("CONTROL_NET", "CONTROL_NET")]),
    "ControlNetApplyAdvanced": dict(inputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                            ("control_net", "CONTROL_NET"), ("image", "IMAGE"), ("vae", "VAE")],
                                    widgets=["strength", "start_percent", "end_percent"],
                                    outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
    "CFGGuider": dict(inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                      widgets=["cfg"], outputs=[("GUIDER", "GUIDER")]),
    "KSamplerSelect": dict(inputs=[], widgets=["sampler_name"], outputs=[("SAMPLER", "SAMPLER")]),
    "BasicScheduler": dict(inputs=[("model", "MODEL")], widgets=["scheduler", "steps", "denoise"],
                           outputs=[("SIGMAS", "SIGMAS")]),
    "RandomNoise": dict(inputs=[], widgets=["noise_seed", CONTROL], outputs=[("NOISE", "NOISE")]),
    "UNETLoader": dict(inputs=[], widgets=["unet_name", "weight_dtype"], outputs=[("MODEL", "MODEL")]),
    "DualCLIPLoader": dict(inputs=[], widgets=["clip_name1", "clip_name2", "type", "device"],
                           outputs=[("CLIP", "CLIP")]),
    "VAELoader": dict(inputs=[], widgets=["vae_name"], outputs=[("VAE", "VAE")]),
    "EmptySD3LatentImage": dict(inputs=[], widgets=["width", "height", "batch_size"], outputs=[("LATENT", "LATENT")]),
    "FluxGuidance": dict(inputs=[("conditioning", "CONDITIONING")], widgets=["guidance"],
                         outputs=[("CONDITIONING", "CONDITIONING")]),
    "SamplerCustomAdvanced": dict(inputs=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                                          ("sigmas", "SIGMAS"), ("latent_image", "LATENT")], widgets=[],
                                  outputs=[("output", "LATENT"), ("denoised_output", "LATENT")]),
}

# ComfyUI's display names (a node's default title; the frontend writes it to the API format).
TITLES = {"CheckpointLoaderSimple": "Load Checkpoint", "CLIPTextEncode": "CLIP Text Encode (Prompt)",
          "EmptyLatentImage": "Empty Latent Image", "KSampler": "KSampler",
          "DistriPatchParallelConfig": "Patch Parallel Config", "DistriSampler": "Distri Sampler",
          "DistriModel": "Distri Model", "VAEDecode": "VAE Decode", "VAEEncode": "VAE Encode",
          "SaveImage": "Save Image", "LatentUpscaleBy": "Upscale Latent By", "LoadImage": "Load Image",
          "ImageScaleBy": "Upscale Image By", "InpaintModelConditioning": "InpaintModelConditioning",
          "LoraLoader": "Load LoRA (Model and CLIP)", "ControlNetLoader": "Load ControlNet Model",
          "ControlNetApplyAdvanced": "Apply ControlNet", "CFGGuider": "CFG Guider",
          "KSamplerSelect": "KSamplerSelect", "BasicScheduler": "BasicScheduler", "RandomNoise": "RandomNoise",
          "SamplerCustomAdvanced": "SamplerCustomAdvanced", "UNETLoader": "Load Diffusion Model",
          "DualCLIPLoader": "Load CLIP (Dual)", "VAELoader": "Load VAE", "EmptySD3LatentImage": "EmptySD3LatentImage",
          "FluxGuidance": "FluxGuidance"}


@dataclass
class Node:
    id: int
    type: str
    widgets: dict
    pos: tuple[int, int]
    title: str
    links_in: dict = field(default_factory=dict)  # input name -> (node id, output slot)


class Workflow:
    def __init__(self, name: str, title: str, description: str, output: str):
        self.name, self.title, self.description, self.output = name, title, description, output
        self.nodes: list[Node] = []
        self.note_text = ""

    def add(self, type_: str, pos: tuple[int, int], title: str | None = None, **widgets) -> Node:
        spec = NODE_TYPES[type_]
        wanted = [w for w in spec["widgets"] if w not in (CONTROL, UPLOAD)]
        if sorted(widgets) != sorted(wanted):
            raise ValueError(f"{type_}: widgets {sorted(widgets)} != {sorted(wanted)}")
        node = Node(len(self.nodes) + 1, type_, widgets, pos, title or TITLES[type_])
        self.nodes.append(node)
        return node

    @staticmethod
    def connect(src: Node, slot: int | str, dst: Node, input_name: str) -> None:
        outputs = NODE_TYPES[src.type]["outputs"]
        if isinstance(slot, str):
            slot = [o[0] for o in outputs].index(slot)
        dst.links_in[input_name] = (src.id, slot)

    # -- formats ---------------------------------------------------------------------------------
    def note(self, text: str) -> None:
        """A sticky note in the first column saying what to change before queueing (added last in
        the UI format, so the other nodes keep their ids; never in the API format)."""
        self.note_text = text

    def ui_nodes(self) -> list[Node]:
        if not self.note_text:
            return list(self.nodes)
        return [*self.nodes, Node(len(self.nodes) + 1, NOTE, {"text": self.note_text}, (40, -260), "What to change")]

    @staticmethod
    def size(n: Node) -> list[int]:
        widgets = len(NODE_TYPES[n.type]["widgets"]) if n.type in NODE_TYPES else 1
        return [WIDTH, TALL.get(n.type, 60 + 26 * (widgets + 2))]

    def layout(self) -> dict[int, list[int]]:
        """Positions with no overlap: x snapped to columns COLUMN apart (wider than a node), and in
        each column the nodes stacked in their declared order from their declared y, GAP apart."""
        placed: dict[int, list[int]] = {}
        columns: dict[int, list[Node]] = {}
        for n in self.ui_nodes():
            columns.setdefault(max(0, round((n.pos[0] - 40) / COLUMN)), []).append(n)
        for col, nodes in columns.items():
            bottom = None
            for n in sorted(nodes, key=lambda n: n.pos[1]):
                y = n.pos[1] if bottom is None else max(n.pos[1], bottom + GAP + TITLE_BAR)
                placed[n.id] = [40 + col * COLUMN, y]
                bottom = y + self.size(n)[1]
        return placed

    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            inputs = dict(n.widgets)
            for name, (src, slot) in n.links_in.items():
                inputs[name] = [str(src), slot]
            out[str(n.id)] = {"inputs": inputs, "class_type": n.type, "_meta": {"title": n.title}}
        return out

    def ui(self) -> dict:
        links, ui_nodes = [], []
        out_links: dict[tuple[int, int], list[int]] = {}
        for n in self.nodes:
            for name, (src, slot) in n.links_in.items():
                link_id = len(links) + 1
                spec = dict(NODE_TYPES[n.type]["inputs"])
                links.append([link_id, src, slot, n.id, [i[0] for i in NODE_TYPES[n.type]["inputs"]].index(name),
                              spec[name]])
                out_links.setdefault((src, slot), []).append(link_id)
        link_of = {(lk[3], lk[4]): lk[0] for lk in links}
        at = self.layout()
        for order, n in enumerate(self.ui_nodes()):
            if n.type == NOTE:
                ui_nodes.append({"id": n.id, "type": NOTE, "pos": at[n.id], "size": self.size(n), "flags": {},
                                 "order": order, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                                 "widgets_values": [n.widgets["text"]], "title": n.title, "color": "#432",
                                 "bgcolor": "#653"})
                continue
            spec = NODE_TYPES[n.type]
            values = []
            for w in spec["widgets"]:
                values.append("fixed" if w == CONTROL else "image" if w == UPLOAD else n.widgets[w])
            inputs = [{"name": name, "type": typ, "link": link_of.get((n.id, i))}
                      for i, (name, typ) in enumerate(spec["inputs"])]
            outputs = [{"name": name, "type": typ, "links": out_links.get((n.id, i), []), "slot_index": i}
                       for i, (name, typ) in enumerate(spec["outputs"])]
            node = {"id": n.id, "type": n.type, "pos": at[n.id], "size": self.size(n),
                    "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                    "properties": {"Node name for S&R": n.type}, "widgets_values": values, "title": n.title}
            ui_nodes.append(node)
        return {"last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
                "groups": [], "config": {}, "extra": {"distri": {"title": self.title, "description": self.description}},
                "version": 0.4}


def _prompts(wf: Workflow, clip: Node, positive: str, negative: str) -> tuple[Node, Node]:
    pos = wf.add("CLIPTextEncode", (420, 80), "Positive", text=positive)
    neg = wf.add("CLIPTextEncode", (420, 330), "Negative", text=negative)
    wf.connect(clip, "CLIP", pos, "clip")
    wf.connect(clip, "CLIP", neg, "clip")
    return pos, neg


def _note(wf: Workflow, checkpoint: str, size: str, extra: str = "") -> Node:
    return wf.note(f"Before you queue:\n- Load Checkpoint: pick your {checkpoint} model.\n- {size}\n"
                   "- Patch Parallel Config: devices 'auto' uses every GPU; list them ('cuda:0,cuda:1') or set "
                   "ranks to use fewer. Mode 'auto' picks the fastest faithful layout per run (the first run "
                   "measures this machine for a few seconds); full_sync gives exactly KSampler's image." + (f"\n- {extra}" if extra else ""))


def _config(wf: Workflow, pos=(420, 580), **overrides) -> Node:
    values = dict(devices="auto", ranks=0, mode="auto", warmup_steps=4, cfg_split="auto",
                  comm_dtype="auto", unsupported="error", compile="off")
    values.update(overrides)
    return wf.add("DistriPatchParallelConfig", pos, **values)


def _sampler(wf: Workflow, model, config, pos, neg, latent, at=(860, 200), **values) -> Node:
    s = wf.add("DistriSampler", at, **values)
    wf.connect(model[0], model[1], s, "model")
    wf.connect(config, "config", s, "config")
    wf.connect(pos[0], pos[1], s, "positive")
    wf.connect(neg[0], neg[1], s, "negative")
    wf.connect(latent[0], latent[1], s, "latent_image")
    return s


def _finish(wf: Workflow, latent_src: tuple[Node, int | str], vae: Node, prefix: str, x: int = 1280) -> None:
    dec = wf.add("VAEDecode", (x, 200))
    wf.connect(latent_src[0], latent_src[1], dec, "samples")
    wf.connect(vae, "VAE", dec, "vae")
    save = wf.add("SaveImage", (x + 260, 200), filename_prefix=prefix)
    wf.connect(dec, "IMAGE", save, "images")


SDXL = "sd_xl_base_1.0.safetensors"
SD15 = "v1-5-pruned-emaonly.safetensors"


def sdxl_txt2img() -> Workflow:
    wf = Workflow("sdxl_txt2img_2048", "SDXL txt2img at 2048x2048 on every GPU",
                  "Distri Sampler replaces KSampler; Patch Parallel Config uses every GPU.", "image, 2048x2048")
    _note(wf, "SDXL", "Empty Latent Image: the image size (SDXL: multiples of 32 px per GPU band).")
    ckpt = wf.add("CheckpointLoaderSimple", (40, 200), ckpt_name=SDXL)
    pos, neg = _prompts(wf, ckpt, "a lighthouse on a cliff at dawn, ultra detailed, 8k photograph",
                        "blurry, low quality, watermark")
    latent = wf.add("EmptyLatentImage", (40, 420), width=2048, height=2048, batch_size=1)
    s = _sampler(wf, (ckpt, "MODEL"), _config(wf), (pos, 0), (neg, 0), (latent, 0), seed=42, steps=30, cfg=5.0,
                 sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)
    _finish(wf, (s, 0), ckpt, "distri_sdxl_2048")
    return wf


def sd15_hires_fix() -> Workflow:
    wf = Workflow("sd15_hires_fix", "SD1.5 hires fix: 512 first pass, 2x second pass on every GPU",
                  "A normal KSampler first pass, an upscaled latent, and Distri Sampler for the large second pass.",
                  "image, 1024x1024")
    _note(wf, "SD1.5", "Empty Latent Image: the first pass size; Upscale Latent By: the factor of the second.")
    ckpt = wf.add("CheckpointLoaderSimple", (40, 200), ckpt_name=SD15)
    pos, neg = _prompts(wf, ckpt, "a cozy reading nook with a cat, warm light, detailed", "lowres, bad anatomy")
    latent = wf.add("EmptyLatentImage", (40, 420), width=512, height=512, batch_size=1)
    first = wf.add("KSampler", (860, 0), "First pass", seed=7, steps=20, cfg=7.0, sampler_name="euler_ancestral",
                   scheduler="normal", denoise=1.0)
    for name, (node, slot) in {"model": (ckpt, "MODEL"), "positive": (pos, 0), "negative": (neg, 0),
                               "latent_image": (latent, 0)}.items():
        wf.connect(node, slot, first, name)
    up = wf.add("LatentUpscaleBy", (860, 330), upscale_method="nearest-exact", scale_by=2.0)
    wf.connect(first, 0, up, "samples")
    s = _sampler(wf, (ckpt, "MODEL"), _config(wf), (pos, 0), (neg, 0), (up, 0), at=(1100, 200), seed=7, steps=20,
                 cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=0.5)
    _finish(wf, (s, 0), ckpt, "distri_hires_fix", x=1480)
    return wf


def img2img_upscale() -> Workflow:
    wf = Workflow("img2img_upscale", "Upscale an image 2x and refine it on every GPU",
                  "LoadImage, 2x image upscale, VAEEncode and a low-denoise Distri Sampler pass.",
                  "image, 2x the input")
    _note(wf, "SDXL", "Load Image: your picture; Upscale Image By: the factor.",
          "Distri Sampler's denoise: how much the pass may change (0.3-0.5 keeps the picture).")
    ckpt = wf.add("CheckpointLoaderSimple", (40, 200), ckpt_name=SDXL)
    pos, neg = _prompts(wf, ckpt, "a sharp, detailed photograph", "blurry, jpeg artifacts")
    image = wf.add("LoadImage", (40, 500), image="example.png")
    scaled = wf.add("ImageScaleBy", (420, 840), upscale_method="lanczos", scale_by=2.0)
    wf.connect(image, "IMAGE", scaled, "image")
    enc = wf.add("VAEEncode", (640, 840))
    wf.connect(scaled, "IMAGE", enc, "pixels")
    wf.connect(ckpt, "VAE", enc, "vae")
    s = _sampler(wf, (ckpt, "MODEL"), _config(wf), (pos, 0), (neg, 0), (enc, 0), seed=3, steps=25, cfg=5.0,
                 sampler_name="dpmpp_2m", scheduler="karras", denoise=0.45)
    _finish(wf, (s, 0), ckpt, "distri_upscale")
    return wf


def inpainting() -> Workflow:
    wf = Workflow("inpainting", "Inpaint with an SD1.5 inpainting model on every GPU",
                  "LoadImage with a painted mask, InpaintModelConditioning and Distri Sampler (9-channel UNet).",
                  "image, the input's size")
    _note(wf, "SD1.5 inpainting", "Load Image: your picture; paint the mask in its editor (right click).")
    ckpt = wf.add("CheckpointLoaderSimple", (40, 200), ckpt_name="sd-v1-5-inpainting.ckpt")
    pos, neg = _prompts(wf, ckpt, "a stone fountain in a garden", "blurry, distorted")
    image = wf.add("LoadImage", (40, 500), image="example.png")
    cond = wf.add("InpaintModelConditioning", (640, 600), noise_mask=True)
    for name, (node, slot) in {"positive": (pos, 0), "negative": (neg, 0), "vae": (ckpt, "VAE"),
                               "pixels": (image, "IMAGE"), "mask": (image, "MASK")}.items():
        wf.connect(node, slot, cond, name)
    s = _sampler(wf, (ckpt, "MODEL"), _config(wf, pos=(420, 900)), (cond, 0), (cond, 1), (cond, 2), seed=11,
                 steps=25, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    _finish(wf, (s, 0), ckpt, "distri_inpaint")
    return wf


def lora_controlnet() -> Workflow:
    wf = Workflow("lora_controlnet", "LoRA and ControlNet with Distri Sampler",
                  "A LoRA-patched SD1.5 model and a ControlNet; the workers get the patched weights and each GPU "
                  "its band of the ControlNet residuals.", "image, 1024x1024")
    _note(wf, "SD1.5", "Empty Latent Image: the image size.",
          "Load LoRA, Load ControlNet Model, Load Image: your LoRA, ControlNet and its hint image.")
    ckpt = wf.add("CheckpointLoaderSimple", (40, 200), ckpt_name=SD15)
    lora = wf.add("LoraLoader", (40, 400), lora_name="my_style_lora.safetensors", strength_model=0.8,
                  strength_clip=0.8)
    wf.connect(ckpt, "MODEL", lora, "model")
    wf.connect(ckpt, "CLIP", lora, "clip")
    pos, neg = _prompts(wf, lora, "a futuristic city street at night, neon", "lowres, blurry")
    cnet = wf.add("ControlNetLoader", (40, 650), control_net_name="control_v11p_sd15_canny.pth")
    hint = wf.add("LoadImage", (40, 800), image="example.png")
    apply = wf.add("ControlNetApplyAdvanced", (640, 600), strength=0.8, start_percent=0.0, end_percent=1.0)
    for name, (node, slot) in {"positive": (pos, 0), "negative": (neg, 0), "control_net": (cnet, 0),
                               "image": (hint, "IMAGE")}.items():
        wf.connect(node, slot, apply, name)
    latent = wf.add("EmptyLatentImage", (420, 900), width=1024, height=1024, batch_size=1)
    s = _sampler(wf, (lora, "MODEL"), _config(wf, pos=(640, 900)), (apply, 0), (apply, 1), (latent, 0), seed=5,
                 steps=25, cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)
    _finish(wf, (s, 0), ckpt, "distri_lora_controlnet")
    return wf


def distri_model_custom() -> Workflow:
    wf = Workflow("distri_model_sampler_custom", "Distri Model feeding SamplerCustomAdvanced",
                  "Distri Model patches the model; any sampler node (here SamplerCustomAdvanced) then runs its UNet "
                  "on every GPU.", "image, 2048x2048")
    _note(wf, "SDXL", "Empty Latent Image: the image size.",
          "Any sampler node works after Distri Model: swap SamplerCustomAdvanced for yours.")
    ckpt = wf.add("CheckpointLoaderSimple", (40, 200), ckpt_name=SDXL)
    pos, neg = _prompts(wf, ckpt, "an isometric diorama of a tiny island village", "blurry, low quality")
    dm = wf.add("DistriModel", (860, 0))
    wf.connect(ckpt, "MODEL", dm, "model")
    wf.connect(_config(wf), "config", dm, "config")
    guider = wf.add("CFGGuider", (860, 150), cfg=5.0)
    wf.connect(dm, "MODEL", guider, "model")
    wf.connect(pos, 0, guider, "positive")
    wf.connect(neg, 0, guider, "negative")
    sampler = wf.add("KSamplerSelect", (860, 330), sampler_name="dpmpp_2m")
    sigmas = wf.add("BasicScheduler", (860, 430), scheduler="karras", steps=30, denoise=1.0)
    wf.connect(dm, "MODEL", sigmas, "model")
    noise = wf.add("RandomNoise", (860, 600), noise_seed=21)
    latent = wf.add("EmptyLatentImage", (40, 420), width=2048, height=2048, batch_size=1)
    adv = wf.add("SamplerCustomAdvanced", (1100, 300))
    for name, (node, slot) in {"noise": (noise, 0), "guider": (guider, 0), "sampler": (sampler, 0),
                               "sigmas": (sigmas, 0), "latent_image": (latent, 0)}.items():
        wf.connect(node, slot, adv, name)
    _finish(wf, (adv, 0), ckpt, "distri_model_custom", x=1420)
    return wf


def flux_txt2img() -> Workflow:
    wf = Workflow("flux_dev_txt2img_2048", "Flux dev txt2img at 2048x2048 on every GPU",
                  "Flux.1 dev (cfg 1: CFG split has nothing to split) with its image tokens in row bands, one per "
                  "GPU, displaced like the UNets'.", "image, 2048x2048")
    _note(wf, "Flux.1 dev (Load Diffusion Model)", "EmptySD3LatentImage: the image size (multiples of 16 px per "
          "GPU band).", "DualCLIPLoader: clip_l and your t5xxl; Load VAE: Flux's ae.safetensors.")
    unet = wf.add("UNETLoader", (40, 80), unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = wf.add("DualCLIPLoader", (40, 260), clip_name1="clip_l.safetensors",
                  clip_name2="t5xxl_fp16.safetensors", type="flux", device="default")
    vae = wf.add("VAELoader", (40, 480), vae_name="ae.safetensors")
    pos, neg = _prompts(wf, clip, "a lighthouse on a cliff at dawn, ultra detailed, 8k photograph", "")
    guided = wf.add("FluxGuidance", (760, 0), guidance=3.5)
    wf.connect(pos, 0, guided, "conditioning")
    latent = wf.add("EmptySD3LatentImage", (40, 640), width=2048, height=2048, batch_size=1)
    s = _sampler(wf, (unet, "MODEL"), _config(wf), (guided, 0), (neg, 0), (latent, 0), at=(1100, 200), seed=42,
                 steps=28, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    _finish(wf, (s, 0), vae, "distri_flux_2048", x=1480)
    return wf


WORKFLOWS = [sdxl_txt2img, sd15_hires_fix, img2img_upscale, inpainting, lora_controlnet, distri_model_custom,
             flux_txt2img]


def thumbnail(wf: Workflow, path: Path) -> None:
    """A 256x256 card: the title, the image cut into four coloured row bands (one per GPU), and what
    the workflow outputs. A diagram, not a picture the workflow made (there are no weights here)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (256, 256), (24, 26, 33))
    draw = ImageDraw.Draw(img)
    colours = [(70, 130, 180), (60, 170, 113), (218, 165, 32), (205, 92, 92)]
    for i, c in enumerate(colours):
        draw.rectangle([48, 96 + i * 32, 208, 96 + (i + 1) * 32 - 3], fill=c)
        draw.text((52, 104 + i * 32), f"GPU {i}", fill=(255, 255, 255))
    words, line, lines = wf.title.split(), "", []
    for w in words:
        if len(line) + len(w) > 34:
            lines.append(line)
            line = ""
        line = f"{line} {w}".strip()
    lines.append(line)
    for i, text in enumerate(lines[:4]):
        draw.text((12, 14 + 16 * i), text, fill=(235, 235, 235))
    draw.text((12, 222), f"output: {wf.output}", fill=(200, 200, 210))
    draw.text((12, 238), "Distri Patch Parallel (a diagram, not its output)", fill=(150, 150, 160))
    img.save(path, "JPEG", quality=85)


def main() -> None:
    (HERE / "api").mkdir(exist_ok=True)
    for make in WORKFLOWS:
        wf = make()
        (HERE / f"{wf.name}.json").write_text(json.dumps(wf.ui(), indent=2) + "\n")
        (HERE / "api" / f"{wf.name}.json").write_text(json.dumps(wf.api(), indent=2) + "\n")
        thumbnail(wf, HERE / f"{wf.name}.jpg")


if __name__ == "__main__":
    main()
