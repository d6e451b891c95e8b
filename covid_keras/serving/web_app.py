"""The diagnosis page of ``python -m covid_keras.web`` (whose docstring describes it): the
Starlette app (:func:`create_app`: upload, login, the model card), upload checks and
limits, the per-request folders and their disk budget, and the model it calls
(:func:`load`, :func:`build_card`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import json
import logging
import os
import re
import shutil
import tempfile
import time
from importlib import resources

log = logging.getLogger("covid_keras.web")
STATIC = "web_static"
NOTICE = "Research use only: not for clinical use."
UPLOAD_FIELD = "files"
IGNORED_PARTS = ("__MACOSX",)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
                    "X-Frame-Options": "DENY"}


# ------------------------------------------------------------------ limits, errors
@dataclasses.dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 1 << 30
    max_files: int = 2000
    max_zip_bytes: int = 2 << 30
    max_zip_files: int = 20000
    max_queue: int = 32
    disk_budget_bytes: int = 8 << 30
    idle_timeout_s: float = 60.0
    dicom_head_bytes: int = 4096

    def describe(self) -> str:
        return (f"at most {_mb(self.max_upload_bytes)} and {self.max_files} files per upload; "
                f"a zip may expand to {_mb(self.max_zip_bytes)} and {self.max_zip_files} "
                "entries")


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.4g} MB"


class UploadRejected(ValueError):
    """The upload is refused before it reaches predict: ``reason`` and one sentence."""

    def __init__(self, reason: str, message: str, status: int = 400):
        super().__init__(message)
        self.reason = reason
        self.status = status


# ------------------------------------------------------------------ what a file is
def sniff(head: bytes) -> str | None:
    """'dicom', 'png', 'jpeg' or 'zip' from a file's first 132 bytes; None otherwise."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    return None


# DICOM Part 10: a 128-byte preamble, "DICM", then the file meta group (0002,xxxx) in
# explicit VR little endian, holding at least the transfer syntax (0002,0010).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def dicom_meta_ok(head: bytes, complete: bool) -> bool | None:
    """Whether ``head`` (a file's first bytes; ``complete``: the whole file) is a DICOM file
    whose preamble and file meta header parse. None: not decided yet (more bytes needed)."""
    if len(head) < 132:
        return False if complete else None
    if head[128:132] != b"DICM":
        return False
    i, seen_syntax = 132, False
    while True:
        if i + 8 > len(head):
            return (seen_syntax or None) if not complete else seen_syntax
        group = int.from_bytes(head[i:i + 2], "little")
        if group != 2:
            return seen_syntax
        elem = int.from_bytes(head[i + 2:i + 4], "little")
        vr = head[i + 4:i + 6]
        if not (vr.isalpha() and vr.isupper()):
            return False
        if vr in _LONG_VRS:
            if i + 12 > len(head):
                return None if not complete else False
            length, start = int.from_bytes(head[i + 8:i + 12], "little"), i + 12
        else:
            length, start = int.from_bytes(head[i + 6:i + 8], "little"), i + 8
        if length > 1024:  # no file meta element is this long
            return False
        if elem == 0x0010:
            if start + length > len(head):
                return None if not complete else False
            uid = head[start:start + length].rstrip(b"\0 ")
            if not uid or not re.fullmatch(rb"[0-9.]+", uid):
                return False
            seen_syntax = True
        i = start + length


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(132)


def upload_parts(name: str, index: int) -> list[str] | None:
    """The relative path an uploaded file's name asks for, made safe: ``..`` refused,
    absolute names made relative, odd characters replaced; None for names to ignore (``.*``
    files and folders, ``__MACOSX``)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UploadRejected("unsafe_name", f"file {index} of the upload has a '..' part in "
                                            "its name: refused")
    if not parts:
        parts = [f"file{index:05d}"]
    if any(p.startswith(".") for p in parts) or parts[0] in IGNORED_PARTS:
        return None
    return [re.sub(r"[^\w.\- ]", "_", p)[:120] for p in parts]


def _unique(path: str) -> str:
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    n = 2
    while os.path.exists(f"{stem}~{n}{ext}"):
        n += 1
    return f"{stem}~{n}{ext}"


def check_study_folder(folder: str, limits: Limits) -> dict:
    """Every file under ``folder`` (an unpacked zip) must be DICOM, PNG or JPEG; ignored
    names are removed. Returns {kind: count}."""
    counts: dict = {}
    files = []
    for root, dirs, names in os.walk(folder):
        rel = os.path.relpath(root, folder)
        for d in list(dirs):
            if d.startswith(".") or (rel == "." and d in IGNORED_PARTS):
                shutil.rmtree(os.path.join(root, d))
                dirs.remove(d)
        for n in sorted(names):
            path = os.path.join(root, n)
            if n.startswith("."):
                os.remove(path)
                continue
            files.append(path)
    if len(files) > limits.max_files:
        raise UploadRejected("too_many_files", f"the zip holds {len(files)} files; at most "
                                               f"{limits.max_files} are accepted", 413)
    for i, path in enumerate(sorted(files), start=1):
        if os.path.islink(path) or not os.path.isfile(path):
            raise UploadRejected("not_an_image", f"zip entry {i} is not a regular file")
        kind = sniff(_head(path))
        if kind in (None, "zip"):
            raise UploadRejected("not_an_image", f"zip entry {i} is not a DICOM, PNG or "
                                                 "JPEG file")
        counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        raise UploadRejected("empty_upload", "the zip holds no DICOM, PNG or JPEG file")
    return counts


# ------------------------------------------------------------------ receiving an upload
async def receive_upload(request, dest: str, limits: Limits,
                         skipped: list | None = None) -> list[tuple[str, str]]:
    """Streams a multipart/form-data request's ``files`` parts straight into ``dest`` (no
    copy elsewhere, nothing held in memory beyond one chunk), enforcing the limits while it
    reads. Returns [(path, kind)] in upload order.

    A file that starts as DICOM but whose file meta header does not parse is skipped (its
    bytes are removed and the rest of it is not written) and named in ``skipped`` by its
    position in the upload, never by its name; the upload is refused (``bad_dicom``) only
    when no usable file remains."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadRejected("not_multipart", "send the files as multipart/form-data (the "
                                              "page's form does)", 415)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_upload_bytes:
        raise UploadRejected("too_large", f"the upload is {_mb(int(declared))}; at most "
                                          f"{_mb(limits.max_upload_bytes)} is accepted", 413)
    state = {"headers": {}, "field": b"", "value": b"", "file": None, "head": b"",
             "path": None, "skip": False, "kind": None, "position": 0}
    out: list[str] = []
    kinds: list[str] = []
    skipped = [] if skipped is None else skipped
    keep = max(132, limits.dicom_head_bytes)

    def skip_part(why: str) -> None:
        """This part's file is dropped: what was written is removed, the rest is not
        written, and the upload goes on with the next file."""
        if state["file"] is not None:
            state["file"].close()
            state["file"] = None
        with contextlib.suppress(FileNotFoundError):
            os.remove(state["path"])
        out.pop()
        state["skip"] = True
        skipped.append(f"file {state['position']} of the upload was skipped: {why}")

    def check_head(complete: bool) -> None:
        """What the file is, decided from its first bytes while it streams in: a file
        that is not DICOM, PNG, JPEG or zip, or a DICOM file whose meta header does not
        parse within its first ``dicom_head_bytes``, is refused before the rest arrives."""
        head = state["head"]
        if state["skip"] or state["kind"] is not None or (len(head) < 132 and not complete):
            return
        kind = sniff(head)
        index = state["position"]
        if kind is None:
            raise UploadRejected("not_an_image", f"file {index} of the upload is not a "
                                                 "DICOM, PNG or JPEG file, nor a zip of them")
        if kind == "dicom":
            ok = dicom_meta_ok(head, complete or len(head) >= keep)
            if ok is None:
                return
            if not ok:
                skip_part("it starts as DICOM but its file meta header does not parse "
                          f"within its first {keep} bytes")
                return
        state["kind"] = kind

    def on_part_begin():
        state.update(headers={}, file=None, head=b"", path=None, skip=False, kind=None)

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        _, opts = parse_options_header(state["headers"].get(b"content-disposition", b""))
        if opts.get(b"name", b"") != UPLOAD_FIELD.encode() or b"filename" not in opts:
            raise UploadRejected("bad_form", f"only file fields named {UPLOAD_FIELD!r} are "
                                             "accepted")
        state["position"] += 1
        index = len(out) + 1
        if index > limits.max_files:
            raise UploadRejected("too_many_files", f"more than {limits.max_files} files in "
                                                   "one upload", 413)
        name = opts[b"filename"].decode("utf-8", "replace")
        parts = upload_parts(name, state["position"])
        if parts is None:
            state["skip"] = True
            return
        path = _unique(os.path.join(dest, *parts))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state["path"] = path
        state["file"] = open(path, "xb")  # noqa: SIM115 - closed at the part's end
        out.append(path)

    def on_part_data(data, start, end):
        if state["file"] is not None:
            chunk = data[start:end]
            if len(state["head"]) < keep:
                state["head"] += chunk[:keep - len(state["head"])]
                check_head(False)
            if state["file"] is not None:  # not skipped by check_head
                state["file"].write(chunk)

    def on_part_end():
        if state["file"] is not None:
            state["file"].close()
            state["file"] = None
            check_head(True)
            if not state["skip"]:
                kinds.append(state["kind"])

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data,
        "on_part_end": on_part_end, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished})
    import anyio

    total = 0
    stream = request.stream().__aiter__()
    try:
        while True:
            try:
                with anyio.fail_after(limits.idle_timeout_s):
                    chunk = await stream.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise UploadRejected("timeout", f"the upload stalled for "
                                                f"{limits.idle_timeout_s:g} s", 408) from None
            total += len(chunk)
            if total > limits.max_upload_bytes:
                raise UploadRejected("too_large", f"the upload is over "
                                                  f"{_mb(limits.max_upload_bytes)}", 413)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError:
        raise UploadRejected("bad_form", "the upload is not well-formed multipart/form-data")
    finally:
        if state["file"] is not None:
            state["file"].close()
    if not out and skipped:
        more = f" (and {len(skipped) - 1} more file(s) like it)" if len(skipped) > 1 else ""
        raise UploadRejected("bad_dicom", f"no usable file: {skipped[0]}{more}")
    if not out:
        raise UploadRejected("empty_upload", "no file was uploaded")
    files = list(zip(out, kinds))
    if any(k == "zip" for _, k in files) and len(files) > 1:
        raise UploadRejected("zip_not_alone", "upload one zip alone, or the study's files "
                                              "without a zip")
    return files


# ------------------------------------------------------------------ the model card
def _entry(m: dict | None) -> dict | None:
    if not isinstance(m, dict) or "value" not in m:
        return None
    return {"value": m.get("value"), "ci95": m.get("ci95")}


def read_metrics(path: str) -> dict:
    """An evaluation's metrics.json (a file or the folder holding it). Refuses a training
    run's metrics.json (no CIs)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    patient = m.get("patient") if isinstance(m, dict) else None
    if not isinstance(patient, dict) or _entry(patient.get("auc")) is None:
        raise ValueError(f"{path} is not an evaluation's metrics.json (python -m "
                         "covid_keras.evaluate writes one, with CIs; a training run's "
                         "metrics.json has none)")
    return m


def read_manifest(path: str) -> tuple[dict, str]:
    import hashlib

    from covid_keras.core import schema

    if os.path.isdir(path):
        path = os.path.join(path, schema.MANIFEST)
    with open(path, "rb") as f:
        raw = f.read()
    return json.loads(raw), hashlib.sha256(raw).hexdigest()


def find_run_files(model_path: str | None) -> tuple[str | None, str | None]:
    """(metrics.json, manifest.json) a training run folder leads to: its evaluate output
    (``eval_val/`` first, else the first ``eval_*/``) and its run_info's data_dir."""
    from covid_keras.core import schema
    from covid_keras.io.run_dir import RunDir

    run = RunDir(model_path) if model_path else None
    if run is None or not os.path.isfile(run.run_info_path):
        return None, None
    metrics = run.evaluation_metrics()
    manifest = None
    try:
        data_dir = run.flags().get("data_dir")
        if data_dir and os.path.isfile(os.path.join(data_dir, schema.MANIFEST)):
            manifest = os.path.join(data_dir, schema.MANIFEST)
    except (OSError, ValueError):
        pass
    return metrics, manifest


def model_card(info: dict, source: dict, metrics: dict | None = None,
               manifest: tuple[dict, str] | None = None, manifest_given: bool = False
               ) -> dict:
    """The model card's content, every figure read from the export info (``assets.extra/
    covid_keras.json``), the evaluation's metrics.json and the dataset manifest."""
    from covid_keras.evaluation.metrics import METRICS

    classes = list(info.get("class_names") or [])
    limits: list[str] = []
    d = info.get("decision") or {}
    dp = info.get("data_prep") or {}
    card: dict = {
        "model": {"kind": info.get("model"), "backbone": info.get("backbone"),
                  "variant": info.get("variant"), "input_size": info.get("input_size"),
                  "classes": classes, "source": source.get("kind"),
                  "name": source.get("model_name") or info.get("model_name"),
                  "version": source.get("version") or info.get("version"),
                  "checkpoint": info.get("checkpoint"),
                  "exported_at": info.get("exported_at"),
                  "covid_keras_version": info.get("covid_keras_version"),
                  "trained_git_sha": info.get("trained_git_sha"),
                  "ensemble": info.get("ensemble")},
        "decision": {k: d.get(k) for k in ("method", "rule", "threshold", "positive_class",
                                           "normal_class", "criterion", "split", "val_sensitivity",
                                           "val_specificity")},
        "training_data": {"windows": info.get("windows"),
                          "preparation": dp.get("flags") or {},
                          "records_image_size": dp.get("records_image_size"),
                          "manifest_sha256": info.get("dataset_manifest_sha256")},
        "validation": None,
        "limits": limits,
    }
    if classes:
        limits.append("It knows only the classes " + ", ".join(classes) + ": a study of any "
                      "other disease is still given one of them.")
    if manifest is not None:
        man, sha = manifest
        if info.get("dataset_manifest_sha256") not in (None, sha):
            if manifest_given:
                raise ValueError("--data_manifest is not the dataset manifest this model was "
                                 "trained on (its SHA-256 differs from the export's)")
            limits.append("The run's dataset manifest changed since export: training data "
                          "counts are not shown.")
        else:
            counts = {}
            for split, by_label in (man.get("counts") or {}).items():
                counts[split] = {label: {k: sum(int(c.get(k, 0)) for c in sites.values())
                                         for k in ("patients", "studies", "slices")}
                                 for label, sites in by_label.items()}
            sites = sorted({s for by_label in (man.get("counts") or {}).values()
                            for label_sites in by_label.values() for s in label_sites})
            card["training_data"].update({"dataset": man.get("dataset"), "counts": counts,
                                          "sites": sites,
                                          "split_scheme": man.get("split_scheme")})
            if len(sites) == 1:
                limits.append(f"Its data come from one site ({sites[0]}): other scanners and "
                              "hospitals are untested.")
    else:
        limits.append("The training data's counts are unknown here (no dataset manifest "
                      "given).")
    for w in info.get("warnings") or []:
        limits.append(f"Export: {w}")
    if metrics is not None:
        mc = list(metrics.get("classes") or [])
        if mc and classes and mc != classes:
            raise ValueError(f"the metrics.json is of a model with classes {mc}, this model "
                             f"has {classes}")
        md = metrics.get("decision") or {}
        levels = {}
        for level in ("patient", "slice"):
            sec = metrics.get(level) or {}
            levels[level] = {"count": sec.get("count"),
                             **{k: _entry(sec.get(k)) for k in METRICS}}
            macro = sec.get("macro") if isinstance(sec.get("macro"), dict) else {}
            if macro:
                levels[level]["macro"] = {k: _entry(macro.get(k)) for k in METRICS
                                          if _entry(macro.get(k))}
        by_class: dict = {}
        for site in (metrics.get("sites") or {}).values():
            for c, n in (site.get("patients_by_class") or {}).items():
                by_class[c] = by_class.get(c, 0) + int(n)
        ece = ((metrics.get("calibration") or {}).get("patient") or {}).get("ece")
        card["validation"] = {
            "split": metrics.get("split"), "positive_class": metrics.get("positive_class"),
            "decision": {"rule": md.get("rule"), "threshold": md.get("threshold"),
                         "chosen_on_split": md.get("chosen_on_split")},
            "bootstrap": metrics.get("bootstrap"), "levels": levels,
            "patients_by_class": by_class, "ece": _entry(ece),
            "checkpoint": os.path.basename(str(metrics.get("checkpoint") or "")) or None}
        if d.get("threshold") is not None and md.get("threshold") is not None and \
                abs(float(d["threshold"]) - float(md["threshold"])) > 1e-6:
            limits.append(f"The metrics were computed at threshold {md['threshold']:.4g}; "
                          f"this model decides at {float(d['threshold']):.4g}.")
        if md.get("chosen_on_split") and md.get("chosen_on_split") == metrics.get("split"):
            limits.append(f"The threshold was chosen on the split these metrics come from "
                          f"({metrics.get('split')}): they are optimistic.")
        for w in metrics.get("warnings") or []:
            limits.append(f"Evaluation: {w}")
    else:
        limits.append("No evaluation was given (--metrics): this model's accuracy is "
                      "unknown here.")
    return card


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "n/a"
    ci = e.get("ci95")
    return _num(e["value"]) + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else "")


def card_html(card: dict) -> str:
    """The model card as HTML (every value escaped)."""
    e = html.escape
    m, d, t, v = card["model"], card["decision"], card["training_data"], card["validation"]
    out = ['<h2>Model card</h2>', '<h3>Model</h3><dl class="kv">']

    def row(k, val):
        if val not in (None, "", [], {}):
            out.append(f"<dt>{e(k)}</dt><dd>{e(str(val))}</dd>")

    row("model", " ".join(str(x) for x in (m["kind"], m["variant"]) if x))
    row("backbone", m["backbone"])
    row("input", f"{m['input_size']} px")
    row("classes", ", ".join(m["classes"]))
    row("export", ", version ".join(str(m[k]) for k in ("name", "version") if m.get(k)))
    row("checkpoint", m["checkpoint"])
    row("exported", m["exported_at"])
    row("covid_keras", m["covid_keras_version"])
    row("trained at git", m["trained_git_sha"])
    ens = m.get("ensemble")
    if ens:
        auc = ens.get("fold_val_patient_auc") or {}
        row("ensemble", f"{ens['members']} fold models ({ens['probabilities']}); the folds' "
                        f"val patient AUC {_num(auc.get('mean'), 3)} +- "
                        f"{_num(auc.get('sd'), 3)}; boxes {ens['boxes']}; heat maps "
                        f"{ens['heat_maps']}")
    if d.get("method") == "threshold":
        row("decision", f"{d['rule']} of the slice probabilities; {d['positive_class']} when "
                        f"its score >= {_num(d['threshold'], 4)} (chosen on {d['split']} by "
                        f"{d['criterion']})" + (
                            f"; {d['normal_class']} only when every slice is"
                            if d.get("rule") == "any" and d.get("normal_class") else ""))
    else:
        row("decision", "the most probable class (argmax; no threshold was chosen)")
    out.append("</dl><h3>Training data</h3><dl class=\"kv\">")
    row("dataset", t.get("dataset"))
    row("windows", ", ".join(f"{w.get('name')} (level {w.get('level_hu')}, width "
                             f"{w.get('width_hu')} HU)" for w in t.get("windows") or []))
    prep = t.get("preparation") or {}
    row("preparation", "; ".join(f"{k} {v if not isinstance(v, list) else ','.join(map(str, v))}"
                                 for k, v in sorted(prep.items())))
    row("sites", ", ".join(t.get("sites") or []))
    row("manifest SHA-256", (t.get("manifest_sha256") or "")[:16])
    out.append("</dl>")
    counts = t.get("counts")
    if counts:
        labels = sorted({lb for s in counts.values() for lb in s})
        out.append('<table class="counts"><tr><th>split</th>' + "".join(
            f"<th>{e(lb)}</th>" for lb in labels) + "</tr>")
        for split, by in sorted(counts.items()):
            cells = "".join(
                f"<td>{by[lb]['patients']} patients, {by[lb]['slices']} slices</td>"
                if lb in by else "<td>0</td>" for lb in labels)
            out.append(f"<tr><td>{e(split)}</td>{cells}</tr>")
        out.append("</table>")
    # the card's "validation" key holds whichever split was evaluated: the heading names it
    split = f" on {e(str(v['split']))}" if v and v.get("split") else ""
    out.append(f"<h3>Evaluation metrics{split}</h3>")
    if v is None:
        out.append('<p class="missing">No evaluation given.</p>')
    else:
        vd, bs = v["decision"], v.get("bootstrap") or {}
        out.append(
            f"<p>Split <b>{e(str(v['split']))}</b>: "
            f"{e(str(v['levels']['patient']['count']))} patients ("
            + e(", ".join(f"{c} {n}" for c, n in v["patients_by_class"].items()))
            + f"), {e(str(v['levels']['slice']['count']))} slices; "
            f"positive class {e(str(v['positive_class']))}, {e(str(vd['rule']))} rule, "
            f"threshold {e(_num(vd['threshold'], 4))} (chosen on "
            f"{e(str(vd['chosen_on_split']))}). 95 % CIs: bootstrap over "
            f"{e(str(bs.get('unit', 'patient')))}s, {e(str(bs.get('resamples')))} resamples."
            "</p>")
        from covid_keras.evaluation.metrics import METRICS

        out.append('<table class="metrics" id="card-metrics"><tr><th>level</th>' + "".join(
            f"<th>{e(k)}</th>" for k in METRICS) + "</tr>")
        for level in ("patient", "slice"):
            lv = v["levels"][level]
            out.append(f"<tr><td>{level}</td>" + "".join(
                f'<td data-metric="{level}-{k}">{e(_ci(lv.get(k)))}</td>' for k in METRICS)
                + "</tr>")
        out.append("</table>")
        if v.get("ece"):
            out.append(f"<p>Calibration (patient ECE): {e(_ci(v['ece']))}</p>")
    out.append('<h3>Known limits</h3><ul class="limits">')
    out += [f"<li>{e(x)}</li>" for x in card["limits"]]
    out.append("</ul>")
    return "\n".join(out)


# ------------------------------------------------------------------ disk: the page's folder
REQUEST_PREFIX = "covid_keras_web_"


def work_root(tmp_dir: str | None) -> str:
    """The folder the page owns for its per-request folders: ``tmp_dir``, or
    ``covid_keras_web-<uid>`` in the system's temporary folder (created private; refused
    when it is a link or another user's)."""
    root = tmp_dir or os.path.join(tempfile.gettempdir(), f"covid_keras_web-{os.getuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    st = os.lstat(root)
    if not os.path.isdir(root) or os.path.islink(root) or (
            tmp_dir is None and st.st_uid != os.getuid()):
        raise ValueError(f"the page's folder {root} is a link or another user's")
    return root


def remove_leftovers(root: str) -> int:
    """Removes the request folders that a page no longer running left in ``root`` (a page
    killed mid-request leaves the uploaded files, PHI included); returns how many."""
    from covid_keras.core import files

    removed = 0
    for name in os.listdir(root):
        if not name.startswith(REQUEST_PREFIX):
            continue
        m = re.match(rf"{REQUEST_PREFIX}(\d+)_", name)
        if m and int(m[1]) != os.getpid() and files.pid_alive(int(m[1])):
            continue  # another page's request in progress
        if m and int(m[1]) == os.getpid():
            continue
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        removed += 1
    return removed


class DiskBudget:
    """What all requests at once may write (uploads and unpacked zips): bytes are reserved
    before they are written; a reservation over what is left is refused (503)."""

    def __init__(self, total: int):
        import threading

        self.total, self.used = total, 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> int:
        with self._lock:
            if self.used + n > self.total:
                raise UploadRejected("busy", f"the server's disk budget is in use "
                                             f"({_mb(self.used)} of {_mb(self.total)}): try "
                                             "again in a minute", 503)
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n


def zip_declared_bytes(zip_path: str, limits: Limits) -> int:
    """What a zip says it expands to (its central directory), refused before anything is
    written when over the per-zip limits or when an entry is a compression bomb."""
    import zipfile

    try:
        with zipfile.ZipFile(zip_path) as zf:
            entries = zf.infolist()
    except (zipfile.BadZipFile, OSError):
        raise UploadRejected("corrupt_zip", "the zip is not readable") from None
    if len(entries) > limits.max_zip_files:
        raise UploadRejected("zip_bomb", f"the zip holds {len(entries)} entries; at most "
                                         f"{limits.max_zip_files}", 413)
    total = sum(e.file_size for e in entries)
    if total > limits.max_zip_bytes:
        raise UploadRejected("zip_bomb", f"the zip expands to {_mb(total)}; at most "
                                         f"{_mb(limits.max_zip_bytes)}", 413)
    for i, e in enumerate(entries, start=1):
        if e.file_size > (1 << 20) and e.file_size > 200 * max(1, e.compress_size):
            raise UploadRejected("zip_bomb", f"zip entry {i} expands "
                                             f"{e.file_size // max(1, e.compress_size)}x", 413)
    return total


# ------------------------------------------------------------------ the app
class ModelUnavailable(RuntimeError):
    """The model server cannot be reached (its message names no study)."""


class ClientGone(Exception):
    """The request's client has gone: its study is not predicted."""


class _OneAtATime:
    """The model seen by predict, its calls serialised (a REST session or a TF function
    shared by the request threads); a model server that cannot be reached is
    :class:`ModelUnavailable`."""

    def __init__(self, model):
        import threading

        self.model = model
        self.info = model.info
        self._source = model.source
        self._lock = threading.Lock()
        self.answered: str | None = None  # the version that answered the last call
        self.cancelled: threading.Event | None = None  # the current request's client gone
        session = getattr(model, "session", None)
        if session is not None and hasattr(session, "hooks"):
            session.hooks["response"].append(self._saw)

    def _saw(self, response, *args, **kwargs):
        version = response.headers.get("X-Model-Version")
        if version and response.status_code == 200 and self._first:
            self.answered, self._first = version, False
        return response

    _first = True

    @property
    def source(self) -> dict:
        """The model's description, naming the version that answered this request (a
        model server may have moved to another version since the page started)."""
        if self.answered is None:
            return self._source
        return {**self._source, "version": self.answered}

    def start_request(self, cancelled) -> None:
        self.answered, self._first, self.cancelled = None, True, cancelled

    def predict_study(self, images, *masks):
        # masks: a lung model's study lung masks (predictor.predict_study sends them)
        if self.cancelled is not None and self.cancelled.is_set():
            raise ClientGone()
        with self._lock, self._reachable():
            return self.model.predict_study(images, *masks)

    def gradcam(self, images, class_index, *masks):
        with self._lock, self._reachable():
            return self.model.gradcam(images, class_index, *masks)

    @contextlib.contextmanager
    def _reachable(self):
        try:
            yield
        except OSError as exc:
            if self.source.get("kind") != "server":
                raise
            from covid_keras.serving import predictor

            if isinstance(exc, predictor.ServerUnreachable):  # its address stays server-side
                log.warning("%s", exc)
                raise ModelUnavailable("cannot reach the model server") from None
            raise ModelUnavailable(str(exc)) from None


def _static(name: str) -> bytes:
    return resources.files("covid_keras").joinpath(STATIC, name).read_bytes()


def index_html(card: dict, limits: Limits, logout: bool = False) -> str:
    """The page; ``logout``: with the sign-out button (when a token is needed)."""
    page = _static("index.html").decode("utf-8")
    button = ('<button type="button" id="logout" class="logout">Sign out</button>'
              if logout else "")
    return (page.replace("<!--NOTICE-->", html.escape(NOTICE))
            .replace("<!--LIMITS-->", html.escape(limits.describe()))
            .replace("<!--LOGOUT-->", button)
            .replace("<!--CARD-->", card_html(card)))


TOKEN_COOKIE = "covid_keras_session"
LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
LOGIN_MAX_BYTES = 4096
LOGIN_CSP = ("default-src 'none'; img-src data:; form-action 'self'; frame-ancestors 'none'; "
             "base-uri 'none'")
#: The login form's referrer policy: a browser sends ``Origin: null`` with a form POST from
#: a page whose policy is no-referrer, which the Origin check refuses; same-origin sends the
#: page's own origin to the page and no referrer anywhere else (it links nowhere).
LOGIN_REFERRER_POLICY = "same-origin"


def login_html(message: str = "") -> str:
    """The login form: the token is POSTed to ``login`` (relative, so a reverse proxy may
    serve the page under a prefix), never sent in a URL."""
    alert = f'<p role="alert"><strong>{html.escape(message)}</strong></p>' if message else ""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="referrer" content="{LOGIN_REFERRER_POLICY}">'
            '<link rel="icon" href="data:,">'
            "<title>covid_keras: sign in</title></head><body>"
            "<h1>Chest CT: COVID-19 diagnosis with evidence</h1>"
            f"<p>{html.escape(NOTICE)}</p>{alert}"
            '<form method="post" action="login"><p><label>Access token (the server\'s '
            '--auth_token_file): <input type="password" name="token" '
            'autocomplete="current-password" required autofocus></label></p>'
            '<p><button type="submit">Sign in</button></p></form></body></html>\n')


class _HostCheck:
    """ASGI middleware: every HTTP request, whatever its path (the login and unknown paths
    included), is refused (403) unless its Host header is allowed (DNS rebinding)."""

    def __init__(self, app, access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            from starlette.datastructures import Headers
            from starlette.responses import JSONResponse

            if not self.access.host_ok(Headers(scope=scope).get("host")):
                response = JSONResponse({"error": "Host not allowed (--allowed_hosts)",
                                         "reason": "forbidden"}, 403,
                                        headers=SECURITY_HEADERS)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model, card: dict, salt: bytes, limits: Limits = Limits(),
               top_slices: int = 3, tmp_dir: str | None = None, debug: bool = False,
               access=None, sessions=None, login_limiter=None, secure_cookies: bool = False):
    """The Starlette app: ``GET /`` (the page), ``GET /static/{app.js,style.css}``,
    ``GET /api/card``, ``POST /api/predict`` (multipart ``files``), ``GET|POST /login``
    (the token form), ``POST /logout``. ``access``: a
    :class:`covid_keras.serving.model_server.Access` (Host on every request, Origin on
    POSTs, the token on all but the login and logout; None: none). With a token:
    ``sessions`` (a :class:`covid_keras.serving.web_auth.Sessions`; default: from the
    token, 12 h) signs and checks the login cookie, ``login_limiter`` (a
    :class:`covid_keras.serving.web_auth.LoginLimiter`; default 5 bad tokens a minute per
    address) counts failed logins; ``secure_cookies``: the cookie is Secure (a TLS proxy in
    front)."""
    import threading

    import anyio
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Route

    from covid_keras.core import files
    from covid_keras.serving import predictor, web_auth
    from covid_keras.serving.model_server import Access, ServingError
    from data_prep import redact

    model = _OneAtATime(model)
    access = access or Access()
    root = work_root(tmp_dir)
    removed = remove_leftovers(root)
    if removed:
        log.warning("removed %d request folder(s) a previous run of the page left", removed)
    budget = DiskBudget(limits.disk_budget_bytes)
    card = json.loads(json.dumps(card))  # the page's own copy: it follows the answers
    state = {"page": index_html(card, limits, logout=access.token is not None),
             "version": str(card["model"].get("version"))}
    assets = {"app.js": ("text/javascript", _static("app.js")),
              "style.css": ("text/css", _static("style.css"))}
    one_model = anyio.CapacityLimiter(1)
    waiting = {"n": 0}

    def error(status: int, reason: str, message: str, headers: dict | None = None):
        return JSONResponse({"error": message, "reason": reason}, status,
                            headers={**SECURITY_HEADERS, **(headers or {})})

    if access.token is not None:
        if sessions is None:
            sessions = web_auth.Sessions(access.token)
        if login_limiter is None:  # (an empty limiter is falsy: it has a length)
            login_limiter = web_auth.LoginLimiter()
    login_headers = {**SECURITY_HEADERS, "Content-Security-Policy": LOGIN_CSP,
                     "Referrer-Policy": LOGIN_REFERRER_POLICY}

    def cookie_flags(request) -> dict:
        """HttpOnly, SameSite=Strict, Path=/, and Secure behind TLS (``secure_cookies``, or
        a request uvicorn saw as https: X-Forwarded-Proto from a trusted proxy)."""
        return {"httponly": True, "samesite": "strict", "path": "/",
                "secure": secure_cookies or request.url.scheme == "https"}

    def refused(request, post: bool = False, page: bool = False):
        """The access checks (the Host is checked before routing, by _HostCheck): a
        Response when refused, else None. The token may come as a bearer header or as the
        login's cookie. ``page``: a browser's page, answered with the login form."""
        headers = dict(request.headers)
        # a bearer header the client sent is a guess like a login's: the same limit per
        # address, checked and counted with no await between them
        guess = access.token is not None and "authorization" in headers
        address = request.client.host if request.client else None
        if guess:
            wait = login_limiter.retry_after(address)
            if wait:
                return error(429, "too_many_attempts", "too many wrong tokens from this "
                             f"address: try again in {wait} s", {"Retry-After": str(wait)})
        if (access.token is not None and "authorization" not in headers
                and sessions.valid(request.cookies.get(TOKEN_COOKIE))):
            headers["authorization"] = f"Bearer {access.token}"
        try:
            access.check(headers, post)
        except ServingError as err:
            if guess and err.http == 401:
                login_limiter.failed(address)
            if page and err.http == 401:
                return HTMLResponse(login_html(), 401, headers=login_headers)
            return error(err.http, "forbidden" if err.http == 403 else "unauthorized",
                         str(err))
        return None

    async def index(request):
        return refused(request, page=True) or HTMLResponse(state["page"],
                                                           headers=SECURITY_HEADERS)

    async def login(request):
        """GET: the form. POST (application/x-www-form-urlencoded ``token``, at most
        LOGIN_MAX_BYTES, same-origin): the cookie and a redirect to the page. An address
        with too many bad tokens lately is answered 429 (Retry-After) whatever it sends."""
        if access.token is None:
            return RedirectResponse("./", 303, headers=SECURITY_HEADERS)
        if request.method == "GET":
            return HTMLResponse(login_html(), headers=login_headers)
        if not access.same_origin(request.headers.get("origin"), request.headers.get(
                "host"), request.headers.get("sec-fetch-site")):
            return error(403, "forbidden", "cross-site request refused")
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != (
                "application/x-www-form-urlencoded"):
            return error(415, "not_a_form", "send the token from the login form")
        body = b""
        try:
            with anyio.fail_after(limits.idle_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > LOGIN_MAX_BYTES:
                        return error(413, "too_large", "the login form is over "
                                                       f"{LOGIN_MAX_BYTES} bytes",
                                     {"Connection": "close"})
        except TimeoutError:
            return error(408, "timeout", "the login form stalled", {"Connection": "close"})
        from urllib.parse import parse_qs

        token = (parse_qs(body.decode("latin-1"), max_num_fields=4).get("token") or [""])[0]
        # the limit, the comparison and the count with no await between them: concurrent
        # guesses from one address cannot all pass the limit before the first is counted
        address = request.client.host if request.client else None
        wait = login_limiter.retry_after(address)
        if wait:
            return HTMLResponse(login_html(f"Too many wrong tokens from this address: try "
                                           f"again in {wait} s."), 429,
                                headers={**login_headers, "Retry-After": str(wait)})
        if not access.token_ok(f"Bearer {token}"):  # hmac.compare_digest
            login_limiter.failed(address)
            await anyio.sleep(login_limiter.fail_delay_s)  # slows guessing; costs no thread
            return HTMLResponse(login_html("That is not the token."), 401,
                                headers=login_headers)
        login_limiter.succeeded(address)
        r = RedirectResponse("./", 303, headers=SECURITY_HEADERS)
        r.set_cookie(TOKEN_COOKIE, sessions.issue(), max_age=int(sessions.max_age_s),
                     **cookie_flags(request))
        return r

    async def logout(request):
        """POST, same-origin: the cookie is revoked (in this process, until it would have
        expired) and cleared; a redirect to the login form."""
        if not access.same_origin(request.headers.get("origin"), request.headers.get(
                "host"), request.headers.get("sec-fetch-site")):
            return error(403, "forbidden", "cross-site request refused")
        if access.token is None:
            return RedirectResponse("./", 303, headers=SECURITY_HEADERS)
        sessions.revoke(request.cookies.get(TOKEN_COOKIE))
        r = RedirectResponse(LOGIN_PATH.lstrip("/"), 303, headers=SECURITY_HEADERS)
        r.delete_cookie(TOKEN_COOKIE, **cookie_flags(request))
        return r

    async def static(request):
        no = refused(request)
        if no is not None:
            return no
        item = assets.get(request.path_params["name"])
        if item is None:
            return Response(b"not found", 404, media_type="text/plain")
        return Response(item[1], media_type=item[0], headers=SECURITY_HEADERS)

    async def card_json(request):
        return refused(request) or JSONResponse(card, headers=SECURITY_HEADERS)

    def follow_version(answered) -> str | None:
        """The card names the version that answered (the page's card HTML is rebuilt when
        the model server moved to another version); returns the card HTML when it changed."""
        answered = None if answered is None else str(answered)
        if model.source.get("kind") != "server" or answered is None or (
                answered == state["version"]):
            return None
        first = card["model"].get("exported_version", card["model"].get("version"))
        card["model"]["exported_version"] = first
        card["model"]["version"] = answered
        note = (f"The model server answered with version {answered}; the rest of this card "
                f"describes version {first}, the one the page was started with.")
        card["limits"] = [x for x in card["limits"] if not x.startswith(
            "The model server answered with version")] + [note]
        state["version"] = answered
        state["page"] = index_html(card, limits, logout=access.token is not None)
        return card_html(card)

    def unpack(zip_path: str, study: str) -> int:
        declared = zip_declared_bytes(zip_path, limits)
        reserved = budget.reserve(declared)  # before a byte is written
        try:
            name = redact.study_name("study", os.path.abspath(study), salt)
            try:
                predictor.unpack_zip(zip_path, study, name, declared, limits.max_zip_files)
            finally:
                os.remove(zip_path)
            check_study_folder(study, limits)
        except BaseException:
            budget.release(reserved)
            raise
        return reserved

    def run_predict(study: str, out: str, cancelled, skipped: list[str]) -> dict:
        model.start_request(cancelled)
        answer = predictor.predict_study(study, model, out, salt, top=top_slices,
                                       max_zip_bytes=limits.max_zip_bytes,
                                       max_zip_files=limits.max_zip_files)
        with open(os.path.join(out, predictor.JSON_FILE), encoding="utf-8") as f:
            text = f.read()
        if skipped:  # the upload's skipped files join predict's warnings (and its JSON)
            extra = [{"reason": "file_skipped", "file": why.split(" was skipped")[0],
                      "detail": why} for why in skipped]
            answer["warnings"] = list(answer["warnings"]) + extra
            saved = json.loads(text)
            saved["warnings"] = list(saved.get("warnings") or []) + extra
            text = files.dumps(saved)
        evidence = {}
        for s in answer["slices"]:
            if s.get("evidence"):
                with open(os.path.join(out, s["evidence"]), "rb") as f:
                    evidence[s["evidence"]] = ("data:image/png;base64," +
                                               base64.b64encode(f.read()).decode("ascii"))
        return {"prediction": answer, "prediction_json": text, "evidence": evidence}

    async def watch_disconnect(request, gone, scope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        scope.cancel()

    async def predict_endpoint(request):
        no = refused(request, post=True)
        if no is not None:
            return no
        started = time.monotonic()
        if waiting["n"] >= limits.max_queue:  # receiving and unpacking count as waiting
            return error(503, "busy", f"{waiting['n']} studies are waiting for the model: "
                                      "try again in a minute")
        waiting["n"] += 1
        reserved = 0
        tmp = None
        skipped: list[str] = []
        gone = threading.Event()
        try:
            declared = request.headers.get("content-length")
            upload = (int(declared) if declared and declared.isdigit() else
                      limits.max_upload_bytes)
            if upload > limits.max_upload_bytes:
                raise UploadRejected("too_large", f"the upload is {_mb(upload)}; at most "
                                                  f"{_mb(limits.max_upload_bytes)} is "
                                                  "accepted", 413)
            reserved += budget.reserve(upload)
            tmp = tempfile.mkdtemp(prefix=f"{REQUEST_PREFIX}{os.getpid()}_", dir=root)
            study = os.path.join(tmp, "study")
            os.makedirs(study)
            received = await receive_upload(request, study, limits, skipped)
            if received[0][1] == "zip":
                zip_path = os.path.join(tmp, "upload.zip")
                os.rename(received[0][0], zip_path)
                shutil.rmtree(study)
                reserved += await anyio.to_thread.run_sync(unpack, zip_path, study)
            outcome: dict = {}
            async with anyio.create_task_group() as tg:  # a client gone cancels the wait
                tg.start_soon(watch_disconnect, request, gone, tg.cancel_scope)
                try:
                    outcome["body"] = await anyio.to_thread.run_sync(
                        run_predict, study, os.path.join(tmp, "out"), gone, skipped,
                        limiter=one_model)
                except Exception as exc:  # noqa: BLE001 - raised below, not as a group
                    outcome["error"] = exc
                finally:
                    tg.cancel_scope.cancel()
            if "error" in outcome:
                raise outcome["error"]
            body = outcome.get("body")
            if body is None or gone.is_set():
                return error(499, "client_gone", "the client has gone")
            changed = follow_version(body["prediction"]["model"].get("version"))
            if changed is not None:
                body["card_html"] = changed
            body["elapsed_s"] = round(time.monotonic() - started, 3)
            return JSONResponse(body, headers=SECURITY_HEADERS)
        except UploadRejected as exc:
            return error(exc.status, exc.reason, str(exc),
                         {"Connection": "close"} if exc.status in (408, 413) else None)
        except predictor.StudyFailure as exc:
            return error(422, exc.reason, str(exc))
        except ModelUnavailable as exc:
            return error(502, "model_unavailable", str(exc))
        except ClientGone:
            return error(499, "client_gone", "the client has gone")
        except Exception as exc:  # noqa: BLE001 - one request's failure is its own
            if debug:
                log.exception("request failed")
            return error(500, "internal_error", f"internal error ({type(exc).__name__}); "
                                                "nothing was kept")
        finally:
            waiting["n"] -= 1
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            budget.release(reserved)

    return Starlette(routes=[
        Route("/", index), Route("/static/{name}", static),
        Route(LOGIN_PATH, login, methods=["GET", "POST"]),
        Route(LOGOUT_PATH, logout, methods=["POST"]),
        Route("/api/card", card_json), Route("/api/predict", predict_endpoint,
                                              methods=["POST"])],
        middleware=[Middleware(_HostCheck, access=access)])


# ------------------------------------------------------------------ the model and its card
def load(model_path: str | None, server: str | None, model_name: str, timeout_s: float,
         token: str | None = None):
    """The model predict will call: a LocalModel, or a ServerModel (its preprocessing and
    card from ``model_path`` when given)."""
    from covid_keras.serving import predictor

    if not model_path and not server:
        raise ValueError("--model or --server is required")
    if model_path and not os.path.exists(model_path):
        raise FileNotFoundError(f"--model {model_path} does not exist")
    if model_path and os.path.isfile(model_path):
        raise ValueError(f"--model {model_path} is a file: give an export or a run folder "
                         "(a .keras file has no decision)")
    if server:
        info = None
        if model_path:
            export_dir = predictor.find_export(model_path)
            info = (predictor.read_export_info(export_dir) if export_dir else
                    predictor.LocalModel(model_path).info)
        return predictor.ServerModel(server, model_name, info, timeout_s, token)
    return predictor.LocalModel(model_path)


def build_card(model, model_path: str | None, metrics_path: str | None,
               manifest_path: str | None) -> dict:
    found_metrics, found_manifest = find_run_files(model_path)
    metrics = read_metrics(metrics_path or found_metrics) if (metrics_path or
                                                               found_metrics) else None
    manifest = read_manifest(manifest_path or found_manifest) if (
        manifest_path or found_manifest) else None
    return model_card(model.info, model.source, metrics, manifest,
                      manifest_given=bool(manifest_path))
