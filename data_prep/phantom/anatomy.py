"""The phantom's anatomy and lesion plans: what is where, by kind and seed (see the
package docstring); the small helpers the other modules share."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import cv2
import numpy as np
from pydicom.uid import (
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

KINDS: tuple[str, ...] = ("normal", "covid", "bacterial", "viral", "tuberculosis")

# Fractions of the stack (t = 0 at the top slice, 1 at the bottom slice).
NECK_END = 0.15
THORAX_END = 0.80

HU_AIR = -1000.0
HU_MIN, HU_MAX = -1024.0, 3071.0

_UID_TAG = "covid_keras.phantom"

_SHIFT = 4  # cv2 fixed-point bits: sub-pixel centres and axes
_ONE = 1 << _SHIFT


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def _smoothstep(x: float, a: float, b: float) -> float:
    v = min(max((x - a) / (b - a), 0.0), 1.0)
    return v * v * (3.0 - 2.0 * v)


def _lerp(a: float, b: float, w: float) -> float:
    return a + (b - a) * w


def _hash_int(*parts: object) -> int:
    """A stable (unsalted, unlike hash()) integer from the parts."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _uid(*parts: object) -> str:
    """Deterministic UID under pydicom's root (entropy_srcs only works with a prefix)."""
    return str(generate_uid(entropy_srcs=[_UID_TAG, *(str(p) for p in parts)]))


def _ds(value: float) -> str:
    """A valid DICOM decimal string (<= 16 chars), never '-0'."""
    value = float(value) + 0.0
    if value == 0.0:
        return "0"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format_number_as_ds(value)


def _derive_seed(*parts: object) -> int:
    return _hash_int("seed", *parts) % (2**31 - 1)


def _ellipse(img: np.ndarray, cx: float, cy: float, ax: float, ay: float, value: float,
             angle: float = 0.0, thickness: int = -1, start: float = 0.0,
             end: float = 360.0) -> None:
    """Draws an ellipse (pixel units, sub-pixel precise) into img in place."""
    if ax <= 0.0 or ay <= 0.0:
        return
    cv2.ellipse(img, (int(round(cx * _ONE)), int(round(cy * _ONE))),
                (int(round(ax * _ONE)), int(round(ay * _ONE))), float(angle), float(start),
                float(end), float(value), int(thickness), cv2.LINE_8, _SHIFT)


def _ellipse_mask(shape: tuple[int, int], cx: float, cy: float, ax: float, ay: float,
                  angle: float = 0.0) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    _ellipse(m, cx, cy, ax, ay, 1, angle)
    return m.view(bool)


# --------------------------------------------------------------------------------------------
# Anatomy and lesion plans
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """Per-seed anatomical variation (fractions of the matrix)."""

    body_w: float
    body_h: float
    fat: float
    lung_k: float
    lung_hu: float
    soft_hu: float
    rib_phase: float
    rib_count: int


def _plan_anatomy(rng: np.random.Generator) -> _Anatomy:
    return _Anatomy(
        body_w=float(rng.uniform(0.40, 0.44)),
        body_h=float(rng.uniform(0.285, 0.315)),
        fat=float(rng.uniform(0.024, 0.038)),
        lung_k=float(rng.uniform(0.93, 1.04)),
        lung_hu=float(rng.uniform(-860.0, -840.0)),
        soft_hu=float(rng.uniform(30.0, 40.0)),
        rib_phase=float(rng.uniform(0.0, 360.0)),
        rib_count=int(rng.integers(11, 15)),
    )


@dataclass(frozen=True)
class _Blob:
    """An ellipsoidal lesion in lung-normalised coordinates.

    (xn, yn): centre, in units of the lung's half axes (-1..1, origin = lung centre);
    rx, ry: half axes in the same units; uc, ur: centre and half extent along the thoracic
    axis u (0 = apex, 1 = base). cavity: an air-filled centre inside a wall of ``hu``.
    """

    side: int  # 0 = image left (patient right), 1 = image right (patient left)
    xn: float
    yn: float
    rx: float
    ry: float
    angle: float
    uc: float
    ur: float
    hu: float
    cavity: bool = False


@dataclass(frozen=True)
class _Lobar:
    """Lobar consolidation: a lobe-shaped region of one lung (``lobe``: lower/upper/whole)."""

    side: int
    lobe: str
    extent: float
    hu: float
    phase: float



def _lung_side_sign(side: int) -> float:
    return -1.0 if side == 0 else 1.0


def _plan_lesions(kind: str, seed: int, dense: bool) -> list[_Blob | _Lobar]:
    rng = np.random.default_rng([seed, 1, KINDS.index(kind)])
    out: list[_Blob | _Lobar] = []
    affected_side: int | None = None
    if kind == "covid":
        for side in (0, 1):
            medial = -_lung_side_sign(side)  # direction (in xn) towards the mediastinum
            for _ in range(int(rng.integers(3, 7))):
                theta = float(rng.uniform(0.0, 2.0 * math.pi))
                if math.cos(theta) * medial > 0.35:  # keep away from the mediastinal side
                    theta = math.pi - theta
                rho = float(rng.uniform(0.72, 0.98))
                out.append(_Blob(
                    side, rho * math.cos(theta), rho * math.sin(theta),
                    float(rng.uniform(0.25, 0.45)), float(rng.uniform(0.2, 0.35)),
                    math.degrees(theta) + 90.0, float(rng.uniform(0.05, 0.95)),
                    float(rng.uniform(0.15, 0.3)), float(rng.uniform(-570.0, -340.0))))
    elif kind == "viral":
        for side in (0, 1):
            medial = -_lung_side_sign(side)
            for _ in range(int(rng.integers(6, 12))):
                theta = float(rng.uniform(0.0, 2.0 * math.pi))
                rho = float(rng.uniform(0.0, 0.5))
                out.append(_Blob(
                    side, rho * math.cos(theta) + 0.22 * medial, rho * math.sin(theta),
                    float(rng.uniform(0.1, 0.22)), float(rng.uniform(0.1, 0.22)),
                    float(rng.uniform(0.0, 180.0)), float(rng.uniform(0.2, 0.9)),
                    float(rng.uniform(0.06, 0.16)), float(rng.uniform(-680.0, -470.0))))
    elif kind == "bacterial":
        affected_side = int(rng.integers(0, 2))
        bilateral = bool(rng.random() < 0.25)
        lobe = "lower" if rng.random() < 0.65 else "upper"
        out.append(_Lobar(affected_side, lobe, float(rng.uniform(0.9, 1.2)),
                          float(rng.uniform(12.0, 38.0)), float(rng.uniform(0.0, 6.3))))
        if bilateral:
            other = "upper" if rng.random() < 0.5 else "lower"
            out.append(_Lobar(1 - affected_side, other, float(rng.uniform(0.6, 0.8)),
                              float(rng.uniform(12.0, 38.0)), float(rng.uniform(0.0, 6.3))))
        # Multilobar on the affected side: the other lobe carries a smaller consolidation, so
        # every lung slice of the study shows disease (a lesion-free slice cannot carry its
        # study's label; with one lobe only, a third of the sampled slices had none).
        out.append(_Lobar(affected_side, "upper" if lobe == "lower" else "lower",
                          float(rng.uniform(0.6, 0.8)), float(rng.uniform(12.0, 38.0)),
                          float(rng.uniform(0.0, 6.3))))
    elif kind == "tuberculosis":
        main = int(rng.integers(0, 2))
        for _ in range(int(rng.integers(4, 10))):
            side = main if rng.random() < 0.8 else 1 - main
            theta = float(rng.uniform(0.0, 2.0 * math.pi))
            rho = float(rng.uniform(0.0, 0.75))
            r = float(rng.uniform(0.09, 0.16))
            out.append(_Blob(side, rho * math.cos(theta), rho * math.sin(theta) * 0.8 + 0.1,
                             r, r * float(rng.uniform(0.8, 1.2)), 0.0,
                             float(rng.uniform(0.08, 0.38)), float(rng.uniform(0.04, 0.08)),
                             float(rng.uniform(25.0, 55.0))))
        for i in range(int(rng.integers(1, 3))):
            side = main if i == 0 else int(rng.integers(0, 2))
            theta = float(rng.uniform(0.0, 2.0 * math.pi))
            rho = float(rng.uniform(0.0, 0.4))
            r = float(rng.uniform(0.24, 0.34))
            out.append(_Blob(side, rho * math.cos(theta), rho * math.sin(theta), r, r, 0.0,
                             float(rng.uniform(0.14, 0.3)), float(rng.uniform(0.07, 0.11)),
                             float(rng.uniform(28.0, 45.0)), cavity=True))
    if dense:
        drng = np.random.default_rng([seed, 5])
        side = affected_side if affected_side is not None else int(drng.integers(0, 2))
        out.append(_Lobar(side, "whole", 1.0, float(drng.uniform(15.0, 35.0)), 0.0))
    return out
