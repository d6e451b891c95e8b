"""The evaluation report: plots (PNG, matplotlib), one ``report.html``, the CSVs and the
comparison tables.

    paths = write_plots(output_dir, result, preds)
    explanations = write_explanations(output_dir, model, predictor, preds, result)
    write_html(output_dir, result, paths, explanations)
    write_slices_csv(path, preds); write_patients_csv(path, pats, patient_pred, classes)
    write_comparison(output_dir, {name: metrics.json's content})   # the paper's tables

Plots: ROC curves (slices and patients) with the chosen operating point and a close-up
around it, precision-recall curves, the reliability diagram, confusion matrices.
Explanations: per patient, its top slices by score with the lung outline (the records'
``mask/encoded``) and the model's top-K boxes (clipped to the image) and their normalised
scores drawn, and a Grad-CAM heat map (:mod:`covid_keras.evaluation.gradcam`) over each.
The report names patients only by the records' pseudonymous keys.
"""

from __future__ import annotations

import html
import json
import os
import re

import numpy as np

from covid_keras.core import files
from covid_keras.evaluation.decision import positive_index
from covid_keras.evaluation.metrics import DEFINITIONS, METRICS

PLOTS = ("roc", "pr", "reliability", "confusion")
BOX_COLOURS = ("#ff3030", "#30ff30", "#3080ff", "#ffff30", "#ff30ff", "#30ffff")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _operating_point(y, score, threshold):
    y = np.asarray(y).astype(bool)
    d = np.asarray(score) >= threshold
    tpr = (d & y).sum() / max(int(y.sum()), 1)
    fpr = (d & ~y).sum() / max(int((~y).sum()), 1)
    return float(fpr), float(tpr)


def _levels(result, preds):
    pats = result["_patients"]
    pos = result["classes"].index(result["positive_class"])
    return {"slice": (np.asarray(preds.labels) == pos, preds.probs[:, pos]),
            "patient": (pats.labels == pos, pats.score)}


def write_plots(output_dir: str, result: dict, preds) -> dict:
    """PNG files: name -> file name (relative to ``output_dir``)."""
    plt = _pyplot()
    from sklearn.metrics import precision_recall_curve

    os.makedirs(output_dir, exist_ok=True)
    t = float(result["decision"]["threshold"])
    levels = _levels(result, preds)
    files = {}

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for zoom, ax in enumerate(axes):
        for level, style in (("slice", "--"), ("patient", "-")):
            roc = result["roc"][level]
            auc = result[level]["auc"]["value"]
            label = f"{level} (AUC {auc:.3f})" if auc is not None else f"{level} (AUC n/a)"
            line, = ax.plot(roc["fpr"], roc["tpr"], style, label=label)
            y, s = levels[level]
            if y.any() and (~y).any():
                fx, fy = _operating_point(y, s, t)
                ax.plot([fx], [fy], "o", ms=9, mfc="none", mew=2, color=line.get_color(),
                        label=f"{level} operating point (t={t:.3f})")
                if zoom and level == "patient":
                    ax.set_xlim(max(0.0, fx - 0.25), min(1.0, fx + 0.25))
                    ax.set_ylim(max(0.0, fy - 0.25), min(1.02, fy + 0.25))
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("1 - specificity (FPR)")
        ax.set_ylabel("sensitivity (TPR)")
        ax.set_title("ROC" if not zoom else "ROC around the patient operating point")
        ax.legend(fontsize=7, loc="lower right")
    files["roc"] = _save(fig, output_dir, "roc.png")

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for level, style in (("slice", "--"), ("patient", "-")):
        y, s = levels[level]
        if y.any():
            p, r, _ = precision_recall_curve(y, s)
            ax.plot(r, p, style, drawstyle="steps-post", label=level)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title(f"Precision-recall, positive = {result['positive_class']}")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    files["pr"] = _save(fig, output_dir, "pr.png")

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for level, marker in (("slice", "s--"), ("patient", "o-")):
        cal = result["calibration"][level]
        pts = [(b[3], b[4]) for b in cal["reliability"] if b[2]]
        if pts:
            ece = cal["ece"]["value"]
            ax.plot(*zip(*pts), marker, label=f"{level} (ECE {ece:.3f})" if ece is not None
                    else level)
    ax.set_xlabel(f"predicted P({result['positive_class']})")
    ax.set_ylabel("observed fraction positive")
    ax.set_title("Reliability diagram")
    ax.legend(fontsize=8)
    files["reliability"] = _save(fig, output_dir, "reliability.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    classes = result["classes"]
    for ax, level in zip(axes, ("slice", "patient")):
        cm = np.asarray(result["confusion"][level])
        ax.imshow(cm, cmap="Blues")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=30)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("decision")
        ax.set_ylabel("label")
        ax.set_title(f"{level}s")
    files["confusion"] = _save(fig, output_dir, "confusion.png")
    return files


def _save(fig, output_dir: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, name), dpi=100)
    _pyplot().close(fig)
    return name


def safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:80] or "patient"


def top_slices(preds, pats, patient: int, count: int = 3) -> list:
    pos = positive_index(preds.classes)
    idx = pats.slices[patient]
    order = np.argsort(-preds.probs[idx, pos], kind="stable")
    return [int(idx[i]) for i in order[:count]]


LUNG_OUTLINE = "#40e0ff"


def lung_masks(predictor, indices) -> dict:
    """index -> the record's lung mask as a bool (S, S) array at the model's input size,
    aligned with ``predictor.images_u8``: the mask a lung model takes
    (``predictor.model_masks``) at 0.5; {} when the predictor has no records to read."""
    return _outlines(_model_masks(predictor, indices))


def _outlines(model_masks: dict) -> dict:
    """A lung model's masks (float32 (S, S, 1), 1 = lung) as bool (S, S) arrays."""
    return {i: m[..., 0] >= 0.5 for i, m in model_masks.items()}


def _model_masks(predictor, indices) -> dict:
    """``predictor.model_masks(indices)`` (one pass over the shards), or {} when it has no
    records to read."""
    if not getattr(predictor, "files", None) or not len(indices):
        return {}
    return predictor.model_masks(indices)


def write_explanations(output_dir: str, model, predictor, preds, result: dict,
                       top: int = 3, max_patients: int = -1,
                       class_index: int | None = None) -> list:
    """One PNG per patient (``explanations/<key>.png``): its ``top`` slices by score with
    the top-K boxes and scores drawn (DRENet), and a Grad-CAM map over each. The Grad-CAM
    input is the model's as ``predictor.cfg`` (the pipeline that predicted ``preds``) feeds
    it: normalised only for a model without its own normalisation layer. Returns a list
    of {"key", "label", "decision", "score", "file", "slices"}."""
    plt = _pyplot()
    from covid_keras.evaluation.gradcam import GradCAM
    from covid_keras.io import data

    pats = result["_patients"]
    decisions = result["_patient_pred"]
    classes = preds.classes
    pos = classes.index(result["positive_class"])
    target = pos if class_index is None else int(class_index)
    chosen = list(range(len(pats.keys)))
    if max_patients is not None and max_patients >= 0:
        chosen = chosen[:max_patients]
    wanted = {p: top_slices(preds, pats, p, top) for p in chosen}
    all_idx = sorted({i for v in wanted.values() for i in v})
    if not all_idx:
        return []
    images = predictor.images_u8(all_idx)
    decoded = _model_masks(predictor, all_idx)  # read once: the outlines and a lung model's
    masks = _outlines(decoded)
    stack = np.stack([images[i] for i in all_idx])
    x = np.asarray(data.model_input(stack, predictor.cfg), np.float32)
    # a lung model (navigator_anchors="lung"): with the masks it predicted with
    lung = decoded if predictor.cfg.lung_mask else None
    cams = dict(zip(all_idx, GradCAM(model)(
        x, target, masks=None if lung is None else np.stack([lung[i] for i in all_idx]))))
    boxes = preds.outputs.get("boxes")
    box_scores = preds.outputs.get("box_scores")
    folder = os.path.join(output_dir, "explanations")
    os.makedirs(folder, exist_ok=True)
    out = []
    for p, slices in wanted.items():
        key = pats.keys[p]
        cols = max(1, len(slices))
        fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols + 0.6, 6.6), squeeze=False)
        for j in range(cols):
            a_img, a_cam = axes[0, j], axes[1, j]
            a_img.axis("off")
            a_cam.axis("off")
            if j >= len(slices):
                continue
            i = slices[j]
            img = images[i]
            a_img.imshow(img)
            size = img.shape[0]
            if i in masks and masks[i].any():  # the lung outline, under the boxes
                a_img.contour(masks[i], levels=[0.5], colors=[LUNG_OUTLINE], linewidths=0.8)
            if boxes is not None:
                for k, b in enumerate(np.asarray(boxes[i])):
                    y0, x0, y1, x1 = np.clip(b, 0, size)  # inside the image
                    colour = BOX_COLOURS[k % len(BOX_COLOURS)]
                    a_img.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                                  edgecolor=colour, linewidth=1.5))
                    if box_scores is not None:
                        a_img.text(x0 + 1, y0 + 1, f"{float(box_scores[i][k]):.2f}",
                                   color=colour, fontsize=7, va="top")
            a_img.set_title(f"study {preds.study_keys[i][:6]} slice "
                            f"{int(preds.slice_index[i])}: "
                            f"P({classes[pos]})={preds.probs[i, pos]:.2f}", fontsize=8)
            a_cam.imshow(img)
            a_cam.imshow(cams[i], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            a_cam.set_title(f"Grad-CAM ({classes[target]})", fontsize=8)
        fig.suptitle(f"patient {key}: label {classes[int(pats.labels[p])]}, decision "
                     f"{classes[int(decisions[p])]} (score {pats.score[p]:.3f})", fontsize=9)
        name = f"{safe_name(key)}.png"
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=90)
        plt.close(fig)
        out.append({"key": key, "label": classes[int(pats.labels[p])],
                    "decision": classes[int(decisions[p])], "score": float(pats.score[p]),
                    "file": f"explanations/{name}", "slices": [int(preds.slice_index[i])
                                                               for i in slices]})
    return out


# ------------------------------------------------------------------ HTML
def _fmt(entry) -> str:
    if not isinstance(entry, dict):
        return html.escape(str(entry))
    if entry.get("value") is None:
        return f'<span class="na" title="{html.escape(entry.get("reason", ""))}">n/a</span>'
    s = f"{entry['value']:.3f}"
    if entry.get("ci95"):
        s += f' <span class="ci">[{entry["ci95"][0]:.3f}, {entry["ci95"][1]:.3f}]</span>'
    return s


def _metrics_table(result: dict, path: tuple = ()) -> str:
    rows = []
    for m in METRICS:
        cells = []
        for level in ("slice", "patient"):
            sec = result[level]
            for p in path:
                sec = sec.get(p, {})
            cells.append(f"<td>{_fmt(sec.get(m, {'value': None}))}</td>")
        rows.append(f"<tr><th>{m}</th>{''.join(cells)}</tr>")
    return ("<table><tr><th>metric</th><th>slices</th><th>patients</th></tr>"
            + "".join(rows) + "</table>")


def _confusion_table(cm, classes) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    body = "".join(f"<tr><th>{html.escape(classes[i])}</th>" +
                   "".join(f"<td>{v}</td>" for v in row) + "</tr>" for i, row in enumerate(cm))
    return f"<table><tr><th>label \\ decision</th>{head}</tr>{body}</table>"


CSS = """
body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.6em 0}
td,th{border:1px solid #bbb;padding:3px 8px;text-align:left;font-size:13px}
.ci{color:#666;font-size:11px}.na{color:#a00}
.warn{background:#fff0f0;border:1px solid #d33;padding:6px 10px;margin:4px 0}
.note{background:#f3f6ff;border:1px solid #88a;padding:6px 10px;margin:4px 0}
img{max-width:100%;border:1px solid #ddd}
.patient{margin:1em 0;border-top:1px solid #ccc;padding-top:0.5em}
"""


def write_html(output_dir: str, result: dict, plots: dict, explanations: list,
               title: str = "covid_keras evaluation") -> str:
    """``report.html``: decision, warnings, metrics with CIs, plots, per-site table,
    confusion matrices and the per-patient explanations. Static (no script)."""
    e = html.escape
    classes = result["classes"]
    d = result["decision"]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<link rel=\"icon\" href=\"data:,\"><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>",
             f"<p>Split <b>{e(str(result.get('split')))}</b> of <code>"
             f"{e(str(result.get('data_dir')))}</code>; model <code>"
             f"{e(str(result.get('checkpoint', '')))}</code>. {result['slice']['count']} "
             f"slices, {result['patient']['count']} patients; classes "
             f"{e(', '.join(classes))}; positive class <b>{e(result['positive_class'])}</b>."
             "</p>"]
    rule_text = DEFINITIONS["rules"][d["rule"]]
    parts.append("<h2>Decision</h2>"
                 f"<p>Patient rule <b>{e(d['rule'])}</b> ({e(rule_text)}), "
                 f"threshold <b>{d['threshold']:.4f}</b>, chosen on split "
                 f"<b>{e(str(d.get('chosen_on_split')))}</b> by {e(str(d.get('criterion')))}."
                 + (f" Normal class <b>{e(str(d['normal_class']))}</b>."
                    if d.get("normal_class") else "")
                 + f" {e(DEFINITIONS['decision'])}.</p>")
    for w in result.get("warnings", []):
        parts.append(f'<div class="warn">Warning: {e(w)}</div>')
    for n in result.get("notes", []):
        parts.append(f'<div class="note">{e(n)}</div>')
    b = result["bootstrap"]
    parts.append(f"<h2>Metrics</h2><p>95 % CIs: {b['resamples']} bootstrap resamples of "
                 f"patients (stratified by label, seed {b['seed']}). F1 = 2PR/(P+R); the "
                 "DRENet paper prints (P+R)/2 as F1. Hover n/a for the reason.</p>")
    parts.append(f"<h3>{e(result['positive_class'])} vs rest</h3>" + _metrics_table(result))
    if "macro" in result["patient"]:
        parts.append("<h3>Macro average over classes (accuracy: all classes)</h3>"
                     + _metrics_table(result, ("macro",)))
        for c in classes:
            parts.append(f"<h3>{e(c)} vs rest</h3>" + _metrics_table(result, ("per_class", c)))
    cal = result["calibration"]
    parts.append(f"<p>Calibration: ECE slices {_fmt(cal['slice']['ece'])}, patients "
                 f"{_fmt(cal['patient']['ece'])} ({e(cal['patient']['score'])}).</p>")
    captions = {"roc": "ROC curves with the operating point (left) and around it (right)",
                "pr": "Precision-recall curves", "reliability": "Reliability diagram",
                "confusion": "Confusion matrices at the chosen decision"}
    parts.append("<h2>Plots</h2>")
    for name in PLOTS:
        if name in plots:
            parts.append(f"<figure><img src=\"{e(plots[name])}\" alt=\"{e(captions[name])}\">"
                         f"<figcaption>{e(captions[name])}</figcaption></figure>")
    parts.append("<h2>Confusion matrices</h2><h3>Patients</h3>" + _confusion_table(
        result["confusion"]["patient"], classes) + "<h3>Slices</h3>" +
        _confusion_table(result["confusion"]["slice"], classes))
    parts.append("<h2>Per site (patients)</h2><table><tr><th>site</th><th>patients</th>"
                 "<th>by class</th>" + "".join(f"<th>{m}</th>" for m in METRICS)
                 + "</tr>")
    for site, s in result["sites"].items():
        by = ", ".join(f"{e(k)} {v}" for k, v in s["patients_by_class"].items())
        parts.append(f"<tr><td>{e(site)}</td><td>{s['patients']}</td><td>{by}</td>" +
                     "".join(f"<td>{_fmt(s['patient'][m])}</td>" for m in METRICS)
                     + "</tr>")
    parts.append("</table>")
    if explanations:
        parts.append("<h2>Explanations</h2><p>Per patient (pseudonymous key): the top slices"
                     " by score with the lung outline (cyan, data_prep's lung mask) and "
                     "the model's top-K boxes and their normalised scores (top row), and "
                     "Grad-CAM over the backbone's last conv features for "
                     "the positive class (bottom row).</p>")
        for x in explanations:
            parts.append(f"<div class=\"patient\"><p><b>{e(x['key'])}</b>: label "
                         f"{e(x['label'])}, decision {e(x['decision'])}, score "
                         f"{x['score']:.3f}, slices {e(str(x['slices']))}</p>"
                         f"<img src=\"{e(x['file'])}\" alt=\"patient {e(x['key'])}\">"
                         "</div>")
    parts.append("</body></html>\n")
    path = os.path.join(output_dir, "report.html")
    files.atomic_write_text(path, "\n".join(parts))
    return path


# ------------------------------------------------------------------ CSVs
def _fmt_boxes(boxes, scores) -> str:
    if boxes is None:
        return ""
    items = []
    for j, b in enumerate(np.asarray(boxes)):
        s = None if scores is None else float(np.asarray(scores)[j])
        items.append([round(float(v), 1) for v in b] + ([round(s, 4)] if s is not None else []))
    return json.dumps(items)


def _prob(p) -> str:
    """A probability as its shortest exact text (``repr``): read back, it is the same
    number, so saturated probabilities do not tie and an AUC recomputed from the CSV equals
    metrics.json's (6 decimals made 0.99999991 and 0.99999997 both 1.000000)."""
    return repr(float(p))


def write_slices_csv(path: str, preds) -> None:
    """patient_key, study_key, slice_index, label, prob_<class>..., boxes (JSON list of
    [y0, x0, y1, x1, score] in input pixels; empty for models without boxes)."""
    import csv

    boxes = preds.outputs.get("boxes")
    scores = preds.outputs.get("box_scores")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_key", "study_key", "slice_index", "label"] +
                   [f"prob_{c}" for c in preds.classes] + ["boxes"])
        for i in range(len(preds)):
            w.writerow([preds.patient_keys[i], preds.study_keys[i], int(preds.slice_index[i]),
                        preds.classes[int(preds.labels[i])]] +
                       [_prob(p) for p in preds.probs[i]] +
                       [_fmt_boxes(None if boxes is None else boxes[i],
                                   None if scores is None else scores[i])])


def write_patients_csv(path: str, pats, patient_pred, classes) -> None:
    """patient_key, label, prob_<class>... (the rule's), decision."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_key", "label"] + [f"prob_{c}" for c in classes] + ["decision"])
        for i, key in enumerate(pats.keys):
            w.writerow([key, classes[int(pats.labels[i])]] +
                       [_prob(p) for p in pats.probs[i]] + [classes[int(patient_pred[i])]])


PAPER_TABLE1 = ("auc", "sensitivity", "ppv", "specificity", "f1", "accuracy")
PAPER_TABLE2 = ("sensitivity", "ppv", "specificity", "f1", "accuracy")
HEADERS = {"auc": "AUC", "sensitivity": "Recall", "ppv": "Precision",
           "specificity": "Specificity", "f1": "F1 (2PR/(P+R))", "accuracy": "Accuracy",
           "f1_paper": "F1 as printed by the paper ((P+R)/2)"}


def comparison_rows(results: dict) -> tuple[list, list]:
    """name -> metrics.json; the paper's layout: Table 1 (binary, patient level: AUC,
    recall, precision, specificity, F1, accuracy) or Table 2 (more classes: the macro
    averages of recall, precision, specificity, F1, accuracy). Returns (header, rows)."""
    multi = any("macro" in r["patient"] for r in results.values())
    cols = PAPER_TABLE2 if multi else PAPER_TABLE1
    header = ["model"] + [HEADERS[c] for c in cols] + [HEADERS["f1_paper"], "patients",
                                                       "rule", "threshold", "split"]
    rows = []
    for name, r in results.items():
        sec = r["patient"]["macro"] if multi else r["patient"]
        row = [name]
        for c in cols:
            row.append(sec.get(c, {"value": None}))
        p, rr = sec["ppv"]["value"], sec["sensitivity"]["value"]
        row.append({"value": None if p is None or rr is None else (p + rr) / 2.0,
                    "ci95": None})
        row += [r["patient"]["count"], r["decision"]["rule"],
                round(float(r["decision"]["threshold"]), 4), r.get("split")]
        rows.append(row)
    return header, rows


def _cell(v) -> str:
    if isinstance(v, dict):
        if v.get("value") is None:
            return "n/a"
        s = f"{v['value']:.3f}"
        if v.get("ci95"):
            s += f" [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"
        return s
    return str(v)


def comparison_markdown(results: dict) -> str:
    header, rows = comparison_rows(results)
    multi = any("macro" in r["patient"] for r in results.values())
    title = ("Patient-level comparison, laid out like the DRENet paper's Table 2 (macro "
             "averages over classes)" if multi else
             "Patient-level comparison, laid out like the DRENet paper's Table 1")
    lines = [f"**{title}**. Values with 95 % bootstrap CIs over patients. F1 is 2PR/(P+R); "
             "the paper prints (P+R)/2 as F1, given in its own column for comparison.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(output_dir: str, results: dict) -> dict:
    """comparison.md and comparison.csv (value, ci_lo, ci_hi columns per metric)."""
    import csv

    os.makedirs(output_dir, exist_ok=True)
    md = comparison_markdown(results)
    files.atomic_write_text(os.path.join(output_dir, "comparison.md"), md)
    header, rows = comparison_rows(results)
    with open(os.path.join(output_dir, "comparison.csv"), "w", newline="") as f:
        w = csv.writer(f)
        flat = []
        for h, v in zip(header, rows[0] if rows else header):
            flat += [h, f"{h} ci95 lo", f"{h} ci95 hi"] if isinstance(v, dict) else [h]
        w.writerow(flat)
        for row in rows:
            out = []
            for v in row:
                if isinstance(v, dict):
                    ci = v.get("ci95") or [None, None]
                    out += ["" if x is None else f"{x:.4f}" for x in (v.get("value"), *ci)]
                else:
                    out.append(v)
            w.writerow(out)
    return {"markdown": md}


def summary_line(m: dict) -> str:
    def f(entry):
        if entry.get("value") is None:
            return "n/a"
        ci = entry.get("ci95")
        return f"{entry['value']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    d = m["decision"]
    pos = m.get("positive_class", "positive")
    parts = [f"{m['split']}, {pos} vs rest ({d['rule']} rule, {pos} >= {d['threshold']:.4g} "
             f"chosen on {d.get('chosen_on_split')})"]
    for level in ("patient", "slice"):
        s = m[level]
        parts.append(f"{level}s {s['count']}: " + ", ".join(
            f"{k} {f(s[k])}" for k in METRICS))
    return " | ".join(parts)
