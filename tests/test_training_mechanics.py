"""Training mechanics without a model: the CLI from main()'s signature and YAML recipes, the batch plan
(data position = step; ranks split each global batch), the schedule, and the saved training state."""

from __future__ import annotations

import functools
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmgpt.training import evaluate, finetune, pretrain
from mmgpt.training.cli import cli
from mmgpt.training.runtime import compute_dtype
from mmgpt.training.schedule import BatchPlan, CosineWithWarmup, MicroBatchSampler
from mmgpt.training.train_state import _rng_state, load_state, save_state

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "training" / "recipes"


def _spy(main):
    """A stand-in with main's signature that returns the arguments it was called with."""

    @functools.wraps(main)
    def spy(**kwargs):
        return kwargs

    return spy


def test_cli_is_the_signature_with_yaml_defaults_and_flags_winning(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1e-3\nglobal_batch_size: 64\nlora_targets: [q_proj, fc1]\nmerge: true\n")
    got = cli(_spy(finetune.main), [
        "--config", str(recipe), "--instruct", "a.json", "--images", "img", "--init", "s1", "--out", "o",
        "--global-batch-size", "32", "--no-merge", "--max-steps", "5",
    ])
    assert got["learning_rate"] == 1e-3 and isinstance(got["learning_rate"], float)  # YAML's "1e-3" is a string
    assert got["global_batch_size"] == 32 and got["merge"] is False and got["max_steps"] == 5
    assert got["lora_targets"] == ("q_proj", "fc1")
    assert got["instruct"] == Path("a.json") and got["init"] == Path("s1")


def test_cli_rejects_unknown_recipe_keys_and_missing_required(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 1.0\n")
    with pytest.raises(SystemExit):
        cli(_spy(pretrain.main), ["--config", str(recipe), "--captions", "c", "--images", "i", "--out", "o"])
    assert "unknown keys ['learning_rat']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(_spy(pretrain.main), ["--captions", "c", "--images", "i"])
    assert "missing: --out" in capsys.readouterr().err


# The stages' recipes; others in the folder (e.g. the toy world's from-scratch models) belong to other scripts.
@pytest.mark.parametrize("recipe", sorted(p.name for stage in ("pretrain", "finetune") for p in RECIPES.glob(f"{stage}_*.yaml")))
def test_recipes_load_as_the_stage_arguments(recipe):
    main = pretrain.main if recipe.startswith("pretrain") else finetune.main
    extra = ["--captions", "c"] if main is pretrain.main else ["--instruct", "j", "--init", "s1"]
    got = cli(_spy(main), ["--config", str(RECIPES / recipe), "--images", "i", "--out", "o", *extra])
    assert set(yaml.safe_load((RECIPES / recipe).read_text())) <= set(got)


def test_real_run_recipes_are_llava_1_5_defaults():
    s1 = yaml.safe_load((RECIPES / "pretrain_phi2.yaml").read_text())
    s2 = yaml.safe_load((RECIPES / "finetune_phi2.yaml").read_text())
    assert (s1["learning_rate"], s1["global_batch_size"], s1["epochs"]) == (1e-3, 256, 1)
    assert (s2["lora_r"], s2["lora_alpha"], s2["learning_rate"], s2["global_batch_size"], s2["epochs"]) == (128, 256, 2e-4, 128, 1)


@pytest.mark.parametrize("target, module, main", [
    ("pretrain PRESET=tiny CAPTIONS=c.json IMAGES=img OUT=o MAX_STEPS=3", "mmgpt.training.pretrain", pretrain.main),
    ("finetune PRESET=tiny INSTRUCT=j.json IMAGES=img INIT=s1 OUT=o MAX_STEPS=3", "mmgpt.training.finetune", finetune.main),
    ("eval CHECKPOINT=s2 CAPTIONS=c.json IMAGES=img OUT=e", "mmgpt.training.evaluate", evaluate.main),
    ("eval CHECKPOINT=s2 INSTRUCT=j.json IMAGES=img OUT=e", "mmgpt.training.evaluate", evaluate.main),
])
def test_makefile_targets_use_flags_the_scripts_accept(target, module, main):
    dry = subprocess.run(["make", "-n", "--always-make", *target.split()], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(line for line in dry.splitlines() if f"-m {module}" in line)
    argv = line.split(f"-m {module}", 1)[1].split()
    got = cli(_spy(main), argv)
    assert got["images"] == Path("img")
    if "MAX_STEPS" in target:
        assert got["max_steps"] == 3


def test_batch_plan_position_is_the_step_and_ranks_split_global_batches():
    one = BatchPlan(num_examples=23, global_batch_size=8, micro_batch_size=2, seed=3)
    assert one.steps_per_epoch == 3
    epoch0 = np.concatenate([one.global_batch(s) for s in range(3)])
    assert sorted(epoch0.tolist()) == list(range(23))  # an epoch sees every sample once (last batch short)
    assert not np.array_equal(one.global_batch(0), one.global_batch(3))  # reshuffled each epoch
    for step in range(6):
        ranks = [BatchPlan(23, 8, 2, 3, world_size=2, rank=r) for r in range(2)]
        shards = [sum(p.micro_batches(step), []) for p in ranks]
        assert sorted(shards[0] + shards[1]) == sorted(one.global_batch(step).tolist())
        assert not set(shards[0]) & set(shards[1])
        assert all(len(mb) <= 2 for p in ranks for mb in p.micro_batches(step))
    sampler = MicroBatchSampler(one, start=4, stop=6)
    assert list(sampler) == one.micro_batches(4) + one.micro_batches(5) and len(sampler) == 4 + 4


def test_a_rank_without_samples_gets_one_padding_pass():
    """9 samples, global batch 4 on 2 ranks: the last batch of an epoch has 1 sample, rank 1 none. Under DDP
    every rank must run a backward pass to join the step's all-reduce, so rank 1 runs one (weighted 0)."""
    ranks = [BatchPlan(9, 4, 1, seed=0, world_size=2, rank=r) for r in range(2)]
    short = 2
    assert [len(p.micro_batches(short)) for p in ranks] == [1, 0]
    assert ranks[0].passes(short) == ranks[0].micro_batches(short)
    assert ranks[1].passes(short) == [ranks[1].global_batch(short)[:1].tolist()]
    for step in (0, 1):  # full batches: the passes are the micro-batches
        assert all(p.passes(step) == p.micro_batches(step) for p in ranks)
    sampler = MicroBatchSampler(ranks[1], start=0, stop=3)
    assert list(sampler) == ranks[1].micro_batches(0) + ranks[1].micro_batches(1) + ranks[1].passes(2)
    assert len(sampler) == 2 + 2 + 1


def test_cosine_schedule_with_warmup():
    f = CosineWithWarmup(warmup_steps=2, total_steps=10)
    assert [f(0), f(1), f(2)] == [0.0, 0.5, 1.0]
    assert math.isclose(f(6), 0.5) and f(10) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(2, 10))


def test_training_state_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    params = dict(net.named_parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineWithWarmup(1, 5))
    for _ in range(2):
        net(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    save_state(tmp_path / "st", 2, params, opt, sched, [_rng_state()], {"seed": 0})
    expected_next = torch.rand(3)
    assert not list(tmp_path.glob("st/*.pt")) and not list(tmp_path.glob("st/*.bin"))

    torch.manual_seed(123)
    net2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, CosineWithWarmup(1, 5))
    step = load_state(tmp_path / "st", dict(net2.named_parameters()), opt2, sched2, rank=0, world_size=1)
    assert step == 2
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    x = torch.randn(2, 4)
    for n, o, s in ((net, opt, sched), (net2, opt2, sched2)):
        o.zero_grad()
        n(x).sum().backward()
        o.step()
        s.step()
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)  # optimizer moments and schedule restored exactly
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_no_fp16_anywhere():
    assert compute_dtype(torch.device("cpu")) == torch.float32
    src = "\n".join(p.read_text() for p in (ROOT / "training").glob("*.py") if p.name != "feature_cache.py")
    assert not re.search(r"torch\.float16|\.half\(\)", src)
