"""The preprocessing cache: content, geometry, resume, sharded builds, failures and setting changes."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cxrkit.data.cache as cache_module
from cxrkit.data.cache import (
    CacheIncompleteError,
    CacheMismatchError,
    merge_cache,
    open_cache,
    prepare_cache,
)
from cxrkit.data.decode import read_image
from cxrkit.data.manifest import Manifest, from_records
from cxrkit.data.transforms import GEOMETRY_COLUMNS, Geometry
from cxrkit.files import write_atomic

LABELS = ["Atelectasis", "Effusion"]


def make_manifest(paths: list[Path | str]) -> Manifest:
    records = [
        {
            "path": str(path),
            "patient_id": f"test:{i}",
            "split": ("train", "val", "test")[i % 3],
            "source": "test",
            "targets": [float(i % 2), math.nan if i % 3 == 0 else 0.0],
        }
        for i, path in enumerate(paths)
    ]
    return from_records(records, LABELS)


@pytest.fixture
def nih_copies(nih_sample: Path, tmp_path: Path) -> list[Path]:
    """Five real NIH PNGs (one RGBA) copied to a temp dir, so tests can touch them."""
    names = [
        "00000002_000.png",
        "00000211_000.png",
        "00000282_000.png",
        "00001369_000.png",
        "00002578_000.png",
    ]
    folder = tmp_path / "images"
    folder.mkdir()
    return [Path(shutil.copy2(nih_sample / "images" / name, folder / name)) for name in names]


@pytest.fixture
def decode_counter(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths decoded by prepare_cache (in-process builds, workers=1)."""
    decoded: list[str] = []

    def counting_read_image(path, **kwargs):
        decoded.append(str(path))
        return read_image(path, **kwargs)

    monkeypatch.setattr(cache_module, "read_image", counting_read_image)
    return decoded


def build(manifest: Manifest, out_dir: Path, **kwargs) -> cache_module.CacheReport:
    options = {"image_size": 32, "shard_size": 2, "workers": 1, "progress": False, **kwargs}
    return prepare_cache(manifest, out_dir, **options)


def cache_files(out_dir: Path) -> dict[str, bytes]:
    return {
        path.relative_to(out_dir).as_posix(): path.read_bytes()
        for path in sorted(out_dir.rglob("*"))
        if path.is_file() and path.name != "meta.json"
    }


# ---------------------------------------------------------------- content


def test_cache_holds_resized_images_and_manifest(nih_copies: list[Path], tmp_path: Path) -> None:
    manifest = make_manifest(nih_copies)
    report = build(manifest, tmp_path / "cache", image_size=64)
    assert report.n_images == 5 and report.n_failed == 0 and report.merged
    assert report.shards_built == [0, 1, 2] and report.shards_skipped == []

    cache = open_cache(tmp_path / "cache")
    assert len(cache) == 5 and cache.labels == LABELS and cache.image_size == 64
    frame = cache.manifest.frame
    assert list(frame["path"]) == [str(p) for p in nih_copies]
    assert set(GEOMETRY_COLUMNS) <= set(frame.columns)
    assert list(frame["shard"]) == [0, 0, 1, 1, 2] and list(frame["offset"]) == [0, 1, 0, 1, 0]
    np.testing.assert_array_equal(cache.targets, manifest.targets)  # NaN (unknown) preserved
    for i, path in enumerate(nih_copies):
        expected = Geometry.fit(1024, 1024, 64, "letterbox").apply(read_image(path))
        np.testing.assert_array_equal(cache.image(i), expected)
    np.testing.assert_array_equal(
        cache.images([4, 0, 2]), np.stack([cache.image(4), cache.image(0), cache.image(2)])
    )
    assert isinstance(cache.shards[0], np.memmap) and cache.shards[0].dtype == np.uint8

    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["image_size"] == 64 and meta["resize_policy"] == "letterbox" and meta["n_images"] == 5
    assert meta["cxrkit_version"] and meta["created"] and len(meta["source_manifest_sha256"]) == 64
    assert [shard["rows"] for shard in meta["shards"]] == [2, 2, 1]
    assert all(len(shard["input_hash"]) == 64 for shard in meta["shards"])


def test_cache_pickles_without_its_memmaps(nih_copies: list[Path], tmp_path: Path) -> None:
    import pickle

    build(make_manifest(nih_copies[:2]), tmp_path / "cache")
    cache = open_cache(tmp_path / "cache")
    size_unopened = len(pickle.dumps(cache))
    cache.image(0)  # opens the memmaps
    assert len(pickle.dumps(cache)) == size_unopened  # no pixel data travels to loader workers
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.image(1), cache.image(1))


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("policy", ["letterbox", "crop", "stretch"])
@pytest.mark.parametrize("shape", [(1024, 1024), (300, 200), (200, 300), (37, 500)])
def test_geometry_box_round_trip(policy: str, shape: tuple[int, int]) -> None:
    geometry = Geometry.fit(*shape, 256, policy)
    box = (shape[1] * 0.3, shape[0] * 0.4, shape[1] * 0.25, shape[0] * 0.1)
    back = geometry.to_original_box(*geometry.to_cache_box(*box))
    np.testing.assert_allclose(back, box, rtol=0, atol=1e-9)
    x, y = geometry.to_cache_point(0, 0)
    assert (x, y) == (geometry.shift_x, geometry.shift_y)


def test_geometry_of_each_policy() -> None:
    letterbox = Geometry.fit(300, 200, 64, "letterbox")
    assert (letterbox.resized_height, letterbox.resized_width) == (64, 43)
    assert (letterbox.shift_x, letterbox.shift_y) == (10, 0)
    crop = Geometry.fit(300, 200, 64, "crop")
    assert (crop.resized_height, crop.resized_width) == (96, 64)
    assert (crop.shift_x, crop.shift_y) == (0, -16)
    stretch = Geometry.fit(300, 200, 64, "stretch")
    assert (stretch.scale_x, stretch.scale_y) == (64 / 200, 64 / 300)
    with pytest.raises(ValueError, match="resize_policy"):
        Geometry.fit(300, 200, 64, "squash")


@pytest.mark.parametrize("policy", ["letterbox", "crop", "stretch"])
def test_geometry_maps_a_drawn_box_onto_its_pixels(policy: str) -> None:
    image = np.zeros((300, 200), dtype=np.uint8)
    box = (40, 100, 120, 80)  # x, y, w, h in original pixels
    image[box[1] : box[1] + box[3], box[0] : box[0] + box[2]] = 255
    geometry = Geometry.fit(*image.shape, 64, policy)
    cached = geometry.apply(image)
    x, y, w, h = geometry.to_cache_box(*box)
    inner = cached[math.ceil(y) + 1 : math.floor(y + h) - 1, math.ceil(x) + 1 : math.floor(x + w) - 1]
    assert inner.size > 0 and inner.min() == 255
    outside = cached.copy()
    outside[math.floor(y) - 1 : math.ceil(y + h) + 1, math.floor(x) - 1 : math.ceil(x + w) + 1] = 0
    assert outside.max() == 0


def test_nih_bounding_box_maps_through_the_cache(nih_sample: Path, tmp_path: Path) -> None:
    boxes = pd.read_csv(nih_sample / "BBox_List_2017_subset.csv")
    first = boxes.iloc[0]
    x, y, w, h = (float(v) for v in first.iloc[2:6])
    build(make_manifest([nih_sample / "images" / first["Image Index"]]), tmp_path / "cache", image_size=256)
    geometry = open_cache(tmp_path / "cache").geometry(0)
    assert geometry.to_cache_box(x, y, w, h) == pytest.approx((x / 4, y / 4, w / 4, h / 4))
    assert geometry.to_original_box(*geometry.to_cache_box(x, y, w, h)) == pytest.approx((x, y, w, h))


def test_cache_of_a_non_square_image_records_its_geometry(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((50, 100), 200, dtype=np.uint8)).save(path)
    build(make_manifest([path]), tmp_path / "cache", image_size=40)
    cache = open_cache(tmp_path / "cache")
    row = cache.manifest.frame.iloc[0]
    assert (row["orig_height"], row["orig_width"], row["shift_x"], row["shift_y"]) == (50, 100, 0, 10)
    assert row["scale_x"] == row["scale_y"] == 0.4
    assert cache.image(0)[:10].max() == 0 and cache.image(0)[10:30].min() == 200  # zero padding top


# ---------------------------------------------------------------- resume


def test_rerun_does_no_finished_work(
    nih_copies: list[Path], tmp_path: Path, decode_counter: list[str]
) -> None:
    manifest = make_manifest(nih_copies)
    build(manifest, tmp_path / "cache")
    assert len(decode_counter) == 5
    shard_mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "shards").iterdir()}

    report = build(manifest, tmp_path / "cache")
    assert len(decode_counter) == 5  # nothing decoded again
    assert report.shards_built == [] and report.shards_skipped == [0, 1, 2] and report.n_images == 5
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "shards").iterdir()} == shard_mtimes


def test_changed_source_file_rebuilds_only_its_shard(
    nih_copies: list[Path], tmp_path: Path, decode_counter: list[str]
) -> None:
    manifest = make_manifest(nih_copies)
    build(manifest, tmp_path / "cache")
    decode_counter.clear()
    stat = nih_copies[2].stat()
    os.utime(nih_copies[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # shard 1 holds rows 2 and 3

    report = build(manifest, tmp_path / "cache")
    assert report.shards_built == [1] and report.shards_skipped == [0, 2]
    assert decode_counter == [str(nih_copies[2]), str(nih_copies[3])]


def test_interrupted_build_resumes_where_it_stopped(
    nih_copies: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = make_manifest(nih_copies)
    decoded: list[str] = []

    def dies_on_the_fourth_image(path, **kwargs):
        if len(decoded) == 3:
            raise KeyboardInterrupt
        decoded.append(str(path))
        return read_image(path, **kwargs)

    monkeypatch.setattr(cache_module, "read_image", dies_on_the_fourth_image)
    with pytest.raises(KeyboardInterrupt):
        build(manifest, tmp_path / "cache")
    shards = tmp_path / "cache" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["shard_00000.json", "shard_00000.npy"]
    with pytest.raises(CacheIncompleteError, match=r"no meta\.json"):
        open_cache(tmp_path / "cache")

    def counting_read_image(path, **kwargs):
        decoded.append(str(path))
        return read_image(path, **kwargs)

    monkeypatch.setattr(cache_module, "read_image", counting_read_image)
    report = build(manifest, tmp_path / "cache")
    assert report.shards_skipped == [0] and report.shards_built == [1, 2]
    assert decoded[3:] == [str(p) for p in nih_copies[2:]]  # the first two were not decoded again
    assert len(open_cache(tmp_path / "cache")) == 5


# ---------------------------------------------------------------- sharded builds


def test_sharded_build_and_merge_equal_a_full_build(nih_copies: list[Path], tmp_path: Path) -> None:
    manifest = make_manifest(nih_copies)
    build(manifest, tmp_path / "full")

    first = build(manifest, tmp_path / "sharded", shard=(0, 2))
    assert first.shards_built == [0, 2] and not first.merged
    with pytest.raises(CacheIncompleteError, match=r"missing 1 of 3 shards \(indices 1\)"):
        merge_cache(tmp_path / "sharded")
    second = build(manifest, tmp_path / "sharded", shard=(1, 2))
    assert second.shards_built == [1]
    merge_cache(tmp_path / "sharded")

    full, sharded = cache_files(tmp_path / "full"), cache_files(tmp_path / "sharded")
    assert full.keys() == sharded.keys() and "manifest.csv" in full and "failures.csv" in full
    assert full == sharded  # byte for byte
    full_meta = json.loads((tmp_path / "full" / "meta.json").read_text())
    sharded_meta = json.loads((tmp_path / "sharded" / "meta.json").read_text())
    full_meta.pop("created"), sharded_meta.pop("created")
    assert full_meta == sharded_meta


def test_invalid_shard_argument(nih_copies: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shard must be"):
        build(make_manifest(nih_copies[:1]), tmp_path / "cache", shard=(2, 2))


# ---------------------------------------------------------------- failures and settings


def test_bad_files_are_skipped_and_reported(nih_copies: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    corrupt = bad / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    truncated = bad / "truncated.png"
    truncated.write_bytes(nih_copies[0].read_bytes()[:20000])
    empty = bad / "empty.png"
    empty.touch()
    text = bad / "text.png"
    text.write_text("not an image")
    paths = [nih_copies[0], corrupt, truncated, nih_copies[1], empty, text]

    report = build(make_manifest(paths), tmp_path / "cache", workers=2, shard_size=3)  # a real process pool
    assert report.n_images == 2 and report.merged
    assert sorted(f.path for f in report.failures) == sorted(
        str(p) for p in (corrupt, truncated, empty, text)
    )
    reasons = {Path(f.path).name: f.reason for f in report.failures}
    assert "empty file" in reasons["empty.png"] and "not a recognised image format" in reasons["text.png"]
    assert "truncated" in reasons["truncated.png"]

    failures = pd.read_csv(tmp_path / "cache" / "failures.csv")
    assert list(failures.columns) == ["row", "path", "reason"]
    assert sorted(failures["row"]) == [1, 2, 4, 5] and failures["reason"].str.len().min() > 0
    cache = open_cache(tmp_path / "cache")
    assert list(cache.manifest.frame["path"]) == [str(nih_copies[0]), str(nih_copies[1])]
    assert cache.meta["n_failed"] == 4


def test_changed_image_size_or_policy_is_refused(nih_copies: list[Path], tmp_path: Path) -> None:
    manifest = make_manifest(nih_copies[:2])
    build(manifest, tmp_path / "cache", image_size=32)
    before = cache_files(tmp_path / "cache")
    with pytest.raises(CacheMismatchError, match=r"image_size=32.*image_size=48"):
        build(manifest, tmp_path / "cache", image_size=48)
    with pytest.raises(CacheMismatchError, match="resize_policy='crop'"):
        build(manifest, tmp_path / "cache", image_size=32, resize_policy="crop")
    assert cache_files(tmp_path / "cache") == before  # nothing mixed in


def test_empty_manifest_and_bad_policy_are_refused(nih_copies: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty manifest"):
        build(make_manifest([]), tmp_path / "cache")
    with pytest.raises(ValueError, match="resize_policy"):
        build(make_manifest(nih_copies[:1]), tmp_path / "cache", resize_policy="fit")


# ---------------------------------------------------------------- sharing a cache between processes


def test_rerun_of_a_complete_cache_writes_nothing(nih_copies: list[Path], tmp_path: Path) -> None:
    manifest = make_manifest(nih_copies)
    build(manifest, tmp_path / "cache")
    before = file_states(tmp_path / "cache")

    report = build(manifest, tmp_path / "cache")
    assert report.merged and report.shards_built == []
    merge_cache(tmp_path / "cache")
    assert file_states(tmp_path / "cache") == before  # same bytes, same files (inodes): nothing rewritten


def test_changed_cache_is_merged_again_atomically(nih_copies: list[Path], tmp_path: Path) -> None:
    manifest = make_manifest(nih_copies)
    build(manifest, tmp_path / "cache")
    stat = nih_copies[4].stat()
    os.utime(nih_copies[4], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    old_meta = json.loads((tmp_path / "cache" / "meta.json").read_text())

    report = build(manifest, tmp_path / "cache")
    assert report.shards_built == [2]
    new_meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert new_meta["shards"][2]["input_hash"] != old_meta["shards"][2]["input_hash"]
    assert not [path for path in (tmp_path / "cache").rglob("*") if ".tmp-" in path.name]
    assert len(open_cache(tmp_path / "cache")) == 5


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    target.write_bytes(b"old")

    def fails_half_way(file) -> None:
        file.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, fails_half_way)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_cache_opened_while_it_is_rebuilt_raises_a_clear_error(
    nih_copies: list[Path], tmp_path: Path
) -> None:
    build(make_manifest(nih_copies), tmp_path / "cache")
    cache = open_cache(tmp_path / "cache")
    rebuilt = tmp_path / "cache" / "shards" / "shard_00001.npy"
    np.save(rebuilt, np.zeros((1, 32, 32), dtype=np.uint8))  # a shard that now holds one image, not two
    with pytest.raises(CacheIncompleteError, match="rebuilt since the cache was opened"):
        cache.image(0)


READER = """
import sys
from pathlib import Path
import numpy as np
from cxrkit.data.cache import open_cache
cache_dir, expected, stop = Path(sys.argv[1]), np.load(sys.argv[2]), Path(sys.argv[3])
rng = np.random.default_rng(int(sys.argv[4]))
reads = 0
while not stop.exists() or reads < 20:
    cache = open_cache(cache_dir)  # reopened each time: meta.json, manifest.csv and shards read again
    rows = rng.choice(len(expected), size=4)
    assert len(cache) == len(expected) and (cache.images(rows) == expected[rows]).all()
    reads += 1
print(reads)
"""

PREPARE = """
import sys
from cxrkit.data.cache import prepare_cache
from cxrkit.data.manifest import Manifest
manifest = Manifest.load(sys.argv[1])
print("preparing", flush=True)
prepare_cache(manifest, sys.argv[2], image_size=32, shard_size=2, workers=2, progress=False)
"""


def test_readers_see_the_same_cache_while_others_prepare_it(nih_copies: list[Path], tmp_path: Path) -> None:
    """Two processes read batches while a third runs prepare on the same cache and a fourth is killed
    (SIGKILL) in the middle of its prepare: no reader fails, and every file is byte for byte the same."""
    manifest = make_manifest(nih_copies * 6)  # 30 rows, 15 shards
    manifest_path = tmp_path / "manifest.csv"
    manifest.save(manifest_path)
    cache_dir = tmp_path / "cache"
    build(manifest, cache_dir)
    expected = open_cache(cache_dir).images(np.arange(len(manifest)))
    np.save(tmp_path / "expected.npy", expected)
    before = file_states(cache_dir)
    stop = tmp_path / "stop"

    def python(script: str, *args: object) -> subprocess.Popen:
        command = [sys.executable, "-c", script, *map(str, args)]
        return subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0
        )

    readers = [python(READER, cache_dir, tmp_path / "expected.npy", stop, seed) for seed in (1, 2)]
    killed = python(PREPARE, manifest_path, cache_dir)
    assert killed.stdout.readline().strip() == "preparing", killed.communicate()
    time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)  # the command and its pool workers, as a node failure would
    killed.wait(timeout=30)
    third = python(PREPARE, manifest_path, cache_dir)
    _, third_err = third.communicate(timeout=300)
    assert third.returncode == 0, third_err
    stop.touch()
    for reader in readers:
        out, err = reader.communicate(timeout=300)
        assert reader.returncode == 0 and int(out) >= 20, err
    assert file_states(cache_dir) == before


def file_states(out_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Each file's bytes and inode (a file replaced by the same bytes still counts as rewritten)."""
    return {
        path.relative_to(out_dir).as_posix(): (path.read_bytes(), path.stat().st_ino)
        for path in sorted(out_dir.rglob("*"))
        if path.is_file()
    }
