"""The example workflows: UI format at the top of workflows/ (with thumbnails), API-format twins in
workflows/api/, both generated from one declaration and checked against ComfyUI's own node
definitions."""

from __future__ import annotations

import json

import pytest
from workflow_runs import WORKFLOWS, generator, names

VIRTUAL = {"Note", "MarkdownNote"}  # frontend-only nodes: never sent to the backend


def test_every_workflow_has_a_thumbnail_and_an_api_twin():
    found = names()
    assert len(found) == 7
    for name in found:
        assert (WORKFLOWS / f"{name}.jpg").read_bytes()[:3] == b"\xff\xd8\xff", name  # a JPEG
        assert (WORKFLOWS / "api" / f"{name}.json").is_file(), name
        ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
        assert {"nodes", "links", "version"} <= set(ui), f"{name} is not UI format"


def test_committed_files_are_what_the_generator_writes():
    gen = generator()
    for make in gen.WORKFLOWS:
        wf = make()
        assert json.loads((WORKFLOWS / f"{wf.name}.json").read_text()) == wf.ui(), wf.name
        assert json.loads((WORKFLOWS / "api" / f"{wf.name}.json").read_text()) == wf.api(), wf.name


@pytest.mark.parametrize("name", names())
def test_workflows_open_cleanly_no_overlaps_and_a_note(name):
    # Rectangles as the frontend draws them: the title bar sits above `pos`.
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    boxes = [(n["title"], n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in ui["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
            assert not overlap, f"{name}: {a[0]} overlaps {b[0]}"
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and "Load Checkpoint" in notes[0]["widgets_values"][0]
    assert "Patch Parallel Config" in notes[0]["widgets_values"][0]


def ui_to_api(ui: dict, definitions: dict) -> dict:
    """The frontend's UI -> API conversion for these graphs, driven by ComfyUI's node definitions
    (widget values in input order, one extra value after seeds and after image upload combos)."""
    links = {lk[0]: lk for lk in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL:
            continue
        spec = definitions[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
                if name in linked:
                    lk = linked[name]
                    inputs[name] = [str(lk[1]), lk[2]]
                    continue
                is_widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                if not is_widget or not values:
                    continue
                inputs[name] = values.pop(0)
                if options.get("control_after_generate"):
                    values.pop(0)
                if options.get("image_upload"):
                    values.pop(0)
        assert not values, f"{node['type']}: widget values left over: {values}"
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                   "_meta": {"title": node.get("title") or node["type"]}}
    return prompt


def v3_nodes() -> list:
    """V3 node classes of the comfy_extras modules the workflows use, and the pack's."""
    from comfy_api.latest import io
    from comfy_extras import nodes_custom_sampler, nodes_flux, nodes_sd3
    from distri_patch_parallel_pack.nodes import NODES

    found = [c for m in (nodes_custom_sampler, nodes_flux, nodes_sd3) for c in vars(m).values()
             if isinstance(c, type) and issubclass(c, io.ComfyNode) and c is not io.ComfyNode]
    return found + list(NODES)


@pytest.fixture(scope="module")
def definitions(comfy_root):
    import comfy_host

    comfy_host.load_pack(str(comfy_root))
    import nodes as comfy_nodes

    defs = {name: cls.INPUT_TYPES() for name, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items()}
    for node in v3_nodes():
        try:
            defs[node.define_schema().node_id] = node.INPUT_TYPES()
        except NotImplementedError:
            continue
    return defs


def test_default_titles_are_comfyuis_display_names(definitions):
    import nodes as comfy_nodes

    gen = generator()
    display = dict(comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for node in v3_nodes():
        try:
            schema = node.define_schema()
        except NotImplementedError:
            continue
        display[schema.node_id] = schema.display_name
    for type_, title in gen.TITLES.items():
        assert title == (display.get(type_) or type_), (type_, title, display.get(type_))


@pytest.mark.parametrize("name", names())
def test_ui_and_api_twins_agree_under_comfyuis_node_definitions(definitions, name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    missing = {n["type"] for n in ui["nodes"]} - set(definitions) - VIRTUAL
    assert not missing, f"node types unknown to ComfyUI: {missing}"
    assert ui_to_api(ui, definitions) == api
    for node_id, node in api.items():  # combo values are valid choices
        spec = definitions[node["class_type"]]
        for name_, value in node["inputs"].items():
            entry = spec.get("required", {}).get(name_) or spec.get("optional", {}).get(name_)
            assert entry is not None, (node_id, name_)
            choices = entry[0] if isinstance(entry[0], list) else (entry[1] or {}).get("options") \
                if entry[0] == "COMBO" and len(entry) > 1 else None
            if choices and name_ not in ("ckpt_name", "lora_name", "control_net_name", "image", "unet_name", "vae_name",
                                         "clip_name1", "clip_name2"):  # the user's own files
                assert value in choices, (node_id, name_, value)
