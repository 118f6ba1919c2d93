"""Dataset readers, image lookup, sample data and the feature cache (mmgpt.training.data / feature_cache)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from mmgpt.training import data
from mmgpt.training.data import (
    EntryError,
    ImageIndex,
    load_coco_captions,
    load_llava_instruct,
    parse_image_id,
    strip_image_token,
)
from mmgpt.training.feature_cache import FeatureCache, FeatureCacheMismatchError
from mmgpt.training.sample_data import write_sample_datasets

N_IMAGES = 12


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sample_datasets(tmp_path_factory.mktemp("sample"), n_images=N_IMAGES, seed=0)


def _json(path: Path):
    return json.loads(path.read_text())


def _missing_ids(coco: dict, image_dir: Path) -> set[int]:
    """Ids listed in a COCO file whose file is on disk under neither naming."""
    on_disk = {parse_image_id(p.name) for p in image_dir.iterdir()}
    return {img["id"] for img in coco["images"]} - on_disk


# ------------------------------------------------------------------------------------------ sample data


def test_sample_data_is_in_the_real_formats(sample):
    coco = _json(sample["captions_train"])
    assert set(coco) >= {"info", "licenses", "images", "annotations"}
    for img in coco["images"]:
        assert img["file_name"] == f"COCO_train2014_{img['id']:012d}.jpg"
        assert {"height", "width", "coco_url"} <= set(img)
    for ann in coco["annotations"]:
        assert set(ann) == {"image_id", "id", "caption"}
    per_image: dict[int, int] = {}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    assert min(per_image.values()) >= 2
    assert len({ann["id"] for ann in coco["annotations"]}) == len(coco["annotations"])

    llava = _json(sample["instruct_train"])
    assert isinstance(llava, list)
    for entry in llava:
        assert set(entry) == {"id", "image", "conversations"}
        assert entry["image"] == f"{entry['id']}.jpg" and len(entry["id"]) == 12
        assert [t["from"] for t in entry["conversations"]][:2] == ["human", "gpt"]
    firsts = [e["conversations"][0]["value"] for e in llava]
    assert any(v.startswith("<image>\n") for v in firsts)
    assert any(v.endswith("\n<image>") for v in firsts)
    assert any(len(e["conversations"]) >= 4 for e in llava)

    # Mixed naming on disk, one listed image absent, a held-out split with its own images.
    names = [p.name for p in sample["images"].iterdir()]
    assert any(n.startswith("COCO_train2014_") for n in names)
    assert any(n[0].isdigit() for n in names)
    assert len(_missing_ids(coco, sample["images"])) == 1
    val = _json(sample["captions_val"])
    assert all(img["file_name"].startswith("COCO_val2014_") for img in val["images"])
    assert not {i["id"] for i in val["images"]} & {i["id"] for i in coco["images"]}
    assert _missing_ids(val, sample["images"]) == set()
    assert isinstance(_json(sample["instruct_val"]), list)


def test_sample_data_is_deterministic(tmp_path):
    a = write_sample_datasets(tmp_path / "a", n_images=4, seed=3)
    b = write_sample_datasets(tmp_path / "b", n_images=4, seed=3)
    assert a["captions_train"].read_text() == b["captions_train"].read_text()
    assert a["instruct_train"].read_text() == b["instruct_train"].read_text()


def test_sample_data_options(tmp_path):
    p = write_sample_datasets(tmp_path, n_images=4, missing_image=False, mixed_naming=False)
    assert all(n.name.startswith("COCO_") for n in p["images"].iterdir())
    samples, stats = load_coco_captions(p["captions_train"], p["images"])
    assert stats.skipped == 0 and stats.kept == stats.total == len(samples)


def test_sample_data_main(tmp_path, capsys):
    from mmgpt.training import sample_data

    sample_data.main([str(tmp_path / "out"), "--n-images", "3"])
    printed = capsys.readouterr().out
    assert str(tmp_path / "out" / "captions_train2014.json") in printed
    assert (tmp_path / "out" / "llava_instruct_val.json").is_file()


# ------------------------------------------------------------------------------------------ image index


def test_parse_image_id():
    assert parse_image_id("COCO_train2014_000000033471.jpg") == 33471
    assert parse_image_id("COCO_val2014_000000000042.jpg") == 42
    assert parse_image_id("000000033471.jpg") == 33471
    assert parse_image_id("coco/train2017/000000033471.jpg") == 33471
    assert parse_image_id("cat.jpg") is None


def test_image_index_resolves_across_namings(tmp_path):
    (tmp_path / "COCO_train2014_000000000001.jpg").write_bytes(b"x")
    (tmp_path / "000000000002.png").write_bytes(b"x")
    (tmp_path / "notes_000000000003.txt").write_bytes(b"x")  # not an image: ignored
    (tmp_path / "val2014").mkdir()
    (tmp_path / "val2014" / "COCO_val2014_000000000004.jpg").write_bytes(b"x")
    index = ImageIndex(tmp_path)
    assert index.resolve("000000000001.jpg") == tmp_path / "COCO_train2014_000000000001.jpg"
    assert index.resolve("COCO_train2014_000000000002.jpg") == tmp_path / "000000000002.png"
    assert index.resolve("000000000003.jpg") is None
    assert index.resolve("000000000004.jpg") == tmp_path / "val2014" / "COCO_val2014_000000000004.jpg"
    assert index.resolve(image_id=2) == tmp_path / "000000000002.png"
    assert index.resolve("000000000005.jpg") is None
    assert len(index) == 3


def test_image_index_prefers_exact_file_name(tmp_path):
    # Two files with the same id: a lookup by an exact name must return that file, not the id's first hit.
    (tmp_path / "000000000007.jpg").write_bytes(b"x")
    (tmp_path / "COCO_train2014_000000000007.jpg").write_bytes(b"x")
    index = ImageIndex(tmp_path)
    assert index.resolve("COCO_train2014_000000000007.jpg") == tmp_path / "COCO_train2014_000000000007.jpg"
    assert index.resolve("000000000007.jpg") == tmp_path / "000000000007.jpg"
    assert index.duplicate_ids == 1


def test_image_index_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ImageIndex(tmp_path / "does_not_exist")


# ------------------------------------------------------------------------------------------ COCO


def test_coco_captions(sample):
    coco = _json(sample["captions_train"])
    (missing_id,) = _missing_ids(coco, sample["images"])
    n_missing = sum(a["image_id"] == missing_id for a in coco["annotations"])
    samples, stats = load_coco_captions(sample["captions_train"], sample["images"])

    assert stats.total == len(coco["annotations"])
    assert stats.kept == len(samples) == len(coco["annotations"]) - n_missing
    assert dict(stats.by_reason) == {data.MISSING_IMAGE: n_missing}
    assert missing_id not in {s.image_id for s in samples}
    # Every caption of every present image, in order, with whitespace normalised.
    expected = [" ".join(a["caption"].split()) for a in coco["annotations"] if a["image_id"] != missing_id]
    assert [s.caption for s in samples] == expected
    for s in samples:
        assert s.image_path.is_file() and parse_image_id(s.image_path.name) == s.image_id
    # Both on-disk namings were resolved from the 2014 names in the file.
    names = {s.image_path.name for s in samples}
    assert any(n.startswith("COCO_train2014_") for n in names)
    assert any(n[0].isdigit() for n in names)
    assert len({s.image_id for s in samples}) == N_IMAGES


def test_coco_captions_strict_raises_on_missing_image(sample):
    with pytest.raises(ValueError, match=r"annotation id \d+.*missing_image") as exc:
        load_coco_captions(sample["captions_train"], sample["images"], strict=True)
    assert str(sample["captions_train"]) in str(exc.value)
    assert isinstance(exc.value, EntryError) and exc.value.reason == data.MISSING_IMAGE


def test_coco_val_split_and_shared_index(sample):
    index = ImageIndex(sample["images"])
    samples, stats = load_coco_captions(sample["captions_val"], index)
    assert stats.skipped == 0 and samples
    assert all(s.image_path.is_file() for s in samples)
    refs = data.group_captions(samples)
    assert len(refs) == len(_json(sample["captions_val"])["images"])
    assert all(len(v) >= 2 for v in refs.values())


def test_coco_bad_annotations_each_counted(tmp_path):
    (tmp_path / "COCO_train2014_000000000001.jpg").write_bytes(b"x")
    coco = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg"},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg"},
        ],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "  A red\n circle. "},
            {"image_id": 1, "id": 11, "caption": "   "},
            {"image_id": 9, "id": 12, "caption": "unknown image"},
            {"image_id": 2, "id": 13, "caption": "file not on disk"},
            {"image_id": "1", "id": 14, "caption": "id is a string"},
            "not an object",
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    samples, stats = load_coco_captions(path, tmp_path)
    assert [s.caption for s in samples] == ["A red circle."]
    assert dict(stats.by_reason) == {
        data.EMPTY_CAPTION: 1,
        data.UNKNOWN_IMAGE_ID: 1,
        data.MISSING_IMAGE: 1,
        data.BAD_ANNOTATION: 2,
    }
    assert stats.total == 6 and stats.kept == 1


# ------------------------------------------------------------------------------------------ LLaVA


def test_llava_instruct(sample):
    raw = _json(sample["instruct_train"])
    by_id = {e["id"]: e for e in raw}
    samples, stats = load_llava_instruct(sample["instruct_train"], sample["images"])

    assert stats.total == len(raw)
    assert stats.kept == len(samples) == len(raw) - 1
    assert dict(stats.by_reason) == {data.MISSING_IMAGE: 1}
    placements = set()
    for s in samples:
        entry = by_id[s.id]
        conv = entry["conversations"]
        assert s.has_image and s.image_path.is_file()
        assert s.image_id == int(entry["id"]) == parse_image_id(s.image_path.name)
        assert [m["role"] for m in s.messages] == ["user", "assistant"] * (len(conv) // 2)
        assert all("<image>" not in m["content"] for m in s.messages)
        first = conv[0]["value"]
        placements.add("before" if first.startswith("<image>") else "after")
        # The token and its newline are gone, the question is intact.
        assert s.messages[0]["content"] == first.replace("<image>\n", "").replace("\n<image>", "")
        assert not s.messages[0]["content"].startswith("\n") and not s.messages[0]["content"].endswith("\n")
        assert [m["content"] for m in s.messages[1:]] == [t["value"] for t in conv[1:]]
    assert placements == {"before", "after"}
    # Mixed naming: the 2017-style names in the file found both kinds of files.
    names = {s.image_path.name for s in samples}
    assert any(n.startswith("COCO_train2014_") for n in names) and any(n[0].isdigit() for n in names)


def test_llava_strict_raises_naming_entry(sample):
    raw = _json(sample["instruct_train"])
    index = ImageIndex(sample["images"])
    (missing,) = [e["id"] for e in raw if index.resolve(e["image"]) is None]
    with pytest.raises(ValueError, match=rf"id {missing}\).*missing_image"):
        load_llava_instruct(sample["instruct_train"], index, strict=True)


def test_skip_summary_logged_once(sample, caplog):
    with caplog.at_level(logging.INFO, logger="mmgpt.training.data"):
        load_llava_instruct(sample["instruct_train"], sample["images"])
    records = [r for r in caplog.records if r.name == "mmgpt.training.data"]
    assert len(records) == 1
    msg = records[0].getMessage()
    assert records[0].levelno == logging.WARNING
    assert f"kept {N_IMAGES} of {N_IMAGES + 1}" in msg and "missing_image=1" in msg


def test_strip_image_token():
    assert strip_image_token("<image>\nWhat is this?") == "What is this?"
    assert strip_image_token("What is this?\n<image>") == "What is this?"
    assert strip_image_token("<image>") == ""
    assert strip_image_token("Look: <image> what is it?") == "Look:\nwhat is it?"


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    (d / "COCO_train2014_000000000001.jpg").write_bytes(b"x")
    return d


def _h(v):
    return {"from": "human", "value": v}


def _g(v):
    return {"from": "gpt", "value": v}


GOOD = [_h("<image>\nWhat is it?"), _g("A circle.")]

MALFORMED = [
    ("not_a_list", {"conversations": {"from": "human"}}, data.NOT_A_LIST),
    ("missing_conversations", {}, data.NOT_A_LIST),
    ("empty", {"conversations": []}, data.EMPTY_CONVERSATION),
    ("turn_not_object", {"conversations": ["<image>\nhi", _g("a")]}, data.BAD_TURN),
    ("turn_without_value", {"conversations": [{"from": "human"}, _g("a")]}, data.BAD_TURN),
    ("unknown_role", {"conversations": [{"from": "system", "value": "<image>"}, _g("a")]}, data.UNKNOWN_ROLE),
    ("starts_with_gpt", {"conversations": [_g("<image>\nhi"), _h("q")]}, data.ROLES_NOT_ALTERNATING),
    ("two_humans", {"conversations": [_h("<image>\nq"), _h("q2"), _g("a")]}, data.ROLES_NOT_ALTERNATING),
    ("ends_with_human", {"conversations": [*GOOD, _h("more?")]}, data.ROLES_NOT_ALTERNATING),
    ("non_str_value", {"conversations": [_h("<image>\nq"), _g(["a"])]}, data.NON_STR_VALUE),
    ("empty_answer", {"conversations": [_h("<image>\nq"), _g("  ")]}, data.EMPTY_RESPONSE),
    (
        "token_twice_in_turn",
        {"conversations": [_h("<image>\nq\n<image>"), _g("a")]},
        data.IMAGE_TOKEN_REPEATED,
    ),
    ("token_in_two_turns", {"conversations": [*GOOD, _h("<image>\nq"), _g("a")]}, data.IMAGE_TOKEN_REPEATED),
    (
        "token_in_later_turn",
        {"conversations": [_h("q"), _g("a"), _h("<image>\nq"), _g("a")]},
        data.IMAGE_TOKEN_MISPLACED,
    ),
    ("token_in_answer", {"conversations": [_h("q"), _g("<image> a")]}, data.IMAGE_TOKEN_MISPLACED),
    ("image_without_token", {"conversations": [_h("What is it?"), _g("a")]}, data.IMAGE_TOKEN_MISSING),
    ("bad_image_field", {"image": 5, "conversations": GOOD}, data.BAD_ENTRY),
]


@pytest.mark.parametrize("name,entry,reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_conversation_counted(tmp_path, image_dir, name, entry, reason):
    bad = {"id": f"bad-{name}", "image": "000000000001.jpg", **entry}
    entries = [{"id": "good", "image": "000000000001.jpg", "conversations": GOOD}, bad]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(entries))

    samples, stats = load_llava_instruct(path, image_dir)
    assert [s.id for s in samples] == ["good"]
    assert dict(stats.by_reason) == {reason: 1}
    assert stats.examples[reason] == [f"#1 (id bad-{name})"]

    with pytest.raises(ValueError, match=rf"entry #1 \(id bad-{name}\): {reason}"):
        load_llava_instruct(path, image_dir, strict=True)


def test_text_only_entries_are_valid(tmp_path, image_dir):
    entries = [
        {"id": "t1", "conversations": [_h("Tell me a joke."), _g("No.")]},
        {"id": "t2", "image": None, "conversations": [_h("Hi"), _g("Hello"), _h("Bye"), _g("Bye")]},
        {"id": "t3", "conversations": [_h("<image>\nWhat is this?"), _g("a")]},  # token but no image
        "not an object",
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(entries))
    samples, stats = load_llava_instruct(path, image_dir)
    assert [s.id for s in samples] == ["t1", "t2"]
    assert all(not s.has_image and s.image_path is None and s.image_id is None for s in samples)
    assert samples[1].messages[2] == {"role": "user", "content": "Bye"}
    assert dict(stats.by_reason) == {data.IMAGE_TOKEN_WITHOUT_IMAGE: 1, data.BAD_ENTRY: 1}


def test_llava_image_as_relative_path(tmp_path, image_dir):
    # Some LLaVA mixtures prefix a folder ("coco/train2017/..."); the id still finds the file.
    entries = [{"id": 1, "image": "coco/train2017/000000000001.jpg", "conversations": GOOD}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(entries))
    (s,), stats = load_llava_instruct(path, image_dir)
    assert s.id == "1" and s.image_id == 1 and s.image_path == image_dir / "COCO_train2014_000000000001.jpg"


# ------------------------------------------------------------------------------------------ bad files


@pytest.mark.parametrize("loader", [load_coco_captions, load_llava_instruct])
def test_missing_file(tmp_path, loader):
    with pytest.raises(FileNotFoundError, match=r"nope\.json: file not found \(expected a (COCO|LLaVA)"):
        loader(tmp_path / "nope.json", tmp_path)


@pytest.mark.parametrize("loader", [load_coco_captions, load_llava_instruct])
def test_invalid_json(tmp_path, loader):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON .*line 1"):
        loader(path, tmp_path)


def test_wrong_top_level_shape(tmp_path, sample):
    with pytest.raises(
        ValueError, match=r"llava_instruct\.json: expected a COCO captions file.*got a JSON list"
    ):
        load_coco_captions(sample["instruct_train"], sample["images"])
    with pytest.raises(ValueError, match=r"captions_train2014\.json: expected a LLaVA-Instruct file.*COCO"):
        load_llava_instruct(sample["captions_train"], sample["images"])
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"expected a COCO captions file.*keys \['images'\]"):
        load_coco_captions(path, sample["images"])


# ------------------------------------------------------------------------------------------ feature cache

T, D = 5, 8


def _features_for(image_id: int) -> np.ndarray:
    """Deterministic per-image features, so a value mix-up between rows is detectable."""
    return np.random.default_rng(image_id).standard_normal((T, D)).astype(np.float32)


def _items(ids):
    return [(i, Path(f"/nowhere/{i:012d}.jpg")) for i in ids]


def _load(path: Path) -> int:
    return parse_image_id(path.name)  # the "image" is its id: features derive from it


class RecordingEncoder:
    def __init__(self, fail_after_batches: int | None = None):
        self.seen: list[int] = []
        self.batches = 0
        self.fail_after_batches = fail_after_batches

    def __call__(self, images: list[int]) -> np.ndarray:
        if self.fail_after_batches is not None and self.batches >= self.fail_after_batches:
            raise RuntimeError("simulated crash")
        self.batches += 1
        self.seen.extend(images)
        return np.stack([_features_for(i) for i in images])


def test_feature_cache_build_and_get(tmp_path):
    cache = FeatureCache(tmp_path / "fc", T, D, source="clip-a")
    ids = [5, 17, 3, 42, 8, 17]  # duplicate 17 encoded once
    enc = RecordingEncoder()
    assert cache.build(_items(ids), enc, _load, batch_size=2, progress=False) == 5
    assert enc.seen == [5, 17, 3, 42, 8]
    assert len(cache) == 5 and 42 in cache and 6 not in cache and "x" not in cache
    for i in set(ids):
        got = cache.get(i)
        assert got.dtype == np.float16 and got.shape == (T, D)
        np.testing.assert_array_equal(got, _features_for(i).astype(np.float16))
    assert cache.get_many([3, 5]).shape == (2, T, D)
    with pytest.raises(KeyError, match="99"):
        cache.get(99)

    # Reopening (a new process) sees the same rows; building again encodes nothing.
    again = FeatureCache(tmp_path / "fc", T, D, source="clip-a")
    enc2 = RecordingEncoder()
    assert again.build(_items(ids), enc2, _load, batch_size=2, progress=False) == 0
    assert enc2.seen == [] and len(again) == 5
    np.testing.assert_array_equal(again.get(42), _features_for(42).astype(np.float16))


def test_feature_cache_resumes_after_interruption(tmp_path):
    ids = list(range(100, 111))  # 11 images, batches of 3
    crashing = RecordingEncoder(fail_after_batches=2)
    cache = FeatureCache(tmp_path / "fc", T, D, source="clip-a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.build(_items(ids), crashing, _load, batch_size=3, progress=False)
    assert crashing.seen == ids[:6]

    resumed = FeatureCache(tmp_path / "fc", T, D, source="clip-a")  # as after a restart
    assert len(resumed) == 6 and all(i in resumed for i in ids[:6])
    enc = RecordingEncoder()
    assert resumed.build(_items(ids), enc, _load, batch_size=3, progress=False) == 5
    assert enc.seen == ids[6:]
    for i in ids:
        np.testing.assert_array_equal(resumed.get(i), _features_for(i).astype(np.float16))


def test_feature_cache_grows(tmp_path):
    cache = FeatureCache(tmp_path / "fc", T, D)
    cache.build(_items([1, 2]), RecordingEncoder(), _load, batch_size=4, progress=False)
    size = (tmp_path / "fc" / "features.f16").stat().st_size
    cache.build(_items(range(1, 30)), RecordingEncoder(), _load, batch_size=4, progress=False)
    assert (tmp_path / "fc" / "features.f16").stat().st_size > size
    assert len(cache) == 29
    for i in (1, 2, 17, 29):
        np.testing.assert_array_equal(cache.get(i), _features_for(i).astype(np.float16))
    # add_batch grows past what build reserved, and overwrites an existing id in place.
    cache.add_batch([100, 1], np.stack([_features_for(100), _features_for(999)]))
    np.testing.assert_array_equal(cache.get(100), _features_for(100).astype(np.float16))
    np.testing.assert_array_equal(cache.get(1), _features_for(999).astype(np.float16))
    assert len(cache) == 30


def test_feature_cache_refuses_other_source_or_shape(tmp_path):
    FeatureCache(tmp_path / "fc", T, D, source="clip-vit-l-336:abc").build(
        _items([1]), RecordingEncoder(), _load, progress=False
    )
    with pytest.raises(
        FeatureCacheMismatchError, match=r"source: cache has 'clip-vit-l-336:abc', asked for 'other'"
    ):
        FeatureCache(tmp_path / "fc", T, D, source="other")
    with pytest.raises(ValueError, match=r"num_tokens: cache has 5, asked for 6"):
        FeatureCache(tmp_path / "fc", T + 1, D, source="clip-vit-l-336:abc")
    with pytest.raises(ValueError, match=r"dim: cache has 8, asked for 4"):
        FeatureCache(tmp_path / "fc", T, 4, source="clip-vit-l-336:abc")
    # The refused opens did not touch the cache.
    assert len(FeatureCache(tmp_path / "fc", T, D, source="clip-vit-l-336:abc")) == 1


def test_feature_cache_rejects_bad_encoder_output(tmp_path):
    cache = FeatureCache(tmp_path / "fc", T, D)
    with pytest.raises(ValueError, match=r"shape \(2, 5, 7\), expected \(2, 5, 8\)"):
        cache.build(_items([1, 2]), lambda imgs: np.zeros((len(imgs), T, D - 1)), _load, progress=False)
    with pytest.raises(ValueError, match="inf/nan"):
        cache.build(_items([1]), lambda imgs: np.full((len(imgs), T, D), 1e6), _load, progress=False)
    assert len(cache) == 0


def test_feature_cache_accepts_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    cache = FeatureCache(tmp_path / "fc", T, D)
    cache.build(
        _items([4]),
        lambda imgs: torch.from_numpy(np.stack([_features_for(i) for i in imgs])).to(torch.bfloat16),
        _load,
        progress=False,
    )
    expected = torch.from_numpy(_features_for(4)).to(torch.bfloat16).float().numpy().astype(np.float16)
    np.testing.assert_array_equal(cache.get(4), expected)
