"""Where a training process runs, passed explicitly to whatever needs it (no global device or rank).

`Runtime` holds the rank in the data-parallel world, the device and the compute dtype: bf16 on a GPU,
fp32 on CPU, never fp16, which overflows in Phi-2's attention. Under `torchrun` / `accelerate launch`
(WORLD_SIZE > 1) `setup_runtime` joins the process group from the environment: nccl on GPUs, gloo on
CPUs. How the ranks share the gradients is the train loop's business (`loop.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as torch_dist

logger = logging.getLogger("mmgpt.training")


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank in the data-parallel world, device and compute dtype."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype  # of the frozen weights and the autocast compute; trainable weights stay fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that has it, else fp32. Never fp16: Phi-2's attention overflows in fp16."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        logger.warning("this GPU has no bf16: training in fp32 (fp16 overflows in Phi-2's attention)")
    return torch.float32


def setup_runtime() -> Runtime:
    """Join the process group when launched by torchrun / accelerate (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch_dist.is_initialized():
        # Rank 0 may spend a long time building the feature cache while the others wait at a barrier.
        torch_dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=3), device_id=device if device.type == "cuda" else None
        )
    return Runtime(rank, world_size, local_rank, device, compute_dtype(device))


def teardown(rt: Runtime) -> None:
    if rt.distributed and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
