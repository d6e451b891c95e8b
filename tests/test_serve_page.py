"""covid_keras.web under attack (issue 29): what a killed page left is removed at start,
junk that starts as DICOM is refused as it streams in, zip expansion is reserved against a
global disk budget before a byte is written, a client that has gone is not predicted for,
the page's prediction.json and card name the version that answered, and the page's access
checks (Host, Origin, token)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the [web] extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
pytest.importorskip("python_multipart", reason="the [web] extra is not installed")

from covid_keras.serving import model_server, web_app  # noqa: E402
from data_prep import phantom  # noqa: E402
from tests.helpers import (  # noqa: E402
    DICOM_PREAMBLE,
    FakeModel,
    ServeProcess,
    copy_export,
    get,
    multipart,
    post,
    study_files,
    zip_bytes,
)
from tests.helpers import WEB_SALT as SALT  # noqa: E402

TOKEN = "page-token-0123456789abcdef"


def post_get(app, path) -> str:
    return get(app, path).text


def _card():
    return web_app.model_card(FakeModel.info, FakeModel.source, None, None)


def test_leftovers_of_a_killed_page_are_removed_at_start(tmp_path):
    """Reproduction 6: kill -9 during an upload left the DICOM files (tags, identifying
    folder names) in the request's folder, and a restart kept them."""
    root = tmp_path / "pageroot"
    dead = root / "covid_keras_web_999999999_abc" / "study" / "Doe_John"
    dead.mkdir(parents=True)
    (dead / "1.dcm").write_bytes(DICOM_PREAMBLE)
    old_style = root / "covid_keras_web_k3j2h1"  # the folders of the page before
    old_style.mkdir()
    live = root / f"covid_keras_web_{os.getppid()}_xyz"  # another page still running
    live.mkdir()
    other = root / "not_ours.txt"
    other.write_text("kept")
    web_app.create_app(FakeModel(), _card(), SALT, tmp_dir=str(root))
    assert sorted(p.name for p in root.iterdir()) == sorted([live.name, other.name])
    # the default root is private to the user
    default = web_app.work_root(None)
    assert Path(default).name == f"covid_keras_web-{os.getuid()}"
    assert os.stat(default).st_mode & 0o077 == 0


def test_junk_that_starts_as_dicom_is_refused_as_it_streams_in(tmp_path):
    """Reproduction 4: 200 MB of 'DICM' then zeros held the model slot for 152 s. The meta
    header is parsed within the first KB, before the rest arrives: the rest is never
    written, and with no other file the upload is refused without reaching the model."""
    limits = web_app.Limits(max_upload_bytes=64 << 20)
    app = web_app.create_app(FakeModel(), _card(), SALT, limits, tmp_dir=str(tmp_path))
    seen = {"max": 0, "on_disk": []}

    def on_disk() -> int:
        return sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())

    async def stream():  # the body as a client sends it
        head = DICOM_PREAMBLE + b"\0" * 1000
        for i in range(32):
            seen["max"] = i
            if i:
                seen["on_disk"].append(on_disk())
            yield head if i == 0 else b"\0" * (1 << 20)

    async def go():
        boundary = "b0undary"
        async def body():
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                   "filename=\"junk.dcm\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                   ).encode()
            async for chunk in stream():
                yield chunk
            yield f"\r\n--{boundary}--\r\n".encode()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            return await client.post("/api/predict", content=body(), headers={
                "content-type": f"multipart/form-data; boundary={boundary}"}, timeout=60)

    r = asyncio.run(go())
    assert r.status_code == 400 and r.json()["reason"] == "bad_dicom", r.text
    assert "no usable file: file 1 of the upload was skipped" in r.json()["error"]
    assert "junk" not in r.text
    # decided on the first chunk: none of the 31 MB after it was written
    assert seen["max"] == 31 and max(seen["on_disk"]) <= limits.dicom_head_bytes, seen
    assert list(tmp_path.iterdir()) == []
    for head, ok in ((DICOM_PREAMBLE, False), (DICOM_PREAMBLE + b"\0" * 64, False),
                     (DICOM_PREAMBLE + b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\0",
                      True)):
        assert web_app.dicom_meta_ok(head, True) is ok
    real = phantom.write_study(tmp_path / "s", kind="normal", num_slices=2, matrix=32, seed=0,
                               patient_id="PHANTOM-X")
    first = sorted(Path(real).iterdir())[0].read_bytes()
    assert web_app.dicom_meta_ok(first[:1024], False) is True


class AnsweringModel(FakeModel):
    """Answers like an export's predict_study / gradcam (fixed numbers) and keeps how many
    slices each call got."""

    def __init__(self):
        self.calls = []

    def predict_study(self, images):
        n = len(images)
        self.calls.append(n)
        probs = np.tile(np.array([[0.2, 0.7, 0.1]], np.float32), (n, 1))
        return {"class_names": np.array([c.encode() for c in FakeModel.info["class_names"]]),
                "decision": np.int32(1), "threshold": np.float32(-1.0),
                "slice_probabilities": probs, "probabilities": probs.mean(0),
                "score": np.float32(0.7), "rule": np.array(b"mean"),
                "boxes": np.tile(np.array([[[4.0, 4.0, 20.0, 20.0]]], np.float32), (n, 1, 1)),
                "box_scores": np.full((n, 1), 0.5, np.float32)}

    def gradcam(self, images, class_index):
        return np.zeros((len(images), 64, 64), np.float32)


def test_one_bad_dicom_file_is_skipped_not_the_whole_upload(tmp_path):
    """A batch never loses its good files for one bad file: a file whose DICOM meta header
    does not parse is skipped and named by its position (never its name) in the answer's
    warnings and its prediction.json; the study is diagnosed from the rest."""
    study = Path(phantom.write_study(tmp_path / "Doe_Jane", kind="covid", num_slices=10,
                                     matrix=64, seed=2, patient_id="PHANTOM-S"))
    good = study_files(study)
    bad_meta = DICOM_PREAMBLE + b"\x02\x00\x10\x00ZZ\xff\xff" + b"\0" * 5000
    bad_name = "Doe_Jane/Doe_Jane_1970-01-01.dcm"
    uploads = good[:3] + [(bad_name, bad_meta)] + good[3:]
    model = AnsweringModel()
    app = web_app.create_app(model, _card(), SALT, tmp_dir=str(tmp_path / "root"))
    r = post(app, uploads)
    assert r.status_code == 200, r.text
    body = r.json()
    assert model.calls and model.calls[0] > 0  # diagnosed from the other files
    assert body["prediction"]["series"]["slices_in_series"] == len(good)
    skipped = [w for w in body["prediction"]["warnings"] if w["reason"] == "file_skipped"]
    assert skipped == [{"reason": "file_skipped", "file": "file 4 of the upload",
                        "detail": "file 4 of the upload was skipped: it starts as DICOM but "
                                  "its file meta header does not parse within its first "
                                  "4096 bytes"}], skipped
    assert skipped[0] in json.loads(body["prediction_json"])["warnings"]
    for leak in ("Doe", "Jane", "1970", "PHANTOM"):
        assert leak not in r.text, leak
    assert list((tmp_path / "root").iterdir()) == []
    # the same study without the bad file: the same slices
    clean = post(app, good).json()
    assert [s["sop_key"] for s in clean["prediction"]["slices"]] == [
        s["sop_key"] for s in body["prediction"]["slices"]]
    # only bad files: refused in one line, nothing reaches the model
    model.calls.clear()
    r = post(app, [(bad_name, bad_meta), ("b.dcm", DICOM_PREAMBLE + b"\0" * 64)])
    assert r.status_code == 400 and r.json()["reason"] == "bad_dicom", r.text
    assert r.json()["error"].startswith("no usable file: file 1 of the upload was skipped")
    assert "and 1 more" in r.json()["error"] and "\n" not in r.json()["error"]
    assert "Doe" not in r.text and model.calls == []
    # in a zip the same file is skipped by data_prep's reading (a pseudonym, not its name)
    r = post(app, [("s.zip", zip_bytes(uploads))])
    assert r.status_code == 200, r.text
    assert r.json()["prediction"]["series"]["slices_in_series"] == len(good)
    assert "Doe" not in r.text and "1970" not in r.text


def test_zip_expansion_is_reserved_against_a_global_budget(tmp_path, monkeypatch):
    """Reproduction 7: a 3.2 MB zip of 19 x 100 MiB low-entropy entries wrote 1.87 GB before
    it was refused, and concurrent bombs were unbounded."""
    rng = np.random.default_rng(0)
    entries = [(f"{i}.dcm", rng.integers(0, 256, 400_000, dtype=np.uint8).tobytes())
               for i in range(4)]  # 1.6 MB that does not compress
    limits = web_app.Limits(max_upload_bytes=8 << 20, max_zip_bytes=4 << 20,
                            disk_budget_bytes=3 << 20)
    app = web_app.create_app(FakeModel(), _card(), SALT, limits, tmp_dir=str(tmp_path))
    writes = []
    from covid_keras.serving import predictor

    original = predictor.unpack_zip

    def spy(*args, **kw):
        writes.append(args)
        return original(*args, **kw)

    monkeypatch.setattr(predictor, "unpack_zip", spy)
    r = post(app, [("s.zip", zip_bytes(entries))])
    assert r.status_code == 503 and r.json()["reason"] == "busy", r.text
    assert writes == []  # refused before anything was unpacked
    bomb = zip_bytes([(f"{i}.dcm", b"\0" * (2 << 20)) for i in range(19)])
    r = post(app, [("s.zip", bomb)])
    assert r.status_code == 413 and r.json()["reason"] == "zip_bomb", r.text
    assert writes == []
    ok = web_app.create_app(FakeModel(), _card(), SALT, web_app.Limits(
        max_upload_bytes=8 << 20, max_zip_bytes=4 << 20, disk_budget_bytes=16 << 20),
        tmp_dir=str(tmp_path))
    r = post(ok, [("s.zip", zip_bytes(entries))])  # within the budget: unpacked and checked
    assert r.status_code == 400 and r.json()["reason"] == "not_an_image" and len(writes) == 1
    assert list(tmp_path.iterdir()) == []
    budget = web_app.DiskBudget(10)
    budget.reserve(6)
    with pytest.raises(web_app.UploadRejected):
        budget.reserve(5)
    budget.release(6)
    budget.reserve(10)


class CountingModel(FakeModel):
    calls = 0

    def predict_study(self, images):
        CountingModel.calls += 1
        raise ValueError("counted")


def test_a_client_that_has_gone_is_not_predicted_for(tmp_path):
    """Reproduction 4's other half: requests whose clients had gone still ran."""
    study = phantom.write_study(tmp_path / "study", kind="covid", num_slices=12, matrix=96,
                                seed=1, patient_id="PHANTOM-G")
    app = web_app.create_app(CountingModel(), _card(), SALT, tmp_dir=str(tmp_path / "root"))
    CountingModel.calls = 0
    r = post(app, study_files(Path(study)))
    assert r.status_code == 422 and CountingModel.calls == 1, r.text  # it reaches the model

    req = httpx.Request("POST", "http://web/api/predict", **multipart(study_files(
        Path(study))))
    body = req.read()
    sent = {"body": False, "status": None}

    async def receive():
        if not sent["body"]:
            sent["body"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}  # the client has gone at once

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]

    scope = {"type": "http", "method": "POST", "path": "/api/predict", "raw_path":
             b"/api/predict", "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("web", 80), "client": ("127.0.0.1", 1), "http_version": "1.1",
             "headers": [(k.lower().encode(), v.encode()) for k, v in req.headers.items()],
             "asgi": {"version": "3.0"}}
    asyncio.run(app(scope, receive, send))
    assert CountingModel.calls == 1  # not computed
    assert sent["status"] == 499
    assert list((tmp_path / "root").iterdir()) == []


def test_page_access_control(tmp_path):
    """Reproduction 8 on the page: Host (DNS rebinding) on every route, a cross-site POST,
    the token (a bearer header, or the cookie the login form sets; never a URL)."""
    access = model_server.Access(["127.0.0.1"], TOKEN)
    app = web_app.create_app(FakeModel(), _card(), SALT, tmp_dir=str(tmp_path), access=access)
    form = {"content-type": "application/x-www-form-urlencoded"}
    evil = {"Host": "evil.example"}

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport,
                                     base_url="http://127.0.0.1") as client:
            first = await client.get("/")
            out = {"no_token": first.status_code,
                   "no_token_form": 'action="login"' in first.text
                   and 'type="password"' in first.text,
                   "card_no_token": (await client.get("/api/card")).status_code,
                   "static_no_token": (await client.get("/static/app.js")).status_code,
                   "bearer": (await client.get("/", headers={
                       "Authorization": f"Bearer {TOKEN}"})).status_code}
            # the Host check comes first, on every path: the login, unknown paths, statics
            out["bad_host"] = sorted({(await client.request(m, path, headers={
                "Authorization": f"Bearer {TOKEN}", **evil, **form},
                content=f"token={TOKEN}")).status_code for m, path in (
                    ("GET", "/"), ("GET", "/login"), ("POST", "/login"),
                    ("GET", "/static/app.js"), ("GET", "/api/card"),
                    ("POST", "/api/predict"), ("GET", "/nowhere"), ("GET", f"/?token={TOKEN}"))})
            out["cookies_for_bad_host"] = dict(client.cookies)
            # the old URL login grants nothing and sets no cookie
            by_url = await client.get(f"/?token={TOKEN}")
            out["url_token"] = (by_url.status_code, "set-cookie" in by_url.headers)
            out["login_form"] = (await client.get("/login")).status_code
            wrong = await client.post("/login", content="token=not-the-token", headers=form)
            out["wrong"] = (wrong.status_code, "set-cookie" in wrong.headers)
            out["cross_site_login"] = (await client.post("/login", content=f"token={TOKEN}",
                                                         headers={**form, "Origin":
                                                                  "http://evil.example"})
                                       ).status_code
            out["json_login"] = (await client.post("/login", json={"token": TOKEN})
                                 ).status_code
            out["huge_login"] = (await client.post("/login", content="token=" + "x" * 8000,
                                                   headers=form)).status_code
            out["cookies_before"] = dict(client.cookies)
            login = await client.post("/login", content=f"token={TOKEN}", headers={
                **form, "Origin": "http://127.0.0.1"})
            out["login"] = (login.status_code, login.headers["location"])
            cookie = login.headers["set-cookie"].lower()
            out["cookie"] = all(x in cookie for x in ("httponly", "samesite=strict",
                                                       "path=/"))
            out["token_in_cookie"] = TOKEN.lower() in cookie
            out["with_cookie"] = (await client.get("/")).status_code
            out["static_with_cookie"] = (await client.get("/static/app.js")).status_code
            cross = await client.post("/api/predict", content=b"x", headers={
                "Origin": "http://evil.example", "content-type": "text/plain"})
            out["cross_site"] = cross.status_code
            same = await client.post("/api/predict", content=b"x", headers={
                "Origin": "http://127.0.0.1", "content-type": "text/plain"})
            out["same_site"] = same.status_code
            client.cookies.set(web_app.TOKEN_COOKIE, TOKEN)  # the raw token is not the key
            out["raw_token_cookie"] = (await client.get("/api/card")).status_code
            return out

    got = asyncio.run(go())
    assert got == {"no_token": 401, "no_token_form": True, "card_no_token": 401,
                   "static_no_token": 401, "bearer": 200, "bad_host": [403],
                   "cookies_for_bad_host": {}, "url_token": (401, False), "login_form": 200,
                   "wrong": (401, False), "cross_site_login": 403, "json_login": 415,
                   "huge_login": 413, "cookies_before": {}, "login": (303, "./"),
                   "cookie": True, "token_in_cookie": False, "with_cookie": 200,
                   "static_with_cookie": 200, "cross_site": 403, "same_site": 415,
                   "raw_token_cookie": 401}, got
    # no token configured: the login is a redirect to the page, and the Host check stays
    open_app = web_app.create_app(FakeModel(), _card(), SALT, tmp_dir=str(tmp_path),
                                  access=model_server.Access(["127.0.0.1"], None))

    async def go_open():
        transport = httpx.ASGITransport(app=open_app)
        async with httpx.AsyncClient(transport=transport,
                                     base_url="http://127.0.0.1") as client:
            return ((await client.get("/login")).status_code,
                    (await client.get("/")).status_code,
                    (await client.get("/login", headers=evil)).status_code)

    assert asyncio.run(go_open()) == (303, 200, 403)


@pytest.mark.slow
def test_the_page_names_the_version_that_answered(tmp_path, drenet_export):
    """Reproduction 9: after the server moved to a new version, the page's prediction.json
    and model card still named the version it saw at start."""
    base = copy_export(drenet_export, tmp_path)
    study = phantom.write_study(tmp_path / "study", kind="normal", num_slices=12, matrix=96,
                                seed=0, patient_id="PHANTOM-V")
    with ServeProcess(base, tmp_path) as server:
        served = web_app.load(str(base), server.url, "drenet", 60)
        card = web_app.build_card(served, str(base), None, None)
        app = web_app.create_app(served, card, SALT, tmp_dir=str(tmp_path / "root"))
        r = post(app, study_files(Path(study)))
        assert r.status_code == 200, r.text
        assert r.json()["prediction"]["model"]["version"] == "1"
        assert "card_html" not in r.json()
        shutil.copytree(base / "1", base / ".partial-2")
        os.rename(base / ".partial-2", base / "2")
        import requests

        deadline = time.time() + 60
        while time.time() < deadline:
            st = requests.get(server.url + "/v1/models/drenet", timeout=10).json()
            if st["model_version_status"][0] == {"version": "2", "state": "AVAILABLE",
                                                 "status": {"error_code": "OK",
                                                            "error_message": ""}}:
                break
            time.sleep(0.3)
        r = post(app, study_files(Path(study)))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["prediction"]["model"]["version"] == "2"
        assert json.loads(body["prediction_json"])["model"]["version"] == "2"
        assert "version 2" in body["card_html"]
        assert "drenet, version 2" in body["card_html"]
        assert "drenet, version 2" in post_get(app, "/")
