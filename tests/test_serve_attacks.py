"""covid_keras.serve under attack (issue 29), one test per reproduction: slow clients do not
stop inference (and cost no thread), image bombs are refused from their header, batches
over --max_instances, NaN / Infinity and deep nesting are 400, a half-copied version is
retried and a removed version falls back, every answer names its version, the bearer
token, the Host check and cross-site POSTs. Each fails on the http.server code."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import copy_export, free_port, quiet_env, stop_process

pytestmark = pytest.mark.slow  # an export and a server process
REPO = Path(__file__).resolve().parents[1]
SIZE = 64
TOKEN = "s3cret-token-for-tests-0123456789"



@pytest.fixture(scope="module")
def export_base(tmp_path_factory, drenet_export):
    return copy_export(drenet_export, tmp_path_factory.mktemp("attack"))  # versions added


@pytest.fixture(scope="module")
def server(export_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("attack_server")
    (root / "token").write_text(TOKEN + "\n")
    rest, grpc_port = free_port(), free_port()
    err = open(root / "serve.err", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "covid_keras.serve", "--model_name=drenet",
         f"--model_base_path={export_base}", f"--rest_api_port={rest}", f"--port={grpc_port}",
         "--file_system_poll_wait_seconds=1", "--max_request_mb=8", "--max_instances=8",
         "--rest_api_num_threads=2", "--rest_api_timeout_in_ms=3000",
         f"--auth_token_file={root / 'token'}"],
        cwd=REPO, env=quiet_env(), stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    assert "serving drenet (version 1)" in line, (line, (root / "serve.err").read_text())
    yield {"url": f"http://127.0.0.1:{rest}/v1/models/drenet", "port": rest,
           "grpc": f"127.0.0.1:{grpc_port}", "proc": proc, "base": export_base}
    stop_process(proc)
    err.close()
    assert "Traceback" not in (root / "serve.err").read_text()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _images(n=2):
    grey = np.random.default_rng(0).integers(0, 256, (n, SIZE, SIZE, 1))
    return np.repeat(grey, 3, -1).astype(np.float32)


def _slow_loris(port: int, n: int) -> list[socket.socket]:
    """n connections that send a predict header announcing 1000 bytes and then one."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/models/drenet:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        socks.append(s)
    return socks


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_slow_clients_do_not_stop_inference_and_cost_no_thread(server):
    """Reproduction 1: 8 slow-loris connections held every REST slot of http.server, so a
    concurrent status and predict hung; 200 idle sockets made 200 threads."""
    import requests

    socks = _slow_loris(server["port"], 8)
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        status = requests.get(server["url"], headers=AUTH, timeout=10)
        assert status.status_code == 200
        x = _images(1).tolist()
        resp = requests.post(server["url"] + ":predict", json={"instances": x},
                             headers=AUTH, timeout=10)
        assert resp.status_code == 200, resp.text[:300]
        assert resp.headers["X-Model-Version"] == "1"
        assert time.monotonic() - t0 < 10
    finally:
        for s in socks:
            s.close()
    before = _threads(server["proc"].pid)
    idle = [socket.create_connection(("127.0.0.1", server["port"]), timeout=10)
            for _ in range(200)]
    try:
        time.sleep(0.5)
        assert _threads(server["proc"].pid) <= before + 2
        assert requests.get(server["url"], headers=AUTH, timeout=10).status_code == 200
    finally:
        for s in idle:
            s.close()


def test_slow_bodies_and_headers_time_out(server):
    """A body that does not arrive within --rest_api_timeout_in_ms (3 s) is answered 408
    and the connection closed; a header dribbled byte by byte is closed too."""
    (body,) = _slow_loris(server["port"], 1)
    header = socket.create_connection(("127.0.0.1", server["port"]), timeout=10)
    header.sendall(b"GET /v1/models/drenet HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        t0 = time.monotonic()
        answer = body.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - t0 < 8
        header.settimeout(8)
        assert header.recv(4096) == b""  # closed without an answer
    finally:
        body.close()
        header.close()


def test_image_bombs_are_refused_from_the_header(server, bench_script):
    """Reproduction 2: a small PNG of 20000 x 20000 pixels cost +2.8 GB per request."""
    import requests

    png = bench_script("serve").bomb_png(20000)
    assert len(png) < 1 << 20
    rss = _rss(server["proc"].pid)
    resp = requests.post(server["url"] + ":predict", headers=AUTH, timeout=30, json={
        "signature_name": "predict_images", "instances": [{"b64": base64.b64encode(
            png).decode()}]})
    assert resp.status_code == 400 and "pixels" in resp.json()["error"], resp.text[:300]
    assert _rss(server["proc"].pid) < rss + (200 << 20)
    truncated = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHD"
    resp = requests.post(server["url"] + ":predict", headers=AUTH, timeout=30, json={
        "signature_name": "predict_images", "instances": [{"b64": base64.b64encode(
            truncated).decode()}]})
    assert resp.status_code == 400 and "IHDR" in resp.json()["error"]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_the_signature_refuses_image_bombs_itself(export_base):
    """The export's predict_images reads the size from the PNG / JPEG header and refuses a
    bomb before decoding it (a server that does not check, e.g. TF Serving)."""
    import cv2

    from covid_keras.serving import model_server, serving_signatures

    servable = model_server.Servable("drenet", 1, str(export_base / "1"))
    servable.max_image_pixels = None  # the server's own check off: the graph's answers
    big = np.zeros((4100, 4100), np.uint8)
    for ext in (".png", ".jpg"):
        data = cv2.imencode(ext, big)[1].tobytes()
        assert serving_signatures.image_header_size(data) == (4100, 4100)
        with pytest.raises(model_server.ServingError, match="pixels"):
            servable.run("predict_images", {"image_bytes": np.array([data], dtype=object)})
    ok = cv2.imencode(".jpg", np.full((80, 100), 128, np.uint8))[1].tobytes()
    assert serving_signatures.image_header_size(ok) == (80, 100)
    out = servable.run("predict_images", {"image_bytes": np.array([ok], dtype=object)})
    assert out["probabilities"].shape == (1, 3)
    assert serving_signatures.image_header_size(b"plain") is None
    with pytest.raises(ValueError, match="JPEG"):
        serving_signatures.image_header_size(b"\xff\xd8\xff\xd9")


def test_batches_nan_infinity_and_nesting_are_400(server):
    """Reproductions 3 and 10: a batch over --max_instances (8) is refused before it is
    converted; NaN, Infinity, a number that overflows and JSON nested 100000 deep are 400
    (the last was 500)."""
    import requests

    url = server["url"] + ":predict"
    x = _images(1)[0].tolist()
    resp = requests.post(url, json={"instances": [x] * 9}, headers=AUTH, timeout=30)
    assert resp.status_code == 400 and "max_instances" in resp.json()["error"]
    resp = requests.post(url, json={"inputs": {"images": [x] * 9}}, headers=AUTH, timeout=30)
    assert resp.status_code == 400 and "max_instances" in resp.json()["error"]
    for bad in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = '{"instances": [[[[%s, 0, 0]]]]}' % bad
        resp = requests.post(url, data=body, headers=AUTH, timeout=30)
        assert resp.status_code == 400, (bad, resp.status_code, resp.text[:200])
    deep = b"[" * 100000 + b"]" * 100000
    resp = requests.post(url, data=deep, headers=AUTH, timeout=30)
    assert resp.status_code == 400, resp.text[:300]
    assert requests.post(url, json={"instances": [x] * 8}, headers=AUTH,
                         timeout=60).status_code == 200


def test_access_control(server):
    """Reproduction 8: no token, a foreign Host (DNS rebinding) and a cross-site text/plain
    POST are refused, on REST and on gRPC."""
    import grpc
    import requests
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    url = server["url"]
    body = json.dumps({"instances": _images(1).tolist()})
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer wrong-token-xxxxxxxx"},
                        timeout=10).status_code == 401
    assert requests.get(url, headers={**AUTH, "Host": "evil.example:8501"},
                        timeout=10).status_code == 403
    cross = requests.post(url + ":predict", data=body, timeout=10, headers={
        **AUTH, "Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert cross.status_code == 403
    same = requests.post(url + ":predict", data=body, timeout=30, headers={
        **AUTH, "Origin": f"http://127.0.0.1:{server['port']}"})
    assert same.status_code == 200

    channel = grpc.insecure_channel(server["grpc"])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "drenet"
    req.inputs["images"].CopyFrom(tf.make_tensor_proto(_images(1)))
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    resp = stub.Predict(req, timeout=60, metadata=[("authorization", f"Bearer {TOKEN}")])
    assert resp.model_spec.version.value == 1
    channel.close()


def test_binding_elsewhere_needs_access_control(export_base, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "covid_keras.serve", f"--model_base_path={export_base}",
         "--host=0.0.0.0", f"--rest_api_port={free_port()}", "--port=0"],
        cwd=REPO, env=quiet_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--allowed_hosts" in done.stderr and "--auth_token_file" in done.stderr
    assert "Traceback" not in done.stderr


def _status(server) -> list[dict]:
    import requests

    return requests.get(server["url"], headers=AUTH, timeout=10).json()[
        "model_version_status"]


def _wait(server, check, what: str, seconds: float = 60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        status = _status(server)
        if check(status):
            return status
        time.sleep(0.3)
    pytest.fail(f"{what}: {status}")


def test_versions_retry_a_failed_load_and_fall_back_when_removed(server):
    """Reproduction 5 (last test of the module: it changes the versions). A version copied
    file by file (saved_model.pb first) failed once and answered 404 until a restart; a
    removed version stayed live. Every answer names the version that answered."""
    import requests

    base = server["base"]
    one = base / "1"
    two = base / "2"
    two.mkdir()
    shutil.copy(one / "saved_model.pb", two / "saved_model.pb")  # the copy has begun
    status = _wait(server, lambda s: s[0]["version"] == "2" and s[0]["state"] == "END"
                   and s[0]["status"]["error_message"], "the half copy is not reported")
    assert any(s["version"] == "1" and s["state"] == "AVAILABLE" for s in status)
    x = _images(1).tolist()
    resp = requests.post(server["url"] + ":predict", json={"instances": x}, headers=AUTH,
                         timeout=60)
    assert resp.status_code == 200 and resp.headers["X-Model-Version"] == "1"
    for item in one.iterdir():  # the copy completes
        if item.name != "saved_model.pb":
            (shutil.copytree if item.is_dir() else shutil.copy)(item, two / item.name)
    _wait(server, lambda s: s[0]["version"] == "2" and s[0]["state"] == "AVAILABLE",
          "the completed version is not retried")
    resp = requests.post(server["url"] + ":predict", json={"instances": x}, headers=AUTH,
                         timeout=60)
    assert resp.headers["X-Model-Version"] == "2"
    meta = requests.get(server["url"] + "/metadata", headers=AUTH, timeout=10)
    assert meta.headers["X-Model-Version"] == "2"
    shutil.rmtree(two)  # the served version is removed: the highest remaining is served
    _wait(server, lambda s: any(v["version"] == "1" and v["state"] == "AVAILABLE"
                                for v in s), "version 1 is not served again")
    resp = requests.post(server["url"] + ":predict", json={"instances": x}, headers=AUTH,
                         timeout=60)
    assert resp.status_code == 200 and resp.headers["X-Model-Version"] == "1"
    assert requests.post(server["url"] + "/versions/2:predict", json={"instances": x},
                         headers=AUTH, timeout=60).status_code == 404
    assert server["proc"].poll() is None


def test_the_pool_is_bounded_and_skips_clients_that_have_gone():
    """Inference runs in a bounded pool: over workers + queue is 503 at once; a request
    whose client has gone before its turn is never computed (reproduction 4's server
    side)."""
    from covid_keras.serving import model_server

    pool = model_server.InferencePool(1, 1)
    release = threading.Event()
    ran = []
    first = pool.submit(release.wait, 30)
    second = pool.submit(ran.append, "computed", alive=lambda: False)
    with pytest.raises(model_server.ServingError) as err:
        pool.submit(ran.append, "third")
    assert err.value.http == 503 and err.value.grpc_code == "UNAVAILABLE"
    release.set()
    assert first.result(timeout=10) is True
    with pytest.raises(model_server.ClientGone):
        second.result(timeout=10)
    assert ran == []
    assert pool.submit(ran.append, "later").result(timeout=10) is None and ran == ["later"]
    pool.shutdown()


def test_access_rules_unit():
    from covid_keras.serving import model_server

    loop = model_server.Access.for_binding("127.0.0.1", None, None)
    assert loop.host_ok("127.0.0.1:8501") and loop.host_ok("localhost")
    assert loop.host_ok("[::1]:8501") and not loop.host_ok("evil.example")
    assert loop.token_ok(None)
    assert model_server.Access.same_origin(None, "127.0.0.1:1")
    assert model_server.Access.same_origin("http://127.0.0.1:1", "127.0.0.1:1")
    assert not model_server.Access.same_origin("http://evil.example", "127.0.0.1:1")
    assert not model_server.Access.same_origin(None, "127.0.0.1:1", "cross-site")
    with pytest.raises(ValueError, match="allowed_hosts"):
        model_server.Access.for_binding("0.0.0.0", None, None)
    anyhost = model_server.Access(["*"])
    assert anyhost.host_ok("anything")


# ------------------------------------------------------------------ review of issue 29
class _FakeServable:
    """A servable without TensorFlow: one input ``x``, ``y = 2 x``."""

    name, version = "drenet", 7

    def input_specs(self, _sig):
        return {"x": None}

    def run(self, _sig, inputs, _output_filter=()):
        return {"y": np.asarray(inputs["x"], np.float32) * 2}


class _FakeManager:
    max_instances = 8

    def get(self, name, version=None):
        from covid_keras.serving import model_server

        if name != "drenet":
            raise model_server.not_found(f"Servable not found for request: Latest({name})")
        return _FakeServable()

    def status(self, name, version=None):
        return []


@pytest.fixture
def fake_rest():
    """The REST app in this process over _FakeManager, on a free port: (port, app) and a
    function to start it with a byte budget and a timeout."""
    from covid_keras.serving import model_server

    started = []

    def start(budget_bytes: int, timeout_s: float = 3.0):
        pool = model_server.InferencePool(1, 4)
        budget = model_server.ByteBudget(budget_bytes)
        rest = model_server.make_rest_server(_FakeManager(), "127.0.0.1", 0, 1 << 20, 1, timeout_s,
                                             4, model_server.Access(), pool, budget)
        rest.start()
        started.append((rest, pool))
        for _ in range(400):
            if rest.server.started:
                break
            time.sleep(0.05)
        assert rest.server.started
        return rest.port, budget

    yield start
    for rest, pool in started:
        rest.stop()
        pool.shutdown()


def _post_head(port: int, length: int, model: str = "drenet") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(b"POST /v1/models/%s:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
              b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
              % (model.encode(), length))
    return s


def _answer(s: socket.socket) -> bytes:
    out = b""
    while True:
        data = s.recv(65536)
        if not data:
            return out
        out += data


def _until(check, what: str) -> None:
    for _ in range(400):
        if check():
            return
        time.sleep(0.05)
    pytest.fail(what)


def _padded(obj, size: int) -> bytes:
    body = json.dumps(obj).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


def test_request_bodies_reserve_a_byte_budget_before_they_are_read(fake_rest):
    """Review of issue 29, 1: bodies were read with no limit on how many arrive at once
    (100 clients x --max_request_mb). A body's Content-Length is reserved before it is read:
    a second body that does not fit is 503 at once while the first is in flight, and the
    budget is given back on every way out (answered, client gone, unknown model)."""
    port, budget = fake_rest(1500)
    body = _padded({"instances": [1.0, 2.0]}, 1000)
    first = _post_head(port, len(body))
    try:
        first.sendall(body[:10])
        _until(lambda: budget.used == 1000, "the first body is not reserved")
        second = _post_head(port, len(body))
        try:
            answer = _answer(second)
            assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
            assert b"max_inflight_mb" in answer
        finally:
            second.close()
        assert budget.used == 1000
        first.sendall(body[10:])
        answer = _answer(first)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"predictions": [2.0, 4.0]}
    finally:
        first.close()
    assert budget.used == 0
    gone = _post_head(port, len(body))  # the client goes in the middle of its body
    gone.sendall(body[:10])
    _until(lambda: budget.used == 1000, "the body is not reserved")
    gone.close()
    _until(lambda: budget.used == 0, "a gone client's bytes are not given back")
    unknown = _post_head(port, len(body), "other")
    unknown.sendall(body)
    assert _answer(unknown).startswith(b"HTTP/1.1 404")
    unknown.close()
    assert budget.used == 0


def test_a_slow_body_that_keeps_coming_is_not_timed_out(fake_rest):
    """Review of issue 29, 5: the body's deadline was total, so a legitimate large body
    slower than max_request_mb / timeout got 408. It is an idle timeout now: each piece
    within the timeout of the last (the slow-loris test still gets its 408)."""
    port, _ = fake_rest(1 << 20, timeout_s=1.5)
    body = _padded({"instances": [1.0, 2.0]}, 800)
    s = _post_head(port, len(body))
    try:
        for i in range(0, len(body), 100):  # 8 pieces, 0.3 s apart: 2.4 s in all
            s.sendall(body[i:i + 100])
            time.sleep(0.3)
        answer = _answer(s)
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_deep_nesting_under_orjsons_limit_is_400(fake_rest):
    """Review of issue 29, 2: JSON nested 900 deep (orjson accepts 1024 levels) recursed
    in the conversion into RecursionError, a 500. Nesting deeper than MAX_DEPTH is 400."""
    from covid_keras.serving import model_server

    port, budget = fake_rest(1 << 20)
    for leaf in (b"0", b'"text"', b'{"b64": "AA=="}'):
        body = b'{"instances": ' + b"[" * 900 + leaf + b"]" * 900 + b"}"
        s = _post_head(port, len(body))
        s.sendall(body)
        answer = _answer(s)
        s.close()
        assert answer.startswith(b"HTTP/1.1 400"), (leaf, answer[:300])
        assert b"nested" in answer
    with pytest.raises(model_server.ServingError) as err:
        model_server.parse_predict_body({"inputs": {"x": json.loads("[" * 33 + "1" + "]" * 33)}},
                                        ["x"])
    assert err.value.http == 400
    ok = model_server.parse_predict_body({"inputs": json.loads("[" * 32 + "1" + "]" * 32)}, ["x"])
    assert ok[0]["x"].ndim == 32
    assert budget.used == 0


def test_a_failed_version_is_loaded_again_only_when_its_files_change(tmp_path, monkeypatch):
    """Review of issue 29, 3: a version that failed to load was loaded again (a whole
    tf.saved_model.load) at every poll. It is retried once its folder has changed."""
    from covid_keras.serving import model_server

    loads = []

    class Broken:
        def __init__(self, name, version, path):
            loads.append(version)
            if not os.path.exists(os.path.join(path, "variables")):
                raise FileNotFoundError("variables/ is missing")
            self.name, self.version, self.path = name, version, path

    monkeypatch.setattr(model_server, "Servable", Broken)
    for v in ("1", "2"):
        (tmp_path / v).mkdir()
        (tmp_path / v / "saved_model.pb").write_bytes(b"pb")
    (tmp_path / "1" / "variables").mkdir()
    manager = model_server.ModelManager("drenet", str(tmp_path), 0)
    manager.poll()
    assert loads == [2, 1] and manager.current.version == 1
    assert manager.status("drenet", 2)[0]["state"] == "END"
    for _ in range(5):
        manager.poll()
    assert loads == [2, 1]  # not loaded again while nothing changed
    (tmp_path / "2" / "variables").mkdir()  # the copy completes
    manager.poll()
    assert loads == [2, 1, 2] and manager.current.version == 2
    assert manager.status("drenet", 2)[0]["state"] == "AVAILABLE"


def test_grpc_client_gone_ends_cancelled_not_internal(monkeypatch, caplog):
    """Review of issue 29, 4: grpc's context.abort raises a plain Exception; raised for a
    client that had gone, the handler's guard logged it as an internal error and aborted
    again with INTERNAL. It ends CANCELLED, with no internal-error line."""
    import logging

    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from covid_keras.serving import model_server

    captured = {}
    monkeypatch.setattr(prediction_service_pb2_grpc, "add_PredictionServiceServicer_to_server",
                        lambda servicer, _server: captured.setdefault("servicer", servicer))

    class Context:
        """grpc's ServicerContext as far as the handlers use it; abort as grpc's: the
        status is set and a plain Exception raised."""

        code = None

        def invocation_metadata(self):
            return ()

        def is_active(self):
            return False  # the client has gone before its turn

        def abort(self, code, details):
            self.code, self.details = code, details
            raise Exception()

    pool = model_server.InferencePool(1, 1)
    server, _ = model_server.make_grpc_server(_FakeManager(), "127.0.0.1", 0, 1 << 20, 1, 1,
                                              model_server.Access(), pool)
    try:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "drenet"
        req.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((1, 2), np.float32)))
        context = Context()
        with caplog.at_level(logging.ERROR, logger="covid_keras.serve"):
            with pytest.raises(Exception):  # noqa: B017 - grpc's abort raises a plain one
                captured["servicer"].Predict(req, context)
        assert context.code == grpc.StatusCode.CANCELLED, (context.code, context.details)
        assert "internal error" not in caplog.text
    finally:
        server.stop(None)
        pool.shutdown()
