"""The toy world: scenes of 1-3 colored shapes on a 3x3 grid, how they are drawn, and what is said of them.

Everything is a pure function of a seeded `random.Random`, so a world is reproduced exactly from its seed.

    scene = random_scene(random.Random(0), image_id=1)
    image = draw(scene)                                  # PIL RGB, anti-aliased, scene.image_size square
    qa = ask(scene, "color", random.Random(1), phrasing="seen")   # QA("What color is the heart?", "The heart is red.")

Answers follow one fixed grammar per question kind ("The heart is red.", "There are two hearts.",
"The red circle is left of the star."), so accuracy is an exact match after `normalize`. Questions come in
several phrasings per kind; `HELDOUT` phrasings never appear in training (do answers survive new wording?).
Some color+shape pairs (`HELDOUT_COMBOS`) never appear together in a training image or text (does the model
compose what it learned about colors and shapes?).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 65),
    "blue": (40, 85, 225),
    "yellow": (240, 215, 35),
    "purple": (135, 55, 185),
    "orange": (250, 135, 25),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
SIZES = ("small", "big")
# Muted mid tones: every shape color, white and black included, stands out on all of them.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (100, 110, 125), (175, 165, 140), (95, 130, 130), (150, 125, 140), (120, 125, 95),
    (160, 160, 160), (85, 95, 105),
)
# Never together in a training image, caption or question; the compositional eval is made of them.
HELDOUT_COMBOS = frozenset({
    ("purple", "star"), ("green", "heart"), ("orange", "circle"),
    ("white", "diamond"), ("blue", "triangle"), ("yellow", "square"),
})
IMAGE_SIZES = (96, 128, 160, 192, 224, 256, 320)  # square: CLIP's center crop then keeps the whole grid

# Where a grid cell is, in words: (row, col) -> phrase that follows "is" ("The heart is in the center.").
PLACES: dict[tuple[int, int], str] = {
    (0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right corner",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left corner", (2, 1): "at the bottom", (2, 2): "in the bottom right corner",
}
NUMBERS = ("no", "one", "two", "three")
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class Item:
    shape: str
    color: str
    size: str
    row: int
    col: int
    dx: float = 0.0  # jitter inside the cell, in [-1, 1] of the free margin
    dy: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def place(self) -> str:
        return PLACES[(self.row, self.col)]


@dataclass(frozen=True)
class Scene:
    image_id: int
    items: tuple[Item, ...]  # in reading order (row, then column)
    background: tuple[tuple[int, int, int], tuple[int, int, int], str, float]  # colors, gradient, noise
    image_size: int = 128
    jpeg_quality: int = 0  # 0: saved as PNG

    def ref(self, item: Item) -> str:
        """The shortest unique way to name an item: "the heart", or "the red heart" when two are hearts."""
        if sum(i.shape == item.shape for i in self.items) == 1:
            return f"the {item.shape}"
        return f"the {item.name}"

    def at(self, row: int, col: int) -> Item | None:
        return next((i for i in self.items if (i.row, i.col) == (row, col)), None)

    @property
    def combos(self) -> set[tuple[str, str]]:
        return {(i.color, i.shape) for i in self.items}


# ============================================================================================== scenes


def random_scene(
    rng: random.Random,
    image_id: int,
    *,
    exclude: frozenset[tuple[str, str]] = HELDOUT_COMBOS,
    include: tuple[str, str] | None = None,
) -> Scene:
    """1-3 shapes in distinct cells; no two share color and shape. `exclude`d color+shape pairs never
    occur; an `include`d pair always does (the compositional split)."""
    n = rng.choices((1, 2, 3), weights=(3, 4, 4))[0]
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    items: list[Item] = []
    used: set[tuple[str, str]] = set()
    for k, (row, col) in enumerate(cells):
        if k == 0 and include is not None:
            color, shape = include
        else:
            while True:
                color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
                if (color, shape) not in exclude and (color, shape) not in used and (color, shape) != include:
                    break
        used.add((color, shape))
        items.append(Item(shape, color, rng.choice(SIZES), row, col, rng.uniform(-1, 1), rng.uniform(-1, 1)))
    items.sort(key=lambda i: (i.row, i.col))
    c1, c2 = rng.sample(BACKGROUNDS, 2)
    gradient = rng.choice(("flat", "flat", "vertical", "horizontal", "diagonal"))
    noise = rng.choice((0.0, 0.0, 3.0, 6.0))
    quality = rng.choice((0, 0, 0, 55, 75, 90))
    return Scene(image_id, tuple(items), (c1, c2, gradient, noise), rng.choice(IMAGE_SIZES), quality)


# ============================================================================================= drawing


def _background(scene: Scene, size: int) -> np.ndarray:
    c1, c2, gradient, _ = scene.background
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if gradient == "flat":
        w = np.zeros((size, size), np.float32)
    elif gradient == "vertical":
        w = np.repeat(t[:, None], size, 1)
    elif gradient == "horizontal":
        w = np.repeat(t[None, :], size, 0)
    else:
        w = (t[:, None] + t[None, :]) / 2
    a, b = np.asarray(c1, np.float32), np.asarray(c2, np.float32)
    return a + (b - a) * w[..., None]  # (S, S, 3)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Outline of a shape of half-extent r centered at (cx, cy); None for the circle (an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.85 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.97 * r, cy + 0.75 * r), (cx - 0.97 * r, cy + 0.75 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.62 * r, cy), (cx, cy + r), (cx - 0.62 * r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.05 * r + rad * math.sin(a)))
        return pts
    if shape == "heart":  # the classic parametric heart, scaled to the box
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 15))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def draw(scene: Scene) -> Image.Image:
    """The scene as an RGB image of scene.image_size pixels square."""
    size = scene.image_size
    big = size * SUPERSAMPLE
    base = Image.fromarray(np.clip(_background(scene, size), 0, 255).astype(np.uint8)).resize((big, big), Image.NEAREST)
    pen = ImageDraw.Draw(base)
    cell = big / 3
    for item in scene.items:
        r = cell * (0.40 if item.size == "big" else 0.22)
        margin = 0.6 * (cell / 2 - r)
        cx = (item.col + 0.5) * cell + item.dx * margin
        cy = (item.row + 0.5) * cell + item.dy * margin
        fill = COLORS[item.color]
        poly = shape_polygon(item.shape, cx, cy, r)
        if poly is None:
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            pen.polygon(poly, fill=fill)
    img = base.resize((size, size), Image.BOX)
    noise = scene.background[3]
    if noise:
        arr = np.asarray(img, np.float32)
        arr += np.random.default_rng(scene.image_id).normal(0, noise, arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def file_name(scene: Scene, path_stem: Path) -> str:
    return Path(path_stem).with_suffix(".jpg" if scene.jpeg_quality else ".png").name


def encode(scene: Scene) -> bytes:
    """The scene as the file bytes `save` would write (PNG, or JPEG at the scene's quality)."""
    import io

    buf = io.BytesIO()
    img = draw(scene)
    if scene.jpeg_quality:
        img.save(buf, format="JPEG", quality=scene.jpeg_quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def save(scene: Scene, path_stem: Path) -> str:
    """Write the scene as PNG or JPEG (by its jpeg_quality); returns the file name used."""
    path = Path(path_stem).with_name(file_name(scene, path_stem))
    img = draw(scene)
    if scene.jpeg_quality:
        img.save(path, format="JPEG", quality=scene.jpeg_quality)
    else:
        img.save(path, format="PNG")
    return path.name


# ============================================================================================ language


def a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def count_phrase(n: int, noun: str) -> str:
    """"There is one heart." / "There are two hearts." / "There are no hearts.\""""
    return f"There is one {noun}." if n == 1 else f"There are {NUMBERS[n]} {noun}s."


def join_names(items: Sequence[Item]) -> str:
    names = [f"the {i.name}" for i in items]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


RELATIONS = {  # name -> (test on (other, ref), wording)
    "left": (lambda o, r: o.col < r.col, "left of"),
    "right": (lambda o, r: o.col > r.col, "right of"),
    "above": (lambda o, r: o.row < r.row, "above"),
    "below": (lambda o, r: o.row > r.row, "below"),
}


def describe(scene: Scene) -> str:
    n = len(scene.items)
    parts = [count_phrase(n, "shape")]
    parts += [f"{cap(a(i.size))} {i.name} is {i.place}." for i in scene.items]
    return " ".join(parts)


def captions(scene: Scene, rng: random.Random, k: int = 5) -> list[str]:
    """COCO-style captions: the full description (every shape's size, color, kind and place), then k - 1
    shorter ones that each leave something out, as people's captions do."""
    items = scene.items
    listed = ", ".join(a(i.name) for i in items[:-1]) + (" and " if len(items) > 1 else "") + a(items[-1].name)
    with_size = ", ".join(a(f"{i.size} {i.name}") for i in items[:-1]) + (" and " if len(items) > 1 else "") + a(
        f"{items[-1].size} {items[-1].name}")
    placed = " and ".join(f"{a(i.name)} {i.place}" for i in items)
    noun = "shape" if len(items) == 1 else "shapes"
    pool = [
        cap(f"{with_size}."),
        cap(f"{placed}."),
        f"A picture of {listed}.",
        f"{cap(NUMBERS[len(items)])} {noun}: {listed}.",
        f"A drawing with {with_size} on a plain background.",
        " ".join(f"{cap(a(i.name))} is {i.place}." for i in items),
    ]
    if len(items) >= 2:
        x, y = items[0], items[1]
        if x.row != y.row:
            pool.append(f"{cap(a(x.name))} above {a(y.name)}.")
        if x.col != y.col:
            rel = "left" if x.col < y.col else "right"
            pool.append(f"{cap(a(x.name))} to the {rel} of {a(y.name)}.")
    return [describe(scene), *rng.sample(pool, min(k - 1, len(pool)))]


def perturb(scene: Scene, rng: random.Random, image_id: int,
            exclude: frozenset[tuple[str, str]] = HELDOUT_COMBOS) -> Scene:
    """The scene with one thing changed (a shape's kind, color or size, or its cell): a hard negative for
    contrastive training, which then has to tell scenes apart by every attribute, not just by color."""
    items = list(scene.items)
    k = rng.randrange(len(items))
    it = items[k]
    used = {(i.color, i.shape) for j, i in enumerate(items) if j != k}
    free = [(r, c) for r in range(3) for c in range(3) if scene.at(r, c) is None]
    while True:
        change = rng.choice(("shape", "color", "size", "cell") if free else ("shape", "color", "size"))
        new = it
        if change == "shape":
            new = replace(it, shape=rng.choice([s for s in SHAPES if s != it.shape]))
        elif change == "color":
            new = replace(it, color=rng.choice([c for c in COLORS if c != it.color]))
        elif change == "size":
            new = replace(it, size="small" if it.size == "big" else "big")
        else:
            row, col = rng.choice(free)
            new = replace(it, row=row, col=col)
        if (new.color, new.shape) not in exclude and (new.color, new.shape) not in used:
            break
    items[k] = new
    items.sort(key=lambda i: (i.row, i.col))
    return replace(scene, image_id=image_id, items=tuple(items))


def scene_to_dict(scene: Scene) -> dict:
    return asdict(scene)


def scene_from_dict(d: dict) -> Scene:
    c1, c2, gradient, noise = d["background"]
    return Scene(d["image_id"], tuple(Item(**i) for i in d["items"]), (tuple(c1), tuple(c2), gradient, noise),
                 d["image_size"], d["jpeg_quality"])


# ======================================================================================= questions


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str
    heldout_phrasing: bool = False
    focus: Item | None = None  # the item the answer is about, which a follow-up may call "it"
    extra: dict = field(default_factory=dict, compare=False)


# Question wordings per kind: (seen in training, held out). Held-out wordings only use words that
# training text also uses, so a miss means the model did not generalize, not that it never saw a word.
PHRASINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "color": (("What color is {ref}?", "What is the color of {ref}?", "Which color does {ref} have?",
               "What's the color of {ref}?"), ("Tell me the color of {ref}.",)),
    "shape_at": (("What shape is {place}?", "Which shape is {place}?", "What is {place}?"),
                 ("What do you see {place}?",)),
    "shape_of_color": (("Which shape is {color}?", "What shape is {color}?"), ("What is the {color} shape?",)),
    "count_all": (("How many shapes are there?", "How many shapes are in the picture?", "Count the shapes."),
                  ("How many shapes can you see?",)),
    "count_shape": (("How many {shape}s are there?", "How many {shape}s are in the picture?"),
                    ("Count the {shape}s.",)),
    "count_color": (("How many {color} shapes are there?", "How many {color} shapes are in the picture?"),
                    ("Count the {color} shapes.",)),
    "where": (("Where is {ref}?", "Where is {ref} in the picture?", "Where's {ref}?",
               "In which part of the picture is {ref}?"), ("Tell me where {ref} is.",)),
    "exists": (("Is there {a_name}?", "Is there {a_name} in the picture?", "Do you see {a_name}?"),
               ("Can you see {a_name}?",)),
    "relation": (("What is {rel} {ref}?", "What's {rel} {ref}?", "Which shape is {rel} {ref}?"),
                 ("What do you see {rel} {ref}?",)),
    "above_below": (("Is {ref} above or below {ref2}?",), ("Is {ref} below or above {ref2}?",)),
    "left_right": (("Is {ref} left or right of {ref2}?",), ("Is {ref} right or left of {ref2}?",)),
    "size": (("Is {ref} big or small?", "What size is {ref}?"), ("Is {ref} small or big?",)),
    "describe": (("Describe the picture.", "What is in the picture?", "Tell me about the picture.",
                  "Can you describe the picture?", "Describe everything in the picture."),
                 ("What do you see in the picture?",)),
    # follow-ups: they only make sense after an earlier turn ("it" = that turn's item)
    "it_color": (("And what color is it?", "What color is it?", "Which color does it have?"),
                 ("And which color is it?",)),
    "it_where": (("And where is it?", "Where is it?"), ("Where is it in the picture?",)),
    "it_size": (("Is it big or small?", "And what size is it?"), ("Is it small or big?",)),
    "it_above_below": (("Is it above or below {ref2}?",), ("Is it below or above {ref2}?",)),
    "it_left_right": (("Is it left or right of {ref2}?",), ("Is it right or left of {ref2}?",)),
    "and_other": (("And {ref2}?", "What about {ref2}?"), ("And what about {ref2}?",)),
}
KINDS = ("color", "shape_at", "shape_of_color", "count_all", "count_shape", "count_color", "where", "exists",
         "relation", "above_below", "left_right", "size", "describe")
FOLLOW_UPS = ("it_color", "it_where", "it_size", "it_above_below", "it_left_right", "and_other")


def _phrase(kind: str, rng: random.Random, phrasing: str) -> tuple[str, bool]:
    seen, held = PHRASINGS[kind]
    if phrasing == "seen":
        return rng.choice(seen), False
    if phrasing == "heldout":
        return rng.choice(held), True
    if phrasing == "any":
        pool = [(t, False) for t in seen] + [(t, True) for t in held]
        return rng.choice(pool)
    raise ValueError(f"phrasing must be seen, heldout or any, got {phrasing!r}")


def _qa(kind, rng, phrasing, answer, focus=None, **slots) -> QA:
    template, held = _phrase(kind, rng, phrasing)
    return QA(cap(template.format(**slots)), answer, kind, held, focus)


def _unique_shape_items(scene: Scene) -> list[Item]:
    return [i for i in scene.items if sum(j.shape == i.shape for j in scene.items) == 1]


def ask(
    scene: Scene,
    kind: str,
    rng: random.Random,
    *,
    phrasing: str = "seen",
    exclude: frozenset[tuple[str, str]] = HELDOUT_COMBOS,
    focus: Item | None = None,
) -> QA | None:
    """One question of `kind` about the scene with its answer; None when the scene cannot support it
    (e.g. no two items for a relation). `focus` fixes the item asked about where the kind has one.
    `exclude`d color+shape pairs are never named in a question about something absent."""
    items = scene.items

    def pick(pool: Sequence[Item]) -> Item | None:
        if focus is not None:
            return focus if focus in pool else None
        return rng.choice(list(pool)) if pool else None

    if kind == "color":
        it = pick(_unique_shape_items(scene))
        if it is None:
            return None
        ref = scene.ref(it)
        return _qa(kind, rng, phrasing, f"{cap(ref)} is {it.color}.", it, ref=ref)
    if kind == "shape_at":
        if focus is not None:
            row, col = focus.row, focus.col
        elif rng.random() < 0.8:
            it = rng.choice(items)
            row, col = it.row, it.col
        else:
            row, col = rng.randrange(3), rng.randrange(3)
        it = scene.at(row, col)
        place = PLACES[(row, col)]
        answer = f"It is {a(it.shape)}." if it else f"There is nothing {place}."
        return _qa(kind, rng, phrasing, answer, it, place=place)
    if kind == "shape_of_color":
        pool = [i for i in items if sum(j.color == i.color for j in items) == 1]
        it = pick(pool)
        if it is None:
            return None
        return _qa(kind, rng, phrasing, f"The {it.color} shape is {a(it.shape)}.", it, color=it.color)
    if kind == "count_all":
        return _qa(kind, rng, phrasing, count_phrase(len(items), "shape"))
    if kind == "count_shape":
        shape = rng.choice([i.shape for i in items]) if rng.random() < 0.6 else rng.choice(SHAPES)
        n = sum(i.shape == shape for i in items)
        return _qa(kind, rng, phrasing, count_phrase(n, shape), shape=shape)
    if kind == "count_color":
        color = rng.choice([i.color for i in items]) if rng.random() < 0.6 else rng.choice(list(COLORS))
        n = sum(i.color == color for i in items)
        return _qa(kind, rng, phrasing, count_phrase(n, f"{color} shape"), color=color)
    if kind == "where":
        it = pick(items)
        if it is None:
            return None
        ref = scene.ref(it)
        return _qa(kind, rng, phrasing, f"{cap(ref)} is {it.place}.", it, ref=ref)
    if kind == "exists":
        if focus is not None or rng.random() < 0.5:
            it = pick(items)
            if it is None:
                return None
            return _qa(kind, rng, phrasing, f"Yes, there is {a(it.name)}.", it, a_name=a(it.name))
        present = scene.combos
        while True:  # a near miss half the time: a shape that is there in another color, or the reverse
            base = rng.choice(items)
            if rng.random() < 0.5:
                color, shape = rng.choice(list(COLORS)), base.shape
            elif rng.random() < 0.5:
                color, shape = base.color, rng.choice(SHAPES)
            else:
                color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            if (color, shape) not in present and (color, shape) not in exclude:
                break
        name = f"{color} {shape}"
        return _qa(kind, rng, phrasing, f"No, there is no {name}.", None, a_name=a(name))
    if kind == "relation":
        if len(items) < 2:
            return None
        ref_item = rng.choice(items)
        options = [r for r, (test, _) in RELATIONS.items() if any(test(o, ref_item) for o in items if o != ref_item)]
        rel = rng.choice(options) if options and rng.random() < 0.85 else rng.choice(list(RELATIONS))
        test, words = RELATIONS[rel]
        found = [o for o in items if o != ref_item and test(o, ref_item)]
        ref = scene.ref(ref_item)
        if not found:
            answer = f"Nothing is {words} {ref}."
        else:
            answer = f"{cap(join_names(found))} {'is' if len(found) == 1 else 'are'} {words} {ref}."
        template, held = _phrase(kind, rng, phrasing)
        if rel in ("left", "right") and not held and rng.random() < 0.3:
            template = "What is to the {rel} of {ref}?"  # a seen variant that only fits left/right
            words_q = rel
        else:
            words_q = words
        question = cap(template.format(rel=words_q, ref=ref))
        return QA(question, answer, kind, held, found[0] if len(found) == 1 else None)
    if kind in ("above_below", "left_right"):
        axis = "row" if kind == "above_below" else "col"
        pairs = [(x, y) for x in items for y in items if getattr(x, axis) != getattr(y, axis)]
        if focus is not None:
            pairs = [(x, y) for x, y in pairs if x == focus]
        if not pairs:
            return None
        x, y = rng.choice(pairs)
        if kind == "above_below":
            words = "above" if x.row < y.row else "below"
        else:
            words = "left of" if x.col < y.col else "right of"
        rx, ry = scene.ref(x), scene.ref(y)
        return _qa(kind, rng, phrasing, f"{cap(rx)} is {words} {ry}.", x, ref=rx, ref2=ry)
    if kind == "size":
        it = pick(items)
        if it is None:
            return None
        ref = scene.ref(it)
        return _qa(kind, rng, phrasing, f"{cap(ref)} is {it.size}.", it, ref=ref)
    if kind == "describe":
        return _qa(kind, rng, phrasing, describe(scene))
    raise ValueError(f"unknown question kind {kind!r}")


def follow_up(scene: Scene, first: QA, rng: random.Random, *, phrasing: str = "seen") -> QA | None:
    """A second question that needs the first turn to be understood ("And what color is it?"), or None."""
    options: list[str] = []
    it = first.focus
    others = [o for o in scene.items if o != it] if it else []
    if it is not None:
        options += ["it_color", "it_where", "it_size"]
        if any(o.row != it.row for o in others):
            options.append("it_above_below")
        if any(o.col != it.col for o in others):
            options.append("it_left_right")
    if first.kind in ("color", "where", "size") and it is not None:
        if [o for o in others if o in _unique_shape_items(scene) or first.kind != "color"]:
            options.append("and_other")
    if not options:
        return None
    kind = rng.choice(options)
    if kind == "it_color":
        return _qa(kind, rng, phrasing, f"It is {it.color}.", it)
    if kind == "it_where":
        return _qa(kind, rng, phrasing, f"It is {it.place}.", it)
    if kind == "it_size":
        return _qa(kind, rng, phrasing, f"It is {it.size}.", it)
    if kind in ("it_above_below", "it_left_right"):
        axis = "row" if kind == "it_above_below" else "col"
        o = rng.choice([o for o in others if getattr(o, axis) != getattr(it, axis)])
        ref2 = "the other one" if len(scene.items) == 2 and rng.random() < 0.4 else scene.ref(o)
        if kind == "it_above_below":
            words = "above" if it.row < o.row else "below"
        else:
            words = "left of" if it.col < o.col else "right of"
        return _qa(kind, rng, phrasing, f"It is {words} {scene.ref(o)}.", it, ref2=ref2)
    # and_other: the first question again, about another item
    pool = [o for o in others if first.kind != "color" or o in _unique_shape_items(scene)]
    o = rng.choice(pool)
    again = ask(scene, first.kind, rng, focus=o)
    if again is None:
        return None
    return _qa(kind, rng, phrasing, again.answer, o, ref2=scene.ref(o))


# ========================================================================================== scoring


_PUNCT = re.compile(r"[^\w\s']")


def normalize(text: str) -> str:
    """For exact-match scoring: lowercase, punctuation dropped, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def vary_case(question: str, rng: random.Random) -> str:
    """Training-time variation so questions typed or transcribed without capitals or '?' still work."""
    r = rng.random()
    if r < 0.15:
        return question.lower()
    if r < 0.25:
        return question.rstrip("?.")
    return question
