"""Files the shipped workflows load from ComfyUI's ``input/`` folder (``workflows/input/``: the image-to-video start
image, a frame of the demo model's own world), copied there when ComfyUI loads the package.

``LoadImage`` lists only what lies in ``input/``, so a workflow can start from a shipped image only once it is there.
A file of the same name that is already there is left alone (it may be the user's).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

WORKFLOW_INPUTS = Path(__file__).resolve().parent.parent / "workflows" / "input"


def install_workflow_inputs(input_dir: str | Path | None = None) -> list[Path]:
    """Copy every file of ``workflows/input/`` into ``input_dir`` (default: the running ComfyUI's input folder) unless
    a file of that name is there; returns the files copied. Outside ComfyUI with no ``input_dir`` it does nothing."""
    if input_dir is None:
        folder_paths = sys.modules.get("folder_paths")  # present only inside a running ComfyUI
        if folder_paths is None:
            return []
        input_dir = folder_paths.get_input_directory()
    target = Path(input_dir)
    copied = []
    for source in sorted(WORKFLOW_INPUTS.iterdir()):
        destination = target / source.name
        if source.is_file() and not destination.exists():
            try:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, destination)
            except OSError as err:  # a read-only input folder: the workflow's LoadImage then names the file
                logging.warning("One-Forcing: could not copy %s to %s: %s", source.name, target, err)
                continue
            copied.append(destination)
    return copied
