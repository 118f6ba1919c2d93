"""Entry point `multimodal`: parse the request, run mmgpt.serving.multimodal with BLS stages, send replies.
Each instance answers one request at a time (see execute); the logic is in mmgpt.serving.multimodal."""

import json
import os
import random
from pathlib import Path

# This process never runs PyTorch, but transformers would import it for the tokenizer and the image
# processor (~3 s and ~250 MB per instance); the outputs are the same without it.
os.environ.setdefault("USE_TORCH", "0")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from mmgpt.preprocess import InputError  # noqa: E402
from mmgpt.serving import contract as c  # noqa: E402
from mmgpt.serving import multimodal as mm  # noqa: E402
from mmgpt.serving.llm import request_tensors, response_tokens, stop_tensors  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _tensors(values):
    return [pb_utils.Tensor(name, array) for name, array in values.items()]


def _output(response, name):
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    return None if tensor is None else tensor.as_numpy()


def _tokens(response):
    if response.has_error():  # e.g. its process died: read as tokens, it would be a silently empty answer
        raise RuntimeError(f"the LLM failed: {response.error().message()}")
    return response_tokens(lambda name: _output(response, name))


class BlsStages:
    """mmgpt.serving.multimodal.Stages over BLS requests to the other models."""

    def __init__(self, llm_model, table_dtype, timeout_s, llm_pid_file):
        self.llm_model = llm_model
        self.table_dtype = table_dtype
        self.timeout_s = timeout_s
        self.llm_pid_file = llm_pid_file
        self.finished = mm.FinishedStreams()  # decoupled BLS streams are freed by Python, never by the stub

    def _exec(self, model, inputs, outputs):
        response = mm.through_restarts(
            lambda: pb_utils.InferenceRequest(model_name=model, inputs=_tensors(inputs), requested_output_names=outputs).exec(),
            lambda r: r.error().message() if r.has_error() else None,
        )
        if response.has_error():
            # The message arrives, its code does not (BLS in Triton 2.51 reports every error as INTERNAL):
            # whisper's messages name the bad input for the user and are passed on as they are.
            message = response.error().message()
            bad_input = model == c.WHISPER and not mm.is_restarting(message)
            raise InputError(message) if bad_input else RuntimeError(f"{model}: {message}")
        return response

    def transcribe(self, audio):
        response = self._exec(c.WHISPER, {c.AUDIO_INPUT: c.one_bytes(audio)}, [c.TRANSCRIPT])
        return c.first(_output(response, c.TRANSCRIPT)).decode("utf-8")

    def encode_image(self, pixels):
        response = self._exec(c.VISION, {c.PIXEL_VALUES: pixels}, [c.IMAGE_EMBEDS])
        return _output(response, c.IMAGE_EMBEDS)[0]

    def _llm_request(self, inputs, request_id):
        # All outputs (output_ids, sequence_length and, ours only, error); who asks: see llm.RequesterQueues.
        return pb_utils.InferenceRequest(model_name=self.llm_model, inputs=_tensors(inputs), request_id=request_id,
                                         requested_output_names=[], parameters={c.REQUESTER_PID: os.getpid()})

    def generate(self, request_id, input_ids, prompt_table, params, end_id):
        inputs = request_tensors(input_ids, prompt_table, params, end_id=end_id, pad_id=end_id, table_dtype=self.table_dtype)
        request = self._llm_request(inputs, request_id)
        pid = mm.read_pid(self.llm_pid_file)  # the process this request is about to be served by (ours only)
        return mm.ResponsePump(
            lambda: request.exec(decoupled=True), _tokens, timeout_s=self.timeout_s,
            alive=None if pid is None else lambda: mm.process_alive(pid), keep=self.finished.hold,
        )

    def stop(self, request_id):
        for _ in (stream := self._llm_request(stop_tensors(), request_id).exec(decoupled=True)):
            pass
        self.finished.hold(stream)


class TritonPythonModel:
    def initialize(self, args):
        params = c.parameters(json.loads(args["model_config"]))
        self.settings = mm.EntrySettings.from_parameters(params)
        self.pipeline = mm.Pipeline.load(params["export_dir"], self.settings)
        self.pipeline.warm_up()
        repo = Path(args["model_repository"]).parent
        self.stages = BlsStages(
            params["llm_model_name"], c.TABLE_DTYPES[params["prompt_embedding_table_data_type"]],
            self.settings.response_timeout_s, repo / params["llm_model_name"] / c.LLM_PID_FILE,
        )
        self.drain_marker = repo / c.DRAIN_FILE
        self.busy_file = Path(args["model_repository"]) / c.ENTRY_BUSY_DIR / args["model_instance_name"]

    def execute(self, requests):
        # One request at a time, answered here: concurrency comes from the instance count. Triton 2.51's stub
        # corrupts its heap when several threads of one process stream BLS responses at once (server#8882).
        for request in requests:
            with mm.busy(self.busy_file):  # a drain waits until no instance is answering
                self._serve(request)
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        state = {"final": False}

        def send(outputs, final):
            if outputs is None:
                sender.send(flags=FINAL)
            else:
                tensors = {k: c.one_bytes(v) if isinstance(v, str) else np.array([v], np.int32) for k, v in outputs.items()}
                sender.send(pb_utils.InferenceResponse(_tensors(tensors)), flags=FINAL if final else 0)
            state["final"] = final

        def cancelled():
            # When is_cancelled() says so, the backend has sent the final flag itself (python_backend#304):
            # sending another one later frees the response factory twice (a segfault seen under load).
            # Each poll that makes a round trip also frees the BLS streams that ended before it (FinishedStreams).
            state["final"] = state["final"] or self.stages.finished.barrier(sender.is_cancelled)
            return state["final"]

        try:
            mm.refuse_if_draining(self.drain_marker)
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in c.ENTRY_INPUTS}
            inputs = {name: None if t is None else t.as_numpy() for name, t in tensors.items()}
            question = mm.parse_question(inputs, self.settings)
            # A number: TensorRT-LLM's backend wants request ids it can read as integers.
            llm_request_id = str(random.getrandbits(62))
            outcome = self.pipeline.answer(
                question, self.stages, mm.Replies(send, stream=question.stream),
                request_id=llm_request_id, is_cancelled=cancelled,
            )
            if outcome == "cancelled" and not state["final"]:
                send(None, True)
        except Exception as e:
            self._fail(sender, state, e)

    @staticmethod
    def _fail(sender, state, error):
        kind, message = mm.failure(error)
        code = getattr(pb_utils.TritonError, {"invalid": "INVALID_ARG"}.get(kind, kind.upper()))
        if kind == "internal":
            pb_utils.Logger.log_error(f"multimodal: {message}")
        if state["final"]:
            return
        try:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)
        except Exception as send_error:  # the client is gone
            pb_utils.Logger.log_warn(f"multimodal: could not send the error ({send_error}): {message}")
