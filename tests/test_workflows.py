"""The shipped workflows (``workflows/*.json`` UI format, ``workflows/api/*.json`` API format), checked without ComfyUI.

Node definitions come from this package's declarations and, for ComfyUI's core nodes, from
``fixtures/comfyui_core_object_info*.json`` (recorded from a real server; test_comfyui_server.py re-checks them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_nodes import model_tree, roots  # noqa: F401 (fixtures)

from oneforcing.nodes.definitions import NODE_SPECS
from oneforcing.nodes.spec import object_info
from oneforcing.nodes.folders import MODEL_KINDS, check_model_name

REPO = Path(__file__).resolve().parent.parent
UI_FILES = sorted((REPO / "workflows").glob("*.json"))
API_FILES = sorted((REPO / "workflows" / "api").glob("*.json"))
CORE_FILES = sorted((Path(__file__).parent / "fixtures").glob("comfyui_core_object_info*.json"))
CORE = {k: v for path in CORE_FILES for k, v in json.loads(path.read_text()).items()}
OURS = {spec.node_id: spec for spec in NODE_SPECS}
MODEL_COMBOS = {("OneForcingModelLoader", "model_name"): "diffusion_models",
                ("OneForcingTextEncode", "text_encoder_name"): "text_encoders",
                ("OneForcingPromptSchedule", "text_encoder_name"): "text_encoders",
                ("OneForcingEncode", "vae_name"): "vae",
                ("OneForcingDecode", "vae_name"): "vae",
                ("OneForcingDecode", "tiny_vae"): "vae_approx"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
OUTPUT_NODES = {name for name, info in CORE.items() if isinstance(info, dict) and info.get("output_node")}


def node_info(node_type: str) -> dict:
    if node_type in OURS:
        return object_info(OURS[node_type])
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


def value_problem(node_type: str, name: str, entry, value) -> str | None:
    """Why ``value`` is not acceptable for the widget ``entry``, or None."""
    kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
    if isinstance(kind, dict) and "input_folder" in kind:  # a file in ComfyUI's input/: any well-formed name there
        try:
            check_model_name("vae", value)
        except ValueError as err:
            return str(err).replace("vae model", "input file")
        return None
    folder = kind.get("model_folder") if isinstance(kind, dict) else MODEL_COMBOS.get((node_type, name))
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
    assert {"oneforcing_t2v.json", "oneforcing_t2v_native_wan.json", "oneforcing_long_video.json",
            "oneforcing_i2v.json"} <= {p.name for p in UI_FILES}
    native = json.loads((REPO / "workflows/api/oneforcing_t2v_native_wan.json").read_text())
    assert {"CLIPLoader", "CLIPTextEncode", "VAELoader", "VAEDecode", "SaveVideo"} <= {
        n["class_type"] for n in native.values()}
    used = {n["class_type"] for path in API_FILES for n in json.loads(path.read_text()).values()}
    assert set(OURS) <= used  # every node of the package appears in some shipped workflow


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_is_consistent(path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    assert check_ui(workflow) == []


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow_is_valid_and_matches_the_ui_file(path):
    prompt = json.loads(path.read_text())
    assert check_api(prompt) == []
    ui = json.loads((REPO / "workflows" / path.name).read_text())
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in prompt.items()}
    for node in ui["nodes"]:
        api_inputs = prompt[str(node["id"])]["inputs"]
        widgets = [n for n, e, _ in inputs_of(node_info(node["type"])) if is_widget(e) and n in api_inputs]
        seeds = iter(node["widgets_values"])
        values = []
        for name, entry, _ in inputs_of(node_info(node["type"])):
            if is_widget(entry):
                values.append((name, next(seeds)))
                for _ in range(extra_ui_values(entry)):
                    next(seeds)
        assert dict(values) == {n: api_inputs[n] for n in widgets}, node["type"]
        for socket in node["inputs"]:
            if socket["link"] is not None:
                link = next(l for l in ui["links"] if l[0] == socket["link"])
                assert api_inputs[socket["name"]] == [str(link[1]), link[2]]


def test_the_checks_catch_broken_workflows():
    prompt = json.loads((REPO / "workflows/api/oneforcing_t2v.json").read_text())
    rollout = next(n for n in prompt.values() if n["class_type"] == "OneForcingRollout")
    rollout["inputs"].update(width=8, typo=1, timesteps="ten steps")
    rollout["inputs"]["model"] = ["99", 0]
    problems = "\n".join(check_api(prompt))
    for expected in ("width: 8 outside", "unknown input 'typo'", "'ten steps' is not one of", "model must link"):
        assert expected in problems
    loader = next(n for n in prompt.values() if n["class_type"] == "OneForcingModelLoader")
    loader["inputs"]["model_name"] = "../../x"
    assert "'..' is not allowed" in "\n".join(check_api(prompt))
    ui = json.loads((REPO / "workflows/oneforcing_t2v.json").read_text())
    ui["links"][0][4] = 5
    ui["nodes"][0]["widgets_values"].pop()
    problems = "\n".join(check_ui(ui))
    assert "widget values for widgets" in problems and "does not exist on its nodes" in problems
    i2v = json.loads((REPO / "workflows/api/oneforcing_i2v.json").read_text())
    next(n for n in i2v.values() if n["class_type"] == "LoadImage")["inputs"]["image"] = "../secret.png"
    assert "input file '../secret.png': '..' is not allowed" in "\n".join(check_api(i2v))
    i2v_ui = json.loads((REPO / "workflows/oneforcing_i2v.json").read_text())
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
                results[key] = OURS[node["class_type"]].function(**kwargs)
            elif node["class_type"] in (core_outputs or {}):
                results[key] = core_outputs[node["class_type"]]
            else:
                results[key] = ("not run", kwargs)
    return results


def test_api_workflow_runs_through_the_nodes_with_tiny_models(roots):
    prompt = json.loads((REPO / "workflows/api/oneforcing_t2v.json").read_text())
    rollout = next(n for n in prompt.values() if n["class_type"] == "OneForcingRollout")["inputs"]
    assert (rollout["width"], rollout["height"], rollout["length"]) == (128, 128, 81)  # the demo model's size
    small = {"OneForcingRollout": {"width": 32, "height": 16, "length": 9}}  # same graph, CPU-sized video
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
    prompt = json.loads((REPO / "workflows/api/oneforcing_long_video.json").read_text())
    rollout = _by_type(prompt, "OneForcingRollout")
    # the demo model is trained on 81 frames = 21 latent frames: the window + sink hold that many, the video is longer
    assert (rollout["width"], rollout["height"], rollout["length"]) == (128, 128, 161)
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
    prompt = json.loads((REPO / "workflows/api/oneforcing_long_video.json").read_text())
    _by_type(prompt, "OneForcingPromptSchedule")["schedule"] = "0: a cat\n200: a corgi"
    with pytest.raises(ValueError, match=r"prompt switch at frame 200 .'a corgi'. is past the end of the video"):
        run_prompt(prompt, {"OneForcingRollout": {"width": 16, "height": 16}})


def test_image_to_video_workflow_runs_and_starts_from_the_image(roots):
    prompt = json.loads((REPO / "workflows/api/oneforcing_i2v.json").read_text())
    assert _by_type(prompt, "LoadImage")["image"] == "example.png"  # ComfyUI ships input/example.png
    encode = _by_type(prompt, "OneForcingEncode")
    rollout = _by_type(prompt, "OneForcingRollout")
    assert (encode["width"], encode["height"]) == (rollout["width"], rollout["height"]) == (128, 128)
    image = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(0))  # what LoadImage hands on
    results = run_prompt(prompt, {"OneForcingEncode": {"width": 16, "height": 16},
                                  "OneForcingRollout": {"length": 9}},
                         core_outputs={"LoadImage": (image, torch.zeros(1, 40, 56))})
    by_type = {prompt[k]["class_type"]: v for k, v in results.items()}
    context = by_type["OneForcingEncode"][0]["samples"]
    latent = by_type["OneForcingRollout"][0]["samples"]
    assert context.shape == (1, 16, 1, 2, 2) and latent.shape == (1, 16, 3, 2, 2)
    torch.testing.assert_close(latent[:, :, :1], context, atol=1e-5, rtol=1e-5)  # the video starts with the image
    assert by_type["OneForcingDecode"][0].shape == (9, 16, 16, 3)
