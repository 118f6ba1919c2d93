"""Served end to end through the real tritonserver at Phi-2 width: time to first token, inter-token latency,
answer latency and total output tokens/s at several concurrencies; the same request in-process (the
serving overhead); a second turn about the same image against the first; and how many times a repeated
image is encoded.

The served repository is the project's own (`assemble_repository`) over the bench's exports: the Phi-2-width
decoder (fp32) and CLIP ViT-B/32 + projector, with the tiny preset's Whisper (audio is not timed here; the
repository needs one).
"""

from __future__ import annotations

import io
import re
import shutil
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUESTION = ("Describe the picture in detail: which shapes and colors are there, where is each of them, "
            "and what is next to what? Answer in a few short sentences.")
FOLLOW_UP = "And which of them is the largest one?"


@dataclass
class Timing:
    ttft_s: float
    latency_s: float
    pieces: int
    text: str


def export_dir(work: Path, cfg_threads: int) -> Path:
    """An export folder for the server: the bench's vision and LLM exports, the tiny Whisper, a config."""
    from mmgpt import names
    from mmgpt.config import MMGPTConfig
    from mmgpt.export.__main__ import main as export
    from mmgpt.presets import tiny_checkpoint, tiny_tokenizer

    from .models import CLIP, PHI2

    d = work / "served-export"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    tiny = export(str(tiny_checkpoint()), str(work / "tiny-export"), only=("whisper",))
    (d / names.VISION_DIR).symlink_to((work / "vision").resolve())
    (d / names.LLM_DIR).symlink_to((work / "llm").resolve())
    (d / names.WHISPER_DIR).symlink_to((tiny / names.WHISPER_DIR).resolve())
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(d / names.TOKENIZER_DIR)
    v = CLIP["b32"]
    MMGPTConfig(
        preset="bench", vision_source="vision", llm_source="llm", whisper_source="whisper",
        vision_hidden_size=v["hidden_size"], llm_hidden_size=PHI2["hidden_size"], llm_vocab_size=PHI2["vocab_size"],
        num_image_tokens=(v["image_size"] // v["patch_size"]) ** 2, image_size=v["image_size"],
        max_context=PHI2["max_position_embeddings"], eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, speech=MMGPTConfig.load(tiny).speech,
    ).save(d)
    return d


def picture(seed: int, size: int = 224) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def metric(url: str, name: str, labels: str = "") -> float:
    """Sum of a Prometheus family's samples (those whose labels contain `labels`)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def _timed(start: float, pieces) -> Timing:
    """Read a stream of text pieces to its end: time to the first non-empty piece, and to the end."""
    first, out = None, []
    for text in pieces:
        if text:
            first = first or time.perf_counter()
            out.append(text)
    end = time.perf_counter()
    return Timing((first or end) - start, end - start, len(out), "".join(out))


def ask_timed(client, text: str, image: bytes, max_tokens: int, history=()) -> Timing:
    t = time.perf_counter()
    with client.stream(text, image=image, history=history, max_tokens=max_tokens) as answer:
        return _timed(t, (piece.text for piece in answer))


def load(url: str, clients: int, per_client: int, max_tokens: int, run: int = 0) -> tuple[list[Timing], float]:
    """`clients` streaming clients at once, each asking `per_client` questions in a row, each about a picture
    of its own (no cache may answer one request from another, nor one run from another: `run` numbers
    them) -> timings and wall seconds."""
    from mmgpt.client import MMGPTClient

    timings: list[Timing] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        client = MMGPTClient(url, timeout=600)
        for j in range(per_client):
            try:
                t = ask_timed(client, QUESTION, picture(100_000 * run + 1000 * clients + 10 * k + j), max_tokens)
            except Exception as e:  # counted and raised below: a failed request must not vanish from the figures
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                timings.append(t)

    start = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients * per_client} served requests failed: {errors[0]}")
    return timings, time.perf_counter() - start


def in_process_assistant(export: Path, threads: int):
    """The same ONNX files in this process: the engine without the server."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    from mmgpt import names
    from mmgpt.config import MMGPTConfig
    from mmgpt.inference import Assistant
    from mmgpt.runtime import OrtVision, llm_model

    llm = llm_model(export / names.LLM_DIR, threads)
    return Assistant(MMGPTConfig.load(export), AutoTokenizer.from_pretrained(export / names.TOKENIZER_DIR),
                     CLIPImageProcessor.from_pretrained(export / names.VISION_DIR),
                     encode_image=OrtVision(export / names.VISION_DIR, threads), new_decoder=llm.decoder)


def ask_in_process(bot, text: str, image: bytes, max_tokens: int) -> Timing:
    from mmgpt.generation import SamplingParams

    t = time.perf_counter()
    _, pieces = bot.stream(text, image=image, params=SamplingParams(max_tokens=max_tokens))
    return _timed(t, pieces)


def served(work: Path, threads: int, concurrencies: tuple[int, ...], max_tokens: int, repeats: int) -> dict:
    from mmgpt.client import MMGPTClient
    from mmgpt.serving.repository import assemble_repository
    from mmgpt.serving.tritonserver import TritonServer

    from .__main__ import log

    export = export_dir(work, threads)
    image = picture(0)
    result: dict = {"max_tokens": max_tokens, "question": QUESTION}
    repo = assemble_repository(export, work / "served-repo", ort_threads=threads)
    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        server.wait_ready(timeout=600)
        client = MMGPTClient(server.grpc_url, timeout=600)
        tokens = lambda: metric(server.metrics_url, "mmgpt_llm_tokens_total")  # noqa: E731
        ask_timed(client, QUESTION, image, max_tokens)  # warm-up

        # The serving overhead: the same request in this process and through the server, one after the
        # other (the server idle meanwhile), in pairs: this machine's speed can change from minute to minute.
        # The server's prefix cache may still reuse the system prompt (the part before the image).
        log("served: the same request in-process and served, in pairs")
        bot = in_process_assistant(export, threads)
        ask_in_process(bot, QUESTION, image, max_tokens)  # warm-up
        pairs = []
        for j in range(2 * repeats):  # in alternating order: a level change favours neither side
            picture_j = picture(700 + j)  # new to both: the server's image cache cannot help it
            if j % 2 == 0:
                mine = ask_in_process(bot, QUESTION, picture_j, max_tokens)
                theirs = ask_timed(client, QUESTION, picture_j, max_tokens)
            else:
                theirs = ask_timed(client, QUESTION, picture_j, max_tokens)
                mine = ask_in_process(bot, QUESTION, picture_j, max_tokens)
            pairs.append((mine, theirs))
        del bot
        result["in_process"] = {"ttft_s": statistics.median(m.ttft_s for m, _ in pairs),
                                "latency_s": statistics.median(m.latency_s for m, _ in pairs)}
        result["served_alone"] = {"ttft_s": statistics.median(t.ttft_s for _, t in pairs),
                                  "latency_s": statistics.median(t.latency_s for _, t in pairs)}
        result["serving_overhead"] = statistics.median(t.latency_s / m.latency_s for m, t in pairs)

        # The first concurrency is timed again after the others, and its figures pool both runs: this machine's
        # bandwidth moves between two levels for seconds at a time, and one stream's decode follows it closely
        # (its steps read the weights) while 8 streams' follow it much less (their steps are half multiply-adds,
        # their prefills all), so a baseline taken once can fall on the other level than the runs it divides.
        runs: dict[int, dict] = {}
        for n in (*concurrencies, concurrencies[0]) if len(concurrencies) > 1 else concurrencies:
            log(f"served: concurrency {n}")
            before = tokens()
            run = runs.setdefault(n, {"timings": [], "tokens": 0.0, "wall_s": 0.0, "runs": 0})
            timings, wall = load(server.grpc_url, n, max(repeats, 2), max_tokens, run=run["runs"])
            run["timings"] += timings
            run["tokens"] += tokens() - before
            run["wall_s"] += wall
            run["runs"] += 1
        for n, run in runs.items():
            timings, produced = run["timings"], run["tokens"]
            per_request = produced / len(timings)
            result[f"c{n}"] = {
                "requests": len(timings), "tokens": produced, "wall_s": run["wall_s"], "runs": run["runs"],
                "output_tokens_per_s": produced / run["wall_s"],
                "ttft_s": statistics.median(t.ttft_s for t in timings),
                "latency_s": statistics.median(t.latency_s for t in timings),
                "inter_token_ms": 1000 * statistics.median((t.latency_s - t.ttft_s) / max(per_request - 1, 1) for t in timings),
            }
        one = result[f"c{concurrencies[0]}"]
        if len(concurrencies) > 1:
            result["concurrency8_throughput_ratio"] = (result[f"c{concurrencies[-1]}"]["output_tokens_per_s"]
                                                       / one["output_tokens_per_s"])

        log("served: a second turn about the same image, and the image encodes it costs")
        encodes = lambda: metric(server.metrics_url, "mmgpt_vision_encoded_total")  # noqa: E731
        firsts, seconds, repeat_encodes = [], [], []
        for j in range(repeats):
            img = picture(500 + j)
            e0 = encodes()
            first = ask_timed(client, QUESTION, img, max_tokens)
            e1 = encodes()
            history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.text}]
            second = ask_timed(client, FOLLOW_UP, img, max_tokens, history=history)
            e2 = encodes()
            firsts.append(first.ttft_s)
            seconds.append(second.ttft_s)
            repeat_encodes.append(e2 - e1 if e1 - e0 >= 1 else float("nan"))
        result["first_turn_ttft_s"] = statistics.median(firsts)
        result["second_turn_ttft_s"] = statistics.median(seconds)
        result["second_turn_ttft_ratio"] = result["second_turn_ttft_s"] / result["first_turn_ttft_s"]
        result["repeat_image_encodes"] = float(statistics.median(repeat_encodes))
    return result
