"""`make bench` (python -m mmgpt.bench): this project's engines against what users would pick instead, at
Phi-2 width, in one run on this machine. Writes `bench.json`, a table and PNG plots into `--out`, and prints
as its last line one JSON object of the headline figures.

Weights are random (the hub cannot be reached; speed does not depend on what weights say), architectures
and widths are real: Phi-2 at full width with `--layers` of its 32 layers, CLIP ViT-B/32 and
ViT-L/14-336, Whisper base. Every figure is a median over repeats after a warm-up; every engine gets the
same prompt, the same tokens and the same threads. Ratios are only ever taken between figures of this run.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class BenchConfig:
    out: str = "artifacts/bench"
    layers: int = 4  # of Phi-2's 32, at full width: two copies fit in memory, per-layer costs stay real
    threads: int = 2  # for every engine
    steps: int = 24  # decode steps timed per figure (median), after 2 warm-up steps
    rounds: int = 3  # LLM figures: every engine once per round, medians over rounds (see llm_section)
    repeats: int = 3  # repeats of each time-to-first-token and encoder figure (median), after a warm-up
    text_tokens: int = 64  # the prompt with an image: its image tokens, then this many text tokens
    contexts: tuple[int, ...] = (128, 1024)
    batch: int = 8  # rows of the batched decode figure (at the longest context)
    questions: int = 200  # held-out questions for greedy agreement on the trained default
    sections: tuple[str, ...] = ("llm", "llamacpp", "quality", "vision", "whisper", "served")
    concurrencies: tuple[int, ...] = (1, 4, 8)  # served: streaming clients at once
    served_tokens: int = 128  # served: max_tokens of each answer (a typical chat answer's length)
    vision_models: tuple[str, ...] = ("b32", "l14-336")
    vision_batches: tuple[int, ...] = (1, 8)
    progress: bool = True
    seed: int = 0
    notes: list[str] = field(default_factory=list)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    import onnxruntime
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    from mmgpt import ortops

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
            "decoder_operators": {k: ortops.fast(k) for k in ortops.KERNELS} | {"kernels": ortops.isa()}}


def llm_section(cfg: BenchConfig, work: Path, results: dict) -> None:
    """Ours (fp32, int8, 4-bit), transformers eager and llama.cpp (f32, Q8_0, Q4_0) at Phi-2 width, on the
    same weights, in interleaved rounds.

    This machine's speed flips by tens of percent from one minute to the next (its read bandwidth was seen at
    ~50 and ~70 GB/s in one run), so engines that are compared are timed seconds apart (figure by figure,
    each of ours next to its llama.cpp counterpart), each round between two bandwidth probes, every ratio and
    fraction of the bound is taken within a round, and the bench reports their medians over rounds.
    """
    import torch

    from mmgpt import names
    from mmgpt.export.llm import export_llm, quantize_llm
    from mmgpt.export.vision import export_vision, quantize_vision
    from mmgpt.runtime import OrtVision, llm_model

    from . import llamacpp
    from . import llm as L
    from .models import components

    torch.set_num_threads(cfg.threads)
    log(f"Phi-2 width x {cfg.layers} layers, CLIP ViT-B/32: building (random weights)")
    c = components(cfg.layers, "b32")
    llm_dir, vision_dir, hf_dir = work / "llm", work / "vision", work / "phi2-hf"
    log("exporting with the project's exporter (parity against PyTorch), then int8 and 4-bit")
    export_vision(c, vision_dir, "bench")  # fp32, as the served section serves it
    quantize_vision(vision_dir)  # the encoder `make export INT8=1` serves, for the int8 time to first token
    export_llm(c, llm_dir, "bench")
    for kind in ("int8", "int4"):
        quantize_llm(llm_dir / names.LLM_ONNX, llm_dir, kind)
    c.model.llm.save_pretrained(hf_dir)
    c.tokenizer.save_pretrained(hf_dir)

    n_img = c.config.num_image_tokens
    rng = np.random.default_rng(cfg.seed)
    text = rng.integers(2, 500, cfg.text_tokens)
    prompt_ids = np.concatenate([c.config.llm_vocab_size + np.arange(n_img), text]).astype(np.int64)
    pixels = rng.standard_normal((1, 3, c.config.image_size, c.config.image_size)).astype(np.float32)
    pcfg = c.model.llm.config
    results["kv_bytes_per_token"] = L.kv_bytes_per_token(pcfg.num_hidden_layers, pcfg.num_attention_heads,
                                                         pcfg.hidden_size // pcfg.num_attention_heads)
    results["image_tokens"] = n_img
    results["prompt_tokens"] = int(prompt_ids.size)
    static: dict = {"transformers": {"weight_bytes": L.torch_weight_bytes(c.model.llm)}, "ours": {}, "llamacpp": {}}

    llm = c.model.llm
    tp, tids = torch.from_numpy(pixels), torch.from_numpy(prompt_ids)[None]

    def with_image():
        return c.model.embed(tids, c.model.encode_images(tp))

    vision = {"fp32": OrtVision(vision_dir, cfg.threads, names.VISION_ONNX),
              "int8": OrtVision(vision_dir, cfg.threads, names.VISION_INT8_ONNX)}
    ours = {}
    for kind, onnx_file in (("fp32", names.LLM_ONNX), ("int8", names.LLM_INT8_ONNX), ("int4", names.LLM_INT4_ONNX)):
        ours[kind] = llm_model(llm_dir, cfg.threads, onnx_file)
        static["ours"][kind] = {"weight_bytes": L.onnx_weight_bytes(llm_dir / onnx_file), "onnx_file": onnx_file}
    peers = {}
    if "llamacpp" in cfg.sections:
        try:
            version = llamacpp.check_available()
            log(f"llama.cpp (llama-cpp-python {version}): converting the same weights to GGUF f32 / Q8_0 / Q4_0")
            for kind, path in llamacpp.convert(hf_dir, work, Path(cfg.out) / "cache").items():
                peers[kind] = llamacpp.LlamaCpp(path, cfg.threads, max(cfg.contexts) + cfg.steps + 8)
                static["llamacpp"][kind] = {"file_bytes": path.stat().st_size, "weight_bytes": llamacpp.weight_bytes(path)}
            static["llamacpp"]["version"] = version
        except llamacpp.Unavailable as e:
            static["llamacpp"] = {"unavailable": str(e)}
            log(f"llama.cpp skipped: {e}")
    probe = L.BandwidthProbe(cfg.threads)
    rounds = []
    big = max(cfg.contexts)
    for r in range(cfg.rounds):
        rd: dict = {"probes": [probe.measure()], "transformers": {}, "ours": {}, "llamacpp": {}}
        log(f"round {r + 1}/{cfg.rounds}: read bandwidth {rd['probes'][0]['bandwidth_gbs']:.1f} GB/s; time to first token")
        # Engines compared with each other are timed back to back (seconds apart), figure by figure: this
        # machine can change speed between two engines timed a minute apart.
        hf = rd["transformers"]
        hf["ttft_s"] = float(np.median([L.hf_generate(llm, None, 2, before=with_image).ttft_s for _ in range(cfg.repeats)]))
        for kind, m in ours.items():
            # each precision with the encoder its export serves: INT8=1 quantizes both, INT4=1 the LLM only
            encoder = vision["int8" if kind == "int8" else "fp32"]
            rd["ours"].setdefault(kind, {})["ttft_s"] = L.ort_prefill_ttft(encoder, m, pixels, prompt_ids, cfg.repeats)
        for ctx in cfg.contexts:
            log(f"round {r + 1}/{cfg.rounds}: decode at context {ctx}: transformers, then ours and llama.cpp by precision")
            ids = torch.from_numpy(rng.integers(2, 500, (1, ctx)))
            _put(hf, f"c{ctx}", L.hf_generate(llm, ids, cfg.steps + 2, probe=probe))
            for kind, lc_kind in (("fp32", "f32"), ("int8", "q8_0"), ("int4", "q4_0")):
                _put(rd["ours"][kind], f"c{ctx}", L.ort_decode(ours[kind], 1, ctx, cfg.steps, cfg.seed, probe))
                if lc_kind in peers:
                    t = peers[lc_kind].decode(ctx, cfg.steps, cfg.seed, probe)
                    p = rd["llamacpp"].setdefault(lc_kind, {})
                    _put(p, f"c{ctx}", t)
                    p[f"prefill_s_c{ctx}"] = t.ttft_s
        for kind, m in ours.items():
            _put(rd["ours"][kind], f"b{cfg.batch}_c{big}", L.ort_decode(m, cfg.batch, big, cfg.steps, cfg.seed, probe))
        rd["probes"].append(probe.measure())
        rd["bandwidth_gbs"] = max(x["bandwidth_gbs"] for x in rd["probes"])
        rd["gemm_fp32_gflops"] = max(x.get("gemm_fp32_gflops", 0.0) for x in rd["probes"])
        rd["gemm8_fp32_weights_gbs"] = max(x.get("gemm8_fp32_weights_gbs", 0.0) for x in rd["probes"])
        rounds.append(rd)
    probe.close()
    results["rounds"] = [_with_static(rd, static) for rd in rounds]
    for engine in ("transformers", "ours", "llamacpp"):  # medians over rounds, for the table
        results[engine] = _medians([rd[engine] for rd in results["rounds"]])


def _put(figures: dict, shape: str, t) -> None:
    """A decode figure: its median ms/token, and each step with the bandwidth probed around it."""
    figures[f"decode_ms_{shape}"] = t.ms_per_token
    figures[f"steps_{shape}"] = t.steps


def _with_static(rd: dict, static: dict) -> dict:
    """A round's figures with the facts that do not change between rounds (bytes, file names, versions)."""
    out = dict(rd)
    for engine, facts in static.items():
        merged = {k: dict(v) if isinstance(v, dict) else v for k, v in facts.items()}
        for kind, figures in rd[engine].items():
            if isinstance(figures, dict):
                merged[kind] = {**merged.get(kind, {}), **figures}
            else:
                merged[kind] = figures
        out[engine] = merged
    return out


def _medians(per_round: list[dict]) -> dict:
    """Each float figure's median over rounds; everything else as the first round has it."""
    out: dict = {}
    for key, value in per_round[0].items():
        if isinstance(value, dict):
            out[key] = _medians([d[key] for d in per_round])
        elif isinstance(value, float):
            out[key] = float(np.median([d[key] for d in per_round]))
        else:
            out[key] = value
    return out


def quality_section(cfg: BenchConfig, work: Path, results: dict) -> None:
    from .quality import greedy_agreement

    log(f"greedy agreement of int8 / 4-bit with fp32 on the trained default ({cfg.questions} held-out questions)")
    results["quality"] = greedy_agreement(work / "quality", cfg.questions, cfg.threads, cfg.progress)


def vision_section(cfg: BenchConfig, work: Path, results: dict) -> None:
    from .encoders import vision

    results["vision"] = {}
    for name in cfg.vision_models:
        log(f"vision CLIP {name} + projector: PyTorch, ORT fp32, ORT int8 at batch {cfg.vision_batches}")
        results["vision"][name] = vision(name, work, cfg.threads, cfg.vision_batches, cfg.repeats)
        gc.collect()


def whisper_section(cfg: BenchConfig, work: Path, results: dict) -> None:
    from .encoders import whisper

    log("Whisper base: one 30 s window + decoding, ORT vs transformers vs CTranslate2 fp32/int8")
    # at least 5 rounds: a round is ~7 s here (five engines), and the ratios are medians over them
    results["whisper"] = whisper(work, cfg.threads, max(cfg.repeats, 5))


def served_section(cfg: BenchConfig, work: Path, results: dict) -> None:
    from .served import served

    log(f"served through tritonserver at Phi-2 width: concurrency {cfg.concurrencies}, a second turn, a repeated image")
    results["served"] = served(work, cfg.threads, cfg.concurrencies, cfg.served_tokens, cfg.repeats)


# "llamacpp" is timed inside the llm section's rounds (same weights, interleaved); listed to switch it off
SECTIONS = {"llm": llm_section, "llamacpp": None, "quality": quality_section,
            "vision": vision_section, "whisper": whisper_section, "served": served_section}


def main(cfg: BenchConfig) -> dict:
    """Run the sections, write bench.json, the table and plots into cfg.out; return the headline figures."""
    import warnings

    import torch
    import transformers

    from .report import headline, plots, table

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    out = Path(cfg.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results: dict = {"settings": asdict(cfg), "machine": machine()}
    log("settings: " + json.dumps(results["settings"]))
    log("machine: " + json.dumps(results["machine"]))
    torch.set_num_threads(cfg.threads)
    for name in cfg.sections:
        if SECTIONS[name] is None:
            continue
        start = time.time()
        SECTIONS[name](cfg, work, results)
        results.setdefault("seconds", {})[name] = round(time.time() - start, 1)
    results["seconds"]["total"] = round(time.time() - t0, 1)
    summary = headline(results)
    results["summary"] = summary
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (out / "bench.md").write_text(text + "\n")
    print(text, flush=True)
    for p in plots(results, out):
        log(f"plot: {p}")
    log(f"done in {results['seconds']['total']:.0f} s; {out / 'bench.json'}")
    return summary


def cli(argv: list[str] | None = None) -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m mmgpt.bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=d.out, help="where bench.json, bench.md and the plots go")
    p.add_argument("--layers", type=int, default=d.layers, help="Phi-2 layers kept (full width)")
    p.add_argument("--threads", type=int, default=d.threads, help="threads for every engine")
    p.add_argument("--steps", type=int, default=d.steps, help="decode steps timed per figure")
    p.add_argument("--rounds", type=int, default=d.rounds, help="LLM rounds (every engine once per round)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="repeats per time-to-first-token / encoder figure")
    p.add_argument("--questions", type=int, default=d.questions, help="questions for greedy agreement")
    p.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), default=d.sections)
    p.add_argument("--vision-models", nargs="+", choices=("b32", "l14-336"), default=d.vision_models)
    p.add_argument("--concurrencies", nargs="+", type=int, default=d.concurrencies, help="served: clients at once")
    p.add_argument("--served-tokens", type=int, default=d.served_tokens, help="served: max_tokens of each answer")
    p.add_argument("--contexts", nargs="+", type=int, default=d.contexts, help="decode contexts (tokens)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for needs_llm in ("llamacpp", "served"):
        if needs_llm in a.sections and "llm" not in a.sections:
            p.error(f"{needs_llm} uses the weights and exports the llm section builds: add llm")
    cfg = BenchConfig(out=a.out, layers=a.layers, threads=a.threads, steps=a.steps, rounds=a.rounds, repeats=a.repeats,
                      questions=a.questions, sections=tuple(a.sections), vision_models=tuple(a.vision_models),
                      contexts=tuple(a.contexts), concurrencies=tuple(a.concurrencies), served_tokens=a.served_tokens,
                      progress=not a.no_progress)
    summary = main(cfg)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
