"""One slice in HU -> the windowed, cropped, masked image that goes into a record.

:func:`prepare_slice` is the single preprocessing function: data_prep calls it for every
sampled slice, and predict will call it for a new study, so training and serving see the
same pixels. Steps (paper section 2.2; numbers in ``PrepConfig``):

1. lung mask (:mod:`data_prep.lung`) and its fraction of the body cross-section; slices
   with too little lung are dropped (``low_lung_fraction``), as are all-air slices (when the
   lung filter is on) and constant slices (always);
2. crop to the lung box (plus a margin), padded to a square so the aspect ratio is kept;
3. window in HU (one channel per window) and zero everything outside the lung; with
   ``fill_blank="rotate"`` (the default) fill that blank with rotated copies of the lung
   region in EVERY split, deterministically per slice (the paper: the model must not learn
   the lungs' outline). ``"rotate_train"`` is the paper's train-only fill: train and
   val/test are then different image distributions (demo records: 5 % zero pixels in
   train, 77 % in val, lesions 4x denser in train), which costs accuracy;
4. resize to ``image_size`` (area interpolation when shrinking, linear when enlarging).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from covid_keras.core.imaging import unit_to_u8, window_hu
from data_prep.lung import LungMaskParams, lung_and_body_masks
from data_prep.settings import DEFAULTS, PrepSettings

# none: zeros outside the lung; rotate: rotated-lung fill in every split (deterministic per
# slice); rotate_train: the paper's train-only fill (train and val/test then differ).
FILL_MODES = ("rotate", "none", "rotate_train")

SAMPLING_MODES = ("paper", "middle50")


def sample_indices(n: int, num: int = DEFAULTS.num_slices, mode: str = DEFAULTS.sampling
                   ) -> list[int]:
    """Which of ``n`` ordered slices to use.

    ``paper``: indices ``i * n // num`` for i = 0..num-1 (all slices when n <= num).
    ``middle50``: the authors' code: about ``num`` evenly spaced slices from the middle
    50 % of the stack (indices n/4 .. 3n/4).
    """
    if n <= 0:
        return []
    if mode == "paper":
        if n <= num:
            return list(range(n))
        return [i * n // num for i in range(num)]
    if mode == "middle50":
        lo, hi = n // 4, max(n // 4 + 1, (3 * n) // 4)
        span = hi - lo
        if span <= num:
            return list(range(lo, hi))
        return [lo + i * span // num for i in range(num)]
    raise ValueError(f"Sampling mode must be one of {SAMPLING_MODES}. Received: {mode!r}")


@dataclass(frozen=True)
class PrepConfig:
    """How one slice is prepared; the defaults (and what each means) are
    :class:`data_prep.settings.PrepSettings`'s, the one home of data_prep's settings."""

    image_size: int = DEFAULTS.image_size
    windows: tuple[tuple[str, float, float], ...] = DEFAULTS.windows
    lung_filter: bool = DEFAULTS.lung_filter
    # Lung area / body area below which a slice is dropped. Real data (../shared/data): the
    # ten axial lung slices of COVID-19-NY-SBU and the three dcmqi lower-thorax slices have
    # 0.157-0.269 (severe ground glass included); the abdomen-only slices of A027284 and
    # A058062 have 0.0. 0.05 keeps lung bases and apices with a useful amount of lung (the
    # authors' trainer used 4.1 % of the image, about 7 % of a typical body) and drops
    # slices with only a sliver of lung. (The paper's "50 % of the image" cannot be a
    # fraction of the whole image: no real slice has that much lung.)
    min_lung_fraction: float = DEFAULTS.min_lung_fraction
    crop_to_lung: bool = DEFAULTS.crop_to_lung
    crop_margin: float = DEFAULTS.crop_margin
    fill_blank: str = DEFAULTS.fill_blank  # one of FILL_MODES
    lung: LungMaskParams = field(default_factory=LungMaskParams)

    @classmethod
    def from_settings(cls, s: PrepSettings) -> PrepConfig:
        """The slice preparation of :class:`~data_prep.settings.PrepSettings` ``s``."""
        return cls(image_size=s.image_size, windows=s.windows, lung_filter=s.lung_filter,
                   min_lung_fraction=s.min_lung_fraction, crop_to_lung=s.crop_to_lung,
                   crop_margin=s.crop_margin, fill_blank=s.fill_blank, lung=s.lung)

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16. Received: {self.image_size}")
        if self.fill_blank not in FILL_MODES:
            raise ValueError(f"fill_blank must be one of {FILL_MODES}. Received: "
                             f"{self.fill_blank!r}")
        if len(self.windows) not in (1, 3):
            raise ValueError("PNG holds 1 or 3 channels: give 1 or 3 windows. Received: "
                             f"{[w[0] for w in self.windows]}")
        if not 0.0 <= self.min_lung_fraction < 1.0:
            raise ValueError(f"min_lung_fraction must be in [0, 1). Received: "
                             f"{self.min_lung_fraction}")


@dataclass
class PreparedSlice:
    image: np.ndarray  # uint8 (S, S, C)
    mask: np.ndarray  # uint8 (S, S), 255 = lung
    lung_fraction: float


def prepare_slice(hu: np.ndarray, cfg: PrepConfig, *, pixel_spacing_mm: float | None = None,
                  is_train: bool = False, rng: np.random.Generator | None = None
                  ) -> PreparedSlice | str:
    """Returns the prepared slice, or the reason code it was dropped for."""
    hu = np.asarray(hu, dtype=np.float32)
    if float(hu.max()) == float(hu.min()):
        return "constant_image"
    mask, body = lung_and_body_masks(hu, pixel_spacing_mm, cfg.lung)
    body_area = int(body.sum())
    if cfg.lung_filter and body_area < 0.01 * hu.size:
        return "all_air"
    fraction = float(mask.sum()) / max(body_area, 1)
    has_lung = fraction >= cfg.min_lung_fraction and mask.any()
    if cfg.lung_filter and not has_lung:
        return "low_lung_fraction"
    use_mask = has_lung and cfg.crop_to_lung
    y0, x0, y1, x1 = _square_box(mask if use_mask else np.ones_like(mask), cfg.crop_margin)
    hu_crop = _crop_pad(hu, (y0, x0, y1, x1), fill=-1024.0)
    mask_crop = _crop_pad(mask.astype(np.uint8), (y0, x0, y1, x1), fill=0).astype(bool)
    channels = np.stack([window_hu(hu_crop, level, width) for _, level, width in cfg.windows],
                        axis=-1)
    filled = False
    if use_mask:
        channels *= mask_crop[..., None]
        if cfg.fill_blank == "rotate" or (is_train and cfg.fill_blank == "rotate_train"):
            filled = True
            channels = fill_blank_with_rotated_lung(
                channels, mask_crop, rng if rng is not None else np.random.default_rng(0))
    size = (cfg.image_size, cfg.image_size)
    interp = cv2.INTER_AREA if channels.shape[0] > cfg.image_size else cv2.INTER_LINEAR
    image = cv2.resize(channels, size, interpolation=interp)
    if image.ndim == 2:
        image = image[..., None]
    mask_out = cv2.resize(mask_crop.astype(np.uint8) * 255, size,
                          interpolation=cv2.INTER_NEAREST)
    if use_mask and not filled:  # resizing blurs the lung edge outward: re-zero exactly
        image[mask_out == 0] = 0.0
    return PreparedSlice(unit_to_u8(image), mask_out, fraction)


def _square_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """Square box (y0, x0, y1, x1), end exclusive, around the mask plus a margin; it may
    extend past the image (the crop pads)."""
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(y1 - y0, x1 - x0)
    side = int(np.ceil(side * (1.0 + 2.0 * margin)))
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    top, left = int(np.floor(cy - side / 2.0)), int(np.floor(cx - side / 2.0))
    return top, left, top + side, left + side


def _crop_pad(img: np.ndarray, box: tuple[int, int, int, int], fill: float) -> np.ndarray:
    y0, x0, y1, x1 = box
    h, w = img.shape[:2]
    out = np.full((y1 - y0, x1 - x0) + img.shape[2:], fill, dtype=img.dtype)
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


def fill_blank_with_rotated_lung(channels: np.ndarray, mask: np.ndarray,
                                 rng: np.random.Generator, max_copies: int = 24
                                 ) -> np.ndarray:
    """Fills pixels outside ``mask`` with rotated copies of the lung region (the paper's
    training-time fill). The first copy is the 180-degree rotation about the crop's centre;
    the next ones have random angles and random shifts of up to 30 % of the crop (rotations
    about the centre alone never reach the corners or the mediastinum). It stops when under
    1 % of the crop is blank. Lung pixels never change."""
    h, w = mask.shape
    out = channels.copy()
    filled = mask.copy()
    lung_only = channels * mask[..., None]
    centre = (w / 2.0 - 0.5, h / 2.0 - 0.5)
    angles = [180.0] + list(rng.uniform(0.0, 360.0, size=max_copies - 1))
    shifts = [(0.0, 0.0)] + list(rng.uniform(-0.3, 0.3, size=(max_copies - 1, 2)))
    for angle, (dx, dy) in zip(angles, shifts):
        if (~filled).mean() < 0.01:
            break
        rot = cv2.getRotationMatrix2D(centre, float(angle), 1.0)
        rot[:, 2] += (dx * w, dy * h)
        rot_mask = cv2.warpAffine(mask.astype(np.uint8), rot, (w, h), flags=cv2.INTER_NEAREST,
                                  borderValue=0).astype(bool)
        rot_img = cv2.warpAffine(lung_only, rot, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
        if rot_img.ndim == 2:
            rot_img = rot_img[..., None]
        take = rot_mask & ~filled
        out[take] = rot_img[take]
        filled |= take
    return out
