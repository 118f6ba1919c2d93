"""The `vision_encoder` model: pixel values -> image embeddings; a dynamic batch is one ONNX Runtime call."""

import json

import triton_python_backend_utils as pb_utils

from mmgpt.serving import contract as c
from mmgpt.serving.stages import VisionStage


class TritonPythonModel:
    def initialize(self, args):
        params = c.parameters(json.loads(args["model_config"]))
        self.stage = VisionStage(params["export_dir"], int(params["ort_threads"]))

    def execute(self, requests):
        pixels = [pb_utils.get_input_tensor_by_name(r, c.PIXEL_VALUES).as_numpy() for r in requests]
        try:
            embeds = self.stage.encode_batches(pixels)
        except Exception as e:
            error = pb_utils.TritonError(f"vision_encoder failed: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(c.IMAGE_EMBEDS, e)]) for e in embeds]
