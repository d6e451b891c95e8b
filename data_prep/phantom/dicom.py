"""DICOM writing: CT series, localizers, studies and datasets of phantom volumes
(:func:`write_series`, :func:`write_localizer`, :func:`write_study`,
:func:`write_dataset`)."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
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
)

from data_prep.phantom.anatomy import HU_MIN, _check_kind, _derive_seed, _ds, _hash_int, _uid
from data_prep.phantom.render import make_volume_hu

INSTITUTION = "Phantom Hospital"
MANUFACTURER = "covid_keras phantom"
SYNTHETIC_NOTE = "SYNTHETIC PHANTOM - NOT A REAL PATIENT"

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
