"""The `vision_encoder` model: pixel values -> image embeddings; a dynamic batch is one ONNX Runtime call,
and images seen recently come from the stage's cache (counted on /metrics)."""

import json

import triton_python_backend_utils as pb_utils

from mmgpt.serving import contract as c
from mmgpt.serving.stages import VisionStage


class TritonPythonModel:
    def initialize(self, args):
        params = c.parameters(json.loads(args["model_config"]))
        self.stage = VisionStage(params["export_dir"], int(params["ort_threads"]), int(params["cache_mb"]) * 2**20)
        labels = {"model": args["model_name"]}
        counter = pb_utils.MetricFamily.COUNTER
        self.families = [  # a MetricFamily must outlive its Metric objects
            pb_utils.MetricFamily(name="mmgpt_vision_encoded_total", description="Images run through the encoder", kind=counter),
            pb_utils.MetricFamily(name="mmgpt_vision_cache_hits_total", description="Images answered from the cache", kind=counter),
        ]
        self.encoded, self.hits = (f.Metric(labels=labels) for f in self.families)
        self.seen = (0, 0)

    def execute(self, requests):
        pixels = [pb_utils.get_input_tensor_by_name(r, c.PIXEL_VALUES).as_numpy() for r in requests]
        try:
            embeds = self.stage.encode_batches(pixels)
        except Exception as e:
            error = pb_utils.TritonError(f"vision_encoder failed: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        now = (self.stage.encoded, self.stage.cache.hits)
        self.encoded.increment(now[0] - self.seen[0])
        self.hits.increment(now[1] - self.seen[1])
        self.seen = now
        return [pb_utils.InferenceResponse([pb_utils.Tensor(c.IMAGE_EMBEDS, e)]) for e in embeds]

    def finalize(self):
        # Metrics before their families: the other order crashes the stub when it collects them.
        self.encoded = self.hits = None
        self.families.clear()
