"""``cxr data prepare --shard I/N``: parts counted from 1, a part with nothing to build says so, and
``--merge`` with parts missing fails in one line naming them."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cxrkit.cli.main import cli


def prepare(args: list[str], *extra: str):
    return CliRunner().invoke(cli, ["data", "prepare", *args, *extra])


@pytest.mark.shared_data
def test_shards_count_from_one_and_merge_names_missing_ones(tiny_data_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = [
        f"data.sources=[{{adapter: folder, root: {tiny_data_root / 'pneumonia' / 'train'}}}]",
        "data.no_finding=zeros",
        "data.split.method=random",
        f"data.cache.dir={cache}",
        "data.cache.image_size=32",
        "data.augment.crop_size=28",
        "data.cache.shard_size=16",  # 48 images: shards 0, 1, 2
        "data.cache.workers=1",
    ]
    first = prepare(args, "--shard", "1/3")
    assert first.exit_code == 0, first.output
    assert "1 shards built" in first.output
    shards = cache / "shards"
    assert (shards / "shard_00000.npy").exists() and not (shards / "shard_00001.npy").exists()

    idle = prepare(args, "--shard", "4/4")
    assert idle.exit_code == 0, idle.output
    assert "shard 4/4: nothing to build" in idle.output

    merge = prepare(args, "--merge")
    assert merge.exit_code == 1
    errors = [line for line in merge.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("Error: ") and "missing" in errors[0], merge.output
    assert "1, 2" in errors[0] or "1-2" in errors[0]
    assert "Traceback" not in merge.output

    for part in ("2/3", "3/3"):
        assert prepare(args, "--shard", part).exit_code == 0
    merged = prepare(args, "--merge")
    assert merged.exit_code == 0, merged.output
    assert (cache / "meta.json").exists()
