"""The toy world: pictures of a few colored shapes, generated here, and everything trained on them.

No weights or datasets can be downloaded where this project is built, so the embedded default is a
complete model trained from scratch on a world that can be generated anywhere:

- `world`: scenes, drawing, and the questions/answers/captions about them (deterministic from a seed);
- `generate`: writes the world in the real dataset formats (COCO captions, LLaVA-Instruct) + eval sets;
- `foundation`: the tokenizer, a CLIP vision tower (contrastive) and a Phi LM trained from scratch;
- `build`: `make toy`, the whole pipeline with the project's own stage-1/stage-2 training;
- `evaluate`: `make toy-eval`, accuracy in-process and through the real Triton server.
"""
