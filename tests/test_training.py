"""Both training stages end to end on the tiny preset and small files in the real formats (COCO 2014
captions, LLaVA-Instruct; 2014/2017 names mixed, one image missing): frozen weights bit-identical, loss
falls, exact resume, 2-process gloo data parallel (DDP) = one process, also when the short last batch of an
epoch leaves a rank without a sample, checkpoints that load, answer and export."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmgpt.checkpoint import load_checkpoint
from mmgpt.config import MMGPTConfig
from mmgpt.inference import Assistant
from mmgpt.training import evaluate, finetune, pretrain
from mmgpt.training.data import load_llava_instruct
from mmgpt.training.feature_cache import FeatureCache
from mmgpt.training.prepare import enable_gradient_checkpointing, vision_fingerprint
from mmgpt.training.sample_data import write_sample_datasets
from mmgpt.training.schedule import BatchPlan
from mmgpt.training.train_log import LOSS_PLOT, MetricsLog, read_metrics
from mmgpt.training.train_state import ARGS_FILE, STATE_DIR, read_progress

FAST = dict(global_batch_size=4, micro_batch_size=2, warmup_ratio=0.1, save_every=3, progress=False)
LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_sample_datasets(tmp_path_factory.mktemp("data"), n_images=4, seed=0)


@contextlib.contextmanager
def watch_training():
    """Record every parameter before and after `train` (as the stage scripts call it)."""
    record: dict = {}
    real = pretrain.train

    def spy(model, *args, **kwargs):
        def snap(trainable: bool):
            return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}

        record.update(frozen_before=snap(False), trainable_before=snap(True))
        result = real(model, *args, **kwargs)
        record.update(frozen_after=snap(False), trainable_after=snap(True), result=result)
        return result

    with pytest.MonkeyPatch.context() as mp:
        for stage in (pretrain, finetune):
            mp.setattr(stage, "train", spy)
        yield record


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1") / "out"
    with watch_training() as rec:
        pretrain.main(
            captions=data["captions_train"], images=data["images"], out=out, preset="tiny", max_steps=8,
            learning_rate=1e-2, **FAST,
        )
    return out, rec


@pytest.fixture(scope="module")
def stage2(data, stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2") / "out"
    with watch_training() as rec:
        finetune.main(
            instruct=data["instruct_train"], images=data["images"], init=stage1[0], out=out, preset="tiny",
            max_steps=8, learning_rate=1e-2, **LORA, **FAST,
        )
    return out, rec


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_trains_only_the_projector(stage1, tiny_components):
    out, rec = stage1
    assert set(rec["trainable_before"]) == {n for n, _ in tiny_components.model.named_parameters() if n.startswith("projector.")}
    assert _same(rec["frozen_before"], rec["frozen_after"])  # CLIP and Phi bit-identical in memory
    assert any(n.startswith("vision.") for n in rec["frozen_before"]) and any(n.startswith("llm.") for n in rec["frozen_before"])
    assert not any(torch.equal(rec["trainable_before"][n], rec["trainable_after"][n]) for n in rec["trainable_before"])
    saved = load_checkpoint(out, load_whisper=False)  # ... and as written: the frozen parts equal the preset's
    start = tiny_components.model
    assert _same(saved.model.vision.state_dict(), start.vision.state_dict())
    assert _same(saved.model.llm.state_dict(), start.llm.state_dict())
    assert not torch.equal(saved.model.projector[0].weight, start.projector[0].weight)


def test_stage1_output_is_a_safetensors_checkpoint_with_metrics(stage1):
    out, _ = stage1
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    cfg = MMGPTConfig.load(out)
    assert cfg.llm_adapter is None and (out / "projector.safetensors").is_file()
    for part in ("vision", "llm", "whisper", "tokenizer"):
        assert (out / part).is_dir()
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9)) and all("loss" in r for r in records)
    assert (out / LOSS_PLOT).stat().st_size > 0
    assert json.loads((out / ARGS_FILE).read_text())["max_steps"] == 8
    first, last = losses(out)[0], losses(out)[-1]
    assert last < first - 0.2, (first, last)


def test_stage2_lora_adapter_checkpoint(stage1, stage2):
    out, rec = stage2
    cfg = MMGPTConfig.load(out)
    assert cfg.llm_adapter == "llm_adapter" and (out / "llm_adapter" / "adapter_model.safetensors").is_file()
    assert rec["trainable_before"] and all("lora_" in n for n in rec["trainable_before"])
    assert _same(rec["frozen_before"], rec["frozen_after"])  # CLIP, projector, Phi's own weights
    assert any(n.startswith("projector.") for n in rec["frozen_before"])
    assert any(".base_layer." in n for n in rec["frozen_before"])
    changed = [n for n in rec["trainable_before"] if not torch.equal(rec["trainable_before"][n], rec["trainable_after"][n])]
    assert len(changed) == len(rec["trainable_before"])
    assert _same(load_file(str(out / "projector.safetensors")), load_file(str(stage1[0] / "projector.safetensors")))
    unmerged = load_checkpoint(out, load_whisper=False, merge_adapter=False)
    assert hasattr(unmerged.model.llm, "peft_config")
    base = load_checkpoint(stage1[0], load_whisper=False).model.llm.state_dict()
    merged_at_load = load_checkpoint(out, load_whisper=False).model.llm.state_dict()
    assert merged_at_load.keys() == base.keys()
    assert not torch.equal(merged_at_load["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged_at_load["model.layers.0.input_layernorm.weight"], base["model.layers.0.input_layernorm.weight"])


def test_stage2_merge_writes_the_merged_llm(data, stage1, stage2, tmp_path):
    out = tmp_path / "merged"
    shutil.copytree(stage2[0], out)
    # --merge changes no training arithmetic: on a finished run it only writes the merged LLM.
    finetune.main(instruct=data["instruct_train"], images=data["images"], init=stage1[0], out=out, preset="tiny",
                  max_steps=8, learning_rate=1e-2, merge=True, **LORA, **FAST)
    cfg = MMGPTConfig.load(out)
    assert cfg.llm_adapter is None and cfg.llm_source == "llm"
    assert losses(out) == losses(stage2[0])  # nothing retrained
    merged = load_checkpoint(out, load_whisper=False)
    adapter = load_checkpoint(stage2[0], load_whisper=False, merge_adapter=False)
    assert not hasattr(merged.model.llm, "peft_config") and hasattr(adapter.model.llm, "peft_config")
    ids = torch.tensor([[5, 6, 7, merged.config.llm_vocab_size, 8]])
    pixels = torch.randn(1, 3, merged.config.image_size, merged.config.image_size)
    with torch.no_grad():
        a = merged.model(input_ids=ids, pixel_values=pixels).logits
        b = adapter.model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_trained_checkpoints_answer(data, stage1, stage2):
    image = next(data["images"].glob("*.jpg")).read_bytes()
    for out in (stage1[0], stage2[0]):
        answer = Assistant.load(out, load_whisper=False).ask("What shape is shown?", image=image)
        assert isinstance(answer.text, str)


def test_loss_falls_when_overfitting_a_small_set(data, stage1, tmp_path):
    conversations = json.loads(data["instruct_train"].read_text())[:2]
    small = tmp_path / "two.json"
    small.write_text(json.dumps(conversations))
    out = tmp_path / "overfit"
    finetune.main(instruct=small, images=data["images"], init=stage1[0], out=out, max_steps=25, learning_rate=2e-2,
                  lora_r=8, lora_alpha=16, lora_dropout=0.0, global_batch_size=2, micro_batch_size=2, warmup_ratio=0.0,
                  save_every=100, progress=False)
    seen = losses(out)
    assert seen[-1] < 0.3 * seen[0], seen


def test_resume_reproduces_the_uninterrupted_run(data, stage1, tmp_path):
    """Crash after step 5 (state saved at 3, metrics written for 4-5), resume: every logged number and the
    final adapter are those of a run that was never interrupted. Dropout on, so the RNG must resume too;
    trained from the feature cache (stage 2's cached path)."""
    kw = dict(instruct=data["instruct_train"], images=data["images"], init=stage1[0], max_steps=8, learning_rate=1e-2,
              lora_r=4, lora_alpha=8, lora_dropout=0.2, feature_cache=tmp_path / "cache", **FAST)
    finetune.main(out=tmp_path / "straight", **kw)

    real_write = MetricsLog.write

    def crash_after_5(self, record):
        real_write(self, record)
        if record["step"] == 5:
            raise KeyboardInterrupt("simulated crash")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MetricsLog, "write", crash_after_5)
        with pytest.raises(KeyboardInterrupt):
            finetune.main(out=tmp_path / "resumed", **kw)
    assert read_progress(tmp_path / "resumed" / STATE_DIR)["step"] == 3
    assert len(losses(tmp_path / "resumed")) == 5
    finetune.main(out=tmp_path / "resumed", **kw)

    def strip(records):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]

    assert strip(read_metrics(tmp_path / "resumed")) == strip(read_metrics(tmp_path / "straight"))
    a = load_file(str(tmp_path / "straight" / "llm_adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "llm_adapter" / "adapter_model.safetensors"))
    assert _same(a, b)
    with pytest.raises(ValueError, match="other arguments"):
        finetune.main(out=tmp_path / "resumed", **{**kw, "learning_rate": 5e-3})


def test_stage1_from_the_feature_cache_matches_live(data, stage1, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "cached"
    pretrain.main(captions=data["captions_train"], images=data["images"], out=out, preset="tiny", max_steps=8,
                  learning_rate=1e-2, feature_cache=cache, **FAST)
    cfg = MMGPTConfig.load(out)
    assert len(FeatureCache(cache, cfg.num_image_tokens, cfg.vision_hidden_size, source=_source(stage1[0]))) == 4
    live, cached = losses(stage1[0]), losses(out)
    assert cached != live  # really trained from the fp16 features ...
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(live), rtol=1e-3, atol=1e-3)  # ... which are the same


def _source(ckpt: Path) -> str:
    c = load_checkpoint(ckpt, load_whisper=False)
    return vision_fingerprint(c.model, c.image_processor)


def _run(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 300) -> None:
    """Run a command to success. Output goes to a file, not a pipe, and past the timeout the launcher gets
    SIGTERM, which torchrun passes on to its ranks: ranks stuck waiting on each other in a collective would
    otherwise keep a pipe open and hold the test up for good."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"still running after {timeout} s (ranks out of step?): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("global_batch_size", [
    4,  # each rank: 2 micro-batches a step
    3,  # 4 conversations: step 0 gives rank 0 two micro-batches and rank 1 one; step 1 (the short last
        # batch of the epoch) gives rank 1 none, so it runs a zero-weight padding pass
])
def test_two_process_gloo_data_parallel_matches_one_process(data, stage1, tmp_path, global_batch_size):
    if global_batch_size == 3:
        assert len(load_llava_instruct(data["instruct_train"], data["images"])[0]) == 4
        rank1 = BatchPlan(4, 3, 1, seed=0, world_size=2, rank=1)
        assert [len(rank1.micro_batches(s)) for s in range(4)] == [1, 0, 1, 0]
    args = [
        "--instruct", str(data["instruct_train"]), "--images", str(data["images"]), "--init", str(stage1[0]),
        "--max-steps", "4", "--learning-rate", "1e-2", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
        "--train-projector", "--projector-lr", "3e-3", "--global-batch-size", str(global_batch_size),
        "--micro-batch-size", "1", "--save-every", "2", "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    _run([sys.executable, "-m", "mmgpt.training.finetune", *args, "--out", str(tmp_path / "one")], env, tmp_path / "one.log")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "mmgpt.training.finetune", *args, "--out", str(tmp_path / "two")], env, tmp_path / "two.log")
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["targets"] for r in one] == [r["targets"] for r in two]
    assert all(r["lr_projector"] / r["lr"] == pytest.approx(0.3) for r in one if r["lr"])
    torch.testing.assert_close(torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in two]), torch.tensor([r["grad_norm"] for r in one]), rtol=1e-4, atol=1e-6)
    pa = load_file(str(tmp_path / "one" / "projector.safetensors"))
    pb = load_file(str(tmp_path / "two" / "projector.safetensors"))
    assert not _same(pa, load_file(str(stage1[0] / "projector.safetensors")))  # --train-projector trained it
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-6)
    aa = load_file(str(tmp_path / "one" / "llm_adapter" / "adapter_model.safetensors"))
    ab = load_file(str(tmp_path / "two" / "llm_adapter" / "adapter_model.safetensors"))
    for k in aa:
        torch.testing.assert_close(ab[k], aa[k], rtol=1e-4, atol=1e-6)


def test_evaluate_reports_loss_perplexity_samples_and_caption_metrics(data, stage2, tmp_path):
    report = evaluate.main(checkpoint=stage2[0], images=data["images"], out=tmp_path / "eval",
                           instruct=data["instruct_val"], captions=data["captions_val"], max_new_tokens=6, progress=False)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for split in ("instruct", "captions"):
        r = saved[split]
        assert r["targets"] > 0 and r["perplexity"] == pytest.approx(torch.tensor(r["loss"]).exp().item(), rel=1e-6)
    assert 0.0 <= saved["captions"]["bleu4"] <= 1.0 and saved["captions"]["cider"] >= 0.0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples_captions.jsonl").read_text().splitlines()]
    assert len(rows) == saved["captions"]["images"] == 2 and all(r["references"] for r in rows)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples_instruct.jsonl").read_text().splitlines()]
    assert len(rows) == saved["instruct"]["conversations"] and all("prediction" in r for r in rows)


@pytest.mark.slow
def test_stage2_checkpoint_exports(stage2, tmp_path):
    from mmgpt.export.__main__ import main as export

    out = export(str(stage2[0]), str(tmp_path / "export"), only=("vision", "llm"))
    rec = json.loads((out / "llm" / "export_config.json").read_text())
    assert all(p["max_abs_diff"] <= p["tolerance"] for p in rec["parity"])


def test_gradient_checkpointing_recomputes_and_changes_nothing(data, stage1, tmp_path):
    c = load_checkpoint(stage1[0], load_whisper=False)
    c.model.requires_grad_(False)
    enable_gradient_checkpointing(c.model.llm)
    finetune.apply_lora(c.model, finetune.lora_config(4, 8, 0.0, finetune.PHI_LORA_TARGETS))
    calls = []
    c.model.llm.get_base_model().model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    c.model.train()
    c.model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
    assert len(calls) == 2  # the block ran again in the backward pass
    kw = dict(instruct=data["instruct_train"], images=data["images"], init=stage1[0], max_steps=2, learning_rate=1e-2,
              lora_r=4, lora_alpha=8, lora_dropout=0.1, **FAST)
    finetune.main(out=tmp_path / "plain", **kw)
    finetune.main(out=tmp_path / "ckpt", gradient_checkpointing=True, **kw)
    assert losses(tmp_path / "ckpt") == losses(tmp_path / "plain")
