"""Reading images and binary masks, with errors that name the file and say how to fix it.

Images are returned as ``uint8`` RGB arrays (H, W, 3) with the EXIF orientation applied; masks as
``bool`` arrays (H, W). Truncated or corrupt files are never decoded silently: Pillow's
``LOAD_TRUNCATED_IMAGES`` is left off and every image is fully decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from conceptlens.concepts.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "list_image_files", "read_image", "read_image_size", "read_mask"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_REEXPORT = "re-export the file as a valid image, or remove it"


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


def _open(path: Path) -> Image.Image:
    """Open ``path`` lazily (header only), turning every failure into a DataError."""
    try:
        return Image.open(path)
    except FileNotFoundError as error:
        raise DataError(str(path), "file does not exist", "check the path, or remove the entry") from error
    except IsADirectoryError as error:
        raise DataError(str(path), "is a folder, not an image file", "move it out") from error
    except _DECODE_ERRORS as error:
        raise DataError(str(path), f"not a readable image ({error})", _REEXPORT) from error


def _decoded(path: Path, orient: bool = False) -> Image.Image:
    """Open and fully decode ``path`` so that truncated or corrupt files fail here.

    With ``orient``, the EXIF orientation is applied (while the file is open, so that formats
    keeping it outside ``info``, like TIFF, are handled too).
    """
    path = Path(path)
    with _open(path) as image:
        try:
            image.load()
        except _DECODE_ERRORS as error:
            raise DataError(str(path), f"image is truncated or corrupt ({error})", _REEXPORT) from error
        return ImageOps.exif_transpose(image) if orient else image.copy()


def read_image(path: Path, orient: bool = True) -> np.ndarray:
    """Read an image file as RGB, with its EXIF orientation applied.

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
        RGB (the alpha channel is dropped).

    Raises
    ------
    DataError
        If the file is missing, not an image, truncated or corrupt.
    """
    image = _decoded(Path(path), orient=orient)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _orientation(image: Image.Image) -> int:
    """Return the EXIF orientation of an opened image without decoding its pixels."""
    if image.format == "TIFF":
        return 1  # Pillow always orients TIFF on load and already reports the oriented size
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # Pillow's PNG getexif() would decode the whole image to look for a late eXIf chunk
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except _DECODE_ERRORS:
        return 1


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
        If the file is missing or not an image.
    """
    with _open(Path(path)) as image:
        width, height = image.size
        if orient and _orientation(image) in _TRANSPOSING_ORIENTATIONS:
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
    are taken as the values) holding only 0/1 or only 0/255.

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
    values = _mask_values(path, _decoded(path))
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
