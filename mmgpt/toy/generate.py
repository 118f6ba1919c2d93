"""Write a toy world in the real dataset formats, plus its held-out evaluation sets.

    python -m mmgpt.toy.generate OUT [--train-images N] [--eval-images N] [--seed S]

OUT/
  images/                       PNG and JPEG files of every split, named the COCO 2014 way
  captions_train2014.json       COCO 2014 captions format, 5 captions per training image   (stage 1)
  llava_instruct_train.json     LLaVA-Instruct-150K format, multi-turn conversations        (stage 2)
  captions_val2014.json, llava_instruct_val.json    the same for held-out images (`make eval`)
  eval.jsonl                    one question per line with its reference answer, by set:
                                  vqa            held-out images; seen and held-out phrasings
                                  compositional  held-out images that hold a held-out color+shape pair
                                  multiturn      a follow-up that needs the first turn (history given)
  scenes_train.jsonl            what each training image shows (shapes, colors, sizes, cells), like COCO's
                                instance annotations; only the from-scratch vision tower reads it
  world.json                    the seed, sizes, held-out pairs and phrasings: what was held out

Training files never contain a held-out image, a held-out phrasing, or a held-out color+shape pair, and no
held-out image shows the same shapes, colors, sizes and cells as a training image. Writing into a folder
replaces what an earlier run wrote there. Deterministic: the same seed and sizes write the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from . import world
from .world import HELDOUT_COMBOS, KINDS, PHRASINGS, QA, Scene

# How often each kind opens a training conversation (counting and describing are the hardest).
KIND_WEIGHTS = {
    "color": 1.0, "shape_at": 1.0, "shape_of_color": 0.7, "count_all": 0.6, "count_shape": 0.8,
    "count_color": 0.6, "where": 1.2, "exists": 1.2, "relation": 1.2, "above_below": 0.6, "left_right": 0.6,
    "size": 0.7, "describe": 0.9,
}
TRAIN_ID_BASE = 100_000  # COCO-like numeric ids, distinct per split
EVAL_ID_BASE = 500_000
COMPOSITIONAL_ID_BASE = 700_000


def _ask_some(scene: Scene, rng: random.Random, phrasing: str, kinds=KINDS) -> QA:
    while True:
        kind = rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]
        qa = world.ask(scene, kind, rng, phrasing=phrasing)
        if qa is not None:
            return qa


def conversation(scene: Scene, rng: random.Random, turns: int) -> list[QA]:
    """A training conversation: independent questions and follow-ups that refer to the turn before."""
    out = [_ask_some(scene, rng, "seen")]
    while len(out) < turns:
        qa = world.follow_up(scene, out[-1], rng) if rng.random() < 0.5 else None
        out.append(qa or _ask_some(scene, rng, "seen"))
    return out


def llava_entry(scene: Scene, file_name: str, qas: list[QA], rng: random.Random, vary: bool = True) -> dict:
    turns = []
    for k, qa in enumerate(qas):
        q = world.vary_case(qa.question, rng) if vary else qa.question
        if k == 0:  # LLaVA puts "<image>" before or after the first question; both occur in the real file
            q = f"<image>\n{q}" if rng.random() < 0.7 else f"{q}\n<image>"
        turns.append({"from": "human", "value": q})
        turns.append({"from": "gpt", "value": qa.answer})
    return {"id": f"{scene.image_id:012d}", "image": file_name, "conversations": turns}


def coco_file(split: str, scenes: list[Scene], names: dict[int, str], rng: random.Random) -> dict:
    images, annotations = [], []
    for s in scenes:
        images.append({
            "license": 1, "file_name": names[s.image_id], "height": s.image_size, "width": s.image_size,
            "date_captured": "2014-01-01 00:00:00", "id": s.image_id,
        })
        for caption in world.captions(s, rng):
            annotations.append({"image_id": s.image_id, "id": len(annotations) + 1, "caption": caption})
    return {
        "info": {"description": f"mmgpt toy world, {split} split, COCO 2014 captions format", "version": "1.0",
                 "year": 2014, "contributor": "mmgpt.toy.generate"},
        "licenses": [{"id": 1, "name": "generated", "url": ""}],
        "images": images, "annotations": annotations,
    }


def eval_row(set_name: str, scene: Scene, file_name: str, qa: QA, history: Iterable[QA] = ()) -> dict:
    history_msgs = []
    for h in history:
        history_msgs += [{"role": "user", "content": h.question}, {"role": "assistant", "content": h.answer}]
    return {
        "set": set_name, "image": file_name, "image_id": scene.image_id, "question": qa.question,
        "answer": qa.answer, "kind": qa.kind, "heldout_phrasing": qa.heldout_phrasing, "history": history_msgs,
        "combos": sorted(f"{c} {s}" for c, s in scene.combos),
    }


def draw_scenes(rng: random.Random, train_images: int, eval_images: int, compositional_images: int,
                seed: int, novel: bool = True) -> tuple[list[Scene], list[Scene], list[Scene]]:
    """The training, held-out and compositional scenes of a world, drawn from `rng` (which the text is then
    drawn from too).

    With `novel`, a held-out scene with exactly the shapes, colors, sizes and cells of a training scene (a
    quarter of them, most one-shape scenes, with 6,000 training images) is drawn again from a stream of its
    own, so that held-out images show something new and the training files stay the same."""
    train = [world.random_scene(rng, TRAIN_ID_BASE + k) for k in range(train_images)]
    held = [world.random_scene(rng, EVAL_ID_BASE + k) for k in range(eval_images)]
    combos = sorted(HELDOUT_COMBOS)
    comp = [
        world.random_scene(rng, COMPOSITIONAL_ID_BASE + k, include=combos[k % len(combos)])
        for k in range(compositional_images)
    ]
    if novel:
        seen = {layout(s) for s in train}
        redraw = random.Random(f"{seed}-novel")
        held = [_novel(s, seen, lambda s: world.random_scene(redraw, s.image_id)) for s in held]
        comp = [_novel(s, seen, lambda s, k=k: world.random_scene(redraw, s.image_id, include=combos[k % len(combos)]))
                for k, s in enumerate(comp)]
    return train, held, comp


def write_world(
    out: str | Path,
    *,
    train_images: int = 6000,
    eval_images: int = 300,
    compositional_images: int = 150,
    seed: int = 0,
    splits: tuple[str, ...] = ("train", "eval"),
    progress: bool = True,
) -> dict[str, Path]:
    """Generate the world into `out`; returns the paths of what was written (see the module docstring).

    `splits=("eval",)` writes only the held-out images and files: the same ones a full run writes, because
    every scene is drawn from the one seeded stream whichever splits are saved."""
    out = Path(out)
    if train_images < 1 and "train" in splits:
        raise ValueError(f"train_images must be at least 1 to write the training split, got {train_images}")
    clear(out)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train, held, comp = draw_scenes(rng, train_images, eval_images, compositional_images, seed)
    names: dict[int, str] = {}
    for split, scenes in (("train", train), ("eval", held + comp)):
        coco_split = "train" if split == "train" else "val"
        for s in tqdm(scenes, desc=f"drawing {split} images", unit="img", disable=not progress or split not in splits):
            stem = image_dir / f"COCO_{coco_split}2014_{s.image_id:012d}"
            names[s.image_id] = world.save(s, stem) if split in splits else world.file_name(s, stem)

    paths = {
        "images": image_dir,
        "captions_train": out / "captions_train2014.json",
        "instruct_train": out / "llava_instruct_train.json",
        "captions_val": out / "captions_val2014.json",
        "instruct_val": out / "llava_instruct_val.json",
        "eval": out / "eval.jsonl",
        "world": out / "world.json",
    }
    # Text is drawn from the stream whether it is written or not, so the eval split stays the same.
    train_captions = coco_file("train", train, names, rng)
    convs = [conversation(s, rng, rng.choice((2, 3, 4))) for s in train]
    entries = [llava_entry(s, names[s.image_id], qas, rng) for s, qas in zip(train, convs)]
    if "train" in splits:
        _dump(paths["captions_train"], train_captions)
        _dump(paths["instruct_train"], entries)
        with (out / "scenes_train.jsonl").open("w") as f:
            for s in train:
                f.write(json.dumps(world.scene_to_dict(s)) + "\n")
    _dump(paths["captions_val"], coco_file("val", held, names, rng))
    _dump(paths["instruct_val"], [
        llava_entry(s, names[s.image_id], conversation(s, random.Random(s.image_id), 3), rng, vary=False)
        for s in held
    ])

    rows: list[dict] = []
    erng = random.Random(seed + 1)
    for s in held:  # two single-turn questions per held-out image, half in held-out wordings
        for _ in range(2):
            rows.append(eval_row("vqa", s, names[s.image_id], _ask_some(s, erng, "any")))
    comp_kinds = ("color", "where", "exists", "shape_of_color", "size", "describe")
    for s in comp:  # questions about the held-out pair itself
        target = next(i for i in s.items if (i.color, i.shape) in HELDOUT_COMBOS)
        asked = 0
        for kind in erng.sample(comp_kinds, len(comp_kinds)):
            qa = world.ask(s, kind, erng, phrasing="seen", focus=target, exclude=frozenset())
            if qa is not None and (qa.focus == target or kind == "describe"):
                rows.append(eval_row("compositional", s, names[s.image_id], qa))
                asked += 1
            if asked == 2:
                break
    for s in held:
        for _ in range(20):  # a follow-up exists for most first turns; try a few
            first = _ask_some(s, erng, "seen")
            second = world.follow_up(s, first, erng, phrasing="any")
            if second is not None:
                rows.append(eval_row("multiturn", s, names[s.image_id], second, history=[first]))
                break
    with paths["eval"].open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    meta = {
        "seed": seed, "train_images": train_images, "eval_images": eval_images,
        "compositional_images": compositional_images,
        "heldout_combos": [list(c) for c in sorted(HELDOUT_COMBOS)],
        "heldout_phrasings": {k: list(v[1]) for k, v in PHRASINGS.items()},
        "eval_counts": dict(Counter(r["set"] for r in rows)),
        "train_turns": sum(len(c) for c in convs),
        "train_kinds": dict(Counter(qa.kind for c in convs for qa in c)),
        "example_scene": world.scene_to_dict(train[0]) if train else None,
    }
    _dump(paths["world"], meta, indent=1)
    return paths


def layout(scene: Scene) -> tuple:
    """What a scene shows, as questions see it: each shape's kind, color, size and cell (not its jitter,
    background or file format)."""
    return tuple(sorted((i.shape, i.color, i.size, i.row, i.col) for i in scene.items))


def _novel(scene: Scene, seen: set[tuple], draw_again, tries: int = 1000) -> Scene:
    for _ in range(tries):
        if layout(scene) not in seen:
            return scene
        scene = draw_again(scene)
    raise RuntimeError("could not draw a held-out scene unlike every training scene; use fewer training images")


# Everything write_world writes: cleared first, so no file of an earlier run (another size, a split not
# written this time) is left beside the new ones.
OUTPUTS = ("images", "captions_train2014.json", "llava_instruct_train.json", "captions_val2014.json",
           "llava_instruct_val.json", "eval.jsonl", "scenes_train.jsonl", "world.json")


def clear(out: Path) -> None:
    import shutil

    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _dump(path: Path, obj, indent: int | None = None) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)


# The picture and spoken question `make demo` ships (mmgpt/assets/demo.png, demo.wav): a scene no training
# image has (its id is outside every split), questions with known answers, the voice a held-out one.
DEMO_SCENE = Scene(
    image_id=900_001,
    items=(world.Item("circle", "red", "big", 0, 0, 0.2, -0.3), world.Item("star", "blue", "small", 1, 1, -0.4, 0.1),
           world.Item("heart", "yellow", "big", 2, 2, 0.3, 0.2)),
    background=((128, 128, 128), (100, 110, 125), "vertical", 0.0),
    image_size=224,
)
DEMO_QA = (("What color is the circle?", "The circle is red."), ("Where is it?", "It is in the top left corner."))
DEMO_SPOKEN = ("What is left of the star?", "The red circle is left of the star.")
DEMO_VOICE = "en-gb-x-rp"


def write_demo_assets(folder: str | Path) -> tuple[Path, Path]:
    """demo.png and demo.wav (see DEMO_SCENE); deterministic, so the shipped files can be checked."""
    from mmgpt.tts import synthesize_wav

    folder = Path(folder)
    image, audio = folder / "demo.png", folder / "demo.wav"
    world.draw(DEMO_SCENE).save(image, format="PNG")
    audio.write_bytes(synthesize_wav(DEMO_SPOKEN[0], DEMO_VOICE))
    return image, audio


def read_eval(path: str | Path, set_name: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if set_name is None or r["set"] == set_name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mmgpt.toy.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--eval-images", type=int, default=300, help="held-out images for the vqa and multiturn sets")
    parser.add_argument("--compositional-images", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-only", action="store_true", help="write only the held-out split")
    args = parser.parse_args(argv)
    for name in ("train_images", "eval_images", "compositional_images"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    try:
        paths = write_world(
            args.out, train_images=args.train_images, eval_images=args.eval_images,
            compositional_images=args.compositional_images, seed=args.seed,
            splits=("eval",) if args.eval_only else ("train", "eval"),
        )
    except ValueError as e:
        parser.error(f"{e} (or pass --eval-only)")
    for key, p in paths.items():
        print(f"{key}: {p}")


if __name__ == "__main__":
    main()
