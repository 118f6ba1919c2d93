"""`make soak`: hold the served assistant under a mixed load, then break it on purpose; nothing may be lost.

    python -m mmgpt.serving.soak --export-dir artifacts/export --minutes 8 --clients 8 --out artifacts/soak

1. Starts tritonserver (supervised, loopback, free ports) on the export and asks every kind of request
   once, alone: those answers are the references (greedy, so an answer under load must equal them).
2. Load: `--clients` threads stream requests for `--minutes`, mixing text, image, audio, image + audio
   and multi-turn questions, with a fraction cancelled after the first piece and a fraction of bad
   inputs (a corrupt image, a WAV whose header declares 2,147,483,647 Hz, malformed history, max_tokens 0).
   Each request ends as one of: ok (the whole reference answer), expected (the error its bad input
   deserves, or a cancel), unexpected (any other error, or a wrong or truncated answer) or lost (sent and
   never answered: no final response within the client's timeout). The server's resident memory (every
   process of it) is read after the first fifth of the load and at its end.
3. Faults, one by one: each model process killed in turn (llm, whisper, vision_encoder, an entry-point
   instance) while requests run; clients that disconnect mid-stream; a burst of bad input; an overload
   beyond the entry point's queue; SIGTERM with answers in flight. Each passes when every request ended
   whole or with an explicit error (never silently cut, never lost) and the server answers correctly after.

It prints a table and, as its last line, one JSON object (also written to --out/soak.json); it exits 1
when anything unexpected happened, anything was lost, a fault case failed or memory grew past the bound.
A short version runs in `make test` (tests/test_soak.py). Loopback only; bounded in time and requests.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmgpt.client import ClientError, MMGPTClient
from mmgpt.client.api import ResponseTimeout
from mmgpt.serving.tritonserver import group_processes, metric_total

RSS_GROWTH_BOUND = 1.5  # end / after warm-up: the caches fill to their bounds; anything past this is a leak
CANCEL_FRACTION = 0.1
BAD_FRACTION = 0.1
CLIENT_TIMEOUT_S = 120.0  # a request with no response for this long counts as lost


# ------------------------------------------------------------------------------------------------
# Requests and outcomes
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    kind: str
    kwargs: dict[str, Any]
    expect_error: str | None = None  # a bad input: the error message must contain this
    cancel: bool = False  # close the stream after the first piece


@dataclass
class Outcome:
    kind: str
    status: str  # ok | expected | unexpected | lost
    ttft_s: float | None = None
    latency_s: float = 0.0
    detail: str = ""


def _png(image: bytes, transpose: int | None) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(image)).convert("RGB")
    if transpose is not None:
        img = img.transpose(transpose)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bad_wav_header(rate: int = 2_147_483_647) -> bytes:
    """A WAV file whose header declares `rate` Hz (a decoder that trusts it allocates gigabytes)."""
    import struct

    data = b"\0\0" * 160
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2 & 0xFFFFFFFF, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def workload(image: bytes, audio: bytes, max_tokens: int) -> dict[str, Job]:
    """The request kinds of the load, by name. Good ones have references; bad ones an expected error."""
    from PIL import Image

    flipped = _png(image, Image.Transpose.FLIP_LEFT_RIGHT)
    history = [{"role": "user", "content": "What color is the circle?"},
               {"role": "assistant", "content": "The circle is red."}]
    good = {
        "text": dict(text="What color is the circle?"),
        "image": dict(text="What color is the circle?", image=image),
        "image2": dict(text="Where is the star?", image=flipped),
        "audio": dict(audio=audio),
        "image+audio": dict(image=image, audio=audio),
        "multi-turn": dict(text="Where is it?", image=image, history=history),
    }
    jobs = {k: Job(k, {**v, "max_tokens": max_tokens}) for k, v in good.items()}
    # For the faults: an answer allowed to run long, so that a process killed mid-answer finds it streaming.
    jobs["long"] = Job("long", {"text": "Describe the picture in detail.", "image": image, "max_tokens": 8 * max_tokens})
    bad = {
        "bad-image": (dict(text="What is this?", image=b"\x89PNG\r\n\x1a\n" + b"\0" * 64), "image"),
        "bad-audio-rate": (dict(audio=bad_wav_header()), "sample rate"),
        "bad-history": (dict(text="q", history=[{"role": "user", "content": "only a question"}]), "pairs"),
        "bad-max-tokens": (dict(text="q", max_tokens=0), "max_tokens"),
    }
    for k, (kw, expect) in bad.items():
        jobs[k] = Job(k, kw, expect_error=expect)
    jobs["cancel"] = Job("cancel", {**good["image"], "max_tokens": max_tokens}, cancel=True)
    return jobs


class Runner:
    """Sends jobs through one MMGPTClient and judges each outcome against the references."""

    def __init__(self, url: str, references: dict[str, str] | None = None, timeout_s: float = CLIENT_TIMEOUT_S):
        self.client = MMGPTClient(url, timeout=timeout_s)
        self.references = references or {}

    def answer(self, job: Job) -> tuple[str, float | None]:
        """(whole answer, time to first text) of a good job; raises the client's errors."""
        kw = dict(job.kwargs)
        started = time.perf_counter()
        first = None
        parts: list[str] = []
        with self.client.stream(kw.pop("text", ""), **kw) as stream:
            for piece in stream:
                if piece.text:
                    first = first if first is not None else time.perf_counter() - started
                    parts.append(piece.text)
                    if job.cancel:
                        break
        return "".join(parts), first

    def run(self, job: Job) -> Outcome:
        started = time.perf_counter()
        try:
            text, ttft = self.answer(job)
        except ResponseTimeout as e:
            return Outcome(job.kind, "lost", None, time.perf_counter() - started, str(e))
        except ClientError as e:
            elapsed = time.perf_counter() - started
            if job.expect_error is not None and job.expect_error in str(e):
                return Outcome(job.kind, "expected", None, elapsed, str(e)[:200])
            return Outcome(job.kind, "unexpected", None, elapsed, f"{type(e).__name__}: {e}"[:300])
        except Exception as e:  # the client library must not raise anything else
            return Outcome(job.kind, "unexpected", None, time.perf_counter() - started, f"{type(e).__name__}: {e}"[:300])
        elapsed = time.perf_counter() - started
        if job.expect_error is not None:
            return Outcome(job.kind, "unexpected", ttft, elapsed, f"bad input was answered: {text[:80]!r}")
        if job.cancel:
            return Outcome(job.kind, "expected", ttft, elapsed, "cancelled after the first piece")
        want = self.references.get(job.kind)
        if want is not None and text != want:
            return Outcome(job.kind, "unexpected", ttft, elapsed, f"answer {text[:60]!r} != reference {want[:60]!r}")
        return Outcome(job.kind, "ok", ttft, elapsed)


# ------------------------------------------------------------------------------------------------
# The server's memory and metrics
# ------------------------------------------------------------------------------------------------


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process in a process group (the server and its model processes)."""
    page = os.sysconf("SC_PAGE_SIZE")
    return sum(int(f[21]) * page for f in group_processes(pgid).values() if len(f) > 21)  # rss, in pages


def metric(url: str, name: str) -> float:
    """Sum of a Prometheus family's samples on the server's /metrics."""
    total = metric_total(url, name, timeout=10)
    if total is None:
        raise ConnectionError(f"cannot read {url}")
    return total


# ------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------


def pick(rng, jobs: dict[str, Job]) -> Job:
    r = rng.random()
    if r < CANCEL_FRACTION:
        return jobs["cancel"]
    if r < CANCEL_FRACTION + BAD_FRACTION:
        return jobs[rng.choice([k for k in jobs if k.startswith("bad-")])]
    return jobs[rng.choice([k for k, j in jobs.items() if j.expect_error is None and not j.cancel and k != "long"])]


def load(runner: Runner, jobs: dict[str, Job], *, clients: int, seconds: float, seed: int = 0,
         on_progress: Callable[[float], None] | None = None, max_requests: int = 100_000) -> list[Outcome]:
    """`clients` threads send jobs back to back for `seconds`; every outcome, in no particular order."""
    import random

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    sent = [0]

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= max_requests:
                    return
                sent[0] += 1
            outcome = runner.run(pick(rng, jobs))
            with lock:
                outcomes.append(outcome)
            if "ServerUnavailable" in outcome.detail:
                time.sleep(1.0)  # as a client would: a server being restarted is not hammered (nor counted 1,000 times)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        if on_progress is not None:
            on_progress(min(1.0, 1 - (deadline - time.monotonic()) / seconds))
        if time.monotonic() > deadline + CLIENT_TIMEOUT_S + 30:
            break
    lost = sent[0] - len(outcomes)  # a thread still waiting long past every timeout: never answered
    return outcomes + [Outcome("?", "lost", None, 0.0, "no outcome: the client never returned")] * lost


# ------------------------------------------------------------------------------------------------
# Faults
# ------------------------------------------------------------------------------------------------


@dataclass
class FaultResult:
    name: str
    passed: bool
    detail: str
    outcomes: list[Outcome] = field(default_factory=list)


def _concurrently(runner: Runner, jobs: Sequence[Job], during: Callable[[], None] | None = None,
                  delay_s: float = 0.3) -> list[Outcome]:
    """Run jobs at once; call `during` `delay_s` after they started; every outcome in job order."""
    out: list[Outcome | None] = [None] * len(jobs)

    def one(i: int) -> None:
        out[i] = runner.run(jobs[i])

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    if during is not None:
        time.sleep(delay_s)
        during()
    for t in threads:
        t.join(CLIENT_TIMEOUT_S + 30)
    return [o if o is not None else Outcome(j.kind, "lost", detail="never returned") for o, j in zip(out, jobs)]


def _whole_or_explicit(outcomes: list[Outcome]) -> tuple[bool, str]:
    """Every request ended with its whole reference answer or an explicit error; none lost or cut short."""
    lost = [o for o in outcomes if o.status == "lost"]
    wrong = [o for o in outcomes if o.status == "unexpected" and "!= reference" in o.detail]
    ok = sum(o.status == "ok" for o in outcomes)
    errors = sorted({o.detail[:90] for o in outcomes if o.status == "unexpected" and o not in wrong})
    passed = not lost and not wrong
    return passed, f"{ok} whole, {len(outcomes) - ok - len(lost) - len(wrong)} explicit errors {errors[:2]}, " \
                   f"{len(wrong)} wrong or cut short, {len(lost)} lost"


def _recovers(runner: Runner, jobs: dict[str, Job], kinds: Sequence[str], within_s: float = 60.0) -> tuple[bool, str]:
    """Within `within_s`, each kind is answered with its reference again."""
    deadline = time.monotonic() + within_s
    last = ""
    while time.monotonic() < deadline:
        outcomes = [runner.run(jobs[k]) for k in kinds]
        if all(o.status == "ok" for o in outcomes):
            return True, f"answered correctly again after {within_s - (deadline - time.monotonic()):.1f} s"
        last = "; ".join(o.detail[:80] for o in outcomes if o.status != "ok")
        time.sleep(0.5)
    return False, f"not answering correctly {within_s:g} s later: {last}"


def kill_model(server, runner: Runner, jobs: dict[str, Job], model: str, kinds: Sequence[str]) -> FaultResult:
    """SIGKILL one process of `model` while requests that use it run."""
    victims: list[int] = []

    def kill() -> None:
        # An entry-point process is killed while it answers (its busy file), never one that may be idle: the
        # case that matters is a requester dying with the LLM still streaming to it (llm.RequesterQueues).
        deadline = time.monotonic() + 5
        while model == "multimodal" and not server.answering() and time.monotonic() < deadline:
            time.sleep(0.02)
        busy = server.answering() if model == "multimodal" else []
        pids = busy[:1] or sorted(p for p, m in server.model_processes().items() if m == model)
        if pids:
            victims.append(pids[0])
            os.kill(pids[0], signal.SIGKILL)

    before = len(server.restarts)
    outcomes = _concurrently(runner, [jobs[k] for k in kinds for _ in range(2)], kill, delay_s=0.15)
    passed, detail = _whole_or_explicit(outcomes)
    settled = _settle(server, before)
    again, after = _recovers(runner, jobs, kinds, within_s=120)
    # The model is loaded again; or, when its death took tritonserver down with it (Triton 2.51 can abort
    # on a lock the dead process held), the whole server is started again: either way it answers again.
    restarted = sorted({m for m, _ in server.restarts[before:]})
    return FaultResult(f"kill {model}", passed and again and bool(victims) and bool(restarted) and settled,
                       f"killed pid {victims}; in flight: {detail}; {after}; restarted: {restarted}", outcomes)


def _settle(server, before: int, within_s: float = 120.0) -> bool:
    """Wait until the launcher has noticed the death (a new entry in `restarts`) and finished loading the
    model again: until then requests can still reach the dead process (and fail, with its error)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if len(server.restarts) > before and not server.recovering.is_set():
            return True
        time.sleep(0.2)
    return False


def disconnects(server, runner: Runner, jobs: dict[str, Job]) -> FaultResult:
    """Clients that close their stream after the first piece: the LLM lets their sequences go at once."""
    outcomes = _concurrently(runner, [jobs["cancel"]] * 6)
    deadline = time.monotonic() + 10
    active = metric(server.metrics_url, "mmgpt_llm_active_sequences")
    while active and time.monotonic() < deadline:
        time.sleep(0.2)
        active = metric(server.metrics_url, "mmgpt_llm_active_sequences")
    ok = all(o.status == "expected" for o in outcomes) and active == 0
    again, after = _recovers(runner, jobs, ["image"])
    others = sorted({o.detail[:120] for o in outcomes if o.status != "expected"})
    return FaultResult("client disconnects", ok and again,
                       f"{sum(o.status == 'expected' for o in outcomes)}/6 closed cleanly {others[:2]}; active "
                       f"sequences after: {active:g}; {after}", outcomes)


def bad_burst(server, runner: Runner, jobs: dict[str, Job]) -> FaultResult:
    """Every kind of bad input at once, several times: each gets its error; the server stays ready."""
    bad = [j for j in jobs.values() if j.expect_error is not None] * 2  # within the instances + queue
    outcomes = _concurrently(runner, bad)
    named = sum(o.status == "expected" for o in outcomes)
    ready = server.is_ready()
    again, after = _recovers(runner, jobs, ["image", "audio"])
    others = sorted({o.detail[:120] for o in outcomes if o.status != "expected"})
    return FaultResult("bad input burst", named == len(bad) and ready and again,
                       f"{named}/{len(bad)} refused with the error naming the problem {others[:2]}; ready: {ready}; "
                       f"{after}", outcomes)


def overload(server, runner: Runner, jobs: dict[str, Job], requests: int) -> FaultResult:
    """More requests at once than the entry point's instances and queue hold: each is answered whole or
    refused as busy at once; none waits forever."""
    outcomes = _concurrently(runner, [jobs["image+audio"]] * requests)  # slow enough to fill the queue
    busy = sum(o.status == "unexpected" and "ServerBusy" in o.detail for o in outcomes)
    ok = sum(o.status == "ok" for o in outcomes)
    other = [o.detail[:90] for o in outcomes if o.status not in ("ok",) and "ServerBusy" not in o.detail]
    for o in outcomes:  # a busy refusal is what an overload should get
        if "ServerBusy" in o.detail:
            o.status = "expected"
    again, after = _recovers(runner, jobs, ["image"])
    return FaultResult("overload", not other and ok > 0 and busy > 0 and again,
                       f"{requests} at once: {ok} whole, {busy} refused as busy, others {other[:2]}; {after}", outcomes)


def drain(server, runner: Runner, jobs: dict[str, Job]) -> FaultResult:
    """SIGTERM with answers in flight: they finish whole, a new request is refused, the server exits 0.

    Run on a server no fault touched: Triton 2.51 never releases a request that a killed process held, so
    a server that lost a process waits out its exit timeout when stopped and exits 1 (see the README)."""
    late: list[Outcome] = []
    codes: list[int | None] = []
    stopper = threading.Thread(target=lambda: codes.append(server.stop()), daemon=True)

    def terminate() -> None:
        stopper.start()
        time.sleep(0.3)
        late.append(runner.run(jobs["text"]))

    inflight = [jobs[k] for k in ("long", "audio", "multi-turn", "image+audio")]  # within the instances
    started = time.monotonic()
    outcomes = _concurrently(runner, inflight, terminate, delay_s=0.1)
    stopper.join(server.exit_timeout_s + 30)
    whole = sum(o.status == "ok" for o in outcomes)
    refused = bool(late) and late[0].status == "unexpected"  # an explicit error, not an answer, not lost
    code = codes[0] if codes else None
    for o in late:
        o.status = "expected" if refused else o.status
    return FaultResult("SIGTERM drain", whole == len(inflight) and refused and code == 0,
                       f"{whole}/{len(inflight)} in flight finished whole; a request after SIGTERM: "
                       f"{late[0].detail[:90] if late else 'not sent'}; exit code {code} after "
                       f"{time.monotonic() - started:.1f} s", outcomes + late)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def report(outcomes: list[Outcome], faults: list[FaultResult], rss_warm: int, rss_end: int, seconds: float,
           server_restarts: int = 0) -> dict:
    ttft = [o.ttft_s for o in outcomes if o.status == "ok" and o.ttft_s is not None]
    latency = [o.latency_s for o in outcomes if o.status == "ok"]
    every = outcomes + [o for f in faults for o in f.outcomes]
    fault_unexpected = [o for f in faults if not f.passed for o in f.outcomes if o.status == "unexpected"]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    growth = rss_end / rss_warm if rss_warm else None
    out = {
        "requests": len(every),
        "succeeded": sum(o.status == "ok" for o in every),
        "failed_expected": sum(o.status == "expected" for o in every),
        # under load every error is unexpected; in a fault case, errors are expected where it passed
        "failed_unexpected": sum(o.status == "unexpected" for o in outcomes) + len(fault_unexpected),
        "lost": sum(o.status == "lost" for o in every),
        "load_requests": len(outcomes),
        "p50_ttft_ms": ms(percentile(ttft, 0.5)),
        "p99_ttft_ms": ms(percentile(ttft, 0.99)),
        "p50_latency_ms": ms(percentile(latency, 0.5)),
        "p99_latency_ms": ms(percentile(latency, 0.99)),
        "rss_warm_mb": round(rss_warm / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth_ratio": None if growth is None else round(growth, 3),
        "rss_growth_bound": RSS_GROWTH_BOUND,
        # tritonserver itself died during the load and the launcher started it again (Triton 2.51 crashes
        # seen here: a segfault in TRITONBACKEND_ResponseFactorySendFlags under cancellations)
        "server_restarts_under_load": server_restarts,
        "faults_passed": sum(f.passed for f in faults),
        "faults_total": len(faults),
        "faults": {f.name: ("pass: " if f.passed else "FAIL: ") + f.detail for f in faults},
        "unexpected_examples": sorted({o.detail[:160] for o in outcomes if o.status == "unexpected"})[:5],
        "seconds": round(seconds, 1),
    }
    out["ok"] = (out["failed_unexpected"] == 0 and out["lost"] == 0 and out["faults_passed"] == out["faults_total"]
                 and server_restarts == 0
                 and growth is not None and growth <= RSS_GROWTH_BOUND)
    return out


def table(r: dict) -> str:
    lines = [f"requests {r['requests']}: {r['succeeded']} whole answers, {r['failed_expected']} expected errors "
             f"(bad input, cancels, busy, faults), {r['failed_unexpected']} unexpected, {r['lost']} lost",
             f"under load ({r['load_requests']}): time to first token p50 {r['p50_ttft_ms']} ms, p99 {r['p99_ttft_ms']} ms; "
             f"answer p50 {r['p50_latency_ms']} ms, p99 {r['p99_latency_ms']} ms",
             f"server memory: {r['rss_warm_mb']} MB after warm-up, {r['rss_end_mb']} MB at the end "
             f"(x{r['rss_growth_ratio']}, bound x{r['rss_growth_bound']}); tritonserver restarted "
             f"{r['server_restarts_under_load']} times under load",
             f"faults {r['faults_passed']}/{r['faults_total']}:"]
    lines += [f"  {name}: {detail}" for name, detail in r["faults"].items()]
    lines += [f"  unexpected: {e}" for e in r["unexpected_examples"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    from mmgpt.serving.demo import asset
    from mmgpt.serving.repository import assemble_repository
    from mmgpt.serving.tritonserver import TritonServer

    p = argparse.ArgumentParser(prog="python -m mmgpt.serving.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--export-dir", default="artifacts/export", help="what `make export` wrote")
    p.add_argument("--out", default="artifacts/soak", help="repository, server log and soak.json go here")
    p.add_argument("--minutes", type=float, default=8.0, help="length of the mixed load (default 8)")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default 8)")
    p.add_argument("--max-tokens", type=int, default=48, help="max_tokens of every good request (default 48)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop the load after this many requests")
    p.add_argument("--image", type=Path, default=asset("demo.png"))
    p.add_argument("--audio", type=Path, default=asset("demo.wav"))
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.clients < 1:
        p.error("--minutes must be > 0 and --clients >= 1")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    entry_instances, entry_queue = 4, 8
    repo = assemble_repository(a.export_dir, out / "triton_repo", entry_instances=entry_instances,
                               entry_max_queue=entry_queue)
    server = TritonServer(repo, log_file=out / "tritonserver.log")
    faults: list[FaultResult] = []
    with server:
        runner = Runner(server.grpc_url)
        jobs = workload(a.image.read_bytes(), a.audio.read_bytes(), a.max_tokens)
        for name, job in jobs.items():  # the references: each good kind asked alone
            if job.expect_error is None and not job.cancel:
                runner.references[name] = runner.answer(job)[0]
        print(f"server ready on {server.grpc_url}; references: {len(runner.references)} kinds; load: {a.clients} "
              f"clients for {a.minutes:g} min", flush=True)

        seconds = a.minutes * 60
        rss: dict[str, int] = {}

        def progress(done: float) -> None:
            if "warm" not in rss and done >= 0.2:
                rss["warm"] = group_rss_bytes(server.pid)

        outcomes = load(runner, jobs, clients=a.clients, seconds=seconds, on_progress=progress,
                        max_requests=a.max_requests)
        crashes = sum(m == "tritonserver" for m, _ in server.restarts)
        rss.setdefault("warm", group_rss_bytes(server.pid))
        rss["end"] = group_rss_bytes(server.pid)
        print(f"load done: {len(outcomes)} requests", flush=True)

        cases: list[tuple[str, Callable[[], FaultResult]]] = [
            ("kill llm", lambda: kill_model(server, runner, jobs, "llm", ["long", "image"])),
            ("kill whisper", lambda: kill_model(server, runner, jobs, "whisper", ["audio"])),
            ("kill vision_encoder", lambda: kill_model(server, runner, jobs, "vision_encoder", ["image2"])),
            ("kill multimodal", lambda: kill_model(server, runner, jobs, "multimodal", ["long", "text"])),
            ("client disconnects", lambda: disconnects(server, runner, jobs)),
            ("bad input burst", lambda: bad_burst(server, runner, jobs)),
            ("overload", lambda: overload(server, runner, jobs, 3 * (entry_instances + entry_queue))),
        ]
        for name, case in cases:
            faults.append(_run_case(name, case))
        # Requests that killed processes held stay in flight for good (Triton 2.51): no clean stop to wait for.
        server.stop(timeout=10, drain=False)

    # SIGTERM on a server no fault touched (see `drain`).
    fresh = TritonServer(repo, log_file=out / "tritonserver-drain.log")
    with fresh:
        again = Runner(fresh.grpc_url, runner.references)
        faults.append(_run_case("SIGTERM drain", lambda: drain(fresh, again, jobs)))

    result = report(outcomes, faults, rss["warm"], rss["end"], time.monotonic() - started, crashes)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result), flush=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("faults", "unexpected_examples")}), flush=True)
    return result


def _run_case(name: str, case: Callable[[], FaultResult]) -> FaultResult:
    try:
        result = case()
    except Exception as e:  # a fault case that breaks is a failed case, reported like the others
        result = FaultResult(name, False, f"the case itself failed: {type(e).__name__}: {e}")
    print(f"fault {result.name}: {'pass' if result.passed else 'FAIL'}: {result.detail}", flush=True)
    return result


def cli(argv: Sequence[str] | None = None) -> int:
    return 0 if main(argv)["ok"] else 1


if __name__ == "__main__":
    sys.exit(cli())


__all__ = ["FaultResult", "Job", "Outcome", "Runner", "main", "workload"]
