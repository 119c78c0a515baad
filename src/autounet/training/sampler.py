"""Patch sampling over preprocessed cases (seed 001 §2.3 "Patch Sampling").

Random cases; regions read from memory-mapped arrays (never whole volumes); a share of every
batch centred on a voxel of a randomly chosen foreground class present in the case; zero padding
where a region leaves the volume; 2D slices drawn from 3D volumes for 2D configurations; the
previous cascade stage's prediction as extra one-hot channels. Every batch is a pure function of
(seed, batch index), whatever the thread that computes it.

Sparse annotations: the ignore label is never a foreground class (the stored locations hold real
classes only); in a case with ignored voxels a patch that is not forced onto foreground is centred
on a random annotated voxel (the stored :data:`~autounet.preprocessing.locations.ANNOTATED`
rows), so that every patch holds annotated voxels.

Each sample is the *sample size* region (see :mod:`augmentation.spatial`) centred on the final
patch's position; the augmenter crops it to the patch.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autounet.errors import AutounetError
from autounet.preprocessing.locations import ANNOTATED
from autounet.preprocessing.store import case_paths
from autounet.training.augmentation.cascade import remove_random_component
from autounet.utils.loaders import load_npy
from autounet.workspace import previous_stage_path


def open_case_budget() -> int:
    """How many cases may stay memory-mapped at once: each holds two file descriptors, so stay
    well inside the process's limit (raised to its hard maximum when allowed)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        elif hard == resource.RLIM_INFINITY and soft < 65536:
            resource.setrlimit(resource.RLIMIT_NOFILE, (65536, hard))
            soft = 65536
    except (ImportError, ValueError, OSError):
        soft = 1024
    return max(16, (soft - 256) // 3)


@dataclass(frozen=True)
class SamplerSettings:
    patch_size: tuple[int, ...]  # final patch, 2 or 3 values
    sample_size: tuple[int, ...]  # region read per sample (>= patch_size, same parity)
    batch_size: int
    foreground_mode: str = "batch_fraction"  # or "probability"
    foreground_value: float = 1 / 3
    num_classes: int = 2
    previous_stage_dir: Path | None = None  # CASE_previous.npy: previous stage's class indices
    p_remove_component: float = 0.0
    max_component_fraction: float = 0.15
    stored_channels: int | None = None  # read only the first N channels of the stored image (None: all)


@dataclass
class Batch:
    image: np.ndarray  # (B, C, *sample_size) float32 (C includes previous-stage channels)
    seg: np.ndarray  # (B, 1, *sample_size) uint8 class indices
    case_ids: list[str]
    foreground: np.ndarray  # (B,) bool: sample was forced onto foreground
    index: int
    augmentation_seed: int


class PatchSampler:
    def __init__(self, folder: str | Path, case_ids: list[str], settings: SamplerSettings, seed: int = 0):
        if not case_ids:
            raise AutounetError("the sampler needs at least one case")
        if len(settings.patch_size) != len(settings.sample_size) or len(settings.patch_size) not in (2, 3):
            raise AutounetError(
                f"patch {settings.patch_size} and sample {settings.sample_size} sizes must both have 2 or 3 values"
            )
        self.folder = Path(folder)
        self.case_ids = list(case_ids)
        self.settings = settings
        self.seed = int(seed)
        self.dims = len(settings.patch_size)
        missing = [c for c in self.case_ids if not case_paths(self.folder, c)["properties"].is_file()]
        if missing:
            raise AutounetError(
                f"{self.folder}: preprocessed case(s) missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (run `autounet preprocess`)"
            )
        self._open: OrderedDict[str, tuple] = OrderedDict()
        self._budget = min(len(self.case_ids), open_case_budget())
        self._lock = threading.Lock()  # the loader's threads share the open-case cache

    def _case(self, case_id: str):
        with self._lock:
            if case_id in self._open:
                self._open.move_to_end(case_id)
                return self._open[case_id]
        paths = case_paths(self.folder, case_id)
        image = load_npy(paths["image"], mmap_mode="r")
        seg = load_npy(paths["seg"], mmap_mode="r")
        locations = load_npy(paths["locations"])
        previous = None
        if self.settings.previous_stage_dir is not None:
            path = previous_stage_path(self.settings.previous_stage_dir, case_id)
            if not path.is_file():
                raise AutounetError(
                    f"{path}: previous-stage prediction missing (train and predict the previous cascade stage first)"
                )
            previous = load_npy(path, mmap_mode="r")
            if previous.shape != seg.shape:
                raise AutounetError(f"{path}: shape {previous.shape} differs from the case's {seg.shape}")
        classes = np.unique(locations[:, 0]) if locations.size else np.zeros(0, np.int32)
        annotated = locations[locations[:, 0] == ANNOTATED, 1:] if locations.size else None
        if annotated is not None and not annotated.size:
            annotated = None
        entry = (image, seg, locations, classes[classes != ANNOTATED], previous, annotated)
        with self._lock:
            self._open[case_id] = entry
            self._open.move_to_end(case_id)
            while len(self._open) > self._budget:
                self._open.popitem(last=False)
        return entry

    def _forced(self, rng: np.random.Generator) -> np.ndarray:
        b, s = self.settings.batch_size, self.settings
        if s.foreground_mode == "probability":
            return rng.random(b) < s.foreground_value
        n = min(b, math.ceil(b * s.foreground_value - 1e-9))
        return np.arange(b) >= b - n

    def _placement(self, shape: tuple[int, ...], voxel: np.ndarray | None, rng: np.random.Generator) -> list[int]:
        """Start of the final patch in the volume (per axis; may be negative: padding)."""
        starts = []
        for axis, (n, p) in enumerate(zip(shape, self.settings.patch_size)):
            lo, hi = min(0, n - p), max(0, n - p)
            if voxel is None:
                starts.append(int(rng.integers(lo, hi + 1)))
            else:  # centred on the voxel, kept inside the volume where the patch fits
                starts.append(int(np.clip(voxel[axis] - p // 2, lo, hi)))
        return starts

    def _read(self, array: np.ndarray, lead: tuple, starts: list[int], dtype) -> np.ndarray:
        """The ``sample_size`` region at ``starts`` of ``array[lead]``, zero outside the volume.

        ``lead`` indexes the leading axes (a channel slice, a slice index); on a memory map only
        the region's bytes are read.
        """
        view = array[lead] if lead else array
        size = self.settings.sample_size
        channels, spatial = view.shape[: view.ndim - len(size)], view.shape[view.ndim - len(size) :]
        out = np.zeros((*channels, *size), dtype=dtype)
        src, dst = [], []
        for st, sz, n in zip(starts, size, spatial):
            a, b = max(st, 0), min(st + sz, n)
            if b <= a:
                return out
            src.append(slice(a, b))
            dst.append(slice(a - st, b - st))
        out[(Ellipsis, *dst)] = view[(Ellipsis, *src)]
        return out

    def batch(self, index: int) -> Batch:
        """The batch number ``index`` (deterministic for the sampler's seed)."""
        s = self.settings
        rng = np.random.default_rng([self.seed, int(index)])
        forced = self._forced(rng)
        images, segs, ids, fg = [], [], [], np.zeros(s.batch_size, bool)
        margin = [(q - p) // 2 for q, p in zip(s.sample_size, s.patch_size)]
        channels = slice(None) if s.stored_channels is None else slice(0, s.stored_channels)
        for i in range(s.batch_size):
            case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
            image, seg, locations, classes, previous, annotated = self._case(case_id)
            voxel = None
            if forced[i] and classes.size:
                k = classes[int(rng.integers(classes.size))]
                rows = np.flatnonzero(locations[:, 0] == k)
                voxel = locations[rows[int(rng.integers(rows.size))], 1:]
                fg[i] = True
            elif annotated is not None:  # sparse annotations: a random patch around annotated voxels
                voxel = annotated[int(rng.integers(annotated.shape[0]))]
            if self.dims == 2:
                z = int(voxel[0]) if voxel is not None else int(rng.integers(seg.shape[0]))
                plane = seg.shape[1:]
                starts = self._placement(plane, voxel[1:] if voxel is not None else None, rng)
                box = [st - m for st, m in zip(starts, margin)]
                img = self._read(image, (channels, z), box, np.float32)
                lab = self._read(seg, (z,), box, np.uint8)
                prev = self._read(previous, (z,), box, np.uint8) if previous is not None else None
            else:
                starts = self._placement(seg.shape, voxel, rng)
                box = [st - m for st, m in zip(starts, margin)]
                img = self._read(image, (channels,), box, np.float32)
                lab = self._read(seg, (), box, np.uint8)
                prev = self._read(previous, (), box, np.uint8) if previous is not None else None
            if prev is not None:
                onehot = np.stack([(prev == k).astype(np.float32) for k in range(1, s.num_classes)])
                onehot = remove_random_component(onehot, rng, s.p_remove_component, s.max_component_fraction)
                img = np.concatenate([img, onehot])
            images.append(img)
            segs.append(lab[None])
            ids.append(case_id)
        return Batch(
            image=np.stack(images),
            seg=np.stack(segs),
            case_ids=ids,
            foreground=fg,
            index=int(index),
            augmentation_seed=int(rng.integers(2**62)),
        )
