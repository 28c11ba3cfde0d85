"""Checks of a COCO file's entries and geometry, done before anything reaches pycocotools.

pycocotools' native code trusts its input: a NaN or huge polygon coordinate crashes it or makes
it allocate tens of GB, and a compressed RLE whose runs do not cover the image decodes to
uninitialised (or overflowed) memory. Every value that native code would see is checked here
first: ids are unique (their types are checked by :data:`conceptlens.concepts.data.coco.COCO_ENTRIES`), image sizes are positive integers within the pixel bound,
``file_name`` is a relative path inside the images folder, polygon coordinates are finite numbers
within one image size of the image with a bounded outline, and RLE runs (list or compressed
string, decoded here in Python) are non-negative and sum to height x width.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from conceptlens.concepts.data.imageio import max_image_pixels
from conceptlens.concepts.errors import DataError

__all__ = ["check_ids", "check_image_entry", "segmentation_problem"]

DROP_FIX = "fix the annotation or drop it from the file"
OUTLINE_FACTOR = 64
"""A polygon's outline may be at most this many times the image's (height + width) long."""
_MAX_RUN_CHARS = 7  # a run below 2**32 needs at most 7 characters of 5 bits


def _is_integer(value: Any) -> bool:
    """Return whether ``value`` is a JSON integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_ids(data: dict[str, Any], path: Path) -> None:
    """Refuse an image or category id given twice (their types are checked by the file's schema first)."""
    for section in ("images", "categories"):
        seen: set[int] = set()
        for entry in data[section]:
            if entry["id"] in seen:
                raise DataError(f"{path}: {section}: id {entry['id']}", "is given twice", "give every entry a unique id")
            seen.add(entry["id"])


def _file_name_problem(name: Any) -> str | None:
    """Return why ``name`` is not a relative path inside the images folder, or None."""
    if not isinstance(name, str) or not name:
        return f"file_name must be a non-empty relative path, got {name!r}"
    if "\0" in name:
        return f"file_name {name!r} contains a NUL character"
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        return f"file_name {name!r} is an absolute path"
    if ".." in windows.parts:  # Windows parts split on both / and \
        return f"file_name {name!r} leaves the images folder (..)"
    return None


def check_image_entry(entry: dict[str, Any], path: Path) -> None:
    """Refuse an image entry without usable ``file_name``, ``height`` and ``width``."""
    where = f"image id {entry['id']}"
    missing = [key for key in ("file_name", "width", "height") if key not in entry]
    if missing:
        raise DataError(where, f"entry in {path.name} lacks {', '.join(missing)}", "fix the entry")
    problem = _file_name_problem(entry["file_name"])
    if problem:
        raise DataError(where, f"{problem} in {path.name}", "give file_name relative to the images folder, without '..'")
    height, width = entry["height"], entry["width"]
    if not (_is_integer(height) and _is_integer(width) and height > 0 and width > 0):
        raise DataError(where, f"height and width must be positive integers, got {height!r} and {width!r} in {path.name}", "fix the entry")
    if height * width > max_image_pixels():
        raise DataError(where, f"{height}x{width} (HxW) is {height * width} pixels, over the limit of {max_image_pixels()} in {path.name}", "fix the entry, or downscale the image and its annotations")


def segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
    """Return what is wrong with a segmentation for an image of that size, or None when usable."""
    if segmentation is None:
        return "has no 'segmentation'"
    if isinstance(segmentation, list):
        return _polygons_problem(segmentation, height, width)
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, height, width)
    return "segmentation is neither polygons nor RLE"


def _polygons_problem(polygons: list[Any], height: int, width: int) -> str | None:
    """Check polygons: flat lists of >= 3 finite (x, y) points near the image, bounded outline."""
    if not polygons or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in polygons):
        return "has an empty or degenerate polygon, fewer than 3 points"
    outline = 0.0
    for polygon in polygons:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon):
            return "has a polygon whose coordinates are not all numbers"
        if not all(math.isfinite(v) for v in polygon):
            return "has a polygon coordinate that is not finite (NaN or infinity)"
        xs, ys = polygon[0::2], polygon[1::2]
        if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
            return f"has a polygon point outside the image by more than its size ({width}x{height} WxH)"
        outline += sum(max(abs(xs[i] - xs[i - 1]), abs(ys[i] - ys[i - 1])) for i in range(len(xs)))
    if outline > OUTLINE_FACTOR * (height + width):
        return f"has a polygon outline {outline:.0f} px long, over {OUTLINE_FACTOR} x (height + width)"
    return None


def _rle_problem(rle: dict[str, Any], height: int, width: int) -> str | None:
    """Check an RLE: its size is the image's and its runs cover exactly height x width pixels."""
    if "counts" not in rle or "size" not in rle:
        return "RLE segmentation lacks 'counts' or 'size'"
    size = rle["size"]
    if not isinstance(size, list) or size != [height, width]:
        return f"RLE size {size!r} differs from the image size {[height, width]}"
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(_is_integer(c) and c >= 0 for c in counts) or sum(counts) != height * width:
            return "uncompressed RLE counts are not non-negative integers summing to height*width"
        return None
    if not isinstance(counts, str):
        return f"RLE counts must be a list of runs or a compressed string, got {type(counts).__name__}"
    runs = _decode_counts(counts)
    if isinstance(runs, str):
        return runs
    if sum(runs) != height * width:
        return f"compressed RLE runs cover {sum(runs)} of {height * width} pixels (height*width)"
    return None


def _decode_counts(text: str) -> list[int] | str:
    """Decode COCO's compressed RLE string (pycocotools' rleFrString) to runs, or say what is wrong."""
    runs: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                return "compressed RLE counts string ends inside a run"
            if shift >= 5 * _MAX_RUN_CHARS:
                return "compressed RLE counts string has a run longer than 7 characters"
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                return f"compressed RLE counts string has an invalid character {text[position]!r}"
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position, shift = position + 1, shift + 5
            if not more and code & 0x10:
                value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return f"compressed RLE counts string decodes to a negative run ({value})"
        runs.append(value)
    return runs
