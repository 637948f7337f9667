"""End to end in a real ComfyUI server: runs only when ``COMFYUI_ROOT`` points at a ComfyUI checkout.

``COMFYUI_PYTHON`` is the interpreter with ComfyUI's requirements (default: this one). The test builds a base
directory (``--base-directory``) with this repository symlinked into ``custom_nodes/`` and tiny models in
``models/``, starts ``main.py --cpu``, checks ``/object_info``, POSTs every API workflow in ``workflows/api/``,
waits for ``/history`` and checks the saved videos (frame count and size as the rollout node asks). The bundled demo
is a tiny stand-in pipeline unless ``COMFYUI_BUNDLED_DEMO=1`` lets the workflows use the real one in
``models/oneforcing-demo`` (then the image-to-video video must also start with its start image); that workflow's
``example.png`` is a frame of the demo model's synthetic world. ComfyUI's ``CLIPLoader`` always builds the full
UMT5-XXL (5.7 B parameters), which no tiny file can stand in for: unless ``COMFYUI_UMT5`` names a real ``umt5_xxl``
file in ``COMFYUI_ROOT/models/text_encoders`` the native workflow's CLIPLoader + CLIPTextEncode pair is replaced by
this package's text encoder (fed a tiny 4096-wide UMT5), and that is printed. The timings are printed (``-s``) and,
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
from test_nodes import HEAD128, build_model_tree, comfy_umt5_file

from oneforcing.nodes.definitions import NODE_SPECS
from oneforcing.nodes.folders import BUNDLED_DEMO
from oneforcing.nodes.spec import object_info
from oneforcing.pipelines.loading import export_reference_checkpoint

COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT")
pytestmark = pytest.mark.skipif(not COMFYUI_ROOT, reason="set COMFYUI_ROOT to a ComfyUI checkout to run")
REPO = Path(__file__).resolve().parent.parent
CORE = {k: v for path in sorted((Path(__file__).parent / "fixtures").glob("comfyui_core_object_info*.json"))
        for k, v in json.loads(path.read_text()).items()}
API_FILES = sorted((REPO / "workflows" / "api").glob("*.json"))
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
    """The first frame of a demo-world scene (what the demo model was trained on): uint8 RGB [128, 128, 3]."""
    from oneforcing.training.world import render_clip

    video, _, _ = render_clip(0, "train", num_frames=1, height=128, width=128)  # [3, 1, H, W] in -1..1
    return ((video[:, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def _write_start_image(path: Path) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), _start_image()[:, :, ::-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
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
             str(base), "--database-url", "sqlite:///:memory:"],
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
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise AssertionError(f"POST {path} -> {err.code}: {err.read().decode()[:3000]}") from err

    def run(self, prompt: dict, timeout: float = 600) -> tuple[dict, float]:
        start = time.perf_counter()
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "oneforcing").symlink_to(REPO, target_is_directory=True)
    build_model_tree(base)  # base/models/... and base/oneforcing-demo
    models = base / "models"
    # the native-Wan workflow's default names, as tiny stand-ins (the transformer takes 4096-wide UMT5 embeddings)
    export_reference_checkpoint(make_tiny_transformer(4, **HEAD128, text_dim=4096),
                                models / "diffusion_models" / "one_forcing.pt")
    umt5 = os.environ.get("COMFYUI_UMT5")
    if umt5:
        (models / "text_encoders").mkdir(exist_ok=True)
        (models / "text_encoders" / umt5).symlink_to(Path(COMFYUI_ROOT) / "models" / "text_encoders" / umt5)
    else:
        comfy_umt5_file(models / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", d_model=4096)
    subprocess.run([python, "-c", WAN_VAE_SCRIPT, str(models / "vae" / "wan_2.1_vae.safetensors")],
                   cwd=COMFYUI_ROOT, check=True, capture_output=True)
    _write_start_image(base / "input" / "example.png")
    instance = Server(base, python)
    instance.base = base
    instance.report = {"startup_s": round(instance.startup_s, 1), "bundled_demo": "real" if REAL_DEMO else "tiny",
                       "workflows": {}}
    yield instance
    instance.stop()
    print("\nComfyUI server report:", json.dumps(instance.report, indent=1))
    if os.environ.get("COMFYUI_SERVER_REPORT"):
        Path(os.environ["COMFYUI_SERVER_REPORT"]).write_text(json.dumps(instance.report, indent=1))
    shutil.rmtree(base / "output", ignore_errors=True)


def test_object_info_lists_the_nodes_as_declared(server):
    info = server.get("/object_info")
    server.report["object_info_nodes"] = len(info)
    for spec in NODE_SPECS:
        assert spec.node_id in info, f"{spec.node_id} missing: see {server.log_path}"
        live, declared = info[spec.node_id], object_info(spec)
        assert live["python_module"] == "custom_nodes.oneforcing"
        for key in ("input_order", "output", "output_name", "display_name", "category"):
            assert live[key] == declared[key], (spec.node_id, key)
        for section, entries in declared["input"].items():
            for name, (kind, options) in entries.items():
                live_kind, live_options = live["input"][section][name][0], live["input"][section][name][1]
                assert live_kind == kind
                for option, value in options.items():
                    if option == "options" and value and value[0] == BUNDLED_DEMO:
                        assert live_options["options"][0] == BUNDLED_DEMO  # model lists: ComfyUI's folders
                    else:
                        assert live_options[option] == value, (spec.node_id, name, option)
    assert "tiny_oneforcing.pt" in info["OneForcingModelLoader"]["input"]["required"]["model_name"][1]["options"]
    assert "example.png" in info["LoadImage"]["input"]["required"]["image"][0]
    server.report["nodes_listed"] = [s.node_id for s in NODE_SPECS if s.node_id in info]
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


def _node(prompt: dict, class_type: str) -> tuple[str, dict]:
    return next((k, n) for k, n in prompt.items() if n["class_type"] == class_type)


def _expected_video(prompt: dict) -> tuple[int, int, int]:
    """(frames, height, width) the rollout node of ``prompt`` makes: its context sets the size when connected."""
    _, rollout = _node(prompt, "OneForcingRollout")
    inputs = rollout["inputs"]
    width, height = inputs["width"], inputs["height"]
    if "context_latent" in inputs:
        encoder = prompt[inputs["context_latent"][0]]["inputs"]
        width, height = encoder["width"], encoder["height"]
    return inputs["length"], height, width


NATIVE = "oneforcing_t2v_native_wan.json"  # needs real UMT5/VAE sizes: run small in test_native_wan_workflow_runs


@pytest.mark.parametrize("path", [p for p in API_FILES if p.name != NATIVE], ids=lambda p: p.name)
def test_api_workflow_runs_as_shipped(server, path):
    prompt = json.loads(path.read_text())
    entry, seconds = server.run(prompt)
    save_id, _ = _node(prompt, "SaveVideo")
    frames = _frames(_saved_video(server, entry, save_id), keep=(0, 80))
    assert frames[:3] == _expected_video(prompt)
    if path.stem == "oneforcing_i2v" and REAL_DEMO:  # the tiny stand-in VAE cannot reconstruct an image
        import numpy as np

        start = _start_image().astype(float)
        first, last = (np.abs(f.astype(float) - start).mean() for f in frames[3])
        server.report["i2v mean |frame - start image| (0..255): first, last"] = [round(first, 1), round(last, 1)]
        assert first < 12 and first < last / 2, (first, last)
    server.report["workflows"][f"{path.stem} (as shipped: {frames[2]}x{frames[1]}, {frames[0]} frames)"] = \
        round(seconds, 1)


def test_native_wan_workflow_runs(server):
    assert REPO / "workflows" / "api" / NATIVE in API_FILES  # with the parametrized test: every API workflow runs
    prompt = json.loads((REPO / "workflows" / "api" / NATIVE).read_text())
    rollout_id, rollout = _node(prompt, "OneForcingRollout")
    rollout["inputs"].update(width=64, height=48, length=9)  # the full-size Wan VAE on 2 CPU cores: keep it small
    label = "oneforcing_t2v_native_wan (64x48, 9 frames"
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
