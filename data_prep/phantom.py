"""Seeded synthetic chest CT phantom, written as real DICOM series.

    python -m data_prep.phantom --output_dir=runs/demo/studies --patients_per_kind=10

SYNTHETIC DATA -- NOT REAL PATIENTS. Every image this module produces is drawn from ellipses,
arcs and Gaussian noise by a seeded random generator. No voxel comes from a real scan or a
real person; names, ids, dates and UIDs are made up. The phantom exists so that tests,
benchmarks and ``make demo`` can exercise the DICOM -> TFRecord pipeline end to end without
any patient data. It is not a medical model: do not use it to judge diagnostic performance.

Anatomy (Hounsfield units, float32, shape ``(num_slices, matrix, matrix)``, axial slices from
head (index 0, superior) to feet; image left = patient right, image top = anterior):

* air outside the body -1000 HU; body ellipse of soft tissue (about 35 HU) inside a
  subcutaneous fat rim (about -100 HU); mild Gaussian noise everywhere inside the body.
* The stack runs neck -> thorax -> upper abdomen: the first 15 % of the slices are neck (small
  body, trachea as a central air circle, cervical spine, no lungs); the next 65 % are thorax
  (two kidney-shaped lungs at about -850 HU whose size follows a smooth bell over z: small at
  the apex and base, largest mid-stack; vessels as bright dots and curvy lines; mediastinum,
  heart and aorta at about +40 HU; spine, ribs and sternum at +400...+1000 HU); the last 20 %
  are upper abdomen (liver +55 HU on the image left, spleen, stomach, kidneys; no lung).
* Disease patterns inside the lungs, by ``kind`` (see :data:`KINDS`):

  - ``"covid"``: bilateral, peripheral (subpleural) ground-glass patches, -600...-300 HU.
  - ``"bacterial"``: lobar consolidation 0...+50 HU in one lobe and a smaller one in the other
    lobe of the same lung, so every lung slice shows disease (unilateral for about 75 % of
    seeds); on the lowest slices of a lower-lobe pneumonia it fills most of that lung.
  - ``"viral"``: diffuse bilateral patchy ground glass, central / peribronchovascular,
    -700...-450 HU.
  - ``"tuberculosis"``: upper-lobe dense nodules (+20...+60 HU) and 1-2 cavities (air with a
    soft-tissue wall) on the apical slices.
  - ``"normal"``: no lesions.

  ``dense_consolidation=True`` additionally fills one whole lung (all thoracic slices) with
  consolidation (0...+50 HU) -- for any kind; for ``"bacterial"`` it is the affected lung. A
  lung mask must not vanish on such a study.

Determinism: everything is drawn from :class:`numpy.random.Generator` streams seeded by
``seed``; the same arguments give bit-identical files (UIDs come from
``pydicom.uid.generate_uid(entropy_srcs=...)``, dates from hashes, never from the clock).
The anatomy, noise and vessel streams do not depend on ``kind``: ``make_volume_hu("normal",
seed=s)`` and ``make_volume_hu("covid", seed=s)`` differ only where lesions are, which tests
use to locate lesions.

DICOM: one CT Image Storage file per slice, Explicit VR Little Endian, with the attributes a
real scanner writes (patient / study / series / frame of reference / image plane / image
pixel / CT image modules). Pixel data is stored = round((HU - intercept) / slope): unsigned
with BitsStored 12 for the usual intercept -1024 (slope 1), signed 16-bit when the intercept
is above -1024 (e.g. 0, so negative HU are stored as negative values).

Command line (absl flags)::

    python -m data_prep.phantom --output_dir=/tmp/phantom --kinds=normal,covid,bacterial \\
        --patients_per_kind=4 --num_slices=40 --matrix=128 --seed=0 --layout=folders
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

__all__ = [
    "KINDS",
    "make_volume_hu",
    "write_series",
    "write_localizer",
    "write_study",
    "write_dataset",
]

KINDS: tuple[str, ...] = ("normal", "covid", "bacterial", "viral", "tuberculosis")

# Fractions of the stack (t = 0 at the top slice, 1 at the bottom slice).
NECK_END = 0.15
THORAX_END = 0.80

HU_AIR = -1000.0
HU_MIN, HU_MAX = -1024.0, 3071.0

INSTITUTION = "Phantom Hospital"
MANUFACTURER = "covid_keras phantom"
SYNTHETIC_NOTE = "SYNTHETIC PHANTOM - NOT A REAL PATIENT"
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


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass
class _Lung:
    side: int
    cx: float  # pixels
    cy: float
    ax: float
    ay: float
    mask: np.ndarray  # bool (matrix, matrix)


class _SliceRenderer:
    """Renders one axial slice at a time; holds the per-study plans and random streams."""

    def __init__(self, kind: str, num_slices: int, matrix: int, seed: int,
                 dense: bool) -> None:
        self.n = num_slices
        self.m = matrix
        self.shape = (matrix, matrix)
        self.anat = _plan_anatomy(np.random.default_rng([seed, 0]))
        self.lesions = _plan_lesions(kind, seed, dense)
        self.rng_detail = np.random.default_rng([seed, 3])  # vessels, ribs
        self.rng_noise = np.random.default_rng([seed, 2])
        rows = np.arange(matrix, dtype=np.float32)
        self.yy = rows[:, None]
        self.xx = rows[None, :]
        self.soft_sigma = max(0.8, 0.01 * matrix)  # ground-glass margins
        self.sharp_sigma = max(0.5, 0.003 * matrix)  # nodules, cavities, consolidation

    # fraction of the matrix -> pixel coordinate / length
    def p(self, f: float) -> float:
        return f * self.m - 0.5

    def L(self, f: float) -> float:  # noqa: N802 - "length", reads like the maths
        return f * self.m

    def render(self, k: int) -> np.ndarray:
        a = self.anat
        m = self.m
        t = k / (self.n - 1) if self.n > 1 else 0.5
        u = (t - NECK_END) / (THORAX_END - NECK_END)
        chest = _smoothstep(t, 0.08, 0.19)  # 0 = neck, 1 = chest
        belly = _smoothstep(t, THORAX_END, 1.0)
        bw = _lerp(0.15, a.body_w, chest) * (1.0 - 0.05 * belly)
        bh = _lerp(0.12, a.body_h, chest)
        bcx, bcy = 0.5, _lerp(0.5, 0.52, chest)
        fat = a.fat * _lerp(0.45, 1.0, chest)
        sw, sh = bw / 0.42, bh / 0.30  # size relative to the nominal chest

        hu = np.full(self.shape, HU_AIR, np.float32)
        sd = np.zeros(self.shape, np.float32)

        def paint(cx: float, cy: float, ax: float, ay: float, value: float, noise: float,
                  angle: float = 0.0) -> None:
            cxp, cyp, axp, ayp = self.p(cx), self.p(cy), self.L(ax), self.L(ay)
            _ellipse(hu, cxp, cyp, axp, ayp, value, angle)
            _ellipse(sd, cxp, cyp, axp, ayp, noise, angle)

        # Body: fat rim, then soft tissue.
        paint(bcx, bcy, bw, bh, -100.0, 12.0)
        paint(bcx, bcy, bw - fat, bh - fat, a.soft_hu, 8.0)

        # Spine geometry (drawn last, but needed for lung exclusion); smaller in the neck.
        ksp = _lerp(0.6, 1.0, chest)
        vb_r = 0.038 * ksp
        vb_y = bcy + bh * _lerp(0.25, 0.6, chest)

        # Mediastinum, heart, great vessels (thorax), abdominal organs.
        heart_s = 0.0
        if 0.0 < u < 1.0:
            paint(0.5, 0.48, 0.055 * sw, 0.17 * sh, 40.0, 8.0)
            hs = min(max((u - 0.35) / 0.6, 0.0), 1.0)
            heart_s = math.sin(math.pi * hs) ** 0.5 if 0.0 < hs < 1.0 else 0.0
            if heart_s > 0.05:
                paint(0.55, 0.43, 0.125 * heart_s * sw, 0.095 * heart_s * sh, 40.0, 8.0, -20.0)
            if 0.12 <= u < 0.2:
                paint(0.52, 0.46, 0.06, 0.022, 45.0, 8.0)
            if 0.2 <= u < 0.5:
                paint(0.52, 0.41, 0.028, 0.028, 45.0, 8.0)
        if u >= 0.15:
            paint(0.535, vb_y - 0.06, 0.025, 0.025, 45.0, 8.0)
        liver_s = _smoothstep(t, 0.64, 0.82)
        if liver_s > 0.05:
            paint(0.5 - 0.1 * sw, 0.49, 0.24 * sw * liver_s, 0.2 * liver_s, 55.0, 8.0, -15.0)
        spleen_s = _smoothstep(t, 0.76, 0.85)
        if spleen_s > 0.05:
            paint(0.5 + 0.25 * sw, 0.6, 0.06 * spleen_s, 0.1 * spleen_s, 48.0, 8.0, 30.0)
        stomach_s = _smoothstep(t, 0.78, 0.86)
        if stomach_s > 0.05:
            paint(0.62, 0.43, 0.09 * stomach_s, 0.075 * stomach_s, 20.0, 8.0)
        kidney_s = _smoothstep(t, 0.9, 0.97)
        if kidney_s > 0.05:
            for sgn in (-1.0, 1.0):
                paint(0.5 + sgn * 0.13, 0.64, 0.045 * kidney_s, 0.065 * kidney_s, 35.0, 8.0,
                      sgn * 20.0)

        # Lungs.
        lungs: list[_Lung] = []
        s = math.sin(math.pi * u) ** 0.6 if 0.0 < u < 1.0 else 0.0
        if s > 0.12:
            excl = np.zeros(self.shape, np.uint8)
            _ellipse(excl, self.p(0.5), self.p(0.48), self.L(0.06 * sw), self.L(0.18 * sh), 1)
            if heart_s > 0.05:
                _ellipse(excl, self.p(0.55), self.p(0.43), self.L(0.135 * heart_s * sw),
                         self.L(0.105 * heart_s * sh), 1, -20.0)
            _ellipse(excl, self.p(0.5), self.p(vb_y + 0.02), self.L(0.075), self.L(0.065), 1)
            if liver_s > 0.05:
                _ellipse(excl, self.p(0.5 - 0.1 * sw), self.p(0.49),
                         self.L(0.25 * sw * liver_s), self.L(0.21 * liver_s), 1, -15.0)
            inner = np.zeros(self.shape, np.uint8)
            _ellipse(inner, self.p(bcx), self.p(bcy), self.L(bw - fat - 0.035),
                     self.L(bh - fat - 0.035), 1)
            allowed = (inner != 0) & (excl == 0)
            for side in (0, 1):
                sgn = _lung_side_sign(side)
                k = s * a.lung_k
                cx = self.p(0.5 + sgn * 0.2 * sw)
                cy = self.p(0.51)
                ax = self.L(0.15 * sw * k * (0.95 if side else 1.0))
                ay = self.L(0.225 * sh * k)
                shape = np.zeros(self.shape, np.uint8)
                _ellipse(shape, cx, cy, ax, ay, 1)
                # Posterior-medial recess beside the spine: a kidney-shaped outline.
                _ellipse(shape, self.p(0.5 + sgn * (0.2 - 0.07 * k) * sw),
                         self.p(0.51 + 0.1 * sh * k),
                         self.L(0.07 * sw * k), self.L(0.12 * sh * k), 1, -sgn * 10.0)
                mask = (shape != 0) & allowed
                lungs.append(_Lung(side, cx, cy, ax, ay, mask))
                top = cy - ay
                grad = np.clip((self.yy - top) / max(2.0 * ay, 1.0), 0.0, 1.0)
                value = (a.lung_hu - 15.0) + 30.0 * grad  # dependent (posterior) is denser
                np.copyto(hu, np.broadcast_to(value, self.shape), where=mask)
                sd[mask] = 18.0

        # Lesions, then vessels (visible through ground glass, hidden by consolidation).
        vessel_ok: np.ndarray | None = None
        if lungs:
            vessel_ok = self._apply_lesions(hu, sd, lungs, u)
            self._draw_vessels(hu, lungs, vessel_ok)

        # Airways.
        if u < 0.3:
            ty = _lerp(0.455, 0.47, chest)
            paint(0.5, ty, 0.022 * _lerp(0.9, 1.0, chest), 0.02, HU_AIR, 6.0)
        elif u < 0.45:
            for sgn in (-1.0, 1.0):
                paint(0.5 + sgn * 0.032, 0.48, 0.013, 0.013, HU_AIR, 6.0)

        # Bones: ribs, sternum, spine (drawn last, on top).
        if NECK_END - 0.02 <= t <= 0.92:
            self._draw_ribs(hu, sd, bcx, bcy, bw - fat - 0.018, bh - fat - 0.018, t)
        if 0.05 <= u < 0.85:
            paint(0.5, bcy - bh + fat + 0.022, 0.03, 0.011, 600.0, 30.0)
        ring = max(1, round(0.007 * m))
        paint(0.5, vb_y, vb_r, vb_r * 0.95, 450.0, 30.0)
        _ellipse(hu, self.p(0.5), self.p(vb_y), self.L(vb_r), self.L(vb_r * 0.95), 900.0,
                 thickness=ring)
        canal_r = 0.017 * ksp
        canal_y = vb_y + vb_r + canal_r + 0.004
        paint(0.5, canal_y, canal_r + 0.008 * ksp, canal_r + 0.008 * ksp, 800.0, 30.0)
        paint(0.5, canal_y, canal_r, canal_r * 0.95, 20.0, 8.0)
        paint(0.5, canal_y + 0.026 * ksp, 0.008 * ksp, 0.016 * ksp, 750.0, 30.0)
        for sgn in (-1.0, 1.0):
            paint(0.5 + sgn * 0.04 * ksp, canal_y - 0.005, 0.02 * ksp, 0.008 * ksp,
                  700.0, 30.0, sgn * 15.0)

        # Partial-volume softening, then noise.
        hu = cv2.GaussianBlur(hu, (3, 3), 0.5)
        noise = self.rng_noise.standard_normal(self.shape, dtype=np.float32)
        hu += noise * sd
        np.clip(hu, HU_MIN, HU_MAX, out=hu)
        return hu

    def _apply_lesions(self, hu: np.ndarray, sd: np.ndarray, lungs: list[_Lung],
                       u: float) -> np.ndarray:
        """Blends the lesions into the lungs; returns where vessels may still be drawn.

        Two layers: ground glass (ill-defined margins, wide blur) and dense lesions
        (nodules, cavities, consolidation: sharp margins, narrow blur). Each layer is blended
        by normalised convolution so a blurred margin keeps the lesion's own HU.
        """
        layers = {
            "soft": (np.zeros(self.shape, np.float32), np.zeros(self.shape, np.float32)),
            "sharp": (np.zeros(self.shape, np.float32), np.zeros(self.shape, np.float32)),
        }
        used: set[str] = set()
        by_side = {lung.side: lung for lung in lungs}
        for les in self.lesions:
            lung = by_side.get(les.side)
            if lung is None:
                continue
            if isinstance(les, _Blob):
                f = 1.0 - ((u - les.uc) / les.ur) ** 2
                if f <= 0.0:
                    continue
                f = math.sqrt(f)
                layer = "soft" if les.hu < -200.0 and not les.cavity else "sharp"
                w, val = layers[layer]
                cx = lung.cx + les.xn * lung.ax
                cy = lung.cy + les.yn * lung.ay
                # Dense nodules and cavities stay visible on small matrices.
                least = 3.0 if les.cavity else (2.0 if layer == "sharp" else 0.6)
                ax = max(les.rx * lung.ax * f, least)
                ay = max(les.ry * lung.ay * f, least)
                _ellipse(w, cx, cy, ax, ay, 1.0, les.angle)
                _ellipse(val, cx, cy, ax, ay, les.hu, les.angle)
                if les.cavity:
                    _ellipse(val, cx, cy, ax * 0.6, ay * 0.6, HU_AIR, les.angle)
                used.add(layer)
            else:
                region = self._lobar_region(les, lung, u)
                if region is not None:
                    w, val = layers["sharp"]
                    y0, x0, reg = region
                    h, wd = reg.shape
                    w[y0:y0 + h, x0:x0 + wd][reg] = 1.0
                    val[y0:y0 + h, x0:x0 + wd][reg] = les.hu
                    used.add("sharp")
        vessel_ok = np.ones(self.shape, bool)
        if not used:
            return vessel_ok
        lung_any = np.zeros(self.shape, bool)
        for lung in lungs:
            lung_any |= lung.mask
        for layer, sig, noise in (("soft", self.soft_sigma, 14.0),
                                  ("sharp", self.sharp_sigma, 8.0)):
            if layer not in used:
                continue
            w, val = layers[layer]
            wb = cv2.GaussianBlur(w, (0, 0), sig)
            vb = cv2.GaussianBlur(w * val, (0, 0), sig)
            sel = lung_any & (wb > 0.01)
            ws = np.minimum(wb[sel], 1.0)
            vs = vb[sel] / np.maximum(wb[sel], 1e-6)
            hu[sel] = hu[sel] * (1.0 - ws) + vs * ws
            sd[sel] = sd[sel] * (1.0 - ws) + noise * ws
            if layer == "sharp":
                vessel_ok &= wb < 0.5
        return vessel_ok

    def _lobar_region(self, les: _Lobar, lung: _Lung, u: float
                      ) -> tuple[int, int, np.ndarray] | None:
        e = les.extent
        if les.lobe == "lower":
            thr = 1.2 - 2.8 * e * (u - 0.3)
        elif les.lobe == "upper":
            thr = -1.2 + 2.8 * e * (0.75 - u)
        else:
            thr = 0.0
        if les.lobe == "lower" and thr >= 1.3 or les.lobe == "upper" and thr <= -1.3:
            return None
        pad = 1.25
        x0 = max(int(math.floor(lung.cx - pad * lung.ax)), 0)
        x1 = min(int(math.ceil(lung.cx + pad * lung.ax)) + 1, self.m)
        y0 = max(int(math.floor(lung.cy - pad * lung.ay)), 0)
        y1 = min(int(math.ceil(lung.cy + pad * lung.ay)) + 1, self.m)
        if x1 <= x0 or y1 <= y0:
            return None
        xn = (self.xx[:, x0:x1] - lung.cx) / max(lung.ax, 0.5)
        yn = (self.yy[y0:y1, :] - lung.cy) / max(lung.ay, 0.5)
        reg = (xn * xn + yn * yn) <= pad * pad
        if les.lobe == "lower":
            reg &= (yn + 0.12 * np.sin(3.0 * xn + les.phase)) > thr
        elif les.lobe == "upper":
            reg &= (yn + 0.12 * np.sin(3.0 * xn + les.phase)) < thr
        if not reg.any():
            return None
        return y0, x0, reg

    def _draw_vessels(self, hu: np.ndarray, lungs: list[_Lung], ok: np.ndarray) -> None:
        rng = self.rng_detail
        m = self.m
        for lung in lungs:
            vimg = np.zeros(self.shape, np.float32)
            area = math.pi * lung.ax * lung.ay
            r_mean = max(1.0, 0.0045 * m)
            n_dots = int(0.045 * area / max(5.0, math.pi * r_mean * r_mean))
            rho = np.sqrt(rng.uniform(0.0, 1.0, n_dots)) * 0.95
            th = rng.uniform(0.0, 2.0 * math.pi, n_dots)
            rad = rng.uniform(0.002, 0.007, n_dots) * m * (1.3 - rho)
            vals = rng.uniform(30.0, 80.0, n_dots)
            xs = lung.cx + rho * np.cos(th) * lung.ax
            ys = lung.cy + rho * np.sin(th) * lung.ay
            for x, y, r, v in zip(xs, ys, rad, vals):
                cv2.circle(vimg, (int(round(x * _ONE)), int(round(y * _ONE))),
                           max(int(round(r * _ONE)), _ONE), float(v), -1, cv2.LINE_8, _SHIFT)
            # Branches running outwards from the hilum (medial side of the lung), tapering.
            n_lines = max(1, n_dots // 8)
            thick = max(1, round(0.003 * m))
            medial = -_lung_side_sign(lung.side)
            for _ in range(n_lines):
                hx, hy = 0.55 * medial, float(rng.uniform(-0.35, 0.35))
                heading = math.atan2(float(rng.uniform(-1.0, 1.0)), -medial)
                angles = heading + rng.normal(0.0, 0.3, 3).cumsum()
                seg = rng.uniform(0.12, 0.25, 3)
                px = np.concatenate([[hx], hx + (seg * np.cos(angles)).cumsum()]) * lung.ax
                py = np.concatenate([[hy], hy + (seg * np.sin(angles)).cumsum()]) * lung.ay
                pts = np.stack([lung.cx + px, lung.cy + py], axis=1)
                pts = np.round(pts * _ONE).astype(np.int32).reshape(-1, 1, 2)
                cv2.polylines(vimg, [pts], False, float(rng.uniform(30.0, 70.0)), thick,
                              cv2.LINE_8, _SHIFT)
            sel = (vimg != 0.0) & lung.mask & ok
            hu[sel] = vimg[sel]

    def _draw_ribs(self, hu: np.ndarray, sd: np.ndarray, cx: float, cy: float, rx: float,
                   ry: float, t: float) -> None:
        rng = self.rng_detail
        a = self.anat
        count = a.rib_count
        lengths = rng.uniform(5.0, 14.0, count)
        values = rng.uniform(550.0, 900.0, count)
        thick = max(1, round(0.012 * self.m))
        phase = a.rib_phase + 200.0 * t
        for i in range(count):
            centre = (phase + i * 360.0 / count) % 360.0
            if abs(centre - 90.0) < 18.0 or abs(centre - 270.0) < 12.0:
                continue  # spine (posterior) and sternum (anterior) gaps
            for img, v in ((hu, float(values[i])), (sd, 35.0)):
                _ellipse(img, self.p(cx), self.p(cy), self.L(rx), self.L(ry), v,
                         thickness=thick, start=centre - lengths[i] / 2.0,
                         end=centre + lengths[i] / 2.0)


def make_volume_hu(kind: str, *, num_slices: int = 40, matrix: int = 128, seed: int = 0,
                   dense_consolidation: bool = False) -> np.ndarray:
    """float32 HU volume (num_slices, matrix, matrix), superior first.

    Synthetic (not a real patient). Values lie in [-1024, 3071]. Image left is the patient's
    right, image top is anterior. See the module docstring for the anatomy and lesions.
    """
    _check_kind(kind)
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if matrix < 16:
        raise ValueError(f"matrix must be >= 16, got {matrix}")
    renderer = _SliceRenderer(kind, int(num_slices), int(matrix), int(seed),
                              bool(dense_consolidation))
    vol = np.empty((num_slices, matrix, matrix), np.float32)
    for k in range(num_slices):
        vol[k] = renderer.render(k)
    return vol


# --------------------------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Storage:
    dtype: str
    bits_stored: int
    pixel_representation: int
    lo: int
    hi: int


def _storage(intercept: float, slope: float) -> _Storage:
    if not slope > 0:
        raise ValueError(f"rescale_slope must be > 0, got {slope}")
    if intercept > HU_MIN:  # e.g. 0: negative HU need negative stored values
        return _Storage("<i2", 16, 1, -32768, 32767)
    if intercept == -1024.0 and slope == 1.0:
        return _Storage("<u2", 12, 0, 0, 4095)
    return _Storage("<u2", 16, 0, 0, 65535)


def _to_stored(hu: np.ndarray, intercept: float, slope: float, st: _Storage) -> bytes:
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    np.clip(stored, st.lo, st.hi, out=stored)
    return np.ascontiguousarray(stored.astype(st.dtype)).tobytes()


def _default_study_uid(patient_id: str, seed: int, kind: str = "normal",
                       dense: bool = False) -> str:
    """Different phantoms (kind, dense) of one patient/seed are different studies."""
    return _uid("study", patient_id, seed, kind, dense)


def _default_study_date(patient_id: str, seed: int) -> str:
    day = dt.date(2020, 3, 1) + dt.timedelta(days=_hash_int("date", patient_id, seed) % 400)
    return day.strftime("%Y%m%d")


def _time_of(*parts: object) -> str:
    minutes = 7 * 60 + _hash_int("time", *parts) % (11 * 60)
    return f"{minutes // 60:02d}{minutes % 60:02d}{_hash_int('sec', *parts) % 60:02d}"


def _patient_attrs(patient_id: str) -> tuple[str, str]:
    h = _hash_int("patient", patient_id)
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=h % (55 * 365))
    return birth.strftime("%Y%m%d"), ("M" if (h >> 20) % 2 else "F")


def _age(birth: str, on: str) -> str:
    b = dt.datetime.strptime(birth, "%Y%m%d").date()
    d = dt.datetime.strptime(on, "%Y%m%d").date()
    years = d.year - b.year - ((d.month, d.day) < (b.month, b.day))
    return f"{max(years, 0):03d}Y"


def _base_dataset(*, sop_class: str, patient_id: str, patient_name: str, study_uid: str,
                  series_uid: str, study_date: str, modality: str, series_number: int,
                  series_description: str, image_type: Sequence[str]) -> Dataset:
    """Patient, study, series, equipment and general image attributes."""
    birth, sex = _patient_attrs(patient_id)
    study_time = _time_of(study_uid)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = series_uid  # replaced per instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = series_uid  # replaced per instance
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.AcquisitionDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = study_time
    ds.SeriesTime = study_time
    ds.AcquisitionTime = study_time
    ds.ContentTime = study_time
    ds.AccessionNumber = f"ACC{_hash_int('accession', study_uid) % 10**8:08d}"
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = INSTITUTION
    ds.ReferringPhysicianName = "Referrer^Synthetic"
    ds.StationName = "PHANTOM01"
    ds.StudyDescription = "CT CHEST (SYNTHETIC)"
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "Synthetic CT"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth
    ds.PatientSex = sex
    ds.PatientAge = _age(birth, study_date)
    ds.BodyPartExamined = "CHEST"
    ds.SoftwareVersions = "covid_keras-phantom-1"
    ds.ProtocolName = "Chest"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(1 + _hash_int("studyid", study_uid) % 99999)
    ds.SeriesNumber = int(series_number)
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = _uid("frame-of-reference", study_uid)
    ds.PositionReferenceIndicator = ""
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = SYNTHETIC_NOTE
    return ds


def _set_pixels(ds: Dataset, rows: int, cols: int, st: _Storage, intercept: float,
                slope: float) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(rows)
    ds.Columns = int(cols)
    ds.BitsAllocated = 16
    ds.BitsStored = st.bits_stored
    ds.HighBit = st.bits_stored - 1
    ds.PixelRepresentation = st.pixel_representation
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleType = "HU"


def _save(ds: Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


def _file_names(n: int, series_uid: str, mode: str) -> list[str]:
    if mode == "ordered":
        return [f"IM{i + 1:04d}.dcm" for i in range(n)]
    if mode != "shuffled":
        raise ValueError(f"file_names must be 'shuffled' or 'ordered', got {mode!r}")
    salt = 0
    while True:
        stems = [hashlib.sha1(f"{series_uid}/{i}/{salt}".encode()).hexdigest()[:12]
                 for i in range(n)]
        # Every third file has no extension: readers must recognise DICOM by content.
        names = [f"IM_{s}" if i % 3 == 1 else f"IM_{s}.dcm" for i, s in enumerate(stems)]
        if len(set(names)) == n and (n < 2 or sorted(names) != names):
            return names
        salt += 1


def write_series(out_dir: str | os.PathLike, *, kind: str = "normal", num_slices: int = 40,
                 matrix: int = 128, pixel_spacing_mm: float = 0.7,
                 slice_thickness_mm: float = 5.0, rescale_intercept: float = -1024.0,
                 rescale_slope: float = 1.0, seed: int = 0,
                 patient_id: str = "PHANTOM-0001", patient_name: str = "Phantom^Test",
                 study_uid: str | None = None, series_uid: str | None = None,
                 series_number: int = 2, modality: str = "CT", orientation: str = "axial",
                 dense_consolidation: bool = False, file_names: str = "shuffled",
                 volume_hu: np.ndarray | None = None,
                 study_date: str | None = None) -> list[Path]:
    """Writes one DICOM file per slice into out_dir (created), returns the paths.

    Synthetic images (not real patients). The returned paths are in slice order (InstanceNumber
    1..n, superior first for axial, anterior first for coronal) whatever their names.

    Args:
      kind, num_slices, matrix, seed, dense_consolidation: passed to :func:`make_volume_hu`
        (ignored when ``volume_hu`` is given; its shape (slices, rows, columns) is used).
      pixel_spacing_mm, slice_thickness_mm: in-plane pixel size and slice distance (axial
        slices are contiguous: SpacingBetweenSlices = SliceThickness).
      rescale_intercept, rescale_slope: stored = round((HU - intercept) / slope), clipped to
        the stored range. Intercept -1024 and slope 1 -> unsigned, BitsStored 12; intercept
        above -1024 (e.g. 0) -> signed 16 bit; otherwise unsigned 16 bit.
      study_uid, series_uid: default to UIDs derived from (patient_id, seed, kind,
        dense_consolidation) and, for the series, from everything else that changes the
        pixels (shape, orientation, spacing, rescale, series number; a hash of volume_hu),
        so reruns are bit-identical and different images never share SOP Instance UIDs.
      modality: written as Modality; anything but "CT" uses the Secondary Capture SOP class.
      orientation: "axial" (ImageOrientationPatient 1,0,0,0,1,0; z decreases from the first
        to the last slice, as on a real scanner) or "coronal" (1,0,0,0,0,-1: one file per
        volume row, num_slices x matrix pixels, ImageType DERIVED\\SECONDARY\\REFORMATTED).
      file_names: "shuffled" (hash names such as IM_3f9a0c1d2e4b.dcm, every third without an
        extension, never sorting in slice order) or "ordered" (IM0001.dcm, ...).
      study_date: YYYYMMDD; defaults to a date derived from (patient_id, seed).
    """
    if orientation not in ("axial", "coronal"):
        raise ValueError(f"orientation must be 'axial' or 'coronal', got {orientation!r}")
    if volume_hu is None:
        vol = make_volume_hu(kind, num_slices=num_slices, matrix=matrix, seed=seed,
                             dense_consolidation=dense_consolidation)
    else:
        vol = np.asarray(volume_hu, dtype=np.float32)
        if vol.ndim != 3:
            raise ValueError(f"volume_hu must be 3-D (slices, rows, cols), got {vol.shape}")
    n_ax, rows_ax, cols_ax = vol.shape
    st = _storage(float(rescale_intercept), float(rescale_slope))
    if volume_hu is None:
        content = f"{kind}/{dense_consolidation}/{num_slices}/{matrix}"
    else:
        content = f"{vol.shape}/{hashlib.sha1(np.ascontiguousarray(vol).data).hexdigest()}"
    study_uid = study_uid or _default_study_uid(patient_id, seed, kind, dense_consolidation)
    # Everything that changes the pixels goes into the series (and so the SOP instance) UID.
    series_uid = series_uid or _uid(
        "series", study_uid, seed, series_number, orientation, content, pixel_spacing_mm,
        slice_thickness_mm, rescale_intercept, rescale_slope, modality)
    study_date = study_date or _default_study_date(patient_id, seed)
    sop_class = CTImageStorage if modality == "CT" else SecondaryCaptureImageStorage
    ps = float(pixel_spacing_mm)
    thk = float(slice_thickness_mm)
    x0 = -0.5 * (cols_ax - 1) * ps
    y0 = -0.5 * (rows_ax - 1) * ps
    z_top = -50.0

    if orientation == "axial":
        image_type = ("ORIGINAL", "PRIMARY", "AXIAL")
        description = f"Chest {thk:g}mm axial (synthetic)"
        n_files, rows, cols = n_ax, rows_ax, cols_ax
        iop = [1, 0, 0, 0, 1, 0]
        spacing = [ps, ps]
        thickness = thk
    else:
        image_type = ("DERIVED", "SECONDARY", "REFORMATTED")
        description = f"Chest coronal {ps:g}mm MPR (synthetic)"
        n_files, rows, cols = rows_ax, n_ax, cols_ax
        iop = [1, 0, 0, 0, 0, -1]
        spacing = [thk, ps]  # [row spacing (z), column spacing (x)]
        thickness = ps

    ds = _base_dataset(sop_class=sop_class, patient_id=patient_id, patient_name=patient_name,
                       study_uid=study_uid, series_uid=series_uid, study_date=study_date,
                       modality=modality, series_number=series_number,
                       series_description=description, image_type=image_type)
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = _ds(thickness)
    ds.SpacingBetweenSlices = _ds(thickness)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds(ps * cols_ax)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = 200
    ds.Exposure = 100
    ds.ConvolutionKernel = "B30f"
    ds.ImageOrientationPatient = [_ds(v) for v in iop]
    ds.PixelSpacing = [_ds(v) for v in spacing]
    _set_pixels(ds, rows, cols, st, float(rescale_intercept), float(rescale_slope))
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _file_names(n_files, series_uid, file_names)
    paths: list[Path] = []
    for i in range(n_files):
        if orientation == "axial":
            img = vol[i]
            z = z_top - i * thk
            ipp = [x0, y0, z]
            location = z
        else:
            img = vol[:, i, :]
            y = y0 + i * ps
            ipp = [x0, y, z_top]
            location = y
        sop_uid = _uid("sop", series_uid, i)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [_ds(v) for v in ipp]
        ds.SliceLocation = _ds(location)
        ds.PixelData = _to_stored(img, float(rescale_intercept), float(rescale_slope), st)
        ds["PixelData"].VR = "OW"
        path = out / names[i]
        _save(ds, path)
        paths.append(path)
    return paths


def write_localizer(out_dir: str | os.PathLike, *, matrix: int = 128, seed: int = 0,
                    patient_id: str = "PHANTOM-0001", study_uid: str | None = None,
                    file_name: str = "scout.dcm", patient_name: str = "Phantom^Test",
                    study_date: str | None = None) -> Path:
    """One CT localizer/scout image (ImageType ORIGINAL\\PRIMARY\\LOCALIZER), coronal-like
    projection of a synthetic (not real) phantom. Series number 1, "Topogram" description.
    The default study UID equals :func:`write_series`'s default for the same patient and seed
    with kind "normal"; :func:`write_study` passes its own."""
    if matrix < 16:
        raise ValueError(f"matrix must be >= 16, got {matrix}")
    study_uid = study_uid or _default_study_uid(patient_id, seed)
    study_date = study_date or _default_study_date(patient_id, seed)
    series_uid = _uid("localizer-series", study_uid, seed)
    small = make_volume_hu("normal", num_slices=64, matrix=min(matrix, 128), seed=seed)
    density = np.clip((small + 1000.0) / 1000.0, 0.0, None).sum(axis=1)  # (z, x)
    density /= max(float(density.max()), 1e-6)
    proj = (-1000.0 + 1900.0 * np.power(density, 0.8)).astype(np.float32)
    img = cv2.resize(proj, (matrix, matrix), interpolation=cv2.INTER_LINEAR)
    st = _storage(-1024.0, 1.0)
    fov = 500.0
    ds = _base_dataset(sop_class=CTImageStorage, patient_id=patient_id,
                       patient_name=patient_name, study_uid=study_uid, series_uid=series_uid,
                       study_date=study_date, modality="CT", series_number=1,
                       series_description="Topogram 0.6 (synthetic)",
                       image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    ds.KVP = "120"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.ImagePositionPatient = [_ds(-fov / 2), "0", _ds(-50.0 + 0.15 * fov)]
    ds.PixelSpacing = [_ds(fov / matrix), _ds(fov / matrix)]
    _set_pixels(ds, matrix, matrix, st, -1024.0, 1.0)
    ds.WindowCenter = "0"
    ds.WindowWidth = "2000"
    sop_uid = _uid("sop", series_uid, 0)
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = 1
    ds.PixelData = _to_stored(img, -1024.0, 1.0, st)
    ds["PixelData"].VR = "OW"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / file_name
    _save(ds, path)
    return path


def write_study(out_dir: str | os.PathLike, *, kind: str = "normal", num_slices: int = 40,
                matrix: int = 128, seed: int = 0, patient_id: str = "PHANTOM-0001",
                with_localizer: bool = False, **series_kwargs: Any) -> Path:
    """A study folder: the axial series (+ optional localizer series) sharing one
    StudyInstanceUID, all files flat in out_dir (readers must group by SeriesInstanceUID).
    series_kwargs go to :func:`write_series` (study_uid, study_date and patient_name are
    shared with the localizer). Returns out_dir."""
    study_uid = series_kwargs.pop("study_uid", None) or _default_study_uid(
        patient_id, seed, kind, bool(series_kwargs.get("dense_consolidation", False)))
    write_series(out_dir, kind=kind, num_slices=num_slices, matrix=matrix, seed=seed,
                 patient_id=patient_id, study_uid=study_uid, **series_kwargs)
    if with_localizer:
        write_localizer(out_dir, matrix=matrix, seed=seed, patient_id=patient_id,
                        study_uid=study_uid,
                        patient_name=series_kwargs.get("patient_name", "Phantom^Test"),
                        study_date=series_kwargs.get("study_date"))
    return Path(out_dir)


def write_dataset(root: str | os.PathLike, *,
                  kinds: Sequence[str] = ("normal", "covid", "bacterial"),
                  patients_per_kind: int = 4, num_slices: int = 40, matrix: int = 128,
                  seed: int = 0, layout: str = "folders") -> Path:
    """Writes a small synthetic dataset (not real patients).

    Patient ids are "PHANTOM-<kind>-<nnn>" (n from 001), one id per patient; patients alternate
    between sites "site_a" / "site_b" (counted over all kinds).

    Study folders are named ``study_<hash>`` (a hash of the patient id, seed and study
    number): never after the patient id or the date, the layout real exports should not have
    either (data_prep never echoes folder names, but other tools do).

    layout="folders": ``<root>/<kind>/study_<hash>/*.dcm``; every third patient of
      each kind (n = 3, 6, ...) has two studies on two dates (different study UIDs and seeds),
      so that patient-level grouping can be tested. Returns ``root``.
    layout="manifest": ``<root>/studies/study_<hash>/*.dcm`` (one study per patient)
      plus ``<root>/manifest.csv`` with columns study_path,label,patient_id,site,split
      (study_path relative to the csv's folder, '/'-separated; split left empty). Returns the
      path of ``manifest.csv``.
    """
    if layout not in ("folders", "manifest"):
        raise ValueError(f"layout must be 'folders' or 'manifest', got {layout!r}")
    for kind in kinds:
        _check_kind(kind)
    root_p = Path(root)
    root_p.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    patient_index = 0
    for kind in kinds:
        for n in range(1, patients_per_kind + 1):
            pid = f"PHANTOM-{kind}-{n:03d}"
            site = "site_a" if patient_index % 2 == 0 else "site_b"
            patient_index += 1
            n_studies = 2 if layout == "folders" and n % 3 == 0 else 1
            first = dt.datetime.strptime(_default_study_date(pid, seed), "%Y%m%d").date()
            for s in range(n_studies):
                study_seed = _derive_seed(seed, kind, n, s)
                date = (first + dt.timedelta(days=s * (14 + _hash_int(pid, seed) % 60)))
                date_s = date.strftime("%Y%m%d")
                study_name = f"study_{_hash_int('study-folder', pid, seed, s) % 16**10:010x}"
                if layout == "folders":
                    study_dir = root_p / kind / study_name
                else:
                    study_dir = root_p / "studies" / study_name
                write_study(study_dir, kind=kind, num_slices=num_slices, matrix=matrix,
                            seed=study_seed, patient_id=pid,
                            study_uid=_uid("dataset-study", pid, seed, s),
                            study_date=date_s,
                            patient_name=f"Phantom^{kind.capitalize()}{n:03d}")
                rows.append({"study_path": study_dir.relative_to(root_p).as_posix(),
                             "label": kind, "patient_id": pid, "site": site, "split": ""})
    if layout == "folders":
        return root_p
    manifest = root_p / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["study_path", "label", "patient_id", "site",
                                               "split"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return manifest


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _define_flags() -> None:
    from absl import flags

    if "output_dir" in flags.FLAGS:  # already defined (e.g. main() called twice)
        return
    flags.DEFINE_string("output_dir", None, "Folder to write the synthetic dataset into.")
    flags.DEFINE_list("kinds", ["normal", "covid", "bacterial"],
                      f"Comma-separated phantom kinds, from {', '.join(KINDS)}.")
    flags.DEFINE_integer("patients_per_kind", 4, "Synthetic patients per kind.")
    flags.DEFINE_integer("num_slices", 40, "Axial slices per series (neck to upper abdomen).")
    flags.DEFINE_integer("matrix", 128, "Rows = columns of each axial slice.")
    flags.DEFINE_integer("seed", 0, "Random seed; the same flags give bit-identical files.")
    flags.DEFINE_enum("layout", "folders", ["folders", "manifest"],
                      "folders: <dir>/<kind>/<study>/; manifest: <dir>/studies/<study>/ plus "
                      "<dir>/manifest.csv.")


def _main(argv: list[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    fl = flags.FLAGS
    result = write_dataset(fl.output_dir, kinds=tuple(fl.kinds),
                           patients_per_kind=fl.patients_per_kind, num_slices=fl.num_slices,
                           matrix=fl.matrix, seed=fl.seed, layout=fl.layout)
    root = Path(fl.output_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    studies = sorted({p.parent for p in files if p.name != "manifest.csv"})
    print(f"SYNTHETIC phantom dataset (not real patients) written to {root}")
    print(f"  {len(studies)} studies, {len(files)} files, layout={fl.layout}, "
          f"{fl.num_slices} slices of {fl.matrix}x{fl.matrix}, seed={fl.seed}")
    if fl.layout == "manifest":
        with open(result, newline="", encoding="utf-8") as f:
            labels = [row["label"] for row in csv.DictReader(f)]
    else:
        labels = [s.parent.name for s in studies]
    for kind in fl.kinds:
        n = labels.count(kind)
        print(f"  {kind}: {n} studies")
    if fl.layout == "manifest":
        print(f"  manifest: {result}")


def main() -> None:
    from covid_keras import cli

    _define_flags()
    # cli.run: --help exits 0, a missing --output_dir is a one-line error
    cli.run(_main, required=["output_dir"], program="data_prep.phantom")


if __name__ == "__main__":
    main()
