"""Mechanics shared by both training stages; nothing here knows which stage it runs.

- `cli(main)`: the typed `main(...)` of a stage script is its command line (`--config recipe.yaml` gives
  defaults from a YAML file whose keys are main's parameters; flags given on the command line win).
- `Runtime`: rank, world size, device and compute dtype, passed explicitly (bf16 on a GPU, fp32 on CPU;
  never fp16, which overflows in Phi-2's attention). Under `torchrun` / `accelerate launch` the process
  group is initialised from the environment (nccl on GPUs, gloo on CPUs).
- `BatchPlan`: which samples make up optimizer step s. A pure function of (seed, step), so the data
  position of a resumed run is just its step, and a world of W ranks sees the same global batches as one.
- `train(...)`: gradient accumulation, a cosine schedule with warm-up, gradient clipping, a training state
  saved every N steps (trainable weights, optimizer, scheduler, every rank's RNG) from which an interrupted
  run continues exactly, `metrics.jsonl`, TensorBoard when installed, tqdm, and `loss.png` at the end.

The loss of a step is the sum of token losses over the whole global batch divided by its number of
supervised tokens, counted before the step from the labels. Every micro-batch on every rank is weighted
by its share of tokens, so accumulation and data parallelism give the same update as one big batch
(HF's per-micro-batch mean would weight a short answer's tokens more than a long one's).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmgpt.template import IGNORE_INDEX

logger = logging.getLogger("mmgpt.training")

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
STATE_DIR = "train_state"
ARGS_FILE = "training_args.json"
TENSORBOARD_DIR = "tensorboard"
# Arguments that may change between a run and its resumption without changing what it computes.
RESUME_FREE_ARGS = frozenset({"out", "merge", "progress", "num_workers", "save_every", "log_every"})


# ============================================================================================ the CLI


class UsageError(ValueError):
    """A wrong combination of arguments or outputs; the command line prints it without a traceback."""


def _arg_docs(doc: str | None) -> tuple[str, dict[str, str]]:
    """(summary, {param: help}) from a Google-style docstring ("Args:" then "name: text" lines)."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary, params, current, in_args = [], {}, None, False
    for line in lines:
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            summary.append(line)
            continue
        if line and not line.startswith(" "):  # another section
            in_args = False
            continue
        stripped = line.strip()
        head, sep, rest = stripped.partition(":")
        if sep and line.startswith("    ") and not line.startswith("     ") and head.isidentifier():
            current = head
            params[current] = rest.strip()
        elif current and stripped:
            params[current] += " " + stripped
    return "\n".join(summary).strip(), params


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(type, optional) for X | None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


def _convert(tp: Any, value: Any, name: str) -> Any:
    """A YAML or command-line value as the parameter's type (PyYAML reads "1e-3" as a string)."""
    base, optional = _unwrap(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: null is not allowed")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item,) = typing.get_args(base)[:1]
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return tuple(_convert(item, v, name) for v in value)
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true/false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if base in (float, str, Path):
        return base(value)
    raise TypeError(f"{name}: unsupported parameter type {tp!r}")


def cli(main: Callable, argv: Sequence[str] | None = None) -> Any:
    """Run `main` with arguments from the command line: its signature and docstring are the CLI."""
    hints = typing.get_type_hints(main)
    sig = inspect.signature(main)
    summary, docs = _arg_docs(main.__doc__)
    module = sys.modules.get(main.__module__)
    spec = getattr(module, "__spec__", None)  # run with -m, the module is "__main__"; its spec has the real name
    parser = argparse.ArgumentParser(
        prog=f"python -m {spec.name if spec else main.__module__}", description=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML recipe: its keys are the parameters below; flags given here win")
    for name, param in sig.parameters.items():
        tp = hints[name]
        base, _ = _unwrap(tp)
        flag = "--" + name.replace("_", "-")
        help_text = docs.get(name, "")
        if param.default is inspect.Parameter.empty:
            help_text += " (required)"
        else:
            help_text += f" (default: {param.default})"
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(base) in (list, tuple):
            parser.add_argument(flag, nargs="+", **kwargs)
        else:
            parser.add_argument(flag, **kwargs)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_path = ns.pop("config", None)
    if config_path is not None:
        import yaml

        recipe = yaml.safe_load(Path(config_path).read_text()) or {}
        if not isinstance(recipe, dict):
            parser.error(f"{config_path}: a recipe is a mapping of parameter: value")
        unknown = sorted(set(recipe) - set(sig.parameters))
        if unknown:
            parser.error(f"{config_path}: unknown keys {unknown}; known: {sorted(sig.parameters)}")
        values.update(recipe)
    values.update(ns)
    missing = [n for n, p in sig.parameters.items() if p.default is inspect.Parameter.empty and n not in values]
    if missing:
        parser.error("missing: " + ", ".join("--" + n.replace("_", "-") for n in missing))
    try:
        kwargs = {n: _convert(hints[n], v, n) for n, v in values.items()}
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return main(**kwargs)
    except (UsageError, FileNotFoundError) as e:  # bad input, not a bug: the message says what to change
        parser.exit(2, f"error: {e}\n")


def jsonable(args: dict[str, Any]) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        return v

    return {k: conv(v) for k, v in args.items()}


# ====================================================================================== the runtime


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


# ================================================================================= model preparation


def freeze_except(model: torch.nn.Module, trainable: Sequence[torch.nn.Module]) -> None:
    model.requires_grad_(False)
    for m in trainable:
        m.requires_grad_(True)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def prepare_precision(model: torch.nn.Module) -> None:
    """Trainable weights in fp32 (the optimizer's master copy); frozen ones keep the compute dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def enable_gradient_checkpointing(llm) -> None:
    # Non-reentrant: the reentrant variant gives no gradients to LoRA weights when the checkpointed
    # block's inputs (frozen embeddings) do not require grad, and it conflicts with data parallelism.
    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def components_to_save(c, start: Path, prepare: Callable[[torch.nn.Module], None] | None = None):
    """What a stage writes as its checkpoint. Trained in fp32, the run's own components. Otherwise (bf16 or
    4-bit frozen weights on a GPU) the start checkpoint re-read in fp32 on the CPU, shaped by `prepare`
    (e.g. LoRA wrapping), with the trained fp32 weights put in by name: frozen weights are written exactly
    as they were read, never as rounded copies."""
    from mmgpt.checkpoint import load_checkpoint

    if all(p.dtype == torch.float32 for p in c.model.parameters()):
        return c
    fresh = load_checkpoint(start, load_whisper=False)
    if prepare is not None:
        prepare(fresh.model)
    target = dict(fresh.model.named_parameters())
    trained = trainable_parameters(c.model)
    missing = sorted(set(trained) - set(target))
    if missing:
        raise RuntimeError(f"trained weights {missing[:5]} have no place in the fp32 copy")
    with torch.no_grad():
        for name, p in trained.items():
            target[name].copy_(p.detach().float().cpu())
    fresh.model.eval()
    return fresh


def vision_fingerprint(model, image_processor) -> str:
    """What decides the cached CLIP features: tower config and weights, preprocessing, feature layer."""
    def settings(d: dict) -> str:  # without paths and versions ("_name_or_path", "transformers_version")
        kept = {k: v for k, v in d.items() if not k.startswith("_") and k != "transformers_version"}
        return json.dumps(kept, sort_keys=True, default=str)

    h = hashlib.sha256()
    h.update(settings(model.vision.config.to_dict()).encode())
    h.update(settings(image_processor.to_dict()).encode())
    h.update(str(model.config.vision_feature_layer).encode())
    with torch.no_grad():
        for name, p in model.vision.state_dict().items():
            x = p.detach().double()
            h.update(f"{name}{tuple(p.shape)}{float(x.sum()):.10e}{float(x.abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def image_source(components, examples, feature_cache: Path | None, rt: Runtime, batch_size: int = 64, progress: bool = True):
    """Live pixels, or cached CLIP features (rank 0 encodes the images not cached yet, the others wait)."""
    from .collate import CachedFeatures, LivePixels, load_pixels
    from .feature_cache import FeatureCache

    config, model = components.config, components.model
    if feature_cache is None:
        return LivePixels(components.image_processor, config.image_size)
    source = vision_fingerprint(model, components.image_processor)

    def open_cache() -> FeatureCache:
        return FeatureCache(feature_cache, config.num_image_tokens, config.vision_hidden_size, source=source)

    if rt.is_main:
        cache = open_cache()
        todo = {e.image_key: e.image_path for e in examples if e.image_key is not None}

        def encode(pixels: list[np.ndarray]) -> torch.Tensor:
            batch = torch.from_numpy(np.concatenate(pixels)).to(rt.device)
            with rt.autocast():
                return model.image_features(batch).float()

        added = cache.build(todo.items(), encode, lambda p: load_pixels(p, components.image_processor), batch_size, progress)
        logger.info("feature cache %s: %d images, %d encoded now", feature_cache, len(cache), added)
    rt.barrier()
    if not rt.is_main:
        cache = open_cache()
    return CachedFeatures(cache)


@contextlib.contextmanager
def start_checkpoint(preset: str | None, init: Path | None, seed: int, **create_kwargs) -> Iterator[Path]:
    """The checkpoint a run starts from: `init` as it is, or a fresh one made from `preset` in a temporary
    folder (deterministic for a seed, so a resumed run rebuilds the same start)."""
    from mmgpt.config import MMGPTConfig
    from mmgpt.presets import PRESET_NAMES, create

    if init is not None:
        config = MMGPTConfig.load(init)
        if preset is not None and preset != config.preset:
            raise UsageError(f"--preset {preset} but {init} holds a {config.preset!r} checkpoint")
        yield Path(init)
        return
    if preset is None:
        raise UsageError(f"give --preset ({', '.join(PRESET_NAMES)}) or --init CHECKPOINT_DIR")
    with tempfile.TemporaryDirectory(prefix="mmgpt-start-") as tmp:
        yield create(preset, Path(tmp) / "start", seed=seed, **create_kwargs)


def prepare_out(out: Path, is_main: bool) -> None:
    """OUT is new, empty, or an unfinished/finished run of this script (resumed); never another checkpoint."""
    out = Path(out)
    if is_main:
        if out.exists() and any(out.iterdir()) and not (out / STATE_DIR).is_dir() and not (out / ARGS_FILE).is_file():
            raise UsageError(f"{out} is not empty and holds no training run to resume: choose another --out")
        out.mkdir(parents=True, exist_ok=True)


# ===================================================================================== data schedule


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False  # shared by every caller through the cache
    return order


@dataclass(frozen=True)
class BatchPlan:
    """Step s uses global batch s: a slice of epoch (s // steps_per_epoch)'s seeded permutation. Rank r
    takes every world_size-th sample of it, in micro-batches of `micro_batch_size`. The last batch of an
    epoch may be short; a rank may then get no micro-batch at all (it still joins the gradient sum)."""

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
        mine = self.global_batch(step)[self.rank :: self.world_size].tolist()
        return [mine[i : i + self.micro_batch_size] for i in range(0, len(mine), self.micro_batch_size)]


class MicroBatchSampler:
    """The micro-batches of steps [start, stop) in order: a DataLoader batch_sampler."""

    def __init__(self, plan: BatchPlan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield from self.plan.micro_batches(step)

    def __len__(self) -> int:
        return sum(len(self.plan.micro_batches(s)) for s in range(self.start, self.stop))


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


# ====================================================================================== training state


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


def load_state(directory: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler, rank: int) -> int:
    """Restore a state written by `save_state`; returns its step."""
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
    if progress["world_size"] == int(os.environ.get("WORLD_SIZE", "1")):
        rng_t = load_file(str(directory / f"rng-rank{rank}.safetensors"))
        rng_j = json.loads((directory / f"rng-rank{rank}.json").read_text())
        cuda = [rng_t[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in rng_t))]
        _set_rng_state({**rng_j, "torch": rng_t["torch"], "cuda": cuda})
    else:
        logger.warning("resuming on %d ranks a run saved on %d: dropout RNG streams are re-seeded",
                       int(os.environ.get("WORLD_SIZE", "1")), progress["world_size"])
        seed_everything(progress["args"].get("seed", 0) + progress["step"] * 1000 + rank)
    return int(progress["step"])


def _gather_rng(rt: Runtime) -> list[dict[str, Any]]:
    mine = _rng_state()
    if not rt.distributed:
        return [mine]
    everyone: list[Any] = [None] * rt.world_size
    torch_dist.all_gather_object(everyone, mine)
    return everyone


# ============================================================================================ metrics


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard when installed; main rank only."""

    def __init__(self, out: Path, enabled: bool, start_step: int):
        self.path = Path(out) / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        # A resumed run drops what the interrupted one logged after its last saved state.
        kept = []
        if start_step > 0 and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed: metrics go to %s only", self.path)
        else:
            self.tb = SummaryWriter(str(Path(out) / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_losses(out: Path, title: str) -> Path | None:
    records = read_metrics(out)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) / LOSS_PLOT
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ============================================================================================= training


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


def _all_reduce_grads(params: list[torch.nn.Parameter], extra: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum the gradients (and `extra`) over ranks in one flat buffer; returns the summed `extra`."""
    if not rt.distributed:
        return extra
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [extra.reshape(-1).float().to(grads[0].device)])
    torch_dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n
    return flat[offset:].reshape(extra.shape)


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
    if rt.distributed:  # every rank starts from rank 0's weights, whatever its own initialisation did
        for p in plist:
            torch_dist.broadcast(p.data, 0)
    plan = BatchPlan(len(examples), settings.global_batch_size, settings.micro_batch_size, settings.seed, rt.world_size, rt.rank)
    total = settings.max_steps if settings.max_steps is not None else settings.epochs * plan.steps_per_epoch
    optimizer = torch.optim.AdamW(param_groups, weight_decay=settings.weight_decay)
    schedule = CosineWithWarmup(math.ceil(settings.warmup_ratio * total), total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    state_dir = out / STATE_DIR
    args = jsonable(args)
    start = 0
    progress = read_progress(state_dir)
    if progress is not None:
        changed = {k for k in set(args) | set(progress["args"]) if k not in RESUME_FREE_ARGS and args.get(k) != progress["args"].get(k)}
        if changed:
            raise UsageError(
                f"{out} holds a run with other arguments ({', '.join(sorted(changed))}); resume with the same "
                "arguments, or choose another --out"
            )
        start = load_state(state_dir, params, optimizer, scheduler, rt.rank)
        logger.info("resuming %s at step %d of %d", out, start, total)
    elif rt.is_main:
        (out / ARGS_FILE).write_text(json.dumps(args, indent=1) + "\n")
    rt.barrier()

    n_params = sum(p.numel() for p in plist)
    logger.info(
        "%s: %d examples, %d steps (%d per epoch), global batch %d = %d micro x %d accumulation x %d ranks, "
        "%s trainable parameters, %s on %s", title, len(examples), total, plan.steps_per_epoch,
        settings.global_batch_size, settings.micro_batch_size, plan.accumulation_steps, rt.world_size,
        f"{n_params:,}", str(rt.dtype).replace("torch.", ""), rt.device,
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
        optimizer.zero_grad(set_to_none=True)
        local = torch.zeros((), dtype=torch.float64)
        for _ in plan.micro_batches(step):
            batch = next(batches)
            summed, _ = loss_sum(model, batch, rt)
            (summed / targets).backward()
            local += summed.detach().double().cpu()
        total_loss = _all_reduce_grads(plist, local, rt)
        loss = float(total_loss) / targets
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
            rngs = _gather_rng(rt)
            if rt.is_main:
                save_state(state_dir, done, params, optimizer, scheduler, rngs, args)
            rt.barrier()
    bar.close()
    metrics.close()
    if rt.is_main:
        plot_losses(out, title)
    return TrainResult(total, losses)


def settings_from(args: dict[str, Any]) -> TrainSettings:
    """The TrainSettings fields picked out of a main()'s arguments."""
    return TrainSettings(**{f.name: args[f.name] for f in dataclasses.fields(TrainSettings)})
