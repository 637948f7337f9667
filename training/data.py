"""Training data on disk: latent folders, ODE-pair folders, and the deterministic batch order of a run.

A **latent folder** holds one ``sample_<n>.safetensors`` per clip with tensors
``latents`` [C, F, H, W] (the VAE's *normalised* latents) and ``prompt_embeds`` [L, D] (text-encoder output, zero beyond the prompt's tokens), and the
caption in the metadata key ``caption``. ``negative_prompt.safetensors`` holds ``prompt_embeds`` [L, D] of the
negative (unconditional) prompt, used for classifier-free guidance and caption dropout.

An **ODE-pair folder** holds one ``pair_<n>.safetensors`` per trajectory: ``states`` [S + 1, C, F, H, W] (the ODE
state at each of the student's S timesteps, then the endpoint x0), ``prompt_embeds`` [L, D]; metadata ``timesteps``
(JSON list of the S timesteps) and ``caption``.

Batches are a pure function of (seed, iteration, purpose, rank): resuming at an iteration reproduces the data order
without any loader state, and ranks never share a sample within a global batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

NEGATIVE_PROMPT_FILE = "negative_prompt.safetensors"


class DataError(ValueError):
    pass


def write_latent_sample(path: str | Path, latents: torch.Tensor, prompt_embeds: torch.Tensor, caption: str):
    """Write one sample file (latents [C, F, H, W], prompt_embeds [L, D])."""
    tensors = {"latents": latents.detach().cpu().contiguous(), "prompt_embeds": prompt_embeds.detach().cpu().contiguous()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"caption": caption})


def write_negative_prompt(folder: str | Path, prompt_embeds: torch.Tensor, text: str = "") -> Path:
    path = Path(folder) / NEGATIVE_PROMPT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeds": prompt_embeds.detach().cpu().contiguous()}, str(path), metadata={"caption": text})
    return path


def write_ode_pair(path: str | Path, states: torch.Tensor, prompt_embeds: torch.Tensor, timesteps, caption: str):
    """Write one trajectory: states [S + 1, C, F, H, W], prompt_embeds [L, D], the S student timesteps."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"states": states.detach().cpu().contiguous(), "prompt_embeds": prompt_embeds.detach().cpu().contiguous()},
        str(path),
        metadata={"caption": caption, "timesteps": json.dumps([float(t) for t in timesteps])},
    )


class _SafetensorsFolder(torch.utils.data.Dataset):
    pattern = "*.safetensors"
    required: tuple[str, ...] = ()
    what = "sample"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"{self.what} folder {self.folder} does not exist (run the stage that writes it first)")
        self.files = sorted(self.folder.glob(self.pattern))
        if not self.files:
            raise DataError(f"{self.folder} holds no {self.pattern} files")
        first = self._read(0)
        self.shapes = {k: tuple(v.shape) for k, v in first.items() if isinstance(v, torch.Tensor)}

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, index: int) -> dict:
        path = self.files[index]
        try:
            with safe_open(str(path), framework="pt") as f:
                item = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata() or {}
        except Exception as error:  # safetensors raises several types for corrupt files
            raise DataError(f"{path}: not a readable safetensors file ({error})") from None
        missing = [k for k in self.required if k not in item]
        if missing:
            raise DataError(f"{path}: missing tensor(s) {missing}")
        item["caption"] = metadata.get("caption", "")
        item["_metadata"] = metadata
        return item

    def __getitem__(self, index: int) -> dict:
        item = self._read(index)
        for key, shape in self.shapes.items():
            if key in item and tuple(item[key].shape) != shape:
                raise DataError(
                    f"{self.files[index]}: {key} has shape {tuple(item[key].shape)}, but {self.files[0].name} has "
                    f"{shape}; every sample of a folder must have the same shape"
                )
        return item

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """Stack tensors along a new batch dimension; captions become a list."""
        out = {"caption": [item["caption"] for item in items]}
        for key, value in items[0].items():
            if isinstance(value, torch.Tensor):
                out[key] = torch.stack([item[key] for item in items])
        return out


class LatentFolder(_SafetensorsFolder):
    """Dataset over a latent folder; items are dicts with ``latents``, ``prompt_embeds`` and ``caption``."""

    pattern = "sample_*.safetensors"
    required = ("latents", "prompt_embeds")
    what = "latent"

    def negative_prompt_embeds(self) -> torch.Tensor:
        """[L, D] embedding of the negative prompt (``negative_prompt.safetensors``)."""
        path = self.folder / NEGATIVE_PROMPT_FILE
        if not path.is_file():
            raise DataError(f"{path} is missing: classifier-free guidance and caption dropout need the negative prompt")
        with safe_open(str(path), framework="pt") as f:
            embeds = f.get_tensor("prompt_embeds")
        if tuple(embeds.shape) != self.shapes["prompt_embeds"]:
            raise DataError(f"{path}: shape {tuple(embeds.shape)} differs from the samples' {self.shapes['prompt_embeds']}")
        return embeds


class OdePairFolder(_SafetensorsFolder):
    """Dataset over an ODE-pair folder; items have ``states`` [S + 1, C, F, H, W] and ``prompt_embeds``."""

    pattern = "pair_*.safetensors"
    required = ("states", "prompt_embeds")
    what = "ODE-pair"

    def __init__(self, folder: str | Path):
        super().__init__(folder)
        self.timesteps = json.loads(self._read(0)["_metadata"].get("timesteps", "null") or "null")
        if not isinstance(self.timesteps, list) or len(self.timesteps) + 1 != self.shapes["states"][0]:
            raise DataError(f"{self.files[0]}: metadata 'timesteps' does not match the {self.shapes['states'][0]} states")


def batch_indices(
    num_items: int, batch_size: int, iteration: int, *, seed: int, purpose: int = 0, purposes: int = 1,
    rank: int = 0, world_size: int = 1,
) -> list[int]:
    """Item indices of one rank's batch: epoch-wise random permutations walked in order.

    ``purpose`` in ``range(purposes)`` gives separate batches within one iteration (e.g. generator and critic steps
    of one distillation iteration draw different prompts).
    """
    out = []
    for i in range(batch_size):
        position = (((iteration * purposes + purpose) * world_size + rank) * batch_size) + i
        epoch, offset = divmod(position, num_items)
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(order[offset]))
    return out


class FolderBatches:
    """A latent folder as the teacher stage's batches: ``batch(step)`` (1-based) collates the folder's samples at
    :func:`batch_indices` of that step; the same interface as :class:`.stream.WorldLatentStream`."""

    def __init__(self, folder: LatentFolder, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.folder, self.batch_size, self.seed, self.rank, self.world_size = folder, batch_size, seed, rank, world_size

    def negative_prompt_embeds(self) -> torch.Tensor:
        return self.folder.negative_prompt_embeds()

    def describe(self) -> str:
        return f"{len(self.folder)} clips in {self.folder.folder}"

    def batch(self, step: int) -> dict:
        index = batch_indices(len(self.folder), self.batch_size, step - 1, seed=self.seed, rank=self.rank,
                              world_size=self.world_size)
        return self.folder.collate([self.folder[i] for i in index])
