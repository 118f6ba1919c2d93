"""The `llm` model: TensorRT-LLM's request interface over the exported decoder, with in-flight batching.

`execute` only parses requests and hands them to the batcher's thread (mmgpt.serving.llm), which
streams tokens back through each request's response sender.
"""

import json
import os
import time
from pathlib import Path

# This process runs ONNX Runtime only; transformers (for the tokenizer's size) would import PyTorch.
os.environ.setdefault("USE_TORCH", "0")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from mmgpt.preprocess import InputError  # noqa: E402
from mmgpt.serving import contract as c  # noqa: E402
from mmgpt.serving.llm import RequesterQueues, StopRequest  # noqa: E402
from mmgpt.serving.multimodal import process_alive, write_pid  # noqa: E402
from mmgpt.serving.stages import LLMStage  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_POLL_S = 0.05  # is_cancelled() is a round trip to the server: ask at most this often per request


def _error_response(message):
    # In an ordinary output: a BLS caller never sees error responses of a decoupled model (Triton 2.51).
    return pb_utils.InferenceResponse([pb_utils.Tensor(c.LLM_ERROR, np.array([[message.encode("utf-8")]], np.object_))])


class TritonSink:
    """mmgpt.serving.llm.TokenSink over a response sender: (1, beam 1, n) output_ids per response, sent on the
    requester's queue (RequesterQueues: a dead requester must not stall the batcher)."""

    def __init__(self, sender, requester, queues):
        self.sender = sender
        self.requester = requester  # the entry point's pid, or None
        self.queues = queues
        self.checked = 0.0
        self.gone = False

    def _send(self, *args, **kwargs):
        self.queues(self.requester, lambda: self.sender.send(*args, **kwargs))

    def tokens(self, ids):
        if self.gone:  # cancelled: the request is complete at the frontend, nothing more may be sent
            return
        outputs = [
            pb_utils.Tensor(c.OUTPUT_IDS, np.array([[ids]], np.int32)),
            pb_utils.Tensor(c.SEQUENCE_LENGTH, np.array([[len(ids)]], np.int32)),
        ]
        self._send(pb_utils.InferenceResponse(outputs))

    def finish(self, reason, error=None):
        if self.gone:  # is_cancelled() was true: the backend already sent the final flag (python_backend#304)
            return
        if error is not None:
            self._send(_error_response(error), flags=FINAL)
        else:
            self._send(flags=FINAL)

    def cancelled(self):
        now = time.monotonic()
        if not self.gone and now - self.checked >= CANCEL_POLL_S:
            self.checked = now
            # A dead requester cancels nothing, and nothing sent to it arrives: its sequence is dropped.
            self.gone = self.sender.is_cancelled() or (self.requester is not None and not process_alive(self.requester))
        return self.gone


class Metrics:
    """Triton custom metrics (on the server's /metrics) fed from the batcher's counters."""

    def __init__(self, model_name):
        labels = {"model": model_name}

        self.families = []  # a MetricFamily must outlive its Metric objects

        def family(name, description, kind):
            self.families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self.families[-1].Metric(labels=labels)

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.tokens = family("mmgpt_llm_tokens_total", "Tokens generated", counter)
        self.steps = family("mmgpt_llm_decode_steps_total", "Batched decode steps (ONNX Runtime calls)", counter)
        self.rows = family("mmgpt_llm_decode_rows_total", "Sequences summed over decode steps", counter)
        self.cancelled = family("mmgpt_llm_cancelled_total", "Sequences stopped by stop requests or cancellation", counter)
        self.prefix_hits = family("mmgpt_llm_prefix_hits_total", "Requests that started from a cached prefix", counter)
        self.prefix_tokens = family("mmgpt_llm_prefix_tokens_total", "Prompt tokens not prefilled thanks to the prefix cache", counter)
        self.busy = family("mmgpt_llm_busy_total", "Requests refused with a busy error (queue full or waited too long)", counter)
        self.active = family("mmgpt_llm_active_sequences", "Sequences in the running batch", gauge)
        self.queued = family("mmgpt_llm_queued_requests", "Requests waiting for room in the batch", gauge)
        self.reserved = family("mmgpt_llm_kv_reserved_bytes", "Keys/values the running sequences may grow to", gauge)
        self.budget = family("mmgpt_llm_kv_budget_bytes", "The keys/values budget (0 = none)", gauge)
        self.seen = {"tokens": 0, "decode_steps": 0, "decode_rows": 0, "cancelled": 0, "prefix_hits": 0, "prefix_tokens": 0,
                     "busy": 0}

    def update(self, stats, active):
        for key, metric in (("tokens", self.tokens), ("decode_steps", self.steps), ("decode_rows", self.rows),
                            ("cancelled", self.cancelled), ("prefix_hits", self.prefix_hits),
                            ("prefix_tokens", self.prefix_tokens), ("busy", self.busy)):
            value = getattr(stats, key)
            if value > self.seen[key]:
                metric.increment(value - self.seen[key])
                self.seen[key] = value
        self.active.set(active)
        self.queued.set(stats.queued)
        self.reserved.set(stats.kv_reserved_bytes)

    def close(self):
        # Metrics before their families: the other order crashes the stub when it collects them.
        self.tokens = self.steps = self.rows = self.cancelled = self.active = None
        self.prefix_hits = self.prefix_tokens = self.busy = self.queued = self.reserved = self.budget = None
        self.families.clear()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = c.parameters(config)
        self.stage = LLMStage(params["export_dir"], int(params["ort_threads"]))
        self.metrics = Metrics(args["model_name"])
        self.queues = RequesterQueues()
        self.metrics.budget.set(int(params["kv_budget_mb"]) * 2**20)
        self.batcher = self.stage.batcher(
            int(params["max_inflight"]), on_iteration=lambda stats: self.metrics.update(stats, self.batcher.active()),
            prefix_cache_bytes=int(params["prefix_cache_mb"]) * 2**20,
            prefill_chunk=int(params["prefill_chunk_tokens"]), kv_budget_bytes=int(params["kv_budget_mb"]) * 2**20,
            queue_timeout_s=float(params["queue_timeout_s"]), max_queue=int(params["max_queue"]),
        ).start()
        write_pid(Path(args["model_repository"]) / c.LLM_PID_FILE)

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request.get_response_sender(), json.loads(request.parameters() or "{}").get(c.REQUESTER_PID),
                              self.queues)
            inputs = {}
            for name in c.LLM_INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if tensor is None else tensor.as_numpy()
            try:
                parsed = self.stage.parse(inputs, request.request_id())
            except InputError as e:
                sink.finish("error", str(e))
                continue
            if isinstance(parsed, StopRequest):
                self.batcher.stop(parsed.request_id)
                sink.finish("end")
                continue
            self.batcher.submit(parsed, sink)
        return None

    def finalize(self):
        self.batcher.shutdown()
        self.metrics.close()
