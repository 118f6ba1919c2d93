"""LLM timings: this project's ONNX decoder (fp32, int8, 4-bit) against transformers `generate()` (eager,
with its KV cache) on the same weights, and the machine's read-bandwidth bound they are measured against.

Decode is memory-bound on a CPU: every step streams every weight once (and every row's KV cache), so the
fastest a step can be is bytes streamed / read bandwidth. The bandwidth is measured here, in the same
process, with the same threads, as the best of a large GEMV in ONNX Runtime and in torch.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GIB = 2**30


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


class BandwidthProbe:
    """The machine's best read bandwidth, by GEMV y = x @ W over `gib` GiB of weights, several ways: fp32 in
    ONNX Runtime (W fed as an input, and held as a constant that it may pre-pack, as it does a decoder's),
    int8 in ONNX Runtime (MatMulInteger, constant), fp32 in torch. Built once, measured whenever asked: the
    bench probes at the start and end of every round, next to the figures it bounds."""

    def __init__(self, threads: int, gib: float = 1.0, k: int = 4096):
        import tempfile

        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        from mmgpt.runtime import ort_session

        self.runs = {}
        self._tmp = tempfile.TemporaryDirectory()
        for name, integer, constant in (("ort_gemv_fp32_input", False, False), ("ort_gemv_fp32_constant", False, True),
                                        ("ort_gemv_int8_constant", True, True)):
            n = int(gib * GIB / (1 if integer else 4) / k)
            if integer:
                w, x = np.full((k, n), 3, np.int8), np.ones((1, k), np.uint8)
                node = helper.make_node("MatMulInteger", ["x", "w"], ["y"])
                types = (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32)
            else:
                w, x = np.full((k, n), 0.01, np.float32), np.ones((1, k), np.float32)
                node = helper.make_node("MatMul", ["x", "w"], ["y"])
                types = (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT)
            inputs = [helper.make_tensor_value_info("x", types[0], [1, k])]
            if not constant:
                inputs.append(helper.make_tensor_value_info("w", types[1], [k, n]))
            graph = helper.make_graph([node], name, inputs, [helper.make_tensor_value_info("y", types[2], [1, n])],
                                      initializer=[numpy_helper.from_array(w, "w")] if constant else [])
            path = Path(self._tmp.name) / f"{name}.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
            session = ort_session(path, threads)
            feed = {"x": x} if constant else {"x": x, "w": w}
            self.runs[name] = (lambda session=session, feed=feed: session.run(["y"], feed), w.nbytes)
            if name == "ort_gemv_fp32_input":
                input_feed = feed
        torch.set_num_threads(threads)
        tw, tx = torch.full((k, int(gib * GIB / 4 / k)), 0.01), torch.ones((1, k))
        self.runs["torch_gemv_fp32"] = (lambda: torch.mm(tx, tw), tw.numel() * 4)
        # Read between decode steps (`now`): the fp32 GEMV with W as an input, the fastest kind in every run so
        # far, in a session that does not spin-wait (its threads must not steal the cores from the next step)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        now = ort.InferenceSession(str(Path(self._tmp.name) / "ort_gemv_fp32_input.onnx"), so, providers=["CPUExecutionProvider"])
        self._now = (lambda: now.run(["y"], input_feed), input_feed["w"].nbytes)  # the same 1 GiB weight
        # Compute, not bandwidth: 64 rows through a Phi-2 MLP-sized constant weight (2560 x 10240), the fp32
        # GEMM a batched decode step is made of, at enough rows that the weight's bytes do not limit it.
        # And the same constant 1 GiB weight as the GEMV above at 8 rows (a batch-8 decode step's shape), as the
        # GB/s of weights it reads: how far the kernel is from the GEMV's rate when the rows are few.
        self.gemm = {}
        for name, m, kk, n in (("gemm_fp32_gflops", 64, 2560, 10240), ("gemm8_fp32_weights_gbs", 8, k, int(gib * GIB / 4 / k))):
            graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], name,
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, kk])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                                      initializer=[numpy_helper.from_array(np.full((kk, n), 0.01, np.float32), "w")])
            path = Path(self._tmp.name) / f"{name}.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
            session, gx = ort_session(path, threads), np.ones((m, kk), np.float32)
            work = 2 * m * kk * n if name.endswith("gflops") else kk * n * 4  # flops, or weight bytes
            self.gemm[name] = (lambda session=session, gx=gx: session.run(["y"], {"x": gx}), work)

    def measure(self, repeats: int = 10) -> dict:
        out = {}
        with torch.no_grad():
            for name, (run, nbytes) in self.runs.items():
                run()  # warm-up
                best = min(_seconds(run) for _ in range(repeats))
                out[f"{name}_gbs"] = nbytes / best / 1e9
        out["bandwidth_gbs"] = max(out.values())
        for name, (run, work) in self.gemm.items():
            run()
            out[name] = work / min(_seconds(run) for _ in range(repeats)) / 1e9
        return out

    def now(self) -> float:
        """GB/s read right now, for the decode step just before and the one just after (best of 2).

        It first waits 60 ms: ONNX Runtime's threads spin-wait for tens of milliseconds after a run, and a probe
        read in that time shares the cores with them (measured: ~23 GB/s after 5 ms, ~35 after 50, idle 35).

        This machine's bandwidth moves between two levels (e.g. ~37 and ~54 GB/s) for bursts of seconds, so
        a bound taken once a round may come from the other level than the steps it bounds; each step is
        instead held against the probes on either side of it (`paired_fraction`)."""
        time.sleep(0.06)
        run, nbytes = self._now
        return nbytes / min(_seconds(run) for _ in range(2)) / 1e9

    def close(self) -> None:
        self._now = None
        self.runs.clear()
        self.gemm.clear()
        self._tmp.cleanup()


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_seconds(fn, repeats: int, budget_s: float = 20.0) -> float:
    """Median seconds of `repeats` calls after one warm-up call, fewer where the timed calls reach `budget_s`
    (at least one is timed): 8 images through ViT-L/14-336 take ~25 s a call on 2 cores, and three of them per
    engine were ~4 of the bench's 30 minutes."""
    fn()
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget_s:
        times.append(_seconds(fn))
    return statistics.median(times)


def interleaved_seconds(runs: dict, rounds: int, pause_s: float = 0.1) -> dict[str, list[float]]:
    """Seconds of each engine's call in `runs` (name -> callable), timed in turns: one warm-up call each, then
    `rounds` rounds that time every engine once, the order rotated each round. This machine's speed moves for
    seconds at a time; timed one engine after the other, a ratio of their medians could divide a fast stretch
    by a slow one, where a ratio taken within a round compares engines timed side by side.

    Each call waits `pause_s` first: an engine's threads spin-wait for tens of milliseconds after it returns
    (ONNX Runtime's, OpenMP's), and would share the cores with the next engine's call."""
    names = list(runs)
    for name in names:
        runs[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            time.sleep(pause_s)
            out[name].append(_seconds(runs[name]))
    return out


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of every initializer of a graph (external data included): what one decode step streams."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer)


def torch_weight_bytes(llm) -> int:
    """fp32 bytes streamed per step by a PyTorch Phi: every parameter but the embedding table (one row read)."""
    embed = llm.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in llm.parameters() if p is not embed)


def kv_bytes_per_token(layers: int, heads: int, head_dim: int, itemsize: int = 4) -> int:
    return 2 * layers * heads * head_dim * itemsize


@dataclass
class DecodeTiming:
    ms_per_token: float  # median over the steps
    ttft_s: float | None = None  # time to the first token, when a prompt was prefilled
    steps: dict | None = None  # with a probe: {"ms": each timed step, "gbs": the larger probe on either side}


class StepClock:
    """Times decode steps; given a BandwidthProbe, reads the bandwidth before every step and after the last,
    outside the timed span, so that each step has a probe on either side of it."""

    def __init__(self, probe: BandwidthProbe | None = None, warmup: int = 2):
        self.probe, self.warmup = probe, warmup
        self.seconds: list[float] = []
        self.gbs: list[float] = []

    def start(self) -> None:
        if self.probe is not None:
            self.gbs.append(self.probe.now())
        self.t = time.perf_counter()

    def stop(self) -> None:
        self.seconds.append(time.perf_counter() - self.t)

    def timing(self, ttft_s: float | None = None) -> DecodeTiming:
        if self.probe is not None and len(self.gbs) == len(self.seconds):
            self.gbs.append(self.probe.now())
        timed = self.seconds[self.warmup:]
        steps = None
        if self.probe is not None:
            around = list(zip(self.gbs[self.warmup:], self.gbs[self.warmup + 1:]))
            steps = {"ms": [1000 * x for x in timed], "gbs": [max(a, b) for a, b in around]}
        return DecodeTiming(median_ms(timed) if timed else float("nan"), ttft_s, steps)


def ort_decode(model, batch: int, context: int, steps: int, seed: int = 0, probe: BandwidthProbe | None = None) -> DecodeTiming:
    """Median step time of the project's decoder, `batch` rows, starting from a `context`-token cache (and,
    with `probe`, the bandwidth around each step).

    The cache is filled with random keys/values instead of a prefill: a step's cost depends on the cache's
    shape, not its contents, and a 1,024-token prefill per engine would double the bench's time.
    """
    rng = np.random.default_rng(seed)
    shape = (batch, model.num_kv_heads, context, model.head_dim)
    past = [(0.1 * rng.standard_normal(shape)).astype(np.float32) for _ in range(2 * model.num_layers)]
    ids = rng.integers(0, model.vocab_size, (batch, 1))
    clock = StepClock(probe)
    if getattr(model, "shared_kv", False):  # the cache written in place: filled once, rows at `context` tokens
        cache = model.new_cache()
        cache.reserve(batch, context + steps + 2)
        for a, p in zip(cache.arrays, past):
            a[:, :, :context] = p
        lengths = np.full(batch, context)
        for _ in range(steps + 2):  # two warm-up steps
            clock.start()
            logits = model.run(model.embed(ids, None), cache, 0, lengths)
            ids = logits[:, -1].argmax(-1)[:, None]
            clock.stop()
            lengths = lengths + 1
        return clock.timing()
    for i in range(steps + 2):
        embeds = model.embed(ids, None)
        mask = np.ones((batch, context + i + 1), np.int64)
        pos = np.full((batch, 1), context + i, np.int64)
        clock.start()
        logits, past = model.run(embeds, mask, pos, past)
        ids = logits[:, -1].argmax(-1)[:, None]
        clock.stop()
    return clock.timing()


def ort_prefill_ttft(vision, model, pixels: np.ndarray, input_ids: np.ndarray, repeats: int) -> float:
    """Seconds from pixels + prompt ids to the first token: vision encoder, splice, prefill, argmax."""
    ids = input_ids[None]

    def first_token() -> int:
        if getattr(model, "shared_kv", False):
            logits = model.run(model.embed(ids, vision(pixels)), model.new_cache(), 0, np.zeros(1, np.int64))
        else:
            logits, _ = model.run(model.embed(ids, vision(pixels)), np.ones(ids.shape, np.int64),
                                  np.arange(ids.shape[1], dtype=np.int64)[None], model.empty_past(1))
        return int(logits[0, -1].argmax())

    return median_seconds(first_token, repeats)


class _Clock:
    """A transformers streamer that notes when each new token arrives (and, with a probe, reads the bandwidth
    between tokens, outside the steps it times)."""

    def __init__(self, probe: BandwidthProbe | None = None):
        self.steps = StepClock(probe, warmup=0)
        self.first: float | None = None
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        if self.first is None:
            self.first = time.perf_counter()
        else:
            self.steps.stop()
        self.steps.start()

    def end(self):
        pass


def hf_generate(llm, input_ids: torch.Tensor | None, new_tokens: int, *, inputs_embeds: torch.Tensor | None = None,
                before=None, probe: BandwidthProbe | None = None) -> DecodeTiming:
    """transformers `generate()`, greedy, eager attention, its own KV cache: TTFT and median inter-token time
    (and, with `probe`, the bandwidth around each step).

    `before` (optional) runs inside the clock first, e.g. the vision encoder for a prompt with an image.
    """
    clock = _Clock(probe)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
              pad_token_id=llm.config.eos_token_id, use_cache=True)
    with torch.no_grad():
        t = time.perf_counter()
        if before is not None:
            inputs_embeds = before()
        if inputs_embeds is not None:
            llm.generate(inputs_embeds=inputs_embeds, attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long), **kw)
        else:
            llm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)
    # the clock was started after the last token too: that span timed nothing
    return clock.steps.timing(clock.first - t)
