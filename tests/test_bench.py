"""`make bench`'s parts that can be checked quickly: the bound arithmetic and verdicts, the byte counts the
bounds rest on, the timers on the tiny export, and that a missing peer is reported, not a crash.
The full run (Phi-2 width, llama.cpp built from source) is `make bench`, not part of `make test`."""

from __future__ import annotations

import numpy as np
import pytest

from mmgpt import names


def _round(ms: dict, gbs: float = 10.0) -> dict:
    """One round with round numbers: `gbs` GB/s, 1 GB of weights everywhere."""
    ours = {
        kind: {"weight_bytes": int(1e9), "ttft_s": 1.0, "decode_ms_c128": t, "decode_ms_c1024": t, "decode_ms_b8_c1024": t}
        for kind, t in ms.items()
    }
    return {"bandwidth_gbs": gbs, "ours": ours,
            "transformers": {"weight_bytes": int(1e9), "ttft_s": 2.0, "decode_ms_c128": 400.0, "decode_ms_c1024": 400.0},
            "llamacpp": {"f32": {"weight_bytes": int(1e9), "decode_ms_c128": 150.0, "decode_ms_c1024": 150.0,
                                 "prefill_s_c128": 1.0}}}


def _results(*rounds: dict) -> dict:
    from mmgpt.bench.__main__ import _medians

    settings = {"contexts": [128, 1024], "batch": 8, "steps": 0, "threads": 2, "layers": 1, "text_tokens": 4,
                "vision_batches": [1]}
    out = {"settings": settings, "kv_bytes_per_token": 0, "rounds": list(rounds), "machine": {"cpu": "test"}}
    for engine in ("ours", "transformers", "llamacpp"):
        out[engine] = _medians([rd[engine] for rd in rounds])
    return out


def test_fraction_of_bound_and_targets():
    from mmgpt.bench.report import bound_ms, headline, table

    assert bound_ms(int(1e9), 0, 10.0) == pytest.approx(100.0)  # 1 GB at 10 GB/s
    results = _results(_round({"fp32": 100.0, "int8": 200.0, "int4": 125.0}))
    s = headline(results)
    assert s["decode_fraction_of_bound"] == pytest.approx(1.0)
    assert s["decode_fraction_of_bound_int8"] == pytest.approx(0.5)
    assert s["decode_vs_llamacpp_f32"] == pytest.approx(1.5)  # tokens/s, ours over theirs
    assert s["decode_speedup_fp32"] == pytest.approx(4.0)
    assert s["ttft_ratio"] == pytest.approx(0.5)
    assert "decode_fraction_of_bound" in s["targets_met"] and "decode_fraction_of_bound_int8" in s["targets_missed"]
    assert "whisper_rtf_ratio" in s["not_measured"] and s["whisper_rtf_ratio"] is None
    results["whisper"] = {"tokens": 64, "transformers_fp32_rtf": 0.1, "ort_fp32_rtf": 0.04, "ort_int8_rtf": 0.02,
                          "ctranslate2_float32_rtf": 0.05, "ctranslate2_int8_rtf": 0.03}
    s = headline(results)
    assert s["whisper_rtf_ratio"] == pytest.approx(0.4)  # fp32 against transformers' fp32
    assert s["whisper_rtf_vs_ctranslate2_int8"] == pytest.approx(0.667, abs=1e-3)  # int8 against int8
    results["summary"] = s
    text = table(results)
    assert "| decode_fraction_of_bound_int8 | 0.5 | >= 0.85 | MISSED |" in text


def test_a_run_of_other_sections_than_the_llm_still_reports():
    """`--sections whisper` alone (no LLM rounds): the summary says what was and was not measured."""
    from mmgpt.bench.report import headline

    results = {"settings": _results(_round({"fp32": 1.0}))["settings"], "kv_bytes_per_token": 0, "rounds": []}
    results["whisper"] = {"tokens": 64, "transformers_fp32_rtf": 0.1, "ort_fp32_rtf": 0.04, "ctranslate2_int8_rtf": 0.05}
    s = headline(results)
    assert s["bandwidth_gbs"] is None and "decode_fraction_of_bound" in s["not_measured"]
    assert s["whisper_rtf_vs_ctranslate2_int8"] == pytest.approx(0.8)  # no int8 figure: ours fp32


def test_a_batched_step_is_bounded_by_compute_where_the_cores_are_slower_than_memory():
    from mmgpt.bench.report import bound_ms, roofline_ms

    # 1 GB of fp32 weights (0.25 G weights), 8 rows: 4 GFLOP; at 10 GB/s the bytes take 100 ms
    assert bound_ms(int(1e9), 0, 10.0) == pytest.approx(100.0)
    assert roofline_ms(int(1e9), 0, 10.0, 8, 0, 0, gflops=100.0) == pytest.approx(100.0)  # 40 ms of flops: bytes bind
    assert roofline_ms(int(1e9), 0, 10.0, 8, 0, 0, gflops=20.0) == pytest.approx(200.0)  # 4 GFLOP at 20 GFLOP/s
    # attention adds 2 flops per cached value per row: 8 rows x 1,000 tokens x 1e6 bytes / 4 bytes x 2
    assert roofline_ms(0, 0, 10.0, 8, 1000, int(1e6), gflops=100.0) == pytest.approx(1000 * 4e9 / 100e9)


def test_ratios_are_taken_within_a_round_then_the_median():
    from mmgpt.bench.report import headline

    # the machine at half speed in the second round: every engine slows down together
    slow = _round({"fp32": 200.0, "int8": 200.0, "int4": 200.0}, gbs=5.0)
    for r in (slow["transformers"], slow["llamacpp"]["f32"]):
        r["decode_ms_c128"] *= 2
    fast = _round({"fp32": 100.0, "int8": 100.0, "int4": 100.0})
    s = headline(_results(fast, slow, fast))
    assert s["decode_fraction_of_bound"] == pytest.approx(1.0)  # each round against its own bandwidth
    assert s["decode_vs_llamacpp_f32"] == pytest.approx(1.5)
    assert s["bandwidth_gbs"] == pytest.approx(10.0)


def test_kv_cache_counts_toward_the_bound():
    from mmgpt.bench.report import fractions

    results = _results(_round({"fp32": 100.0, "int8": 100.0, "int4": 100.0}))
    kv = 1000  # 8 rows x 1,024 tokens x 1 kB = 8.2 MB more to read per step
    f = fractions(results["rounds"][0], results["settings"], kv)
    assert f["ours_fp32_b8_c1024"] == pytest.approx((1e9 + 8 * 1024 * 1000) / 1e9)
    assert f["ours_fp32_c128"] == pytest.approx((1e9 + 128 * 1000) / 1e9)


def test_each_step_is_held_against_the_bandwidth_probed_beside_it():
    """The machine's bandwidth moves between levels within seconds: a step timed while it was slow is bounded
    by the slow probe beside it, not by the round's best probe."""
    from mmgpt.bench.report import fractions, headline

    rd = _round({"fp32": 100.0, "int8": 100.0, "int4": 100.0}, gbs=20.0)  # the round's best probe: 20 GB/s
    # three steps of 1 GB: at 10 GB/s in 100 ms (1.0), at 20 GB/s in 100 ms (0.5), at 10 GB/s in 125 ms (0.8)
    rd["ours"]["fp32"]["steps_c128"] = {"ms": [100.0, 100.0, 125.0], "gbs": [10.0, 20.0, 10.0]}
    results = _results(rd)
    f = fractions(results["rounds"][0], results["settings"], 0)
    assert f["ours_fp32_c128"] == pytest.approx(0.8)  # the median of the steps' own fractions
    assert f["ours_int8_c128"] == pytest.approx(0.5)  # no probes beside its steps: the round's best, 50 / 100 ms
    assert headline(results)["bandwidth_gbs_at_steps"] == pytest.approx(10.0)


def test_the_plots_show_the_fractions_and_every_probed_step(tmp_path):
    from mmgpt.bench.report import plots

    rd = _round({"fp32": 100.0, "int8": 100.0, "int4": 100.0})
    results = _results(rd)
    assert [p.name for p in plots(results, tmp_path)] == ["decode_fraction_of_bound.png"]  # no steps probed: one plot
    rd["ours"]["fp32"]["steps_c128"] = {"ms": [100.0, 90.0], "gbs": [10.0, 12.0]}
    rd["llamacpp"]["f32"]["steps_c128"] = {"ms": [150.0, 140.0], "gbs": [10.0, 11.0]}
    paths = plots(_results(rd), tmp_path)
    assert [p.name for p in paths] == ["decode_fraction_of_bound.png", "decode_steps_vs_bandwidth.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_the_step_clock_pairs_each_step_with_the_probes_on_either_side():
    from mmgpt.bench.llm import StepClock

    class Readings:  # stands in for the GEMV probe: bandwidths in the order they are read
        def __init__(self, values):
            self.values = iter(values)

        def now(self):
            return next(self.values)

    clock = StepClock(Readings([5.0, 9.0, 4.0, 6.0, 3.0]), warmup=1)
    for _ in range(4):
        clock.start()
        clock.stop()
    t = clock.timing()
    # probes 5 | step 0 (warm-up) | 9 | step 1 | 4 | step 2 | 6 | step 3 | 3 (read by timing())
    assert t.steps["gbs"] == [9.0, 6.0, 6.0] and len(t.steps["ms"]) == 3


def test_slow_figures_stop_repeating_at_their_budget(monkeypatch):
    """8 images through ViT-L/14-336 take ~25 s a call on 2 cores: such a figure is timed fewer times (after
    its warm-up, at least once), the fast ones `repeats` times."""
    from mmgpt.bench import llm as L

    calls = []
    for durations, want_timed, want in (([30.0, 1.0, 1.0], 1, 30.0), ([12.0, 9.0, 1.0], 2, 10.5),
                                        ([1.0, 3.0, 2.0, 9.0], 3, 2.0)):
        calls.clear()
        it = iter(durations)
        monkeypatch.setattr(L, "_seconds", lambda fn, it=it: (fn(), next(it))[1])
        assert L.median_seconds(lambda: calls.append(1), repeats=3, budget_s=20.0) == want
        assert len(calls) == 1 + want_timed  # the warm-up, then the timed calls


def test_engines_are_timed_in_turns_with_a_pause_before_each(monkeypatch):
    """Whisper's engines: a warm-up each, then rounds that time every engine once, the order rotated."""
    from mmgpt.bench import llm as L

    calls, events = [], []
    clock = iter(float(i) for i in range(1, 100))
    monkeypatch.setattr(L, "_seconds", lambda fn: (fn(), next(clock))[1])
    monkeypatch.setattr(L.time, "sleep", lambda s: events.append(("pause", s)))
    runs = {name: (lambda name=name: (calls.append(name), events.append(("run", name)))) for name in "abc"}
    out = L.interleaved_seconds(runs, rounds=3, pause_s=0.1)
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"] + ["c", "a", "b"]
    assert out == {"a": [1.0, 6.0, 8.0], "b": [2.0, 4.0, 9.0], "c": [3.0, 5.0, 7.0]}
    timed = events[3:]  # after the warm-ups, every timed call follows a pause
    assert timed[0::2] == [("pause", 0.1)] * 9 and all(e[0] == "run" for e in timed[1::2])


def test_whisper_ratios_are_taken_within_a_round_then_the_median():
    """Each round's engines ran side by side; across rounds the machine's speed moved. The headline is the
    median of the ratios within the rounds, not the ratio of the engines' medians."""
    from mmgpt.bench.report import headline

    results = {"settings": _results(_round({"fp32": 1.0}))["settings"], "kv_bytes_per_token": 0, "rounds": []}
    rounds = [{"ort_fp32": [0.04, 0.06, 0.05], "transformers_fp32": [0.10, 0.08, 0.12], "ort_int8": [0.01, 0.01, 0.01]},
              {"ort_int8": [0.02, 0.03, 0.035], "ctranslate2_int8": [0.04, 0.06, 0.05]}]
    medians = {f"{k}_rtf": float(np.median(v)) for group in rounds for k, v in group.items()}
    results["whisper"] = {"tokens": 64, "rtf_rounds": rounds, **medians}
    s = headline(results)
    assert s["whisper_rtf_ratio"] == pytest.approx(0.417)  # 0.4, 0.75, 0.417; the medians' ratio is 0.5
    # ours at int8 as timed beside CTranslate2 (its group), not beside transformers
    assert s["whisper_rtf_vs_ctranslate2_int8"] == pytest.approx(0.5)  # 0.5, 0.5, 0.7; the medians' ratio is 0.6


def test_decode_timers_probe_the_bandwidth_beside_each_step(tiny_export):
    from mmgpt.bench.llm import BandwidthProbe, ort_decode
    from mmgpt.runtime import llm_model

    probe = BandwidthProbe(threads=1, gib=0.01, k=256)
    try:
        t = ort_decode(llm_model(tiny_export / names.LLM_DIR, threads=1), batch=2, context=8, steps=3, probe=probe)
    finally:
        probe.close()
    assert len(t.steps["ms"]) == len(t.steps["gbs"]) == 3
    assert all(g > 0 for g in t.steps["gbs"]) and np.median(t.steps["ms"]) == pytest.approx(t.ms_per_token)


def test_onnx_weight_bytes_counts_every_initializer(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mmgpt.bench.llm import onnx_weight_bytes

    w = numpy_helper.from_array(np.ones((10, 20), np.float32), "w")
    q = numpy_helper.from_array(np.ones((5, 5), np.int8), "q")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 20])], initializer=[w, q])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert onnx_weight_bytes(path) == 10 * 20 * 4 + 5 * 5


def test_decode_timers_run_the_same_number_of_tokens(tiny_export, tiny_export_concat_kv, tiny_components):
    from mmgpt.bench.llm import hf_generate, ort_decode
    from mmgpt.runtime import llm_model

    for export in (tiny_export, tiny_export_concat_kv):  # both decoder layouts
        ort = ort_decode(llm_model(export / names.LLM_DIR, threads=1), batch=3, context=16, steps=4)
        assert np.isfinite(ort.ms_per_token) and ort.ms_per_token > 0
    import torch

    llm = tiny_components.model.llm.eval()
    ids = torch.arange(2, 18)[None]
    hf = hf_generate(llm, ids, 5)
    assert hf.ttft_s > 0 and np.isfinite(hf.ms_per_token)


def test_a_missing_llamacpp_says_how_to_get_it(monkeypatch):
    import sys

    from mmgpt.bench import llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as on a machine without the extra
    with pytest.raises(llamacpp.Unavailable, match="make bench"):
        llamacpp.check_available()


def test_bench_weights_answer_in_words_that_tokenize_back_to_the_same_ids():
    """The second-turn figure reuses the first answer's KV only if its text re-tokenizes to the same ids."""
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    from mmgpt.bench.models import speak_words
    from mmgpt.presets import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    llm = PhiForCausalLM(PhiConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, initializer_range=0.1)).eval()
    prompt = torch.tensor([tokenizer.encode("User: what is there?\nAssistant:")])

    def answer() -> list[int]:
        out = llm.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
        return out[0, prompt.shape[1]:].tolist()

    before = answer()
    assert tokenizer.encode(" " + tokenizer.decode(before).strip()) != before  # byte soup does not round-trip
    allowed = speak_words(llm, tokenizer)
    ids = answer()
    assert 10 < allowed < len(tokenizer)
    assert len(set(ids)) > 3
    assert tokenizer.encode(" " + tokenizer.decode(ids).strip()) == ids
