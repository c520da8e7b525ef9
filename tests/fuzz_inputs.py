"""Seed files and mutations for fuzzing the decoders (tests/test_fuzz.py, benchmarks/bench_fuzz.py).

Seeds are real chest X-rays from ../shared/data: original NIH PNG and Kermany JPEG bytes, the SIIM DICOM
(JPEG baseline inside), plus small re-encodings of real pixels (8- and 16-bit PNG, progressive JPEG,
uncompressed and RLE DICOM) that decode fast. A mutation takes a seed and a ``draw(low, high)`` source of
integers (hypothesis' ``data.draw`` in the tests, a seeded generator in the benchmark), so both drive the
same mutations: byte flips, truncation, inserted or deleted runs, PNG IHDR fields and chunk lengths (with
or without a valid CRC), JPEG frame dimensions and segment lengths, DICOM pixel-module attributes and
transfer syntaxes (the pixel data left as it was).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

#: ``draw(low, high)``: an integer in ``[low, high]``.
Draw = Callable[[int, int], int]

#: Field values that break parsers: zero, one, sign and width boundaries.
INTERESTING = (0, 1, 2, 3, 7, 8, 16, 255, 256, 4096, 32767, 32768, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1)
TRANSFER_SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    UID("1.2.3.4.5.6.7"),
)
DICOM_FIELDS = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "SamplesPerPixel",
    "PixelRepresentation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "PhotometricInterpretation",
    "WindowCenter",
    "WindowWidth",
    "RescaleSlope",
)
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", "XYZ", "")


def seed_files(shared_data: Path) -> dict[str, bytes]:
    """Name (with its format's suffix) -> bytes of each seed."""
    nih = shared_data / "nih" / "images" / "00000002_000.png"
    jpeg = sorted((shared_data / "pneumonia" / "train" / "NORMAL").glob("*.jpeg"))[0]
    dicom = shared_data / "dicom" / "siim_pneumothorax_sample.dcm"
    pixels = np.asarray(Image.open(nih).convert("L").resize((96, 96)))
    return {
        "nih_original.png": nih.read_bytes(),
        "nih_small.png": _png(Image.fromarray(pixels)),
        "nih_16bit.png": _png(Image.fromarray(pixels.astype(np.uint16) * 257)),
        "kermany_original.jpeg": jpeg.read_bytes(),
        "kermany_progressive.jpeg": _jpeg(Image.open(jpeg).convert("L").resize((96, 96)), progressive=True),
        "siim_original.dcm": dicom.read_bytes(),
        "nih_16bit_monochrome1.dcm": _dicom(65535 - pixels.astype(np.uint16) * 257, "MONOCHROME1"),
        "nih_rle.dcm": _dicom(pixels, "MONOCHROME2", compress=RLELossless),
    }


def mutate(data: bytes, name: str, draw: Draw) -> bytes:
    """One mutation of ``data`` (a file named ``name``), chosen and parameterised by ``draw``."""
    kinds = [_flip, _truncate, _splice]
    suffix = Path(name).suffix
    kinds += {".png": [_png_header, _png_chunk_length], ".jpeg": [_jpeg_frame, _jpeg_segment_length]}.get(
        suffix, [_dicom_field, _dicom_syntax] if suffix == ".dcm" else []
    )
    return kinds[draw(0, len(kinds) - 1)](data, draw)


def mutations(data: bytes, name: str, draw: Draw) -> bytes:
    """One to three stacked mutations."""
    for _ in range(draw(1, 3)):
        data = mutate(data, name, draw)
    return data


# ---------------------------------------------------------------- any format


def _flip(data: bytes, draw: Draw) -> bytes:
    out = bytearray(data)
    for _ in range(draw(1, 8)):
        if out:
            out[draw(0, len(out) - 1)] = draw(0, 255)
    return bytes(out)


def _truncate(data: bytes, draw: Draw) -> bytes:
    return data[: draw(0, max(0, len(data) - 1))]


def _splice(data: bytes, draw: Draw) -> bytes:
    at = draw(0, len(data))
    if draw(0, 1):
        return data[:at] + bytes(draw(0, 255) for _ in range(draw(1, 64))) + data[at:]
    return data[:at] + data[at + draw(1, 4096) :]


def _interesting(draw: Draw) -> int:
    return INTERESTING[draw(0, len(INTERESTING) - 1)]


# ---------------------------------------------------------------- PNG


def _png_chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, type) of each chunk whose 8-byte header lies inside the file."""
    chunks, offset = [], 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        chunks.append((offset, kind))
        offset += 12 + length
    return chunks


def _png_header(data: bytes, draw: Draw) -> bytes:
    """Set IHDR width, height, bit depth, colour type or interlace; keep the CRC valid or not."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return _flip(data, draw)
    body = bytearray(data[16:29])
    field = draw(0, 4)
    if field < 2:
        body[4 * field : 4 * field + 4] = struct.pack(">I", _interesting(draw))
    else:
        body[6 + field] = (1, 2, 4, 8, 16, 0, 3, 255)[draw(0, 7)] if field == 2 else draw(0, 7)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body)) if draw(0, 3) else data[29:33]
    return data[:16] + bytes(body) + crc + data[33:]


def _png_chunk_length(data: bytes, draw: Draw) -> bytes:
    chunks = _png_chunks(data)
    if not chunks:
        return _flip(data, draw)
    offset, _ = chunks[draw(0, len(chunks) - 1)]
    return data[:offset] + struct.pack(">I", _interesting(draw)) + data[offset + 4 :]


# ---------------------------------------------------------------- JPEG


def _jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(offset, marker) of each marker segment before the scan data."""
    segments, offset = [], 2
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        segments.append((offset, marker))
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        offset += 2 + struct.unpack(">H", data[offset + 2 : offset + 4])[0]
    return segments


def _jpeg_frame(data: bytes, draw: Draw) -> bytes:
    """Set the frame header's precision, height, width or component count."""
    frames = [offset for offset, marker in _jpeg_segments(data) if marker in (0xC0, 0xC1, 0xC2)]
    if not frames or frames[0] + 10 > len(data):
        return _flip(data, draw)
    start = frames[0] + 4  # precision (1 byte), height (2), width (2), components (1)
    field = draw(0, 3)
    if field == 0:
        patch, at = bytes([(8, 12, 16, 0, 255)[draw(0, 4)]]), start
    elif field == 3:
        patch, at = bytes([(0, 1, 2, 3, 4, 255)[draw(0, 5)]]), start + 5
    else:
        patch, at = struct.pack(">H", _interesting(draw) & 0xFFFF), start + 1 + 2 * (field - 1)
    return data[:at] + patch + data[at + len(patch) :]


def _jpeg_segment_length(data: bytes, draw: Draw) -> bytes:
    segments = _jpeg_segments(data)
    if not segments:
        return _flip(data, draw)
    offset, _ = segments[draw(0, len(segments) - 1)]
    return data[: offset + 2] + struct.pack(">H", _interesting(draw) & 0xFFFF) + data[offset + 4 :]


# ---------------------------------------------------------------- DICOM


def _dicom_field(data: bytes, draw: Draw) -> bytes:
    """Set one pixel-module attribute to a value its pixel data does not match."""
    ds = _parse_dicom(data)
    if ds is None:
        return _flip(data, draw)
    name = DICOM_FIELDS[draw(0, len(DICOM_FIELDS) - 1)]
    if name == "PhotometricInterpretation":
        value: object = PHOTOMETRIC[draw(0, len(PHOTOMETRIC) - 1)]
    elif name in ("WindowCenter", "WindowWidth", "RescaleSlope"):
        value = (0.0, -1.0, 1e-30, 1e30, float("nan"), 4096.0)[draw(0, 5)]
    else:
        value = _interesting(draw) & 0xFFFF
    setattr(ds, name, value)
    return _write_dicom(ds) or data


def _dicom_syntax(data: bytes, draw: Draw) -> bytes:
    """Declare another transfer syntax without re-encoding the dataset's pixel data."""
    ds = _parse_dicom(data)
    if ds is None:
        return _flip(data, draw)
    ds.file_meta.TransferSyntaxUID = TRANSFER_SYNTAXES[draw(0, len(TRANSFER_SYNTAXES) - 1)]
    return _write_dicom(ds) or data


def _parse_dicom(data: bytes) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:  # a mutated file pydicom cannot parse: mutate its bytes instead
        return None


def _write_dicom(ds: pydicom.Dataset) -> bytes | None:
    buffer = io.BytesIO()
    syntax = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    try:
        implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
        little = syntax.is_little_endian if syntax.is_transfer_syntax else True
        pydicom.dcmwrite(buffer, ds, implicit_vr=implicit, little_endian=little, enforce_file_format=True)
    except Exception:  # pydicom refuses to write this combination: not a useful case
        return None
    return buffer.getvalue()


# ---------------------------------------------------------------- seed encoders


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image, progressive: bool) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def _dicom(pixels: np.ndarray, photometric: str, compress: UID | None = None) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # digital X-ray for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if bits == 16:
        ds.WindowCenter, ds.WindowWidth = 32768, 65536
    ds.PixelData = pixels.tobytes()
    if compress is not None:
        ds.compress(compress)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
