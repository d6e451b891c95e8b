r"""A local model server that speaks TF Serving's REST and gRPC APIs.

    python -m covid_keras.serve --model_name=drenet --model_base_path=$PWD/exports/drenet \
        --port=8500 --rest_api_port=8501

The flags are ``tensorflow_model_server``'s (``--model_name``, ``--model_base_path``,
``--port``, ``--rest_api_port``, ``--file_system_poll_wait_seconds``,
``--rest_api_num_threads``), so a client written for TF Serving works unchanged, and the
export runs in the real ``tensorflow/serving`` container as it is. Where the real server
cannot be installed (this project's CI) this one serves the same SavedModel through
``tf.saved_model.load``.

* REST: ``POST /v1/models/<name>[/versions/<v>]:predict`` (row ``instances`` or columnar
  ``inputs``, binary values as ``{"b64": ...}``, ``signature_name``), ``GET
  /v1/models/<name>[/versions/<v>]`` (status) and ``GET /v1/models/<name>[/versions/<v>]
  /metadata`` (the signature defs, as TF Serving's JSON).
* gRPC: ``tensorflow.serving.PredictionService`` (Predict, GetModelMetadata) and
  ``tensorflow.serving.ModelService`` (GetModelStatus), from tensorflow-serving-api's stubs.
* Versions: the highest integer folder under ``--model_base_path`` holding a
  ``saved_model.pb`` is served (TF Serving's default "latest" policy); the folder is polled
  every ``--file_system_poll_wait_seconds`` (0: once at start) and a new version is loaded
  and swapped in without a restart; the old one is then unloaded.
  A version that fails to load (a folder still being copied) is retried at the next poll;
  when the served version's folder is removed the highest remaining version is served.
  Every REST answer from a model names it in the ``X-Model-Version`` header (gRPC: the
  response's ``model_spec``), so a client knows which version answered.
* Errors as TF Serving: ``{"error": "..."}`` with 400 (malformed or wrongly shaped request,
  NaN / Infinity, JSON nested too deeply, more than ``--max_instances`` instances, an image
  over ``--max_image_pixels`` by its header), 404 (unknown model or version), 408 (request
  header not received, or the body paused, longer than ``--rest_api_timeout_in_ms``), 413
  (body over ``--max_request_mb``), 503 (the inference queue is full, or the bodies in
  flight would pass ``--max_inflight_mb``); gRPC status codes INVALID_ARGUMENT / NOT_FOUND /
  RESOURCE_EXHAUSTED / UNAVAILABLE. A bad request never stops the server.
* REST on Starlette + uvicorn (asyncio, the stack of :mod:`covid_keras.web`): a connection
  costs a socket, not a thread, so slow or idle clients cannot hold the server; a request
  header must arrive within ``--rest_api_timeout_in_ms`` and its body may not pause longer
  than that; a body's Content-Length is reserved against ``--max_inflight_mb`` before it is
  read. JSON: a long plain numeric array (a study's slices) is converted to a NumPy array
  straight from the body's bytes (:func:`loads_predict`), not into a Python object per
  value; anything else, and any body that path does not take, is parsed by orjson as
  before, with the same answers and errors. Inference (JSON decoding included) runs in one
  pool of ``--rest_api_num_threads`` workers shared with gRPC, at most ``--max_queue``
  requests waiting (then 503 / UNAVAILABLE); a request whose client has gone before its
  turn is not computed.
* Binds ``--host`` (127.0.0.1 by default; TF Serving binds every interface) and logs no
  request content. Access control: ``--allowed_hosts`` (the Host header; on a loopback
  address, the loopback names by default, against DNS rebinding), a browser's cross-site
  POST refused by its ``Origin``, and ``--auth_token_file`` (``Authorization: Bearer
  <token>`` on REST, ``authorization`` metadata on gRPC). Binding any other address needs
  both ``--allowed_hosts`` and ``--auth_token_file``; put TLS in front with a reverse proxy
  (README).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from absl import flags

from covid_keras.core import cli
from covid_keras.serving import model_server

FLAGS = flags.FLAGS
log = logging.getLogger("covid_keras.serve")


def define_flags() -> None:
    flags.DEFINE_string("model_name", "default", "Name the model is served under.")
    flags.DEFINE_bool("release_memory", True, "Give memory back after a large batch: "
                      "TensorFlow's oneDNN allocator otherwise keeps its peak (+650 MB after "
                      "one 1023-slice batch); sets TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 unless "
                      "the environment sets it. Costs ~13-16 % of latency per study "
                      "(bench/README.md); --norelease_memory for speed.")
    flags.DEFINE_string("model_base_path", None, "<export_base>/<model_name>: the folder of "
                        "integer version folders.")
    flags.DEFINE_integer("port", 8500, "gRPC port (0: no gRPC).")
    flags.DEFINE_integer("rest_api_port", 8501, "REST port (0: no REST).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0: every interface).")
    flags.DEFINE_integer("file_system_poll_wait_seconds", 1, "Seconds between polls of "
                         "--model_base_path for new versions (0: once at start).")
    flags.DEFINE_integer("rest_api_num_threads", 8, "Requests computed at once (the "
                         "inference workers, shared by REST and gRPC).")
    flags.DEFINE_integer("rest_api_timeout_in_ms", 30000, "A REST request's header must "
                         "arrive within this time, and its body may pause no longer than "
                         "this between two pieces (then 408 and the connection closes).")
    flags.DEFINE_float("max_request_mb", 64.0, "Largest request body (REST) or message "
                       "(gRPC) accepted, MiB.")
    flags.DEFINE_float("max_inflight_mb", 256.0, "REST request bodies being received or "
                       "waiting to be computed hold at most this many MiB together, reserved "
                       "from their Content-Length before they are read (then HTTP 503); at "
                       "least --max_request_mb.")
    flags.DEFINE_integer("max_queue", 32, "Requests waiting for an inference worker at most "
                         "(then HTTP 503 / gRPC UNAVAILABLE).")
    flags.DEFINE_integer("max_instances", model_server.MAX_INSTANCES, "Instances (the batch) "
                         "per request at most.")
    flags.DEFINE_integer("max_image_pixels", model_server.MAX_IMAGE_PIXELS, "An encoded image "
                         "(PNG / JPEG, e.g. predict_images) may have at most this many pixels, "
                         "read from its header before it is decoded.")
    flags.DEFINE_list("allowed_hosts", None, "Host header values accepted (names, optionally "
                      "with :port; '*': any). Default on a loopback --host: localhost, "
                      "127.0.0.1, ::1; required on any other.")
    flags.DEFINE_string("auth_token_file", None, "A file holding a secret token: REST needs "
                        "'Authorization: Bearer <token>', gRPC 'authorization' metadata of "
                        "the same form. Required when --host is not a loopback address.")


def main(argv: list[str]) -> int:
    if FLAGS.release_memory:  # before TensorFlow loads (it does in the model manager)
        os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")
    cli.setup_logging(FLAGS.verbosity)
    base = FLAGS.model_base_path
    if not os.path.isdir(base):
        raise FileNotFoundError(f"--model_base_path {base} is not a folder")
    if not FLAGS.port and not FLAGS.rest_api_port:
        raise ValueError("--port and --rest_api_port are both 0: nothing to serve")
    access = model_server.Access.for_binding(FLAGS.host, FLAGS.allowed_hosts,
                                             FLAGS.auth_token_file)
    max_bytes = int(FLAGS.max_request_mb * 1024 * 1024)
    timeout_s = max(0.001, FLAGS.rest_api_timeout_in_ms / 1000.0)
    manager = model_server.ModelManager(FLAGS.model_name, base,
                                        FLAGS.file_system_poll_wait_seconds,
                                        FLAGS.max_instances, FLAGS.max_image_pixels)
    manager.start()
    if manager.current is None:
        log.warning("no version of %s under %s yet: waiting for one", FLAGS.model_name, base)
    pool = model_server.InferencePool(FLAGS.rest_api_num_threads, FLAGS.max_queue)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rest = grpc_server = None
    where = []
    try:
        if FLAGS.rest_api_port:
            budget = model_server.ByteBudget(
                max(max_bytes, int(FLAGS.max_inflight_mb * 1024 * 1024)))
            rest = model_server.make_rest_server(
                manager, FLAGS.host, FLAGS.rest_api_port, max_bytes, FLAGS.rest_api_num_threads,
                timeout_s, FLAGS.max_queue, access, pool, budget)
            rest.start()
            where.append(f"REST http://{FLAGS.host}:{rest.port}")
        if FLAGS.port:
            grpc_server, bound = model_server.make_grpc_server(
                manager, FLAGS.host, FLAGS.port, max_bytes, FLAGS.rest_api_num_threads,
                FLAGS.max_queue, access, pool)
            grpc_server.start()
            where.append(f"gRPC {FLAGS.host}:{bound}")
        version = manager.current.version if manager.current else None
        print(f"serving {FLAGS.model_name} (version {version}) on {', '.join(where)}",
              flush=True)
        while not stop.wait(0.5):
            if rest is not None and not rest.thread.is_alive():
                raise OSError("the REST server stopped")
    except KeyboardInterrupt:
        pass
    finally:
        manager.stop()
        if rest is not None:
            rest.stop()
        if grpc_server is not None:
            grpc_server.stop(grace=2).wait()
        pool.shutdown()
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, required=["model_base_path"], program="covid_keras.serve")
