"""Decoding every supported input to uint8 (H, W), brighter = denser, with clear errors for bad files."""

from __future__ import annotations

import io
import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxrkit.data import decode
from cxrkit.data.decode import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImplausibleImageError,
    Plausibility,
    probe_image,
    read_image,
)

# ---------------------------------------------------------------- helpers


def write_dicom(
    path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 0, **elements
) -> Path:
    """Write an uncompressed DICOM holding ``pixels`` plus any extra ``elements`` (keyword=value)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.set_pixel_data(pixels, photometric, bits or pixels.dtype.itemsize * 8)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def gradient(height: int = 32, width: int = 48, high: int = 4095) -> np.ndarray:
    """A 16-bit image whose values rise left to right from 0 to ``high``."""
    row = np.linspace(0, high, width).round().astype(np.uint16)
    return np.tile(row, (height, 1))


def png_with_declared_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR claims ``width x height`` (valid CRCs), i.e. a decompression bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.fixture(scope="module")
def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "dicom"


@pytest.fixture(scope="module")
def nih_png(nih_sample: Path) -> Path:
    return nih_sample / "images" / "00000002_000.png"


@pytest.fixture(scope="module")
def nih_rgba_png(nih_sample: Path) -> Path:
    for path in sorted((nih_sample / "images").glob("*.png")):
        with Image.open(path) as image:  # header only
            if image.mode == "RGBA":
                return path
    pytest.fail("the NIH sample is documented to contain RGBA PNGs, none found")


# ---------------------------------------------------------------- real files


def test_real_jpeg_baseline_dicom_decodes_to_uint8(dicom_dir: Path) -> None:
    path = dicom_dir / "siim_pneumothorax_sample.dcm"
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"  # JPEG baseline
    image = read_image(path)
    assert image.shape == (1024, 1024) and image.dtype == np.uint8
    assert image.flags.c_contiguous and image.flags.writeable
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    expected = np.rint((stored - stored.min()) / (stored.max() - stored.min()) * 255)  # no window: min-max
    np.testing.assert_array_equal(image, expected.astype(np.uint8))
    assert image.std() > 20


def test_real_monochrome1_variant_is_inverted(dicom_dir: Path) -> None:
    normal = read_image(dicom_dir / "siim_pneumothorax_sample.dcm").astype(np.int16)
    monochrome1 = read_image(dicom_dir / "synthetic_monochrome1_variant.dcm").astype(np.int16)
    np.testing.assert_array_equal(monochrome1, 255 - normal)


def test_nih_grayscale_png_is_unchanged(nih_png: Path) -> None:
    with Image.open(nih_png) as original:
        assert original.mode == "L"
        np.testing.assert_array_equal(read_image(nih_png), np.asarray(original))


def test_nih_rgba_png_becomes_grayscale(nih_rgba_png: Path) -> None:
    image = read_image(nih_rgba_png)
    with Image.open(nih_rgba_png) as original:
        rgba = np.asarray(original)
    assert image.shape == rgba.shape[:2] == (1024, 1024)
    np.testing.assert_array_equal(image, rgba[..., 0])  # the NIH RGBA files are gray in RGB, alpha dropped


def test_pneumonia_rgb_jpeg_becomes_grayscale(pneumonia_root: Path) -> None:
    path = next(iter(sorted((pneumonia_root / "train" / "PNEUMONIA").glob("*.jpeg"))))
    image = read_image(path)
    with Image.open(path) as original:
        assert original.mode == "RGB"
        np.testing.assert_array_equal(image, np.asarray(original.convert("L")))
    assert image.shape == (224, 224) and image.dtype == np.uint8


# ---------------------------------------------------------------- generated PNGs


def test_16bit_png_is_scaled_by_its_actual_range(tmp_path: Path) -> None:
    values = gradient(high=3000) + 1000  # 1000..4000 of 65535
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as written:
        assert written.mode.startswith("I;16") or written.mode == "I"
    image = read_image(path)
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
    expected = np.rint((values.astype(np.float64) - 1000) / 3000 * 255).astype(np.uint8)
    np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize("mode", ["LA", "P", "RGB"])
def test_colour_and_alpha_modes_become_grayscale(tmp_path: Path, mode: str) -> None:
    gray = gradient(high=255).astype(np.uint8)
    source = Image.fromarray(gray).convert(mode)
    path = tmp_path / f"image_{mode}.png"
    source.save(path)
    image = read_image(path)
    assert image.shape == gray.shape
    np.testing.assert_allclose(image, gray, atol=1)


# ---------------------------------------------------------------- generated DICOMs


def test_dicom_16bit_applies_rescale_slope_and_intercept(tmp_path: Path) -> None:
    stored = gradient()
    plain = read_image(write_dicom(tmp_path / "plain.dcm", stored, bits=12))
    inverted_by_slope = read_image(
        write_dicom(tmp_path / "slope.dcm", stored, bits=12, RescaleSlope=-1, RescaleIntercept=4095)
    )
    assert plain[0, 0] == 0 and plain[0, -1] == 255
    np.testing.assert_array_equal(inverted_by_slope, 255 - plain)


def test_dicom_window_applies_to_modality_values(tmp_path: Path) -> None:
    stored = np.array([[0, 1024, 2048, 4095]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "window.dcm", stored, bits=12, RescaleSlope=1, RescaleIntercept=-1024,
        WindowCenter=0, WindowWidth=1001,
    )  # fmt: skip
    image = read_image(path)
    # modality values -1024, 0, 1024, 3071; LINEAR window [-500, 500]: 0 -> 0.5005 -> 128
    np.testing.assert_array_equal(image, [[0, 128, 255, 255]])


def test_dicom_window_functions(tmp_path: Path) -> None:
    stored = np.array([[100, 150, 200]], dtype=np.uint16)
    common = {"WindowCenter": 150, "WindowWidth": 100}
    exact = read_image(
        write_dicom(tmp_path / "exact.dcm", stored, bits=12, VOILUTFunction="LINEAR_EXACT", **common)
    )
    sigmoid = read_image(
        write_dicom(tmp_path / "sigmoid.dcm", stored, bits=12, VOILUTFunction="SIGMOID", **common)
    )
    np.testing.assert_array_equal(exact, [[0, 128, 255]])  # (x - 100) / 100
    expected = np.rint(255 / (1 + np.exp(-4 * (np.array([100, 150, 200]) - 150) / 100)))
    np.testing.assert_array_equal(sigmoid, [expected.astype(np.uint8)])


def test_dicom_multivalued_window_uses_the_first(tmp_path: Path) -> None:
    stored = np.array([[100, 150, 200]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "multi.dcm", stored, bits=12, WindowCenter=[150, 2000], WindowWidth=[101, 10]
    )
    # LINEAR, c=150, w=101: (x - 149.5) / 100 + 0.5 -> 0.005, 0.505, 1 (the second window would give all 0)
    np.testing.assert_array_equal(read_image(path), [[1, 129, 255]])


def test_dicom_voi_lut_sequence_is_applied_and_preferred(tmp_path: Path) -> None:
    lut = Dataset()
    lut.add_new(0x00283002, "US", [256, 0, 8])  # LUT Descriptor: 256 entries, first mapped 0, 8 bits
    lut.add_new(0x00283006, "US", [0 if i < 100 else 255 for i in range(256)])  # LUT Data: a step at 100
    stored = np.array([[50, 99, 150, 300]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "voilut.dcm", stored, bits=12, VOILUTSequence=Sequence([lut]), WindowCenter=5000,
        WindowWidth=10,
    )  # fmt: skip
    np.testing.assert_array_equal(read_image(path), [[0, 0, 255, 255]])  # beyond the table: last entry


def test_generated_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = gradient()
    normal = read_image(write_dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2", 12))
    inverted = read_image(write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1", 12))
    np.testing.assert_array_equal(inverted, 255 - normal)
    windowed = read_image(write_dicom(tmp_path / "m1w.dcm", stored, "MONOCHROME1", 12, WindowCenter=2048,
                                      WindowWidth=4096))  # fmt: skip
    assert windowed[0, 0] == 255 and windowed[0, -1] == 0  # low stored values display white


def test_rgb_dicom_becomes_luma(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:, :2, 0] = 255  # red
    rgb[:, 2:4, 1] = 255  # green
    rgb[:, 4:, :] = 255  # white
    image = read_image(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB", 8))
    assert image.shape == (4, 6)
    np.testing.assert_array_equal(image[0], [76, 76, 150, 150, 255, 255])  # ITU-R 601 luma


def test_multiframe_dicom_returns_the_first_frame(tmp_path: Path) -> None:
    frames = np.stack([gradient(), gradient()[:, ::-1]])
    image = read_image(write_dicom(tmp_path / "frames.dcm", frames, bits=12))
    assert image.shape == (32, 48) and image[0, 0] == 0 and image[0, -1] == 255


def test_dicom_without_pixel_data_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "nopixels.dcm", gradient(), bits=12)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(ImageDecodeError, match="no pixel data") as error:
        read_image(path)
    assert error.value.path == str(path)


def test_dicom_with_short_pixel_data_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "short.dcm", gradient(), bits=12)
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path)
    with pytest.raises(ImageDecodeError, match=re.escape("short.dcm")):
        read_image(path)


def test_truncated_compressed_dicom_file_is_refused(tmp_path: Path, dicom_dir: Path) -> None:
    data = (dicom_dir / "siim_pneumothorax_sample.dcm").read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated DICOM") as error:
        read_image(path)
    assert error.value.path == str(path)


def test_truncated_uncompressed_dicom_file_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "cut.dcm", gradient(64, 64), bits=12)
    data = path.read_bytes()
    path.write_bytes(data[:-3000])
    with pytest.raises(ImageDecodeError, match="less than expected") as error:
        read_image(path)
    assert "cut.dcm" in str(error.value)


def test_dicom_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "bomb.dcm", gradient(), bits=12)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 4
    ds.save_as(path)
    with pytest.raises(ImageDecodeError, match=r"60000 x 60000 x 4 frames.*max_pixels"):
        read_image(path)


def test_real_dicom_over_max_pixels_is_refused(dicom_dir: Path) -> None:
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        read_image(dicom_dir / "siim_pneumothorax_sample.dcm", max_pixels=1024 * 1023)


# ---------------------------------------------------------------- bad files


def test_png_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    path = png_with_declared_size(tmp_path / "bomb.png", 12000, 12000)  # 144 M pixels
    with pytest.raises(ImageDecodeError, match=r"12000 x 12000 .*max_pixels=100,000,000"):
        read_image(path, max_pixels=100_000_000)
    huge = png_with_declared_size(tmp_path / "huge.png", 50000, 50000)
    assert DEFAULT_MAX_PIXELS < 50000 * 50000
    with pytest.raises(ImageDecodeError, match="bomb"):
        read_image(huge)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageDecodeError, match="empty file") as error:
        read_image(path)
    assert isinstance(error.value, ValueError) and "empty.png" in str(error.value)


def test_truncated_png(tmp_path: Path, nih_png: Path) -> None:
    path = tmp_path / "truncated.png"
    data = nih_png.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageDecodeError, match="truncated") as error:
        read_image(path)
    assert error.value.path == str(path)


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        read_image(path)


def test_text_file_named_dcm(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file either\n" * 20)
    with pytest.raises(ImageDecodeError, match=r"no pixel data .*not a DICOM file"):
        read_image(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="cannot open"):
        read_image(tmp_path / "absent.png")


# ---------------------------------------------------------------- fsspec


def test_fsspec_urls(tmp_path: Path, nih_png: Path) -> None:
    expected = read_image(nih_png)
    np.testing.assert_array_equal(read_image(f"file://{nih_png}"), expected)
    with fsspec.open("memory://cxrkit-test/image.png", "wb") as stream:
        stream.write(nih_png.read_bytes())
    np.testing.assert_array_equal(read_image("memory://cxrkit-test/image.png"), expected)
    with pytest.raises(ImageDecodeError, match=re.escape("memory://cxrkit-test/absent.png")):
        read_image("memory://cxrkit-test/absent.png")


# ---------------------------------------------------------------- bounded memory, same bytes


def _float64_reference(values: np.ndarray) -> np.ndarray:
    """The whole-image float64 min-max formula the decoder must reproduce byte for byte."""
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    unit = np.zeros_like(values) if high <= low else (values - low) / (high - low)
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_minmax_mapping_equals_the_float64_formula(monkeypatch: pytest.MonkeyPatch, dtype: type) -> None:
    monkeypatch.setattr(decode, "_BLOCK_PIXELS", 1000)  # many blocks of rows even for small images
    rng = np.random.default_rng(7)
    for low, high in ((0, 65535), (1000, 1003), (3, 4095), (500, 500)):
        values = rng.integers(low, high + 1, size=(97, 131)).astype(dtype)
        np.testing.assert_array_equal(decode._minmax_to_uint8(values), _float64_reference(values))


def test_dicom_mapping_in_blocks_equals_the_whole_image(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 12])
    lut.add_new(0x00283006, "US", [min(4095, (i * 7) % 5000) for i in range(4096)])
    stored = np.random.default_rng(3).integers(0, 4096, size=(120, 90)).astype(np.uint16)
    variants = {
        "minmax": {},
        "rescale": {"RescaleSlope": 0.5, "RescaleIntercept": -1024},
        "window": {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400},
        "sigmoid": {"WindowCenter": 2000, "WindowWidth": 900, "VOILUTFunction": "SIGMOID"},
        "narrow": {"WindowCenter": 2000, "WindowWidth": 0.5},
        "voilut": {"VOILUTSequence": Sequence([lut])},
    }
    for name, elements in variants.items():
        for photometric in ("MONOCHROME2", "MONOCHROME1"):
            path = write_dicom(tmp_path / f"{name}_{photometric}.dcm", stored, photometric, 12, **elements)
            whole = read_image(path)
            with monkeypatch.context() as patch:
                patch.setattr(decode, "_BLOCK_PIXELS", 500)
                np.testing.assert_array_equal(read_image(path), whole, err_msg=f"{name} {photometric}")
    rgb = np.random.default_rng(4).integers(0, 65535, size=(40, 30, 3)).astype(np.uint16)
    path = write_dicom(tmp_path / "rgb16.dcm", rgb, "RGB", 16)
    whole = read_image(path)
    monkeypatch.setattr(decode, "_BLOCK_PIXELS", 100)
    np.testing.assert_array_equal(read_image(path), whole)
    np.testing.assert_array_equal(whole, _float64_reference(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]))


def _traced_peak(function, *args) -> int:
    """Peak bytes numpy and Python allocate while ``function`` runs (PIL's own buffers are not traced)."""
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_16bit_decoding_makes_no_whole_image_float_copy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        decode, "_BLOCK_PIXELS", 1 << 16
    )  # float64 temporaries: 0.5 MB, small beside the image
    pixels = np.zeros((2000, 1500), dtype=np.uint16)
    pixels[500:1500, 300:1200] = np.arange(900, dtype=np.uint16) * 70
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    count = pixels.size
    # PIL hands the 2-byte samples over through a bytes copy, then the uint8 output: about 4 bytes a pixel;
    # one whole-image float64 copy alone would be 8
    assert _traced_peak(read_image, data) < 5 * count
    np.testing.assert_array_equal(read_image(data), _float64_reference(pixels))
    dicom = write_dicom(
        tmp_path / "big.dcm", pixels, bits=16, RescaleSlope=2, RescaleIntercept=-7
    ).read_bytes()
    # the dataset's PixelData (2 bytes), pydicom's array (2 bytes) and the output (1 byte)
    assert _traced_peak(read_image, dicom) < 6 * count


def test_probe_reads_the_header_only(tmp_path: Path, nih_png: Path, dicom_dir: Path) -> None:
    bomb = png_with_declared_size(tmp_path / "bomb.png", 12000, 12000).read_bytes()
    header = probe_image(bomb)  # no pixel is decoded: no memory error, no bomb error
    assert (header.format, header.width, header.height, header.bytes_per_pixel) == ("PNG", 12000, 12000, 1)
    assert header.pixels == 12000**2 and header.decode_bytes > 12000**2
    with pytest.raises(ImageDecodeError, match="decompression bomb"):  # PIL refuses to open beyond 179 Mpx
        probe_image(png_with_declared_size(tmp_path / "bigger.png", 60000, 60000))
    nih = probe_image(nih_png)
    assert (nih.width, nih.height) == read_image(nih_png).shape[::-1]
    sixteen = write_dicom(tmp_path / "deep.dcm", gradient(), bits=12)
    assert probe_image(sixteen) == decode.ImageHeader("DICOM", 48, 32, 1, 2, sixteen.stat().st_size)
    real = probe_image(dicom_dir / "siim_pneumothorax_sample.dcm")
    assert (real.format, real.width, real.height) == ("DICOM", 1024, 1024)
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        probe_image(b"plain text", name="notes.png")


def test_plausibility() -> None:
    check = Plausibility().check
    check(64, 64, "a.png")
    check(2000, 500, "a.png")
    with pytest.raises(ImplausibleImageError, match=r"a.png.*1 x 1 pixels is too small"):
        check(1, 1, "a.png")
    with pytest.raises(ImplausibleImageError, match="aspect ratio over 4:1"):
        check(2001, 500, "a.png")
    Plausibility(min_side=1, max_aspect=float("inf")).check(1, 10000, "a.png")


def test_forged_dimensions_are_refused_before_decoding(tmp_path: Path, pneumonia_root: Path) -> None:
    jpeg = bytearray(sorted((pneumonia_root / "train" / "NORMAL").glob("*.jpeg"))[0].read_bytes())
    sof = next(i for i in range(2, len(jpeg) - 9) if jpeg[i] == 0xFF and jpeg[i + 1] in (0xC0, 0xC1))
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 32767, 4096)  # height, width
    with pytest.raises(ImageDecodeError, match=r"more than its .* bytes can encode"):
        read_image(bytes(jpeg[:20000]), name="forged.jpeg")
    png = png_with_declared_size(tmp_path / "forged.png", 20000, 4000)
    with pytest.raises(ImageDecodeError, match=r"more than its .* bytes can encode"):
        read_image(png)


def test_corrupt_deflated_dicom_is_a_decode_error(tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = write_dicom(tmp_path / "deflated.dcm", gradient(), bits=12)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    data = bytearray(path.read_bytes())
    data[-200:-100] = b"\xff" * 100  # inside the deflate stream
    with pytest.raises(ImageDecodeError, match=r"deflated\.dcm"):
        read_image(bytes(data), name="deflated.dcm")
