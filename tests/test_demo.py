"""`make demo`: its control flow with fakes (the server is stopped on every way out), then the real thing:
`python -m mmgpt.serving.demo` as a user runs it, in a fresh MMGPT_HOME with empty export and repository
folders, against the real tritonserver, with the trained default answering correctly."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mmgpt.serving.demo as demo
from mmgpt.client import Piece, RequestFailed
from mmgpt.serving.demo import asset, printable
from mmgpt.template import Message

# --------------------------------------------------------------------------------------------------
# Control flow with a fake server and client
# --------------------------------------------------------------------------------------------------


class FakeServer:
    instances: list[FakeServer] = []

    def __init__(self, repo: Path, log_file: Path):
        self.repo, self.log_file = repo, log_file
        self.grpc_url = "127.0.0.1:1"
        self.events: list[str] = []
        FakeServer.instances.append(self)

    def start(self) -> FakeServer:
        self.events.append("start")
        return self

    def wait_ready(self, timeout: float) -> FakeServer:
        self.events.append("ready")
        return self

    def stop(self) -> int:
        self.events.append("stop")
        return 0


class FakeAnswer:
    def __init__(self, pieces: list[Piece], fail: BaseException | None):
        self._pieces, self._fail = pieces, fail
        self.transcript = next((p.transcript for p in pieces if p.transcript), "")

    def __iter__(self) -> Iterator[Piece]:
        yield from self._pieces
        if self._fail is not None:
            raise self._fail

    def __enter__(self) -> FakeAnswer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def fake_client_class(fail_on_call: int | None = None, fail: BaseException | None = None) -> type:
    class FakeClient:
        calls: list[dict[str, Any]] = []

        def __init__(self, url: str, timeout: float):
            self.url = url

        def stream(self, **kwargs: Any) -> FakeAnswer:
            FakeClient.calls.append(kwargs)
            n = len(FakeClient.calls)
            transcript = "beep\x12" if kwargs.get("audio") is not None else ""
            pieces = [Piece(f"answer{n} ", transcript), Piece("more", transcript)]
            return FakeAnswer(pieces, fail if n == fail_on_call else None)

    return FakeClient


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A complete-looking export dir; repository assembly and the server are fakes."""
    import mmgpt.serving.repository as repository
    import mmgpt.serving.tritonserver as tritonserver

    export = tmp_path / "export"
    export.mkdir()
    (export / "mmgpt_config.json").write_text("{}")
    monkeypatch.setattr(repository, "check_export", lambda d: Path(d))
    monkeypatch.setattr(repository, "assemble_repository", lambda e, r: Path(r))
    monkeypatch.setattr(tritonserver, "TritonServer", FakeServer)
    FakeServer.instances = []
    return export


def run_demo(export: Path, client_class: type) -> tuple[str, list[str]]:
    out = io.StringIO()
    demo_client = demo.MMGPTClient
    demo.MMGPTClient = client_class  # type: ignore[misc]
    try:
        demo.run(export, export.parent / "repo", image=asset("demo.png"), audio=asset("demo.wav"), max_tokens=8, out=out)
    finally:
        demo.MMGPTClient = demo_client  # type: ignore[misc]
        [server] = FakeServer.instances
    return out.getvalue(), server.events


def test_demo_asks_three_questions_with_history_and_stops(fakes: Path) -> None:
    client = fake_client_class()
    out, events = run_demo(fakes, client)
    assert events == ["start", "ready", "stop"]
    image = asset("demo.png").read_bytes()
    first, follow, spoken = client.calls
    assert first == {"text": demo.IMAGE_QUESTION, "image": image, "max_tokens": 8}
    assert follow["image"] == image and follow["text"] == demo.FOLLOW_UP
    assert [(m.role, m.content) for m in follow["history"]] == [("user", demo.IMAGE_QUESTION),
                                                                ("assistant", "answer1 more")]
    assert spoken == {"audio": asset("demo.wav").read_bytes(), "image": image, "max_tokens": 8}
    assert "  answer:   answer1 more\n" in out and "  heard:    beep\ufffd\n" in out  # control char shown safely
    assert "demo finished" in out and "make api" in out and "make chat" in out  # where to go next


@pytest.mark.parametrize("fail", [KeyboardInterrupt(), RequestFailed("boom")], ids=["ctrl-c", "server-error"])
def test_demo_stops_the_server_when_interrupted_or_failing(fakes: Path, fail: BaseException) -> None:
    with pytest.raises(type(fail)):
        run_demo(fakes, fake_client_class(fail_on_call=2, fail=fail))
    [server] = FakeServer.instances
    assert server.events == ["start", "ready", "stop"]


def test_demo_main_exit_codes(fakes: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--export-dir", str(fakes), "--repo-dir", str(fakes.parent / "repo")]
    monkeypatch.setattr(demo, "MMGPTClient", fake_client_class(fail_on_call=1, fail=KeyboardInterrupt()))
    assert demo.main(argv) == 130
    monkeypatch.setattr(demo, "MMGPTClient", fake_client_class(fail_on_call=1, fail=RequestFailed("nope")))
    assert demo.main(argv) == 1 and "error: nope" in capsys.readouterr().err
    assert [s.events for s in FakeServer.instances] == [["start", "ready", "stop"]] * 2
    assert demo.main([*argv, "--image", "/nonexistent.png"]) == 2


def test_a_folder_that_is_not_an_export_is_never_exported_over(tmp_path: Path) -> None:
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    code = demo.main(["--export-dir", str(user_dir), "--repo-dir", str(tmp_path / "repo")])
    assert code == 1 and (user_dir / "notes.txt").read_text() == "keep me"


def test_printable_keeps_text_and_masks_control_characters() -> None:
    assert printable("héllo\nwörld\t!") == "héllo\nwörld\t!"
    assert printable("a\x12b\x1b[2Jc") == "a\ufffdb\ufffd[2Jc"


# --------------------------------------------------------------------------------------------------
# The real demo
# --------------------------------------------------------------------------------------------------


def tritonservers_serving(repo: Path) -> list[int]:
    """Pids of live tritonserver processes whose command line names this repository."""
    needle = f"--model-repository={repo.resolve()}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_make_demo_from_a_fresh_install(tmp_path: Path) -> None:
    """Empty MMGPT_HOME, export and repository folders: the demo builds the trained default, exports it,
    serves it, asks by text and by voice, prints what the served model answers (the in-process answers of
    the checkpoint it built, and right) and what the real Whisper heard; then it stops the server."""
    from mmgpt.toy.generate import DEMO_QA, DEMO_SPOKEN
    from mmgpt.toy.world import normalize

    env = {**os.environ, "MMGPT_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mmgpt.serving.demo", "--export-dir", str(tmp_path / "export"),
           "--repo-dir", str(tmp_path / "triton_repo")]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - start
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr[-4000:]}"
    print(f"demo wall time {wall:.1f} s")

    assert "exporting the embedded default" in out  # the folders were empty
    assert (tmp_path / "export" / "mmgpt_config.json").is_file()
    assert "RANDOM weights" not in out
    answers = [line.removeprefix("  answer:   ") for line in out.splitlines() if line.startswith("  answer:   ")]
    heard = [line.removeprefix("  heard:    ") for line in out.splitlines() if line.startswith("  heard:    ")]
    assert [normalize(a) for a in answers] == [normalize(a) for _, a in DEMO_QA] + [normalize(DEMO_SPOKEN[1])]
    assert [normalize(h) for h in heard] == [normalize(DEMO_SPOKEN[0])]
    assert "stopping tritonserver" in out and "demo finished" in out
    assert tritonservers_serving(tmp_path / "triton_repo") == []

    # Greedy, so the served answers equal the PyTorch reference on the checkpoint the demo built.
    from mmgpt.generation import SamplingParams
    from mmgpt.inference import Assistant

    [built] = (tmp_path / "home" / "checkpoints").glob("toy-*")
    reference = Assistant.load(built)
    image = asset("demo.png").read_bytes()
    params = SamplingParams(max_tokens=32)
    first = reference.ask(demo.IMAGE_QUESTION, image=image, params=params).text
    history = [Message("user", demo.IMAGE_QUESTION), Message("assistant", first)]
    follow = reference.ask(demo.FOLLOW_UP, image=image, history=history, params=params).text
    spoken = reference.ask(audio=asset("demo.wav").read_bytes(), image=image, params=params)
    assert answers == [printable(first), printable(follow), printable(spoken.text)]
    assert heard == [printable(spoken.transcript)]


def test_demo_assets_are_the_generated_ones():
    import tempfile

    from mmgpt.serving.demo import asset
    from mmgpt.toy.generate import write_demo_assets

    with tempfile.TemporaryDirectory() as d:
        image, audio = write_demo_assets(d)
        assert image.read_bytes() == asset("demo.png").read_bytes()
        assert audio.read_bytes() == asset("demo.wav").read_bytes()
