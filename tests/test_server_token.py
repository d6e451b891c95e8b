"""predict's and the page's client of a model server started with --auth_token_file: the
bearer token from --server_token_file reaches the server (a recording stub on 127.0.0.1)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

METADATA = {"model_spec": {"name": "drenet", "version": "3"}, "metadata": {"signature_def": {
    "signature_def": {"predict_study": {"inputs": {"images": {"tensor_shape": {"dim": [
        {"size": "-1"}, {"size": "64"}, {"size": "64"}, {"size": "3"}]}}}}}}}}


@pytest.fixture()
def stub():
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append(self.headers.get("Authorization"))
            body = json.dumps(METADATA).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_the_token_file_becomes_a_bearer_header(stub, tmp_path):
    from covid_keras.serving import predictor

    url, seen = stub
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-0123456789\n")
    model = predictor.ServerModel(url, "drenet", {"input_size": 64}, 10.0,
                                  predictor.server_token(str(token_file)))
    assert seen == ["Bearer s3cret-token-0123456789"] and model.version == "3"
    predictor.ServerModel(url, "drenet", {"input_size": 64}, 10.0, predictor.server_token(None))
    assert seen[-1] is None  # no token file: no header


def test_a_bad_token_file_is_one_line_naming_the_flag(tmp_path):
    from covid_keras.serving import predictor

    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ValueError, match="--server_token_file .*16 characters"):
        predictor.server_token(str(short))


def test_the_page_passes_the_token_to_its_server_model(stub, tmp_path):
    from covid_keras.serving import web_app

    url, seen = stub
    web_app.load(None, url, "drenet", 10.0, "page-token-0123456789")
    assert seen == ["Bearer page-token-0123456789"]
