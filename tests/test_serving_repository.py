"""Assembling the served repository: the config.pbtxt files are the contract, filled from one place."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from fake_pb_utils import model_config_from_pbtxt

from mmgpt.preprocess import load_audio
from mmgpt.serving import contract as c
from mmgpt.serving.repository import MARKER, TEMPLATES, ExportMissingError, assemble_repository

pytest_plugins = ("serving_fixtures",)


def config(repo: Path, name: str) -> dict:
    return model_config_from_pbtxt((repo / name / "config.pbtxt").read_text())


def io_table(entries: list[dict]) -> dict[str, tuple[str, list[int], bool]]:
    return {e["name"]: (e["data_type"], [int(d) for d in e["dims"]], bool(e.get("optional", False))) for e in entries}


def test_every_model_is_served(served_repo):
    assert sorted(p.name for p in served_repo.iterdir() if p.is_dir()) == sorted(c.MODELS)
    assert (served_repo / MARKER).is_file()
    for name in c.MODELS:
        assert config(served_repo, name)["name"] == name
        assert (served_repo / name / "1" / "model.py").read_text() == (TEMPLATES / name / "1" / "model.py").read_text()
        assert "${" not in (served_repo / name / "config.pbtxt").read_text()


def test_entry_point_config_is_the_contract(served_repo):
    cfg = config(served_repo, c.MULTIMODAL)
    assert cfg["max_batch_size"] == 0 and cfg["model_transaction_policy"]["decoupled"] is True
    assert io_table(cfg["input"]) == c.ENTRY_INPUTS
    assert {k: v[:2] for k, v in io_table(cfg["output"]).items()} == c.ENTRY_OUTPUTS


def test_llm_config_has_tensorrt_llms_interface(served_repo):
    cfg = config(served_repo, c.LLM)
    assert cfg["max_batch_size"] > 0 and cfg["model_transaction_policy"]["decoupled"] is True
    assert "dynamic_batching" in cfg
    want = {k: (t.replace("${prompt_embedding_table_data_type}", "TYPE_FP32"), d, o) for k, (t, d, o) in c.LLM_INPUTS.items()}
    assert io_table(cfg["input"]) == want
    assert {k: v[:2] for k, v in io_table(cfg["output"]).items()} == c.LLM_OUTPUTS
    inputs = {e["name"]: e for e in cfg["input"]}
    # TensorRT-LLM reshapes its scalar inputs to [] and lets input_ids / the table be ragged in a batch.
    assert inputs[c.INPUT_LENGTHS]["reshape"]["shape"] == [] and inputs[c.INPUT_IDS]["allow_ragged_batch"]


def test_vision_and_whisper_configs(served_repo, tiny_export):
    from mmgpt.config import MMGPTConfig

    mc = MMGPTConfig.load(tiny_export)
    vision = config(served_repo, c.VISION)
    assert vision["max_batch_size"] == 8 and "dynamic_batching" in vision
    assert io_table(vision["input"]) == {c.PIXEL_VALUES: ("TYPE_FP32", [3, mc.image_size, mc.image_size], False)}
    assert io_table(vision["output"]) == {c.IMAGE_EMBEDS: ("TYPE_FP32", [mc.num_image_tokens, mc.llm_hidden_size], False)}
    whisper = config(served_repo, c.WHISPER)
    assert io_table(whisper["input"]) == {c.AUDIO_INPUT: ("TYPE_STRING", [1], False)}
    assert io_table(whisper["output"]) == {c.TRANSCRIPT: ("TYPE_STRING", [1], False)}


def test_settings_are_filled_into_parameters(served_repo, tiny_export):
    from serving_fixtures import TEST_LIMITS

    entry = c.parameters(config(served_repo, c.MULTIMODAL))
    assert entry["export_dir"] == str(tiny_export.resolve())
    assert Path(entry["EXECUTION_ENV_PATH"]) == Path(sys.prefix)
    assert entry["llm_model_name"] == c.LLM and entry["prompt_embedding_table_data_type"] == "TYPE_FP32"
    assert int(entry["max_image_pixels"]) == TEST_LIMITS["max_image_pixels"]
    assert int(entry["max_image_bytes"]) == TEST_LIMITS["max_image_bytes"]
    from mmgpt.inference import MAX_TOKENS_LIMIT

    assert int(entry["max_tokens_limit"]) == MAX_TOKENS_LIMIT  # the same range as `mmgpt ask`
    whisper = c.parameters(config(served_repo, c.WHISPER))
    assert float(whisper["max_audio_seconds"]) == TEST_LIMITS["max_audio_seconds"]
    assert int(whisper["max_audio_bytes"]) == TEST_LIMITS["max_audio_bytes"]
    assert int(c.parameters(config(served_repo, c.LLM))["max_inflight"]) == config(served_repo, c.LLM)["max_batch_size"]


def test_warmup_samples_match_their_configs(served_repo):
    llm = config(served_repo, c.LLM)["model_warmup"][0]["inputs"]
    ids = np.fromfile(served_repo / c.LLM / "warmup" / c.INPUT_IDS, "<i4")
    assert int(llm[c.INPUT_IDS]["dims"][0]) == ids.size
    assert np.fromfile(served_repo / c.LLM / "warmup" / c.INPUT_LENGTHS, "<i4").tolist() == [ids.size]
    raw = (served_repo / c.WHISPER / "warmup" / c.AUDIO_INPUT).read_bytes()
    assert int.from_bytes(raw[:4], "little") == len(raw) - 4  # one serialised BYTES element
    assert load_audio(raw[4:]).size == 16000  # one second of silence


def test_missing_export_says_to_run_make_export(tmp_path):
    with pytest.raises(ExportMissingError, match="run `make export`"):
        assemble_repository(tmp_path / "nothing", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_reassembly_replaces_the_whole_repository(tiny_export, tmp_path):
    repo = assemble_repository(tiny_export, tmp_path / "repo")
    (repo / "stale_model").mkdir()
    again = assemble_repository(tiny_export, tmp_path / "repo", max_tokens_limit=64)
    assert again == repo and not (repo / "stale_model").exists()
    assert c.parameters(config(repo, c.MULTIMODAL))["max_tokens_limit"] == "64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging left behind


def test_a_foreign_directory_is_never_replaced(tiny_export, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not made by assemble_repository"):
        assemble_repository(tiny_export, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_unknown_or_bad_settings_fail(tiny_export, tmp_path):
    with pytest.raises(TypeError):
        assemble_repository(tiny_export, tmp_path / "r", max_image_pxels=5)
    with pytest.raises(ValueError, match="max_image_pixels"):
        assemble_repository(tiny_export, tmp_path / "r", max_image_pixels=0)
    with pytest.raises(ValueError, match="vision_cache_mb, llm_prefix_cache_mb and llm_kv_budget_mb must be >= 0"):
        assemble_repository(tiny_export, tmp_path / "r", llm_prefix_cache_mb=-1)
    with pytest.raises(ValueError, match="llm_kv_budget_mb"):
        assemble_repository(tiny_export, tmp_path / "r", llm_kv_budget_mb=-1)
    with pytest.raises(ValueError, match="max_history_messages must be >= 1"):
        assemble_repository(tiny_export, tmp_path / "r", max_history_messages=0)


def test_cache_sizes_reach_their_models(tiny_export, tmp_path):
    repo = assemble_repository(tiny_export, tmp_path / "r", llm_prefix_cache_mb=7, vision_cache_mb=0)
    assert int(c.parameters(config(repo, c.LLM))["prefix_cache_mb"]) == 7
    assert int(c.parameters(config(repo, c.VISION))["cache_mb"]) == 0


def test_memory_and_history_settings_reach_their_models(tiny_export, tmp_path):
    from mmgpt.serving.multimodal import EntrySettings

    repo = assemble_repository(tiny_export, tmp_path / "r", llm_kv_budget_mb=9, llm_queue_timeout_s=2.5, llm_max_queue=3,
                               min_answer_tokens=17, max_history_bytes=1000, max_history_messages=6)
    llm = c.parameters(config(repo, c.LLM))
    assert (llm["kv_budget_mb"], llm["queue_timeout_s"], llm["max_queue"]) == ("9", "2.5", "3")
    entry = EntrySettings.from_parameters(c.parameters(config(repo, c.MULTIMODAL)))
    assert (entry.min_answer_tokens, entry.max_history_bytes, entry.max_history_messages) == (17, 1000, 6)


def test_tensorrt_llm_can_take_the_llms_place(tiny_export, tmp_path):
    repo = assemble_repository(tiny_export, tmp_path / "r", include_llm=False, llm_model_name="tensorrt_llm",
                               prompt_embedding_table_data_type="TYPE_FP16")
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted([c.MULTIMODAL, c.VISION, c.WHISPER])
    entry = c.parameters(config(repo, c.MULTIMODAL))
    assert entry["llm_model_name"] == "tensorrt_llm" and entry["prompt_embedding_table_data_type"] == "TYPE_FP16"


def test_model_files_stay_thin():
    """STYLE: model.py parses tensors and sends responses; the logic lives in mmgpt.serving."""
    for name in c.MODELS:
        text = (TEMPLATES / name / "1" / "model.py").read_text()
        assert len(text.splitlines()) < 160, name
        assert "import triton_python_backend_utils" in text
    for module in Path(c.__file__).parent.glob("*.py"):
        assert "import triton_python_backend_utils" not in module.read_text(), module
