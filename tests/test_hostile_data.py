"""Hostile data files: COCO geometry, paths from data files, image decoding, huge images, strips.

Every case is a hand-built file that today's loaders either crashed on (segfault, heap overflow,
tens of GB allocated), read silently wrong (all-white 16-bit images, a rotated image whose size
and masks were not), or read from outside the dataset's folder. Each now ends with one
:class:`DataError` naming the culprit and the fix, or reads correctly.

The COCO geometry cases that would reach pycocotools' native code run in a subprocess, so that a
regression cannot take the test process down with it.
"""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conceptlens.concepts.data.coco import CocoDataset
from conceptlens.concepts.data.folder import FolderDataset
from conceptlens.concepts.data.imageio import read_image, read_image_size, read_mask
from conceptlens.concepts.errors import DataError
from PIL import Image

HEIGHT, WIDTH = 10, 12
SQUARE = [1.0, 1.0, 6.0, 1.0, 6.0, 6.0, 1.0, 6.0]


# --------------------------------------------------------------------------- COCO building blocks


def write_coco(tmp: Path, segmentation: Any = None, images: list[dict] | None = None,
               categories: list[dict] | None = None, annotations: list[dict] | None = None) -> tuple[Path, Path]:
    """Write a one-image COCO file (one category, one annotation) and its image; return the paths."""
    folder = tmp / "images"
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)).save(folder / "one.png")
    if images is None:
        images = [{"id": 1, "file_name": "one.png", "height": HEIGHT, "width": WIDTH}]
    if categories is None:
        categories = [{"id": 1, "name": "dog"}]
    if annotations is None:
        annotations = [{"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0,
                        "segmentation": [SQUARE] if segmentation is None else segmentation}]
    path = tmp / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, folder


def rle_string(counts: list[int]) -> str:
    """Encode run lengths in COCO's compressed string form (pycocotools' rleToString)."""
    out = []
    for position, count in enumerate(counts):
        value = count - counts[position - 2] if position > 2 else count
        more = True
        while more:
            char = value & 0x1F
            value >>= 5
            more = not ((value == 0 and not char & 0x10) or (value == -1 and char & 0x10))
            out.append(chr(char + 48 + (0x20 if more else 0)))
    return "".join(out)


_NATIVE_GUARD = textwrap.dedent(
    """
    import json, sys
    from conceptlens.concepts.data.coco import CocoDataset
    from conceptlens.concepts.errors import DataError
    results = {}
    for name, annotations, images in json.loads(open(sys.argv[1]).read()):
        try:
            dataset = CocoDataset(annotations, images)
            results[name] = {"ok": True, "sum": int(dataset.masks(0).sum())}
        except DataError as error:
            results[name] = {"ok": False, "message": str(error)}
        print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps(results))
    """
)


def load_in_subprocess(cases: dict[str, tuple[Path, Path]], tmp: Path) -> dict[str, dict[str, Any]]:
    """Load COCO files and decode their masks in one child process; return what it found per case.

    A case that crashes the child (a regression reaching native code) is reported with the
    child's exit code; the cases before it keep their results.
    """
    listing = tmp / "cases.json"
    listing.write_text(json.dumps([[name, str(a), str(i)] for name, (a, i) in cases.items()]))
    result = subprocess.run([sys.executable, "-c", _NATIVE_GUARD, str(listing)], capture_output=True, text=True, timeout=300, check=False)
    found: dict[str, dict[str, Any]] = {}
    for line in result.stdout.splitlines():
        found.update(json.loads(line))
    crash = {"ok": True, "message": f"loader crashed (exit {result.returncode}): {result.stderr[-500:]}"}
    return {name: found.get(name, crash) for name in cases}


# --------------------------------------------------------------------------- class 1: COCO geometry

GEOMETRY_CASES = {
    "polygon-nan": ([[1.0, 1.0, float("nan"), 5.0, 9.0, 9.0]], "not finite"),
    "polygon-inf": ([[1.0, 1.0, float("inf"), 5.0, 9.0, 9.0]], "not finite"),
    "polygon-huge-coordinate": ([[1.0, 1.0, 1e12, 5.0, 9.0, 9.0]], "outside"),
    "polygon-negative-huge": ([[1.0, 1.0, 5.0, -1e9, 9.0, 9.0]], "outside"),
    "polygon-string-coordinate": ([[1.0, 1.0, "5", 5.0, 9.0, 9.0]], "numbers"),
    "polygon-boolean-coordinate": ([[1.0, 1.0, True, 5.0, 9.0, 9.0]], "numbers"),
    "polygon-outline-too-long": ([[0.0, 0.0, 11.0, 9.0] * 20000], "outline"),
    "rle-string-short": ({"size": [HEIGHT, WIDTH], "counts": rle_string([5, 10, 5])}, "cover 20 of 120"),
    "rle-string-long": ({"size": [HEIGHT, WIDTH], "counts": rle_string([5, 10, 100000])}, "cover 100015 of 120"),
    "rle-string-bad-character": ({"size": [HEIGHT, WIDTH], "counts": "0~~~!"}, "character"),
    "rle-string-unfinished": ({"size": [HEIGHT, WIDTH], "counts": rle_string([60, 60]) + "P"}, "ends inside"),
    "rle-string-negative-run": ({"size": [HEIGHT, WIDTH], "counts": rle_string([60, 70, -10])}, "negative"),
    "rle-size-not-a-list": ({"size": 120, "counts": rle_string([60, 60])}, "RLE size"),
    "rle-counts-not-text": ({"size": [HEIGHT, WIDTH], "counts": 120}, "counts"),
}


@pytest.fixture(scope="module")
def geometry_results(tmp_path_factory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("geometry")
    cases = {}
    for name, (segmentation, _) in GEOMETRY_CASES.items():
        (root / name).mkdir()
        cases[name] = write_coco(root / name, segmentation)
    return load_in_subprocess(cases, root)


@pytest.mark.parametrize("name", list(GEOMETRY_CASES))
def test_coco_geometry_is_checked_before_native_code(geometry_results, name):
    problem = GEOMETRY_CASES[name][1]
    result = geometry_results[name]
    assert not result["ok"], f"{name} was decoded: {result}"
    message = result["message"]
    assert message.startswith("annotation 7:") and "one.png" in message, message
    assert problem in message and "fix: fix the annotation or drop it" in message, message
    assert "\n" not in message


def test_coco_valid_compressed_rle_still_decodes(tmp_path):
    counts = [HEIGHT * 2, HEIGHT * 3, HEIGHT * WIDTH - HEIGHT * 5]  # column-major: columns 2-4 set
    dataset = CocoDataset(*write_coco(tmp_path, {"size": [HEIGHT, WIDTH], "counts": rle_string(counts)}))
    expected = np.zeros((HEIGHT, WIDTH), dtype=bool)
    expected[:, 2:5] = True
    np.testing.assert_array_equal(dataset.masks(0)[0], expected)


def test_coco_polygon_slightly_outside_the_image_is_kept(tmp_path):
    dataset = CocoDataset(*write_coco(tmp_path, [[-2.0, -2.0, 14.0, -2.0, 14.0, 12.0, -2.0, 12.0]]))
    assert dataset.masks(0)[0].all()


@pytest.mark.parametrize(
    ("height", "width", "problem"),
    [(10**9, 10**9, "pixels"), (-5, WIDTH, "positive integers"), ("10", WIDTH, "positive integers"),
     (0, WIDTH, "positive integers"), (10.5, WIDTH, "positive integers")],
)
def test_coco_image_sizes_are_checked(tmp_path, height, width, problem):
    images = [{"id": 1, "file_name": "one.png", "height": height, "width": width}]
    with pytest.raises(DataError, match=f"image id 1.*{problem}") as error:
        CocoDataset(*write_coco(tmp_path, images=images)).masks(0)
    assert "fix the entry" in error.value.fix


# --------------------------------------------------------------------------- class 2: paths from data files

PATH_CASES = {
    "absolute": "/etc/passwd",
    "parent": "../secret.png",
    "parent-inside": "sub/../../secret.png",
    "windows-parent": "..\\secret.png",
    "windows-drive": "C:\\secret.png",
    "empty": "",
    "nul": "one.png\x00.txt",
}


@pytest.mark.parametrize("name", list(PATH_CASES))
def test_coco_file_name_stays_inside_the_images_folder(tmp_path, name):
    images = [{"id": 1, "file_name": PATH_CASES[name], "height": HEIGHT, "width": WIDTH}]
    paths = write_coco(tmp_path, images=images)
    (tmp_path / "secret.png").write_bytes((paths[1] / "one.png").read_bytes())
    with pytest.raises(DataError, match="image id 1.*file_name") as error:
        CocoDataset(*paths)
    assert "relative to the images folder" in error.value.fix


def test_coco_file_name_must_be_text(tmp_path):
    images = [{"id": 1, "file_name": 5, "height": HEIGHT, "width": WIDTH}]
    with pytest.raises(DataError, match="image id 1.*file_name"):
        CocoDataset(*write_coco(tmp_path, images=images))


def test_coco_nested_relative_file_name_is_fine(tmp_path):
    images = [{"id": 1, "file_name": "sub/one.png", "height": HEIGHT, "width": WIDTH}]
    paths = write_coco(tmp_path, images=images)
    (paths[1] / "sub").mkdir()
    (paths[1] / "one.png").rename(paths[1] / "sub" / "one.png")
    assert CocoDataset(*paths).image(0).shape == (HEIGHT, WIDTH, 3)


@pytest.mark.parametrize(
    ("section", "entries", "culprit"),
    [
        ("images", [{"id": 1, "file_name": "one.png", "height": HEIGHT, "width": WIDTH}] * 2, "images: id 1"),
        ("categories", [{"id": 1, "name": "dog"}, {"id": 1, "name": "cat"}], "categories: id 1"),
    ],
)
def test_coco_duplicate_ids_are_refused(tmp_path, section, entries, culprit):
    with pytest.raises(DataError, match=f"instances.json: {culprit}.*twice") as error:
        CocoDataset(*write_coco(tmp_path, **{section: entries}))
    assert "unique id" in error.value.fix


def test_coco_ids_must_be_integers(tmp_path):
    images = [{"id": "1", "file_name": "one.png", "height": HEIGHT, "width": WIDTH}]
    with pytest.raises(DataError, match=r"instances.json: images\[0\].*integer"):
        CocoDataset(*write_coco(tmp_path, images=images))


# --------------------------------------------------------------------------- class 3: decoding


def test_16bit_grayscale_png_is_scaled_by_its_full_range(tmp_path):
    values = np.array([[0, 257, 40000], [65535, 128, 32896]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    image = read_image(tmp_path / "g16.png")
    expected = np.rint(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, axis=2))


def test_16bit_tiff_is_scaled_by_its_full_range(tmp_path):
    values = np.array([[0, 65535], [1000, 50000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "g16.tif")[..., 0], np.rint(values / 257.0).astype(np.uint8))


def test_float_image_in_unit_range_is_scaled(tmp_path):
    values = np.array([[0.0, 0.25], [1.0, 0.5]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif")[..., 1], [[0, 64], [255, 128]])


@pytest.mark.parametrize(
    ("values", "problem"),
    [(np.array([[0.0, 200.0]], dtype=np.float32), "outside [0, 1]"),
     (np.array([[0.0, np.nan]], dtype=np.float32), "NaN"),
     (np.array([[-0.5, 0.5]], dtype=np.float32), "outside [0, 1]")],
)
def test_float_image_outside_unit_range_is_refused(tmp_path, values, problem):
    Image.fromarray(values).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=f"f.tif.*{re.escape(problem)}") as error:
        read_image(tmp_path / "f.tif")
    assert "8-bit" in error.value.fix


def test_32bit_integer_image_is_refused(tmp_path):
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(DataError, match=r"i32.tif.*32-bit integer") as error:
        read_image(tmp_path / "i32.tif")
    assert "8-bit or 16-bit" in error.value.fix


RGB = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        chunks.append((data[position + 4:position + 8], data[position + 8:position + 8 + length]))
        position += 12 + length
    return chunks


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def _exif_bytes(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def png_with_late_exif(path: Path, array: np.ndarray = RGB) -> Path:
    """A PNG whose eXIf chunk (orientation 6) comes after the pixel data."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    chunks = _png_chunks(buffer.getvalue())
    path.write_bytes(_png(chunks[:-1] + [(b"eXIf", _exif_bytes())] + chunks[-1:]))
    return path


def png_with_text(path: Path, key: str, text: str, late: bool = False) -> Path:
    """A PNG with a tEXt chunk ``key`` (before or after the pixel data)."""
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, format="PNG")
    chunks = _png_chunks(buffer.getvalue())
    chunk = (b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))
    chunks = chunks[:-1] + [chunk] + chunks[-1:] if late else chunks[:1] + [chunk] + chunks[1:]
    path.write_bytes(_png(chunks))
    return path


def _raw_profile(exif: bytes) -> str:
    payload = b"Exif\x00\x00" + exif
    return f"\nexif\n{len(payload):8d}\n" + payload.hex() + "\n"


XMP = '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
ORIENTATION_CASES = {
    "png-late-exif": lambda p: png_with_late_exif(p / "o.png"),
    "png-raw-profile": lambda p: png_with_text(p / "o.png", "Raw profile type exif", _raw_profile(_exif_bytes())),
    "png-late-raw-profile": lambda p: png_with_text(p / "o.png", "Raw profile type exif", _raw_profile(_exif_bytes()), late=True),
    "png-xmp": lambda p: png_with_text(p / "o.png", "XML:com.adobe.xmp", XMP),
    "png-late-xmp": lambda p: png_with_text(p / "o.png", "XML:com.adobe.xmp", XMP, late=True),
}


@pytest.mark.parametrize("name", list(ORIENTATION_CASES))
def test_image_and_its_size_agree_wherever_the_orientation_sits(tmp_path, name):
    path = ORIENTATION_CASES[name](tmp_path)
    image = read_image(path)
    assert read_image_size(path) == image.shape[:2] == (5, 4), name
    np.testing.assert_array_equal(image, np.rot90(RGB, k=-1))


def test_folder_masks_agree_with_a_late_exif_image(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks" / "spot").mkdir(parents=True)
    png_with_late_exif(tmp_path / "images" / "a.png")
    mask = np.zeros((5, 4), dtype=np.uint8)
    mask[0, 0] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "spot" / "a.png")
    dataset = FolderDataset(tmp_path)
    assert dataset.image(0).shape[:2] == dataset.masks(0).shape[1:] == dataset.image_size(0) == (5, 4)


def test_folder_refuses_a_mask_in_the_unrotated_frame(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks" / "spot").mkdir(parents=True)
    png_with_late_exif(tmp_path / "images" / "a.png")
    Image.fromarray(np.full((4, 5), 255, dtype=np.uint8)).save(tmp_path / "masks" / "spot" / "a.png")
    with pytest.raises(DataError, match=r"spot.a.png.*4x5.*5x4"):
        FolderDataset(tmp_path)


def test_mask_with_orientation_is_read_as_displayed(tmp_path):
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[0, :2] = 255
    png_with_late_exif(tmp_path / "m.png", mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", expected_size=(5, 4)), np.rot90(mask > 0, k=-1))


# --------------------------------------------------------------------------- class 4: huge images


def huge_png(path: Path, width: int, height: int, valid: bool = True) -> Path:
    """A grayscale PNG of ``width`` x ``height`` zeros, compressed row by row (no big array)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    if valid:
        compressor, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []
        for _ in range(height):
            parts.append(compressor.compress(row))
        data = b"".join(parts) + compressor.flush()
    else:
        data = zlib.compress(b"\0" * 1000)
    path.write_bytes(_png([(b"IHDR", header), (b"IDAT", data), (b"IEND", b"")]))
    return path


@pytest.fixture(scope="module")
def png_12000(tmp_path_factory) -> Path:
    return huge_png(tmp_path_factory.mktemp("huge") / "big.png", 12000, 12000)


@pytest.mark.parametrize("reader", [read_image, read_image_size, read_mask])
def test_huge_image_is_refused_from_its_header(png_12000, reader):
    with pytest.raises(DataError, match=r"big.png.*12000x12000.*too large") as error:
        reader(png_12000)
    assert "CONCEPTLENS_MAX_IMAGE_PIXELS" in error.value.fix and "downscale" in error.value.fix


def test_decompression_bomb_header_is_refused_as_too_large(tmp_path):
    path = huge_png(tmp_path / "bomb.png", 100000, 100000, valid=False)
    for reader in (read_image, read_image_size):
        with pytest.raises(DataError, match=r"bomb.png: image has 10000000000 pixels: too large"):
            reader(path)


def test_folder_dataset_refuses_a_huge_image_at_construction(tmp_path, png_12000):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks" / "x").mkdir(parents=True)
    (tmp_path / "images" / "big.png").symlink_to(png_12000)
    with pytest.raises(DataError, match="big.png.*too large"):
        FolderDataset(tmp_path)


def test_pixel_limit_can_be_raised(tmp_path, monkeypatch):
    path = huge_png(tmp_path / "mid.png", 300, 200)
    monkeypatch.setenv("CONCEPTLENS_MAX_IMAGE_PIXELS", "50000")
    with pytest.raises(DataError, match=r"mid.png.*200x300.*too large.*50000"):
        read_image(path)
    monkeypatch.setenv("CONCEPTLENS_MAX_IMAGE_PIXELS", "60000")
    assert read_image(path).shape == (200, 300, 3)


# --------------------------------------------------------------------------- class 5: extreme aspect ratios


def _tiny_detector():
    import torch
    from torch import nn
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transform = GeneralizedRCNNTransform(64, 128, [0.5] * 3, [0.25] * 3)
            self.conv = nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, images):
            batch, _ = self.transform(images)
            return self.conv(batch.tensors)

    torch.manual_seed(0)
    return Tiny()


@pytest.mark.parametrize("size", [(3, 5000), (5000, 2)])
def test_detector_refuses_a_strip_it_would_resize_to_nothing(tmp_path, size):
    from conceptlens.concepts.data.dataset import ArrayDataset
    from conceptlens.concepts.embedding.embed import embed
    from conceptlens.concepts.models.loading import load_model

    model = load_model(_tiny_detector())
    images = [np.zeros((20, 24, 3), dtype=np.uint8), np.zeros((*size, 3), dtype=np.uint8)]
    dataset = ArrayDataset(images, ids=["fine", "strip"], name="strips")
    height, width = size
    with pytest.raises(DataError, match=rf"strips: strip.*{height}x{width}.*0") as error:
        embed(model, dataset, ["conv"], tmp_path / "store")
    assert "aspect ratio" in error.value.fix


def test_detector_adapter_names_the_size_when_called_directly():
    import torch
    from conceptlens.concepts.models.adapters import default_adapter

    module = _tiny_detector().eval()
    adapter = default_adapter(module)
    with pytest.raises(DataError, match=r"3x5000"):
        adapter.forward(module, adapter.prepare([np.zeros((3, 5000, 3), dtype=np.uint8)], torch.device("cpu")), [(3, 5000)])
