"""download(): real zip/tar archives served from file:// URLs, verification, safety, offline behaviour."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from cxrkit.data.download import DATASETS, DownloadError, download, extract

FILES = {
    "dataset/labels.csv": b"path,Pneumonia\nimages/a.png,1\n",
    "dataset/images/a.png": b"\x89PNG fake bytes",
}


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def _tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_extracted(folder: Path) -> None:
    assert folder.name == "dataset"  # the archive's single top folder is returned
    for name, data in FILES.items():
        assert (folder.parent / name).read_bytes() == data


@pytest.mark.parametrize(("name", "make"), [("data.zip", _zip), ("data.tar.gz", _tar), ("data.tar", None)])
def test_archive_download_extract_and_verify(tmp_path: Path, name: str, make):
    source = tmp_path / "server" / name
    source.parent.mkdir()
    archive = make(source, FILES) if make else _tar(source, FILES, mode="w")
    dest = tmp_path / "dest"
    folder = download(f"file://{archive}", dest, sha256=_sha256(archive))
    _assert_extracted(folder)
    assert (dest / name).read_bytes() == archive.read_bytes()
    assert folder.parent == dest / "data"
    assert download(f"file://{archive}", dest) == folder  # second call reuses the extraction


def test_plain_file_download_and_bad_sha256(tmp_path: Path):
    source = tmp_path / "labels.csv"
    source.write_bytes(b"a,b\n1,0\n")
    target = download(f"file://{source}", tmp_path / "dest", sha256=_sha256(source).upper())
    assert target == tmp_path / "dest" / "labels.csv" and target.read_bytes() == source.read_bytes()
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(f"file://{source}", tmp_path / "other", sha256="0" * 64)
    assert not (tmp_path / "other" / "labels.csv").exists()


def test_path_traversal_archives_are_rejected(tmp_path: Path):
    outside = tmp_path / "evil.txt"
    zipped = _zip(tmp_path / "bad.zip", {"ok.txt": b"fine", "../evil.txt": b"owned"})
    with pytest.raises(DownloadError, match="outside"):
        download(f"file://{zipped}", tmp_path / "zip")
    tarred = _tar(tmp_path / "bad.tar.gz", {"ok.txt": b"fine", "../../evil.txt": b"owned"})
    with pytest.raises(DownloadError, match="outside"):
        download(f"file://{tarred}", tmp_path / "tar")
    absolute = _tar(tmp_path / "abs.tar", {f"{outside}": b"owned"}, mode="w")
    with pytest.raises(DownloadError, match="outside"):
        extract(absolute, tmp_path / "abs")
    assert not outside.exists()
    assert not (tmp_path / "zip" / "bad").exists() and not (tmp_path / "tar" / "bad").exists()


def test_links_leaving_the_destination_are_rejected(tmp_path: Path):
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        link = tarfile.TarInfo("data/passwd")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(DownloadError, match="unsafe member"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_archives_are_rejected(tmp_path: Path):
    good = _tar(tmp_path / "good.tar.gz", {"a.bin": bytes(range(256)) * 4000})
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DownloadError, match="corrupt"):
        extract(truncated, tmp_path / "t")
    zipped = _zip(tmp_path / "crc.zip", {"a.txt": b"x" * 1000})
    data = bytearray(zipped.read_bytes())
    offset = data.index(b"a.txt") + len(b"a.txt")  # first byte of the stored data after the local header
    data[offset] ^= 0xFF
    zipped.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="corrupt"):
        extract(zipped, tmp_path / "z")
    assert not (tmp_path / "t").exists() and not (tmp_path / "z").exists()


def test_missing_url_and_unknown_name(tmp_path: Path):
    with pytest.raises(DownloadError, match="not found"):
        download(f"file://{tmp_path}/absent.zip", tmp_path / "dest")
    with pytest.raises(DownloadError, match="unknown dataset 'chexpert'"):
        download("chexpert", tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        download("nih", tmp_path, sha256="0" * 64)


def test_kaggle_offline_or_without_credentials_is_a_clear_error(tmp_path: Path, monkeypatch):
    kagglehub = pytest.importorskip("kagglehub")
    requests = pytest.importorskip("requests")

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'www.kaggle.com'")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    with pytest.raises(DownloadError, match="KAGGLE_USERNAME") as raised:
        download("nih", tmp_path)
    assert "nih-chest-xrays/data" in str(raised.value) and "Failed to resolve" in str(raised.value)


def test_kaggle_download_goes_to_dest(tmp_path: Path, monkeypatch):
    kagglehub = pytest.importorskip("kagglehub")
    calls = []

    def fake(handle, path=None, *, force_download=False, output_dir=None):
        calls.append((handle, output_dir, force_download))
        (Path(output_dir) / "sample_labels.csv").write_text("Image Index\n")
        return output_dir

    monkeypatch.setattr(kagglehub, "dataset_download", fake)
    assert download("nih-sample", tmp_path) == tmp_path / "nih-sample"
    assert calls == [("nih-chest-xrays/sample", str(tmp_path / "nih-sample"), False)]


def test_huggingface_offline_is_a_clear_error(tmp_path: Path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the real client, refusing to go online
    with pytest.raises(DownloadError, match="keremberke/chest-xray-classification") as raised:
        download("pneumonia", tmp_path)
    assert "LocalEntryNotFoundError" in str(raised.value)
    assert not (tmp_path / "pneumonia").exists()  # no empty folder left behind
    assert DATASETS["pneumonia"].adapter == "huggingface"
