"""The `whisper` model: an encoded audio file -> its transcript; a bad file gets INVALID_ARG naming why."""

import json

import triton_python_backend_utils as pb_utils

from mmgpt.preprocess import InputError, Limits
from mmgpt.serving import contract as c
from mmgpt.serving.stages import WhisperStage


class TritonPythonModel:
    def initialize(self, args):
        params = c.parameters(json.loads(args["model_config"]))
        self.stage = WhisperStage(params["export_dir"], Limits.from_parameters(params), int(params["ort_threads"]))

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            audio = c.first(pb_utils.get_input_tensor_by_name(request, c.AUDIO_INPUT).as_numpy())
            text = self.stage.transcribe(bytes(audio))
        except InputError as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        except Exception as e:
            message = f"whisper failed: {type(e).__name__}: {e}"
            pb_utils.Logger.log_error(message)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        return pb_utils.InferenceResponse([pb_utils.Tensor(c.TRANSCRIPT, c.one_bytes(text))])
