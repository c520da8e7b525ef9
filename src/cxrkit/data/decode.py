"""Decode a chest X-ray file of any common format to one array convention.

Output convention of :func:`read_image`: a new, writable, C-contiguous 2-D ``uint8`` array ``(H, W)``,
where higher values are brighter *as displayed on a film*: dense tissue and bone are bright, air is dark.
DICOM MONOCHROME1 images (where the lowest stored value is displayed white) are inverted to meet it.

How each input reaches 8 bits:

* 8-bit grayscale PNG / JPEG / any format PIL reads: unchanged.
* colour (RGB, RGBA, LA, P, CMYK, ...): ITU-R 601-2 luma (PIL's ``L`` conversion); alpha is dropped.
* 16-bit / 32-bit integer or float images (``I;16``, ``I``, ``F``): linear from the image's own
  minimum..maximum to 0..255 (a constant image becomes all 0).
* DICOM: stored values → modality LUT (Rescale Slope/Intercept or Modality LUT Sequence) → VOI transform:
  the first VOI LUT Sequence item when present (output normalised by the LUT's declared bit depth), else
  the first Window Center/Width (VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID, DICOM PS3.3
  C.11.2.1.2), else the image's own min..max → MONOCHROME1 inverted. Colour DICOMs (RGB, YBR_*, PALETTE
  COLOR) become luma. Compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg, Pillow).
* multi-frame files: the first frame.

Decompression bombs are refused from the header, before any pixel is decoded: an image whose declared
pixel count (PIL size; DICOM Rows x Columns x NumberOfFrames) exceeds ``max_pixels``. Every failure raises
:class:`ImageDecodeError` naming the file.

Memory: intensity mapping never makes a whole-image float64 copy. 8/16-bit unsigned images go through a
lookup table, everything else is mapped in blocks of rows with the same elementwise float64 arithmetic, so
the output is byte-identical to a whole-image computation. :func:`probe_image` reads only the header and
estimates the bytes a decode needs (for admission control before decoding); :class:`Plausibility` refuses
images too small or too elongated to be a chest radiograph.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec
import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi

#: Largest image read by default: 16384 x 16384 pixels, well above any radiograph (CR/DR are ~3k x 3k).
DEFAULT_MAX_PIXELS = 16384 * 16384

DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom", ".dic"})
#: File suffixes of the images cxrkit looks for in folders (all of them decode with :func:`read_image`).
IMAGE_SUFFIXES: frozenset[str] = DICOM_SUFFIXES | {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_LUMA = np.array([0.299, 0.587, 0.114])
_BLOCK_PIXELS = 1 << 20  #: pixels per block of rows: float64 temporaries stay near 8 MB
#: bytes per pixel of PIL's in-memory image by mode (multi-band modes are stored 4 bytes per pixel)
_PIL_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


class ImageDecodeError(ValueError):
    """A file that cannot be read as an image; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class ImplausibleImageError(ImageDecodeError):
    """An image whose shape rules out a chest radiograph (see :class:`Plausibility`)."""


@dataclass(frozen=True)
class Plausibility:
    """Shape limits of a chest radiograph: each side at least ``min_side`` pixels, the longer side at most
    ``max_aspect`` times the shorter. ``Plausibility(0, float("inf"))`` accepts everything."""

    min_side: int = 64
    max_aspect: float = 4.0

    def check(self, width: int, height: int, path: str | os.PathLike) -> None:
        """Raise :class:`ImplausibleImageError` naming ``path`` when ``width x height`` is out of bounds."""
        if min(width, height) < self.min_side:
            raise ImplausibleImageError(
                path,
                f"{width} x {height} pixels is too small for a chest radiograph "
                f"(each side must be at least {self.min_side} px)",
            )
        if max(width, height) > self.max_aspect * min(width, height):
            raise ImplausibleImageError(
                path,
                f"{width} x {height} pixels has an aspect ratio over {self.max_aspect:g}:1, "
                "implausible for a chest radiograph",
            )


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares, read without decoding pixels (see :func:`probe_image`)."""

    format: str  #: PNG, JPEG, DICOM or another PIL format name
    width: int
    height: int
    frames: int
    bytes_per_pixel: int  #: of the decoded samples, all channels
    encoded_bytes: int

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames

    @property
    def decode_bytes(self) -> int:
        """Estimated peak memory of :func:`read_image` on this file: the encoded bytes, the decoded
        samples twice (decoder buffer and array) and two bytes per pixel for the uint8 output and the
        preprocessing that follows; frames after the first are never decoded."""
        return self.encoded_bytes + self.width * self.height * (2 * self.bytes_per_pixel + 2)


#: What :func:`read_image` reads: a path or fsspec URL, the file's bytes, or a binary file object.
ImageInput = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


def read_image(
    source: ImageInput, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read a PNG, JPEG, DICOM (or other PIL format) image as a uint8 ``(H, W)`` array.

    ``source`` is a path, an fsspec URL, the encoded bytes or a binary file object (an upload); ``name``
    names in-memory input in errors (default ``<bytes>``/the file object's name). A ``.dcm``/``.dicom``
    name also lets a DICOM file without the ``DICM`` preamble marker be read. See the module docstring for
    the output convention. Raises :class:`ImageDecodeError` for an empty, truncated, unreadable or
    oversized (``max_pixels``) input.
    """
    label, data = _load(source, name)
    if _is_dicom(data, label):
        return _decode_dicom(data, label, max_pixels, force=data[128:132] != b"DICM")
    return _decode_pil(data, label, max_pixels)


def probe_image(source: ImageInput, *, name: str | None = None) -> ImageHeader:
    """The header of a PNG, JPEG, DICOM (or other PIL format) image, without decoding any pixel.

    Same inputs and errors as :func:`read_image` for files whose header is unreadable.
    """
    label, data = _load(source, name)
    if _is_dicom(data, label):
        return _probe_dicom(data, label, force=data[128:132] != b"DICM")
    with _open_pil(data, label) as image:  # only the first frame is ever decoded
        bytes_per_pixel = _PIL_BYTES_PER_PIXEL.get(image.mode, 4)
        return ImageHeader(
            image.format or "unknown", image.width, image.height, 1, bytes_per_pixel, len(data)
        )


def _load(source: ImageInput, name: str | None) -> tuple[str, bytes]:
    label = name if name is not None else _source_name(source)
    data = _source_bytes(source, label)
    if not data:
        raise ImageDecodeError(label, "empty file (0 bytes)")
    return label, data


def _is_dicom(data: bytes, label: str) -> bool:
    return data[128:132] == b"DICM" or Path(label).suffix.lower() in DICOM_SUFFIXES


def array_to_gray(array: np.ndarray) -> np.ndarray:
    """An in-memory image as uint8 ``(H, W)``, as :func:`read_image` treats files: 2-D uint8 as is, other
    2-D dtypes min-max scaled, colour ``(H, W, 3|4)`` uint8 to luma (PIL ``L``, alpha dropped)."""
    if array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8:
        return np.asarray(Image.fromarray(np.ascontiguousarray(array[..., :3])).convert("L"))
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"expected an (H, W) or (H, W, 3|4) image array, got shape {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError("image array holds NaN or infinite values")
    return _minmax_to_uint8(array)


def _source_name(source: ImageInput) -> str:
    if isinstance(source, bytes | bytearray | memoryview):
        return "<bytes>"
    if isinstance(source, str | os.PathLike):
        return str(source)
    return str(getattr(source, "name", None) or "<stream>")


def _source_bytes(source: ImageInput, label: str) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        return _read_bytes(source)
    try:
        return source.read()
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(label, f"cannot read stream: {exc}") from exc


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        if "://" in str(path):
            with fsspec.open(str(path), "rb") as stream:
                return stream.read()
        return Path(path).read_bytes()
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(path, f"cannot open file: {exc}") from exc


# ---------------------------------------------------------------- PIL formats (PNG, JPEG, TIFF, ...)


def _open_pil(data: bytes, path: str | os.PathLike) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, f"decompression bomb refused by PIL: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(
            path, "not a recognised image format (PNG, JPEG, DICOM or another PIL format)"
        ) from exc


def _decode_pil(data: bytes, path: str | os.PathLike, max_pixels: int) -> np.ndarray:
    with _open_pil(data, path) as image:
        _check_pixel_count(path, image.width, image.height, 1, max_pixels)
        _check_encodable(data, path, image.format, image.width, image.height)
        try:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageDecodeError(path, f"corrupt or truncated {image.format} data: {exc}") from exc
        if image.mode in _HIGH_DEPTH_MODES:
            values = np.asarray(image)
            image.close()  # frees PIL's copy of the samples before mapping them
            return _minmax_to_uint8(values)
        return _pil_to_gray(image)


def _pil_to_gray(image: Image.Image) -> np.ndarray:
    if image.mode == "L":
        return np.array(image)
    try:
        return np.array(image.convert("L"))
    except ValueError:  # modes PIL cannot take straight to L (La, LAB, ...)
        return np.array(image.convert("RGB").convert("L"))


def _check_encodable(data: bytes, path: str | os.PathLike, kind: str | None, width: int, height: int) -> None:
    """Refuse a PNG or Huffman-coded JPEG whose file is too short to hold the pixels its header declares
    (a forged or cut header; decoders would pad it out at great cost): deflate compresses at most
    1032:1, and Huffman JPEG spends at least 2 bits on each 8x8 block."""
    if kind == "PNG" and len(data) >= 29:
        depth, colour = data[24], data[25]
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
        least = height * (1 + math.ceil(width * depth * channels / 8)) / 1032
    elif kind == "JPEG" and _jpeg_frame_type(data) in (0xC0, 0xC1):
        least = math.ceil(width / 8) * math.ceil(height / 8) / 4
    else:
        return
    if len(data) + 1024 < least:
        raise ImageDecodeError(
            path,
            f"header declares {width} x {height} pixels, more than its {len(data):,} bytes can encode "
            "(forged or truncated file)",
        )


def _jpeg_frame_type(data: bytes) -> int | None:
    """The start-of-frame marker (0xC0 baseline, 0xC2 progressive, ...) of a JPEG, from its segments."""
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        position += 2 + length
    return None


def _check_pixel_count(
    path: str | os.PathLike, width: int, height: int, frames: int, max_pixels: int
) -> None:
    count = width * height * frames
    if count > max_pixels:
        frames_text = f" x {frames} frames" if frames > 1 else ""
        raise ImageDecodeError(
            path,
            f"header declares {width} x {height}{frames_text} = {count:,} pixels, more than "
            f"max_pixels={max_pixels:,} (decompression bomb guard)",
        )


# ---------------------------------------------------------------- DICOM


def _read_dicom(data: bytes, path: str | os.PathLike, *, force: bool, pixels: bool) -> pydicom.Dataset:
    """The parsed dataset (``pixels=False``: stop before the pixel data); truncation is an error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=force, stop_before_pixels=not pixels)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, zlib.error) as exc:
            raise ImageDecodeError(path, f"not a readable DICOM file: {exc}") from exc
    truncation = next((str(w.message) for w in caught if "End of file" in str(w.message)), None)
    if truncation:
        raise ImageDecodeError(path, f"truncated DICOM file: {truncation}")
    for warning in caught:  # pass the others on
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return ds


def _dicom_shape(ds: pydicom.Dataset, path: str | os.PathLike) -> tuple[int, int, int]:
    """Rows, Columns and NumberOfFrames of a dataset that must hold an image."""
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(path, f"invalid DICOM image dimensions: {exc}") from exc
    if rows == 0 or columns == 0:
        raise ImageDecodeError(path, "DICOM file has pixel data but no Rows/Columns")
    return rows, columns, frames


def _probe_dicom(data: bytes, path: str | os.PathLike, *, force: bool) -> ImageHeader:
    ds = _read_dicom(data, path, force=force, pixels=False)
    if "Rows" not in ds and "Columns" not in ds:
        no_marker = " (and no 'DICM' marker: probably not a DICOM file)" if force else ""
        raise ImageDecodeError(path, f"DICOM file has no pixel data{no_marker}")
    rows, columns, frames = _dicom_shape(ds, path)
    try:
        sample_bytes = max(1, -(-int(ds.get("BitsAllocated") or 16) // 8))
        samples = max(1, int(ds.get("SamplesPerPixel") or 1))
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(path, f"invalid DICOM pixel module: {exc}") from exc
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        sample_bytes, samples = 2, 3  # the palette maps to 16-bit RGB
    return ImageHeader("DICOM", columns, rows, frames, sample_bytes * samples, len(data))


def _decode_dicom(data: bytes, path: str | os.PathLike, max_pixels: int, *, force: bool) -> np.ndarray:
    ds = _read_dicom(data, path, force=force, pixels=True)
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        no_marker = " (and no 'DICM' marker: probably not a DICOM file)" if force else ""
        raise ImageDecodeError(path, f"DICOM file has no pixel data{no_marker}")
    rows, columns, frames = _dicom_shape(ds, path)
    _check_pixel_count(path, columns, rows, frames, max_pixels)
    if frames > 1:
        ds.pixel_array_options(index=0)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # decoders raise many types (ValueError, RuntimeError, NotImplementedError...)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ImageDecodeError(
            path, f"cannot decode DICOM pixel data (transfer syntax {syntax}): {exc}"
        ) from exc
    try:
        return _dicom_to_gray(pixels, ds)
    except (ValueError, KeyError, AttributeError, NotImplementedError) as exc:
        raise ImageDecodeError(path, f"invalid DICOM pixel module: {exc}") from exc


def _dicom_to_gray(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return _colour_to_gray(apply_color_lut(pixels, ds), bits=int(ds.get("BitsStored", 8)))
    if pixels.ndim == 3:  # RGB or YBR (pydicom converts YBR to RGB when decoding)
        return _colour_to_gray(pixels, bits=int(ds.get("BitsStored", 8)))
    to_unit = _voi_to_unit(pixels, ds)
    if photometric == "MONOCHROME1":
        return _map_rows(pixels, lambda block: _unit_to_uint8(1.0 - to_unit(block)))
    return _map_rows(pixels, lambda block: _unit_to_uint8(to_unit(block)))


def _voi_to_unit(pixels: np.ndarray, ds: pydicom.Dataset) -> Callable[[np.ndarray], np.ndarray]:
    """Modality LUT then VOI (LUT sequence, window, or min-max) as a function of a block of stored values
    giving floats in [0, 1] (every step is elementwise; min-max uses the whole image's range)."""

    def modality(block: np.ndarray) -> np.ndarray:
        return apply_modality_lut(block, ds)

    if ds.get("VOILUTSequence"):
        entries, first_mapped, bits = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
        last_mapped = first_mapped + (entries or 2**16) - 1

        def lut(block: np.ndarray) -> np.ndarray:
            # clip to the table first: pydicom would wrap inputs beyond an 8-bit table's length
            values = np.clip(np.rint(modality(block)), first_mapped, last_mapped).astype(np.int64)
            return apply_voi(values, ds).astype(np.float64) / (2**bits - 1)

        return lut
    window = _first_window(ds)
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if window is not None and (function in ("SIGMOID", "LINEAR_EXACT") or window[1] >= 1):
        return lambda block: _apply_window(modality(block).astype(np.float64), *window, function)
    low, high = _range_of_rows(pixels, modality)  # LINEAR requires width >= 1: else min-max
    return lambda block: _scale_to_unit(modality(block), low, high)


def _first_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
    return (center, width) if width > 0 else None


def _first_value(value) -> float:
    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1] (LINEAR needs ``width >= 1``)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - (center - width / 2)) / width, 0.0, 1.0)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _colour_to_gray(rgb: np.ndarray, *, bits: int) -> np.ndarray:
    def luma(block: np.ndarray) -> np.ndarray:
        return block[..., :3].astype(np.float64) @ _LUMA

    if bits <= 8 and rgb.dtype == np.uint8:
        return _map_rows(rgb, lambda block: np.clip(np.rint(luma(block)), 0, 255).astype(np.uint8))
    low, high = _range_of_rows(rgb, luma)
    return _map_rows(rgb, lambda block: _unit_to_uint8(_scale_to_unit(luma(block), low, high)))


# ---------------------------------------------------------------- intensity helpers


def _row_blocks(source: np.ndarray) -> range:
    """Start rows of blocks of about ``_BLOCK_PIXELS`` pixels each."""
    step = max(1, _BLOCK_PIXELS // max(1, int(np.prod(source.shape[1:2]))))
    return range(0, source.shape[0], step)


def _map_rows(source: np.ndarray, to_uint8: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The uint8 ``(H, W)`` image ``to_uint8`` makes of ``source``, computed block of rows by block of rows
    (``to_uint8`` is elementwise per pixel, so this equals applying it to the whole image at once)."""
    out = np.empty(source.shape[:2], dtype=np.uint8)
    blocks = _row_blocks(source)
    for start in blocks:
        out[start : start + blocks.step] = to_uint8(source[start : start + blocks.step])
    return out


def _range_of_rows(
    source: np.ndarray, function: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[float, float]:
    """Minimum and maximum of ``function(source)`` (default: of ``source``), block by block."""
    if function is None:
        return float(source.min()), float(source.max())
    blocks = _row_blocks(source)
    ranges = [
        (float(values.min()), float(values.max()))
        for values in (function(source[start : start + blocks.step]) for start in blocks)
    ]
    return min(low for low, _ in ranges), max(high for _, high in ranges)


def _scale_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of ``low..high`` to 0..1 in float64 (all zeros when the range is empty)."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return (values.astype(np.float64, copy=False) - low) / (high - low)


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linear map of the image's own min..max to 0..255: a lookup table for unsigned integers up to 16
    bits, blocks of rows otherwise (same bytes as the whole-image float64 formula either way)."""
    low, high = _range_of_rows(values)
    if values.dtype.kind == "u" and values.dtype.itemsize <= 2:
        table = np.zeros(int(high) + 1, dtype=np.uint8)
        levels = np.arange(int(low), int(high) + 1, dtype=np.float64)
        table[int(low) :] = _unit_to_uint8(_scale_to_unit(levels, low, high))
        return table[values]
    return _map_rows(values, lambda block: _unit_to_uint8(_scale_to_unit(block, low, high)))


def _unit_to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8))
