"""The shipped workflows (``workflows/*.json`` UI format, ``workflows/api/*.json`` API format), checked without ComfyUI.

Node definitions come from ``fixtures/oneforcing_object_info.json`` for this package's nodes (what ComfyUI renders of
their classes, see comfyui_node_info.py) and from ``fixtures/comfyui_core_object_info*.json`` for ComfyUI's core nodes
(recorded from a real server); test_nodes.py and test_comfyui_server.py re-check both against a real ComfyUI.
Each UI file is also a template of ComfyUI's Templates browser: its file name is the title, ``<name>.jpg`` beside it
the thumbnail; a Note node on the canvas says what it needs, and nodes do not overlap (test_comfyui_browser.py checks
the same in the real frontend).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_nodes import model_tree, roots  # noqa: F401 (fixtures)

from comfyui_node_info import recorded
from oneforcing.nodes.definitions import NODES
from oneforcing.nodes.folders import BUNDLED_DEMO, BUNDLED_DEMO_LORAS, MODEL_KINDS, NO_TINY_VAE, check_model_name

REPO = Path(__file__).resolve().parent.parent
UI_FILES = sorted((REPO / "workflows").glob("*.json"))
API_FILES = sorted((REPO / "workflows" / "api").glob("*.json"))
CORE_FILES = sorted((Path(__file__).parent / "fixtures").glob("comfyui_core_object_info*.json"))
CORE = {k: v for path in CORE_FILES for k, v in json.loads(path.read_text()).items()}
OURS = recorded()
NODE_CLASSES = {node.__name__: node for node in NODES}
MODEL_COMBOS = {("OneForcingModelLoader", "model_name"): "diffusion_models",
                ("OneForcingTextEncode", "text_encoder_name"): "text_encoders",
                ("OneForcingPromptSchedule", "text_encoder_name"): "text_encoders",
                ("OneForcingEncode", "vae_name"): "vae",
                ("OneForcingDecode", "vae_name"): "vae",
                ("OneForcingDecode", "tiny_vae"): "vae_approx",
                ("OneForcingLora", "lora_name"): "loras"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPES = {"Note", "MarkdownNote"}  # the frontend's own nodes: text on the canvas, never in an API prompt
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos; its size is the body below
T2V, I2V, LONG, NATIVE, LORA = ("One-Forcing text to video", "One-Forcing image to video",
                                "One-Forcing long video with a prompt switch",
                                "One-Forcing Wan2.1 1.3B text to video (downloads)",
                                "One-Forcing text to video with a LoRA")
DEMO_LORAS = REPO / "models" / BUNDLED_DEMO_LORAS
OUTPUT_NODES = {name for name, info in CORE.items() if isinstance(info, dict) and info.get("output_node")}


def node_info(node_type: str) -> dict:
    if node_type in OURS:
        return OURS[node_type]
    if node_type in CORE and isinstance(CORE[node_type], dict):
        return CORE[node_type]
    raise AssertionError(f"unknown node type {node_type!r} (neither this package's nor a recorded core node)")


def inputs_of(info: dict) -> list[tuple[str, list, bool]]:
    """(name, entry, required) in input order, hidden inputs excluded."""
    out = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            out.append((name, info["input"][section][name], section == "required"))
    return out


def is_widget(entry) -> bool:
    kind = entry[0]
    return isinstance(kind, (list, dict)) or kind in WIDGET_TYPES


def extra_ui_values(entry) -> int:
    """UI-only widget values after this widget: the seed's control_after_generate, an image combo's upload button."""
    options = entry[1] if len(entry) > 1 else {}
    return int(bool(options.get("control_after_generate"))) + int(bool(options.get("image_upload")))


def model_folder(node_type: str, name: str, entry) -> str | None:
    """The model folder a widget picks a file from (ours, or a core loader's recorded one), else None."""
    kind = entry[0]
    return kind.get("model_folder") if isinstance(kind, dict) else MODEL_COMBOS.get((node_type, name))


def widget_values(node: dict) -> list[tuple[str, list, object]]:
    """(name, object_info entry, value) of a UI node's widgets, its UI-only values (seed control, upload) skipped."""
    values = iter(node["widgets_values"])
    out = []
    for name, entry, _ in inputs_of(node_info(node["type"])):
        if is_widget(entry):
            out.append((name, entry, next(values)))
            for _ in range(extra_ui_values(entry)):
                next(values)
    return out


def value_problem(node_type: str, name: str, entry, value) -> str | None:
    """Why ``value`` is not acceptable for the widget ``entry``, or None."""
    kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
    if isinstance(kind, dict) and "input_folder" in kind:  # a file in ComfyUI's input/: any well-formed name there
        try:
            check_model_name("vae", value)
        except ValueError as err:
            return str(err).replace("vae model", "input file")
        return None
    folder = model_folder(node_type, name, entry)
    if folder is not None:  # a model file name: any well-formed name inside the folder
        try:
            check_model_name(folder if folder in MODEL_KINDS else "vae", value)
        except ValueError as err:
            return str(err)
        return None
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options["options"]
        return None if value in choices else f"{value!r} is not one of {choices}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
            return f"{value!r} is not a {kind}"
        if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
            return f"{value} outside [{options.get('min')}, {options.get('max')}]"
        return None
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    return f"unknown widget kind {kind!r}"


def check_ui(workflow: dict) -> list[str]:
    problems = []
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    if workflow["last_node_id"] < max(nodes) or workflow["last_link_id"] < max(links, default=0):
        problems.append("last_node_id / last_link_id smaller than the ids in use")
    for node in workflow["nodes"]:
        label = f"node {node['id']} ({node['type']})"
        if node["type"] in NOTE_TYPES:
            if node["inputs"] or node["outputs"] or [type(v) for v in node["widgets_values"]] != [str]:
                problems.append(f"{label}: a note holds one text and no sockets")
            continue
        info = node_info(node["type"])
        declared = inputs_of(info)
        sockets = [(n, e, r) for n, e, r in declared if not is_widget(e)]
        if [i["name"] for i in node["inputs"]] != [n for n, _, _ in sockets]:
            problems.append(f"{label}: sockets {[i['name'] for i in node['inputs']]} != {[n for n, _, _ in sockets]}")
        for slot, socket in enumerate(node["inputs"]):
            entry = next((e for n, e, _ in sockets if n == socket["name"]), None)
            if entry is not None and socket["type"] != entry[0]:
                problems.append(f"{label}: input {socket['name']} type {socket['type']} != {entry[0]}")
            required = next((r for n, _, r in sockets if n == socket["name"]), False)
            if socket["link"] is None:
                if required:
                    problems.append(f"{label}: required input {socket['name']} is not connected")
                continue
            link = links.get(socket["link"])
            if link is None or link[3] != node["id"] or link[4] != slot:
                problems.append(f"{label}: input {socket['name']} names link {socket['link']}, which does not end here")
        if [o["type"] for o in node["outputs"]] != info["output"]:
            problems.append(f"{label}: outputs {[o['type'] for o in node['outputs']]} != {info['output']}")
        for slot, output in enumerate(node["outputs"]):
            for link_id in output["links"] or []:
                link = links.get(link_id)
                if link is None or link[1] != node["id"] or link[2] != slot:
                    problems.append(f"{label}: output {slot} names link {link_id}, which does not start here")
        expected = []
        for name, entry, _ in declared:
            if is_widget(entry):
                expected.append((name, entry))
                if len(entry) > 1 and entry[1].get("control_after_generate"):
                    expected.append((name + ":control", ["COMBO", {"options": ["fixed", "increment", "decrement",
                                                                                "randomize"]}]))
                if len(entry) > 1 and entry[1].get("image_upload"):
                    expected.append((name + ":upload", ["COMBO", {"options": ["image"]}]))
        values = node["widgets_values"]
        if len(values) != len(expected):
            problems.append(f"{label}: {len(values)} widget values for widgets {[n for n, _ in expected]}")
            continue
        for (name, entry), value in zip(expected, values):
            problem = value_problem(node["type"], name, entry, value)
            if problem:
                problems.append(f"{label}: {name}: {problem}")
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id} joins missing nodes {src} -> {dst}")
            continue
        outputs, inputs = node_info(nodes[src]["type"])["output"], nodes[dst]["inputs"]
        if not (0 <= src_slot < len(outputs) and 0 <= dst_slot < len(inputs)):
            problems.append(f"link {link_id}: slot {src_slot} -> {dst_slot} does not exist on its nodes")
            continue
        out_type, in_type = outputs[src_slot], inputs[dst_slot]["type"]
        if not out_type == in_type == kind:
            problems.append(f"link {link_id}: {out_type} -> {in_type} labelled {kind}")
        if link_id not in (nodes[src]["outputs"][src_slot]["links"] or []) or nodes[dst]["inputs"][dst_slot]["link"] != link_id:
            problems.append(f"link {link_id} is not recorded on both of its nodes")
    return problems


def bounding_box(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) on the canvas, the title bar included (collapsed nodes: just the title)."""
    (x, y), (width, height) = node["pos"], node["size"]
    if node.get("flags", {}).get("collapsed"):
        height = 0
    return x, y - TITLE_HEIGHT, x + width, y + height


def overlaps(workflow: dict) -> list[str]:
    """Pairs of nodes whose boxes intersect (as drawn at any zoom: the canvas scales them alike)."""
    return overlapping([(f"{n['type']} {n['id']}", bounding_box(n)) for n in workflow["nodes"]])


def overlapping(boxes: list[tuple[str, tuple[float, float, float, float]]]) -> list[str]:
    """'a overlaps b' for every two intersecting (label, (left, top, right, bottom)) boxes."""
    found = []
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            if box_a[0] < box_b[2] and box_b[0] < box_a[2] and box_a[1] < box_b[3] and box_b[1] < box_a[3]:
                found.append(f"{a} overlaps {b}")
    return found


def declared_models(workflow: dict) -> list[dict]:
    """The downloads a workflow declares as ComfyUI's templates do: ``properties.models`` of its nodes, each
    {"name", "url", "directory"} (what the frontend's Missing Models dialog lists)."""
    return [model for node in workflow["nodes"] for model in node.get("properties", {}).get("models", [])]


def notes(workflow: dict) -> str:
    return "\n".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in NOTE_TYPES)


def check_api(prompt: dict) -> list[str]:
    problems = []
    if not any(node["class_type"] in OUTPUT_NODES for node in prompt.values()):
        problems.append("no output node: ComfyUI rejects the prompt (prompt_no_outputs)")
    for node_id, node in prompt.items():
        label = f"node {node_id} ({node['class_type']})"
        info = node_info(node["class_type"])
        declared = {name: (entry, required) for name, entry, required in inputs_of(info)}
        for name in node["inputs"]:
            if name not in declared:
                problems.append(f"{label}: unknown input {name!r}")
        for name, (entry, required) in declared.items():
            if name not in node["inputs"]:
                if required:
                    problems.append(f"{label}: required input {name!r} missing")
                continue
            value = node["inputs"][name]
            if is_widget(entry):
                problem = value_problem(node["class_type"], name, entry, value)
                if problem:
                    problems.append(f"{label}: {name}: {problem}")
                continue
            if not (isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt):
                problems.append(f"{label}: {name} must link [node id, slot] to an existing node, got {value!r}")
                continue
            source = node_info(prompt[str(value[0])]["class_type"])["output"]
            if not 0 <= value[1] < len(source) or source[value[1]] != entry[0]:
                problems.append(f"{label}: {name} expects {entry[0]}, linked to {value!r}")
    return problems


def test_workflows_come_in_both_formats():
    assert {p.name for p in UI_FILES} == {p.name for p in API_FILES}
    assert {f"{name}.json" for name in (T2V, I2V, LONG, NATIVE, LORA)} <= {p.name for p in UI_FILES}
    native = json.loads((REPO / f"workflows/api/{NATIVE}.json").read_text())
    assert {"CLIPLoader", "CLIPTextEncode", "VAELoader", "VAEDecode", "SaveVideo"} <= {
        n["class_type"] for n in native.values()}
    used = {n["class_type"] for path in API_FILES for n in json.loads(path.read_text()).values()}
    assert set(OURS) <= used  # every node of the package appears in some shipped workflow


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_is_consistent(path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    assert check_ui(workflow) == []


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_is_a_template_laid_out_without_overlaps(path):
    workflow = json.loads(path.read_text())
    assert overlaps(workflow) == []
    # the Templates browser shows the file name as the title and <name>.jpg as the thumbnail
    assert path.stem.startswith("One-Forcing ") and path.with_suffix(".jpg").is_file()
    assert workflow["extra"]["title"] == path.stem
    assert path.with_suffix(".jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG
    text = notes(workflow)
    models = declared_models(workflow)
    if models:  # the canvas says it needs downloads, and which, and where from
        assert "(downloads)" in path.stem and text.startswith("NEEDS DOWNLOADS")
        for model in models:
            assert f"models/{model['directory']}/{model['name']}" in text and model["url"] in text
    else:
        assert "Runs as shipped: no download." in text


def test_overlap_check_counts_the_title_bar():
    workflow = json.loads((REPO / f"workflows/{T2V}.json").read_text())
    decode, create = (next(n for n in workflow["nodes"] if n["type"] == t) for t in ("OneForcingDecode", "CreateVideo"))
    create["pos"] = [decode["pos"][0], decode["pos"][1] + decode["size"][1] + TITLE_HEIGHT - 1]  # its title on it
    assert overlaps(workflow) == [f"OneForcingDecode {decode['id']} overlaps CreateVideo {create['id']}"]
    create["pos"][1] += 1
    assert overlaps(workflow) == []


def test_every_model_a_workflow_needs_is_bundled_or_declared_with_its_download():
    """What a fresh install has: the bundled demo and its LoRAs (see the next test), ComfyUI's input/ (plus the files
    workflows/input/ puts there). Every other file a workflow names must be declared on its node, so the Missing
    Models dialog lists it."""
    for path in UI_FILES:
        workflow = json.loads(path.read_text())
        declared = {(m["directory"], m["name"]) for m in declared_models(workflow)}
        for model in declared_models(workflow):
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
        for node in workflow["nodes"]:
            if node["type"] in NOTE_TYPES:
                continue
            for name, entry, value in widget_values(node):
                folder = model_folder(node["type"], name, entry)
                if isinstance(entry[0], dict) and "input_folder" in entry[0]:
                    assert (REPO / "workflows" / "input" / value).is_file(), (path.name, value)
                elif folder is not None and value not in (BUNDLED_DEMO, NO_TINY_VAE) and folder != "loras":
                    assert (folder, value) in declared, f"{path.name}: {node['type']}.{name} = {value!r} undeclared"


def test_the_lora_workflow_names_the_bundled_demo_lora():
    prompt = json.loads((REPO / f"workflows/api/{LORA}.json").read_text())
    names = {n["inputs"]["lora_name"] for path in API_FILES for n in json.loads(path.read_text()).values()
             if n["class_type"] == "OneForcingLora"}
    assert names == {_by_type(prompt, "OneForcingLora")["lora_name"]}  # the only LoRA the workflows name
    if not DEMO_LORAS.is_dir():
        pytest.skip("the demo LoRA is not shipped yet (README, LoRA)")
    assert (DEMO_LORAS / names.pop()).is_file()


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow_is_valid_and_matches_the_ui_file(path):
    prompt = json.loads(path.read_text())
    assert check_api(prompt) == []
    ui = json.loads((REPO / "workflows" / path.name).read_text())
    graph = [n for n in ui["nodes"] if n["type"] not in NOTE_TYPES]
    assert {str(n["id"]): n["type"] for n in graph} == {k: v["class_type"] for k, v in prompt.items()}
    for node in graph:
        api_inputs = prompt[str(node["id"])]["inputs"]
        widgets = [n for n, e, _ in inputs_of(node_info(node["type"])) if is_widget(e) and n in api_inputs]
        values = {name: value for name, _, value in widget_values(node)}
        assert values == {n: api_inputs[n] for n in widgets}, node["type"]
        for socket in node["inputs"]:
            if socket["link"] is not None:
                link = next(l for l in ui["links"] if l[0] == socket["link"])
                assert api_inputs[socket["name"]] == [str(link[1]), link[2]]


def test_the_checks_catch_broken_workflows():
    prompt = json.loads((REPO / f"workflows/api/{T2V}.json").read_text())
    rollout = next(n for n in prompt.values() if n["class_type"] == "OneForcingRollout")
    rollout["inputs"].update(width=-16, typo=1, timesteps="ten steps")
    rollout["inputs"]["model"] = ["99", 0]
    problems = "\n".join(check_api(prompt))
    for expected in ("width: -16 outside", "unknown input 'typo'", "'ten steps' is not one of", "model must link"):
        assert expected in problems
    loader = next(n for n in prompt.values() if n["class_type"] == "OneForcingModelLoader")
    loader["inputs"]["model_name"] = "../../x"
    assert "'..' is not allowed" in "\n".join(check_api(prompt))
    ui = json.loads((REPO / f"workflows/{T2V}.json").read_text())
    ui["links"][0][4] = 5
    next(n for n in ui["nodes"] if n["type"] == "OneForcingModelLoader")["widgets_values"].pop()
    next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"] = []
    problems = "\n".join(check_ui(ui))
    for expected in ("widget values for widgets", "does not exist on its nodes", "a note holds one text"):
        assert expected in problems
    i2v = json.loads((REPO / f"workflows/api/{I2V}.json").read_text())
    next(n for n in i2v.values() if n["class_type"] == "LoadImage")["inputs"]["image"] = "../secret.png"
    assert "input file '../secret.png': '..' is not allowed" in "\n".join(check_api(i2v))
    i2v_ui = json.loads((REPO / f"workflows/{I2V}.json").read_text())
    next(n for n in i2v_ui["nodes"] if n["type"] == "LoadImage")["widgets_values"] = ["example.png"]  # no upload value
    assert "1 widget values for widgets ['image', 'image:upload']" in "\n".join(check_ui(i2v_ui))


def run_prompt(prompt: dict, overrides: dict | None = None, core_outputs: dict | None = None) -> dict:
    """Execute an API prompt through this package's node functions (ComfyUI's own nodes are not available here:
    their outputs are taken from ``core_outputs`` {class_type: outputs tuple}, else their inputs are returned
    instead). Returns {node id: outputs tuple}."""
    results, pending = {}, dict(prompt)
    while pending:
        ready = [k for k, n in pending.items()
                 if all(not isinstance(v, list) or str(v[0]) in results for v in n["inputs"].values())]
        assert ready, f"cycle or dangling link among {sorted(pending)}"
        for key in ready:
            node = pending.pop(key)
            kwargs = {name: results[str(v[0])][v[1]] if isinstance(v, list) else v
                      for name, v in node["inputs"].items()}
            kwargs.update((overrides or {}).get(node["class_type"], {}))
            if node["class_type"] in OURS:
                results[key] = NODE_CLASSES[node["class_type"]].execute(**kwargs)
            elif node["class_type"] in (core_outputs or {}):
                results[key] = core_outputs[node["class_type"]]
            else:
                results[key] = ("not run", kwargs)
    return results


def test_api_workflow_runs_through_the_nodes_with_tiny_models(roots):
    prompt = json.loads((REPO / f"workflows/api/{T2V}.json").read_text())
    rollout = next(n for n in prompt.values() if n["class_type"] == "OneForcingRollout")["inputs"]
    assert (rollout["width"], rollout["height"], rollout["length"]) == (0, 0, 81)  # size 0: the model's own
    small = {"OneForcingRollout": {"length": 9}}  # same graph; the tiny stand-in demo records 32 x 16
    results = run_prompt(prompt, small)
    by_type = {prompt[k]["class_type"]: v for k, v in results.items()}
    latent = by_type["OneForcingRollout"][0]["samples"]
    assert latent.shape == (1, 16, 3, 2, 4)
    images = by_type["OneForcingDecode"][0]
    assert images.shape == (9, 16, 32, 3) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1
    # the frames reach the video node unchanged
    assert by_type["CreateVideo"][1]["images"] is images


def _by_type(prompt: dict, class_type: str) -> dict:
    return next(n for n in prompt.values() if n["class_type"] == class_type)["inputs"]


def test_long_video_workflow_runs_past_the_trained_length_with_a_schedule(roots):
    prompt = json.loads((REPO / f"workflows/api/{LONG}.json").read_text())
    rollout = _by_type(prompt, "OneForcingRollout")
    # the demo model is trained on 81 frames = 21 latent frames: the window + sink hold that many, the video is longer
    assert (rollout["width"], rollout["height"], rollout["length"]) == (0, 0, 161)
    assert rollout["window_frames"] + rollout["sink_frames"] == 21 and rollout["length"] > 81
    from oneforcing.nodes.sampling import parse_schedule_text

    schedule = parse_schedule_text(_by_type(prompt, "OneForcingPromptSchedule")["schedule"])
    assert [r.start for r in schedule.ranges] == [0, 80]
    results = run_prompt(prompt, {"OneForcingRollout": {"width": 16, "height": 16}})  # shipped length, tiny frames
    by_type = {prompt[k]["class_type"]: v for k, v in results.items()}
    assert by_type["OneForcingRollout"][0]["samples"].shape == (1, 16, 41, 2, 2)
    images = by_type["OneForcingDecode"][0]
    assert images.shape == (161, 16, 16, 3) and torch.isfinite(images).all()
    assert by_type["CreateVideo"][1]["images"] is images


def test_long_video_workflow_with_a_bad_schedule_fails_clearly(roots):
    prompt = json.loads((REPO / f"workflows/api/{LONG}.json").read_text())
    _by_type(prompt, "OneForcingPromptSchedule")["schedule"] = "0: a cat\n200: a corgi"
    with pytest.raises(ValueError, match=r"prompt switch at frame 200 .'a corgi'. is past the end of the video"):
        run_prompt(prompt, {"OneForcingRollout": {"width": 16, "height": 16}})


def test_image_to_video_workflow_runs_and_starts_from_the_image(roots):
    prompt = json.loads((REPO / f"workflows/api/{I2V}.json").read_text())
    # a frame of the demo model's world, shipped in workflows/input/ and copied into ComfyUI's input/ on load
    name = _by_type(prompt, "LoadImage")["image"]
    assert name == "oneforcing_demo_start.png"
    encode = _by_type(prompt, "OneForcingEncode")
    rollout = _by_type(prompt, "OneForcingRollout")
    assert (encode["width"], encode["height"]) == (128, 128) and (rollout["width"], rollout["height"]) == (0, 0)
    import cv2

    pixels = cv2.imread(str(REPO / "workflows" / "input" / name))[None, :, :, ::-1].copy()
    assert pixels.shape == (1, 128, 128, 3)  # the demo model's frame size
    image = torch.from_numpy(pixels).float() / 255  # what LoadImage hands on
    results = run_prompt(prompt, {"OneForcingEncode": {"width": 16, "height": 16},
                                  "OneForcingRollout": {"length": 9}},
                         core_outputs={"LoadImage": (image, torch.zeros(1, 128, 128))})
    by_type = {prompt[k]["class_type"]: v for k, v in results.items()}
    context = by_type["OneForcingEncode"][0]["samples"]
    latent = by_type["OneForcingRollout"][0]["samples"]
    assert context.shape == (1, 16, 1, 2, 2) and latent.shape == (1, 16, 3, 2, 2)
    torch.testing.assert_close(latent[:, :, :1], context, atol=1e-5, rtol=1e-5)  # the video starts with the image
    assert by_type["OneForcingDecode"][0].shape == (9, 16, 16, 3)


def test_lora_workflow_runs_through_the_nodes_and_strength_0_gives_the_plain_video(roots):
    prompt = json.loads((REPO / f"workflows/api/{LORA}.json").read_text())
    lora_id = next(k for k, n in prompt.items() if n["class_type"] == "OneForcingLora")
    assert _by_type(prompt, "OneForcingRollout")["model"] == [lora_id, 0]
    assert prompt[lora_id]["inputs"]["strength"] == 1.0

    def latents(graph: dict, **lora) -> torch.Tensor:
        results = run_prompt(graph, {"OneForcingRollout": {"length": 9},
                                     "OneForcingLora": {"lora_name": "tiny_style.safetensors", **lora}})
        by_type = {graph[k]["class_type"]: v for k, v in results.items()}
        assert by_type["OneForcingDecode"][0].shape == (9, 16, 32, 3)
        return by_type["OneForcingRollout"][0]["samples"]

    bypassed = {k: v for k, v in json.loads(json.dumps(prompt)).items() if k != lora_id}
    _by_type(bypassed, "OneForcingRollout")["model"] = prompt[lora_id]["inputs"]["model"]
    plain = latents(bypassed)
    assert torch.equal(latents(prompt, strength=0.0), plain)
    assert not torch.allclose(latents(prompt), plain, atol=1e-3)
