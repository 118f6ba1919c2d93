"""The soak and fault suite, short: `make soak` in under two minutes on the tiny export.

The whole suite (`make soak`, ~10 min on the embedded default) is not part of `make test`; this runs the
same code with a short load, and every fault case: a killed llm / whisper / vision_encoder / entry-point
process, clients that disconnect, a burst of bad input, an overload, SIGTERM with answers in flight.
"""

from __future__ import annotations

import json

import pytest

from mmgpt.serving import soak


@pytest.fixture(scope="module")
def result(tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("soak")
    r = soak.main(["--export-dir", str(tiny_export), "--out", str(out), "--minutes", "0.3", "--clients", "3",
                   "--max-tokens", "16"])
    assert json.loads((out / "soak.json").read_text())["requests"] == r["requests"]
    return r


def test_the_load_loses_nothing_and_every_answer_is_the_reference(result):
    assert result["load_requests"] > 10
    assert result["lost"] == 0, result
    assert result["failed_unexpected"] == 0, result["unexpected_examples"]
    assert result["succeeded"] > 0 and result["failed_expected"] > 0  # bad inputs and cancels were in the mix
    assert result["p99_ttft_ms"] >= result["p50_ttft_ms"] > 0


@pytest.mark.parametrize("name", ["kill llm", "kill whisper", "kill vision_encoder", "kill multimodal",
                                  "client disconnects", "bad input burst", "overload", "SIGTERM drain"])
def test_fault_case(result, name):
    assert result["faults"][name].startswith("pass"), result["faults"][name]


def test_memory_is_measured_and_bounded(result):
    assert result["rss_warm_mb"] > 100 and result["rss_growth_ratio"] <= soak.RSS_GROWTH_BOUND
    assert result["ok"]


def test_a_wav_header_that_lies_is_built_as_described():
    import io

    import soundfile as sf

    info = sf.info(io.BytesIO(soak.bad_wav_header(48_000)))
    assert info.samplerate == 48_000 and info.channels == 1
