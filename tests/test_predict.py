"""covid_keras.predict: one study in (DICOM folder, zip, PNG/JPEG slices), one answer out,
prepared by data_prep's own functions (tested equal to the training records), locally or
through a served export; bad input fails with the study's pseudonym and nothing written."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_prep import phantom
from tests.helpers import ServeProcess, make_run, read_records

pytestmark = pytest.mark.slow  # TFRecords, an export and predict runs: ~1 min
REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dataset):
    from covid_keras.serving import exporter, predictor

    root = tmp_path_factory.mktemp("predict")
    data_dir = tiny_dataset(kinds=("normal", "covid"), patients_per_kind=1, num_slices=20,
                            matrix=128, seed=0,
                            flags=("--classes=normal,covid,bacterial",
                                   "--split_fractions=1,0,0"))
    salt = data_dir.parent / "salt.key"
    run = make_run(root / "run", "drenet", {"rule": "mean", "threshold": 0.3,
                                             "positive_class": "covid"}, data_dir)
    model, info, decision = exporter.load_run(str(run))
    version_dir = exporter.export_model(model, info, decision, str(root / "exports"), "drenet")
    study = next((data_dir.parent / "studies" / "covid").iterdir())
    return {"root": root, "run": run, "export": root / "exports" / "drenet",
            "version_dir": Path(version_dir), "study": study, "data_dir": data_dir,
            "salt": predictor.read_salt(str(salt)), "salt_file": salt,
            "model": predictor.LocalModel(str(root / "exports" / "drenet"))}


def _no_phi(text: str, study: Path) -> None:
    assert "PHANTOM" not in text  # the phantom's PatientID / PatientName
    assert study.name not in text and str(study.parent) not in text


def test_predict_a_dicom_study_as_the_records(setup, tmp_path):
    """The slices predict prepares are the training records' (same sop keys, same pixels:
    the per-slice probabilities equal the Keras model's on the records' images)."""
    import tensorflow as tf

    from covid_keras.core import schema
    from covid_keras.io import data
    from covid_keras.model.saving import load_model, model_spec
    from covid_keras.serving import predictor

    out_dir = tmp_path / "out"
    answer = predictor.predict_study(str(setup["study"]), setup["model"], str(out_dir),
                                     setup["salt"])
    text = (out_dir / "prediction.json").read_text()
    assert json.loads(text) == json.loads(json.dumps(answer))
    _no_phi(text, setup["study"])
    assert answer["format_version"] == 1
    classes = answer["model"]["class_names"]
    assert classes == ["normal", "covid", "bacterial"]
    p = answer["patient"]
    assert abs(sum(p["probabilities"].values()) - 1) < 1e-5
    assert p["decision"] in classes and p["rule"] == "mean" and p["threshold"] == 0.3
    assert p["method"] == "threshold" and p["positive_class"] == "covid"
    assert p["normal_class"] == "normal"  # inferred from the class names
    assert answer["series"]["kind"] == "dicom" and answer["series"]["slices_in_series"] == 20
    assert "most slices" in answer["series"]["why"]
    # the records of this study (the dataset's salt: the same sop keys)
    by_sop = {r[schema.SOP_KEY].decode(): r for r in read_records(setup["data_dir"])}
    slices = answer["slices"]
    assert len(slices) == answer["series"]["used"] >= 3
    assert all(s["sop_key"] in by_sop for s in slices)
    model = load_model(str(setup["run"] / "best.keras"), compile=False)
    imgs = np.stack([data.decode_image(by_sop[s["sop_key"]][schema.IMAGE], SIZE).numpy()
                     for s in slices]).astype(np.float32)
    x = data.model_input(tf.constant(imgs), data.PipelineConfig.for_model(model_spec(model)))
    logits = model(x, training=False)["logits"]
    want = tf.nn.softmax(logits).numpy()
    got = np.array([[s["probabilities"][c] for c in classes] for s in slices])
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose([p["probabilities"][c] for c in classes], want.mean(0),
                               atol=1e-4)
    for s in slices:
        assert len(s["boxes"]) == 3 and all(len(b["box_yxyx"]) == 4 for b in s["boxes"])
        assert s["index"] == int(by_sop[s["sop_key"]][schema.SLICE_INDEX])
    pngs = sorted(f.name for f in out_dir.glob("evidence_*.png"))
    assert pngs == [f"evidence_{i}.png" for i in range(1, min(3, len(slices)) + 1)]
    ev = cv2.imread(str(out_dir / pngs[0]))
    assert ev.shape[1] == 2 * ev.shape[0] >= 512  # slice with boxes | Grad-CAM overlay
    assert [slices[i]["evidence"] for i in answer["top_slices"]] == pngs
    # a run folder and a .keras file give the same slices and probabilities
    run_answer = predictor.predict_study(str(setup["study"]), predictor.LocalModel(
        str(setup["run"])), str(tmp_path / "run_out"), setup["salt"])
    assert run_answer["patient"]["decision"] == p["decision"]
    np.testing.assert_allclose(list(run_answer["patient"]["probabilities"].values()),
                               list(p["probabilities"].values()), atol=1e-5)
    from covid_keras.evaluation import evaluation

    run_decision = evaluation.read_decision(str(setup["run"]))
    assert p["decision"] == evaluation.decide_patient(got, run_decision)["decision"]
    # seed 004's "any" rule from an old decision.json (no normal_class: inferred "normal"),
    # a threshold no slice reaches: normal only if every slice is decided normal
    any_run = tmp_path / "any_run"
    any_run.mkdir()
    for name in ("best.keras", "run_info.json"):
        shutil.copy(setup["run"] / name, any_run / name)
    (any_run / "decision.json").write_text(json.dumps({
        "rule": "any", "threshold": 0.999, "positive_class": "covid", "split": "val",
        "classes": classes, "criterion": "youden_j"}))
    any_answer = predictor.predict_study(str(setup["study"]), predictor.LocalModel(
        str(any_run)), str(tmp_path / "any_out"), setup["salt"])
    any_d = evaluation.read_decision(str(any_run))
    assert any_d["normal_class"] == "normal"
    any_got = np.array([[s["probabilities"][c] for c in classes]
                        for s in any_answer["slices"]])
    want_any = evaluation.decide_patient(any_got, any_d)
    assert any_answer["patient"]["decision"] == want_any["decision"] != "covid"
    assert any_answer["patient"]["rule"] == "any"
    assert any_answer["patient"]["normal_class"] == "normal"
    slice_dec = evaluation.decide(any_got, 0.999, 1)
    assert (want_any["decision"] == "normal") == bool((slice_dec == 0).all())
    keras_answer = predictor.predict_study(str(setup["study"]), predictor.LocalModel(
        str(setup["run"] / "best.keras")), str(tmp_path / "k_out"), setup["salt"])
    assert keras_answer["patient"]["method"] == "argmax"
    assert keras_answer["patient"]["normal_class"] is None
    assert any(w["reason"] == "model" for w in keras_answer["warnings"])


def test_zip_and_png_slices(setup, tmp_path):
    from covid_keras.serving import predictor

    study = setup["study"]
    zpath = tmp_path / "study.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in sorted(study.iterdir()):
            z.write(f, f"inner/{f.name}")
    folder = predictor.predict_study(str(study), setup["model"], str(tmp_path / "a"),
                                     setup["salt"])
    zipped = predictor.predict_study(str(zpath), setup["model"], str(tmp_path / "b"),
                                     setup["salt"])
    assert zipped["patient"] == folder["patient"]
    assert [s["sop_key"] for s in zipped["slices"]] == [s["sop_key"] for s in folder["slices"]]
    # PNG slices of the same series, windowed as the records (lung window)
    import pydicom

    from covid_keras.core.imaging import unit_to_u8, window_hu

    png_dir = tmp_path / "pngs"
    png_dir.mkdir()
    dss = [pydicom.dcmread(str(f)) for f in study.iterdir()]
    dss.sort(key=lambda d: -float(d.ImagePositionPatient[2]))
    for i, ds in enumerate(dss):
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept)
        cv2.imwrite(str(png_dir / f"slice_{i}.png"), unit_to_u8(window_hu(hu, -700, 1500)))
    answer = predictor.predict_study(str(png_dir), setup["model"], str(tmp_path / "c"),
                                     setup["salt"])
    assert answer["series"]["kind"] == "images" and answer["series"]["used"] >= 1
    assert any(w["reason"] == "not_ct_verified" for w in answer["warnings"])


def _fails(setup, tmp_path, study, reason, **kw):
    from covid_keras.serving import predictor

    out = tmp_path / f"out_{reason}"
    with pytest.raises(predictor.StudyFailure) as err:
        predictor.predict_study(str(study), setup["model"], str(out), setup["salt"], **kw)
    assert err.value.reason == reason, str(err.value)
    assert str(err.value).startswith("study study.")
    assert Path(study).name not in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".out_*partial*"))


def test_bad_studies_fail_cleanly(setup, tmp_path):
    mr = tmp_path / "mr_study"
    phantom.write_study(mr, kind="covid", num_slices=12, matrix=64, modality="MR",
                        patient_id="PHANTOM-MR")
    _fails(setup, tmp_path, mr, "non_ct_modality")
    blank = tmp_path / "blank_slices"
    blank.mkdir()
    for i in range(10):
        img = np.zeros((64, 64), np.uint8)
        img[20:40, 20:40] = 200  # no lung anywhere
        cv2.imwrite(str(blank / f"s{i}.png"), img)
    _fails(setup, tmp_path, blank, "no_lung_slices")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    data = next(setup["study"].glob("*.dcm")).read_bytes()
    (corrupt / "a.dcm").write_bytes(data[:400])
    with pytest.raises(Exception) as err:
        from covid_keras.serving import predictor

        predictor.predict_study(str(corrupt), setup["model"], str(tmp_path / "x"),
                                setup["salt"])
    assert "study study." in str(err.value) and not (tmp_path / "x").exists()
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../escaped.dcm", data)
    _fails(setup, tmp_path, evil, "zip_unsafe")
    assert not (tmp_path.parent / "escaped.dcm").exists()
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.dcm", b"\0" * (8 << 20))
    _fails(setup, tmp_path, bomb, "zip_bomb", max_zip_bytes=4 << 20)
    notzip = tmp_path / "broken.zip"
    notzip.write_bytes(b"PK\x03\x04 this is not really a zip")
    _fails(setup, tmp_path, notzip, "corrupt_zip")


def test_cli_through_the_server_and_one_line_errors(setup, tmp_path, commands):
    """predict --server against covid_keras.serve gives the local answer; a bad study is a
    one-line error naming its pseudonym, nothing written, and the server keeps serving."""

    from covid_keras.serving import predictor

    local = predictor.predict_study(str(setup["study"]), setup["model"], str(tmp_path / "l"),
                                    setup["salt"])
    with ServeProcess(setup["export"], tmp_path) as server:
        base = ["covid_keras.predict", f"--model={setup['export']}",
                f"--server={server.url}", f"--salt_file={setup['salt_file']}"]
        proc = commands.run(*base, f"--study={setup['study']}", f"--output_dir={tmp_path / 's'}",
                            timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _no_phi(proc.stdout + proc.stderr, setup["study"])
        served = json.loads((tmp_path / "s" / "prediction.json").read_text())
        assert served["model"]["kind"] == "server"
        # the console names the decision's rule, and every warning reason of the JSON
        assert "mean rule: covid when the mean of its slices' covid probability >=" in \
            proc.stdout, proc.stdout
        assert served["warnings"], "the phantom study should warn (dropped slices)"
        for line in predictor.warning_lines(served["warnings"]):
            assert line in proc.stderr.splitlines(), (line, proc.stderr)
        assert served["patient"]["decision"] == local["patient"]["decision"]
        # one type for the version: TF Serving's string, locally too
        assert served["model"]["version"] == local["model"]["version"] == "1"
        np.testing.assert_allclose(list(served["patient"]["probabilities"].values()),
                                   list(local["patient"]["probabilities"].values()),
                                   atol=1e-5)
        assert [s["sop_key"] for s in served["slices"]] == [
            s["sop_key"] for s in local["slices"]]
        bad = tmp_path / "Doe_John_20200101"  # folder names can name the patient
        bad.mkdir()
        proc = commands.run(*base, f"--study={bad}", f"--output_dir={tmp_path / 'e'}",
                            timeout=600)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        # the user's terminal names the study as typed, and its pseudonym; logs do not
        assert lines[-1].startswith(f"covid_keras.predict: error: study {bad} (study.")
        assert "empty_study" in lines[-1] and "Doe" not in "\n".join(lines[:-1])
        assert not (tmp_path / "e").exists()
        assert server.running()


def test_no_lung_slices_are_flagged_boxes_clipped_and_the_lung_outlined(setup, tmp_path):
    """Records built with --nolung_filter keep the neck and abdomen slices: predict flags
    them (no_lung), keeps every box inside the image and outlines the lung in the
    evidence."""
    import types

    from covid_keras.serving import predictor

    model = setup["model"]
    info = json.loads(json.dumps(model.info))
    assert info["data_prep"]["settings"], info["data_prep"]  # data_prep.settings
    info["data_prep"]["settings"]["lung_filter"] = False
    unfiltered = types.SimpleNamespace(info=info, predict_study=model.predict_study,
                                       gradcam=model.gradcam, source=model.source)
    out_dir = tmp_path / "out"
    answer = predictor.predict_study(str(setup["study"]), unfiltered, str(out_dir),
                                     setup["salt"])
    slices = answer["slices"]
    flagged = [i for i, s in enumerate(slices) if s["no_lung"]]
    assert 0 < len(flagged) < len(slices), [s["lung_fraction"] for s in slices]
    threshold = answer["preprocessing"]["min_lung_fraction"]
    assert all((slices[i]["lung_fraction"] < threshold) == (i in flagged)
               for i in range(len(slices)))
    warnings = [w for w in answer["warnings"] if w["reason"] == "no_lung"]
    assert len(warnings) == 1 and f"{len(flagged)} of {len(slices)}" in warnings[0]["detail"]
    boxes = np.array([b["box_yxyx"] for s in slices for b in s["boxes"]])
    assert boxes.min() >= 0.0 and boxes.max() <= SIZE
    rgb = cv2.imread(str(out_dir / "evidence_1.png"))[..., ::-1]
    left = rgb[:, : rgb.shape[1] // 2].astype(int)
    outline = (np.abs(left - np.array(predictor.LUNG_OUTLINE_RGB)).max(-1) < 8).sum()
    assert outline > 50, outline


def test_server_address_is_named_without_credentials():
    from covid_keras.serving.predictor import public_url

    assert public_url("http://user:secret@10.0.0.5:8501/v1/models/m") == \
        "http://10.0.0.5:8501/v1/models/m"
    assert public_url("https://[::1]:8443/v1/models/m") == "https://[::1]:8443/v1/models/m"
    assert public_url("http://localhost/v1") == "http://localhost/v1"


def test_console_warnings_one_line_per_reason():
    from covid_keras.serving.predictor import warning_lines

    lines = warning_lines([
        {"reason": "truncated_file", "file": "file00001.ab12", "detail": "ends early"},
        {"reason": "slices_dropped", "file": "", "detail": "low_lung_fraction 6"},
        {"reason": "truncated_file", "file": "file00002.cd34", "detail": "ends early"}])
    assert lines == ["warning: truncated_file: file00001.ab12: ends early (and 1 more in "
                     "prediction.json)", "warning: slices_dropped: low_lung_fraction 6"]


def test_unpack_zip_takes_plain_entries_and_refuses_links(tmp_path):
    """An entry without file-type bits (Python's ZipFile.writestr writes mode 0o600) is a
    plain file; a symlink entry is refused."""
    import stat
    import zipfile

    from covid_keras.serving.predictor import StudyFailure, unpack_zip

    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("study/a.dcm", b"x" * 10)
    out = tmp_path / "out"
    out.mkdir()
    unpack_zip(str(plain), str(out), "s", 1 << 20, 10)
    assert (out / "study" / "a.dcm").read_bytes() == b"x" * 10
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as z:
        info = zipfile.ZipInfo("study/evil")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    out2 = tmp_path / "out2"
    out2.mkdir()
    with pytest.raises(StudyFailure, match="link or special file"):
        unpack_zip(str(link), str(out2), "s", 1 << 20, 10)
