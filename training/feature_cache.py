"""An on-disk cache of the frozen vision tower's patch features, computed once per image.

CLIP stays frozen in both training stages, so encoding every image again each epoch is wasted work (it is
most of the forward cost in stage 1). The cache stores one (num_tokens, dim) float16 row per image:

    <dir>/features.f16   raw float16 rows, read through numpy.memmap (row r at offset r * num_tokens * dim * 2)
    <dir>/index.json     {"rows": {"<image_id>": row, ...}}: which rows are complete
    <dir>/meta.json      {"format_version", "num_tokens", "dim", "dtype", "source"}

`source` is a string the caller derives from whatever determines the features (e.g. a hash of the vision
config, checkpoint and preprocessing). Opening a cache with a different source, shape or dtype raises
`FeatureCacheMismatchError`, so features from another encoder are never silently mixed in.

Crash safety: a batch's rows are written and flushed to the memmap *before* the index that names them is
atomically replaced, so the index never points at rows that were not written. Rows written but not yet
indexed when a build is interrupted are simply reassigned and overwritten by the next build; building
again skips exactly the images the index lists. One writer at a time; any number of readers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

FORMAT_VERSION = 1
DTYPE = "float16"
_FEATURES = "features.f16"
_INDEX = "index.json"
_META = "meta.json"


class FeatureCacheMismatchError(ValueError):
    """The cache on disk was built for another encoder, shape or dtype than the one asked for."""


def _atomic_write_json(path: Path, obj: Any) -> None:
    # Write to a sibling temp file and rename over the target: a crash leaves either the old or the new
    # file, never a truncated one.
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FeatureCache:
    """Image id -> float16 (num_tokens, dim) features, stored in `path_dir` (created if needed)."""

    def __init__(self, path_dir: str | Path, num_tokens: int, dim: int, source: str = "") -> None:
        if num_tokens <= 0 or dim <= 0:
            raise ValueError(f"num_tokens and dim must be positive, got {num_tokens} and {dim}")
        self.path_dir = Path(path_dir)
        self.num_tokens = int(num_tokens)
        self.dim = int(dim)
        self.source = str(source)
        self._row_bytes = self.num_tokens * self.dim * np.dtype(DTYPE).itemsize
        self._features_path = self.path_dir / _FEATURES
        self._index_path = self.path_dir / _INDEX
        self._meta_path = self.path_dir / _META
        self._mm: np.memmap | None = None
        self._capacity = 0  # rows the features file can hold (its size / row size)

        self.path_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "num_tokens": self.num_tokens,
            "dim": self.dim,
            "dtype": DTYPE,
            "source": self.source,
        }
        if self._meta_path.exists():
            self._check_meta(meta)
        elif self._index_path.exists() or self._features_path.exists():
            raise FeatureCacheMismatchError(
                f"feature cache {self.path_dir}: has data files but no {_META}, so what built it is unknown; "
                "delete the folder to rebuild it"
            )
        else:
            _atomic_write_json(self._meta_path, meta)

        self._rows: dict[int, int] = {}
        if self._index_path.exists():
            with self._index_path.open("r", encoding="utf-8") as f:
                self._rows = {int(k): int(v) for k, v in json.load(f)["rows"].items()}
        if not self._features_path.exists():
            self._features_path.touch()
        self._open_memmap()
        if self._rows and max(self._rows.values()) >= self._capacity:
            raise ValueError(
                f"feature cache {self.path_dir}: {_INDEX} lists row {max(self._rows.values())} but "
                f"{_FEATURES} holds only {self._capacity} rows (truncated?); delete the folder to rebuild it"
            )

    # ------------------------------------------------------------------------------------ internals

    def _check_meta(self, expected: dict[str, Any]) -> None:
        try:
            with self._meta_path.open("r", encoding="utf-8") as f:
                found = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise FeatureCacheMismatchError(f"feature cache {self.path_dir}: unreadable {_META}: {e}") from e
        diffs = [
            f"{key}: cache has {found.get(key)!r}, asked for {want!r}"
            for key, want in expected.items()
            if found.get(key) != want
        ]
        if diffs:
            raise FeatureCacheMismatchError(
                f"feature cache {self.path_dir} was built for a different encoder or layout ("
                + "; ".join(diffs)
                + "); delete the folder or use another cache path"
            )

    def _open_memmap(self) -> None:
        size = self._features_path.stat().st_size
        self._capacity = size // self._row_bytes
        # numpy cannot map an empty file; an empty cache simply has no memmap yet.
        self._mm = (
            np.memmap(
                self._features_path,
                dtype=DTYPE,
                mode="r+",
                shape=(self._capacity, self.num_tokens, self.dim),
            )
            if self._capacity
            else None
        )

    def _reserve(self, rows: int) -> None:
        """Make the features file hold at least `rows` rows (grows by doubling, zero-filled and sparse)."""
        if rows <= self._capacity:
            return
        new_capacity = max(rows, 2 * self._capacity)
        if self._mm is not None:
            self._mm.flush()
            self._mm = None  # release the old mapping before resizing the file under it
        with self._features_path.open("r+b") as f:
            f.truncate(new_capacity * self._row_bytes)
        self._open_memmap()

    def _save_index(self) -> None:
        _atomic_write_json(self._index_path, {"rows": {str(k): v for k, v in self._rows.items()}})

    # ------------------------------------------------------------------------------------ public API

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, image_id: object) -> bool:
        try:
            return int(image_id) in self._rows  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    def ids(self) -> list[int]:
        """The cached image ids, in row order."""
        return sorted(self._rows, key=self._rows.__getitem__)

    def get(self, image_id: int) -> np.ndarray:
        """A float16 (num_tokens, dim) copy of the image's features (a copy, so it outlives the cache)."""
        row = self._rows.get(int(image_id))
        if row is None or self._mm is None:
            raise KeyError(f"image id {image_id} is not in feature cache {self.path_dir}")
        return np.array(self._mm[row])

    def get_many(self, image_ids: Sequence[int]) -> np.ndarray:
        """float16 (len(image_ids), num_tokens, dim)."""
        out = np.empty((len(image_ids), self.num_tokens, self.dim), dtype=DTYPE)
        for i, image_id in enumerate(image_ids):
            out[i] = self.get(image_id)
        return out

    def add_batch(self, image_ids: Sequence[int], features: Any) -> None:
        """Store features (B, num_tokens, dim) for `image_ids`, then commit the index.

        Ids already cached are overwritten in place. `features` may be a numpy array or a torch tensor.
        """
        feats = self._to_numpy(features, len(image_ids))
        ids = [int(i) for i in image_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("add_batch: image_ids contains duplicates")
        next_row = len(self._rows)
        rows: list[int] = []
        for image_id in ids:
            if image_id in self._rows:
                rows.append(self._rows[image_id])
            else:
                rows.append(next_row)
                next_row += 1
        self._reserve(next_row)
        assert self._mm is not None
        for r, f in zip(rows, feats):
            self._mm[r] = f
        self._mm.flush()  # data first ...
        self._rows.update(zip(ids, rows))
        self._save_index()  # ... then the index that makes it visible

    def _to_numpy(self, features: Any, batch: int) -> np.ndarray:
        if hasattr(features, "detach"):  # a torch tensor, possibly on GPU or in bf16
            features = features.detach().float().cpu().numpy()
        arr = np.asarray(features)
        want = (batch, self.num_tokens, self.dim)
        if arr.shape != want:
            raise ValueError(
                f"feature cache {self.path_dir}: encode_fn returned shape {arr.shape}, expected {want}"
            )
        with np.errstate(over="ignore"):  # overflow is reported just below, with context
            arr = arr.astype(DTYPE)
        if not np.isfinite(arr).all():
            # CLIP features are O(1..100); inf/nan here means a broken encoder or an fp16 overflow, and a
            # cached bad row would poison every later epoch.
            raise ValueError(
                f"feature cache {self.path_dir}: features contain inf/nan (after casting to {DTYPE})"
            )
        return arr

    def build(
        self,
        image_ids_and_paths: Iterable[tuple[int, str | Path]],
        encode_fn: Callable[[list[Any]], Any],
        load_fn: Callable[[Path], Any],
        batch_size: int = 32,
        progress: bool = True,
    ) -> int:
        """Encode and store every image not cached yet; returns how many were encoded now.

        `load_fn(path)` loads one image (e.g. PIL open + preprocessing); `encode_fn(list_of_loaded)` returns
        (B, num_tokens, dim). The index is committed after every batch, so after an interruption, building
        again encodes only the images that are still missing. Duplicate ids in the input are encoded once.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        todo: list[tuple[int, Path]] = []
        seen: set[int] = set()
        for image_id, p in image_ids_and_paths:
            image_id = int(image_id)
            if image_id in self._rows or image_id in seen:
                continue
            seen.add(image_id)
            todo.append((image_id, Path(p)))
        # The final size is known up front: one resize instead of repeated doubling.
        self._reserve(len(self._rows) + len(todo))
        with tqdm(total=len(todo), desc="caching image features", unit="img", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                images = [load_fn(p) for _, p in chunk]
                self.add_batch([i for i, _ in chunk], encode_fn(images))
                bar.update(len(chunk))
        return len(todo)
