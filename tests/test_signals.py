"""Ctrl-C and SIGTERM stop the commands cleanly: real signals sent to real `cxr` processes.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group (the command and its pool workers);
`kill PID`, schedulers and container runtimes send SIGTERM to the command. Either must stop the command
within seconds, print one line (no traceback), leave no temporary or half-written file, and a later run
must resume from the work that was finished.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bundles import tiny_bundle
from cxrkit.data.cache import open_cache, prepare_cache
from cxrkit.data.manifest import Manifest

#: Longest a command may take to stop after the signal (generous: CI machines are shared).
STOP_SECONDS = 20
N_IMAGES = 480


@pytest.fixture(scope="module")
def jpeg_root(pneumonia_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-folder dataset of N_IMAGES symlinks to the real pediatric JPEGs (fast to decode)."""
    root = tmp_path_factory.mktemp("signals") / "xrays"
    for label in ("NORMAL", "PNEUMONIA"):
        folder = root / label
        folder.mkdir(parents=True)
        for image in sorted((pneumonia_root / "train" / label).glob("*.jpeg"))[: N_IMAGES // 2]:
            (folder / image.name).symlink_to(image)
    return root


class Command:
    """`cxr ARGS` running in its own process group with SIGINT's default action, as a terminal starts it;
    its output is collected by reader threads so the test can wait for a line and still see it all."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from cxrkit.cli.main import main; main()", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            process_group=0,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream, chunks), daemon=True)
            for stream, chunks in ((self.process.stdout, self.out), (self.process.stderr, self.err))
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, chunks: list[str]) -> None:
        for chunk in iter(lambda: stream.read(64), ""):
            chunks.append(chunk)

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                pytest.fail(f"command ended before {what}: {''.join(self.err)[-2000:]}")
            if time.monotonic() > deadline:
                os.killpg(self.process.pid, signal.SIGKILL)
                pytest.fail(f"no {what} within {timeout} s")
            time.sleep(0.02)

    def stop(self, signum: int, whole_group: bool) -> tuple[int, str, float]:
        """Send ``signum``; return the exit code, stderr and the seconds the command took to end."""
        sent = time.monotonic()
        (os.killpg if whole_group else os.kill)(self.process.pid, signum)
        try:
            code = self.process.wait(timeout=STOP_SECONDS * 3)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            pytest.fail(f"still running {STOP_SECONDS * 3} s after {signal.Signals(signum).name}")
        seconds = time.monotonic() - sent
        for reader in self.readers:
            reader.join(timeout=10)
        return code, "".join(self.err), seconds

    def group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True


def prepare_args(root: Path, cache_dir: Path) -> list[str]:
    return [
        "data",
        "prepare",
        f"data.sources=[{{adapter: folder, root: {root}}}]",
        f"data.cache.dir={cache_dir}",
        f"output_dir={cache_dir.parent / 'out'}",
        "data.cache.image_size=32",
        "data.augment.crop_size=32",
        "data.cache.shard_size=4",
        "data.cache.workers=2",
    ]


@pytest.mark.parametrize(
    ("signum", "whole_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c-to-the-process-group", "sigterm-to-the-command"],
)
def test_prepare_stops_cleanly_and_resumes(
    jpeg_root: Path, tmp_path: Path, signum: int, whole_group: bool
) -> None:
    cache_dir = tmp_path / "cache"
    command = Command(*prepare_args(jpeg_root, cache_dir))
    first_shards = cache_dir / "shards" / "shard_00001.json"
    command.wait_until(first_shards.exists, "finished shard")
    code, err, seconds = command.stop(signum, whole_group)

    assert code != 0 and seconds < STOP_SECONDS
    assert "interrupted; rerun to resume" in err and "Traceback" not in err, err[-3000:]
    deadline = time.monotonic() + 5  # the fork server leaves once it sees this process gone
    while command.group_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not command.group_alive()  # no orphaned pool worker or fork server
    files = [path for path in cache_dir.rglob("*") if path.is_file()]
    assert not [path for path in files if ".tmp-" in path.name]
    assert not (cache_dir / "meta.json").exists()
    arrays = sorted(path.stem for path in (cache_dir / "shards").glob("*.npy"))
    records = sorted(path.stem for path in (cache_dir / "shards").glob("*.json"))
    assert arrays == records and len(records) < N_IMAGES // 4  # interrupted part way, only whole shards
    for stem in records:
        assert np.load(cache_dir / "shards" / f"{stem}.npy").shape[1:] == (32, 32)

    source = Manifest.load(cache_dir / "source_manifest.csv")  # what the interrupted command was caching
    resumed = prepare_cache(source, cache_dir, image_size=32, shard_size=4, workers=1, progress=False)
    assert resumed.shards_skipped == [int(stem.removeprefix("shard_")) for stem in records]
    assert resumed.n_images == N_IMAGES and len(open_cache(cache_dir)) == N_IMAGES


def test_predict_stops_on_ctrl_c_and_writes_nothing(jpeg_root: Path, tmp_path: Path) -> None:
    bundle = tiny_bundle(onnx=False).save(tmp_path / "tiny.cxr")
    out = tmp_path / "predictions.csv"
    command = Command("predict", str(bundle), str(jpeg_root), "-o", str(out), "--backend", "torch")
    command.wait_until(lambda: "predict:" in "".join(command.err), "progress bar")
    time.sleep(1.0)  # inside the batch loop
    code, err, seconds = command.stop(signal.SIGINT, whole_group=True)
    assert code != 0 and seconds < STOP_SECONDS
    assert "Traceback" not in err, err[-3000:]
    assert not out.exists()
