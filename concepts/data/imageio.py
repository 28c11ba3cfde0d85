"""Reading images and binary masks, with errors that name the file and say how to fix it.

Images are returned as ``uint8`` RGB arrays (H, W, 3), masks as ``bool`` arrays (H, W), both as
displayed: with the EXIF orientation applied, wherever the container keeps it (see
:mod:`conceptlens.concepts.data.orientation`); :func:`read_image_size` reports the same size
from the header alone. Truncated or corrupt files are never decoded silently: Pillow's
``LOAD_TRUNCATED_IMAGES`` is left off and every image is fully decoded. High-bit-depth images are
scaled, never clipped: 16-bit integers by their full range (``v / 257``), 32-bit floats from
``[0, 1]``; 32-bit integers and floats outside ``[0, 1]`` are refused. Images over
:func:`max_image_pixels` pixels are refused from their header, before any pixel is decoded.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from conceptlens.concepts.data.orientation import apply_orientation, exif_orientation
from conceptlens.concepts.errors import DataError
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "is_image_file",
    "list_image_files",
    "max_image_pixels",
    "read_image",
    "read_image_size",
    "read_mask",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 64_000_000
"""Default bound on width x height of any image or mask read (8000 x 8000; 192 MB as RGB)."""
PIXELS_VARIABLE = "CONCEPTLENS_MAX_IMAGE_PIXELS"

_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_UNSIGNED_16 = {"I;16", "I;16B", "I;16L", "I;16N"}
_REEXPORT = "re-export the file as a valid image, or remove it"
_TO_8_BIT = "save it as an 8-bit image (or 16-bit integers, or 32-bit floats in [0, 1])"


def is_image_file(path: Path) -> bool:
    """Return whether ``path`` has an image extension (case-insensitive).

    Parameters
    ----------
    path : Path
        A file path; only its suffix is looked at.

    Returns
    -------
    bool
        True when the suffix is one of :data:`IMAGE_EXTENSIONS`.
    """
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_image_files(folder: Path, what: str = "this folder") -> list[Path]:
    """List the image files of ``folder`` (not recursive), sorted by name.

    Hidden entries (names starting with '.') are skipped. Anything else that is not an image file
    (another extension, a subfolder) is an error, so that data is never ignored silently.

    Parameters
    ----------
    folder : Path
        The folder to list.
    what : str
        How to call the folder in error messages.

    Returns
    -------
    list of Path
        The image files, sorted by file name.

    Raises
    ------
    DataError
        If the folder is missing or holds a non-image entry.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(str(folder), "folder does not exist", f"create {what} and put the images in it")
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            raise DataError(str(entry), f"subfolder inside {what}, which must hold image files only", "move it out")
        if not is_image_file(entry):
            raise DataError(
                str(entry),
                f"not an image file (allowed extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})",
                "convert it to an image format or move it out of the folder",
            )
        files.append(entry)
    return files


def max_image_pixels() -> int:
    """Return the largest width x height read: ``$CONCEPTLENS_MAX_IMAGE_PIXELS`` or :data:`MAX_IMAGE_PIXELS`.

    Returns
    -------
    int
        The bound, in pixels.

    Raises
    ------
    DataError
        If the environment variable is set to anything but a positive integer.
    """
    value = os.environ.get(PIXELS_VARIABLE)
    if value is None:
        return MAX_IMAGE_PIXELS
    if not value.strip().isdigit() or int(value) < 1:
        raise DataError(PIXELS_VARIABLE, f"must be a positive number of pixels, got {value!r}", f"set it to e.g. {MAX_IMAGE_PIXELS}, or unset it")
    return int(value)


def _too_large(path: Path, size: str, pixels: int, limit: int) -> DataError:
    """Return the error for an image over the pixel bound (``size`` says how big, in words)."""
    return DataError(
        str(path),
        f"{size}: too large to read (limit {limit} pixels)",
        f"downscale the image, or raise the limit with {PIXELS_VARIABLE}=<pixels> if memory allows",
    )


def _check_pixels(path: Path, image: Image.Image) -> None:
    """Refuse an opened image whose header size exceeds :func:`max_image_pixels`."""
    limit = max_image_pixels()
    width, height = image.size
    if width * height > limit:
        raise _too_large(path, f"image is {height}x{width} (HxW), {width * height} pixels", width * height, limit)


def _open(path: Path) -> Image.Image:
    """Open ``path`` lazily (header only) and check its size, turning every failure into a DataError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except FileNotFoundError as error:
        raise DataError(str(path), "file does not exist", "check the path, or remove the entry") from error
    except IsADirectoryError as error:
        raise DataError(str(path), "is a folder, not an image file", "move it out") from error
    except Image.DecompressionBombError as error:
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = int(found[1]) if found else 0
        raise _too_large(path, f"image has {pixels} pixels", pixels, max_image_pixels()) from error
    except _DECODE_ERRORS as error:
        raise DataError(str(path), f"not a readable image ({error})", _REEXPORT) from error
    try:
        _check_pixels(path, image)
    except DataError:
        image.close()
        raise
    return image


def _decoded(path: Path, oriented: bool = True) -> Image.Image:
    """Open and fully decode ``path`` so that truncated or corrupt files fail here.

    With ``oriented``, the orientation that :func:`read_image_size` reports is applied (read
    from the same metadata, so the two always agree).
    """
    path = Path(path)
    with _open(path) as image:
        turn = exif_orientation(path, image) if oriented else 1
        try:
            image.load()
        except _DECODE_ERRORS as error:
            raise DataError(str(path), f"image is truncated or corrupt ({error})", _REEXPORT) from error
        return apply_orientation(image, turn)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """Repeat a uint8 (H, W) array into (H, W, 3)."""
    return np.repeat(gray[..., None], 3, axis=2)


def _float_to_uint8(path: Path, values: np.ndarray) -> np.ndarray:
    """Scale a float image in [0, 1] to uint8; NaN/inf or values outside [0, 1] are refused."""
    if not np.isfinite(values).all():
        raise DataError(str(path), "32-bit float image holds NaN or infinite values", _TO_8_BIT)
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if low < 0.0 or high > 1.0:
        raise DataError(
            str(path),
            f"32-bit float image has values outside [0, 1] (from {low:g} to {high:g}), so its scale is unknown",
            f"divide it by its maximum, or {_TO_8_BIT}",
        )
    return np.rint(values * 255.0).astype(np.uint8)


def _to_rgb(path: Path, image: Image.Image) -> np.ndarray:
    """Convert a decoded image to uint8 RGB, scaling 16-bit and float images (never clipping)."""
    if image.mode in _UNSIGNED_16 or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image).astype(np.uint32)  # a PNG's mode I holds 16-bit samples
        return _gray_to_rgb(((values + 128) // 257).astype(np.uint8))
    if image.mode == "I":
        raise DataError(str(path), "image holds 32-bit integer samples, whose range is unknown", "save it as an 8-bit or 16-bit image")
    if image.mode == "F":
        return _gray_to_rgb(_float_to_uint8(path, np.asarray(image, dtype=np.float32)))
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except ValueError as error:
        raise DataError(str(path), f"image mode {image.mode} cannot be converted to RGB ({error})", _TO_8_BIT) from error


def read_image(path: Path, orient: bool = True) -> np.ndarray:
    """Read an image file as RGB, as displayed (its EXIF orientation applied).

    Parameters
    ----------
    path : Path
        The image file (any format Pillow reads).
    orient : bool
        Apply the EXIF orientation. Turn it off for annotation formats whose coordinates refer
        to the stored pixels (COCO, like pycocotools and torchvision, ignores EXIF). TIFF files
        are always oriented: Pillow does it while decoding them.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape (H, W, 3). Grayscale, palette and RGBA images are converted to
        RGB (the alpha channel is dropped); 16-bit images are scaled by their full range
        (``round(v / 257)``), 32-bit float images from ``[0, 1]`` (``round(v * 255)``).

    Raises
    ------
    DataError
        If the file is missing, not an image, truncated or corrupt, larger than
        :func:`max_image_pixels`, a 32-bit integer image, or a float image outside ``[0, 1]``.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "deep.png"
    >>> Image.fromarray(np.array([[0, 40000, 65535]], dtype=np.uint16)).save(path)
    >>> read_image(path)[0, :, 0].tolist()
    [0, 156, 255]
    """
    path = Path(path)
    return _to_rgb(path, _decoded(path, oriented=orient))


def read_image_size(path: Path, orient: bool = True) -> tuple[int, int]:
    """Read the (height, width) of an image from its header, as :func:`read_image` would return it.

    Parameters
    ----------
    path : Path
        The image file.
    orient : bool
        Account for the EXIF orientation, as :func:`read_image` does with the same flag.

    Returns
    -------
    tuple of int
        (height, width), swapped when the EXIF orientation transposes the image.

    Raises
    ------
    DataError
        If the file is missing, not an image, or larger than :func:`max_image_pixels`.
    """
    path = Path(path)
    with _open(path) as image:
        width, height = image.size
        if orient and exif_orientation(path, image) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    return height, width


def _mask_mode_error(path: Path, mode: str) -> DataError:
    """Return the error for a mask image whose mode is not 8-bit single-channel."""
    if mode in _SIXTEEN_BIT_MODES:
        return DataError(str(path), f"mask is a 16/32-bit image (mode {mode})", "save it as 8-bit grayscale with 0/255")
    return DataError(
        str(path),
        f"mask is not single-channel (mode {mode}); masks must be 8-bit grayscale",
        "save it as 8-bit grayscale (mode 'L') with values 0 and 255",
    )


def _mask_values(path: Path, image: Image.Image) -> np.ndarray:
    """Return the raw 8-bit values of a mask image (palette indices for mode 'P')."""
    if image.mode == "1":
        return np.asarray(image, dtype=np.uint8)
    if image.mode not in ("L", "P"):
        raise _mask_mode_error(path, image.mode)
    return np.asarray(image)


def _binarise(path: Path, values: np.ndarray) -> np.ndarray:
    """Turn 0/1 or 0/255 mask values into a bool array; anything else is an error."""
    found = np.unique(values)
    if set(found.tolist()) <= {0, 1} or set(found.tolist()) <= {0, 255}:
        return values > 0
    shown = ", ".join(str(v) for v in found[:10]) + (", ..." if found.size > 10 else "")
    raise DataError(
        str(path),
        f"mask values must be 0/1 or 0/255, found {shown}",
        "threshold the mask and save it losslessly (PNG) with values 0 and 255",
    )


def read_mask(
    path: Path, expected_size: tuple[int, int] | None = None, image: str | Path | None = None
) -> np.ndarray:
    """Read a binary mask PNG.

    Accepted: 8-bit single-channel images (Pillow modes '1', 'L' and 'P', whose palette indices
    are taken as the values) holding only 0/1 or only 0/255. Like images, masks are read as
    displayed (their own EXIF orientation applied, if any).

    Parameters
    ----------
    path : Path
        The mask file.
    expected_size : tuple of int, optional
        (height, width) the mask must have: the size of its image.
    image : str or Path, optional
        The image the mask belongs to, named in the size error.

    Returns
    -------
    numpy.ndarray
        ``bool`` array of shape (H, W).

    Raises
    ------
    DataError
        If the file is unreadable, not 8-bit single-channel, has other values, or the wrong size.
    """
    path = Path(path)
    values = _mask_values(path, _decoded(path, oriented=True))
    if expected_size is not None and tuple(values.shape) != tuple(expected_size):
        owner = f" of image {image}" if image is not None else ""
        raise DataError(
            str(path),
            f"mask is {values.shape[0]}x{values.shape[1]} (HxW) but the image size{owner} is "
            f"{expected_size[0]}x{expected_size[1]}",
            "save the mask at the image's resolution",
        )
    return _binarise(path, values)


def index_by_stem(files: list[Path], what: str) -> dict[str, Path]:
    """Map each file's id (its name without extension) to the file; two files with one id are an error."""
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise DataError(
                f"{by_stem[path.stem]}, {path}",
                f"two images of {what} have the same id {path.stem!r}",
                "rename one of them (the id is the file name without extension)",
            )
        by_stem[path.stem] = path
    return by_stem
