"""The toy world generator: deterministic, truthful answers, real dataset formats, and held-out splits
that really are held out."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from mmgpt.toy import generate, world
from mmgpt.toy.world import HELDOUT_COMBOS, PHRASINGS, Item, Scene


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate.write_world(out, train_images=120, eval_images=30, compositional_images=18, seed=3, progress=False)
    return out


def scene(*items: Item) -> Scene:
    return Scene(1, tuple(sorted(items, key=lambda i: (i.row, i.col))), ((128, 128, 128), (128, 128, 128), "flat", 0.0), 96)


def test_same_seed_same_files(small_world, tmp_path):
    again = tmp_path / "again"
    generate.write_world(again, train_images=120, eval_images=30, compositional_images=18, seed=3, progress=False)
    for name in ("captions_train2014.json", "llava_instruct_train.json", "eval.jsonl"):
        assert (again / name).read_bytes() == (small_world / name).read_bytes(), name
    images = sorted(p.name for p in (small_world / "images").iterdir())
    assert images == sorted(p.name for p in (again / "images").iterdir())
    for name in images[:10]:
        assert (again / "images" / name).read_bytes() == (small_world / "images" / name).read_bytes()


def test_eval_only_writes_the_same_held_out_split(small_world, tmp_path):
    only = tmp_path / "eval-only"
    generate.write_world(only, train_images=120, eval_images=30, compositional_images=18, seed=3,
                         splits=("eval",), progress=False)
    assert (only / "eval.jsonl").read_bytes() == (small_world / "eval.jsonl").read_bytes()
    assert not (only / "llava_instruct_train.json").exists()
    assert all(p.name.startswith("COCO_val2014_") for p in (only / "images").iterdir())


def test_files_are_what_training_reads(small_world):
    from mmgpt.training.data import load_coco_captions, load_llava_instruct

    captions, stats = load_coco_captions(small_world / "captions_train2014.json", small_world / "images", strict=True)
    assert stats.kept == 120 * 5 and not stats.skipped
    convs, stats = load_llava_instruct(small_world / "llava_instruct_train.json", small_world / "images", strict=True)
    assert stats.kept == 120
    assert any(len(c.messages) >= 6 for c in convs)  # multi-turn
    assert {Path(c.image_path).suffix for c in convs} == {".png", ".jpg"}  # some JPEG-compressed


def held_out_wording(template: str) -> re.Pattern:
    """A held-out template as a pattern over whole questions, each slot limited to what fills it, so a
    seen wording that shares its first words ("Count the shapes." vs "Count the {shape}s.") is told apart."""
    shape, color = "|".join(world.SHAPES), "|".join(world.COLORS)
    ref = rf"the (?:(?:{color}) )?(?:{shape})|the other one"
    slots = {
        "ref": ref, "ref2": ref, "shape": shape, "color": color, "a_name": rf"an? (?:{color}) (?:{shape})",
        "place": "|".join(world.PLACES.values()), "rel": "left of|right of|above|below|left|right",
    }
    parts = re.split(r"\{(\w+)\}", template.rstrip("?."))
    body = "".join(re.escape(part) if k % 2 == 0 else f"(?:{slots[part]})" for k, part in enumerate(parts))
    return re.compile(rf"{body}[?.]?", re.IGNORECASE)


def test_training_never_sees_held_out_pairs_phrasings_or_images(small_world):
    entries = json.loads((small_world / "llava_instruct_train.json").read_text())
    coco = json.loads((small_world / "captions_train2014.json").read_text())
    text = " ".join(t["value"] for e in entries for t in e["conversations"]).lower()
    text += " ".join(a["caption"] for a in coco["annotations"]).lower()
    for color, shape in HELDOUT_COMBOS:
        assert f"{color} {shape}" not in text
    questions = [t["value"].replace("<image>", "").strip() for e in entries for t in e["conversations"]
                 if t["from"] == "human"]
    held = [t for _, ts in PHRASINGS.values() for t in ts]
    assert len(held) == 19
    for template in held:  # every held-out wording, none skipped
        pattern = held_out_wording(template)
        assert not [q for q in questions if pattern.fullmatch(q)], template
    # the check can see a leak: each held-out wording matches its own filled-in questions
    rows = generate.read_eval(small_world / "eval.jsonl", "vqa")
    heard = [r["question"] for r in rows if r["heldout_phrasing"]]
    assert heard and all(any(held_out_wording(t).fullmatch(q) for t in held) for q in heard)
    train_ids = {e["id"] for e in entries}
    eval_ids = {f"{r['image_id']:012d}" for r in generate.read_eval(small_world / "eval.jsonl")}
    assert not train_ids & eval_ids


def test_held_out_images_show_no_training_scene():
    def layouts(scenes):
        return [generate.layout(s) for s in scenes]

    raw = generate.draw_scenes(random.Random(0), 2000, 60, 12, seed=0, novel=False)
    train, held, comp = generate.draw_scenes(random.Random(0), 2000, 60, 12, seed=0)
    assert layouts(train) == layouts(raw[0])  # the training scenes are untouched
    seen = set(layouts(train))
    assert sum(x in seen for x in layouts(raw[1] + raw[2])) > 5  # without the redraw, twins are common
    assert not seen & set(layouts(held + comp))
    assert len(held) == 60 and all(any((i.color, i.shape) in HELDOUT_COMBOS for i in s.items) for s in comp)
    assert [s.image_id for s in held + comp] == [s.image_id for s in raw[1] + raw[2]]


def test_writing_again_replaces_an_earlier_world(tmp_path):
    out = tmp_path / "w"
    generate.write_world(out, train_images=20, eval_images=4, compositional_images=2, seed=1, progress=False)
    (out / "images" / "stale.png").write_bytes(b"x")
    generate.write_world(out, train_images=0, eval_images=4, compositional_images=2, seed=2, splits=("eval",),
                         progress=False)
    assert not (out / "images" / "stale.png").exists()
    assert not (out / "llava_instruct_train.json").exists() and not (out / "scenes_train.jsonl").exists()
    assert not any(p.name.startswith("COCO_train2014_") for p in (out / "images").iterdir())
    assert json.loads((out / "world.json").read_text())["seed"] == 2


def test_no_training_images_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mmgpt.toy.generate", str(tmp_path / "w"), "--train-images", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "train_images must be at least 1" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mmgpt.toy.generate", str(tmp_path / "w"), "--train-images", "0",
                        "--eval-only", "--eval-images", "3", "--compositional-images", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(generate.read_eval(tmp_path / "w" / "eval.jsonl", "vqa")) == 6


def test_eval_sets_cover_what_they_claim(small_world):
    rows = generate.read_eval(small_world / "eval.jsonl")
    by_set = {s: [r for r in rows if r["set"] == s] for s in ("vqa", "compositional", "multiturn")}
    assert len(by_set["vqa"]) == 60 and any(r["heldout_phrasing"] for r in by_set["vqa"])
    for r in by_set["compositional"]:
        pair = [c for c in r["combos"] if tuple(c.split()) in HELDOUT_COMBOS]
        assert len(pair) == 1
    assert all(len(r["history"]) == 2 for r in by_set["multiturn"])
    assert all(r["kind"] in world.FOLLOW_UPS for r in by_set["multiturn"])


def test_answers_follow_the_scene():
    s = scene(Item("heart", "red", "big", 0, 0), Item("star", "blue", "small", 1, 2), Item("heart", "green", "small", 2, 1))
    rng = random.Random(0)
    star = s.items[1]
    assert world.ask(s, "color", rng, focus=star).answer == "The star is blue."
    assert world.ask(s, "where", rng, focus=s.items[0]).answer == "The red heart is in the top left corner."
    assert world.ask(s, "size", rng, focus=star).answer == "The star is small."
    assert world.describe(s) == ("There are three shapes. A big red heart is in the top left corner. "
                                 "A small blue star is on the right. A small green heart is at the bottom.")
    qa = world.ask(s, "above_below", rng, focus=star)
    assert qa.answer in ("The star is below the red heart.", "The star is above the green heart.")
    counts = {world.ask(s, "count_shape", random.Random(k)).answer for k in range(40)}
    assert "There are two hearts." in counts and "There is one star." in counts
    for k in range(30):
        qa = world.ask(s, "relation", random.Random(k))
        ref = next(i for i in s.items if qa.question.lower().endswith(s.ref(i) + "?"))
        if "left of" in qa.question:
            assert ("Nothing" in qa.answer) == (ref.col == 0)
    follow = world.follow_up(s, world.ask(s, "color", rng, focus=star), random.Random(1))
    assert follow is not None and follow.focus in s.items


def test_drawing_is_anti_aliased_and_puts_shapes_in_their_cells():
    s = scene(Item("circle", "red", "big", 0, 0), Item("square", "white", "small", 2, 2))
    img = np.asarray(world.draw(s)).astype(int)
    assert img.shape == (96, 96, 3)
    third = 32
    red = (img[..., 0] > 180) & (img[..., 1] < 80)
    assert red[:third, :third].sum() > 300 and red[third:, :].sum() == 0
    edge_colors = {tuple(p) for p in img[:third, :third].reshape(-1, 3)}
    assert len(edge_colors) > 5  # blended edge pixels, not just background and fill


def test_normalize_ignores_case_and_punctuation():
    assert world.normalize("The heart is RED.") == world.normalize("the heart is red")
    assert world.normalize("The heart is red.") != world.normalize("The heart is blue.")
