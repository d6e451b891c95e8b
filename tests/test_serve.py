"""covid_keras.serve: TF Serving's REST and gRPC APIs over an export, with real clients
(requests; the tensorflow-serving-api gRPC stubs), version pick-up without restart, errors
and concurrency."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import copy_export, free_port, quiet_env, stop_process

pytestmark = pytest.mark.slow  # an export and a server process: ~30 s
REPO = Path(__file__).resolve().parents[1]
SIZE = 64



@pytest.fixture(scope="module")
def server(tmp_path_factory, drenet_export):
    root = tmp_path_factory.mktemp("serve")
    copy_export(drenet_export, root)  # its own: a test adds a version
    rest, grpc_port = free_port(), free_port()
    err = open(root / "serve.err", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "covid_keras.serve", "--model_name=drenet",
         f"--model_base_path={root / 'exports' / 'drenet'}", f"--rest_api_port={rest}",
         f"--port={grpc_port}", "--file_system_poll_wait_seconds=1", "--max_request_mb=4"],
        cwd=REPO, env=quiet_env(), stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    assert "serving drenet (version 1)" in line, (line, proc.poll(),
                                                  (root / "serve.err").read_text()[-2000:])
    assert "127.0.0.1" in line
    yield {"url": f"http://127.0.0.1:{rest}/v1/models/drenet", "grpc": f"127.0.0.1:{grpc_port}",
           "base": root / "exports" / "drenet", "proc": proc}
    stop_process(proc)
    err.close()
    log = (root / "serve.err").read_text()
    assert "PHANTOM" not in log and "Traceback" not in log, log[-2000:]


def _images(n=2):
    grey = np.random.default_rng(0).integers(0, 256, (n, SIZE, SIZE, 1))
    return np.repeat(grey, 3, -1).astype(np.float32)


def test_rest_status_metadata_predict(server):
    import requests

    url = server["url"]
    status = requests.get(url, timeout=30).json()
    assert status == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK",
                                                          "error_message": ""}}]}
    meta = requests.get(url + "/metadata", timeout=30).json()
    assert meta["model_spec"] == {"name": "drenet", "signature_name": "", "version": "1"}
    sigs = meta["metadata"]["signature_def"]["signature_def"]
    for name in ("serving_default", "predict_images", "predict_study", "gradcam"):
        assert name in sigs
    dims = sigs["serving_default"]["inputs"]["images"]["tensor_shape"]["dim"]
    assert [int(d["size"]) for d in dims] == [-1, SIZE, SIZE, 3]
    assert sigs["serving_default"]["inputs"]["images"]["dtype"] == "DT_FLOAT"
    x = _images()
    rows = requests.post(url + ":predict", json={"instances": x.tolist()}, timeout=60).json()
    cols = requests.post(url + "/versions/1:predict", json={"inputs": {"images": x.tolist()}},
                         timeout=60).json()
    p_rows = np.array([p["probabilities"] for p in rows["predictions"]])
    np.testing.assert_allclose(p_rows, np.array(cols["outputs"]["probabilities"]), atol=1e-6)
    assert p_rows.shape == (2, 3)
    import cv2  # (the in-memory comparison is test_export's; here: the wire)

    png = [base64.b64encode(cv2.imencode(".png", x[i, ..., 0].astype(np.uint8))[1]).decode()
           for i in range(2)]
    img = requests.post(url + ":predict", json={
        "signature_name": "predict_images", "instances": [{"b64": p} for p in png]},
        timeout=60).json()
    np.testing.assert_allclose(np.array([p["probabilities"] for p in img["predictions"]]),
                               p_rows, atol=1e-5)
    study = requests.post(url + ":predict", json={
        "signature_name": "predict_study", "inputs": {"images": x.tolist()}},
        timeout=60).json()["outputs"]
    np.testing.assert_allclose(study["probabilities"], p_rows.mean(0), atol=1e-5)
    assert study["rule"] == "mean" and abs(study["threshold"] - 0.3) < 1e-6


def test_rest_errors_and_the_server_keeps_serving(server):
    import requests

    url = server["url"]
    x = _images(1).tolist()
    cases = [
        (requests.post(url + ":predict", data=b"{not json", timeout=30), 400, "JSON"),
        (requests.post(url + ":predict", json={"instances": [[1, 2, 3]]}, timeout=30), 400,
         "expected shape"),
        (requests.post(url + ":predict", json={"instances": x, "signature_name": "nope"},
                       timeout=30), 400, "not found in signature"),
        (requests.post(url + ":predict", json={"signature_name": "predict_images",
                                               "instances": [{"b64": "aGVsbG8="}]},
                       timeout=30), 400, "not a PNG or JPEG"),
        (requests.post(url.replace("drenet", "other") + ":predict", json={"instances": x},
                       timeout=30), 404, "Servable not found"),
        (requests.post(url + "/versions/9:predict", json={"instances": x}, timeout=30), 404,
         "Specific(drenet, 9)"),
        (requests.get(url.replace("drenet", "other"), timeout=30), 404, "other"),
        (requests.post(url + ":predict", data=b"[" + b"0," * (3 << 20) + b"0]",
                       timeout=60), 413, "max_request_mb"),
    ]
    for resp, code, text in cases:
        assert resp.status_code == code, (resp.status_code, resp.text[:300])
        body = resp.json()
        assert set(body) == {"error"} and text in body["error"], body
    assert requests.get(url, timeout=30).status_code == 200
    assert server["proc"].poll() is None


def test_concurrent_requests(server):
    import requests

    x = _images(1).tolist()

    def one(_):
        r = requests.post(server["url"] + ":predict", json={"instances": x}, timeout=120)
        return r.status_code, r.json()["predictions"][0]["probabilities"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    assert all(code == 200 for code, _ in results)
    first = np.array(results[0][1])
    for _, p in results:
        np.testing.assert_allclose(p, first, atol=1e-6)


def test_grpc_predict_metadata_status(server):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    channel = grpc.insecure_channel(server["grpc"])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "drenet"
    req.model_spec.signature_name = "serving_default"
    req.inputs["images"].CopyFrom(tf.make_tensor_proto(_images()))
    resp = stub.Predict(req, timeout=60)
    probs = tf.make_ndarray(resp.outputs["probabilities"])
    assert probs.shape == (2, 3) and resp.model_spec.version.value >= 1
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    req.output_filter.append("boxes")
    assert list(stub.Predict(req, timeout=60).outputs) == ["boxes"]

    meta_req = get_model_metadata_pb2.GetModelMetadataRequest()
    meta_req.model_spec.name = "drenet"
    meta_req.metadata_field.append("signature_def")
    meta = stub.GetModelMetadata(meta_req, timeout=30)
    sdm = get_model_metadata_pb2.SignatureDefMap()
    meta.metadata["signature_def"].Unpack(sdm)
    assert {"serving_default", "predict_images", "predict_study", "gradcam"} <= set(
        sdm.signature_def)

    status_req = get_model_status_pb2.GetModelStatusRequest()
    status_req.model_spec.name = "drenet"
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_req,
                                                                             timeout=30)
    avail = [s for s in status.model_version_status
             if s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE]
    assert len(avail) == 1

    bad = predict_pb2.PredictRequest()
    bad.model_spec.name = "drenet"
    bad.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 8, 8, 3), np.float32)))
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(bad, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad.model_spec.name = "missing"
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(bad, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.Predict(req, timeout=60).outputs  # still serving


def test_a_new_version_is_picked_up_without_restart(server):
    """Last test of the module: version 2 appears (atomically, as export writes it) and
    replaces version 1 within a few polls."""
    import requests

    base = server["base"]
    shutil.copytree(base / "1", base / ".partial-2")
    info_path = base / ".partial-2" / "assets.extra" / "covid_keras.json"
    info = json.loads(info_path.read_text())
    info["version"] = 2
    info_path.write_text(json.dumps(info))
    os.rename(base / ".partial-2", base / "2")
    deadline = time.time() + 60
    while time.time() < deadline:
        status = requests.get(server["url"], timeout=30).json()["model_version_status"]
        if status[0]["version"] == "2" and status[0]["state"] == "AVAILABLE":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"version 2 not served: {status}")
    meta = requests.get(server["url"] + "/metadata", timeout=30).json()
    assert meta["model_spec"]["version"] == "2"
    x = _images(1).tolist()
    assert requests.post(server["url"] + "/versions/2:predict", json={"instances": x},
                         timeout=60).status_code == 200
    assert requests.post(server["url"] + "/versions/1:predict", json={"instances": x},
                         timeout=60).status_code == 404
    assert server["proc"].poll() is None
