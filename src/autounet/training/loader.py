"""Background batch loading: batches are sampled in worker threads ahead of the network.

Reading regions from memory maps and NumPy copying release the GIL, so threads overlap with the
network's computation without the memory and start-up cost of processes. Batches come out in
index order and each is a pure function of (seed, index), so results do not depend on timing or
on the number of threads. Augmentation then runs on the training device (see
:class:`augmentation.pipeline.Augmenter`).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from autounet.training.sampler import Batch, PatchSampler


def default_loader_threads(device: torch.device, cores: int | None = None, local_processes: int | None = None) -> int:
    """One thread on a CPU-only machine (the network needs the cores); beside a GPU, this
    process's share of the node's cores (``LOCAL_WORLD_SIZE`` training processes share them) less
    one for the process itself, at most 8."""
    if device.type == "cpu":
        return 1
    cores = cores or os.cpu_count() or 1
    local = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(8, cores // max(1, local) - 1))


class BatchLoader:
    """Iterates batches ``start, start + stride, ...`` (``count`` of them, or forever) of ``sampler``.

    ``stride`` > 1 interleaves processes: rank ``r`` of ``n`` reads ``start = step * n + r``.
    """

    def __init__(
        self,
        sampler: PatchSampler,
        start: int = 0,
        count: int | None = None,
        threads: int = 1,
        prefetch: int = 2,
        pin_memory: bool = False,
        stride: int = 1,
    ):
        self.sampler, self.start, self.count, self.stride = sampler, int(start), count, max(1, int(stride))
        self.threads, self.prefetch, self.pin_memory = max(1, threads), max(1, prefetch), pin_memory

    def _load(self, index: int) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        batch = self.sampler.batch(index)
        image, seg = torch.from_numpy(batch.image), torch.from_numpy(batch.seg)
        if self.pin_memory:
            image, seg = image.pin_memory(), seg.pin_memory()
        return batch, image, seg

    def __iter__(self) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor]]:
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="autounet-loader") as pool:
            submitted = 0
            try:
                while True:
                    while len(pending) < self.threads + self.prefetch and (
                        self.count is None or submitted < self.count
                    ):
                        pending.append(pool.submit(self._load, self.start + submitted * self.stride))
                        submitted += 1
                    if not pending:
                        return
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()
