"""Greedy agreement of the quantized decoders with fp32, on the trained embedded default (random weights are
full of near-ties, so quantization's effect on answers is judged on a model that has learned something)."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm


def greedy_agreement(work: Path, questions: int, threads: int, progress: bool = True) -> dict:
    """Export the embedded default (vision at fp32 and int8, LLM at fp32, int8 and 4-bit), answer `questions` held-out vqa
    questions greedily with each decoder, and compare each quantized answer with fp32's.

    Returns the fraction of identical answers per precision and each one's accuracy against the references.
    """
    from transformers import AutoTokenizer, CLIPImageProcessor

    from mmgpt import names
    from mmgpt.config import MMGPTConfig
    from mmgpt.export.__main__ import main as export
    from mmgpt.export.llm import quantize_llm
    from mmgpt.generation import SamplingParams
    from mmgpt.inference import Assistant
    from mmgpt.presets import default_checkpoint
    from mmgpt.runtime import OrtVision, llm_model
    from mmgpt.toy import build, generate
    from mmgpt.toy.world import normalize

    checkpoint = default_checkpoint()
    record = build.read_record(checkpoint)
    world = work / "world"
    if not (world / "eval.jsonl").is_file():
        generate.write_world(world, **record["world"], splits=("eval",), progress=progress)
    rows = generate.read_eval(world / "eval.jsonl", "vqa")[:questions]
    d = work / "export"
    # exported every run (seconds at the default's size): a kept folder could hold another version's graphs
    export(str(checkpoint), str(d), int8=True, only=("vision", "llm"))
    quantize_llm(d / names.LLM_DIR / names.LLM_ONNX, d / names.LLM_DIR, "int4")
    config = MMGPTConfig.load(d)
    tokenizer = AutoTokenizer.from_pretrained(d / names.TOKENIZER_DIR)
    processor = CLIPImageProcessor.from_pretrained(d / names.VISION_DIR)
    vision = {f: OrtVision(d / names.VISION_DIR, threads, f) for f in (names.VISION_ONNX, names.VISION_INT8_ONNX)}
    params = SamplingParams(max_tokens=64)
    answers: dict[str, list[str]] = {}
    # each precision as its export serves it: INT8=1 quantizes the vision encoder too, INT4=1 the LLM only
    for kind, onnx_file, encoder in (("fp32", names.LLM_ONNX, names.VISION_ONNX), ("int8", names.LLM_INT8_ONNX, names.VISION_INT8_ONNX),
                                     ("int4", names.LLM_INT4_ONNX, names.VISION_ONNX)):
        llm = llm_model(d / names.LLM_DIR, threads, onnx_file)
        bot = Assistant(config, tokenizer, processor, encode_image=vision[encoder], new_decoder=llm.decoder)
        answers[kind] = [
            bot.ask(r["question"], image=(world / "images" / r["image"]).read_bytes(), params=params).text
            for r in tqdm(rows, desc=f"greedy answers {kind}", unit="q", disable=not progress)
        ]
    out = {"questions": len(rows)}
    for kind, got in answers.items():
        out[f"{kind}_accuracy"] = sum(normalize(a) == normalize(r["answer"]) for a, r in zip(got, rows)) / len(rows)
        if kind != "fp32":
            out[f"{kind}_greedy_agreement"] = sum(a == b for a, b in zip(got, answers["fp32"])) / len(rows)
    return out
