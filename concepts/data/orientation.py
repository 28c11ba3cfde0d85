"""The EXIF orientation of an image file, read from its header alone, and applying it.

One reading serves both :func:`conceptlens.concepts.data.imageio.read_image` (which applies it)
and :func:`conceptlens.concepts.data.imageio.read_image_size` (which reports the oriented size),
so an image, its size and its masks always agree. Sources, as Pillow reads them: the EXIF block
(JPEG APP1, WebP ``EXIF``, PNG ``eXIf``), ImageMagick's ``Raw profile type exif`` text and the
XMP ``tiff:Orientation`` attribute. In a PNG these chunks may sit before or after the pixel data;
the chunk list is walked (without decoding pixels) so that both places count. TIFF files are
oriented by Pillow itself while opening, and report orientation 1 here.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from PIL import Image

__all__ = ["apply_orientation", "exif_orientation"]

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_KEYS = {"Raw profile type exif", "XML:com.adobe.xmp"}
_MAX_CHUNK = 16 * 2**20  # metadata chunks larger than this are not read
_MAX_CHUNKS = 1_000_000


def exif_orientation(path: Path, image: Image.Image) -> int:
    """Return the EXIF orientation (1-8; 1 when absent or invalid) of an opened image.

    Parameters
    ----------
    path : Path
        The image file (walked again for PNG metadata after the pixel data).
    image : PIL.Image.Image
        The image opened from ``path``, not yet decoded.

    Returns
    -------
    int
        The orientation; 1 means "as stored".
    """
    if image.format == "TIFF":
        return 1  # Pillow orients TIFF while opening and already reports the oriented size
    try:
        if image.format == "PNG":
            probe = Image.new("1", (1, 1))
            probe.info = _png_metadata(Path(path))
            value = probe.getexif().get(_ORIENTATION_TAG, 1)
        else:
            value = image.getexif().get(_ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, TypeError, struct.error, zlib.error):
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def apply_orientation(image: Image.Image, value: int) -> Image.Image:
    """Return a copy of the decoded ``image`` turned as orientation ``value`` prescribes."""
    method = _TRANSPOSE.get(value)
    return image.transpose(method) if method is not None else image.copy()


def _png_metadata(path: Path) -> dict[str, object]:
    """Return the orientation-bearing metadata of a PNG, from every chunk before or after the pixels."""
    info: dict[str, object] = {}
    with open(path, "rb") as stream:
        if stream.read(8) != _PNG_SIGNATURE:
            return info
        for _ in range(_MAX_CHUNKS):
            head = stream.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I", head[:4])[0], head[4:]
            if kind == b"IEND":
                break
            if kind in (b"eXIf", b"tEXt", b"zTXt", b"iTXt") and length <= _MAX_CHUNK:
                _read_chunk(kind, stream.read(length), info)
                stream.seek(4, 1)
            else:
                stream.seek(length + 4, 1)
    return info


def _read_chunk(kind: bytes, data: bytes, info: dict[str, object]) -> None:
    """Store an ``eXIf`` chunk, or a text chunk with an orientation-bearing key, in ``info``."""
    if kind == b"eXIf":
        info.setdefault("exif", data)
        return
    key, _, rest = data.partition(b"\0")
    name = key.decode("latin-1")
    if name not in _TEXT_KEYS or name in info:
        return
    if kind == b"tEXt":
        info[name] = rest.decode("latin-1")
    elif kind == b"zTXt":
        info[name] = _inflate(rest[1:]).decode("latin-1")
    else:
        compressed, text = rest[:1] == b"\1", rest[2:].split(b"\0", 2)[-1]
        info[name] = (_inflate(text) if compressed else text).decode("utf-8", "replace")


def _inflate(data: bytes) -> bytes:
    """Decompress zlib ``data``, at most :data:`_MAX_CHUNK` bytes of output."""
    return zlib.decompressobj().decompress(data, _MAX_CHUNK)
