"""The training data of the entry point: a folder of safetensors files (no pickle).

:class:`LatentDataset` reads a folder of precomputed latents and conditions; which
condition tensors a sample holds is the family's (``data_keys``). ``prepare``
(:mod:`mfcore.adapters.prepare`) writes such a folder from prompts with the family's own
encoders; :func:`make_synthetic_data` writes a random one for tests and smoke runs.
"""

from __future__ import annotations

import glob
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from mfcore._checks import check_positive_int
from mfcore.adapters._files import check_folder
from mfcore.adapters._state import open_tensors
from mfcore.adapters.family import Synthetic, TrainingFamily, get_family

__all__ = ["LatentDataset", "make_synthetic_data"]

_FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class LatentDataset:
    """Precomputed latents and conditions in a folder of safetensors files.

    Every file holds ``N >= 1`` samples: ``latents (N, C, H, W)`` (floating point) and the
    family's condition tensors (``family.data_keys``, optionally ``family.optional_keys``),
    all with ``N`` first; every sample of a folder shares one shape and dtype per key.

    Reading keeps no file in memory: a batch reads its rows through memory-mapped
    ``safe_open`` slices, so a run's memory does not grow with the dataset.

    Args:
        folder: the folder.
        family: the family whose keys the files hold (default FLUX).

    Raises:
        FileNotFoundError: if the folder does not exist or holds no ``.safetensors`` file.
        ValueError: naming the file (and key): a folder, an empty, truncated or
            non-safetensors file, a missing key, a key with another shape or dtype than the
            folder's first file, integer latents.
    """

    def __init__(self, folder: str | os.PathLike, family: TrainingFamily | None = None) -> None:
        pattern = os.path.join(check_folder(folder, "data folder"), "*.safetensors")
        files = sorted(glob.glob(pattern))
        if not files:
            raise FileNotFoundError(f"data folder {folder} holds no .safetensors files")
        self.folder = str(folder)
        self.family = family if family is not None else get_family("flux")
        self.required = ("latents", *self.family.data_keys)
        self.optional = tuple(self.family.optional_keys)
        self.files = files
        self.index: list[tuple[int, int]] = []
        self.shapes: dict[str, tuple[int, ...]] | None = None
        self.dtypes: dict[str, str] | None = None
        for i, path in enumerate(files):
            n = self._scan(path)
            self.index.extend((i, j) for j in range(n))
        if not self.index:
            raise ValueError(f"data folder {folder} holds no samples (every file has N = 0)")

    def _scan(self, path: str) -> int:
        """``path``'s number of samples; one ``ValueError`` naming the file and every way it
        is not a sample file (a missing key, a scalar, integer or non-4-D latents, keys that
        disagree on ``N``) or, if it is one, differs from the folder's first file."""
        with open_tensors(path) as f:
            keys = set(f.keys())
            slices = {k: f.get_slice(k) for k in sorted(keys & {*self.required, *self.optional})}
            shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            dtypes = {k: s.get_dtype() for k, s in slices.items()}
        missing = [k for k in self.required if k not in keys]
        problems = [f"lacks {missing}; a sample file needs {self.required}"] if missing else []
        scalars = [k for k, s in shapes.items() if not s]
        problems += [f"{k} is a scalar; every key needs N samples first" for k in scalars]
        if "latents" in dtypes and dtypes["latents"] not in _FLOATS:
            problems.append(f"latents are {dtypes['latents']}, not floating point (VAE latents)")
        if "latents" in shapes and len(shapes["latents"]) != 4:
            problems.append(f"latents must be (N, C, H, W), got {shapes['latents']}")
        if len({s[0] for s in shapes.values() if s}) > 1:
            problems.append(f"the tensors disagree on the number of samples {shapes}")
        per_sample = {k: s[1:] for k, s in shapes.items()}
        if not problems and self.shapes is not None and self.dtypes is not None:
            # a sample file of its own: it must match the first one
            if per_sample != self.shapes:
                problems.append(
                    f"per-sample shapes {per_sample}, but {self.files[0]} has {self.shapes}: "
                    "every sample in a folder must share them"
                )
            problems += [
                f"{k} is {dtypes[k]}, but {self.files[0]} holds it as {self.dtypes.get(k)}: "
                "every file in a folder must share the dtypes"
                for k in dtypes
                if dtypes[k] != self.dtypes.get(k, dtypes[k])
            ]
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems))
        if self.shapes is None:
            self.shapes, self.dtypes = per_sample, dtypes
        return shapes["latents"][0]

    def __len__(self) -> int:
        return len(self.index)

    def fingerprint(self) -> list[list]:
        """``[name, size in bytes]`` of every data file, sorted: what a checkpoint records so
        that a resumed run can tell that the data changed."""
        return [[os.path.basename(p), os.path.getsize(p)] for p in self.files]

    def check_transformer(self, transformer: nn.Module) -> None:
        """Raise ``ValueError`` unless the data fits ``transformer``'s config."""
        assert self.shapes is not None
        self.family.check_data(self.shapes, transformer)

    def _rows(self, picked: list[int]) -> list[dict[str, Tensor]]:
        """The samples ``picked`` (dataset indices), each file opened once, mapped, not read
        whole."""
        assert self.shapes is not None
        by_file: dict[int, list[int]] = {}
        for pos, k in enumerate(picked):
            by_file.setdefault(self.index[k][0], []).append(pos)
        out: list[dict[str, Tensor]] = [{} for _ in picked]
        for i, positions in by_file.items():
            with open_tensors(self.files[i]) as f:
                for key in self.shapes:
                    try:
                        part = f.get_slice(key)
                        for pos in positions:
                            out[pos][key] = part[self.index[picked[pos]][1]]
                    except SafetensorError as err:
                        raise ValueError(f"data file {self.files[i]}: {key} ({err})") from None
        return out

    def indices(self, step: int, batch_size: int, seed: int) -> list[int]:
        """Sample indices of ``step``: consecutive slices of per-epoch permutations.

        A function of ``(step, batch_size, seed)`` only, so a resumed run sees the same batches.
        """
        n = len(self)
        out = []
        for pos in range(step * batch_size, (step + 1) * batch_size):
            epoch, k = divmod(pos, n)
            perm = torch.randperm(
                n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            )
            out.append(int(perm[k]))
        return out

    def batch(
        self,
        step: int,
        batch_size: int,
        seed: int,
        device: torch.device | str,
        rows: slice | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(latents (B, C, H, W) float32, cond)`` for ``step`` on ``device`` (floating
        condition tensors in float32, integer ones, such as token ids, unchanged).

        ``rows`` picks part of the step's batch of ``batch_size`` (a rank's share of the global
        batch, a micro-batch), so that ranks together read each step's batch once, as
        ``DistributedSampler`` shards an epoch; default: all of it."""
        picked = self.indices(step, batch_size, seed)[rows if rows is not None else slice(None)]
        return self.take(picked, device)

    def take(
        self, picked: list[int], device: torch.device | str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The samples at dataset indices ``picked``, in that order, as :meth:`batch` gives
        them (``mfcore-distill generate --data`` takes the first ones)."""
        if not picked or not all(0 <= i < len(self) for i in picked):
            raise ValueError(f"picked must be indices in [0, {len(self)}), got {picked[:4]}")
        samples = self._rows(picked)
        stacked = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        out = {
            k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype)
            for k, v in stacked.items()
        }
        return out.pop("latents"), out


def make_synthetic_data(
    folder: str | os.PathLike,
    *,
    family: str = "flux",
    num_files: int = 2,
    per_file: int = 2,
    channels: int | None = None,
    height: int = 8,
    width: int = 8,
    seq_len: int = 8,
    negatives: bool = False,
    seed: int = 0,
    **dims: int,
) -> list[str]:
    """Write a random dataset in the training format of ``family`` (tests, smoke runs).

    Args:
        folder: output folder (created).
        family: the family whose keys to write.
        num_files: files to write.
        per_file: samples per file.
        channels: latent channels (default: the family's tiny model's).
        height: latent height.
        width: latent width.
        seq_len: prompt length (text tokens, or prompt token ids).
        negatives: also write the negative prompt (for two-pass CFG teachers).
        seed: seed of the random values.
        **dims: the family's condition widths (e.g. FLUX's ``joint_attention_dim``);
            default its tiny model's.

    Returns:
        the paths written.
    """
    fam = get_family(family)
    channels = fam.tiny_dims["channels"] if channels is None else channels
    sizes = dict(num_files=num_files, per_file=per_file, channels=channels, height=height)
    sizes |= dict(width=width, seq_len=seq_len)
    unknown = sorted(set(dims) - set(fam.tiny_dims))
    if unknown:
        raise TypeError(f"unexpected size {unknown[0]!r} for {fam.label} data")
    dims = {**fam.tiny_dims, **dims, "channels": channels}
    for name, value in {**sizes, **dims}.items():
        check_positive_int(name, value)
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(num_files):
        request = Synthetic(per_file, height, width, seq_len, g, negatives, dims)
        data = fam.synthetic_sample(request)
        path = os.path.join(folder, f"samples-{i:05d}.safetensors")
        save_file(data, path)
        paths.append(path)
    return paths
