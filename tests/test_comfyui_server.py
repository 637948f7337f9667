"""End to end in a real ComfyUI server: runs only when ``COMFYUI_ROOT`` points at a ComfyUI checkout.

``COMFYUI_PYTHON`` is the interpreter with ComfyUI's requirements (default: this one). The test builds a base
directory (``--base-directory``) with this repository symlinked into ``custom_nodes/`` and tiny models in
``models/``, starts ``main.py --cpu --preview-method auto``, checks ``/object_info``, POSTs every API workflow in
``workflows/api/``, waits for ``/history`` and checks the saved videos (frame count and size as the rollout node asks;
size 0 is the model's recorded size), and that a preview per block arrives over the websocket. The bundled demo is a
tiny stand-in pipeline unless ``COMFYUI_BUNDLED_DEMO=1`` lets the workflows use the real one in
``models/oneforcing-demo`` (then the image-to-video video must also start with its start image, the demo world's frame
the package copies into ``input/``).

The LoRA workflow's LoRA is the shipped demo LoRA when the real demo runs and the file is there, else a random LoRA for
the demo in use, in ``models/loras`` under the same name; that workflow is also run with its LoRA node bypassed and at
strength 0, which must both give the plain video.

The workflow that needs downloads (``properties.models`` on its loaders) is first queued without its models and must be
refused at queue time naming every one; then tiny stand-ins take their names. ComfyUI's ``CLIPLoader`` always builds
the full UMT5-XXL (5.7 B parameters), which no tiny file can stand in for: unless ``COMFYUI_UMT5`` names a real
``umt5_xxl`` file in ``COMFYUI_ROOT/models/text_encoders`` that workflow's CLIPLoader + CLIPTextEncode pair is replaced
by this package's text encoder (fed a tiny 4096-wide UMT5), and that is printed. The timings are printed (``-s``) and,
with ``COMFYUI_SERVER_REPORT`` set to a file, written there as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import make_tiny_transformer
from test_nodes import HEAD128, build_model_tree, comfy_umt5_file, lora_file

from comfyui_node_info import recorded as recorded_node_info
from oneforcing import DEMO_MODEL_DIR, CausalWanTransformer3DModel
from oneforcing.nodes.folders import BUNDLED_DEMO, BUNDLED_DEMO_LORAS, NO_TINY_VAE
from oneforcing.pipelines.loading import export_reference_checkpoint

COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT")
pytestmark = pytest.mark.skipif(not COMFYUI_ROOT, reason="set COMFYUI_ROOT to a ComfyUI checkout to run")
REPO = Path(__file__).resolve().parent.parent
CORE = {k: v for path in sorted((Path(__file__).parent / "fixtures").glob("comfyui_core_object_info*.json"))
        for k, v in json.loads(path.read_text()).items()}
API_FILES = sorted((REPO / "workflows" / "api").glob("*.json"))
UI = {path.name: json.loads((REPO / "workflows" / path.name).read_text()) for path in API_FILES}
WORKFLOW_INPUTS = REPO / "workflows" / "input"
REAL_DEMO = os.environ.get("COMFYUI_BUNDLED_DEMO") == "1"

# ComfyUI's own Wan2.1 VAE class with its fixed config, randomly initialised (VAELoader accepts no smaller one)
WAN_VAE_SCRIPT = """
import sys, torch
from comfy.cli_args import args
args.cpu = True
from comfy.ldm.wan.vae import WanVAE
from safetensors.torch import save_file
torch.manual_seed(0)
model = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0)
with torch.no_grad():
    for name, param in model.named_parameters():
        if name.endswith("gamma"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02)
save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
"""


def _start_image():
    """The image-to-video workflow's start image (a frame of the demo world): uint8 RGB [128, 128, 3]."""
    import cv2

    return cv2.imread(str(WORKFLOW_INPUTS / "oneforcing_demo_start.png"))[:, :, ::-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``main.py`` on a free loopback port with ``base`` as its base directory (the real bundled demo when
    ``COMFYUI_BUNDLED_DEMO=1``, else ``base/oneforcing-demo``)."""

    def __init__(self, base: Path, python: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(base / "server.log", "w")
        env = dict(os.environ)
        if REAL_DEMO:
            env.pop("ONEFORCING_DEMO_DIR", None)  # the repository's models/oneforcing-demo
        else:
            env["ONEFORCING_DEMO_DIR"] = str(base / "oneforcing-demo")
        self.process = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory",
             str(base), "--database-url", "sqlite:///:memory:", "--preview-method", "auto"],
            cwd=COMFYUI_ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        self.log_path = base / "server.log"
        start = time.perf_counter()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {self.log_path.read_text()[-3000:]}")
            try:
                self.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.perf_counter() - start > 180:
                    raise RuntimeError("ComfyUI did not answer within 180 s")
                time.sleep(0.5)
        self.startup_s = time.perf_counter() - start

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        status, answer = self.try_post(path, body)
        assert status == 200, f"POST {path} -> {status}: {json.dumps(answer)[:3000]}"
        return answer

    def try_post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 600, client_id: str | None = None) -> tuple[dict, float]:
        start = time.perf_counter()
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})["prompt_id"]
        while time.perf_counter() - start < timeout:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] == "success":
                    return entry, time.perf_counter() - start
                raise AssertionError(f"prompt failed: {json.dumps(entry['status']['messages'])[:4000]}")
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


NATIVE_MODELS = {  # the tiny stand-ins of the downloads: folder / file name -> how to make it
    "diffusion_models/one_forcing.pt": lambda path, python: export_reference_checkpoint(
        make_tiny_transformer(4, **HEAD128, text_dim=4096), path),  # takes 4096-wide UMT5 embeddings
    "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors": lambda path, python: comfy_umt5_file(path, d_model=4096),
    "vae/wan_2.1_vae.safetensors": lambda path, python: subprocess.run(
        [python, "-c", WAN_VAE_SCRIPT, str(path)], cwd=COMFYUI_ROOT, check=True, capture_output=True),
}


def _node(prompt: dict, class_type: str) -> tuple[str, dict]:
    return next((k, n) for k, n in prompt.items() if n["class_type"] == class_type)


LORA_WORKFLOW = REPO / "workflows" / "api" / "One-Forcing text to video with a LoRA.json"
DEMO_LORA = _node(json.loads(LORA_WORKFLOW.read_text()), "OneForcingLora")[1]["inputs"]["lora_name"]
SHIPPED_DEMO_LORA = REPO / "models" / BUNDLED_DEMO_LORAS / DEMO_LORA
USES_SHIPPED_LORA = REAL_DEMO and SHIPPED_DEMO_LORA.is_file()


def add_demo_lora(base: Path) -> None:
    """The LoRA the LoRA workflow names, for the demo model the server runs: with the real demo, the shipped file
    (which the package finds beside the demo) if it is there; else a random one for that demo's transformer (the
    real one, or the tiny stand-in) in ``models/loras``."""
    if USES_SHIPPED_LORA:
        return
    demo = DEMO_MODEL_DIR if REAL_DEMO else base / "oneforcing-demo"
    transformer = CausalWanTransformer3DModel.from_pretrained(demo / "transformer")
    lora_file(transformer, base / "models" / "loras" / DEMO_LORA, seed=3, scale=0.15)


def build_base(base: Path) -> Path:
    """A ComfyUI base directory: this repository in ``custom_nodes/``, ``models/`` with tiny files (see
    ``test_nodes.build_model_tree``), a tiny stand-in demo in ``oneforcing-demo/`` and the LoRA workflow's LoRA
    (:func:`add_demo_lora`); none of the downloads."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "oneforcing").symlink_to(REPO, target_is_directory=True)
    build_model_tree(base)
    add_demo_lora(base)
    return base


def add_native_models(base: Path, python: str) -> None:
    """Tiny stand-ins named as the downloads the native-Wan workflow declares (a real UMT5 with ``COMFYUI_UMT5``)."""
    umt5 = os.environ.get("COMFYUI_UMT5")
    for name, make in NATIVE_MODELS.items():
        path = base / "models" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if umt5 and name.startswith("text_encoders/"):
            path.with_name(umt5).symlink_to(Path(COMFYUI_ROOT) / "models" / "text_encoders" / umt5)
        else:
            make(path, python)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    base = build_base(tmp_path_factory.mktemp("comfyui_base"))
    instance = Server(base, python)
    instance.base, instance.python = base, python
    instance.report = {"startup_s": round(instance.startup_s, 1), "bundled_demo": "real" if REAL_DEMO else "tiny",
                       "demo LoRA": f"{'shipped' if USES_SHIPPED_LORA else 'random, in models/loras'}: {DEMO_LORA}",
                       "workflows": {}}
    yield instance
    instance.stop()
    print("\nComfyUI server report:", json.dumps(instance.report, indent=1))
    if os.environ.get("COMFYUI_SERVER_REPORT"):
        Path(os.environ["COMFYUI_SERVER_REPORT"]).write_text(json.dumps(instance.report, indent=1))
    shutil.rmtree(base / "output", ignore_errors=True)


MODEL_LISTS = ("model_name", "text_encoder_name", "vae_name", "tiny_vae", "lora_name")  # the model folders' files


def _model_lists_apart(entry: dict) -> tuple[dict, list]:
    """An /object_info entry without the choices of its model-file combos (they list the machine's folders), and
    the fixed first choice of each (the bundled demo, ``none``; None for a list of files only, as the LoRAs')."""
    entry, firsts = json.loads(json.dumps(entry)), []
    for entries in entry["input"].values():
        for name, (_, options) in entries.items():
            if name in MODEL_LISTS:
                choices = options.pop("options")
                firsts.append(choices[0] if choices and choices[0] in (BUNDLED_DEMO, NO_TINY_VAE) else None)
    return entry, firsts


def test_object_info_lists_the_nodes_as_declared(server):
    """The live ``/object_info`` of the nodes is the recorded one that the CI's workflow checks read."""
    info = server.get("/object_info")
    server.report["object_info_nodes"] = len(info)
    ours = recorded_node_info()
    for node_id, declared in ours.items():
        assert node_id in info, f"{node_id} missing: see {server.log_path}"
        live = dict(info[node_id])
        assert live.pop("python_module") == "custom_nodes.oneforcing"
        assert _model_lists_apart(live) == _model_lists_apart(declared), node_id
    assert "tiny_oneforcing.pt" in info["OneForcingModelLoader"]["input"]["required"]["model_name"][1]["options"]
    assert DEMO_LORA in info["OneForcingLora"]["input"]["required"]["lora_name"][1]["options"]
    # the package copied the image-to-video start image into ComfyUI's input folder when it loaded
    assert "oneforcing_demo_start.png" in info["LoadImage"]["input"]["required"]["image"][0]
    server.report["nodes_listed"] = [node_id for node_id in ours if node_id in info]
    # the recorded core-node fixture the CI workflow checks rely on still matches this ComfyUI
    for name, recorded in CORE.items():
        if not isinstance(recorded, dict):
            continue
        assert info[name]["input_order"] == recorded["input_order"] and info[name]["output"] == recorded["output"]
        for section, entries in recorded["input"].items():
            for key, entry in entries.items():
                if not isinstance(entry[0], dict):
                    assert info[name]["input"][section][key] == entry, (name, key)
                else:  # a file combo: its options match
                    assert info[name]["input"][section][key][1:] == entry[1:], (name, key)


def _saved_video(server, entry: dict, node_id: str) -> Path:
    files = entry["outputs"][node_id]["images"]
    assert len(files) == 1 and files[0]["filename"].endswith(".mp4")
    path = server.base / "output" / files[0]["subfolder"] / files[0]["filename"]
    assert path.is_file() and path.stat().st_size > 0
    return path


def _frames(path: Path, keep: tuple[int, ...] = ()) -> tuple[int, int, int] | tuple[int, int, int, list]:
    """(frame count, height, width) of a video; with ``keep``, also those frames (RGB uint8)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    count, size, kept = 0, None, []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        if count in keep:
            kept.append(frame[:, :, ::-1])
        count, size = count + 1, frame.shape[:2]
    capture.release()
    return (count, *size, kept) if keep else (count, *size)


def _demo_video_size(server) -> dict:
    """The bundled demo's recorded ``default_video_size`` (what a rollout's size 0 stands for)."""
    demo = REPO / "models" / "oneforcing-demo" if REAL_DEMO else server.base / "oneforcing-demo"
    return json.loads((demo / "model_index.json").read_text())["default_video_size"]


def _expected_video(prompt: dict, server) -> tuple[int, int, int]:
    """(frames, height, width) the rollout node of ``prompt`` makes: its context sets the size when connected, size 0
    is the bundled demo's recorded size."""
    _, rollout = _node(prompt, "OneForcingRollout")
    inputs = rollout["inputs"]
    width, height = inputs["width"], inputs["height"]
    if "context_latent" in inputs:
        encoder = prompt[inputs["context_latent"][0]]["inputs"]
        width, height = encoder["width"], encoder["height"]
    recorded = _demo_video_size(server)
    return inputs["length"], height or recorded["height"], width or recorded["width"]


def _models_declared(workflow: dict) -> list[dict]:
    """The downloads a UI workflow declares, as ComfyUI's templates do (``properties.models`` of its nodes)."""
    return [model for node in workflow["nodes"] for model in node.get("properties", {}).get("models", [])]


RUNS_AS_SHIPPED = [p for p in API_FILES if not _models_declared(UI[p.name])]
NEEDS_DOWNLOADS = [p for p in API_FILES if _models_declared(UI[p.name])]


class PreviewListener:
    """ComfyUI's websocket for one client id, collecting the binary preview images it sends (in a thread)."""

    def __init__(self, server):
        import threading

        import websocket

        self.client_id = uuid.uuid4().hex
        self.previews: list[bytes] = []
        self.events: list[dict] = []
        self.socket = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}",
                                                  timeout=30)
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self):
        import websocket

        while True:
            try:
                opcode, data = self.socket.recv_data()
            except (websocket.WebSocketException, OSError):
                return
            if opcode == websocket.ABNF.OPCODE_BINARY:
                self.previews.append(data)
            elif opcode == websocket.ABNF.OPCODE_TEXT:
                self.events.append(json.loads(data))

    def close(self):
        self.socket.close()
        self.thread.join(timeout=10)


@pytest.mark.parametrize("path", RUNS_AS_SHIPPED, ids=lambda p: p.stem)
def test_api_workflow_runs_as_shipped(server, path):
    prompt = json.loads(path.read_text())
    listener = PreviewListener(server)
    try:
        entry, seconds = server.run(prompt, client_id=listener.client_id)
        time.sleep(1)  # the last messages
    finally:
        listener.close()
    save_id, _ = _node(prompt, "SaveVideo")
    frames = _frames(_saved_video(server, entry, save_id), keep=(0, 80))
    assert frames[:3] == _expected_video(prompt, server)
    # a live preview per generated block, through ComfyUI's own mechanism (the server runs --preview-method auto):
    # binary message type 1 (PREVIEW_IMAGE) = 4-byte event, 4-byte format, then the JPEG
    rollout_id, rollout = _node(prompt, "OneForcingRollout")
    progress = [e["data"] for e in listener.events if e["type"] == "progress" and e["data"]["node"] == rollout_id]
    blocks = progress[-1]["max"]
    assert [p["value"] for p in progress] == list(range(1, blocks + 1))
    jpegs = [m for m in listener.previews if int.from_bytes(m[:4], "big") == 1 and m[8:10] == b"\xff\xd8"]
    assert len(jpegs) >= blocks, (len(jpegs), blocks)  # the decoder's own progress adds none (it has no preview)
    server.report.setdefault("previews over the websocket", {})[path.stem] = f"{len(jpegs)} for {blocks} blocks"
    if "image to video" in path.stem and REAL_DEMO:  # the tiny stand-in VAE cannot reconstruct an image
        import numpy as np

        start = _start_image().astype(float)
        first, last = (np.abs(f.astype(float) - start).mean() for f in frames[3])
        server.report["i2v mean |frame - start image| (0..255): first, last"] = [round(first, 1), round(last, 1)]
        assert first < 12 and first < last / 2, (first, last)
    server.report["workflows"][f"{path.stem} (as shipped: {frames[2]}x{frames[1]}, {frames[0]} frames)"] = \
        round(seconds, 1)


@pytest.mark.parametrize("path", NEEDS_DOWNLOADS, ids=lambda p: p.stem)
def test_workflow_needing_downloads_is_refused_at_queue_time_naming_every_model(server, path):
    """Nothing runs: ComfyUI's own loaders and this package's loader (validate_inputs) refuse the prompt when it is
    queued, and every model the workflow declares is named in the answer."""
    declared = _models_declared(UI[path.name])
    assert {(m["directory"], m["name"]) for m in declared} == {
        (name.split("/")[0], name.split("/")[1]) for name in NATIVE_MODELS}
    status, answer = server.try_post("/prompt", {"prompt": json.loads(path.read_text()),
                                                 "client_id": uuid.uuid4().hex})
    assert status == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation", answer
    errors = json.dumps(answer["node_errors"])
    for model in declared:
        assert model["name"] in errors, (model["name"], errors)
    server.report["refused at queue time"] = {
        node["class_type"]: [e["details"][:120] for e in node["errors"]] for node in answer["node_errors"].values()}


def test_workflow_needing_downloads_runs_once_they_are_there(server):
    path, = NEEDS_DOWNLOADS
    add_native_models(server.base, server.python)
    prompt = json.loads(path.read_text())
    rollout_id, rollout = _node(prompt, "OneForcingRollout")
    rollout["inputs"].update(width=64, height=48, length=9)  # the full-size Wan VAE on 2 CPU cores: keep it small
    label = f"{path.stem} (64x48, 9 frames"
    if not os.environ.get("COMFYUI_UMT5"):
        clip_id, _ = _node(prompt, "CLIPLoader")
        text_id, text = _node(prompt, "CLIPTextEncode")
        del prompt[clip_id]
        prompt[text_id] = {"class_type": "OneForcingTextEncode", "inputs": {
            "text_encoder_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "prompt": text["inputs"]["text"],
            "dtype": "default"}}
        label += "; CLIPLoader+CLIPTextEncode replaced by OneForcingTextEncode"
        print("native workflow: no COMFYUI_UMT5 given, text encoded by OneForcingTextEncode (tiny 4096-wide UMT5)")
    entry, seconds = server.run(prompt)
    save_id, _ = _node(prompt, "SaveVideo")
    assert _frames(_saved_video(server, entry, save_id)) == (9, 48, 64)
    server.report["workflows"][label + ")"] = round(seconds, 1)
    # the same graph with this package's decoder fed ComfyUI's VAE object
    decode_id, _ = _node(prompt, "VAEDecode")
    vae_loader_id, _ = _node(prompt, "VAELoader")
    prompt[decode_id] = {"class_type": "OneForcingDecode", "inputs": {
        "samples": [rollout_id, 0], "vae_name": BUNDLED_DEMO, "vae": [vae_loader_id, 0]}}
    rollout["inputs"]["seed"] = 1  # not a cached result
    entry, seconds = server.run(prompt)
    assert _frames(_saved_video(server, entry, save_id)) == (9, 48, 64)
    server.report["workflows"]["native graph, OneForcingDecode with ComfyUI's VAE object"] = round(seconds, 1)


def _video_frames(server, prompt: dict):
    """(frames [T, H, W, 3] as floats in 0..255 of the video ``prompt``'s SaveVideo writes, seconds it took)."""
    import numpy as np

    entry, seconds = server.run(prompt)
    path = _saved_video(server, entry, _node(prompt, "SaveVideo")[0])
    count = _frames(path)[0]
    return np.stack(_frames(path, keep=tuple(range(count)))[3]).astype(float), seconds


def test_lora_workflow_bypassed_or_at_strength_0_gives_the_plain_video(server):
    """ComfyUI caches node outputs and shares the loaded model between the LoRA node and everything else the loader
    feeds: after the LoRA video, the same graph with the LoRA node bypassed (the frontend then links the rollout to
    the loader) and at strength 0 must both give the plain demo's video."""
    import numpy as np

    prompt = json.loads(LORA_WORKFLOW.read_text())
    lora_id, lora = _node(prompt, "OneForcingLora")
    _, rollout = _node(prompt, "OneForcingRollout")
    rollout["inputs"].update(length=21, seed=11)  # not the cached result of the run as shipped
    with_lora, seconds = _video_frames(server, prompt)
    bypassed = {k: v for k, v in json.loads(json.dumps(prompt)).items() if k != lora_id}
    _node(bypassed, "OneForcingRollout")[1]["inputs"]["model"] = lora["inputs"]["model"]
    plain, _ = _video_frames(server, bypassed)
    lora["inputs"]["strength"] = 0.0
    strength_0, _ = _video_frames(server, prompt)
    assert np.array_equal(strength_0, plain)
    difference = float(np.abs(with_lora - plain).mean())
    assert difference > 2.0, difference
    server.report["LoRA workflow: mean |LoRA - plain| (0..255), 21 frames"] = round(difference, 1)
    server.report["workflows"]["LoRA workflow, 21 frames"] = round(seconds, 1)
