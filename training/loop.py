"""The optimizer loop both stages run: `train(...)`.

Gradient accumulation, data parallelism on torch's DistributedDataParallel, a cosine schedule with
warm-up, gradient clipping, the training state saved every N steps (an interrupted run continues
exactly), metrics, tqdm, and the loss curve at the end.

The loss of a step is the sum of token losses over the whole global batch divided by its number of
supervised tokens, counted before the step from the labels. Every micro-batch on every rank is weighted by
its share of tokens, so accumulation and data parallelism give the same update as one big batch (HF's
per-micro-batch mean would weight a short answer's tokens more than a long one's).

Under DDP each rank runs its micro-batches of the step; only the last backward pass synchronises
(`no_sync` on the others), and DDP all-reduces the accumulated gradients in buckets while that pass is
still running. DDP averages over ranks where the loss above sums, so each rank's loss is scaled by the
world size. A rank that the short last batch of an epoch leaves without a micro-batch runs a padding pass
weighted 0 (`BatchPlan.passes`): the all-reduce happens in a backward pass, and every rank must join it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from mmgpt.template import IGNORE_INDEX

from .cli import jsonable
from .prepare import trainable_parameters
from .runtime import Runtime
from .schedule import BatchPlan, CosineWithWarmup, MicroBatchSampler
from .train_log import MetricsLog, plot_losses
from .train_state import checkpoint, resume

logger = logging.getLogger("mmgpt.training")


@dataclass(frozen=True)
class TrainSettings:
    """The hyper-parameters both stages share (each stage's main() exposes them as flags)."""

    out: Path
    global_batch_size: int
    micro_batch_size: int
    epochs: int
    max_steps: int | None
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    save_every: int
    log_every: int
    seed: int
    num_workers: int
    progress: bool


def settings_from(args: dict[str, Any]) -> TrainSettings:
    """The TrainSettings fields picked out of a main()'s arguments."""
    return TrainSettings(**{f.name: args[f.name] for f in dataclasses.fields(TrainSettings)})


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # the steps run by this process (a resumed run: only those after the resume)


def loss_sum(model, batch: dict[str, torch.Tensor], rt: Runtime) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the supervised positions of a batch, and their count."""
    batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
    labels = batch.pop("labels")
    with rt.autocast():
        logits = model(**batch).logits  # (B, T, V)
    target = labels[:, 1:]  # position t predicts token t + 1
    keep = target != IGNORE_INDEX
    picked = logits[:, :-1][keep].float()  # (K, V): only supervised rows go through the fp32 softmax
    return F.cross_entropy(picked, target[keep], reduction="sum"), int(keep.sum())


def data_parallel(model: torch.nn.Module, params: list[torch.nn.Parameter], rt: Runtime) -> torch.nn.Module:
    """The model as the train loop calls it: wrapped in DDP when there are several ranks, else itself."""
    if not rt.distributed:
        return model
    # Every rank starts from rank 0's trainable weights, whatever its own initialisation (LoRA) did. Only
    # those: DDP's own start-up sync (init_sync) would broadcast every frozen weight of the LLM as well.
    for p in params:
        torch_dist.broadcast(p.data, 0)
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
        init_sync=False,
        # The buffers (rotary tables, position ids) are equal on every rank and never change; syncing them
        # would be a collective in every forward, and ranks run different numbers of forwards in a short step.
        forward_sync_buffers=False,
        # Every trainable weight is in every forward: the projector (the collator gives text-only samples a
        # blank image row) and LoRA in every block. Were one missing, DDP would stop with an error, not
        # train on stale gradients.
        find_unused_parameters=False,
        gradient_as_bucket_view=True,  # no second copy of the gradients in the buckets
    )


def train(
    model: torch.nn.Module,
    param_groups: list[dict[str, Any]],
    examples: Sequence,
    collator,
    settings: TrainSettings,
    rt: Runtime,
    args: dict[str, Any],
    title: str,
) -> TrainResult:
    """Run the optimizer steps not done yet (resuming from OUT/train_state when it is there)."""
    out = Path(settings.out)
    params = trainable_parameters(model)
    plist = list(params.values())
    if not plist:
        raise ValueError("nothing to train: no parameter requires grad")
    plan = BatchPlan(len(examples), settings.global_batch_size, settings.micro_batch_size, settings.seed, rt.world_size, rt.rank)
    total = settings.max_steps if settings.max_steps is not None else settings.epochs * plan.steps_per_epoch
    optimizer = torch.optim.AdamW(param_groups, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, CosineWithWarmup(math.ceil(settings.warmup_ratio * total), total))
    net = data_parallel(model, plist, rt)
    args = jsonable(args)
    start = resume(out, args, params, optimizer, scheduler, rt)
    if start:
        logger.info("resuming %s at step %d of %d", out, start, total)

    logger.info(
        "%s: %d examples, %d steps (%d per epoch), global batch %d = %d micro x %d accumulation x %d ranks, "
        "%s trainable parameters, %s on %s", title, len(examples), total, plan.steps_per_epoch,
        settings.global_batch_size, settings.micro_batch_size, plan.accumulation_steps, rt.world_size,
        f"{sum(p.numel() for p in plist):,}", str(rt.dtype).replace("torch.", ""), rt.device,
    )
    metrics = MetricsLog(out, rt.is_main, start)
    loader = torch.utils.data.DataLoader(
        list(examples),
        batch_sampler=MicroBatchSampler(plan, start, total),
        collate_fn=collator,
        num_workers=settings.num_workers,
        pin_memory=rt.device.type == "cuda",
        # Its own generator: creating the loader must not draw from the global RNG a resume restores.
        generator=torch.Generator().manual_seed(settings.seed),
    )
    batches = iter(loader)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc=title, unit="step", disable=not (settings.progress and rt.is_main))
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(start, total):
        targets = sum(examples[i].num_targets for i in plan.global_batch(step))
        # DDP averages the gradients over the ranks; the step's loss is their sum, hence world_size.
        weight = rt.world_size / targets if plan.micro_batches(step) else 0.0  # 0: a padding pass
        optimizer.zero_grad(set_to_none=True)
        local = torch.zeros((), dtype=torch.float64, device=rt.device)
        passes = len(plan.passes(step))
        for i in range(passes):
            batch = next(batches)
            accumulate_only = net is not model and i < passes - 1  # gradients are all-reduced in the last pass
            with net.no_sync() if accumulate_only else contextlib.nullcontext():
                summed, _ = loss_sum(net, batch, rt)
                (summed * weight).backward()
            if weight:
                local += summed.detach().double()
        if rt.distributed:
            torch_dist.all_reduce(local)
        loss = float(local) / targets
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step + 1}: lower the learning rate or check the data")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(plist, settings.max_grad_norm))
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
        done = step + 1
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if done % settings.log_every == 0 or done == total:
            metrics.write({
                "step": done, "loss": loss, "lr": lrs[0], **({"lr_projector": lrs[1]} if len(lrs) > 1 else {}),
                "grad_norm": grad_norm, "targets": targets, "epoch": step // plan.steps_per_epoch,
                "elapsed_s": round(time.perf_counter() - t0, 3),
            })
        if done % settings.save_every == 0 or done == total:
            checkpoint(out, done, params, optimizer, scheduler, args, rt)
    bar.close()
    metrics.close()
    if rt.is_main:
        plot_losses(out, title)
    return TrainResult(total, losses)
