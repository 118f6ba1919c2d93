"""ONNX Runtime wrappers over an export directory: used by the export's own checks and by the Triton
models. They implement the same protocols as the PyTorch reference (`LLMDecoder`, `WhisperDecoder`),
so the decoding loops in generation.py / speech.py run unchanged on either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mmgpt import names


def ort_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get("MMGPT_ORT_THREADS", "0"))
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    from mmgpt import ortops

    try:
        ortops.register(opts)  # the LLM decoder's MatMulPacked / MatMulInt8; other graphs do not use them
        unbuilt = None
    except RuntimeError as e:
        unbuilt = e
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:
        if unbuilt is not None and ortops.DOMAIN in str(e):
            raise RuntimeError(f"{path} uses mmgpt's own operators (mmgpt/ortops), which could not be built: {unbuilt}") from e
        raise


def read_export_config(engine_dir: str | Path) -> dict:
    path = Path(engine_dir) / names.EXPORT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `make export` first")
    return json.loads(path.read_text())


def splice_numpy(input_ids: np.ndarray, embed_table: np.ndarray, prompt_table: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """numpy twin of model.splice_embeddings: (B, T) ids -> (B, T, D); ids >= vocab_size index the
    request's prompt table (B, P, D)."""
    is_image = input_ids >= vocab_size
    embeds = embed_table[np.where(is_image, 0, input_ids)]
    if prompt_table is None:
        if is_image.any():
            raise ValueError("prompt has image positions but no image features were given")
        return embeds
    rows = np.clip(input_ids - vocab_size, 0, prompt_table.shape[1] - 1)
    image = np.take_along_axis(prompt_table, rows[..., None], axis=1)
    return np.where(is_image[..., None], image.astype(embeds.dtype), embeds)


def vision_providers(engine_dir: Path, available: list[str], max_batch: int = 8) -> list:
    """ONNX Runtime providers for the vision encoder, best first. With onnxruntime-gpu's TensorRT provider
    (a GPU host) the encoder runs as a TensorRT fp16 engine over batches 1..max_batch, built once by
    `export --gpu` into the engine cache beside the ONNX file (or on first use) and loaded from it after;
    CUDA, then the CPU, are the fallbacks ONNX Runtime uses for whatever TensorRT cannot run."""
    out: list = []
    if "TensorrtExecutionProvider" in available:
        shape = lambda b: f"{names.PIXEL_VALUES}:{b}x3x{{s}}x{{s}}"  # noqa: E731 - filled with the image size
        size = read_export_config(engine_dir).get("image_size", 224)
        out.append(("TensorrtExecutionProvider", {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(engine_dir / names.VISION_TRT_CACHE),
            "trt_profile_min_shapes": shape(1).format(s=size),
            "trt_profile_opt_shapes": shape(max(1, max_batch // 2)).format(s=size),
            "trt_profile_max_shapes": shape(max_batch).format(s=size),
        }))
    out += [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return out


def vision_onnx_file(engine_dir: Path, providers: list) -> str:
    """The encoder file to open: the export's choice (`onnx_file`: the int8 twin after `make export INT8=1`) on a
    CPU, the fp32 file where a GPU provider runs it (TensorRT builds its fp16 engine from that file, and the int8
    graph's dynamic quantization would run on the CPU)."""
    gpu = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
    if any((p[0] if isinstance(p, tuple) else p) in gpu for p in providers):
        return names.VISION_ONNX
    record = read_export_config(engine_dir) if (engine_dir / names.EXPORT_CONFIG).is_file() else {}
    return record.get("onnx_file", names.VISION_ONNX)


class OrtVision:
    """CLIP + projector: (B, 3, S, S) -> (B, N, D); a TensorRT engine on a GPU host (`vision_providers`).
    `onnx_file` overrides the export's choice (`vision_onnx_file`)."""

    def __init__(self, engine_dir: str | Path, threads: int | None = None, onnx_file: str | None = None):
        import onnxruntime as ort

        engine_dir = Path(engine_dir)
        providers = vision_providers(engine_dir, ort.get_available_providers())
        self.onnx_file = onnx_file or vision_onnx_file(engine_dir, providers)
        self.session = ort_session(engine_dir / self.onnx_file, threads, providers)

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.session.run([names.IMAGE_EMBEDS], {names.PIXEL_VALUES: pixel_values.astype(np.float32)})[0]


class OrtLLMModel:
    """The exported Phi-2 decoder. `run` is batched (several sequences share one step: in-flight batching);
    `decoder()` gives a single-sequence `LLMDecoder` for the shared generation loop."""

    def __init__(self, engine_dir: str | Path, threads: int | None = None, onnx_file: str | None = None):
        from safetensors.numpy import load_file

        engine_dir = Path(engine_dir)
        self.export_config = read_export_config(engine_dir)
        self.session = ort_session(engine_dir / (onnx_file or self.export_config["onnx_file"]), threads)
        self.embed_table = load_file(str(engine_dir / names.LLM_EMBED))[names.EMBED_KEY]  # (V, D)
        self.vocab_size = self.embed_table.shape[0]
        self.num_layers = self.export_config["num_layers"]
        self.num_kv_heads = self.export_config["num_kv_heads"]
        self.head_dim = self.export_config["head_dim"]
        self.output_names = [names.LOGITS] + [
            n for i in range(self.num_layers) for n in (names.present_key(i), names.present_value(i))
        ]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.num_layers)]

    def embed(self, input_ids: np.ndarray, prompt_table: np.ndarray | None) -> np.ndarray:
        return splice_numpy(input_ids, self.embed_table, prompt_table, self.vocab_size)

    def run(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray]):
        """(B, T, D), (B, P+T), (B, T), 2*L x (B, H, P, hd) -> the last position's logits (B, 1, V), present
        2*L x (B, H, P+T, hd)."""
        feed = {
            names.INPUTS_EMBEDS: inputs_embeds.astype(np.float32),
            names.ATTENTION_MASK: attention_mask.astype(np.int64),
            names.POSITION_IDS: position_ids.astype(np.int64),
        }
        for i in range(self.num_layers):
            feed[names.past_key(i)] = past[2 * i]
            feed[names.past_value(i)] = past[2 * i + 1]
        out = self.session.run(self.output_names, feed)
        return out[0], out[1:]

    def decoder(self) -> OrtLLM:
        return OrtLLM(self)


class OrtLLM:
    """`LLMDecoder` for one sequence over OrtLLMModel."""

    def __init__(self, model: OrtLLMModel):
        self.model = model
        self.past: list[np.ndarray] = []
        self.length = 0

    def prefill(self, input_ids: np.ndarray, prompt_table: np.ndarray | None) -> np.ndarray:
        ids = input_ids[None]  # (1, T)
        table = None if prompt_table is None else prompt_table[None]
        t = ids.shape[1]
        logits, self.past = self.model.run(
            self.model.embed(ids, table), np.ones((1, t), np.int64), np.arange(t, dtype=np.int64)[None], self.model.empty_past(1)
        )
        self.length = t
        return logits[0, -1]

    def step(self, token_id: int) -> np.ndarray:
        embeds = self.model.embed(np.array([[token_id]], np.int64), None)
        logits, self.past = self.model.run(
            embeds, np.ones((1, self.length + 1), np.int64), np.array([[self.length]], np.int64), self.past
        )
        self.length += 1
        return logits[0, -1]


class KVCache:
    """Key/value buffers written in place by the shared-KV decoder: 2L arrays of (rows, H, capacity, hd).

    Row r's first `n` columns hold its n tokens; a step appends one column per row where the graph's
    `seqlens_k` says. Capacity grows by whole blocks (the arrays are copied once then, never per step);
    rows are slots that the caller keeps compact (`move`), so a batch of n rows is the contiguous view
    [:n], which ONNX Runtime binds without a copy.
    """

    BLOCK = 256  # capacity grows in multiples of this many tokens

    def __init__(self, layers: int, heads: int, head_dim: int, max_capacity: int):
        self.layers, self.heads, self.head_dim, self.max_capacity = layers, heads, head_dim, max_capacity
        self.arrays: list[np.ndarray] = [np.zeros((0, heads, 0, head_dim), np.float32) for _ in range(2 * layers)]

    @property
    def rows(self) -> int:
        return self.arrays[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def reserve(self, rows: int, tokens: int) -> None:
        """Room for `rows` rows of `tokens` tokens each (grown, never shrunk)."""
        if tokens > self.max_capacity:
            raise ValueError(f"{tokens} tokens exceed the cache's limit of {self.max_capacity}")
        if rows <= self.rows and tokens <= self.capacity:
            return
        new_rows = max(rows, self.rows)
        new_cap = min(self.max_capacity, max(self.capacity, -(-tokens // self.BLOCK) * self.BLOCK))
        grown = []
        for a in self.arrays:
            b = np.zeros((new_rows, self.heads, new_cap, self.head_dim), np.float32)
            b[: a.shape[0], :, : a.shape[2]] = a
            grown.append(b)
        self.arrays = grown

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` columns into row dst (compacting after a row leaves)."""
        for a in self.arrays:
            a[dst, :, :length] = a[src, :, :length]

    def read(self, row: int, length: int) -> list[np.ndarray]:
        """A copy of row's first `length` columns: 2L x (1, H, length, hd)."""
        return [a[row : row + 1, :, :length].copy() for a in self.arrays]

    def write(self, row: int, past: list[np.ndarray]) -> None:
        """Put 2L x (1, H, n, hd) into row's first n columns (a cached prefix)."""
        n = past[0].shape[2]
        self.reserve(row + 1, n)
        for a, p in zip(self.arrays, past):
            a[row, :, :n] = p[0]


class OrtSharedKVModel(OrtLLMModel):
    """The shared-KV decoder (export/llm_shared_kv.py): rows of a batch keep their own lengths and a step
    writes each row's new keys/values into `KVCache` in place (IO binding: past and present are one buffer).
    Loading and `embed` are OrtLLMModel's; `decoder()` gives a single-sequence `LLMDecoder`."""

    shared_kv = True

    def __init__(self, engine_dir: str | Path, threads: int | None = None, onnx_file: str | None = None):
        super().__init__(engine_dir, threads, onnx_file)
        self.max_context = self.export_config["max_positions"]

    def empty_past(self, batch: int):
        raise TypeError("the shared-KV decoder keeps its keys/values in a KVCache: use new_cache()")

    def new_cache(self) -> KVCache:
        return KVCache(self.num_layers, self.num_kv_heads, self.head_dim, self.max_context)

    def run(self, inputs_embeds: np.ndarray, cache: KVCache, first_row: int, lengths: np.ndarray) -> np.ndarray:
        """Rows first_row .. first_row + B - 1 of `cache`, holding `lengths` (B,) tokens, take the (B, S, D)
        new positions; their keys/values are written after each row's tokens -> logits of position S - 1
        (B, 1, V). Rows that take S > 1 new positions must all hold the same number of tokens' room."""
        from onnxruntime import OrtValue

        b, s = inputs_embeds.shape[:2]
        lengths = np.asarray(lengths, np.int64)
        cache.reserve(first_row + b, int(lengths.max()) + s)
        io = self.session.io_binding()
        io.bind_cpu_input(names.INPUTS_EMBEDS, np.ascontiguousarray(inputs_embeds, np.float32))
        io.bind_cpu_input(names.POSITION_IDS, lengths[:, None] + np.arange(s, dtype=np.int64)[None])
        seqlens = (lengths + s - 1).astype(np.int32)
        io.bind_cpu_input(names.SEQLENS_K, seqlens)
        io.bind_cpu_input(names.TOTAL_SEQUENCE_LENGTH, np.array(seqlens.max() + 1, np.int32))
        io.bind_output(names.LOGITS)
        for i in range(self.num_layers):
            for past, present, a in ((names.past_key(i), names.present_key(i), cache.arrays[2 * i]),
                                     (names.past_value(i), names.present_value(i), cache.arrays[2 * i + 1])):
                buf = OrtValue.ortvalue_from_numpy(a[first_row : first_row + b])  # a view: written in place
                io.bind_ortvalue_input(past, buf)
                io.bind_ortvalue_output(present, buf)
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    def decoder(self) -> OrtSharedLLM:
        return OrtSharedLLM(self)


class OrtSharedLLM:
    """`LLMDecoder` for one sequence over OrtSharedKVModel."""

    def __init__(self, model: OrtSharedKVModel):
        self.model = model
        self.cache = model.new_cache()
        self.length = 0

    def prefill(self, input_ids: np.ndarray, prompt_table: np.ndarray | None) -> np.ndarray:
        table = None if prompt_table is None else prompt_table[None]
        self.length = 0
        logits = self.model.run(self.model.embed(input_ids[None], table), self.cache, 0, np.zeros(1, np.int64))
        self.length = len(input_ids)
        return logits[0, -1]

    def step(self, token_id: int) -> np.ndarray:
        embeds = self.model.embed(np.array([[token_id]], np.int64), None)
        logits = self.model.run(embeds, self.cache, 0, np.array([self.length]))
        self.length += 1
        return logits[0, -1]


def llm_model(engine_dir: str | Path, threads: int | None = None, onnx_file: str | None = None):
    """The runtime for an LLM export: shared-KV or the traced decoder, as its export config says."""
    if read_export_config(engine_dir).get("kv_layout") == "shared":
        return OrtSharedKVModel(engine_dir, threads, onnx_file)
    return OrtLLMModel(engine_dir, threads, onnx_file)


class OrtWhisper:
    """`WhisperDecoder` over optimum's encoder / decoder / decoder-with-past ONNX files."""

    def __init__(self, engine_dir: str | Path, threads: int | None = None, files: tuple[str, str, str] | None = None):
        """`files`: (encoder, decoder, decoder-with-past) in engine_dir; default: those the export config names
        (the int8 ones after `make export INT8=1`), or the fp32 ones before a config is written."""
        engine_dir = Path(engine_dir)
        if files is None:
            record = read_export_config(engine_dir) if (engine_dir / names.EXPORT_CONFIG).is_file() else {}
            files = tuple(record.get(key, default) for key, default in
                          zip(("encoder", "decoder", "decoder_with_past"), names.WHISPER_FP32_ONNX))
        self.files = files
        self.encoder, self.decoder, self.decoder_past = (ort_session(engine_dir / f, threads) for f in files)
        self.present_names = [o.name for o in self.decoder.get_outputs()][1:]
        self.past_inputs = [i.name for i in self.decoder_past.get_inputs() if i.name.startswith("past_key_values")]
        self.encoder_hidden = None
        self.past: dict[str, np.ndarray] = {}

    def encode(self, input_features: np.ndarray) -> None:
        self.encoder_hidden = self.encoder.run(None, {"input_features": input_features.astype(np.float32)})[0]
        self.past = {}

    def step(self, new_ids: list[int]) -> np.ndarray:
        ids = np.array([new_ids], dtype=np.int64)
        if not self.past:
            out = self.decoder.run(None, {"input_ids": ids, "encoder_hidden_states": self.encoder_hidden})
            self.past = {n.replace("present", "past_key_values"): v for n, v in zip(self.present_names, out[1:])}
        else:
            out = self.decoder_past.run(None, {"input_ids": ids, **{n: self.past[n] for n in self.past_inputs}})
            names_out = [o.name for o in self.decoder_past.get_outputs()][1:]
            # decoder-with-past returns only the self-attention cache; the cross-attention cache is fixed
            for n, v in zip(names_out, out[1:]):
                self.past[n.replace("present", "past_key_values")] = v
        return out[0][0, -1]
