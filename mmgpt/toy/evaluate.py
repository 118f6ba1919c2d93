"""`make toy-eval`: does the embedded default answer correctly? In-process, and through the real server.

    python -m mmgpt.toy.evaluate [--checkpoint DIR] [--workdir DIR] [--limit N]

1. regenerates the held-out evaluation world the checkpoint was trained beside (same seed, see
   `toy_build.json`): images and questions the training never saw, held-out wordings, held-out color+shape
   pairs, follow-ups that need their first turn, and spoken questions in held-out voices;
2. answers in-process (PyTorch, greedy): `vqa_accuracy`, `compositional_accuracy`, `multiturn_accuracy`
   (history given as earlier turns), and the same vqa questions after stage 1 alone (`stage1_only_accuracy`);
3. exports the checkpoint (fp32, and the LLM at int8), starts the real tritonserver on free loopback ports
   and asks again over gRPC: `served_vqa_accuracy`, `served_multiturn_accuracy` (history sent as the
   contract's `history`), `asr_wer` and `spoken_vqa_accuracy` (audio only: the question is what the server hears),
   then `int8_vqa_accuracy` on a server of the int8 export; every server is stopped on the way out;
4. prints a table by question kind and, as its last line, one JSON object with every figure and whether
   each gate holds (exit status 1 when one does not).

An answer is right when it equals the reference after `world.normalize` (case, punctuation, spacing).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .world import normalize

MAX_TOKENS = 64  # the longest reference answer (a three-shape description) is ~35 tokens

# name -> (test on the metrics, wording); the issue's acceptance gates.
GATES: dict[str, tuple[Callable[[dict], bool], str]] = {
    "vqa": (lambda m: m["vqa_accuracy"] >= 0.95, "vqa_accuracy >= 0.95"),
    "compositional": (lambda m: m["compositional_accuracy"] >= 0.80, "compositional_accuracy >= 0.80"),
    "served": (lambda m: abs(m["served_vqa_accuracy"] - m["vqa_accuracy"]) <= 0.01, "|served - in-process| <= 0.01"),
    "asr": (lambda m: m["asr_wer"] <= 0.10, "asr_wer <= 0.10"),
    "spoken": (lambda m: m["spoken_vqa_accuracy"] >= 0.85, "spoken_vqa_accuracy >= 0.85"),
    "multiturn": (lambda m: m["multiturn_accuracy"] >= 0.90, "multiturn_accuracy >= 0.90"),
    "served_multiturn": (lambda m: abs(m["served_multiturn_accuracy"] - m["multiturn_accuracy"]) <= 0.01,
                         "|served - in-process| multi-turn <= 0.01"),
    "stage2_over_stage1": (lambda m: m["vqa_accuracy"] > m["stage1_only_accuracy"], "vqa > stage1_only"),
    "int8": (lambda m: abs(m["int8_vqa_accuracy"] - m["vqa_accuracy"]) <= 0.02, "|int8 - fp32| <= 0.02"),
}


@dataclass
class Scored:
    """Predictions next to their rows; accuracy overall and by a row field."""

    rows: list[dict]
    predictions: list[str]

    @property
    def correct(self) -> list[bool]:
        return [normalize(p) == normalize(r["answer"]) for r, p in zip(self.rows, self.predictions)]

    @property
    def accuracy(self) -> float:
        c = self.correct
        return sum(c) / len(c) if c else float("nan")

    def by(self, key: Callable[[dict], str]) -> dict[str, tuple[int, int]]:
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r, ok in zip(self.rows, self.correct):
            out[key(r)][0] += ok
            out[key(r)][1] += 1
        return {k: (v[0], v[1]) for k, v in sorted(out.items())}

    def mistakes(self, n: int = 5) -> list[str]:
        bad = [(r, p) for r, p, ok in zip(self.rows, self.predictions, self.correct) if not ok]
        return [f"{r['question']!r}: {p!r} (want {r['answer']!r})" for r, p in bad[:n]]


# ============================================================================================ answering


def answer_in_process(bot, world: Path, rows: Sequence[dict], desc: str, progress: bool = True) -> Scored:
    from mmgpt.generation import SamplingParams
    from mmgpt.template import Message

    params = SamplingParams(max_tokens=MAX_TOKENS)
    preds = []
    images: dict[str, bytes] = {}
    for r in tqdm(rows, desc=desc, unit="q", disable=not progress):
        image = images.setdefault(r["image"], (world / "images" / r["image"]).read_bytes())
        history = [Message(m["role"], m["content"]) for m in r["history"]]
        preds.append(bot.ask(r["question"], image=image, history=history, params=params).text)
    return Scored(list(rows), preds)


def answer_served(client, world: Path, rows: Sequence[dict], desc: str, *, audio: Sequence[bytes] | None = None,
                  workers: int = 4, progress: bool = True) -> tuple[Scored, list[str]]:
    """Ask every row through the server, a few at a time; with `audio`, the question is only spoken."""
    def one(k: int) -> tuple[str, str]:
        r = rows[k]
        image = (world / "images" / r["image"]).read_bytes()
        if audio is not None:
            res = client.ask(audio=audio[k], image=image, history=r["history"], max_tokens=MAX_TOKENS)
        else:
            res = client.ask(r["question"], image=image, history=r["history"], max_tokens=MAX_TOKENS)
        return res.text, res.transcript

    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(one, range(len(rows))), total=len(rows), desc=desc, unit="q", disable=not progress))
    return Scored(list(rows), [a for a, _ in results]), [t for _, t in results]


# ============================================================================================ reporting


def table(sections: dict[str, Scored]) -> str:
    lines = [f"{'set':<24} {'kind':<16} {'phrasing':<9} {'right':>6} {'of':>5} {'acc':>6}"]
    for name, s in sections.items():
        for key, (ok, n) in s.by(lambda r: f"{r['kind']}|{'held-out' if r['heldout_phrasing'] else 'seen'}").items():
            kind, phrasing = key.split("|")
            lines.append(f"{name:<24} {kind:<16} {phrasing:<9} {ok:>6} {n:>5} {ok / n:>6.3f}")
        lines.append(f"{name:<24} {'ALL':<16} {'':<9} {sum(s.correct):>6} {len(s.rows):>5} {s.accuracy:>6.3f}")
    return "\n".join(lines)


def gates(metrics: dict) -> dict[str, bool]:
    return {name: bool(test(metrics)) for name, (test, _) in GATES.items() if _has(metrics, name)}


def _has(metrics: dict, gate: str) -> bool:
    try:
        GATES[gate][0](metrics)
    except KeyError:
        return False
    return True


def _take(rows: list[dict], limit: int | None) -> list[dict]:
    return rows if limit is None else rows[:limit]


def stage1_view(checkpoint: Path, dest: Path) -> Path:
    """The checkpoint as it was after stage 1: the stage-1 projector and no LoRA adapter. Folders are
    linked, not copied."""
    from mmgpt.config import MMGPTConfig

    from .build import STAGE1_PROJECTOR

    config = MMGPTConfig.load(checkpoint)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vision", "llm", "tokenizer", "whisper"):
        if (checkpoint / name).exists():
            (dest / name).symlink_to((checkpoint / name).resolve())
    shutil.copy(checkpoint / STAGE1_PROJECTOR, dest / "projector.safetensors")
    config.replace(llm_adapter=None).save(dest)
    return dest


def main(
    checkpoint: Path | None = None,
    workdir: Path | None = None,
    limit: int | None = None,
    voices: tuple[str, ...] = (),
    progress: bool = True,
) -> dict:
    """Measure the toy default's accuracy in-process and served; print a table and a JSON line.

    Args:
        checkpoint: a toy checkpoint (default: the embedded default).
        workdir: where the evaluation world, exports and server logs go (default: a temporary folder, removed).
        limit: ask at most this many questions of each set (a quick look; gates are judged on the full sets).
        voices: espeak-ng voices for the spoken questions (default: the held-out voices of the build).
        progress: show progress bars.
    """
    from mmgpt.client import MMGPTClient
    from mmgpt.export.__main__ import main as export
    from mmgpt.inference import Assistant
    from mmgpt.presets import default_checkpoint
    from mmgpt.serving.repository import assemble_repository
    from mmgpt.serving.tritonserver import TritonServer
    from mmgpt.speech import word_error_rate

    from . import build, generate, speech

    t0 = time.perf_counter()
    checkpoint = Path(checkpoint) if checkpoint else default_checkpoint()
    record = build.read_record(checkpoint)
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="mmgpt-toy-eval-")) if own_tmp else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    metrics: dict = {}
    try:
        world = work / "world"
        if not (world / "eval.jsonl").is_file():
            generate.write_world(world, **record["world"], splits=("eval",), progress=progress)
        vqa = _take(generate.read_eval(world / "eval.jsonl", "vqa"), limit)
        comp = _take(generate.read_eval(world / "eval.jsonl", "compositional"), limit)
        multi = _take(generate.read_eval(world / "eval.jsonl", "multiturn"), limit)
        spoken_rows = _take(speech.spoken_rows(vqa), limit)
        voices = voices or tuple(record["speech"]["heldout_voices"])
        spoken_rows, audio = speech.synthesize_rows(spoken_rows, voices)

        sections: dict[str, Scored] = {}
        bot = Assistant.load(checkpoint, load_whisper=False)
        sections["vqa (in-process)"] = answer_in_process(bot, world, vqa, "vqa in-process", progress)
        sections["compositional"] = answer_in_process(bot, world, comp, "compositional", progress)
        sections["multi-turn (follow-up)"] = answer_in_process(bot, world, multi, "multi-turn", progress)
        del bot
        stage1 = Assistant.load(stage1_view(checkpoint, work / "stage1"), load_whisper=False)
        sections["vqa after stage 1 only"] = answer_in_process(stage1, world, vqa, "stage-1 only", progress)
        del stage1
        metrics["vqa_accuracy"] = sections["vqa (in-process)"].accuracy
        metrics["compositional_accuracy"] = sections["compositional"].accuracy
        metrics["multiturn_accuracy"] = sections["multi-turn (follow-up)"].accuracy
        metrics["stage1_only_accuracy"] = sections["vqa after stage 1 only"].accuracy

        fp32 = export(str(checkpoint), str(work / "export"))
        int8_llm = export(str(checkpoint), str(work / "export-int8-llm"), int8=True, only=("llm",))
        int8 = work / "export-int8"
        int8.mkdir(exist_ok=True)
        for part in fp32.iterdir():  # the fp32 export with the LLM swapped for its int8 export
            target = int8_llm / part.name if part.name == "llm" else part
            link = int8 / part.name
            if not link.exists():
                link.symlink_to(target.resolve())

        for tag, export_dir in (("fp32", fp32), ("int8", int8)):
            repo = assemble_repository(export_dir, work / f"repo-{tag}")
            with TritonServer(repo, log_file=work / f"tritonserver-{tag}.log") as server:
                server.wait_ready(timeout=300)
                client = MMGPTClient(server.grpc_url, timeout=300)
                if tag == "int8":
                    s, _ = answer_served(client, world, vqa, "vqa served int8", progress=progress)
                    sections["vqa served (int8 LLM)"] = s
                    metrics["int8_vqa_accuracy"] = s.accuracy
                    continue
                s, _ = answer_served(client, world, vqa, "vqa served", progress=progress)
                sections["vqa served"] = s
                metrics["served_vqa_accuracy"] = s.accuracy
                s, _ = answer_served(client, world, multi, "multi-turn served", progress=progress)
                sections["multi-turn served"] = s
                metrics["served_multiturn_accuracy"] = s.accuracy
                s, heard = answer_served(client, world, spoken_rows, "spoken served", audio=audio, progress=progress)
                sections["spoken (held-out voices)"] = s
                metrics["spoken_vqa_accuracy"] = s.accuracy
                metrics["asr_wer"] = word_error_rate([r["question"] for r in spoken_rows], heard)
                misheard = [(r["question"], h) for r, h in zip(spoken_rows, heard) if normalize(r["question"]) != normalize(h)]

        print(table(sections))
        print()
        for name, s in sections.items():
            for m in s.mistakes(3):
                print(f"  miss [{name}] {m}")
        for q, h in misheard[:5]:
            print(f"  misheard: {q!r} -> {h!r}")
        metrics = {k: round(v, 4) for k, v in metrics.items()}
        metrics["questions"] = {name: len(s.rows) for name, s in sections.items()}
        metrics["voices"] = list(voices)
        metrics["gates"] = gates(metrics)
        metrics["seconds"] = round(time.perf_counter() - t0, 1)
        print()
        for name, (_, wording) in GATES.items():
            if name in metrics["gates"]:
                print(f"  gate {wording:<34} {'PASS' if metrics['gates'][name] else 'FAIL'}")
        print(json.dumps(metrics))
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    return metrics


def cli(argv: Iterable[str] | None = None) -> int:
    from mmgpt.training.cli import cli as typed_cli

    metrics = typed_cli(main, argv)
    return 0 if all(metrics["gates"].values()) else 1


if __name__ == "__main__":
    sys.exit(cli())
