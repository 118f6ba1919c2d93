"""Two-stage training (LLaVA-style): stage 1 trains the projector on COCO captions, stage 2 fine-tunes on
LLaVA-Instruct conversations.

One script per stage, whose typed `main(...)` is its command line: `pretrain`, `finetune`, and `evaluate`
for held-out numbers. The mechanics they share, one concern per module (none knows which stage runs it):

- `cli`: the command line from main()'s signature and docstring, YAML recipes, `UsageError`.
- `runtime`: rank, world size, device and compute dtype (`Runtime`); joining the process group.
- `prepare`: the start checkpoint, freezing, precision, the image source (live or feature cache), and
  what a stage writes as its checkpoint.
- `schedule`: which samples make up step s on which rank (`BatchPlan`), and the learning-rate schedule.
- `loop`: `train(...)`, the optimizer loop: accumulation, DDP, clipping, saving, logging.
- `train_state`: the saved training state an interrupted run resumes from exactly.
- `train_log`: metrics.jsonl, TensorBoard and loss.png.

Data-side modules (independent of the model):

- `data`: readers for COCO 2014 captions and LLaVA-Instruct-150K in their real formats, and an image
  index that finds an image by numeric id across COCO 2014 / 2017 file namings.
- `collate`: samples -> token ids with loss labels (through the serving chat template) -> padded batches.
- `feature_cache`: a resumable on-disk cache of the frozen CLIP tower's patch features.
- `metrics`: BLEU-4 and CIDEr-D as coco-caption computes them, without Java.
- `sample_data`: writes a tiny dataset in exactly the real formats, for tests and demos.
"""
