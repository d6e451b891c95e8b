"""PNG / JPEG slice images (public datasets, the authors' demo): one grey representation.

Files are recognised by their bytes, never by their name (COVID-CT has JPEG data behind
``.png`` names). Whatever the source - 8-bit grey, RGB, RGBA, 16-bit, JPEG or PNG - the
result is one 2-D uint8 grey array, so nothing downstream (and nothing in the records) can
tell the source format apart. Such images are already windowed by their publisher and have
no HU; :func:`covid_keras.core.imaging.grey_to_hu` maps them to pseudo-HU.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from data_prep import limits
from data_prep.errors import Issue, StudyError
from data_prep.limits import Limits

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def sniff(head: bytes) -> str | None:
    """'png', 'jpeg' or None from a file's first bytes."""
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def natural_key(path: str) -> list:
    """Sort key: '109054_9.0.jpg' before '109054_26.0.jpg'."""
    parts = re.split(r"(\d+(?:\.\d+)?)", Path(path).name)
    return [float(p) if i % 2 else p.lower() for i, p in enumerate(parts)] + [path]


HEADER_BYTES = 256 * 1024  # a JPEG frame header can follow EXIF / ICC segments


def header_size(data: bytes, path: str) -> tuple[int, int]:
    """(height, width) from a PNG / JPEG header. Raises StudyError(image_decode_error)."""
    size = limits.image_header_size(data[:HEADER_BYTES])
    if size is None:
        raise StudyError("image_decode_error", "no PNG/JPEG image header found", path)
    return size


def check_header(path: str, lim: Limits) -> tuple[int, int]:
    """Reads only the header: raises StudyError(image_too_large | image_decode_error | ...)
    before anything is decoded."""
    height, width = header_size(limits.read_bytes(path, lim, HEADER_BYTES), path)
    limits.check_pixels(height, width, lim, path)
    return height, width


def read_grey(path: str, study: str, lim: Limits | None = None
              ) -> tuple[np.ndarray, list[Issue]]:
    """Decodes a PNG/JPEG slice to a 2-D uint8 grey array, after checking its dimensions
    (from the header) against the pixel limit. Raises StudyError."""
    lim = lim or Limits()
    data = limits.read_bytes(path, lim)
    height, width = header_size(data, path)
    limits.check_pixels(height, width, lim, path)
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise StudyError("image_decode_error", "OpenCV cannot decode the image (truncated?)",
                         path)
    if img.shape[0] * img.shape[1] > lim.max_image_pixels:  # the header lied
        raise StudyError("image_too_large", f"decoded to {img.shape[0]} x {img.shape[1]}", path)
    return to_grey_u8(img, path, study)


def to_grey_u8(img: np.ndarray, path: str, study: str) -> tuple[np.ndarray, list[Issue]]:
    """Any OpenCV-decoded image (BGR order) -> 2-D uint8 grey, with warnings saying what
    was converted."""
    warnings: list[Issue] = []
    if img.dtype == np.uint16:
        warnings.append(Issue(study, path, "sixteen_bit_image", "rescaled by 1/257", "warning"))
        img = np.rint(img.astype(np.float32) / 257.0).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise StudyError("image_decode_error", f"unsupported pixel type {img.dtype}", path)
    if img.ndim == 3 and img.shape[2] == 4:
        warnings.append(Issue(study, path, "rgba_image", "alpha composited over black",
                              "warning"))
        alpha = img[..., 3:4].astype(np.float32) / 255.0
        img = np.rint(img[..., :3].astype(np.float32) * alpha).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 3:
        spread = img.max(axis=2).astype(np.int16) - img.min(axis=2)
        if int(spread.max()) > 8:  # grey saved as 3 channels (JPEG chroma noise allowed)
            warnings.append(Issue(study, path, "colour_image", "converted to grey (BT.601)",
                                  "warning"))
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim != 2:
        raise StudyError("image_decode_error", f"unsupported image shape {img.shape}", path)
    return np.ascontiguousarray(img), warnings
