"""Rendering: Hounsfield-unit volumes drawn from the anatomy and lesion plans
(:func:`make_volume_hu`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from data_prep.phantom.anatomy import (
    _ONE,
    _SHIFT,
    HU_AIR,
    HU_MAX,
    HU_MIN,
    NECK_END,
    THORAX_END,
    _Blob,
    _check_kind,
    _ellipse,
    _lerp,
    _Lobar,
    _lung_side_sign,
    _plan_anatomy,
    _plan_lesions,
    _smoothstep,
)

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
