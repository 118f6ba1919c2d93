"""Which samples make up optimizer step s, and the learning rate at step s.

`BatchPlan` is a pure function of (seed, step): global batch s is a slice of its epoch's seeded
permutation, and rank r of W takes every W-th sample of it. So the data position of a resumed run is just
its step, and W ranks see the same global batches as one process, which is what makes a data-parallel run
equal a single-process one.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger("mmgpt.training")


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False  # shared by every caller through the cache
    return order


@dataclass(frozen=True)
class BatchPlan:
    """Step s uses global batch s: a slice of epoch (s // steps_per_epoch)'s seeded permutation. Rank r
    takes every world_size-th sample of it, in micro-batches of `micro_batch_size`. The last batch of an
    epoch may be short; a rank may then get no micro-batch at all, and `passes` gives it a padding one."""

    num_examples: int
    global_batch_size: int
    micro_batch_size: int
    seed: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.num_examples <= 0:
            raise ValueError("no training examples")
        if self.global_batch_size <= 0 or self.micro_batch_size <= 0:
            raise ValueError("batch sizes must be positive")
        if self.global_batch_size % (self.micro_batch_size * self.world_size):
            logger.warning(
                "global_batch_size %d is not a multiple of micro_batch_size %d x %d ranks: the last "
                "micro-batch of a step is short", self.global_batch_size, self.micro_batch_size, self.world_size,
            )

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.global_batch_size)

    @property
    def accumulation_steps(self) -> int:
        return math.ceil(self.global_batch_size / (self.micro_batch_size * self.world_size))

    def _permutation(self, epoch: int) -> np.ndarray:
        return _epoch_order(self.num_examples, self.seed, epoch)

    def global_batch(self, step: int) -> np.ndarray:
        epoch, b = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[b * self.global_batch_size : (b + 1) * self.global_batch_size]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's share of global batch `step`, in micro-batches (empty when the batch is too short)."""
        mine = self.global_batch(step)[self.rank :: self.world_size].tolist()
        return [mine[i : i + self.micro_batch_size] for i in range(0, len(mine), self.micro_batch_size)]

    def passes(self, step: int) -> list[list[int]]:
        """The forward/backward passes this rank runs at `step`: its micro-batches, or, when it has none,
        one padding pass over the step's first sample. Under DDP every rank must take part in each step's
        gradient all-reduce, which runs in a backward pass; the train loop weights the padding pass 0."""
        return self.micro_batches(step) or [self.global_batch(step)[:1].tolist()]


class MicroBatchSampler:
    """The passes (micro-batches, and padding ones) of steps [start, stop) in order: a DataLoader batch_sampler."""

    def __init__(self, plan: BatchPlan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield from self.plan.passes(step)

    def __len__(self) -> int:
        return sum(len(self.plan.passes(s)) for s in range(self.start, self.stop))


class CosineWithWarmup:
    """Learning-rate factor: linear warm-up from 0, then cosine decay to 0 (HF's get_cosine_schedule_with_warmup).
    A callable object, so the scheduler's state_dict records its arguments."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
