"""The training state under OUT/train_state: everything an exact resume needs, and nothing pickled.

The trainable weights and AdamW moments go to safetensors, the rest (optimizer hyper-parameters, scheduler,
Python/NumPy RNG, step, the run's arguments) to JSON, and every rank's torch RNG to its own file, so
dropout resumes exactly. A state is written into a sibling folder and swapped in, `progress.json` last, so
an interruption while saving leaves the previous state. `resume` refuses to continue a run with other
arguments than the ones it was started with (except those in RESUME_FREE_ARGS, which change nothing).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from safetensors.torch import load_file, save_file

from .cli import UsageError
from .runtime import Runtime, seed_everything

logger = logging.getLogger("mmgpt.training")

STATE_DIR = "train_state"
ARGS_FILE = "training_args.json"
# Arguments that may change between a run and its resumption without changing what it computes.
RESUME_FREE_ARGS = frozenset({"out", "merge", "progress", "num_workers", "save_every", "log_every"})


def prepare_out(out: Path, is_main: bool) -> None:
    """OUT is new, empty, or an unfinished/finished run of this script (resumed); never another checkpoint."""
    out = Path(out)
    if is_main:
        if out.exists() and any(out.iterdir()) and not (out / STATE_DIR).is_dir() and not (out / ARGS_FILE).is_file():
            raise UsageError(f"{out} is not empty and holds no training run to resume: choose another --out")
        out.mkdir(parents=True, exist_ok=True)


def _atomic_dir(target: Path) -> Path:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _swap_in(tmp: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(
    directory: Path,
    step: int,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler,
    rng_states: list[dict[str, Any]],
    args: dict[str, Any],
) -> None:
    """Everything an exact resume needs, in safetensors + JSON (nothing is pickled)."""
    tmp = _atomic_dir(directory)
    save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    opt_meta: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        entry = opt_meta["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
                entry[k] = "<tensor>"
            else:
                entry[k] = v
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    for r, st in enumerate(rng_states):
        rng_tensors = {"torch": st["torch"], **{f"cuda.{i}": s for i, s in enumerate(st["cuda"])}}
        save_file(rng_tensors, str(tmp / f"rng-rank{r}.safetensors"))
        (tmp / f"rng-rank{r}.json").write_text(json.dumps({"python": st["python"], "numpy": st["numpy"]}))
    # progress.json last: its presence marks a complete state.
    (tmp / "progress.json").write_text(json.dumps({"step": step, "world_size": len(rng_states), "args": args}, indent=1))
    _swap_in(tmp, directory)


def read_progress(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / "progress.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_state(
    directory: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler, rank: int, world_size: int
) -> int:
    """Restore a state written by `save_state` into rank `rank` of `world_size`; returns its step."""
    progress = read_progress(directory)
    if progress is None:
        raise FileNotFoundError(f"{directory}: no complete training state")
    weights = load_file(str(directory / "trainable.safetensors"))
    if set(weights) != set(params):
        raise ValueError(f"{directory}: trainable weights {sorted(set(weights) ^ set(params))[:5]} do not match this run")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    tensors = load_file(str(directory / "optimizer.safetensors"))
    meta = json.loads((directory / "optimizer.json").read_text())
    state = {
        int(idx): {k: tensors[f"{idx}.{k}"] if v == "<tensor>" else v for k, v in st.items()}
        for idx, st in meta["state"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(json.loads((directory / "scheduler.json").read_text()))
    if progress["world_size"] == world_size:
        rng_t = load_file(str(directory / f"rng-rank{rank}.safetensors"))
        rng_j = json.loads((directory / f"rng-rank{rank}.json").read_text())
        cuda = [rng_t[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in rng_t))]
        _set_rng_state({**rng_j, "torch": rng_t["torch"], "cuda": cuda})
    else:
        logger.warning("resuming on %d ranks a run saved on %d: dropout RNG streams are re-seeded",
                       world_size, progress["world_size"])
        seed_everything(progress["args"].get("seed", 0) + progress["step"] * 1000 + rank)
    return int(progress["step"])


def _gather_rng(rt: Runtime) -> list[dict[str, Any]]:
    mine = _rng_state()
    if not rt.distributed:
        return [mine]
    everyone: list[Any] = [None] * rt.world_size
    torch_dist.all_gather_object(everyone, mine)
    return everyone


def resume(
    out: Path, args: dict[str, Any], params: dict[str, torch.nn.Parameter], optimizer, scheduler, rt: Runtime
) -> int:
    """The step a run starts at: that of the state saved in OUT, restored into the weights, optimizer,
    scheduler and RNGs, or 0 for a new run, whose arguments are then written to OUT/training_args.json."""
    out = Path(out)
    state_dir = out / STATE_DIR
    progress = read_progress(state_dir)
    start = 0
    if progress is not None:
        changed = {k for k in set(args) | set(progress["args"]) if k not in RESUME_FREE_ARGS and args.get(k) != progress["args"].get(k)}
        if changed:
            raise UsageError(
                f"{out} holds a run with other arguments ({', '.join(sorted(changed))}); resume with the same "
                "arguments, or choose another --out"
            )
        start = load_state(state_dir, params, optimizer, scheduler, rt.rank, rt.world_size)
    elif rt.is_main:
        (out / ARGS_FILE).write_text(json.dumps(args, indent=1) + "\n")
    rt.barrier()
    return start


def checkpoint(
    out: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer, scheduler, args: dict[str, Any], rt: Runtime
) -> None:
    """Save the state after `step` to OUT/train_state: rank 0 writes it, with every rank's RNG; the ranks
    leave together, so none runs ahead of a state that is still being written."""
    rngs = _gather_rng(rt)
    if rt.is_main:
        save_state(Path(out) / STATE_DIR, step, params, optimizer, scheduler, rngs, args)
    rt.barrier()
