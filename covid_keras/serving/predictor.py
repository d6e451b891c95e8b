"""One study in, one answer out: the library of ``python -m covid_keras.predict`` (whose
docstring describes prediction.json and the evidence PNGs), used by the page too:
preparing a study with data_prep's settings (:func:`prepare_study`), the model as a
SavedModel, run folder or .keras file (:class:`LocalModel`) or a server over REST
(:class:`ServerModel`), :func:`predict_study`, safe unzipping (:func:`unpack_zip`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import zipfile

import numpy as np

from covid_keras.core import files
from covid_keras.model.saving import takes_lung_mask

log = logging.getLogger("covid_keras.predict")
FORMAT_VERSION = 1
JSON_FILE = "prediction.json"
DEFAULT_SALT = os.path.join("~", ".covid_keras", "predict_salt.key")


def server_token(path: str | None) -> str | None:
    """The token in ``path`` (covid_keras.serve's rules), or None without a path."""
    if not path:
        return None
    from covid_keras.serving.model_server import read_token

    try:
        return read_token(path)
    except ValueError as exc:
        raise ValueError(str(exc).replace("--auth_token_file", "--server_token_file")) from None


class ServerUnreachable(OSError):
    """The model server did not answer (the message names its address, never credentials
    in it; the web page shows its users a fixed text instead)."""


def public_url(url: str) -> str:
    """``url`` without a ``user:password@`` part."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class StudyFailure(ValueError):
    """The study cannot be predicted: ``study <name>: <reason> (<detail>)``."""

    def __init__(self, study: str, reason: str, detail: str = ""):
        super().__init__(f"study {study}: {reason}" + (f" ({detail})" if detail else ""))
        self.study, self.reason, self.detail = study, reason, detail


# ------------------------------------------------------------------ salt, zip
def read_salt(path: str) -> bytes:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        files.atomic_write_bytes(path, secrets.token_hex(32).encode())
        os.chmod(path, 0o600)
    with open(path, "rb") as f:
        salt = f.read().strip()
    if len(salt) < 16:
        raise ValueError(f"salt file {path} is too short (need >= 16 bytes)")
    return salt


def unpack_zip(path: str, dest: str, name: str, max_bytes: int, max_files: int) -> str:
    """Extracts a zipped study safely into ``dest``: no absolute or ``..`` paths, no links
    or special files, at most ``max_files`` entries and ``max_bytes`` expanded (counted while
    extracting, never trusted from the headers), per-entry ratio check. Raises
    StudyFailure(zip_unsafe | zip_bomb | corrupt_zip)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise StudyFailure(name, "corrupt_zip", type(exc).__name__) from None
    with zf:
        entries = zf.infolist()
        if len(entries) > max_files:
            raise StudyFailure(name, "zip_bomb", f"{len(entries)} entries > --max_zip_files="
                                                 f"{max_files}")
        if sum(e.file_size for e in entries) > max_bytes:
            raise StudyFailure(name, "zip_bomb", "declared size over --max_zip_mb")
        root = os.path.realpath(dest)
        total = 0
        for i, e in enumerate(entries, start=1):
            parts = e.filename.replace("\\", "/").split("/")
            if e.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                raise StudyFailure(name, "zip_unsafe", f"entry {i} has an absolute or '..' "
                                                       "path")
            mode = e.external_attr >> 16
            kind = stat.S_IFMT(mode)  # 0: no type bits (ZipFile.writestr's 0o600)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise StudyFailure(name, "zip_unsafe", f"entry {i} is a link or special file")
            target = os.path.realpath(os.path.join(root, *[p for p in parts if p]))
            if not (target == root or target.startswith(root + os.sep)):
                raise StudyFailure(name, "zip_unsafe", f"entry {i} leaves the study folder")
            if e.is_dir():
                os.makedirs(target, exist_ok=True)
                continue
            if e.compress_size and e.file_size / e.compress_size > 1000 and \
                    e.file_size > (1 << 20):
                raise StudyFailure(name, "zip_bomb", f"entry {i} expands "
                                                     f"{e.file_size // e.compress_size}x")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                with zf.open(e) as src, open(target, "wb") as dst:
                    while True:
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        total += len(chunk)
                        if total > max_bytes:
                            raise StudyFailure(name, "zip_bomb", "expands past "
                                                                 "--max_zip_mb")
                        dst.write(chunk)
            except (zipfile.BadZipFile, zlib_error(), EOFError, OSError,
                    NotImplementedError, RuntimeError) as exc:
                raise StudyFailure(name, "corrupt_zip", f"entry {i}: "
                                                        f"{type(exc).__name__}") from None
    return dest


def zlib_error():
    import zlib

    return zlib.error


# ------------------------------------------------------------------ preprocessing
def prep_configs(info: dict, salt: bytes):
    """data_prep's ScanConfig and PrepConfig as the training records were built: the export
    info's :class:`data_prep.settings.PrepSettings` (an older export's recorded flags and
    preprocessing; data_prep's defaults for what it does not say)."""
    from data_prep.preprocess import PrepConfig
    from data_prep.settings import PrepSettings
    from data_prep.study import ScanConfig

    settings = PrepSettings.from_export_info(info)
    return ScanConfig.from_settings(settings, salt), PrepConfig.from_settings(settings)


def prepare_study(path: str, name: str, info: dict, salt: bytes):
    """(scan, result): data_prep's scan and processing of the study (split "test": no
    train-only fill). Raises StudyFailure when the study yields no slice."""
    from data_prep.study import StudyTask, process_study, scan_study

    scan_cfg, prep = prep_configs(info, salt)
    task = StudyTask(study_id=path, path=path, label="unknown", origin="study")
    scan = scan_study(task, scan_cfg)
    if scan.error is not None:
        raise StudyFailure(name, scan.error.reason, scan.error.detail)
    result = process_study(scan, "test", 0, scan_cfg, prep, seed=0)
    if result.error is not None:
        raise StudyFailure(name, result.error.reason, result.error.detail)
    return scan, result, scan_cfg, prep


def slices_u8(records: list[dict], input_size: int) -> np.ndarray:
    """The records' PNGs through the input pipeline's decoding: (N, S, S, 3) uint8."""
    from covid_keras.core import schema
    from covid_keras.io import data

    return np.stack([data.decode_image(r[schema.IMAGE], input_size).numpy()
                     for r in records])


def masks_u8(records: list[dict], input_size: int) -> np.ndarray:
    """The records' lung masks (``mask/encoded``, 255 = lung) at the model's input size,
    aligned with :func:`slices_u8`'s images: (N, S, S) uint8."""
    import cv2

    from covid_keras.core import schema

    out = []
    for r in records:
        m = cv2.imdecode(np.frombuffer(bytes(r[schema.MASK]), np.uint8), cv2.IMREAD_GRAYSCALE)
        if m.shape != (input_size, input_size):
            m = cv2.resize(m, (input_size, input_size), interpolation=cv2.INTER_NEAREST)
        out.append(m)
    return np.stack(out) if out else np.zeros((0, input_size, input_size), np.uint8)


def model_masks_u8(records: list[dict], input_size: int) -> np.ndarray:
    """The records' lung masks as a lung model's ``lung_masks`` input: (N, S, S) uint8,
    255 = lung, resized as the input pipeline resizes them for training and evaluation
    (:func:`covid_keras.io.data.decode_mask`)."""
    from covid_keras.core import schema
    from covid_keras.io import data

    out = [data.decode_image(r[schema.MASK], input_size, rgb=False).numpy()[..., 0]
           for r in records]
    return np.stack(out) if out else np.zeros((0, input_size, input_size), np.uint8)


LUNG_MASKS = "lung_masks"  # serving_signatures.LUNG_MASKS (no TF import here)


def mask_inputs(lung: bool, signature: str, masks) -> dict:
    """``{"lung_masks": masks}`` for a lung model (one-line error without them), else {}."""
    if not lung:
        return {}
    if masks is None:
        raise ValueError(f"a lung model (navigator_anchors=lung): {signature} needs its "
                         f"{LUNG_MASKS!r} input (the study's lung masks)")
    return {LUNG_MASKS: np.asarray(masks, np.uint8)}


# ------------------------------------------------------------------ models
class LocalModel:
    """A SavedModel, run folder or .keras file, called in this process."""

    def __init__(self, path: str):
        self.path = path
        self.info, self.study_fn, self.cam_fn, self.source = _load(path)
        # its predict_study and gradcam take the lung masks too
        self.lung = takes_lung_mask(self.info)
        spec = getattr(self.study_fn, "structured_input_signature", None)
        if self.lung and spec and LUNG_MASKS not in spec[1]:  # exported before the input
            raise ValueError(f"{path}: a lung model's export whose predict_study has no "
                             f"{LUNG_MASKS!r} input: export the run again")

    def predict_study(self, images: np.ndarray, masks: np.ndarray | None = None) -> dict:
        import tensorflow as tf

        extra = {k: tf.constant(v) for k, v in
                 mask_inputs(self.lung, "predict_study", masks).items()}
        out = self.study_fn(images=tf.constant(images, tf.float32), **extra)
        return {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in
                out.items()}

    def gradcam(self, images: np.ndarray, class_index: int,
                masks: np.ndarray | None = None) -> np.ndarray:
        import tensorflow as tf

        extra = {k: tf.constant(v) for k, v in
                 mask_inputs(self.lung, "gradcam", masks).items()}
        out = self.cam_fn(images=tf.constant(images, tf.float32),
                          class_index=tf.fill([len(images)], tf.constant(class_index,
                                                                         tf.int32)),
                          **extra)
        return np.asarray(out["heatmaps"])


def find_export(path: str) -> str | None:
    """``path`` if it is a SavedModel version folder; the highest version when it is a
    folder of versions; else None."""
    from covid_keras.serving.exporter import versions

    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    found = versions(path) if os.path.isdir(path) else []
    return os.path.join(path, str(found[-1])) if found else None


def read_export_info(version_dir: str) -> dict:
    from covid_keras.serving.exporter import ASSETS_EXTRA, INFO_FILE

    p = os.path.join(version_dir, ASSETS_EXTRA, INFO_FILE)
    if not os.path.isfile(p):
        raise ValueError(f"{version_dir} is a SavedModel without assets.extra/{INFO_FILE}: "
                         "not a covid_keras export")
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def _load(path: str):
    export_dir = find_export(path) if os.path.isdir(path) else None
    if export_dir:
        import tensorflow as tf

        info = read_export_info(export_dir)
        loaded = tf.saved_model.load(export_dir)
        return (info, loaded.signatures["predict_study"], loaded.signatures["gradcam"],
                {"kind": "savedmodel", "model_name": info.get("model_name"),
                 # a string, as TF Serving's model_spec.version (--server) says it
                 "version": None if info.get("version") is None else str(info["version"])})
    from covid_keras.serving import exporter
    from covid_keras.serving.serving_signatures import Signatures

    if os.path.isdir(path):
        model, info, decision = exporter.load_run(path)
        source = {"kind": "run", "checkpoint": info["checkpoint"]}
    elif os.path.isfile(path) and path.endswith(".keras"):
        from covid_keras.model.saving import load_model

        model = load_model(path, compile=False)
        if model.covid_keras_info is None:
            raise ValueError(f"{os.path.basename(path)} carries no class names")
        prep, warnings = exporter.data_prep_settings(None, model.covid_keras_info["input_size"])
        warnings.append("a .keras file has no decision: predict decides by argmax")
        info = exporter.export_info(model.covid_keras_info, prep, None, None, path, warnings)
        decision = None
        source = {"kind": "keras", "checkpoint": os.path.basename(path)}
    else:
        raise FileNotFoundError(f"--model {path} is not an export, a run folder or a "
                                ".keras file")
    sigs = Signatures(model, info, decision)
    return info, sigs.predict_study, sigs.gradcam, source


class ServerModel:
    """The model on a TF Serving REST endpoint (``predict_study`` and ``gradcam``)."""

    def __init__(self, url: str, model_name: str, info: dict | None, timeout_s: float,
                 token: str | None = None):
        import requests

        self.url = url.rstrip("/") + f"/v1/models/{model_name}"
        self.timeout = timeout_s
        self.session = requests.Session()
        if token:  # a server started with --auth_token_file
            self.session.headers["Authorization"] = f"Bearer {token}"
        meta = self._call("GET", "/metadata")
        sig = meta["metadata"]["signature_def"]["signature_def"].get("predict_study")
        if sig is None:
            raise ValueError(f"the served model {model_name} has no predict_study signature "
                             "(not a covid_keras export)")
        dims = sig["inputs"]["images"]["tensor_shape"]["dim"]
        size = int(dims[1]["size"])
        # a lung model's signature takes the masks too (its export info says so)
        self.lung = LUNG_MASKS in sig["inputs"]
        self.version = meta["model_spec"]["version"]
        if info is None:
            from covid_keras.serving import exporter

            prep, warnings = exporter.data_prep_settings(None, size)
            info = {"input_size": size, "windows": prep["windows"],
                    "data_prep": {"records_image_size": size, "flags": {},
                                  "preprocessing": None},
                    "warnings": warnings + ["--server without --model: data_prep's default "
                                            "preprocessing is assumed"]}
        elif int(info["input_size"]) != size:
            raise ValueError(f"--model's input size {info['input_size']} differs from the "
                             f"served model's {size}")
        if self.lung and info.get("navigator_anchors") != "lung":
            info = {**info, "navigator_anchors": "lung"}
        self.info = info
        self.source = {"kind": "server", "model_name": model_name, "version": self.version}

    def _call(self, method: str, suffix: str, body: dict | None = None) -> dict:
        import requests

        try:
            r = self.session.request(method, self.url + suffix, json=body,
                                     timeout=self.timeout)
        except requests.RequestException as exc:
            raise ServerUnreachable(f"cannot reach the model server at "
                                    f"{public_url(self.url)} ({type(exc).__name__})") from None
        try:
            out = r.json()
        except ValueError:
            out = {"error": f"HTTP {r.status_code}, not JSON"}
        if r.status_code != 200:
            raise ValueError(f"model server: HTTP {r.status_code}: {out.get('error')}")
        return out

    def predict_study(self, images: np.ndarray, masks: np.ndarray | None = None) -> dict:
        extra = {k: v.tolist() for k, v in
                 mask_inputs(self.lung, "predict_study", masks).items()}
        out = self._call("POST", ":predict", {
            "signature_name": "predict_study",
            "inputs": {"images": np.rint(images).astype(np.uint8).tolist(),
                       **extra}})["outputs"]
        return {k: np.asarray(v) for k, v in out.items()}

    def gradcam(self, images: np.ndarray, class_index: int,
                masks: np.ndarray | None = None) -> np.ndarray:
        extra = {k: v.tolist() for k, v in mask_inputs(self.lung, "gradcam", masks).items()}
        out = self._call("POST", ":predict", {
            "signature_name": "gradcam",
            "inputs": {"images": np.rint(images).astype(np.uint8).tolist(),
                       "class_index": [int(class_index)] * len(images),
                       **extra}})["outputs"]
        return np.asarray(out, np.float32)


# ------------------------------------------------------------------ evidence
LUNG_OUTLINE_RGB = (64, 224, 255)


def lung_outline(mask_u8: np.ndarray, side: int) -> list:
    """The lung mask's outer contours (OpenCV point arrays) scaled to ``side`` pixels."""
    import cv2

    big = cv2.resize((mask_u8 > 127).astype(np.uint8), (side, side),
                     interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(contours)


def evidence_png(image_u8: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                 heat: np.ndarray | None, mask_u8: np.ndarray | None = None) -> bytes:
    """The slice with the lung outline (``mask_u8``, cyan) and its boxes, clipped to the
    image (left), and the Grad-CAM overlay (right), at least 256 px."""
    import cv2

    from data_prep.study import encode_png

    grey = image_u8[..., 0]
    size = grey.shape[0]
    scale = max(1, int(np.ceil(256 / size)))
    big = cv2.resize(grey, (size * scale, size * scale), interpolation=cv2.INTER_NEAREST)
    left = cv2.cvtColor(big, cv2.COLOR_GRAY2RGB)
    if mask_u8 is not None:
        cv2.drawContours(left, lung_outline(mask_u8, size * scale), -1, LUNG_OUTLINE_RGB, 1)
    for (y0, x0, y1, x1), s in zip(np.clip(boxes, 0.0, float(size)), scores):
        p0 = (int(round(x0 * scale)), int(round(y0 * scale)))
        p1 = (int(round(x1 * scale)) - 1, int(round(y1 * scale)) - 1)
        cv2.rectangle(left, p0, p1, (255, 64, 64), 2)
        cv2.putText(left, f"{s:.2f}", (p0[0] + 3, max(p0[1] + 14, 14)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1, cv2.LINE_AA)
    panels = [left]
    if heat is not None:
        h = cv2.resize(np.clip(heat, 0, 1).astype(np.float32), big.shape[::-1],
                       interpolation=cv2.INTER_LINEAR)
        colour = cv2.applyColorMap(np.rint(h * 255).astype(np.uint8), cv2.COLORMAP_JET)
        colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
        base = cv2.cvtColor(big, cv2.COLOR_GRAY2RGB)
        panels.append(np.rint(0.6 * base + 0.4 * colour).astype(np.uint8))
    return encode_png(np.concatenate(panels, axis=1))


# ------------------------------------------------------------------ the answer
def _warnings(scan, result, kept: int, num_slices: int, info: dict) -> list[dict]:
    out: list[dict] = []
    for issue in list(scan.issues) + list(result.issues):
        out.append({"reason": issue.reason, "file": issue.file, "detail": issue.detail})
    if result.dropped:
        out.append({"reason": "slices_dropped", "file": "", "detail": ", ".join(
            f"{k} {v}" for k, v in sorted(result.dropped.items()))})
    if kept < max(3, num_slices // 3):
        out.append({"reason": "few_slices", "file": "",
                    "detail": f"{kept} slices used (of {num_slices} sampled at most)"})
    if scan.kind == "images":
        out.append({"reason": "not_ct_verified", "file": "",
                    "detail": "PNG/JPEG slices carry no modality or HU: a CT in the "
                              "records' window is assumed"})
    for w in info.get("warnings") or []:
        out.append({"reason": "model", "file": "", "detail": w})
    return out


def _no_lung_warnings(no_lung: list[bool], threshold: float) -> list[dict]:
    """``no_lung``: slices (or the whole study) whose lung fraction (lung mask / body area,
    data_prep's) is below data_prep's ``min_lung_fraction``: not chest CT of the lungs, so
    their probabilities mean nothing. Such slices reach the model only when the records
    were built with ``--nolung_filter``; with the filter a study without lung is refused
    (``no_lung_slices``)."""
    count = sum(no_lung)
    if not count:
        return []
    which = ("no slice shows lung: this may not be a chest CT, and the answer is not "
             "meaningful" if count == len(no_lung) else
             f"{count} of {len(no_lung)} slices show no lung (slices "
             f"{', '.join(str(i) for i, n in enumerate(no_lung) if n)})")
    return [{"reason": "no_lung", "file": "",
             "detail": f"{which}; lung fraction below data_prep's min_lung_fraction "
                       f"{threshold:g}"}]


def _series(scan, result, scan_cfg) -> dict:
    rejected = [i.detail for i in scan.issues if i.reason == "series_rejected"]
    if scan.kind == "dicom":
        why = ("the axial CT series with the most slices" +
               (f" ({len(rejected)} other series rejected or shorter)" if rejected else
                " (the only usable series)"))
    else:
        why = "the study's PNG/JPEG slices, in natural name order"
    return {"kind": scan.kind, "series_key": scan.series_key,
            "slices_in_series": int(scan.slice_count), "sampled": len(scan.sampled),
            "used": len(result.records), "sampling": scan_cfg.sampling,
            "why": why, "other_series": rejected}


def predict_study(study: str, model, output_dir: str, salt: bytes, top: int = 3,
                  overwrite: bool = False, max_zip_bytes: int = 2 << 30,
                  max_zip_files: int = 20000) -> dict:
    """The whole command (see the module docstring); returns prediction.json's content."""
    from covid_keras import __version__
    from covid_keras.core import schema
    from data_prep import redact

    name = redact.study_name("study", os.path.abspath(study), salt)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"--output_dir {output_dir} is not empty (--overwrite replaces it)")
    if not os.path.exists(study):
        raise StudyFailure(name, "unreadable_path", "path does not exist")
    info = model.info
    with tempfile.TemporaryDirectory(prefix="covid_keras_predict_") as tmp:
        path = study
        if os.path.isfile(study) and zipfile.is_zipfile(study):
            path = unpack_zip(study, os.path.join(tmp, "study"), name, max_zip_bytes,
                              max_zip_files)
        elif os.path.isfile(study) and study.lower().endswith(".zip"):
            raise StudyFailure(name, "corrupt_zip", "not a readable zip file")
        scan, result, scan_cfg, prep = prepare_study(path, name, info, salt)
    size = int(info["input_size"])
    images = slices_u8(result.records, size)
    # a lung model's navigator gets the study's lung masks (data_prep's), as evaluation
    # gives it the records'; an unrestricted model takes the images alone
    model_masks = model_masks_u8(result.records, size) if takes_lung_mask(info) else None

    def lung(index=slice(None)) -> tuple:  # the model's extra argument, if it takes one
        return () if model_masks is None else (model_masks[index],)

    try:
        out = model.predict_study(images.astype(np.float32), *lung())
    except ValueError as exc:
        raise StudyFailure(name, "model_refused", str(exc)) from None
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in
               np.asarray(out["class_names"]).tolist()]
    decision = int(out["decision"])
    threshold = float(out["threshold"])
    argmax = threshold < 0  # the signature's answer without a decision
    slice_probs = np.asarray(out["slice_probabilities"], np.float64)
    # clipped to the image (an export made before its signature clipped them answers
    # boxes that start past the edge, e.g. y0 = -2.3)
    boxes = np.clip(np.asarray(out["boxes"], np.float64).reshape(len(images), -1, 4), 0.0,
                    float(size))
    masks = masks_u8(result.records, size)
    no_lung = [float(r[schema.LUNG_FRACTION]) < prep.min_lung_fraction
               for r in result.records]
    box_scores = np.asarray(out["box_scores"], np.float64).reshape(len(images), -1)
    order = np.argsort(-slice_probs[:, decision], kind="stable")[:max(0, top)]
    heat = (model.gradcam(images[order].astype(np.float32), decision, *lung(order))
            if len(order) else [])
    stage = os.path.join(os.path.dirname(os.path.abspath(output_dir)) or ".",
                         f".{os.path.basename(os.path.abspath(output_dir))}.partial-"
                         f"{os.getpid()}")
    slices = []
    evidence = {}
    for rank, i in enumerate(order.tolist(), start=1):
        evidence[i] = f"evidence_{rank}.png"
    for i, rec in enumerate(result.records):
        slices.append({
            "sop_key": rec[schema.SOP_KEY], "index": int(rec[schema.SLICE_INDEX]),
            "position_mm": float(rec[schema.POSITION_MM]),
            "lung_fraction": float(rec[schema.LUNG_FRACTION]),
            "no_lung": bool(no_lung[i]),
            "probabilities": dict(zip(classes, slice_probs[i].tolist())),
            "boxes": [{"box_yxyx": b.tolist(), "score": float(s)}
                      for b, s in zip(boxes[i], box_scores[i])],
            "evidence": evidence.get(i)})
    d = info.get("decision") or {}
    answer = {
        "format_version": FORMAT_VERSION, "tool": "covid_keras.predict",
        "covid_keras_version": __version__, "study": name,
        "model": {**model.source, "class_names": classes, "input_size": size,
                  "backbone": info.get("backbone"), "git_sha": info.get("git_sha"),
                  # "lung": boxes among the anchors on the study's lung mask
                  "navigator_anchors": info.get("navigator_anchors", "all")},
        "patient": {
            "probabilities": dict(zip(classes, np.asarray(out["probabilities"],
                                                          np.float64).tolist())),
            "decision": classes[decision], "decision_index": decision,
            "score": float(out["score"]), "rule": _text(out["rule"]),
            "method": "argmax" if argmax else "threshold",
            "threshold": None if argmax else float(d.get("threshold", threshold)),
            "positive_class": d.get("positive_class"),
            # the "any" rule's normal class (normal only if every slice is decided normal)
            "normal_class": None if argmax else d.get("normal_class")},
        "series": _series(scan, result, scan_cfg),
        "slices": slices,
        "top_slices": [int(i) for i in order.tolist()],
        "boxes_in": f"(y0, x0, y1, x1) pixels of the {size} px prepared slice",
        "preprocessing": {"num_slices": scan_cfg.num_slices, "sampling": scan_cfg.sampling,
                          "image_size": prep.image_size, "windows": [list(w) for w in
                                                                     prep.windows],
                          "fill_blank": prep.fill_blank,
                          "min_lung_fraction": prep.min_lung_fraction},
        "warnings": _warnings(scan, result, len(result.records), scan_cfg.num_slices, info)
        + _no_lung_warnings(no_lung, prep.min_lung_fraction),
    }
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    try:
        for k, i in enumerate(order.tolist()):
            files.atomic_write_bytes(os.path.join(stage, evidence[i]), evidence_png(
                images[i], boxes[i], box_scores[i], heat[k] if len(heat) else None,
                masks[i]))
        files.write_json(os.path.join(stage, JSON_FILE), answer)
        _swap_in(stage, output_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return answer


def _text(v) -> str:
    v = np.asarray(v).item()
    return v.decode() if isinstance(v, bytes) else str(v)


def _swap_in(stage: str, output_dir: str) -> None:
    old = None
    if os.path.exists(output_dir):
        old = f"{stage}.old"
        os.rename(output_dir, old)
    os.rename(stage, output_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def warning_lines(warnings: list[dict]) -> list[str]:
    """prediction.json's warnings for the console: one line per reason (its count and its
    first detail; every one is in prediction.json)."""
    by_reason: dict[str, list[str]] = {}
    for w in warnings:
        where = f"{w['file']}: " if w.get("file") else ""  # a pseudonym, never the name
        by_reason.setdefault(str(w.get("reason")), []).append(where + str(w.get("detail", "")))
    out = []
    for reason, details in by_reason.items():
        more = f" (and {len(details) - 1} more in prediction.json)" if len(details) > 1 else ""
        out.append(f"warning: {reason}: {details[0]}{more}")
    return out
