"""Readers for the two training datasets, in their real on-disk formats.

Stage 1 (projector pre-training) reads COCO 2014 captions (`captions_train2014.json`)::

    {"info": {...}, "licenses": [...],
     "images": [{"id": 33471, "file_name": "COCO_train2014_000000033471.jpg", ...}, ...],
     "annotations": [{"image_id": 33471, "id": 1234, "caption": "A red bus ..."}, ...]}

Stage 2 (instruction tuning) reads LLaVA-Instruct-150K (`llava_instruct_150k.json`), a JSON list of::

    {"id": "000000033471", "image": "000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                       {"from": "gpt", "value": "The ..."}, ...]}

The two name the same COCO image differently (2014 vs 2017 file names), so images are found through an
`ImageIndex` keyed by file name and by the numeric id in the file name.

Bad entries (image missing on disk, malformed conversation) are skipped and counted in a `SkipStats`,
summarised in one log line; with `strict=True` the first one raises a ValueError naming the entry and the
reason instead. Problems with the file itself (missing, not JSON, wrong top-level shape) always raise.

Decisions on LLaVA conversations (see `_validate_conversation`):

- An entry without an "image" key (or with "image": null) is a text-only conversation and is valid, as in
  LLaVA's own mixtures; it must then not contain "<image>" (there would be nothing to put there).
- An entry with an image must have exactly one "<image>", in the first (human) turn. An image with no
  "<image>" anywhere is skipped rather than guessed at: LLaVA's own trainer would silently drop the image
  for such an entry, so training on it would teach answers about an image the model never saw placed.
- "<image>" is removed from the text together with the newline that separates it from the question, on
  either side (LLaVA data has both "<image>\\nQ" and "Q\\n<image>"); the model's prompt template
  re-inserts the image positions at the start of the first user turn, and `InstructSample.has_image`
  records that it should.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})

_ROLE_MAP = {"human": "user", "gpt": "assistant"}
_TRAILING_DIGITS = re.compile(r"(\d+)$")

# Skip reasons. Short stable codes: they key SkipStats.by_reason and appear in strict-mode errors.
MISSING_IMAGE = "missing_image"  # the referenced image file is not in the image folder
UNKNOWN_IMAGE_ID = "unknown_image_id"  # COCO: annotation's image_id is not in the "images" list
BAD_ANNOTATION = "bad_annotation"  # COCO: annotation is not {"image_id": int, "caption": str}
EMPTY_CAPTION = "empty_caption"  # COCO: caption is blank
BAD_ENTRY = "bad_entry"  # LLaVA: entry is not an object, or its "image" is not a string
NOT_A_LIST = "conversations_not_a_list"
EMPTY_CONVERSATION = "empty_conversation"
BAD_TURN = "bad_turn"  # a turn is not {"from": ..., "value": ...}
UNKNOWN_ROLE = "unknown_role"  # "from" is neither "human" nor "gpt"
NON_STR_VALUE = "non_str_value"
ROLES_NOT_ALTERNATING = "roles_not_alternating"  # must be human, gpt, human, gpt, ..., ending with gpt
EMPTY_RESPONSE = "empty_response"  # an assistant turn with no text: nothing to learn from
IMAGE_TOKEN_MISPLACED = "image_token_not_in_first_turn"
IMAGE_TOKEN_REPEATED = "image_token_repeated"
IMAGE_TOKEN_MISSING = "image_without_image_token"
IMAGE_TOKEN_WITHOUT_IMAGE = "image_token_without_image"


class EntryError(ValueError):
    """A single dataset entry is unusable (raised in strict mode; otherwise the entry is skipped)."""

    def __init__(self, path: Path, entry: str, reason: str, detail: str) -> None:
        self.path, self.entry, self.reason, self.detail = path, entry, reason, detail
        super().__init__(f"{path}: entry {entry}: {reason}: {detail}")


@dataclass
class SkipStats:
    """How many entries a reader saw, kept, and skipped (by reason)."""

    total: int = 0
    kept: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    # The first few skipped entries per reason, so a log line can point at concrete examples.
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.by_reason.values())

    def skip(self, reason: str, entry: str, max_examples: int = 3) -> None:
        self.by_reason[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < max_examples:
            ex.append(entry)

    def summary(self, what: str) -> str:
        line = f"{what}: kept {self.kept} of {self.total} entries"
        if self.skipped:
            reasons = ", ".join(
                f"{r}={n} (e.g. {', '.join(self.examples.get(r, []))})"
                for r, n in sorted(self.by_reason.items())
            )
            line += f", skipped {self.skipped}: {reasons}"
        return line

    def log(self, what: str) -> None:
        (logger.warning if self.skipped else logger.info)(self.summary(what))


@dataclass(frozen=True)
class CaptionSample:
    """One (image, caption) pair; an image with 5 captions gives 5 samples."""

    image_id: int
    image_path: Path
    caption: str


@dataclass
class InstructSample:
    """One conversation. `messages` alternate user/assistant, start with user, end with assistant, and
    contain no "<image>" text; if `has_image`, the image belongs at the start of the first user turn."""

    id: str
    image_id: int | None
    image_path: Path | None
    messages: list[dict[str, str]]

    @property
    def has_image(self) -> bool:
        return self.image_path is not None


# --------------------------------------------------------------------------------------------- images


def parse_image_id(file_name: str) -> int | None:
    """The numeric id in a COCO file name: the trailing digits of the stem.

    "COCO_train2014_000000033471.jpg" -> 33471, "000000033471.jpg" -> 33471, "cat.jpg" -> None.
    """
    m = _TRAILING_DIGITS.search(Path(file_name).stem)
    return int(m.group(1)) if m else None


class ImageIndex:
    """Finds images in a folder by file name or by numeric id, whatever the naming on disk.

    The folder is scanned once (its files, plus the files of its direct subfolders, so both
    `images/x.jpg` and `images/train2014/x.jpg` layouts work). Lookups are then dict hits, which matters
    for 150K entries on a network file system where a stat per entry is slow.
    """

    def __init__(self, image_dir: str | Path) -> None:
        self.image_dir = Path(image_dir)
        if not self.image_dir.exists():
            raise FileNotFoundError(f"image folder {self.image_dir} does not exist")
        if not self.image_dir.is_dir():
            raise NotADirectoryError(f"image folder {self.image_dir} is not a directory")
        self.by_name: dict[str, Path] = {}
        self.by_id: dict[int, Path] = {}
        self.duplicate_ids = 0
        # Top level first, then subfolders, each sorted: on a name or id collision the first one found
        # wins, so the result does not depend on directory listing order.
        files, subdirs = _list_dir(self.image_dir)
        for sub in subdirs:
            files.extend(_list_dir(sub)[0])
        for p in files:
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            self.by_name.setdefault(p.name, p)
            image_id = parse_image_id(p.name)
            if image_id is None:
                continue
            if image_id in self.by_id:
                self.duplicate_ids += 1
            else:
                self.by_id[image_id] = p
        if self.duplicate_ids:
            logger.warning(
                "%s: %d image files share a numeric id with another file; the first (sorted) one is used",
                self.image_dir,
                self.duplicate_ids,
            )

    def __len__(self) -> int:
        return len(self.by_name)

    def resolve(self, file_name: str | None = None, image_id: int | None = None) -> Path | None:
        """Path of the image, or None. Tries the exact file name first (also as a path relative to the
        folder, e.g. "coco/train2017/x.jpg"), then the numeric id given or parsed from the name."""
        if file_name:
            hit = self.by_name.get(Path(file_name).name)
            if hit is not None:
                return hit
            if "/" in file_name or "\\" in file_name:
                candidate = self.image_dir / file_name
                if candidate.is_file():
                    return candidate
            if image_id is None:
                image_id = parse_image_id(file_name)
        if image_id is not None:
            return self.by_id.get(image_id)
        return None


def _list_dir(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files, subfolders) of `folder`, each sorted. os.scandir reads the entry types from the directory
    listing itself, so an 83K-image COCO folder costs no stat per file."""
    files: list[Path] = []
    dirs: list[Path] = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.is_file():
                files.append(Path(entry.path))
            elif entry.is_dir():
                dirs.append(Path(entry.path))
    return sorted(files), sorted(dirs)


def _as_index(image_dir: str | Path | ImageIndex) -> ImageIndex:
    # Accepting a prebuilt index lets a caller scan a large folder once for the train and val splits.
    return image_dir if isinstance(image_dir, ImageIndex) else ImageIndex(image_dir)


# ------------------------------------------------------------------------------------------ json files


def _read_json(path: Path, expected: str) -> Any:
    """Parse a JSON file, turning the usual failures into errors that name the file and what it should be."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found (expected {expected})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a file (expected {expected})")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected {expected}"
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason}); expected {expected}") from e


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        return f"a JSON object with keys [{keys}]"
    if isinstance(obj, list):
        return f"a JSON list of {len(obj)} items"
    return f"a JSON {type(obj).__name__}"


def _handle(stats: SkipStats, err: EntryError, strict: bool) -> None:
    if strict:
        raise err
    stats.skip(err.reason, err.entry)


# ------------------------------------------------------------------------------------------- COCO


_COCO_EXPECTED = "a COCO captions file: a JSON object with 'images' and 'annotations' lists"


def load_coco_captions(
    path: str | Path, image_dir: str | Path | ImageIndex, strict: bool = False
) -> tuple[list[CaptionSample], SkipStats]:
    """Read a COCO captions file (e.g. `captions_train2014.json`) into one sample per caption.

    Entries counted in `SkipStats` are annotations. An annotation is skipped when its image is not listed,
    not on disk (looked up by file name, then by id), or its caption is blank; `strict=True` raises instead.
    """
    path = Path(path)
    data = _read_json(path, _COCO_EXPECTED)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        hint = " (this looks like a LLaVA-Instruct file)" if _looks_like_llava(data) else ""
        raise ValueError(f"{path}: expected {_COCO_EXPECTED}, got {_describe(data)}{hint}")
    index = _as_index(image_dir)

    # image id -> file name from the "images" list; the id is the join key the annotations use.
    file_names: dict[int, str] = {}
    for img in data["images"]:
        if isinstance(img, dict) and isinstance(img.get("id"), int) and isinstance(img.get("file_name"), str):
            file_names[img["id"]] = img["file_name"]
    resolved: dict[int, Path | None] = {}  # resolve each image once, not once per caption

    stats = SkipStats()
    samples: list[CaptionSample] = []
    for i, ann in enumerate(data["annotations"]):
        stats.total += 1
        ref = f"#{i}"
        if isinstance(ann, dict) and "id" in ann:
            ref = f"#{i} (annotation id {ann['id']})"
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        caption = ann.get("caption") if isinstance(ann, dict) else None
        if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(caption, str):
            _handle(
                stats,
                EntryError(path, ref, BAD_ANNOTATION, "expected {'image_id': int, 'caption': str, ...}"),
                strict,
            )
            continue
        if image_id not in file_names:
            _handle(
                stats,
                EntryError(path, ref, UNKNOWN_IMAGE_ID, f"image_id {image_id} is not in the 'images' list"),
                strict,
            )
            continue
        # COCO captions carry stray whitespace and newlines; the tokenizer should not see them.
        caption = " ".join(caption.split())
        if not caption:
            _handle(stats, EntryError(path, ref, EMPTY_CAPTION, "caption is blank"), strict)
            continue
        if image_id not in resolved:
            resolved[image_id] = index.resolve(file_names[image_id], image_id)
        image_path = resolved[image_id]
        if image_path is None:
            _handle(
                stats,
                EntryError(
                    path,
                    ref,
                    MISSING_IMAGE,
                    f"image {file_names[image_id]!r} (id {image_id}) not found in {index.image_dir}",
                ),
                strict,
            )
            continue
        samples.append(CaptionSample(image_id=image_id, image_path=image_path, caption=caption))
        stats.kept += 1
    stats.log(f"{path.name}")
    return samples, stats


def group_captions(samples: Iterable[CaptionSample]) -> dict[int, list[str]]:
    """image_id -> its captions, in file order (the reference sets for caption metrics)."""
    out: dict[int, list[str]] = {}
    for s in samples:
        out.setdefault(s.image_id, []).append(s.caption)
    return out


def _looks_like_llava(data: Any) -> bool:
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and "conversations" in data[0]


# ------------------------------------------------------------------------------------------ LLaVA


_LLAVA_EXPECTED = (
    "a LLaVA-Instruct file: a JSON list of {'id', 'image', 'conversations': [{'from', 'value'}, ...]}"
)


def strip_image_token(text: str) -> str:
    """Remove the one "<image>" in `text` and the whitespace joining it to the question.

    "<image>\\nWhat is this?" and "What is this?\\n<image>" both give "What is this?". A token in the
    middle of the text (not seen in LLaVA data, but harmless) leaves a single newline in its place.
    """
    before, _, after = text.partition(IMAGE_TOKEN)
    before, after = before.rstrip(), after.lstrip()
    return f"{before}\n{after}" if before and after else before + after


def _validate_conversation(conv: Any, has_image: bool) -> tuple[str, str] | None:
    """(reason, detail) if the conversation is malformed, else None. See the module docstring."""
    if not isinstance(conv, list):
        return NOT_A_LIST, f"'conversations' must be a list, got {type(conv).__name__}"
    if not conv:
        return EMPTY_CONVERSATION, "'conversations' is empty"
    token_turns: list[int] = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return BAD_TURN, f"turn {t} is not an object with 'from' and 'value'"
        role = turn["from"]
        if role not in _ROLE_MAP:
            return UNKNOWN_ROLE, f"turn {t}: 'from' must be 'human' or 'gpt', got {role!r}"
        if not isinstance(turn["value"], str):
            return NON_STR_VALUE, f"turn {t}: 'value' must be a string, got {type(turn['value']).__name__}"
        expected = "human" if t % 2 == 0 else "gpt"
        if role != expected:
            return ROLES_NOT_ALTERNATING, f"turn {t} is from {role!r}, expected {expected!r}"
        count = turn["value"].count(IMAGE_TOKEN)
        if count > 1:
            return IMAGE_TOKEN_REPEATED, f"turn {t} contains {IMAGE_TOKEN} {count} times"
        if count:
            token_turns.append(t)
        if role == "gpt" and not turn["value"].strip():
            return EMPTY_RESPONSE, f"turn {t}: the assistant's answer is empty"
    if conv[-1]["from"] != "gpt":
        return ROLES_NOT_ALTERNATING, "the conversation must end with a 'gpt' turn"
    if len(token_turns) > 1:
        return IMAGE_TOKEN_REPEATED, f"{IMAGE_TOKEN} appears in turns {token_turns}"
    if token_turns and token_turns[0] != 0:
        return IMAGE_TOKEN_MISPLACED, f"{IMAGE_TOKEN} is in turn {token_turns[0]}, not the first turn"
    if has_image and not token_turns:
        return IMAGE_TOKEN_MISSING, f"the entry has an image but no turn contains {IMAGE_TOKEN}"
    if not has_image and token_turns:
        return IMAGE_TOKEN_WITHOUT_IMAGE, f"turn 0 contains {IMAGE_TOKEN} but the entry has no 'image'"
    return None


def load_llava_instruct(
    path: str | Path, image_dir: str | Path | ImageIndex, strict: bool = False
) -> tuple[list[InstructSample], SkipStats]:
    """Read a LLaVA-Instruct file into conversations with roles "user"/"assistant" and no "<image>" text.

    Entries whose image is not on disk (looked up by file name, then by the id in it) or whose conversation
    is malformed are skipped and counted; `strict=True` raises a ValueError (`EntryError`) instead.
    """
    path = Path(path)
    data = _read_json(path, _LLAVA_EXPECTED)
    if not isinstance(data, list):
        hint = ""
        if isinstance(data, dict) and "annotations" in data:
            hint = " (this looks like a COCO captions file)"
        raise ValueError(f"{path}: expected {_LLAVA_EXPECTED}, got {_describe(data)}{hint}")
    index = _as_index(image_dir)

    stats = SkipStats()
    samples: list[InstructSample] = []
    for i, entry in enumerate(data):
        stats.total += 1
        if not isinstance(entry, dict):
            _handle(stats, EntryError(path, f"#{i}", BAD_ENTRY, "entry is not a JSON object"), strict)
            continue
        entry_id = str(entry["id"]) if "id" in entry else f"#{i}"
        ref = f"#{i} (id {entry_id})" if "id" in entry else entry_id
        image_name = entry.get("image")
        if image_name is not None and (not isinstance(image_name, str) or not image_name):
            _handle(
                stats,
                EntryError(path, ref, BAD_ENTRY, f"'image' must be a file name, got {image_name!r}"),
                strict,
            )
            continue
        has_image = image_name is not None
        problem = _validate_conversation(entry.get("conversations"), has_image)
        if problem is not None:
            _handle(stats, EntryError(path, ref, *problem), strict)
            continue
        image_path: Path | None = None
        image_id: int | None = None
        if has_image:
            image_path = index.resolve(image_name)
            if image_path is None:
                _handle(
                    stats,
                    EntryError(
                        path, ref, MISSING_IMAGE, f"image {image_name!r} not found in {index.image_dir}"
                    ),
                    strict,
                )
                continue
            image_id = parse_image_id(image_name)
            if image_id is None:
                image_id = parse_image_id(image_path.name)
        messages = []
        for t, turn in enumerate(entry["conversations"]):
            text = turn["value"]
            if t == 0 and IMAGE_TOKEN in text:
                text = strip_image_token(text)
            messages.append({"role": _ROLE_MAP[turn["from"]], "content": text})
        samples.append(
            InstructSample(id=entry_id, image_id=image_id, image_path=image_path, messages=messages)
        )
        stats.kept += 1
    stats.log(f"{path.name}")
    return samples, stats
