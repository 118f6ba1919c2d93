"""Phi-2 -> ONNX decoder with a KV cache, taking inputs_embeds (so image rows can be spliced in by the
server) and returning the last position's logits + present keys/values; the token embedding table is
saved beside it.

Why only the last position's logits: decoding reads nothing else, and at Phi-2's vocabulary the LM head
over a whole prompt is most of a prefill's cost after the layers (113 prompt positions x 2560 x 51,200
multiply-adds, and 23 MB of logits per row returned). Rows are left-padded, so the last position is real
for every row.

Why a 4D mask built here: transformers' own mask helpers (vmap, fixed lengths) do not trace into a graph
that generalises across lengths; an additive causal+padding mask made from tensor ops does, and it
lets one graph serve prefill (P = 0) and decode (T = 1) for any batch with left padding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mmgpt import names
from mmgpt.checkpoint import Components
from mmgpt.export.common import Parity, check, max_diff, write_export_config
from mmgpt.generation import SamplingParams, generate_ids

TOLERANCE = 1e-3  # logits, fp32
GREEDY_STEPS = 40


class DecoderForExport(nn.Module):
    def __init__(self, llm):
        super().__init__()
        self.llm = llm

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        t = inputs_embeds.shape[1]
        total = attention_mask.shape[1]  # P + T
        q_pos = torch.arange(t, device=inputs_embeds.device) + (total - t)  # (T,) absolute query slots
        k_pos = torch.arange(total, device=inputs_embeds.device)  # (P + T,)
        blocked = (k_pos[None, :] > q_pos[:, None])[None, None] | (attention_mask[:, None, None, :] == 0)  # (B, 1, T, P+T)
        mask = blocked.to(inputs_embeds.dtype) * torch.finfo(inputs_embeds.dtype).min
        cache = DynamicCache()
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def llm_dims(llm) -> tuple[int, int, int]:
    cfg = llm.config
    heads = cfg.num_key_value_heads or cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, cfg.hidden_size // cfg.num_attention_heads


def torch_run(wrapper: DecoderForExport, embeds, mask, pos, past):
    with torch.no_grad():
        out = wrapper(torch.from_numpy(embeds), torch.from_numpy(mask), torch.from_numpy(pos), *[torch.from_numpy(p) for p in past])
    return out[0].numpy(), [o.numpy() for o in out[1:]]


KV_LAYOUTS = ("shared", "concat")


def export_llm(c: Components, out_dir: Path, source: str, *, int8: bool = False, int4: bool = False,
               opset: int = 17, kv: str = "shared") -> list[Parity]:
    """The fp32 decoder (checked against PyTorch), plus the int8 and/or 4-bit one (judged and reported); the
    export config names the last one written as the graph to serve. `kv` "shared" (the default) writes the
    decoder whose KV cache is written in place (export/llm_shared_kv.py); "concat" the one traced below."""
    from safetensors.numpy import save_file

    from mmgpt.runtime import OrtLLMModel

    if kv not in KV_LAYOUTS:
        raise ValueError(f"kv layout {kv!r}: one of {', '.join(KV_LAYOUTS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    llm = c.model.llm.eval()
    layers, heads, hd = llm_dims(llm)
    d = llm.config.hidden_size
    if kv == "shared":
        return _export_shared(c, out_dir, source, int8=int8, int4=int4, opset=opset)
    wrapper = DecoderForExport(llm).eval()
    input_names = [names.INPUTS_EMBEDS, names.ATTENTION_MASK, names.POSITION_IDS]
    output_names = [names.LOGITS]
    dynamic = {
        names.INPUTS_EMBEDS: {0: "batch", 1: "seq"},
        names.ATTENTION_MASK: {0: "batch", 1: "total_seq"},
        names.POSITION_IDS: {0: "batch", 1: "seq"},
        names.LOGITS: {0: "batch"},
    }
    for i in range(layers):
        for n in (names.past_key(i), names.past_value(i)):
            input_names.append(n)
            dynamic[n] = {0: "batch", 2: "past_seq"}
        for n in (names.present_key(i), names.present_value(i)):
            output_names.append(n)
            dynamic[n] = {0: "batch", 2: "total_seq"}
    b, p, t = 2, 3, 4
    example = (
        torch.randn(b, t, d), torch.ones(b, p + t, dtype=torch.long), torch.arange(p, p + t).repeat(b, 1),
        *[torch.randn(b, heads, p, hd) for _ in range(2 * layers)],
    )
    path = out_dir / names.LLM_ONNX
    with torch.no_grad():
        torch.onnx.export(wrapper, example, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    embed = llm.get_input_embeddings().weight.detach().float().cpu().numpy()
    save_file({names.EMBED_KEY: embed}, str(out_dir / names.LLM_EMBED))
    write_export_config(  # dims first, so OrtLLMModel can open the graph; rewritten with parity below
        out_dir, kind="llm_decoder", precision="fp32", source=source, inputs={}, outputs={}, parity=[],
        onnx_file=names.LLM_ONNX, num_layers=layers, num_kv_heads=heads, head_dim=hd, hidden_size=d,
        vocab_size=embed.shape[0],
    )
    results, onnx_file, precision = _checked(
        c, out_dir, path, lambda f: OrtLLMModel(out_dir, onnx_file=f),
        lambda m, tol: _logit_checks(wrapper, m, layers, heads, hd, d, tol), int8=int8, int4=int4)
    io = {
        names.INPUTS_EMBEDS: {"dtype": "FP32", "shape": ["batch", "seq", d]},
        names.ATTENTION_MASK: {"dtype": "INT64", "shape": ["batch", "past_seq + seq"]},
        names.POSITION_IDS: {"dtype": "INT64", "shape": ["batch", "seq"]},
        **{n: {"dtype": "FP32", "shape": ["batch", heads, "past_seq", hd]} for n in input_names[3:]},
    }
    outs = {
        names.LOGITS: {"dtype": "FP32", "shape": ["batch", 1, embed.shape[0]]},  # the last position only
        **{n: {"dtype": "FP32", "shape": ["batch", heads, "past_seq + seq", hd]} for n in output_names[1:]},
    }
    write_export_config(
        out_dir, kind="llm_decoder", precision=precision, source=source, inputs=io, outputs=outs, parity=results,
        onnx_file=onnx_file, fp32_onnx_file=names.LLM_ONNX, num_layers=layers, num_kv_heads=heads, head_dim=hd,
        hidden_size=d, vocab_size=embed.shape[0], embedding_table=names.LLM_EMBED,
    )
    return results


def _export_shared(c: Components, out_dir: Path, source: str, *, int8: bool, int4: bool, opset: int) -> list[Parity]:
    from safetensors.numpy import save_file

    from mmgpt.runtime import OrtSharedKVModel

    from .llm_shared_kv import build_shared_kv_decoder

    llm = c.model.llm.eval()
    layers, heads, hd = llm_dims(llm)
    d = llm.config.hidden_size
    path = build_shared_kv_decoder(llm, out_dir / names.LLM_ONNX, opset)
    embed = llm.get_input_embeddings().weight.detach().float().cpu().numpy()
    save_file({names.EMBED_KEY: embed}, str(out_dir / names.LLM_EMBED))
    dims = dict(num_layers=layers, num_kv_heads=heads, head_dim=hd, hidden_size=d, vocab_size=embed.shape[0],
                kv_layout="shared", max_positions=llm.config.max_position_embeddings)
    write_export_config(out_dir, kind="llm_decoder", precision="fp32", source=source, inputs={}, outputs={},
                        parity=[], onnx_file=names.LLM_ONNX, **dims)
    results, onnx_file, precision = _checked(
        c, out_dir, path, lambda f: OrtSharedKVModel(out_dir, onnx_file=f),
        lambda m, tol: _shared_logit_checks(llm, m, tol), int8=int8, int4=int4)
    cache = {"dtype": "FP32", "shape": ["batch", heads, "capacity", hd]}
    io = {
        names.INPUTS_EMBEDS: {"dtype": "FP32", "shape": ["batch", "seq", d]},
        names.POSITION_IDS: {"dtype": "INT64", "shape": ["batch", "seq"]},
        names.SEQLENS_K: {"dtype": "INT32", "shape": ["batch"]},
        names.TOTAL_SEQUENCE_LENGTH: {"dtype": "INT32", "shape": []},
        **{n: cache for i in range(layers) for n in (names.past_key(i), names.past_value(i))},
    }
    outs = {
        names.LOGITS: {"dtype": "FP32", "shape": ["batch", 1, embed.shape[0]]},
        **{n: cache for i in range(layers) for n in (names.present_key(i), names.present_value(i))},
    }
    write_export_config(out_dir, kind="llm_decoder", precision=precision, source=source, inputs=io, outputs=outs,
                        parity=results, onnx_file=onnx_file, fp32_onnx_file=names.LLM_ONNX,
                        embedding_table=names.LLM_EMBED, **dims)
    return results


def _checked(c: Components, out_dir: Path, fp32_path: Path, open_model: Callable, logit_checks: Callable, *,
             int8: bool, int4: bool) -> tuple[list[Parity], str, str]:
    """Check the fp32 graph against PyTorch (enforced), then write and report the int8 / 4-bit ones (judged,
    not enforced) -> (parity results, the graph to serve, its precision)."""
    from mmgpt import ortops
    from mmgpt.inference import TorchLLM

    if ortops.fast("fp32"):  # the checks below then hold for the graph that is served
        pack_fp32_matmuls(fp32_path)
    fp32 = open_model(names.LLM_ONNX)
    results = logit_checks(fp32, TOLERANCE)
    results.append(_greedy_check(c, TorchLLM(c.model), fp32))
    check(results)
    onnx_file, precision = names.LLM_ONNX, "fp32"
    for kind, wanted in (("int8", int8), ("int4", int4)):
        if not wanted:
            continue
        onnx_file, precision = quantize_llm(fp32_path, out_dir, kind)
        q = open_model(onnx_file)
        report = logit_checks(q, float("inf"))
        report.append(_greedy_check(c, TorchLLM(c.model), q, strict=False))
        for r in report:
            r.name = f"{kind} " + r.name
            print(r.line(), flush=True)
        results += report
    return results, onnx_file, precision


def _shared_logit_checks(llm, model, tolerance) -> list[Parity]:
    """The shared-KV decoder against transformers: rows prefilled alone (one in two chunks, as after a cached
    prefix), then batched steps with rows of different lengths, keys/values written in place."""
    rng = np.random.default_rng(0)
    d = llm.config.hidden_size
    seqs = [rng.standard_normal((n, d)).astype(np.float32) for n in (7, 4, 10)]
    cache = model.new_cache()

    def reference(embeds: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return llm(inputs_embeds=torch.from_numpy(embeds)[None], logits_to_keep=1).logits[0, -1].numpy()

    prefill, decode = 0.0, 0.0
    for r, e in enumerate(seqs):
        if r == 1:  # a chunk on top of a cached prefix
            model.run(e[None, :2], cache, r, np.zeros(1))
            got = model.run(e[None, 2:], cache, r, np.array([2]))
        else:
            got = model.run(e[None], cache, r, np.zeros(1))
        prefill = max(prefill, max_diff(reference(e), got[0, -1]))
    for _ in range(3):
        new = rng.standard_normal((len(seqs), 1, d)).astype(np.float32)
        got = model.run(new, cache, 0, np.array([len(e) for e in seqs]))
        seqs = [np.concatenate([e, n]) for e, n in zip(seqs, new)]
        decode = max(decode, max(max_diff(reference(e), got[i, -1]) for i, e in enumerate(seqs)))
    return [Parity("llm shared-KV prefill (alone, and a chunk after a prefix)", prefill, tolerance),
            Parity("llm shared-KV batched steps, rows of 8-11 tokens", decode, tolerance)]


INT4_BLOCK = 128
QUANTIZED = {
    "int8": (names.LLM_INT8_ONNX, "int8 (mmgpt.MatMulInt8: int8 weights per output column, activations per row)"),
    "int4": (names.LLM_INT4_ONNX, "int4 (weight-only MatMulNBits, blocks of 128, symmetric, int8 compute)"),
}


def quantize_llm(fp32_path: Path, out_dir: Path, kind: str) -> tuple[str, str]:
    """Write the `kind` ("int8" or "int4") decoder beside the fp32 one -> (file name, precision).

    int4 asks for accuracy level 4 (int8 compute, AVX512-VNNI / AVX2 kernels): without it ONNX Runtime
    de-quantizes every weight block on every call, which is slower than fp32 on a CPU. Blocks of 128 weights
    share a scale: measured at Phi-2 width (4 layers, 2 cores), decode 6.5 ms/token against 8.0 with blocks of
    32 (llama.cpp Q4_0's size), and on the trained default 0.915 of greedy answers equal fp32's (0.94 with 32).
    """
    import onnx

    from mmgpt import ortops

    onnx_file, precision = QUANTIZED[kind]
    if kind == "int8" and ortops.fast("int8"):
        _int8_matmuls(load_plain(fp32_path), out_dir / onnx_file)
    elif kind == "int8":
        import os
        import tempfile

        from onnxruntime.quantization import QuantType, quantize_dynamic

        why = "no C compiler" if not ortops.available() else (
            "MMGPT_ORTOPS=0" if os.environ.get("MMGPT_ORTOPS") == "0" else "this CPU lacks its vector kernel's instructions")
        print(f"int8: {why} for mmgpt.MatMulInt8, so ONNX Runtime's MatMulInteger", flush=True)
        precision = "int8 (ONNX Runtime dynamic quantization: int8 weights, per-call activations)"
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            plain = Path(tmp) / "plain.onnx"
            _save(load_plain(fp32_path), plain)
            # FLOAT for tensors that ONNX's shape inference cannot type (outputs of com.microsoft attention ops)
            quantize_dynamic(str(plain), str(out_dir / onnx_file), weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    elif kind == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(load_plain(fp32_path), bits=4, block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(out_dir / onnx_file), use_external_data_format=False)
    else:
        raise ValueError(f"unknown quantization {kind!r}: int8 or int4")
    return onnx_file, precision


def _weight_matmuls(model):
    """(node, its 2-D float weight) for every MatMul over a constant weight: the decoder's linear layers."""
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is not None and len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT:
            yield node, w


def _drop_unused_initializers(g) -> None:
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)


def _swap_weights(model, op_type: str, convert) -> None:
    """Replace each linear layer over weight `w` by `op_type` (domain mmgpt) over the initializers
    `convert(w)` returns (None: leave the layer as it is); a weight shared by several layers is converted once."""
    from onnx import helper

    from mmgpt import ortops

    g = model.graph
    done: dict[str, list[str] | None] = {}
    layers = list(_weight_matmuls(model))
    uses = Counter(i for n in g.node for i in n.input)
    layer_uses = Counter(w.name for _, w in layers)
    for node, w in layers:
        if w.name not in done:
            new = convert(w)
            done[w.name] = None if new is None else [t.name for t in new]
            g.initializer.extend(new or [])
            if new is not None and uses[w.name] == layer_uses[w.name]:
                w.ClearField("raw_data")  # no longer needed: a 32-layer Phi-2 is 11 GB, not held twice
        if done[w.name] is not None:
            node.CopyFrom(helper.make_node(op_type, [node.input[0], *done[w.name]], list(node.output), name=node.name,
                                           domain=ortops.DOMAIN))
    _drop_unused_initializers(g)
    if not any(o.domain == ortops.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ortops.DOMAIN, 1))


def _save(model, path: Path) -> None:
    import onnx

    big = sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000  # protobuf's 2 GB limit
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=big, location=data.name)


def pack_fp32_matmuls(path: Path) -> None:
    """Rewrite an fp32 decoder in place: every linear layer (16-column multiples) becomes mmgpt.MatMulPacked
    over its weight in the order the kernel streams it. Same weights, same bytes; measured at Phi-2 width, a
    decode step reads them at 0.94 of the bound against 0.865 with ONNX Runtime's MatMul, 8 rows x 1,024 tokens at
    0.86 against 0.77 (README, Benchmark)."""
    import onnx
    from onnx import numpy_helper

    from mmgpt import ortops

    model = onnx.load(str(path))

    def convert(w):
        if w.dims[1] % 16:
            return None
        return [numpy_helper.from_array(ortops.pack_f32(numpy_helper.to_array(w)), f"{w.name}_packed")]

    _swap_weights(model, "MatMulPacked", convert)
    _save(model, path)


def load_plain(path: Path):
    """The decoder with ONNX Runtime's own MatMul everywhere (mmgpt.MatMulPacked unpacked): what the
    quantizers start from."""
    import onnx
    from onnx import numpy_helper

    from mmgpt import ortops

    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for i, node in enumerate(g.node):
        if node.op_type == "MatMulPacked" and node.domain == ortops.DOMAIN:
            packed = inits[node.input[1]]
            name = packed.name.removesuffix("_packed")
            if name not in inits:
                inits[name] = numpy_helper.from_array(ortops.unpack_f32(numpy_helper.to_array(packed)), name)
                g.initializer.append(inits[name])
            g.node[i].CopyFrom(onnx.helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name))
    _drop_unused_initializers(g)
    kept_opsets = [o for o in model.opset_import if o.domain != ortops.DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept_opsets)
    return model


def _int8_matmuls(model, out_path: Path) -> None:
    """Every linear layer becomes mmgpt.MatMulInt8 over its weight packed by `ortops.pack_int8`; everything
    else (attention, norms, the embedding input) stays fp32."""
    from onnx import numpy_helper

    from mmgpt import ortops

    def convert(w):
        arrays = ortops.pack_int8(numpy_helper.to_array(w))
        return [numpy_helper.from_array(a, f"{w.name}_{s}") for a, s in zip(arrays, ("int8", "scale", "colsum"))]

    _swap_weights(model, "MatMulInt8", convert)
    _save(model, out_path)


def _logit_checks(wrapper, ort_model, layers, heads, hd, d, tolerance) -> list[Parity]:
    """Logits and presents at shapes other than the export's: a left-padded prefill and a cached step."""
    rng = np.random.default_rng(0)
    results = []
    for b, p, t, left_pad in ((3, 0, 7, 2), (1, 5, 1, 0), (4, 6, 2, 1)):
        embeds = rng.standard_normal((b, t, d)).astype(np.float32)
        mask = np.ones((b, p + t), np.int64)
        mask[0, :left_pad] = 0  # row 0 is left-padded
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)[:, p:].astype(np.int64)
        past = [rng.standard_normal((b, heads, p, hd)).astype(np.float32) for _ in range(2 * layers)]
        ref_logits, ref_present = torch_run(wrapper, embeds, mask, pos, past)
        got_logits, got_present = ort_model.run(embeds, mask, pos, past)
        # the graph returns the last position's logits, real in every left-padded row
        assert got_logits.shape == (b, 1, ref_logits.shape[-1]), got_logits.shape
        diff = max_diff(ref_logits, got_logits)
        diff = max(diff, max(max_diff(a, g) for a, g in zip(ref_present, got_present)))
        results.append(Parity(f"llm logits b={b} past={p} seq={t}", diff, tolerance))
    return results


def _greedy_check(c: Components, torch_decoder, ort_model, strict: bool = True) -> Parity:
    """Identical greedy tokens over GREEDY_STEPS steps through the KV cache (eos ignored to run them all)."""
    from mmgpt.template import prompt_ids

    table = np.random.default_rng(1).standard_normal((c.config.num_image_tokens, c.config.llm_hidden_size)).astype(np.float32)
    ids = prompt_ids(c.config, c.tokenizer, [], "Describe the picture.", has_image=True)
    params = SamplingParams(max_tokens=GREEDY_STEPS)
    kw = dict(eos_id=-1, vocab_limit=len(c.tokenizer), max_context=c.config.max_context)
    ref = list(generate_ids(torch_decoder, ids, table, params, **kw))
    got = list(generate_ids(ort_model.decoder(), ids, table, params, **kw))
    same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    mismatch = 0.0 if ref == got else float(len(ref) - same)
    return Parity(f"llm greedy tokens x{len(ref)}", mismatch, 0.0 if strict else float("inf"), f"{same}/{len(ref)} identical")
