"""The nodes' ``/object_info`` entries as ComfyUI itself renders them (each class's ``GET_NODE_INFO_V1()``), computed
in a subprocess of ComfyUI's Python with its ``comfy_api`` imported, without a server.

The recorded copy, ``fixtures/oneforcing_object_info.json``, is what the workflow checks read where ComfyUI is absent
(CI); test_nodes.py (with ``COMFYUI_ROOT``) and test_comfyui_server.py check that it matches the classes. After
changing a node, record it again::

    COMFYUI_ROOT=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python python tests/comfyui_node_info.py

Model lists are rendered with no model folders (only the bundled demo, and ``none`` for tiny VAEs), so the record does
not depend on what the machine holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "oneforcing_object_info.json"

_SCRIPT = r"""
import importlib.util, json, sys
root, repo = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
import comfy_api.latest  # what a running ComfyUI has imported before it loads custom nodes
spec = importlib.util.spec_from_file_location("oneforcing", repo + "/__init__.py", submodule_search_locations=[repo])
package = importlib.util.module_from_spec(spec)
sys.modules["oneforcing"] = package
spec.loader.exec_module(package)
from oneforcing.nodes import definitions, folders
folders.set_model_roots({})
info = {}
for node in definitions.NODES:
    entry = node.GET_NODE_INFO_V1()
    entry.pop("python_module", None)  # where ComfyUI imported the package from
    info[entry["name"]] = entry
print(json.dumps(info))
"""


def node_info(comfyui_root: str, python: str | None = None) -> dict:
    """{node id: /object_info entry} of every node of ``NODES``, rendered by the ComfyUI at ``comfyui_root``."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEFORCING_MODELS_DIR", "PYTHONPATH")}
    done = subprocess.run([python or sys.executable, "-c", _SCRIPT, comfyui_root, str(REPO)], cwd=comfyui_root,
                          capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"rendering the nodes in ComfyUI failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def recorded() -> dict:
    return json.loads(FIXTURE.read_text())


if __name__ == "__main__":
    root = os.environ.get("COMFYUI_ROOT") or sys.exit("set COMFYUI_ROOT to a ComfyUI checkout")
    FIXTURE.write_text(json.dumps(node_info(root, os.environ.get("COMFYUI_PYTHON")), indent=1) + "\n")
    print(f"wrote {FIXTURE}")
