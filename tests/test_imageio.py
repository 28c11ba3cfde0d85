"""Image and mask reading: conversions, orientation, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptlens.concepts.errors import DataError
from conceptlens.concepts.data.imageio import is_image_file, list_image_files, read_image, read_image_size, read_mask

RGB = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4


def _save(array: np.ndarray, path: Path, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    _save(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_read_image_rgb_png_is_exact(tmp_path):
    image = read_image(_save(RGB, tmp_path / "a.png"))
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, RGB)


def test_read_image_converts_grayscale_rgba_and_palette(tmp_path):
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(read_image(_save(gray, tmp_path / "g.png")), np.repeat(gray[..., None], 3, axis=2))
    rgba = np.concatenate([RGB, np.full((4, 5, 1), 7, dtype=np.uint8)], axis=2)
    np.testing.assert_array_equal(read_image(_save(rgba, tmp_path / "rgba.png")), RGB)
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putdata([1, 0])
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), [[[40, 50, 60], [10, 20, 30]]])


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_exif_orientation_is_applied_and_header_size_matches(tmp_path, suffix):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored pixels must be turned 90 degrees clockwise
    path = _save(RGB, tmp_path / f"o{suffix}", exif=exif)
    image = read_image(path)
    assert image.shape == (5, 4, 3)
    assert read_image_size(path) == (5, 4)
    if suffix != ".jpg":  # lossless: the exact rotation can be checked
        np.testing.assert_array_equal(image, np.rot90(RGB, k=-1))


def test_orientation_can_be_ignored(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(RGB, tmp_path / "o.png", exif=exif)
    np.testing.assert_array_equal(read_image(path, orient=False), RGB)
    assert read_image_size(path, orient=False) == (4, 5)


def test_truncated_jpeg_fails_on_read_but_header_size_is_read(tmp_path):
    path = _truncated_jpeg(tmp_path / "half.jpg")
    assert read_image_size(path) == (64, 64)  # header only: no full decode
    with pytest.raises(DataError, match="half.jpg.*truncated") as error:
        read_image(path)
    assert "remove" in error.value.fix


@pytest.mark.parametrize("reader", [read_image, read_image_size])
def test_non_image_file_is_named(tmp_path, reader):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(DataError, match="notes.png.*not a readable image"):
        reader(path)


@pytest.mark.parametrize("reader", [read_image, read_image_size, read_mask])
def test_missing_file_is_named(tmp_path, reader):
    with pytest.raises(DataError, match="ghost.png.*does not exist"):
        reader(tmp_path / "ghost.png")


def test_image_size_is_height_width(tmp_path):
    assert read_image_size(_save(np.zeros((7, 3, 3), dtype=np.uint8), tmp_path / "s.bmp")) == (7, 3)


MASK = np.array([[0, 1, 1], [0, 0, 1]], dtype=bool)


@pytest.mark.parametrize(
    "encode",
    [
        lambda m: Image.fromarray(m.astype(np.uint8) * 255),
        lambda m: Image.fromarray(m.astype(np.uint8)),
        lambda m: Image.fromarray(m.astype(np.uint8) * 255).convert("1"),
        lambda m: Image.fromarray(m.astype(np.uint8)).convert("P"),
    ],
    ids=["L-0-255", "L-0-1", "mode-1", "P-indices"],
)
def test_read_mask_accepts_binary_8bit_masks(tmp_path, encode):
    image = encode(MASK)
    image.save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png", expected_size=(2, 3))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, MASK)


def test_read_mask_palette_uses_indices_not_colours(tmp_path):
    image = Image.fromarray(MASK.astype(np.uint8)).convert("P")
    image.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 drawn white, index 1 black
    image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), MASK)


@pytest.mark.parametrize("channels", [3, 4])
def test_read_mask_rejects_colour_masks(tmp_path, channels):
    _save(np.zeros((2, 3, channels), dtype=np.uint8), tmp_path / "c.png")
    with pytest.raises(DataError, match="c.png.*not single-channel") as error:
        read_mask(tmp_path / "c.png")
    assert "8-bit grayscale" in error.value.fix


def test_read_mask_rejects_16bit_masks(tmp_path):
    _save(MASK.astype(np.uint16) * 255, tmp_path / "m16.png")
    with pytest.raises(DataError, match=r"m16.png.*16/32-bit.*I;16"):
        read_mask(tmp_path / "m16.png")


def test_read_mask_rejects_32bit_masks(tmp_path):
    Image.fromarray(MASK.astype(np.int32)).save(tmp_path / "m32.tif")
    with pytest.raises(DataError, match=r"m32.tif.*16/32-bit.*mode I\b"):
        read_mask(tmp_path / "m32.tif")


@pytest.mark.parametrize(
    ("values", "reported"), [([0, 128, 255], "0, 128, 255"), ([0, 1, 255], "0, 1, 255"), ([3, 0, 0], "0, 3")]
)
def test_read_mask_rejects_other_values_and_reports_them(tmp_path, values, reported):
    _save(np.array([values, [0, 0, 0]], dtype=np.uint8), tmp_path / "v.png")
    with pytest.raises(DataError, match="v.png") as error:
        read_mask(tmp_path / "v.png")
    assert f"found {reported}" in error.value.problem


def test_read_mask_rejects_wrong_size_naming_both_sizes_and_image(tmp_path):
    _save(MASK.astype(np.uint8) * 255, tmp_path / "m.png")
    with pytest.raises(DataError, match="m.png") as error:
        read_mask(tmp_path / "m.png", expected_size=(4, 3), image="images/cat.jpg")
    assert "2x3" in error.value.problem and "4x3" in error.value.problem
    assert "images/cat.jpg" in error.value.problem


def test_read_mask_rejects_truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    path = _save((rng.random((64, 64)) > 0.5).astype(np.uint8) * 255, tmp_path / "t.png")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match="t.png"):
        read_mask(path)


def test_image_extensions_are_case_insensitive():
    assert is_image_file(Path("a.JPG")) and is_image_file(Path("b.Tiff")) and is_image_file(Path("c.webp"))
    assert not is_image_file(Path("d.txt")) and not is_image_file(Path("e"))


def test_list_image_files_skips_hidden_and_names_non_images(tmp_path):
    _save(RGB, tmp_path / "b.png")
    _save(RGB, tmp_path / "a.JPG")
    (tmp_path / ".DS_Store").write_text("")
    assert [p.name for p in list_image_files(tmp_path)] == ["a.JPG", "b.png"]
    (tmp_path / "labels.csv").write_text("x")
    with pytest.raises(DataError, match="labels.csv.*not an image file"):
        list_image_files(tmp_path)


def test_list_image_files_rejects_subfolders(tmp_path):
    (tmp_path / "nested").mkdir()
    with pytest.raises(DataError, match="nested.*subfolder"):
        list_image_files(tmp_path)
