"""Small pure image functions shared by data_prep, the input pipeline, export and predict.

Units are in the names. Each works on NumPy arrays (data_prep, predict) and on TensorFlow
tensors inside ``tf.data`` (the input pipeline); TensorFlow is imported only for tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Named windows (level_hu, width_hu). Lung: the paper's level -700 HU at the top of its
# 1000-1500 HU width range, so ground glass (-600..-300) and consolidation (0..+50) both stay
# inside the window. Mediastinal: the paper's width 350 HU, level 40 HU.
WINDOWS_HU: dict[str, tuple[float, float]] = {
    "lung": (-700.0, 1500.0),
    "mediastinal": (40.0, 350.0),
    "bone": (400.0, 1800.0),
}

# Training brightness jitter: x U(lo, hi), the authors' multiplicative jitter (used by the
# tf.data pipeline and by the NumPy pipeline of bench/accuracy_jax.py).
BRIGHTNESS_RANGE = (0.874, 1.126)
# The trainer's --brightness_jitter choices; "additive" (+- 0.1 and a contrast jitter, the
# earlier recipe) greys the black background and is kept only to measure the change.
BRIGHTNESS_JITTERS = ("multiplicative", "additive")
# The models' input_norm choices (covid_keras.model.layers.intensity): raw intensities, or every
# image to zero mean and a fixed spread by the model's first layer.
INPUT_NORMS = ("none", "per_image")


def check_augmentation(brightness: str, zoom: float, gamma: float) -> None:
    """The augmentation arguments that covid_keras.io.data.augment (and the NumPy mirror in
    bench/accuracy_jax.py) accept: a known brightness jitter, zoom in [0, 1), gamma >= 0."""
    if brightness not in BRIGHTNESS_JITTERS:
        raise ValueError(f"brightness must be one of {BRIGHTNESS_JITTERS}. Received: "
                         f"{brightness!r}")
    if not 0.0 <= zoom < 1.0:
        raise ValueError(f"zoom must be in [0, 1). Received: {zoom}")
    if gamma < 0.0:
        raise ValueError(f"gamma must be >= 0. Received: {gamma}")


def parse_windows(names: list[str] | tuple[str, ...]) -> list[tuple[str, float, float]]:
    """``["lung", "-600:1200"]`` -> ``[("lung", -700, 1500), ("-600:1200", -600, 1200)]``."""
    out = []
    for name in names:
        if name in WINDOWS_HU:
            level, width = WINDOWS_HU[name]
        else:
            try:
                level_s, width_s = name.split(":")
                level, width = float(level_s), float(width_s)
            except ValueError:
                raise ValueError(
                    f"A window is a name in {sorted(WINDOWS_HU)} or 'LEVEL:WIDTH' in HU. "
                    f"Received: {name!r}"
                ) from None
        if width <= 0:
            raise ValueError(f"Window width must be positive. Received: {name!r}")
        out.append((name, float(level), float(width)))
    if not out:
        raise ValueError("At least one window is needed. Received: []")
    return out


def _is_tensor(x: Any) -> bool:
    return not isinstance(x, (np.ndarray, np.generic, float, int))


def window_hu(x_hu: Any, level_hu: float, width_hu: float) -> Any:
    """Maps HU to [0, 1]: level - width/2 -> 0, level + width/2 -> 1, clipped. float32."""
    lo = level_hu - width_hu / 2.0
    if _is_tensor(x_hu):
        import tensorflow as tf

        y = (tf.cast(x_hu, tf.float32) - lo) / width_hu
        return tf.clip_by_value(y, 0.0, 1.0)
    y = (np.asarray(x_hu, dtype=np.float32) - np.float32(lo)) / np.float32(width_hu)
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def grey_to_hu(grey_u8: Any, level_hu: float, width_hu: float) -> Any:
    """Pseudo-HU for an 8-bit image that was already windowed at (level, width): the inverse
    of :func:`window_hu` on its range (values the publisher clipped stay at the ends)."""
    lo = level_hu - width_hu / 2.0
    if _is_tensor(grey_u8):
        import tensorflow as tf

        return tf.cast(grey_u8, tf.float32) / 255.0 * width_hu + lo
    return (np.asarray(grey_u8, dtype=np.float32) / np.float32(255.0) * np.float32(width_hu)
            + np.float32(lo)).astype(np.float32)


def unit_to_u8(x_unit: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 with rounding (NumPy only: data_prep writes uint8 PNGs)."""
    return np.clip(np.rint(np.asarray(x_unit, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
