"""Entry point `multimodal`: parse the request, run mmgpt.serving.multimodal with BLS stages, send replies.

Each instance answers one request at a time (see execute); the logic is in mmgpt.serving.multimodal
and is tested without Triton.
"""

import json
import os
import random

# This process never runs PyTorch, but transformers would import it for the tokenizer and the image
# processor (~3 s and ~250 MB per instance); the outputs are the same without it.
os.environ.setdefault("USE_TORCH", "0")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import triton_python_backend_utils as pb_utils  # noqa: E402

from mmgpt.preprocess import InputError  # noqa: E402
from mmgpt.serving import contract as c  # noqa: E402
from mmgpt.serving.llm import request_tensors, response_tokens, stop_tensors  # noqa: E402
from mmgpt.serving.multimodal import EntrySettings, Pipeline, Replies, ResponsePump, parse_question  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _tensors(values):
    return [pb_utils.Tensor(name, array) for name, array in values.items()]


def _output(response, name):
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    return None if tensor is None else tensor.as_numpy()


class BlsStages:
    """mmgpt.serving.multimodal.Stages over BLS requests to the other models."""

    def __init__(self, llm_model, table_dtype, timeout_s):
        self.llm_model = llm_model
        self.table_dtype = table_dtype
        self.timeout_s = timeout_s

    def _exec(self, model, inputs, outputs):
        response = pb_utils.InferenceRequest(
            model_name=model, inputs=_tensors(inputs), requested_output_names=outputs
        ).exec()
        if response.has_error():
            # The message arrives, its code does not (BLS in Triton 2.51 reports every error as INTERNAL):
            # whisper's messages name the bad input for the user and are passed on as they are.
            message = response.error().message()
            raise InputError(message) if model == c.WHISPER else RuntimeError(f"{model}: {message}")
        return response

    def transcribe(self, audio):
        response = self._exec(c.WHISPER, {c.AUDIO_INPUT: c.one_bytes(audio)}, [c.TRANSCRIPT])
        return c.first(_output(response, c.TRANSCRIPT)).decode("utf-8")

    def encode_image(self, pixels):
        response = self._exec(c.VISION, {c.PIXEL_VALUES: pixels}, [c.IMAGE_EMBEDS])
        return _output(response, c.IMAGE_EMBEDS)[0]

    def generate(self, request_id, input_ids, prompt_table, params, end_id):
        inputs = request_tensors(
            input_ids, prompt_table, params, end_id=end_id, pad_id=end_id, table_dtype=self.table_dtype
        )
        request = pb_utils.InferenceRequest(
            model_name=self.llm_model, inputs=_tensors(inputs), request_id=request_id,
            requested_output_names=[],  # all: output_ids, sequence_length and (ours only) error
        )
        return ResponsePump(
            lambda: request.exec(decoupled=True),
            lambda response: response_tokens(lambda name: _output(response, name)),
            timeout_s=self.timeout_s,
        )

    def stop(self, request_id):
        request = pb_utils.InferenceRequest(
            model_name=self.llm_model, inputs=_tensors(stop_tensors()), request_id=request_id,
            requested_output_names=[],
        )
        for _ in request.exec(decoupled=True):
            pass


class TritonPythonModel:
    def initialize(self, args):
        params = c.parameters(json.loads(args["model_config"]))
        self.settings = EntrySettings.from_parameters(params)
        self.pipeline = Pipeline.load(params["export_dir"], self.settings)
        self.pipeline.warm_up()
        self.stages = BlsStages(
            params["llm_model_name"], c.TABLE_DTYPES[params["prompt_embedding_table_data_type"]],
            self.settings.response_timeout_s,
        )

    def execute(self, requests):
        # One request at a time, answered here: concurrency comes from the instance count. Triton
        # 2.51's stub corrupts its heap when several threads of one process stream BLS responses at
        # once (reproduced; triton-inference-server/server#8882 reports the same class of crash).
        for request in requests:
            self._serve(request)
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        state = {"final": False}

        def send(text, transcript, final):
            if text is None:
                sender.send(flags=FINAL)
            else:
                outputs = {c.TEXT_OUTPUT: c.one_bytes(text), c.TRANSCRIPT: c.one_bytes(transcript)}
                sender.send(pb_utils.InferenceResponse(_tensors(outputs)), flags=FINAL if final else 0)
            state["final"] = final

        try:
            inputs = {}
            for name in c.ENTRY_INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if tensor is None else tensor.as_numpy()
            question = parse_question(inputs, self.settings)
            # A number: TensorRT-LLM's backend wants request ids it can read as integers.
            llm_request_id = str(random.getrandbits(62))
            outcome = self.pipeline.answer(
                question, self.stages, Replies(send, stream=question.stream),
                request_id=llm_request_id, is_cancelled=sender.is_cancelled,
            )
            if outcome == "cancelled" and not state["final"]:
                send(None, None, True)
        except Exception as e:
            self._fail(sender, state, e)

    @staticmethod
    def _fail(sender, state, error):
        if isinstance(error, InputError):
            code, message = pb_utils.TritonError.INVALID_ARG, str(error)
        else:
            code, message = pb_utils.TritonError.INTERNAL, f"internal error: {type(error).__name__}: {error}"
            pb_utils.Logger.log_error(f"multimodal: {message}")
        if state["final"]:
            return
        try:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)
        except Exception as send_error:  # the client is gone
            pb_utils.Logger.log_warn(f"multimodal: could not send the error ({send_error}): {message}")
