"""Fetch datasets: the named public chest X-ray datasets, or any file or archive behind an fsspec URL.

Named datasets:

============ ================================================ ============================================
name         where                                            read with
============ ================================================ ============================================
nih          Kaggle ``nih-chest-xrays/data`` (112,120 PNGs,   adapter ``nih`` (root: the returned folder)
             about 45 GB)
nih-sample   Kaggle ``nih-chest-xrays/sample`` (5,606 PNGs)   adapter ``nih``
pneumonia    Hugging Face ``keremberke/chest-xray-classification``  adapter ``huggingface``
             (Kermany pediatric pneumonia, parquet export)
============ ================================================ ============================================

Kaggle needs credentials for some datasets (``KAGGLE_USERNAME``/``KAGGLE_KEY`` or ``~/.kaggle/kaggle.json``);
the Hugging Face hub reads ``HF_TOKEN`` when set. URLs (``gs://``, ``s3://``, ``https://``, ``file://``, ...)
are copied into ``dest`` with a progress bar, checked against an optional sha256, and zip/tar archives are
tested and extracted safely (no absolute paths, ``..`` or links leaving the destination).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import fsspec
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that failed, with what to do about it."""


@dataclass(frozen=True)
class NamedDataset:
    hub: str  # "kaggle" or "huggingface"
    handle: str
    adapter: str
    revision: str | None = None
    allow_patterns: tuple[str, ...] = field(default_factory=tuple)
    subfolder: str = ""


DATASETS: dict[str, NamedDataset] = {
    "nih": NamedDataset("kaggle", "nih-chest-xrays/data", "nih"),
    "nih-sample": NamedDataset("kaggle", "nih-chest-xrays/sample", "nih"),
    "pneumonia": NamedDataset(
        "huggingface",
        "keremberke/chest-xray-classification",
        "huggingface",
        revision="refs/convert/parquet",
        allow_patterns=("full/*",),
        subfolder="full",
    ),
}


def download(name_or_url: str, dest: Path, *, sha256: str | None = None, force: bool = False) -> Path:
    """Fetch a named dataset (see :data:`DATASETS`) or a URL into ``dest``; return the folder or file to use.

    Archives are extracted into ``dest/<archive name without suffix>``; when that folder holds a single
    folder, that one is returned. ``sha256`` checks a URL download; ``force`` downloads again.
    """
    dest = Path(dest)
    if name_or_url in DATASETS:
        if sha256:
            raise ValueError("sha256 checks URL downloads; named datasets are verified by their hub")
        return _download_named(name_or_url, DATASETS[name_or_url], dest, force)
    if "://" in name_or_url:
        return _download_url(name_or_url, dest, sha256, force)
    raise DownloadError(
        f"unknown dataset {name_or_url!r}: use one of {', '.join(DATASETS)} or a URL (gs://, s3://, https://, file://)"
    )


def _download_named(name: str, dataset: NamedDataset, dest: Path, force: bool) -> Path:
    target = dest / name
    target.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (%s %s) into %s", name, dataset.hub, dataset.handle, target)
    try:
        if dataset.hub == "kaggle":
            path = Path(_kaggle(dataset.handle, target, force))
        else:
            path = Path(_huggingface(dataset, target, force)) / dataset.subfolder
    except DownloadError:
        if not any(target.iterdir()):
            target.rmdir()
        raise
    log.info("%s is in %s; read it with adapter %r (root: %s)", name, path, dataset.adapter, path)
    return path


def _kaggle(handle: str, target: Path, force: bool) -> str:
    try:
        import kagglehub

        return kagglehub.dataset_download(handle, output_dir=str(target), force_download=force)
    except Exception as error:  # kagglehub raises many types: network, HTTP, credentials
        raise DownloadError(
            f"could not download Kaggle dataset {handle} ({type(error).__name__}: {error}). "
            "Check the network connection and Kaggle credentials (KAGGLE_USERNAME and KAGGLE_KEY, or "
            "~/.kaggle/kaggle.json from https://www.kaggle.com/settings), or download "
            f"https://www.kaggle.com/datasets/{handle} by hand and point the adapter's root at the folder."
        ) from error


def _huggingface(dataset: NamedDataset, target: Path, force: bool) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            dataset.handle,
            repo_type="dataset",
            revision=dataset.revision,
            allow_patterns=list(dataset.allow_patterns) or None,
            local_dir=str(target),
            force_download=force,
        )
    except Exception as error:  # the hub client raises many types: network, HTTP, offline mode
        raise DownloadError(
            f"could not download Hugging Face dataset {dataset.handle} ({type(error).__name__}: {error}). "
            "Check the network connection (and HF_TOKEN for gated datasets; unset HF_HUB_OFFLINE), or fetch "
            f"https://huggingface.co/datasets/{dataset.handle} elsewhere and point the huggingface adapter "
            "at it."
        ) from error


def _download_url(url: str, dest: Path, sha256: str | None, force: bool) -> Path:
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise DownloadError(f"cannot open {url}: {error} (install the fsspec backend it names)") from error
    if fs.isdir(path):
        raise DownloadError(f"{url} is a folder: adapters read folders in place, use it as the source root")
    name = posixpath.basename(path.rstrip("/")) or "download"
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / name
    if force or not target.exists() or (sha256 and _sha256(target) != sha256.lower()):
        _copy(fs, path, url, target)
    else:
        log.info("%s already downloaded", target)
    if sha256:
        digest = _sha256(target)
        if digest != sha256.lower():
            target.unlink()
            raise DownloadError(
                f"sha256 mismatch for {url}: expected {sha256.lower()}, got {digest}; file removed"
            )
        log.info("sha256 verified for %s", target.name)
    if target.name.lower().endswith(ARCHIVE_SUFFIXES):
        return extract(target, dest / _archive_stem(target.name), force=force)
    return target


def _copy(fs: fsspec.AbstractFileSystem, path: str, url: str, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    try:
        size = fs.size(path)
        with (
            fs.open(path, "rb") as source,
            partial.open("wb") as sink,
            tqdm(total=size, unit="B", unit_scale=True, desc=f"download {target.name}") as progress,
        ):
            while chunk := source.read(CHUNK):
                sink.write(chunk)
                progress.update(len(chunk))
    except FileNotFoundError as error:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"not found: {url}") from error
    except Exception as error:  # network and backend errors differ per filesystem
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"could not download {url} ({type(error).__name__}: {error}); check the network connection and "
            "credentials for that storage (e.g. gcloud auth application-default login, AWS_PROFILE)"
        ) from error
    partial.replace(target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _archive_stem(name: str) -> str:
    lower = name.lower()
    suffix = next(s for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True) if lower.endswith(s))
    return name[: -len(suffix)]


def extract(archive: Path, folder: Path, *, force: bool = False) -> Path:
    """Test and safely extract a zip or tar ``archive`` into ``folder``; return it (or its single subfolder).

    Raises DownloadError for a corrupt archive or a member that would land outside ``folder`` (absolute
    path, ``..``, link or device file); nothing is left behind in that case.
    """
    marker = folder / ".cxrkit-extracted"
    if marker.exists() and not force:
        log.info("%s already extracted in %s", archive.name, folder)
        return _single_subfolder(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, partial)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, partial)
        else:
            raise DownloadError(
                f"{archive} is not a valid zip or tar archive (corrupt or truncated download?)"
            )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    marker.touch()
    log.info("extracted %s into %s", archive.name, folder)
    return _single_subfolder(folder)


def _extract_zip(archive: Path, folder: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                _check_member_name(info.filename, archive)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise DownloadError(f"{archive}: refusing link member {info.filename!r}")
            bad = zipped.testzip()
            if bad is not None:
                raise DownloadError(f"{archive} is corrupt: CRC check failed for {bad!r}")
            zipped.extractall(folder)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        raise DownloadError(f"{archive} is corrupt: {error}") from error


def _extract_tar(archive: Path, folder: Path) -> None:
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member_name(member.name, archive)
                try:
                    tarfile.data_filter(member, str(folder))
                except tarfile.FilterError as error:
                    raise DownloadError(
                        f"{archive}: refusing unsafe member {member.name!r} ({error})"
                    ) from error
            tar.extractall(folder, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DownloadError(f"{archive} is corrupt: {error}") from error


def _check_member_name(name: str, archive: Path) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and parts[0].endswith(":")):
        raise DownloadError(f"{archive}: refusing member {name!r} that would extract outside the destination")


def _single_subfolder(folder: Path) -> Path:
    entries = [p for p in folder.iterdir() if p.name != ".cxrkit-extracted"]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder
