"""Lung mask in HU with OpenCV, robust to dense consolidation.

The authors' code thresholds at -600 HU, clears the border, keeps the two largest regions,
erodes, closes and fills holes. That loses any lung whose parenchyma is consolidated (0..+50
HU: it looks like soft tissue) and counts bowel gas as lung. Here:

1. body = largest connected region above ``body_threshold_hu`` with its holes filled
   (everything outside it - air, table - is never lung);
2. candidate air = inside the body and below ``air_threshold_hu``;
3. the air is closed with a disc of ``close_mm`` (fragments of one lung between ground glass
   and patchy consolidation join), then split into connected regions; small ones are
   dropped (``min_region_fraction`` of the body), and so is gas: regions whose air pixels
   have a median below ``gas_median_hu`` (bowel gas and the stomach bubble are ~-1000 HU,
   aerated lung -900..-750 HU because of its vessels and septa); the two largest are kept;
4. each kept region is hole-filled, which puts vessels, nodules, ground glass and
   consolidation inside it back into the lung;
5. when one side of the body has lung and the other has (almost) none - a lung full of
   consolidation or effusion - the present lung is mirrored across the body's midline and
   the mirror is kept where it is inside the body and not bone: the consolidated lung does
   not vanish, so the slice is not dropped and the crop box still holds both lungs.

All sizes are in mm when the pixel spacing is known, so the mask does not depend on the
matrix size; without spacing (slice images) a 0.7 mm pixel at 512 is assumed, scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from data_prep.limits import PIXEL_SPACING_RANGE_MM


@dataclass(frozen=True)
class LungMaskParams:
    body_threshold_hu: float = -500.0
    air_threshold_hu: float = -300.0
    gas_median_hu: float = -900.0
    min_region_fraction: float = 0.01
    close_mm: float = 8.0
    mirror_ratio: float = 0.25
    # Masks are computed on the slice shrunk to at most this many pixels a side (area
    # interpolation) and enlarged back smoothly. 512 (no shrinking of the usual matrix):
    # at 256, ground-glass lungs lose up to a fifth of their mask (COVID-19-NY-SBU A046441).
    work_size: int = 512


def _disc(radius_px: int) -> np.ndarray:
    r = max(1, int(radius_px))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fills regions of False not connected to the image border."""
    m = mask.astype(np.uint8)
    h, w = m.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = m
    flood = padded.copy()
    ff_mask = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(flood, ff_mask, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask.astype(bool) | holes


def largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    if n <= 1:
        return np.zeros(mask.shape, bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


def _spacing(shape: tuple[int, ...], pixel_spacing_mm: float | None) -> float:
    """The pixel size, or 0.7 mm at 512 pixels scaled to the image when unknown (that
    assumption is ours: any image size is accepted, a 2 x 2 one included). A given size that
    is implausible (NaN, <= 0, metres) would size the kernels absurdly: refused."""
    if pixel_spacing_mm is None:
        return 0.7 * 512.0 / max(shape)
    lo, hi = PIXEL_SPACING_RANGE_MM
    if not lo <= pixel_spacing_mm <= hi:
        raise ValueError(f"pixel_spacing_mm must be in [{lo}, {hi}] mm. Received: "
                         f"{pixel_spacing_mm}")
    return float(pixel_spacing_mm)


def body_mask(hu: np.ndarray, threshold_hu: float = -500.0,
              pixel_spacing_mm: float | None = None) -> np.ndarray:
    """The patient's body: largest region above ``threshold_hu``, holes filled."""
    return _body(hu, threshold_hu, _spacing(hu.shape, pixel_spacing_mm))


def _body(hu: np.ndarray, threshold_hu: float, spacing_mm: float) -> np.ndarray:
    body = largest_component(hu > threshold_hu)
    # Open by ~1.5 mm so the table (a thin bright line joined to the back) is cut off.
    radius = round(1.5 / spacing_mm)
    if radius >= 1:
        body = cv2.morphologyEx(body.astype(np.uint8), cv2.MORPH_OPEN, _disc(radius))
        body = largest_component(body.astype(bool))
    return fill_holes(body)


def lung_mask_hu(hu: np.ndarray, pixel_spacing_mm: float | None = None,
                 params: LungMaskParams = LungMaskParams()) -> np.ndarray:
    """Boolean lung mask of an axial HU slice (rows x columns)."""
    return lung_and_body_masks(hu, pixel_spacing_mm, params)[0]


def lung_and_body_masks(hu: np.ndarray, pixel_spacing_mm: float | None = None,
                        params: LungMaskParams = LungMaskParams()
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(lung, body) boolean masks of an axial HU slice, at the slice's size."""
    if hu.ndim != 2:
        raise ValueError(f"lung_mask_hu expects a 2-D slice. Received shape: {hu.shape}")
    hu = np.asarray(hu, dtype=np.float32)
    spacing = _spacing(hu.shape, pixel_spacing_mm)
    scale = params.work_size / max(hu.shape)
    if scale >= 1.0:
        return _masks(hu, spacing, params)
    small_shape = (max(1, round(hu.shape[1] * scale)), max(1, round(hu.shape[0] * scale)))
    small = cv2.resize(hu, small_shape, interpolation=cv2.INTER_AREA)
    lung, body = _masks(small, spacing / scale, params)
    size = (hu.shape[1], hu.shape[0])
    return tuple(cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) >= 0.5
                 for m in (lung, body))  # type: ignore[return-value]


def lung_fraction(hu: np.ndarray, pixel_spacing_mm: float | None = None,
                  params: LungMaskParams = LungMaskParams()) -> float:
    """Lung area / body area of an axial HU slice (0 when the body covers under 1 % of it),
    as :func:`data_prep.preprocess.prepare_slice` measures it."""
    lung, body = lung_and_body_masks(hu, pixel_spacing_mm, params)
    body_area = int(body.sum())
    if body_area < 0.01 * hu.size:
        return 0.0
    return float(lung.sum()) / body_area


def _masks(hu: np.ndarray, pixel_spacing_mm: float, params: LungMaskParams
           ) -> tuple[np.ndarray, np.ndarray]:
    # pixel_spacing_mm here is derived (checked, or assumed, then scaled by the shrinking):
    # it may leave the plausible range of a given spacing, and is used as it is.
    body = _body(hu, params.body_threshold_hu, pixel_spacing_mm)
    body_area = int(body.sum())
    if body_area == 0:
        return np.zeros(hu.shape, bool), body
    close = _disc(round(params.close_mm / pixel_spacing_mm))
    air = ((hu < params.air_threshold_hu) & body).astype(np.uint8)
    air = cv2.morphologyEx(air, cv2.MORPH_OPEN, _disc(1))
    raw_air = air.astype(bool)
    # Close before labelling: fragments of aerated lung separated by ground glass or patchy
    # consolidation join into one region per lung.
    air = cv2.morphologyEx(air, cv2.MORPH_CLOSE, close)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(air, connectivity=8)
    regions = []
    for i in range(1, n):
        area = int(stats[i, cv2.CC_STAT_AREA])
        if area < params.min_region_fraction * body_area:
            continue
        region = labels == i
        raw = hu[region & raw_air]  # empty when closing made the whole region
        if raw.size and float(np.median(raw)) < params.gas_median_hu:
            continue
        regions.append((area, i, region))
    regions.sort(key=lambda r: -r[0])
    lung = np.zeros(hu.shape, bool)
    for _, _, region in regions[:2]:
        lung |= fill_holes(region)
    lung &= body
    if lung.any():
        lung |= _mirror_missing_lung(lung, body, hu, params.mirror_ratio)
    return lung, body


def _mirror_missing_lung(lung: np.ndarray, body: np.ndarray, hu: np.ndarray,
                         ratio: float) -> np.ndarray:
    cols = np.nonzero(body.any(axis=0))[0]
    mid = (cols[0] + cols[-1]) / 2.0
    x = np.arange(lung.shape[1])
    left_area = int(lung[:, x < mid].sum())
    right_area = int(lung[:, x >= mid].sum())
    small, large = sorted((left_area, right_area))
    if large == 0 or small >= ratio * large:
        return np.zeros_like(lung)
    # Reflect columns about the midline: x' = 2*mid - x.
    src = np.clip(np.rint(2 * mid - x).astype(int), 0, lung.shape[1] - 1)
    mirrored = lung[:, src]
    return mirrored & body & (hu < 300.0)
