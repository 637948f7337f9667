"""Model files and folders the nodes offer, and the safe way from a chosen name to a path.

Inside ComfyUI the roots are ComfyUI's own model folders (``folder_paths``: ``diffusion_models`` = models/unet +
models/diffusion_models, ``text_encoders`` = models/text_encoders + models/clip, ``vae``, ``vae_approx`` where
ComfyUI keeps its TAESD / TAEHV preview decoders, and ``loras``). Outside ComfyUI (tests, scripts) they are the
matching subfolders of ``$ONEFORCING_MODELS_DIR`` (a folder laid out like ComfyUI's ``models/``), or whatever
:func:`set_model_roots` set.

A choice is a weights file (``.safetensors``, ``.pt`` ...), a diffusers/transformers component folder (it holds a
``config.json``; offered as ``name/``) or a diffusers pipeline folder (``model_index.json``; the matching component
subfolder is used), given relative to its root. The bundled demo model is always offered first, as
:data:`BUNDLED_DEMO`, and resolves to :func:`bundled_demo_dir`. ``vae_approx`` holds single files only (no folders, no
bundled demo); its choices start with :data:`NO_TINY_VAE`, which names no file. ``loras`` holds ``.safetensors`` files
only (never a pickle); after ComfyUI's (or ``$ONEFORCING_MODELS_DIR``'s) folders it searches the bundled demo's LoRAs,
``oneforcing-demo-loras/`` beside the bundled demo's folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from ..pipelines.loading import WEIGHT_SUFFIXES

BUNDLED_DEMO = "oneforcing-demo (bundled)"
NO_TINY_VAE = "none"
BUNDLED_DEMO_LORAS = "oneforcing-demo-loras"


class ModelKind(NamedTuple):
    folders: tuple[str, ...]  # ComfyUI's folder names
    component: str | None  # the pipeline component subfolder; None: single files only
    first_choice: str | None  # offered before the files (the bundled demo, or a choice naming no file)
    suffixes: tuple[str, ...] = WEIGHT_SUFFIXES
    bundled: str | None = None  # a folder beside the bundled demo's, searched after the others


MODEL_KINDS = {
    "diffusion_models": ModelKind(("diffusion_models", "unet"), "transformer", BUNDLED_DEMO),
    "text_encoders": ModelKind(("text_encoders", "clip"), "text_encoder", BUNDLED_DEMO),
    "vae": ModelKind(("vae",), "vae", BUNDLED_DEMO),
    "vae_approx": ModelKind(("vae_approx",), None, NO_TINY_VAE),
    "loras": ModelKind(("loras",), None, None, (".safetensors",), BUNDLED_DEMO_LORAS),
}
_MAX_DEPTH = 3
_override_roots: dict[str, list[Path]] | None = None


def bundled_demo_dir() -> Path:
    """``$ONEFORCING_DEMO_DIR`` if set, else ``<repository>/models/oneforcing-demo``."""
    env = os.environ.get("ONEFORCING_DEMO_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "models" / "oneforcing-demo"


def set_model_roots(roots: dict[str, list[str | os.PathLike]] | None) -> None:
    """Use these roots (kind -> folders) instead of ComfyUI's or ``$ONEFORCING_MODELS_DIR``; None undoes it."""
    global _override_roots
    if roots is not None:
        unknown = set(roots) - set(MODEL_KINDS)
        if unknown:
            raise ValueError(f"unknown model kinds {sorted(unknown)}; known: {sorted(MODEL_KINDS)}")
        roots = {kind: [Path(p) for p in paths] for kind, paths in roots.items()}
    _override_roots = roots


def model_roots(kind: str) -> list[Path]:
    """The folders searched for models of ``kind`` (a key of :data:`MODEL_KINDS`), in order: ComfyUI's (else
    ``$ONEFORCING_MODELS_DIR``'s), then the bundled ones; only those :func:`set_model_roots` set, if it did."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(MODEL_KINDS)}")
    if _override_roots is not None:
        return list(_override_roots.get(kind, []))
    folder_paths = sys.modules.get("folder_paths")  # present only inside a running ComfyUI
    env = os.environ.get("ONEFORCING_MODELS_DIR")
    if folder_paths is not None:
        roots = [Path(p) for p in folder_paths.get_folder_paths(kind)]
    else:
        roots = [Path(env) / name for name in MODEL_KINDS[kind].folders] if env else []
    bundled = MODEL_KINDS[kind].bundled
    return roots + ([bundled_demo_dir().parent / bundled] if bundled else [])


def _is_component_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "model_index.json").is_file()


def _files_only(kind: str) -> bool:
    return MODEL_KINDS[kind].component is None


def list_models(kind: str) -> list[str]:
    """Choices for ``kind``: its first choice (the bundled demo; :data:`NO_TINY_VAE` for ``vae_approx``; none for
    ``loras``), then every weights file (of the kind's suffixes) and model folder under the roots."""
    found: set[str] = set()
    files_only = _files_only(kind)
    spec = MODEL_KINDS[kind]
    for root in model_roots(kind):
        if not root.is_dir():
            continue
        for folder, dirs, files in os.walk(root, followlinks=True):
            here = Path(folder)
            rel = here.relative_to(root)
            if rel.parts and _is_component_folder(here) and not files_only:
                found.add(rel.as_posix() + "/")
                dirs[:] = []  # a model folder is one choice, not its files
                continue
            if len(rel.parts) >= _MAX_DEPTH:
                dirs[:] = []
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if name.lower().endswith(spec.suffixes) and not name.startswith("."):
                    found.add((rel / name).as_posix())
    return [spec.first_choice] * (spec.first_choice is not None) + sorted(found, key=str.lower)


def check_model_name(kind: str, name) -> str:
    """The name if it is a well-formed relative choice; a clear ``ValueError`` otherwise."""
    label = f"{kind} model {name!r}"
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{label}: expected a non-empty file or folder name")
    if name == BUNDLED_DEMO:
        return name
    if "\\" in name or "\x00" in name:
        raise ValueError(f"{label}: use '/' as separator; backslashes and NUL are not allowed")
    pure = PurePosixPath(name)
    if pure.is_absolute() or (pure.parts and ":" in pure.parts[0]):
        raise ValueError(f"{label}: must be relative to the {kind} folder, not an absolute path")
    if ".." in pure.parts:
        raise ValueError(f"{label}: '..' is not allowed (the model must lie inside the {kind} folder)")
    return name


def resolve_model(kind: str, name: str) -> Path:
    """The path of choice ``name`` of ``kind``: a file, a component folder or a pipeline folder (``vae_approx`` and
    ``loras``: a file).

    Raises ``ValueError`` for malformed names (absolute, ``..``) and files of a suffix the kind does not read (a
    pickled LoRA), ``FileNotFoundError`` naming the folders searched.
    """
    check_model_name(kind, name)
    files_only = _files_only(kind)
    if name == BUNDLED_DEMO and not files_only:
        demo = bundled_demo_dir()
        if not (demo / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{kind} model {name!r}: the bundled demo model is not installed at {demo} "
                "(build it with training/demo_model.sh, or pick another model)"
            )
        return demo
    roots = model_roots(kind)
    for root in roots:
        candidate = root / name.rstrip("/")
        if not candidate.exists():
            continue
        # lexically inside root (no '..', not absolute); symlinked model collections are allowed, as in ComfyUI
        if candidate.is_dir() and files_only:
            raise FileNotFoundError(f"{kind} model {name!r}: {candidate} is a folder; choose a weights file")
        if candidate.is_dir() and not _is_component_folder(candidate):
            raise FileNotFoundError(f"{kind} model {name!r}: {candidate} is a folder without config.json or model_index.json")
        suffixes = MODEL_KINDS[kind].suffixes
        if candidate.is_file() and not candidate.name.lower().endswith(suffixes):
            raise ValueError(f"{kind} model {name!r}: only {', '.join(suffixes)} files are read from {kind}")
        return candidate
    searched = ", ".join(str(r) for r in roots) or "no model folders (set ONEFORCING_MODELS_DIR or run inside ComfyUI)"
    raise FileNotFoundError(f"{kind} model {name!r}: not found in {searched}")


def missing_model(kind: str, name) -> str | None:
    """Why choice ``name`` of ``kind`` cannot be loaded (malformed, or no such file or folder), or None when it can be
    found: what the nodes check when a prompt is queued, before anything runs."""
    try:
        resolve_model(kind, name)
    except (ValueError, FileNotFoundError) as err:
        return str(err)
    return None


def component_path(kind: str, path: Path) -> Path:
    """For a pipeline folder (``model_index.json``), its component subfolder for ``kind``; else ``path``."""
    if path.is_dir() and (path / "model_index.json").is_file():
        sub = path / MODEL_KINDS[kind].component
        if not sub.is_dir():
            raise FileNotFoundError(f"{path} is a pipeline folder without a {MODEL_KINDS[kind].component}/ subfolder")
        return sub
    return path


def pipeline_folder(kind: str, path: Path) -> Path | None:
    """The pipeline folder that ``path`` (a pipeline folder or one of its components) belongs to, if any."""
    if (path / "model_index.json").is_file():
        return path
    if path.name == MODEL_KINDS[kind].component and (path.parent / "model_index.json").is_file():
        return path.parent
    return None
