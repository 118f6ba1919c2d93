"""Two-stage training (LLaVA-style): stage 1 trains the projector on COCO captions, stage 2 fine-tunes on
LLaVA-Instruct conversations.

Data-side modules (independent of the model):

- `data`: readers for COCO 2014 captions and LLaVA-Instruct-150K in their real formats, and an image
  index that finds an image by numeric id across COCO 2014 / 2017 file namings.
- `feature_cache`: a resumable on-disk cache of the frozen CLIP tower's patch features.
- `metrics`: BLEU-4 and CIDEr-D as coco-caption computes them, without Java.
- `sample_data`: writes a tiny dataset in exactly the real formats, for tests and demos.
"""
