"""PNG / JPEG slice images (public datasets, the authors' demo): one grey representation.

Files are recognised by their bytes, never by their name (COVID-CT has JPEG data behind
``.png`` names). Whatever the source - 8-bit grey, RGB, RGBA, 16-bit, JPEG or PNG - the
result is one 2-D uint8 grey array, so nothing downstream (and nothing in the records) can
tell the source format apart. Such images are already windowed by their publisher and have
no HU; :func:`covid_keras.imaging.grey_to_hu` maps them to pseudo-HU.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from data_prep.errors import Issue, StudyError

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


def read_grey(path: str, study: str) -> tuple[np.ndarray, list[Issue]]:
    """Decodes a PNG/JPEG slice to a 2-D uint8 grey array. Raises StudyError."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise StudyError("image_decode_error", f"cannot read: {exc}", path)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise StudyError("image_decode_error", "OpenCV cannot decode the image (truncated?)",
                         path)
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
