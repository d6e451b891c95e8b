"""covid_keras.web: the diagnosis page, a client of predict. Refused uploads (zip traversal,
links, bombs, non-images, size limits) answered clearly with nothing left behind; answers
equal predict's; 20 concurrent uploads answered without mix-ups; the page end to end in
headless Chromium (Debian's, through Playwright)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the [web] extra is not installed")
pytest.importorskip("httpx", reason="httpx (tests of the [web] extra) is not installed")
pytest.importorskip("python_multipart", reason="the [web] extra is not installed")

import httpx  # noqa: E402

from covid_keras.serving import web_app  # noqa: E402
from data_prep import phantom  # noqa: E402
from tests.helpers import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    CLASSES3,
    DICOM_PREAMBLE,
    FakeModel,
    LiveServer,
    ServeProcess,
    chromium_or_skip,
    export_drenet,
    fake_manifest,
    get,
    multipart,
    post,
    quiet_env,
    study_files,
    zip_bytes,
)
from tests.helpers import WEB_SALT as SALT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the preamble and a file meta header that parses (its transfer syntax): what the page checks
# as a DICOM file streams in
DICOM_HEAD = DICOM_PREAMBLE + b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\0"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def artifacts_dir() -> Path:
    path = Path(os.environ.get("COVID_KERAS_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------ helpers
def synthetic_metrics(classes=CLASSES3, threshold=0.3, split="val") -> dict:
    """An evaluation's metrics.json content (evaluation's own code, synthetic predictions)."""
    from covid_keras.evaluation import evaluation as ev

    rng = np.random.default_rng(3)
    labels, keys, probs, sites = [], [], [], []
    for p in range(12):
        y = p % len(classes)
        for _ in range(3):
            logits = rng.normal(size=len(classes))
            logits[y] += 1.0
            probs.append(np.exp(logits) / np.exp(logits).sum())
            labels.append(y)
            keys.append(f"p{p:03d}")
            sites.append("site_a" if p < 6 else "site_b")
    n = len(labels)
    preds = ev.Predictions(list(classes), np.asarray(labels), np.asarray(probs), keys, keys,
                           np.zeros(n, int), sites, {}, split, "")
    m = ev.evaluate_predictions(preds, {"rule": "mean", "threshold": threshold,
                                        "positive_class": "covid", "split": "val",
                                        "criterion": "youden_j"}, 50)
    return json.loads(ev.dumps(ev.public_result(m)))


def zipped(folder: Path) -> bytes:
    return zip_bytes([(f"inner/{f.name}", f.read_bytes()) for f in sorted(folder.iterdir())])


def series_key(folder: Path) -> tuple[str, set]:
    """The study's series key and slice keys as predict names them under SALT."""
    import pydicom

    from data_prep.study import salted_key

    dss = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in folder.iterdir()]
    return (salted_key(SALT, "series", str(dss[0].SeriesInstanceUID)),
            {salted_key(SALT, "sop", str(d.SOPInstanceUID)) for d in dss})


# ------------------------------------------------------------------ fast: no model
def test_upload_names_are_made_safe():
    assert web_app.upload_parts("study/a b/IM0001.dcm", 1) == ["study", "a b", "IM0001.dcm"]
    assert web_app.upload_parts("/abs/x.png", 1) == ["abs", "x.png"]
    assert web_app.upload_parts("C:\\scans\\x<y>.dcm", 1) == ["C_", "scans", "x_y_.dcm"]
    assert web_app.upload_parts(".DS_Store", 1) is None
    assert web_app.upload_parts("__MACOSX/study/._IM1", 1) is None
    with pytest.raises(web_app.UploadRejected) as err:
        web_app.upload_parts("study/../../etc/passwd", 7)
    assert err.value.reason == "unsafe_name" and "file 7" in str(err.value)
    assert web_app.sniff(DICOM_PREAMBLE) == "dicom" and web_app.sniff(PNG_MAGIC + b"x") == "png"
    assert web_app.sniff(b"\xff\xd8\xff\xe0") == "jpeg" and web_app.sniff(b"PK\x03\x04") == "zip"
    assert web_app.sniff(b"%PDF-1.4") is None and web_app.sniff(b"\0" * 132) is None


def test_model_card_figures_come_from_the_export_and_the_metrics(tmp_path):
    from covid_keras.evaluation import evaluation as ev

    metrics = synthetic_metrics()
    data_dir = fake_manifest(tmp_path / "tfrecords")
    man = json.loads((data_dir / "manifest.json").read_text())
    man["dataset"] = "phantoms"
    man["counts"] = {"train": {"covid": {"site_a": {"studies": 3, "patients": 3, "slices": 45}},
                               "normal": {"site_a": {"studies": 4, "patients": 4,
                                                     "slices": 60}}}}
    (data_dir / "manifest.json").write_text(json.dumps(man))
    manifest = web_app.read_manifest(str(data_dir))
    info = {"class_names": CLASSES3, "input_size": 64, "backbone": "tiny", "model": "drenet",
            "variant": "paper", "windows": man["windows"],
            "data_prep": {"records_image_size": 64, "flags": {"num_slices": 15}},
            "decision": {"method": "threshold", "rule": "mean", "threshold": 0.3,
                         "positive_class": "covid", "criterion": "youden_j", "split": "val"},
            "dataset_manifest_sha256": manifest[1], "warnings": ["an export warning"]}
    card = web_app.model_card(info, {"kind": "savedmodel", "model_name": "drenet", "version": 1},
                              metrics, manifest, manifest_given=True)
    page = web_app.card_html(card)
    for level in ("patient", "slice"):
        for k in ev.METRICS:
            e = metrics[level][k]
            want = f"{e['value']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"
            assert f'data-metric="{level}-{k}">{want}<' in page
    assert card["validation"]["patients_by_class"] == {"normal": 4, "covid": 4,
                                                       "bacterial": 4}
    assert card["training_data"]["counts"]["train"]["normal"] == {
        "patients": 4, "studies": 4, "slices": 60}
    assert "4 patients, 60 slices" in page and "phantoms" in page
    assert any("one site (site_a)" in x for x in card["limits"])
    assert any(x == "Export: an export warning" for x in card["limits"])
    assert any(x.startswith("Evaluation: ") for x in card["limits"])  # metrics' warnings
    assert any("threshold was chosen on the split" in x for x in card["limits"])
    # a metrics.json of other classes, a manifest of other data: refused, not shown
    with pytest.raises(ValueError, match="classes"):
        web_app.model_card(info, {}, synthetic_metrics(["normal", "covid"]), None)
    with pytest.raises(ValueError, match="not the dataset manifest"):
        web_app.model_card({**info, "dataset_manifest_sha256": "0" * 64}, {}, metrics, manifest,
                           manifest_given=True)
    # a threshold other than the metrics' is said; no metrics is said
    other = web_app.model_card({**info, "decision": {**info["decision"], "threshold": 0.5}}, {},
                               metrics, None)
    assert any("computed at threshold 0.3" in x for x in other["limits"])
    assert "only when every slice is" not in page  # the mean rule has no normal class
    any_card = web_app.model_card({**info, "decision": {**info["decision"], "rule": "any",
                                                        "normal_class": "normal"}}, {}, None, None)
    assert any_card["decision"]["normal_class"] == "normal"
    assert "normal only when every slice is" in web_app.card_html(any_card)
    none = web_app.model_card(info, {}, None, None)
    assert none["validation"] is None and any("No evaluation" in x for x in none["limits"])
    # evaluate's metrics.json is read; a training run's (no CIs) is refused
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "metrics.json").write_text(json.dumps(metrics))
    assert web_app.read_metrics(str(tmp_path / "ev"))["patient"] == metrics["patient"]
    (tmp_path / "train_metrics.json").write_text(json.dumps(
        {"val_split": "val", "final": {"patient_auc": 0.9}}))
    with pytest.raises(ValueError, match="not an evaluation's metrics.json"):
        web_app.read_metrics(str(tmp_path / "train_metrics.json"))


@pytest.fixture()
def fake_app(tmp_path):
    tmp_root = tmp_path / "webtmp"
    tmp_root.mkdir()
    card = web_app.model_card(FakeModel.info, FakeModel.source, synthetic_metrics(), None)
    limits = web_app.Limits(max_upload_bytes=2 << 20, max_files=20, max_zip_bytes=1 << 20,
                            max_zip_files=50)
    return web_app.create_app(FakeModel(), card, SALT, limits, tmp_dir=str(tmp_root)), tmp_root


def test_the_page_always_shows_the_notice_and_the_card(fake_app):
    app, _ = fake_app
    r = get(app, "/")
    assert r.status_code == 200
    assert "Research use only: not for clinical use." in r.text
    assert 'id="card-metrics"' in r.text and "Known limits" in r.text
    assert "<h3>Evaluation metrics on val</h3>" in r.text  # the split the card's metrics are of
    test_card = web_app.card_html(web_app.model_card(FakeModel.info, FakeModel.source,
                                                     synthetic_metrics(split="test"), None))
    assert "<h3>Evaluation metrics on test</h3>" in test_card
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"
    assert get(app, "/static/app.js").headers["content-type"].startswith("text/javascript")
    assert get(app, "/static/..%2Fweb.py").status_code == 404
    assert get(app, "/api/card").json()["model"]["classes"] == CLASSES3


def test_a_full_queue_answers_busy(tmp_path):
    card = web_app.model_card(FakeModel.info, FakeModel.source, None, None)
    app = web_app.create_app(FakeModel(), card, SALT, web_app.Limits(max_queue=0),
                             tmp_dir=str(tmp_path))
    r = post(app, [("a.dcm", DICOM_PREAMBLE)])
    assert r.status_code == 503 and r.json()["reason"] == "busy"
    assert list(tmp_path.iterdir()) == []


def test_bad_uploads_are_refused_clearly_and_leave_nothing(fake_app, tmp_path):
    app, tmp_root = fake_app
    dcm = DICOM_HEAD + b"\0" * 64
    cases = [
        ("bad_dicom", [("junk.dcm", DICOM_PREAMBLE + b"\0" * 64)]),
        ("zip_unsafe", [("s.zip", zip_bytes([("../../escaped.dcm", dcm)]))]),
        ("zip_unsafe", [("s.zip", zip_bytes([("ok/../../../escaped2.dcm", dcm)]))]),
        ("zip_unsafe", [("s.zip", zip_bytes([("/abs.dcm", dcm)]))]),
        ("zip_unsafe", [("s.zip", zip_bytes([("a.dcm", dcm)], links=[("l.dcm", "/etc")]))]),
        ("zip_bomb", [("s.zip", zip_bytes([("big.dcm", b"\0" * (3 << 20))]))]),
        ("zip_bomb", [("s.zip", zip_bytes([(f"{i}.dcm", dcm) for i in range(60)]))]),
        ("corrupt_zip", [("s.zip", b"PK\x03\x04 not really a zip")]),
        ("not_an_image", [("s.zip", zip_bytes([("a.dcm", dcm), ("notes.txt", b"hello")]))]),
        ("not_an_image", [("s.zip", zip_bytes([("inner.zip", zip_bytes([("a.dcm", dcm)]))]))]),
        ("not_an_image", [("a.dcm", dcm), ("report.pdf", b"%PDF-1.4 ...")]),
        ("not_an_image", [("fake.png", b"not a png at all")]),
        ("unsafe_name", [("../../escaped3.dcm", dcm)]),
        ("zip_not_alone", [("s.zip", zip_bytes([("a.dcm", dcm)])), ("b.dcm", dcm)]),
        ("too_large", [("big.dcm", DICOM_PREAMBLE + b"\0" * (3 << 20))]),
        ("too_many_files", [(f"{i}.dcm", dcm) for i in range(21)]),
        ("empty_upload", [(".DS_Store", b"x")]),
    ]
    for reason, files in cases:
        r = post(app, files)
        body = r.json()
        assert r.status_code in (400, 413, 422), (reason, r.status_code, body)
        assert body["reason"] == reason, (reason, body)
        assert body["error"] and "Traceback" not in body["error"]
        assert list(tmp_root.iterdir()) == [], reason  # the request's folder is gone
    r = post(app, None, content=b"plain body", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["reason"] == "not_multipart"
    r = post(app, None, content=b"--x\r\nbroken", headers={
        "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 400 and r.json()["reason"] in ("bad_form", "empty_upload")
    for name in ("escaped.dcm", "escaped2.dcm", "escaped3.dcm", "abs.dcm"):
        for where in (tmp_path, tmp_path.parent, tmp_root.parent, Path("/")):
            assert not (where / name).exists(), where / name
    assert list(tmp_root.iterdir()) == []


# ------------------------------------------------------------------ with a model
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from covid_keras.serving import predictor

    root = tmp_path_factory.mktemp("web")
    studies = {}
    for i, kind in enumerate(("normal", "covid")):
        studies[kind] = phantom.write_study(root / "studies" / f"Doe_John_{i}", kind=kind,
                                            num_slices=12 + i, matrix=96, seed=i,
                                            patient_id=f"PHANTOM-{i}")
    data_dir = fake_manifest(root / "tfrecords")
    export_drenet(root, data_dir)
    metrics_dir = root / "eval"
    metrics_dir.mkdir()
    (metrics_dir / "metrics.json").write_text(json.dumps(synthetic_metrics()))
    local = predictor.LocalModel(str(root / "exports" / "drenet"))
    card = web_app.build_card(local, str(root / "exports" / "drenet"), str(metrics_dir),
                              str(data_dir))
    tmp_root = root / "webtmp"
    tmp_root.mkdir()
    app = web_app.create_app(local, card, SALT, tmp_dir=str(tmp_root))
    return {"root": root, "studies": studies, "export": root / "exports" / "drenet",
            "metrics": metrics_dir, "model": local, "app": app, "tmp_root": tmp_root,
            "data_dir": data_dir}


def direct(setup, folder: Path, tmp_path: Path) -> dict:
    from covid_keras.serving import predictor

    return predictor.predict_study(str(folder), setup["model"], str(tmp_path / "direct"),
                                   SALT)


@pytest.mark.slow
def test_answers_are_predicts(setup, tmp_path):
    """Files, a zip and PNG slices through the page's API: predict's answer (same slices,
    probabilities, decision), its prediction.json verbatim and its evidence PNGs."""
    study = setup["studies"]["covid"]
    want = direct(setup, study, tmp_path)
    key, sops = series_key(study)
    for files in (study_files(study), [("study.zip", zipped(study))]):
        r = post(setup["app"], files)
        assert r.status_code == 200, r.text
        body = r.json()
        got = body["prediction"]
        assert json.loads(body["prediction_json"]) == got
        assert got["patient"]["decision"] == want["patient"]["decision"]
        np.testing.assert_allclose(list(got["patient"]["probabilities"].values()),
                                   list(want["patient"]["probabilities"].values()), atol=1e-5)
        assert [s["sop_key"] for s in got["slices"]] == [s["sop_key"] for s in want["slices"]]
        assert got["series"]["series_key"] == key and {s["sop_key"] for s in
                                                       got["slices"]} <= sops
        assert got["patient"]["threshold"] == 0.3 and got["patient"]["rule"] == "mean"
        names = [got["slices"][i]["evidence"] for i in got["top_slices"]]
        assert names == [f"evidence_{i}.png" for i in range(1, 4)]
        for n in names:
            png = base64.b64decode(body["evidence"][n].split(",", 1)[1])
            assert png.startswith(PNG_MAGIC) and len(png) > 1000
        assert "PHANTOM" not in r.text and "Doe_John" not in r.text  # nothing identifying
        assert list(setup["tmp_root"].iterdir()) == []
    # PNG slices (a folder of them, as a browser sends a folder)
    import cv2
    import pydicom

    from covid_keras.core.imaging import unit_to_u8, window_hu

    dss = sorted((pydicom.dcmread(str(f)) for f in study.iterdir()),
                 key=lambda d: -float(d.ImagePositionPatient[2]))
    pngs = []
    for i, ds in enumerate(dss):
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept)
        ok, enc = cv2.imencode(".png", unit_to_u8(window_hu(hu, -700, 1500)))
        pngs.append((f"slices/slice_{i}.png", enc.tobytes()))
    r = post(setup["app"], pngs)
    assert r.status_code == 200, r.text
    got = r.json()["prediction"]
    assert got["series"]["kind"] == "images"
    assert any(w["reason"] == "not_ct_verified" for w in got["warnings"])
    # a study predict refuses: its reason, and the next upload is answered as before
    mr = phantom.write_study(tmp_path / "mr", kind="covid", num_slices=12, matrix=96,
                             modality="MR", patient_id="PHANTOM-MR")
    r = post(setup["app"], study_files(mr))
    assert r.status_code == 422 and r.json()["reason"] == "non_ct_modality"
    assert r.json()["error"].startswith("study study.") and "PHANTOM" not in r.text
    r = post(setup["app"], study_files(study))
    assert r.status_code == 200 and r.json()["prediction"]["patient"] == want["patient"]
    assert list(setup["tmp_root"].iterdir()) == []


@pytest.mark.slow
def test_twenty_concurrent_uploads_all_answered_none_mixed_up(setup, tmp_path):
    """20 different studies (zips and files) and 2 bad uploads at once against a live
    server: each answered, each answer its own study's (series key, slice keys)."""
    studies = []
    for i in range(20):
        folder = phantom.write_study(tmp_path / f"s{i:02d}", kind=("normal", "covid")[i % 2],
                                     num_slices=10 + i, matrix=96, seed=100 + i,
                                     patient_id=f"PHANTOM-L{i:02d}")
        studies.append(folder)
    bad = [[("evil.zip", zip_bytes([("../../escaped.dcm", DICOM_PREAMBLE)]))],
           [("notes.txt", b"not an image")]]

    async def one(client, files):
        started = time.monotonic()
        r = await client.post("/api/predict", timeout=600, **multipart(files))
        return r, time.monotonic() - started

    async def all_at_once(url):
        async with httpx.AsyncClient(base_url=url) as client:
            jobs = [one(client, [("study.zip", zipped(s))] if i % 2 else study_files(s))
                    for i, s in enumerate(studies)]
            jobs.insert(5, one(client, bad[0]))
            jobs.insert(15, one(client, bad[1]))
            started = time.monotonic()
            out = await asyncio.gather(*jobs)
            return out, time.monotonic() - started

    with LiveServer(setup["app"]) as server:
        results, wall = asyncio.run(all_at_once(server.url))
    bad_results = [results.pop(15), results.pop(5)]
    assert [r.json()["reason"] for r, _ in bad_results] == ["not_an_image", "zip_unsafe"]
    for folder, (r, _) in zip(studies, results):
        assert r.status_code == 200, r.text
        got = r.json()["prediction"]
        key, sops = series_key(folder)
        assert got["series"]["series_key"] == key
        assert got["series"]["slices_in_series"] == len(list(folder.iterdir()))
        assert {s["sop_key"] for s in got["slices"]} <= sops
    assert list(setup["tmp_root"].iterdir()) == []
    times = sorted(t for _, t in results)
    # (printed, not through capsys: a stream capsys closes after the test can stay bound
    # to a logging handler that the server's thread created, and later writes then fail)
    print(f"\nload test: 20 studies + 2 refused, all at once: {wall:.1f} s wall, "
          f"per request median {times[10]:.1f} s, max {times[-1]:.1f} s")


@pytest.mark.slow
def test_the_page_in_headless_chromium(setup, tmp_path):
    """Upload a generated study, wait for the result, read the decision from the page and
    save a screenshot; then a zip with '../' in a member name: refused on the page, nothing
    written outside the request's temporary folder (and that folder deleted)."""
    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    study = setup["studies"]["covid"]
    want = direct(setup, study, tmp_path)
    evil = tmp_path / "upload" / "evil.zip"
    evil.parent.mkdir()
    evil.write_bytes(zip_bytes([("../../escaped.dcm", (study / next(
        f.name for f in study.iterdir())).read_bytes())]))
    console = []
    shots = artifacts_dir()
    with LiveServer(setup["app"]) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1200, "height": 900},
                                   accept_downloads=True)
            tab.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: console.append(str(e)))
            tab.goto(server.url + "/", wait_until="load")
            assert "Research use only: not for clinical use." in tab.inner_text("#notice")
            auc = setup_metrics_auc(setup)
            assert tab.inner_text('[data-metric="patient-auc"]') == auc
            tab.set_input_files("#files", sorted(str(f) for f in study.iterdir()))
            tab.click("#analyse")
            tab.wait_for_selector("#result:not([hidden])", timeout=240_000)
            decision = tab.inner_text("#decision")
            assert decision == want["patient"]["decision"]
            assert tab.locator("img.evidence-img").count() == 3
            assert tab.evaluate("Array.from(document.images).every(i => i.complete && "
                                "i.naturalWidth > 0)")
            assert "0.3000" in tab.inner_text("#rule")
            tab.screenshot(path=str(shots / "web_result_chromium.png"), full_page=True)
            with tab.expect_download() as dl:
                tab.click("#download")
            saved = tmp_path / "downloaded.json"
            dl.value.save_as(str(saved))
            got = json.loads(saved.read_text())
            assert got["patient"]["decision"] == decision
            assert [s["sop_key"] for s in got["slices"]] == [
                s["sop_key"] for s in want["slices"]]
            # the '../' zip
            tab.set_input_files("#files", [str(evil)])
            tab.click("#analyse")
            tab.wait_for_selector("#error:not([hidden])", timeout=60_000)
            message = tab.inner_text("#error")
            assert "zip_unsafe" in message and "'..' path" in message
            assert tab.is_hidden("#result")
            tab.screenshot(path=str(shots / "web_refused_chromium.png"), full_page=True)
        finally:
            browser.close()
    # the refused upload's 422 is the only error the browser reports
    assert [m for m in console if "status of 422" not in m] == [], console
    assert len(console) == 1
    for where in (setup["tmp_root"].parent, setup["tmp_root"], tmp_path, evil.parent,
                  tmp_path.parent):
        assert not (where / "escaped.dcm").exists()
    assert list(setup["tmp_root"].iterdir()) == []
    assert (shots / "web_result_chromium.png").stat().st_size > 20_000


@pytest.mark.slow
def test_through_a_model_server(setup, tmp_path):
    """--server: the prepared slices go to covid_keras.serve (TF Serving's REST API); the
    answer is the local one; a server that went away is a clear 502, and nothing is left."""
    study = setup["studies"]["normal"]
    tmp_root = tmp_path / "webtmp"
    tmp_root.mkdir()
    with ServeProcess(setup["export"], tmp_path) as server:
        model = web_app.load(str(setup["export"]), server.url, "drenet", 60)
        card = web_app.build_card(model, str(setup["export"]), str(setup["metrics"]), None)
        assert card["model"]["source"] == "server" and card["validation"] is not None
        app = web_app.create_app(model, card, SALT, tmp_dir=str(tmp_root))
        r = post(app, study_files(study))
        assert r.status_code == 200, r.text
        got, want = r.json()["prediction"], direct(setup, study, tmp_path)
        assert got["model"]["kind"] == "server"
        assert got["patient"]["decision"] == want["patient"]["decision"]
        np.testing.assert_allclose(list(got["patient"]["probabilities"].values()),
                                   list(want["patient"]["probabilities"].values()), atol=1e-5)
    r = post(app, study_files(study))
    assert r.status_code == 502 and r.json()["reason"] == "model_unavailable"
    assert "cannot reach the model server" in r.json()["error"]
    assert "127.0.0.1" not in r.text and "localhost" not in r.text  # the address stays here
    assert list(tmp_root.iterdir()) == []


def setup_metrics_auc(setup) -> str:
    e = json.loads((setup["metrics"] / "metrics.json").read_text())["patient"]["auc"]
    return f"{e['value']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"


@pytest.mark.slow
def test_the_command_binds_localhost_and_fails_in_one_line(setup, tmp_path):
    env = quiet_env()
    base = [sys.executable, "-m", "covid_keras.web"]
    proc = subprocess.Popen(base + [f"--model={setup['export']}", "--port=0",
                                    f"--metrics={setup['metrics']}",
                                    f"--data_manifest={setup['data_dir']}",
                                    f"--tmp_dir={tmp_path}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("covid_keras.web: http://127.0.0.1:"), (
            line, proc.stderr.read() if proc.poll() is not None else "")
        assert "not for clinical use" in line
        url = line.split()[1]
        page = httpx.get(url, timeout=30).text
        assert "Research use only" in page and setup_metrics_auc(setup) in page
        r = httpx.post(url + "api/predict", timeout=120,
                       **multipart(study_files(setup["studies"]["normal"])))
        assert r.status_code == 200 and r.json()["prediction"]["series"]["kind"] == "dicom"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert "api/predict" not in out + err and "POST" not in out + err  # no access log
    assert "PHANTOM" not in out + err
    assert list(tmp_path.iterdir()) == []
    bad = subprocess.run(base + [f"--model={tmp_path / 'nowhere'}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("covid_keras.web: error: --model ")
