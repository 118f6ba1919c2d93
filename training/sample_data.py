"""A tiny dataset in exactly the real COCO-2014-captions and LLaVA-Instruct-150K formats.

Images are small JPEGs of one colored shape on a plain background, so captions and answers can describe
them truthfully ("a red circle on a white background") and a model can actually learn something in a demo.
The layout reproduces what makes the real data awkward:

- the COCO files name images the 2014 way (`COCO_train2014_000000033471.jpg`), the LLaVA files the 2017 way
  (`000000033471.jpg`), and with `mixed_naming` the files on disk use both namings (otherwise all 2014);
- "<image>" comes before the question in some LLaVA entries and after it in others; some have 2-3 rounds;
- with `missing_image`, one image is listed (with captions and a conversation) but has no file on disk.

    python -m mmgpt.training.sample_data OUT_DIR [--n-images N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 96

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 210, 30),
    "orange": (245, 140, 20),
    "purple": (130, 40, 170),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = ("center", "left", "right", "top", "bottom")
SIZES = ("small", "large")


@dataclass(frozen=True)
class Scene:
    image_id: int
    shape: str
    color: str
    background: str
    position: str
    size: str


def _random_scene(rng: random.Random, image_id: int) -> Scene:
    return Scene(
        image_id=image_id,
        shape=rng.choice(SHAPES),
        color=rng.choice(list(COLORS)),
        background=rng.choice(list(BACKGROUNDS)),
        position=rng.choice(POSITIONS),
        size=rng.choice(SIZES),
    )


def draw_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    r = size * (0.3 if scene.size == "large" else 0.15)
    offset = size * 0.25
    cx, cy = {
        "center": (size / 2, size / 2),
        "left": (size / 2 - offset, size / 2),
        "right": (size / 2 + offset, size / 2),
        "top": (size / 2, size / 2 - offset),
        "bottom": (size / 2, size / 2 + offset),
    }[scene.position]
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def _a(word: str) -> str:
    """The word with its indefinite article: "a red", "an orange"."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _captions(scene: Scene, rng: random.Random) -> list[str]:
    s = scene
    where = "in the center" if s.position == "center" else f"on the {s.position}"
    templates = [
        f"{_a(s.color)} {s.shape} on {_a(s.background)} background",
        f"A {s.size} {s.color} {s.shape} {where} of the image.",
        f"A simple drawing of {_a(s.color)} {s.shape}.",
        f"{s.color.capitalize()} {s.shape} against a plain {s.background} backdrop ",  # real captions have stray spaces
        f"{_a(s.background)} picture with a {s.size} {s.shape} that is {s.color}",
    ]
    return rng.sample(templates, rng.choice([2, 3]))


def _conversation(scene: Scene, rng: random.Random, image_first: bool) -> list[dict[str, str]]:
    s = scene
    where = "in the center" if s.position == "center" else f"on the {s.position} side"
    rounds = [
        ("What shape is shown in the image?", f"The image shows {_a(s.shape)}."),
        ("What color is the shape?", f"The {s.shape} is {s.color}."),
        ("What color is the background?", f"The background is {s.background}."),
        ("Where is the shape located?", f"The {s.shape} is {where} of the image."),
        (
            "Describe the image briefly.",
            f"A {s.size} {s.color} {s.shape} on a plain {s.background} background.",
        ),
        ("Is the shape large or small?", f"It is {s.size} compared to the image."),
    ]
    chosen = rng.sample(rounds, rng.choice([1, 2, 3]))
    conv: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(chosen):
        if i == 0:
            question = f"<image>\n{question}" if image_first else f"{question}\n<image>"
        conv.append({"from": "human", "value": question})
        conv.append({"from": "gpt", "value": answer})
    return conv


def _coco_json(split: str, scenes: list[Scene], rng: random.Random, first_ann_id: int) -> dict:
    images = [
        {
            "license": 1,
            "file_name": f"COCO_{split}2014_{s.image_id:012d}.jpg",
            "coco_url": f"http://images.cocodataset.org/{split}2014/COCO_{split}2014_{s.image_id:012d}.jpg",
            "height": IMAGE_SIZE,
            "width": IMAGE_SIZE,
            "date_captured": "2013-11-14 16:28:13",
            "flickr_url": "http://farm1.staticflickr.com/1/1_1.jpg",
            "id": s.image_id,
        }
        for s in scenes
    ]
    annotations = []
    ann_id = first_ann_id
    for s in scenes:
        for caption in _captions(s, rng):
            annotations.append({"image_id": s.image_id, "id": ann_id, "caption": caption})
            ann_id += 1
    return {
        "info": {
            "description": "mmgpt sample data in the COCO 2014 captions format",
            "url": "http://mscoco.org",
            "version": "1.0",
            "year": 2014,
            "contributor": "mmgpt",
            "date_created": "2015-01-27 09:11:52.357475",
        },
        "images": images,
        "licenses": [
            {"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "CC BY-NC-SA"}
        ],
        "annotations": annotations,
    }


def _llava_json(scenes: list[Scene], rng: random.Random, absent: frozenset[int] = frozenset()) -> list[dict]:
    # Alternate the "<image>" placement over the images that exist, so both placements occur among the
    # readable entries whatever the count.
    entries = []
    k = 0
    for s in scenes:
        image_first = k % 2 == 0
        if s.image_id not in absent:
            k += 1
        entries.append(
            {
                "id": f"{s.image_id:012d}",
                "image": f"{s.image_id:012d}.jpg",
                "conversations": _conversation(s, rng, image_first=image_first),
            }
        )
    return entries


def write_sample_datasets(
    out_dir: str | Path,
    n_images: int = 12,
    seed: int = 0,
    missing_image: bool = True,
    mixed_naming: bool = True,
) -> dict[str, Path]:
    """Write the sample datasets under `out_dir`; returns their paths.

    Keys: "root", "images" (folder of JPEGs for both splits), "captions_train" (`captions_train2014.json`),
    "captions_val" (`captions_val2014.json`), "instruct_train" (`llava_instruct.json`), "instruct_val"
    (`llava_instruct_val.json`). The train split has `n_images` images on disk (plus, with
    `missing_image`, one more listed in both train files but absent); the held-out split has
    max(2, n_images // 4) images. Deterministic for a given seed.
    """
    if n_images < 2:
        raise ValueError("n_images must be at least 2 (both '<image>' placements and namings need two)")
    rng = random.Random(seed)
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)

    n_val = max(2, n_images // 4)
    n_total = n_images + n_val + (1 if missing_image else 0)
    # COCO-like ids: distinct, not contiguous, below COCO's max id so 12-digit names look real.
    ids = rng.sample(range(1, 581930), n_total)
    scenes = [_random_scene(rng, i) for i in ids]
    train, val = scenes[:n_images], scenes[n_images : n_images + n_val]
    absent = scenes[n_images + n_val :]  # listed in the train files, never written

    for split, split_scenes in (("train", train), ("val", val)):
        for k, s in enumerate(split_scenes):
            # Alternate namings on disk; the JSON files still use their own dataset's naming.
            name = (
                f"{s.image_id:012d}.jpg"
                if mixed_naming and k % 2 == 1
                else f"COCO_{split}2014_{s.image_id:012d}.jpg"
            )
            draw_scene(s).save(image_dir / name, format="JPEG", quality=90)

    # Put the absent image in the middle of the train lists, where a reader can't get away with
    # only checking the ends.
    train_listed = train[: n_images // 2] + absent + train[n_images // 2 :]
    paths = {
        "root": out,
        "images": image_dir,
        "captions_train": out / "captions_train2014.json",
        "captions_val": out / "captions_val2014.json",
        "instruct_train": out / "llava_instruct.json",
        "instruct_val": out / "llava_instruct_val.json",
    }
    _write_json(paths["captions_train"], _coco_json("train", train_listed, rng, first_ann_id=1))
    _write_json(paths["captions_val"], _coco_json("val", val, rng, first_ann_id=100_000))
    _write_json(
        paths["instruct_train"], _llava_json(train_listed, rng, frozenset(s.image_id for s in absent))
    )
    _write_json(paths["instruct_val"], _llava_json(val, rng))
    return paths


def _write_json(path: Path, obj: object) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(obj, f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-images", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-missing-image", action="store_true", help="list no image that is absent on disk"
    )
    parser.add_argument(
        "--no-mixed-naming", action="store_true", help="name all files on disk the COCO 2014 way"
    )
    args = parser.parse_args(argv)
    paths = write_sample_datasets(
        args.out_dir,
        n_images=args.n_images,
        seed=args.seed,
        missing_image=not args.no_missing_image,
        mixed_naming=not args.no_mixed_naming,
    )
    for key, p in paths.items():
        print(f"{key}: {p}")


if __name__ == "__main__":
    main()
