"""ONNX exports agree with PyTorch, record what they are, and write only into ignored places."""

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from mmgpt import names
from mmgpt.export.__main__ import main as export_main
from mmgpt.export.common import Parity, ParityError, check
from mmgpt.generation import SamplingParams, generate_ids
from mmgpt.inference import Assistant

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return Assistant.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def exported(tiny_export):
    return Assistant.from_export(tiny_export)


def test_engine_dirs_record_themselves(tiny_export, tiny_checkpoint):
    for sub, kind in [(names.VISION_DIR, "vision_encoder"), (names.LLM_DIR, "llm_decoder"), (names.WHISPER_DIR, "whisper")]:
        rec = json.loads((tiny_export / sub / names.EXPORT_CONFIG).read_text())
        assert rec["kind"] == kind
        assert rec["precision"] == "fp32"
        assert rec["source_checkpoint"] == str(tiny_checkpoint.resolve())
        assert rec["inputs"] and rec["outputs"] and rec["versions"]["onnxruntime"]
        assert rec["parity"] and all(p["max_abs_diff"] <= p["tolerance"] for p in rec["parity"])
    llm = json.loads((tiny_export / names.LLM_DIR / names.EXPORT_CONFIG).read_text())
    assert names.past_key(0) in llm["inputs"] and names.present_value(llm["num_layers"] - 1) in llm["outputs"]
    assert (tiny_export / names.LLM_DIR / names.LLM_EMBED).is_file()


def test_greedy_tokens_identical_over_40_steps_with_image(reference, exported, tiny_components):
    cfg = reference.config
    table = reference.image_embeddings(_png())
    np.testing.assert_allclose(exported.image_embeddings(_png()), table, atol=1e-4)
    ids = reference.prompt("What is in the image?", has_image=True)
    kw = dict(eos_id=-1, vocab_limit=len(reference.tokenizer), max_context=cfg.max_context)  # eos ignored: all 40 steps
    want = list(generate_ids(reference.new_decoder(), ids, table, SamplingParams(max_tokens=40), **kw))
    got = list(generate_ids(exported.new_decoder(), ids, table, SamplingParams(max_tokens=40), **kw))
    assert len(want) == 40 and got == want
    assert len(set(want)) > 3  # a real sequence, not one token repeated


def test_seeded_sampling_matches_reference(reference, exported):
    p = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    assert exported.ask("Tell me a story.", params=p).text == reference.ask("Tell me a story.", params=p).text


def test_whisper_transcript_equals_pytorch(reference, exported):
    import io

    import soundfile as sf

    from mmgpt.export.whisper import test_audio

    buf = io.BytesIO()
    sf.write(buf, np.stack([test_audio(2.5, 44100), test_audio(2.5, 44100, seed=1)], 1), 44100, format="WAV")
    want = reference.transcribe(buf.getvalue())
    assert want and exported.transcribe(buf.getvalue()) == want


def fp32_weight_matmuls(graph) -> list[str]:
    """Names of the MatMul nodes of `graph` whose weight is a 2-D fp32 initializer (none after int8 quantization)."""
    weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


@pytest.mark.parametrize("force", ["", "1"], ids=["this-cpu", "operators-forced"])
def test_int8_switch(tiny_checkpoint, tmp_path, monkeypatch, request, force):
    """INT8=1: mmgpt.MatMulInt8 where this CPU runs its kernel (or MMGPT_ORTOPS=1), else ONNX Runtime's
    dynamic quantization; either way no fp32 weight is left and the runtime opens it."""
    from mmgpt import ortops
    from mmgpt.export.__main__ import main

    monkeypatch.setenv("MMGPT_ORTOPS", force)
    ortops.fast.cache_clear()
    request.addfinalizer(ortops.fast.cache_clear)  # its answers saw this test's environment
    from mmgpt.runtime import OrtSharedKVModel, llm_model

    out = main(str(tiny_checkpoint), str(tmp_path / "q"), int8=True, only=("llm",))
    rec = json.loads((out / names.LLM_DIR / names.EXPORT_CONFIG).read_text())
    assert rec["onnx_file"] == names.LLM_INT8_ONNX and rec["precision"].startswith("int8")
    assert any(p["check"].startswith("int8 ") for p in rec["parity"])
    fp32 = (out / names.LLM_DIR / names.LLM_ONNX).stat().st_size
    assert (out / names.LLM_DIR / names.LLM_INT8_ONNX).stat().st_size < fp32
    graph = onnx.load(str(out / names.LLM_DIR / names.LLM_INT8_ONNX)).graph
    ops = {n.op_type for n in graph.node}
    if ortops.fast("int8"):
        assert "MatMulInt8" in ops  # mmgpt's operator (a C compiler and AVX512-VNNI are here)
    else:
        assert "MatMulInt8" not in ops and ("MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops), sorted(ops)
    assert not fp32_weight_matmuls(graph)  # none left in fp32
    model = llm_model(out / names.LLM_DIR)
    assert isinstance(model, OrtSharedKVModel)  # the default layout
    logits = model.decoder().prefill(np.array([1, 2, 3]), None)
    assert np.isfinite(logits).all()


def test_int8_switch_serves_an_int8_whisper(tiny_checkpoint, tmp_path):
    """`make export INT8=1` writes int8 twins of Whisper's three files, names them in the config, and the runtime
    (the served stage, `Assistant.from_export`) loads them; the fp32 files stay for comparison."""
    import onnx

    from mmgpt.export.__main__ import main
    from mmgpt.export.whisper import test_audio
    from mmgpt.preprocess import audio_features
    from mmgpt.runtime import OrtWhisper
    from mmgpt.speech import transcribe_ids

    out = main(str(tiny_checkpoint), str(tmp_path / "q"), int8=True, only=("whisper",)) / names.WHISPER_DIR
    rec = json.loads((out / names.EXPORT_CONFIG).read_text())
    assert rec["precision"].startswith("int8")
    assert (rec["encoder"], rec["decoder"], rec["decoder_with_past"]) == tuple(names.WHISPER_INT8_ONNX.values())
    assert sum(p["check"].startswith("whisper int8 transcript") for p in rec["parity"]) == 2  # judged, reported
    for fp32, int8 in names.WHISPER_INT8_ONNX.items():
        ops = {n.op_type for n in onnx.load(str(out / int8), load_external_data=False).graph.node}
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, (int8, sorted(ops))
        assert (out / fp32).is_file()
    whisper = OrtWhisper(out)
    assert whisper.files == tuple(names.WHISPER_INT8_ONNX.values())
    from transformers import WhisperFeatureExtractor

    from mmgpt.config import MMGPTConfig

    speech = MMGPTConfig.load(out.parent).speech
    feats = audio_features(test_audio(1.5), WhisperFeatureExtractor.from_pretrained(out))
    assert len(transcribe_ids(whisper, feats, speech)) > 0


def test_int8_switch_serves_an_int8_vision_encoder(tiny_checkpoint, tmp_path):
    """`make export INT8=1` writes the int8 twin of the vision encoder, names it in the config and the runtime opens
    it on a CPU; a GPU provider gets the fp32 file (TensorRT builds from it); the prompt-table rows stay close."""
    from mmgpt.runtime import OrtVision, vision_onnx_file

    out = export_main(str(tiny_checkpoint), str(tmp_path / "q"), int8=True, only=("vision",)) / names.VISION_DIR
    rec = json.loads((out / names.EXPORT_CONFIG).read_text())
    assert rec["onnx_file"] == names.VISION_INT8_ONNX and rec["precision"].startswith("int8")
    assert sum(p["check"].startswith("vision int8") for p in rec["parity"]) == 2  # judged, reported
    graph = onnx.load(str(out / names.VISION_INT8_ONNX)).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, sorted(ops)
    assert not fp32_weight_matmuls(graph)  # none left in fp32
    assert vision_onnx_file(out, ["CPUExecutionProvider"]) == names.VISION_INT8_ONNX
    assert vision_onnx_file(out, [("TensorrtExecutionProvider", {}), "CPUExecutionProvider"]) == names.VISION_ONNX
    assert vision_onnx_file(out, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == names.VISION_ONNX
    int8, fp32 = OrtVision(out), OrtVision(out, onnx_file=names.VISION_ONNX)
    assert int8.onnx_file == names.VISION_INT8_ONNX
    s = rec["image_size"]
    pixels = np.random.default_rng(0).standard_normal((2, 3, s, s)).astype(np.float32)
    want, got = fp32(pixels), int8(pixels)
    assert got.shape == want.shape and not np.array_equal(got, want)  # a different graph really ran
    assert (want * got).sum() / (np.linalg.norm(want) * np.linalg.norm(got)) > 0.99


def test_parity_failure_is_loud():
    with pytest.raises(ParityError, match="llm logits 2.000e-01 > 1e-03"):
        check([Parity("vision", 1e-7, 1e-4), Parity("llm logits", 0.2, 1e-3)])
    assert not Parity("nan", float("nan"), 1.0).ok


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_export_command_leaves_tree_clean(tiny_checkpoint, tmp_path):
    # Run from the repository root like `make export`, but into a temp dir: `make test` must never
    # overwrite a user's own artifacts/export. The default output dir is checked to be git-ignored.
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    out = tmp_path / "export"
    run = subprocess.run([sys.executable, "-m", "mmgpt.export", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[parity] llm greedy tokens x40" in run.stdout and "FAIL" not in run.stdout
    after = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    assert after == before
    assert (out / names.LLM_DIR / names.LLM_ONNX).is_file()
    default_out = inspect.signature(export_main).parameters["out"].default
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{default_out}/llm/decoder.onnx"], cwd=ROOT)
    assert ignored.returncode == 0, f"{default_out} is not git-ignored"


def test_gpu_build_says_no_gpu(tiny_export):
    import torch

    from mmgpt.export.gpu import GPUUnavailable, build_vision_trt

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(GPUUnavailable, match="needs a CUDA GPU"):
        build_vision_trt(tiny_export)


def test_vision_runs_as_a_tensorrt_engine_where_onnx_runtime_has_tensorrt(tiny_export):
    """What `export --gpu` builds is what the served vision encoder loads: ONNX Runtime's TensorRT provider
    with the engine cache beside the ONNX file and a batch 1..8 profile; CUDA and the CPU as fallbacks."""
    from mmgpt.runtime import vision_providers

    vision = tiny_export / names.VISION_DIR
    gpu = vision_providers(vision, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    (name, options), cuda, cpu = gpu
    assert (name, cuda, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert options["trt_engine_cache_path"] == str(vision / names.VISION_TRT_CACHE) and options["trt_fp16_enable"]
    size = json.loads((vision / names.EXPORT_CONFIG).read_text())["image_size"]
    assert options["trt_profile_max_shapes"] == f"{names.PIXEL_VALUES}:8x3x{size}x{size}"
    assert vision_providers(vision, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]  # this machine


def _png() -> bytes:
    import io

    from PIL import Image

    img = Image.new("RGB", (64, 48), (200, 30, 30))
    img.paste((20, 20, 220), (10, 10, 40, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_int4_switch(tiny_checkpoint, tmp_path):
    import onnx

    from mmgpt.export.__main__ import main
    from mmgpt.runtime import OrtSharedKVModel, llm_model

    out = main(str(tiny_checkpoint), str(tmp_path / "q4"), only=("llm",), int4=True)
    rec = json.loads((out / names.LLM_DIR / names.EXPORT_CONFIG).read_text())
    assert rec["onnx_file"] == names.LLM_INT4_ONNX and rec["precision"].startswith("int4")
    assert any(p["check"].startswith("int4 ") for p in rec["parity"])
    graph = onnx.load(str(out / names.LLM_DIR / names.LLM_INT4_ONNX), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops, ops  # weight-only 4-bit blocks, not a de-quantized copy
    model = llm_model(out / names.LLM_DIR)
    assert isinstance(model, OrtSharedKVModel)  # the default layout
    logits = model.decoder().prefill(np.array([1, 2, 3]), None)
    assert np.isfinite(logits).all()


def test_int8_and_int4_together_are_refused():
    from mmgpt.export.__main__ import cli

    with pytest.raises(SystemExit):
        cli(["--int8", "--int4"])


def test_trtllm_build_runs_the_documented_conversion(tmp_path):
    """The commands a GPU host would run: TensorRT-LLM's Python API for Phi (what its example's
    convert_checkpoint.py calls), run here against a stand-in `tensorrt_llm` that records the calls, since
    the real one needs a GPU; then trtllm-build over that checkpoint with the prompt table enabled."""
    from mmgpt.export.gpu import trtllm_commands

    convert, build = trtllm_commands(tmp_path / "llm", tmp_path / "trtllm", max_batch=4, max_input_len=512,
                                     max_output_len=256, python=sys.executable)
    assert "tensorrt_llm.models.phi.convert" not in " ".join(convert)
    fake = tmp_path / "fake" / "tensorrt_llm"
    (fake / "models").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "mapping.py").write_text("class Mapping:\n    def __init__(self, **kw):\n        self.kw = kw\n")
    (fake / "models" / "__init__.py").write_text(
        "import json, pathlib\n"
        "class PhiForCausalLM:\n"
        "    @classmethod\n"
        "    def from_hugging_face(cls, model_dir, dtype, mapping=None):\n"
        "        m = cls(); m.args = dict(model_dir=model_dir, dtype=dtype, mapping=mapping.kw); return m\n"
        "    def save_checkpoint(self, out_dir, save_config=True):\n"
        "        pathlib.Path(out_dir).mkdir(parents=True)\n"
        "        (pathlib.Path(out_dir) / 'config.json').write_text(json.dumps({**self.args, 'save_config': save_config}))\n")
    run = subprocess.run(convert, env={**os.environ, "PYTHONPATH": str(tmp_path / "fake")}, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    written = json.loads((tmp_path / "trtllm" / "checkpoint" / "config.json").read_text())
    assert written == {"model_dir": str(tmp_path / "llm"), "dtype": "float16", "save_config": True,
                       "mapping": {"world_size": 1, "rank": 0, "tp_size": 1, "pp_size": 1}}
    assert build[0] == "trtllm-build"
    flags = dict(zip(build[1::2], build[2::2]))
    assert flags["--checkpoint_dir"] == str(tmp_path / "trtllm" / "checkpoint")
    assert (flags["--max_batch_size"], flags["--max_input_len"], flags["--max_seq_len"]) == ("4", "512", "768")
    assert int(flags["--max_prompt_embedding_table_size"]) > 0  # image rows reach the engine as a prompt table
