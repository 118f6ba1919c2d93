"""Checkpoints rebuild from their saved config; weights are safetensors only."""

import json

import pytest
import torch

from mmgpt.checkpoint import load_checkpoint, save_checkpoint
from mmgpt.config import CONFIG_NAME, MMGPTConfig
from mmgpt.presets import create_tiny


def test_round_trip_same_outputs(tiny_components, tmp_path):
    out = save_checkpoint(tiny_components, tmp_path / "copy")
    again = load_checkpoint(out)
    assert again.config == tiny_components.config.replace(
        vision_source="vision", llm_source="llm", whisper_source="whisper", tokenizer_source="tokenizer"
    )
    ids = torch.tensor([[1, 2, 3, again.config.llm_vocab_size]])
    pixels = torch.randn(1, 3, again.config.image_size, again.config.image_size)
    with torch.no_grad():
        a = tiny_components.model(input_ids=ids, pixel_values=pixels).logits
        b = again.model(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(a, b)


def test_only_safetensors_weights(tiny_checkpoint):
    files = [p for p in tiny_checkpoint.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    assert weights == []
    assert (tiny_checkpoint / "projector.safetensors").is_file()
    assert sum(p.suffix == ".safetensors" for p in files) >= 4  # projector, vision, llm, whisper


def test_config_is_typed_and_strict(tiny_checkpoint, tmp_path):
    cfg = MMGPTConfig.load(tiny_checkpoint)
    assert cfg.vision_feature_layer == -2 and cfg.projector_type in ("linear", "mlp2x_gelu")
    d = json.loads((tiny_checkpoint / CONFIG_NAME).read_text())
    d["surprise"] = 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(d))
    with pytest.raises(ValueError, match="unknown keys"):
        MMGPTConfig.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="mmgpt_config.json"):
        MMGPTConfig.load(tmp_path / "nowhere")


def test_linear_projector_preset_round_trip(tmp_path):
    ckpt = create_tiny(tmp_path / "lin", projector_type="linear")
    c = load_checkpoint(ckpt, load_whisper=False)
    assert c.config.projector_type == "linear"
    assert isinstance(c.model.projector, torch.nn.Linear)


def test_saving_without_loaded_whisper_keeps_it(tiny_checkpoint, tmp_path):
    c = load_checkpoint(tiny_checkpoint, load_whisper=False)
    out = save_checkpoint(c, tmp_path / "nowhisper")
    again = load_checkpoint(out)
    assert again.whisper is not None and again.config.whisper_source == "whisper"


def test_a_whisper_adapter_is_merged_on_load_and_survives_saving(tiny_checkpoint, tmp_path):
    import shutil

    from peft import LoraConfig, get_peft_model

    from mmgpt.checkpoint import point_whisper

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    plain = load_checkpoint(ckpt).whisper
    torch.manual_seed(0)
    # A random adapter (LoRA's B starts at zero, which would change nothing): what it does must show.
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapted = get_peft_model(load_checkpoint(ckpt).whisper, lora)
    adapted.save_pretrained(ckpt / "whisper_adapter", safe_serialization=True)
    want = adapted.merge_and_unload().state_dict()
    MMGPTConfig.load(ckpt).replace(whisper_adapter="whisper_adapter").save(ckpt)

    loaded = load_checkpoint(ckpt).whisper
    changed = [k for k, v in loaded.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, want[k])

    # Saved after loading: the merged weights, no adapter left to apply twice.
    merged = save_checkpoint(load_checkpoint(ckpt), tmp_path / "merged")
    assert MMGPTConfig.load(merged).whisper_adapter is None and not (merged / "whisper_adapter").exists()
    for k, v in load_checkpoint(merged).whisper.state_dict().items():
        torch.testing.assert_close(v, want[k])
    # Saved without loading Whisper: base and adapter copied as they are.
    kept = save_checkpoint(load_checkpoint(ckpt, load_whisper=False), tmp_path / "kept")
    assert MMGPTConfig.load(kept).whisper_adapter == "whisper_adapter"
    for k, v in load_checkpoint(kept).whisper.state_dict().items():
        torch.testing.assert_close(v, want[k])
    # Pointed at another Whisper, the adapter (trained for this one) is dropped; the same Whisper keeps it.
    assert point_whisper(ckpt, whisper="whisper").whisper_adapter == "whisper_adapter"
    assert point_whisper(ckpt, whisper=str(tmp_path / "merged" / "whisper")).whisper_adapter is None
