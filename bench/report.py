"""From the bench's raw figures to what a reader wants: the bound each decode figure is measured against,
the headline ratios (the last JSON line), the targets of the performance issue, a table and plots."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

PRECISIONS = (("fp32", "f32"), ("int8", "q8_0"), ("int4", "q4_0"))  # ours -> llama.cpp's counterpart

# headline key -> (target test, wording); None where the figure is reported, not targeted
TARGETS = {
    "decode_fraction_of_bound": (lambda v: v >= 0.9, ">= 0.9"),
    "decode_fraction_of_bound_int8": (lambda v: v >= 0.85, ">= 0.85"),
    "decode_fraction_of_bound_int4": (lambda v: v >= 0.7, ">= 0.7"),
    "decode_fraction_of_bound_b8_1k": (lambda v: v >= 0.8, ">= 0.8"),
    "int8_greedy_agreement": (lambda v: v >= 0.9, ">= 0.9"),
    "int4_greedy_agreement": (lambda v: v >= 0.9, ">= 0.9"),
    "decode_vs_llamacpp_f32": (lambda v: v >= 1.0, ">= 1.0"),
    "decode_vs_llamacpp_q8": (lambda v: v >= 1.0, ">= 1.0"),
    "decode_vs_llamacpp_q4": (lambda v: v >= 1.0, ">= 1.0"),
    "ttft_ratio": (lambda v: v <= 0.8, "<= 0.8"),
    "ttft_ratio_int8": (lambda v: v <= 0.45, "<= 0.45"),
    "second_turn_ttft_ratio": (lambda v: v <= 0.3, "<= 0.3"),
    "concurrency8_throughput_ratio": (lambda v: v >= 4.0, ">= 4"),
    "serving_overhead": (lambda v: v <= 1.10, "<= 1.10"),
    "repeat_image_encodes": (lambda v: v == 0, "== 0"),
    "whisper_rtf_ratio": (lambda v: v <= 0.5, "<= 0.5"),
    "whisper_rtf_vs_ctranslate2_int8": (lambda v: v < 1.0, "< 1.0"),
}


def bound_ms(weight_bytes: int, kv_bytes: float, gbs: float) -> float:
    """The fastest a decode step can be: every weight and every cached key/value read once."""
    return 1000 * (weight_bytes + kv_bytes) / (gbs * 1e9)


def roofline_ms(weight_bytes: int, kv_bytes: float, gbs: float, rows: int, context: int, kv_per_token: int,
                gflops: float) -> float:
    """The bound of a batched fp32 step on a machine whose cores, not its memory, may be the limit: the larger
    of the bandwidth bound and the step's multiply-adds at the measured GEMM rate (2 flops per weight per row,
    and per cached value per row for attention's two products)."""
    flops = 2 * rows * weight_bytes / 4 + 2 * rows * context * kv_per_token / 4
    return max(bound_ms(weight_bytes, kv_bytes, gbs), 1000 * flops / (gflops * 1e9))


def engine_figures(rd: dict):
    """(engine, kind, figures) of every decode engine timed in one round: ours by precision, transformers, llama.cpp."""
    for kind, r in rd.get("ours", {}).items():
        yield "ours", kind, r
    if rd.get("transformers"):
        yield "transformers", "fp32", rd["transformers"]
    for kind, r in rd.get("llamacpp", {}).items():
        if isinstance(r, dict) and "weight_bytes" in r:
            yield "llamacpp", kind, r


def timed_kv_bytes(settings: dict, kv_per_token: int, rows: int, context: int) -> float:
    """The keys/values a step reads while a figure is timed: the cache grows by one token a step."""
    return rows * kv_per_token * (context + settings["steps"] / 2)


def paired_fraction(r: dict, shape: str, bound, round_gbs: float) -> float:
    """A decode figure as a fraction of its bound: the median over its steps of each step's bound (`bound(gbs)`
    at the bandwidth probed on either side of the step) over the step's time. Figures timed without probes
    (older bench.json files) are held against the round's best probe, `round_gbs`."""
    steps = r.get(f"steps_{shape}")
    if steps and steps.get("gbs"):
        return float(np.median([bound(gbs) / ms for ms, gbs in zip(steps["ms"], steps["gbs"])]))
    return bound(round_gbs) / r[f"decode_ms_{shape}"]


def fractions(rd: dict, settings: dict, kv_per_token: int) -> dict:
    """Fraction of the bound of every decode figure of one round (ours, transformers, llama.cpp), each step
    against the bandwidth probed right before and after it (`paired_fraction`). None without LLM rounds
    (`--sections` without llm)."""
    if "bandwidth_gbs" not in rd:
        return {}
    contexts, batch, gbs = settings["contexts"], settings["batch"], rd["bandwidth_gbs"]
    big = max(contexts)

    def kv(rows: int, context: int) -> float:
        return timed_kv_bytes(settings, kv_per_token, rows, context)

    out: dict = {}
    for engine, kind, r in engine_figures(rd):
        for ctx in contexts:
            out[f"{engine}_{kind}_c{ctx}"] = paired_fraction(
                r, f"c{ctx}", lambda g, r=r, ctx=ctx: bound_ms(r["weight_bytes"], kv(1, ctx), g), gbs)
        shape = f"b{batch}_c{big}"
        if f"decode_ms_{shape}" in r:
            out[f"{engine}_{kind}_{shape}"] = paired_fraction(
                r, shape, lambda g, r=r: bound_ms(r["weight_bytes"], kv(batch, big), g), gbs)
            if kind == "fp32" and rd.get("gemm_fp32_gflops"):
                def roof(g, r=r):
                    return roofline_ms(r["weight_bytes"], kv(batch, big), g, batch, big, kv_per_token, rd["gemm_fp32_gflops"])
                out[f"{engine}_{kind}_{shape}_roofline"] = paired_fraction(r, shape, roof, gbs)
    return out


def _ratios(rd: dict, settings: dict, kv_per_token: int) -> dict:
    """The LLM headline figures of one round."""
    small, big, batch = min(settings["contexts"]), max(settings["contexts"]), settings["batch"]
    f = fractions(rd, settings, kv_per_token)
    ours, hf, lc = rd.get("ours", {}), rd.get("transformers", {}), rd.get("llamacpp", {})
    s = {
        "decode_fraction_of_bound": f.get(f"ours_fp32_c{small}"),
        "decode_fraction_of_bound_int8": f.get(f"ours_int8_c{small}"),
        "decode_fraction_of_bound_int4": f.get(f"ours_int4_c{small}"),
        "decode_fraction_of_bound_b8_1k": f.get(f"ours_fp32_b{batch}_c{big}"),
        # reported beside the target: the same step against max(bandwidth bound, its flops at the GEMM rate)
        "decode_fraction_of_roofline_b8_1k": f.get(f"ours_fp32_b{batch}_c{big}_roofline"),
        "gemm_fp32_gflops": rd.get("gemm_fp32_gflops"),
        "gemm8_fp32_weights_gbs": rd.get("gemm8_fp32_weights_gbs"),
    }
    for ours_kind, lc_kind in PRECISIONS:
        tag = {"f32": "f32", "q8_0": "q8", "q4_0": "q4"}[lc_kind]
        theirs = lc.get(lc_kind, {}).get(f"decode_ms_c{small}") if isinstance(lc.get(lc_kind), dict) else None
        mine = ours.get(ours_kind, {}).get(f"decode_ms_c{small}")
        s[f"decode_vs_llamacpp_{tag}"] = theirs / mine if theirs and mine else None  # tokens/s, ours over theirs
        s[f"decode_speedup_{ours_kind}"] = hf[f"decode_ms_c{small}"] / mine if hf and mine else None
    s["ttft_ratio"] = ours["fp32"]["ttft_s"] / hf["ttft_s"] if ours and hf else None
    s["ttft_ratio_int8"] = ours["int8"]["ttft_s"] / hf["ttft_s"] if ours and hf else None
    return s


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def median_fractions(results: dict) -> dict:
    per_round = [fractions(rd, results["settings"], results["kv_bytes_per_token"]) for rd in results.get("rounds", [])]
    return {k: _median([f.get(k) for f in per_round]) for k in (per_round[0] if per_round else {})}


def step_bandwidths(rounds: list[dict]) -> list[float]:
    """Every bandwidth probed beside a decode step, over all rounds and engines."""
    return [g for rd in rounds for _, _, r in engine_figures(rd)
            for k, v in r.items() if k.startswith("steps_") and v for g in v["gbs"]]


def whisper_ratio(w: dict, ours: str, theirs: str) -> float:
    """Ours over theirs in real-time factor: the median of the ratios within the rounds of the group of engines
    timed in turns that holds both (`rtf_rounds`), else the ratio of their medians."""
    for group in w.get("rtf_rounds", []):
        if ours in group and theirs in group:
            return statistics.median(a / b for a, b in zip(group[ours], group[theirs]))
    return w[f"{ours}_rtf"] / w[f"{theirs}_rtf"]


def headline(results: dict) -> dict:
    q, w, served = results.get("quality", {}), results.get("whisper", {}), results.get("served", {})
    rounds = results.get("rounds", [])
    s: dict = {"bandwidth_gbs": _median([rd["bandwidth_gbs"] for rd in rounds])}

    def put(key, value):
        s[key] = None if value is None else round(float(value), 3)

    per_round = [_ratios(rd, results["settings"], results["kv_bytes_per_token"]) for rd in rounds]
    for key in (per_round[0] if per_round else _ratios({}, results["settings"], 0)):
        put(key, _median([r[key] for r in per_round]))
    if s["bandwidth_gbs"] is not None:
        s["bandwidth_gbs"] = round(s["bandwidth_gbs"], 2)
    put("bandwidth_gbs_at_steps", _median(step_bandwidths(rounds)))
    put("int8_greedy_agreement", q.get("int8_greedy_agreement"))
    put("int4_greedy_agreement", q.get("int4_greedy_agreement"))
    for key in ("second_turn_ttft_ratio", "concurrency8_throughput_ratio", "serving_overhead", "repeat_image_encodes"):
        put(key, served.get(key))
    put("whisper_rtf_ratio", whisper_ratio(w, "ort_fp32", "transformers_fp32") if w else None)
    # precision for precision: ours at int8 (`make export INT8=1`) against CTranslate2 at int8
    ours_int8 = "ort_int8" if w and "ort_int8_rtf" in w else "ort_fp32"
    put("whisper_rtf_vs_ctranslate2_int8", whisper_ratio(w, ours_int8, "ctranslate2_int8") if w else None)
    s["targets_met"] = sorted(k for k, (ok, _) in TARGETS.items() if s.get(k) is not None and ok(s[k]))
    s["targets_missed"] = sorted(k for k, (ok, _) in TARGETS.items() if s.get(k) is not None and not ok(s[k]))
    s["not_measured"] = sorted(k for k in TARGETS if s.get(k) is None)
    return s


def table(results: dict) -> str:
    cfg = results["settings"]
    small, big, batch = min(cfg["contexts"]), max(cfg["contexts"]), cfg["batch"]
    gbs = results["summary"]["bandwidth_gbs"] or float("nan")
    at_steps = results["summary"].get("bandwidth_gbs_at_steps") or float("nan")
    f = median_fractions(results)
    lines = [f"# make bench — {results['machine']['cpu']}, {cfg['threads']} threads, Phi-2 width x {cfg['layers']} layers, "
             f"read bandwidth {gbs:.1f} GB/s (median over {len(results.get('rounds', []))} rounds of each round's best probe), "
             f"{at_steps:.1f} GB/s beside the decode steps (median). Figures are medians over rounds; a fraction of the "
             "bound holds each step against the bandwidth probed right before and after it", ""]
    lines.append(f"| LLM decode | weights GB | ms/token c{small} | of bound | ms/token c{big} | of bound | "
                 f"ms/step b{batch} c{big} | of bound | TTFT image+{cfg['text_tokens']} s |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    hf = results.get("transformers")
    if hf:
        lines.append(f"| transformers eager fp32 | {hf['weight_bytes'] / 1e9:.2f} | {hf[f'decode_ms_c{small}']:.1f} | "
                     f"{f[f'transformers_fp32_c{small}']:.2f} | {hf[f'decode_ms_c{big}']:.1f} | {f[f'transformers_fp32_c{big}']:.2f} "
                     f"| | | {hf['ttft_s']:.3f} |")
    for kind, r in results.get("ours", {}).items():
        lines.append(f"| ours ONNX Runtime {kind} | {r['weight_bytes'] / 1e9:.2f} | {r[f'decode_ms_c{small}']:.1f} | "
                     f"{f[f'ours_{kind}_c{small}']:.2f} | {r[f'decode_ms_c{big}']:.1f} | {f[f'ours_{kind}_c{big}']:.2f} | "
                     f"{r[f'decode_ms_b{batch}_c{big}']:.1f} | {f[f'ours_{kind}_b{batch}_c{big}']:.2f} | {r['ttft_s']:.3f} |")
    lc = results.get("llamacpp", {})
    if "unavailable" in lc:
        lines.append(f"| llama.cpp | not run: {lc['unavailable']} |")
    for kind, r in lc.items():
        if isinstance(r, dict) and "weight_bytes" in r:
            lines.append(f"| llama.cpp {kind} | {r['weight_bytes'] / 1e9:.2f} | {r[f'decode_ms_c{small}']:.1f} | "
                         f"{f[f'llamacpp_{kind}_c{small}']:.2f} | {r[f'decode_ms_c{big}']:.1f} | {f[f'llamacpp_{kind}_c{big}']:.2f} "
                         f"| | | (prefill {small}: {r[f'prefill_s_c{small}']:.3f}) |")
    if "quality" in results:
        q = results["quality"]
        lines += ["", f"Trained default, {q['questions']} held-out questions, greedy: accuracy fp32 {q['fp32_accuracy']:.3f}, "
                      f"int8 {q['int8_accuracy']:.3f} (same answer as fp32: {q['int8_greedy_agreement']:.3f}), "
                      f"4-bit {q['int4_accuracy']:.3f} (same: {q['int4_greedy_agreement']:.3f})"]
    if "vision" in results:
        lines += ["", "| vision (+ projector) | batch | PyTorch img/s | ORT fp32 img/s | ORT int8 img/s |", "|---|---|---|---|---|"]
        for name, r in results["vision"].items():
            for b in cfg["vision_batches"]:
                lines.append(f"| CLIP {name} ({r['image_tokens']} tokens) | {b} | {r[f'torch_b{b}_images_per_s']:.2f} | "
                             f"{r[f'ort_fp32_b{b}_images_per_s']:.2f} | {r[f'ort_int8_b{b}_images_per_s']:.2f} |")
    if "whisper" in results:
        w = results["whisper"]
        lines += ["", f"| Whisper base, 30 s + {w['tokens']} tokens | real-time factor |", "|---|---|"]
        for k in ("transformers_fp32", "ort_fp32", "ort_int8", "ctranslate2_float32", "ctranslate2_int8"):
            if f"{k}_rtf" in w:
                lines.append(f"| {k.replace('_', ' ')} | {w[f'{k}_rtf']:.4f} |")
    if "served" in results:
        sv = results["served"]
        lines += ["", f"| served, {sv['max_tokens']} tokens an answer | TTFT s | inter-token ms | answer s | output tokens/s |",
                  "|---|---|---|---|---|",
                  f"| in-process (same ONNX files, no server) | {sv['in_process']['ttft_s']:.3f} | | {sv['in_process']['latency_s']:.3f} | |",
                  f"| served, the same request, timed in pairs with the line above | {sv['served_alone']['ttft_s']:.3f} | | "
                  f"{sv['served_alone']['latency_s']:.3f} | |"]
        for key, r in sv.items():
            if key.startswith("c") and isinstance(r, dict):
                lines.append(f"| served, concurrency {key[1:]} | {r['ttft_s']:.3f} | {r['inter_token_ms']:.1f} | {r['latency_s']:.3f} | "
                             f"{r['output_tokens_per_s']:.1f} |")
        lines.append(f"| second turn about the same image (first: {sv['first_turn_ttft_s']:.3f} s) | {sv['second_turn_ttft_s']:.3f} | | | |")
    s = results["summary"]
    lines += ["", "| headline | value | target | |", "|---|---|---|---|"]
    for k, (ok, wording) in TARGETS.items():
        v = s.get(k)
        verdict = "not measured yet" if v is None else ("met" if ok(v) else "MISSED")
        lines.append(f"| {k} | {'' if v is None else v} | {wording} | {verdict} |")
    if s.get("decode_fraction_of_roofline_b8_1k") is not None:
        lines += ["", f"The {batch} x {big} fp32 step against its roofline (the larger of the bandwidth bound and its "
                      f"multiply-adds at the measured fp32 GEMM rate, {s['gemm_fp32_gflops']:.0f} GFLOP/s): "
                      f"{s['decode_fraction_of_roofline_b8_1k']:.2f}. ONNX Runtime's fp32 GEMM at {batch} rows reads "
                      f"weights at {s['gemm8_fp32_weights_gbs'] or float('nan'):.1f} GB/s (one row: the bandwidth above)"]
    return "\n".join(lines)


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["settings"]
    small = min(cfg["contexts"])
    f = median_fractions(results)
    bars = [(k.replace("_", " ").replace(f" c{small}", ""), v) for k, v in f.items() if k.endswith(f"_c{small}")]
    if not bars:
        return []
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.2))
    names, values = zip(*bars)
    ax.barh(names, values, color=["tab:blue" if n.startswith("ours") else "tab:gray" for n in names])
    ax.axvline(1.0, color="k", lw=1, ls="--")
    ax.set_xlabel(f"decode speed as a fraction of the read-bandwidth bound (batch 1, context {small})")
    ax.invert_yaxis()
    fig.tight_layout()
    path = out / "decode_fraction_of_bound.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path] + _steps_plot(results, out, plt)


def _steps_plot(results: dict, out: Path, plt) -> list[Path]:
    """Every timed step at the smallest context, batch 1: its speed as a fraction of its own bound against the
    bandwidth probed beside it. Shows whether an engine keeps up when the machine's bandwidth is higher."""
    cfg = results["settings"]
    small = min(cfg["contexts"])
    kv = timed_kv_bytes(cfg, results["kv_bytes_per_token"], 1, small)
    series: dict[str, tuple[list, list]] = {}
    for rd in results.get("rounds", []):
        for engine, kind, r in engine_figures(rd):
            steps = r.get(f"steps_c{small}")
            if engine != "transformers" and steps and steps.get("gbs"):
                xs, ys = series.setdefault(f"{engine} {kind}", ([], []))
                xs += steps["gbs"]
                ys += [bound_ms(r["weight_bytes"], kv, g) / ms for ms, g in zip(steps["ms"], steps["gbs"])]
    if not series:
        return []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    markers = {"fp32": "o", "f32": "o", "int8": "s", "q8_0": "s", "int4": "^", "q4_0": "^"}
    for name, (xs, ys) in series.items():
        engine, kind = name.split()
        ax.scatter(xs, ys, s=14, alpha=0.6, marker=markers.get(kind, "o"),
                   facecolors="none" if engine == "llamacpp" else None,
                   edgecolors=None if engine == "ours" else "k", label=name)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xlabel("read bandwidth probed beside the step (GB/s)")
    ax.set_ylabel("step speed as a fraction of its bound")
    ax.set_title(f"every decode step, batch 1, context {small}")
    ax.legend(fontsize=8, ncol=2, loc="lower center")
    fig.tight_layout()
    path = out / "decode_steps_vs_bandwidth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
