"""How a study becomes records: data_prep's scan and preparation settings, in one place.

:class:`PrepSettings` owns every setting that decides the records' pixels (which slices,
which window, the lung crop and fill, the size) and their defaults. ``build_tfrecords``
makes it from its flags and writes it into ``manifest.json`` (:data:`MANIFEST_KEY`);
``covid_keras.export`` reads it back from the training data's manifest into the export
info (``data_prep`` -> :data:`EXPORT_KEY`), and ``covid_keras.predict`` (and through it the
web page) from the export info, so a new study is prepared as the training records were.

Older manifests and exports, written before the block existed, are read from what they do
record (:meth:`PrepSettings.from_recorded`): the manifest's ``preprocessing`` entry
(:class:`~data_prep.preprocess.PrepConfig` as a dict), its recorded flags, ``windows`` and
``image.size``, with these defaults for the rest.

    settings = PrepSettings.from_manifest(manifest)
    scan_cfg = ScanConfig.from_settings(settings, salt)   # data_prep.study
    prep = PrepConfig.from_settings(settings)            # data_prep.preprocess

(The configs convert from the settings, not the other way: ``study`` and ``preprocess``
import this module for their defaults, and this one imports neither.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from covid_keras.core.imaging import WINDOWS_HU
from data_prep.limits import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_IMAGE_PIXELS
from data_prep.lung import LungMaskParams

#: The manifest's block (and the export info's ``data_prep`` entry's) holding the settings.
MANIFEST_KEY = "prep_settings"
EXPORT_KEY = "settings"
#: The build_tfrecords flags that decide how a study becomes records: what an export copies
#: from the manifest's ``flags`` (``data_prep.flags`` of the export info).
RECORDED_FLAGS = ("image_size", "windows", "num_slices", "sampling", "min_slices",
                  "min_lung_fraction", "lung_filter", "crop_to_lung", "fill_blank",
                  "image_window", "gas_median_hu", "max_file_mb", "max_image_pixels")
_MB = 1024 * 1024


@dataclass(frozen=True)
class PrepSettings:
    """data_prep's scan (``ScanConfig`` but the salt and the run's time / memory limits) and
    slice preparation (``PrepConfig``) settings; the defaults are data_prep's."""

    # the scan: which slices of a series
    num_slices: int = 15  # paper: 15
    sampling: str = "paper"  # data_prep.preprocess.SAMPLING_MODES
    min_slices: int = 8
    # the window 8-bit slice images are assumed to be exported with (grey -> pseudo-HU)
    image_window_hu: tuple[float, float] = WINDOWS_HU["lung"]
    max_file_bytes: int = int(DEFAULT_MAX_FILE_MB * _MB)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # the slice: data_prep.preprocess.prepare_slice
    image_size: int = 448
    windows: tuple[tuple[str, float, float], ...] = (("lung", *WINDOWS_HU["lung"]),)
    lung_filter: bool = True
    min_lung_fraction: float = 0.05
    crop_to_lung: bool = True
    crop_margin: float = 0.05
    fill_blank: str = "rotate"  # data_prep.preprocess.FILL_MODES
    lung: LungMaskParams = field(default_factory=LungMaskParams)

    # ------------------------------------------------------------ the configs
    @classmethod
    def from_configs(cls, scan, prep) -> PrepSettings:
        """The settings of a ``ScanConfig`` and a ``PrepConfig`` (what a run used)."""
        return cls(num_slices=int(scan.num_slices), sampling=str(scan.sampling),
                   min_slices=int(scan.min_slices),
                   image_window_hu=tuple(float(v) for v in scan.image_window_hu),
                   max_file_bytes=int(scan.limits.max_file_bytes),
                   max_image_pixels=int(scan.limits.max_image_pixels),
                   image_size=int(prep.image_size),
                   windows=tuple((str(n), float(lv), float(w)) for n, lv, w in prep.windows),
                   lung_filter=bool(prep.lung_filter),
                   min_lung_fraction=float(prep.min_lung_fraction),
                   crop_to_lung=bool(prep.crop_to_lung), crop_margin=float(prep.crop_margin),
                   fill_blank=str(prep.fill_blank), lung=prep.lung)

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """The JSON block (:data:`MANIFEST_KEY`): every field, windows as [name, level,
        width] lists, the lung mask's parameters as a dict."""
        out = dataclasses.asdict(self)
        out["image_window_hu"] = list(self.image_window_hu)
        out["windows"] = [list(w) for w in self.windows]
        return out

    @classmethod
    def from_dict(cls, block: dict) -> PrepSettings:
        """The settings of a :meth:`to_dict` block (unknown keys are ignored, missing ones
        are the defaults: a block written by an older or newer data_prep still reads)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in block.items() if k in known}
        if "windows" in kw:
            kw["windows"] = tuple((str(n), float(lv), float(w)) for n, lv, w in kw["windows"])
        if "image_window_hu" in kw:
            kw["image_window_hu"] = tuple(float(v) for v in kw["image_window_hu"])
        if "lung" in kw:
            kw["lung"] = _lung(kw["lung"])
        return cls(**kw)

    @classmethod
    def from_recorded(cls, flags: dict | None, preprocessing: dict | None,
                      windows: list | None, image_size: int) -> PrepSettings:
        """The settings of a manifest (or an export) written before :data:`MANIFEST_KEY`:
        the ``preprocessing`` entry (a ``PrepConfig`` as a dict) when there is one, else
        the defaults at ``image_size`` with ``windows`` (the manifest's ``[{"name",
        "level_hu", "width_hu"}]``); the scan's settings and limits from the recorded
        build_tfrecords ``flags``, the defaults where a flag is not recorded."""
        fl = flags or {}
        wins = tuple((str(w["name"]), float(w["level_hu"]), float(w["width_hu"]))
                     for w in windows or [])
        base = cls()
        if preprocessing:
            prep_fields = ("image_size", "windows", "lung_filter", "min_lung_fraction",
                           "crop_to_lung", "crop_margin", "fill_blank", "lung")
            kw = {k: v for k, v in preprocessing.items() if k in prep_fields}
            kw["windows"] = tuple((str(n), float(lv), float(w))
                                  for n, lv, w in kw.get("windows", wins or base.windows))
            kw["lung"] = _lung(kw.get("lung") or {})
        else:
            kw = {"image_size": int(image_size), **({"windows": wins} if wins else {})}
        if "max_file_mb" in fl:
            kw["max_file_bytes"] = int(float(fl["max_file_mb"]) * _MB)
        if "max_image_pixels" in fl:
            kw["max_image_pixels"] = int(fl["max_image_pixels"])
        window = fl.get("image_window") or base.image_window_hu
        return cls(num_slices=int(fl.get("num_slices", base.num_slices)),
                   sampling=str(fl.get("sampling", base.sampling)),
                   min_slices=int(fl.get("min_slices", base.min_slices)),
                   image_window_hu=(float(window[0]), float(window[1])), **kw)

    @classmethod
    def from_manifest(cls, manifest: dict, input_size: int | None = None) -> PrepSettings:
        """The settings a dataset's records were built with (its ``manifest.json``):
        :data:`MANIFEST_KEY`, or for an older manifest :meth:`from_recorded` (the records'
        size from ``image.size``, else ``input_size``)."""
        if manifest.get(MANIFEST_KEY):
            return cls.from_dict(manifest[MANIFEST_KEY])
        size = (manifest.get("image") or {}).get("size", input_size)
        if size is None:
            raise ValueError("the manifest records no image size: give input_size")
        return cls.from_recorded(manifest.get("flags"), manifest.get("preprocessing"),
                                 manifest.get("windows"), int(size))

    @classmethod
    def from_export_info(cls, info: dict) -> PrepSettings:
        """The settings an export (``covid_keras.json``) records: its ``data_prep`` entry's
        :data:`EXPORT_KEY`, or for an older export :meth:`from_recorded` (its
        ``data_prep`` flags and preprocessing, its ``windows``, the records' size, else
        the model's input size)."""
        dp = info.get("data_prep") or {}
        if dp.get(EXPORT_KEY):
            return cls.from_dict(dp[EXPORT_KEY])
        size = int(dp.get("records_image_size") or info["input_size"])
        return cls.from_recorded(dp.get("flags"), dp.get("preprocessing"),
                                 info.get("windows"), size)

    def windows_json(self) -> list[dict]:
        """The windows as the manifest's ``windows`` entry writes them."""
        return [{"name": n, "level_hu": lv, "width_hu": w} for n, lv, w in self.windows]


def _lung(params: dict | LungMaskParams) -> LungMaskParams:
    if isinstance(params, LungMaskParams):
        return params
    known = {f.name for f in dataclasses.fields(LungMaskParams)}
    return LungMaskParams(**{k: v for k, v in params.items() if k in known})


#: data_prep's defaults (the flags' defaults, PrepConfig's and ScanConfig's).
DEFAULTS = PrepSettings()
