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
"""

from __future__ import annotations

import io
import os
import warnings
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

_DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_LUMA = np.array([0.299, 0.587, 0.114])


class ImageDecodeError(ValueError):
    """A file that cannot be read as an image; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


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
    label = name if name is not None else _source_name(source)
    data = _source_bytes(source, label)
    if not data:
        raise ImageDecodeError(label, "empty file (0 bytes)")
    is_dicom_suffix = Path(label).suffix.lower() in _DICOM_SUFFIXES
    if data[128:132] == b"DICM" or is_dicom_suffix:
        return _decode_dicom(data, label, max_pixels, force=data[128:132] != b"DICM")
    return _decode_pil(data, label, max_pixels)


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


def _decode_pil(data: bytes, path: str | os.PathLike, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, f"decompression bomb refused by PIL: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(
            path, "not a recognised image format (PNG, JPEG, DICOM or another PIL format)"
        ) from exc
    _check_pixel_count(path, image.width, image.height, 1, max_pixels)
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(path, f"corrupt or truncated {image.format} data: {exc}") from exc
    return _pil_to_gray(image)


def _pil_to_gray(image: Image.Image) -> np.ndarray:
    if image.mode == "L":
        return np.array(image)
    if image.mode in _HIGH_DEPTH_MODES:
        return _minmax_to_uint8(np.asarray(image))
    try:
        return np.array(image.convert("L"))
    except ValueError:  # modes PIL cannot take straight to L (La, LAB, ...)
        return np.array(image.convert("RGB").convert("L"))


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


def _decode_dicom(data: bytes, path: str | os.PathLike, max_pixels: int, *, force: bool) -> np.ndarray:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
            raise ImageDecodeError(path, f"not a readable DICOM file: {exc}") from exc
    truncation = next((str(w.message) for w in caught if "End of file" in str(w.message)), None)
    if truncation:
        raise ImageDecodeError(path, f"truncated DICOM file: {truncation}")
    for warning in caught:  # pass the others on
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        no_marker = " (and no 'DICM' marker: probably not a DICOM file)" if force else ""
        raise ImageDecodeError(path, f"DICOM file has no pixel data{no_marker}")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows == 0 or columns == 0:
        raise ImageDecodeError(path, "DICOM file has pixel data but no Rows/Columns")
    frames = int(ds.get("NumberOfFrames") or 1)
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
    unit = _voi_to_unit(pixels, ds)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return _unit_to_uint8(unit)


def _voi_to_unit(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Modality LUT then VOI (LUT sequence, window, or min-max) to float values in [0, 1]."""
    values = apply_modality_lut(pixels, ds)
    if ds.get("VOILUTSequence"):
        entries, first_mapped, bits = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
        # clip to the table first: pydicom would wrap inputs beyond an 8-bit table's length
        values = np.clip(np.rint(values), first_mapped, first_mapped + (entries or 2**16) - 1).astype(
            np.int64
        )
        return apply_voi(values, ds).astype(np.float64) / (2**bits - 1)
    window = _first_window(ds)
    if window is not None:
        return _apply_window(values.astype(np.float64), *window, str(ds.get("VOILUTFunction", "LINEAR")))
    return _minmax_to_unit(values)


def _first_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
    return (center, width) if width > 0 else None


def _first_value(value) -> float:
    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1]."""
    function = function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - (center - width / 2)) / width, 0.0, 1.0)
    if width < 1:  # LINEAR requires width >= 1
        return _minmax_to_unit(values)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _colour_to_gray(rgb: np.ndarray, *, bits: int) -> np.ndarray:
    luma = rgb[..., :3].astype(np.float64) @ _LUMA
    if bits <= 8 and rgb.dtype == np.uint8:
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    return _minmax_to_uint8(luma)


# ---------------------------------------------------------------- intensity helpers


def _minmax_to_unit(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64, copy=False)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - low) / (high - low)


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    return _unit_to_uint8(_minmax_to_unit(values))


def _unit_to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8))
