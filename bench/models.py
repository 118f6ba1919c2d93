"""The models the bench times: the real architectures at their real widths, random weights, no hub.

Phi-2 keeps its full width (hidden 2560, 32 heads of 80, MLP 10240, vocab 51200) and loses depth
(`layers` of its 32), so every per-layer cost is real and two copies fit in memory (transformers' and
ONNX Runtime's). The dims are written out here because the hub cannot be reached; they are the published
configs of microsoft/phi-2, openai/clip-vit-base-patch32, openai/clip-vit-large-patch14-336 and
openai/whisper-base.en.
"""

from __future__ import annotations

import torch

PHI2 = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_attention_heads=32,
            partial_rotary_factor=0.4, max_position_embeddings=2048, layer_norm_eps=1e-5,
            hidden_act="gelu_new", rope_theta=10000.0, tie_word_embeddings=False)
CLIP = {
    "b32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=32, projection_dim=512, hidden_act="quick_gelu"),
    "l14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
}
WHISPER_BASE = dict(vocab_size=51864, num_mel_bins=80, d_model=512, encoder_layers=6, decoder_layers=6,
                    encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                    decoder_ffn_dim=2048, max_source_positions=1500, max_target_positions=448,
                    decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, bos_token_id=50256,
                    begin_suppress_tokens=None, suppress_tokens=None)
# A larger init than HF's 0.02 makes random logits decisive, so greedy parity compares real choices
# rather than near-ties (as the tiny preset does); it changes no shape and no cost.
INIT_RANGE = 0.1


def phi2_width(layers: int, seed: int = 0):
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    cfg = PhiConfig(**PHI2, num_hidden_layers=layers, initializer_range=INIT_RANGE, bos_token_id=50256,
                    eos_token_id=50256, pad_token_id=50256, attn_implementation="eager")
    return PhiForCausalLM(cfg).eval()


def clip_vision(name: str, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**CLIP[name], attn_implementation="eager")).eval()


def whisper_base(seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    return WhisperForConditionalGeneration(WhisperConfig(**WHISPER_BASE, init_std=INIT_RANGE)).eval()


def speak_words(llm, tokenizer, penalty: float = 100.0) -> int:
    """Make random weights answer in whole words: every token but the space-led lowercase words that the
    tokenizer writes the same way again gets a large negative output bias.

    A follow-up turn re-sends the answer as text; a server tokenizes it again and can reuse the cached keys
    and values only where that gives the ids that were generated. A trained model's answers do (the
    trained default's, 100 of 100); random weights' byte soup does not, which would make the bench time a
    cache miss no real conversation has. Costs nothing: every id still goes through the same layers.
    Returns how many tokens stay allowed.
    """
    import re

    allowed = [
        i for i in range(len(tokenizer))
        if re.fullmatch(r" [a-z]{2,}", w := tokenizer.decode([i])) and tokenizer.encode(w, add_special_tokens=False) == [i]
    ]
    with torch.no_grad():
        llm.lm_head.bias.fill_(-penalty)
        llm.lm_head.bias[allowed] = 0.0
    return len(allowed)


def components(layers: int, vision: str = "b32", with_whisper: bool = False):
    """A project checkpoint in memory (`Components`) at Phi-2 width, for the project's own exporters."""
    from transformers import CLIPImageProcessor

    from mmgpt.checkpoint import Components
    from mmgpt.config import MMGPTConfig
    from mmgpt.model import MultimodalPhi
    from mmgpt.presets import tiny_tokenizer

    tower = clip_vision(vision)
    llm = phi2_width(layers)
    v = CLIP[vision]
    tokenizer = tiny_tokenizer()  # the bench passes token ids; the tokenizer's vocabulary costs nothing
    config = MMGPTConfig(
        preset="bench", vision_source="vision", llm_source="llm", whisper_source="whisper",
        vision_hidden_size=v["hidden_size"], llm_hidden_size=PHI2["hidden_size"], llm_vocab_size=PHI2["vocab_size"],
        num_image_tokens=(v["image_size"] // v["patch_size"]) ** 2, image_size=v["image_size"],
        max_context=PHI2["max_position_embeddings"], eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    speak_words(llm, tokenizer)
    torch.manual_seed(1)
    model = MultimodalPhi(config, tower, llm).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": v["image_size"]},
                                   crop_size={"height": v["image_size"], "width": v["image_size"]})
    whisper = whisper_base() if with_whisper else None
    return Components(config, model, tokenizer, processor, whisper, None, None)
