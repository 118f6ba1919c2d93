"""`make toy` scaled down to fit the suite: the same pipeline (world, Whisper, foundation models from scratch,
the real stage 1 and stage 2, publish) on a small world with few steps. It cannot reach the gates in a few
minutes; it shows that every stage runs and teaches: losses fall, the published folder is a checkpoint
the project loads, and after stage 2 the model answers (and stops) where stage 1 alone only captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmgpt.toy import build, generate
from mmgpt.toy.evaluate import answer_in_process, stage1_view

RECIPES = {
    "foundation": {"vision_steps": 80, "vision_batch_size": 64, "vision_lr": 2e-3, "vision_extra_scenes": 1000,
                   "llm_steps": 200, "llm_batch_size": 16, "llm_extra_conversations": 500, "llm_lr": 6e-3},
    "pretrain": {"learning_rate": 5e-3, "global_batch_size": 32, "micro_batch_size": 32, "max_steps": 60,
                 "warmup_ratio": 0.05, "save_every": 30},
    "finetune": {"lora_r": 32, "lora_alpha": 64, "lora_dropout": 0.0, "train_projector": True,
                 "projector_lr": 1e-3, "learning_rate": 3e-3, "global_batch_size": 16, "micro_batch_size": 16,
                 "max_steps": 120, "warmup_ratio": 0.05, "save_every": 60},
    "whisper": {"questions": 24, "steps": 12, "batch_size": 8, "rank": 4, "lr": 3e-3},
}


@pytest.fixture(scope="module")
def retrained(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("toy-retrain")
    names = {}
    for stage, recipe in RECIPES.items():
        names[stage] = tmp / f"{stage}.yaml"
        names[stage].write_text(yaml.safe_dump(recipe))
    published = build.main(
        out=tmp / "run", publish_to=tmp / "published", train_images=300, eval_images=40, compositional_images=12,
        foundation_recipe=str(names["foundation"]), pretrain_recipe=str(names["pretrain"]),
        finetune_recipe=str(names["finetune"]), whisper_recipe=str(names["whisper"]), progress=False,
    )
    return tmp / "run", published


@pytest.mark.slow
def test_every_stage_learns(retrained):
    run, published = retrained
    record = build.read_record(published)
    assert record["world"]["train_images"] == 300
    first, last = record["foundation"]["vision_loss_first_last"]
    assert last < 0.7 * first
    first, last = record["foundation"]["llm_loss_first_last"]
    assert last < 0.5 * first
    first, last = record["whisper_adapter_loss_first_last"]
    assert last < 0.8 * first
    from mmgpt.config import MMGPTConfig

    assert MMGPTConfig.load(published).whisper_adapter == "whisper_adapter"
    adapter_config = json.loads((published / "whisper_adapter" / "adapter_config.json").read_text())
    assert not Path(adapter_config["base_model_name_or_path"]).is_absolute()  # no path of the building machine
    assert sorted(p.name for p in (published / "whisper_adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "whisper_adapt.json"]
    for stage in ("stage1", "stage2"):
        losses = [json.loads(line)["loss"] for line in (published / f"{stage}_metrics.jsonl").read_text().splitlines()]
        assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, (stage, losses[:5], losses[-5:])


@pytest.mark.slow
def test_the_published_checkpoint_answers_and_stage_2_adds_to_stage_1(retrained, tmp_path):
    from mmgpt.inference import Assistant

    run, ckpt = retrained  # the published folder is a checkpoint (Whisper aside, which is not needed here)
    rows = generate.read_eval(run / "world" / "eval.jsonl", "vqa")[:40]
    stage2 = answer_in_process(Assistant.load(ckpt, load_whisper=False), run / "world", rows, "stage 2", progress=False)
    stage1 = answer_in_process(Assistant.load(stage1_view(ckpt, tmp_path / "s1"), load_whisper=False), run / "world",
                               rows, "stage 1", progress=False)
    print(f"after stage 1: {stage1.accuracy:.3f}, after stage 2: {stage2.accuracy:.3f}")
    assert stage2.accuracy > stage1.accuracy
    # Answers are short sentences that end: the model learned to stop (eos), not to run to max_tokens.
    assert sum(len(p.split()) < 30 and p.strip().endswith(".") for p in stage2.predictions) >= 0.8 * len(rows)
