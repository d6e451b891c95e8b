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
* Errors as TF Serving: ``{"error": "..."}`` with 400 (malformed or wrongly shaped request),
  404 (unknown model or version), 413 (body over ``--max_request_mb``); gRPC status codes
  INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED. A bad request never stops the server.
* Binds ``--host`` (127.0.0.1 by default; TF Serving binds every interface), serves
  requests concurrently (a thread per REST connection up to ``--rest_api_num_threads``, a
  gRPC pool of the same size) and logs no request content.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from absl import flags

from covid_keras import cli, files

FLAGS = flags.FLAGS
log = logging.getLogger("covid_keras.serve")
DEFAULT_SIGNATURE = "serving_default"


def define_flags() -> None:
    flags.DEFINE_string("model_name", "default", "Name the model is served under.")
    flags.DEFINE_string("model_base_path", None, "<export_base>/<model_name>: the folder of "
                        "integer version folders.")
    flags.DEFINE_integer("port", 8500, "gRPC port (0: no gRPC).")
    flags.DEFINE_integer("rest_api_port", 8501, "REST port (0: no REST).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0: every interface).")
    flags.DEFINE_integer("file_system_poll_wait_seconds", 1, "Seconds between polls of "
                         "--model_base_path for new versions (0: once at start).")
    flags.DEFINE_integer("rest_api_num_threads", 8, "Requests served at once (REST and "
                         "gRPC each).")
    flags.DEFINE_float("max_request_mb", 64.0, "Largest request body (REST) or message "
                       "(gRPC) accepted, MiB.")


class ServingError(Exception):
    """A request the server refuses: HTTP status + gRPC status code name."""

    def __init__(self, http: int, grpc_code: str, message: str):
        super().__init__(message)
        self.http = http
        self.grpc_code = grpc_code


def bad_request(message: str) -> ServingError:
    return ServingError(400, "INVALID_ARGUMENT", message)


def not_found(message: str) -> ServingError:
    return ServingError(404, "NOT_FOUND", message)


# ------------------------------------------------------------------ models
class Servable:
    """One loaded version: its signatures (callable) and their SignatureDefs (protos)."""

    def __init__(self, name: str, version: int, path: str):
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        self.name, self.version, self.path = name, version, path
        self.loaded = tf.saved_model.load(path)
        sm = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            sm.ParseFromString(f.read())
        self.signature_defs = dict(sm.meta_graphs[0].signature_def)
        self.signatures = dict(self.loaded.signatures)

    def signature(self, name: str):
        name = name or DEFAULT_SIGNATURE
        if name not in self.signatures:
            raise bad_request(f"Serving signature name: \"{name}\" not found in signature "
                              f"def. Known: {sorted(self.signatures)}")
        return name, self.signatures[name]

    def input_specs(self, name: str) -> dict:
        _, fn = self.signature(name)
        return dict(fn.structured_input_signature[1])

    def run(self, signature_name: str, inputs: dict, output_filter=()) -> dict:
        """inputs: name -> NumPy array; returns name -> NumPy array."""
        import tensorflow as tf

        name, fn = self.signature(signature_name)
        specs = self.input_specs(name)
        missing = sorted(set(specs) - set(inputs))
        extra = sorted(set(inputs) - set(specs))
        if missing or extra:
            raise bad_request(f"signature {name!r} takes inputs {sorted(specs)}; request "
                              f"has {sorted(inputs)} (missing {missing}, unknown {extra})")
        tensors = {}
        for key, spec in specs.items():
            value = inputs[key]
            try:
                if spec.dtype == tf.string:
                    arr = np.asarray(value, dtype=object)
                    if arr.size and not all(isinstance(v, bytes) for v in arr.flat):
                        raise TypeError("string input holds non-bytes values")
                    t = tf.constant(arr, tf.string) if arr.size else tf.zeros(arr.shape,
                                                                              tf.string)
                else:
                    arr = np.asarray(value)
                    if arr.dtype == object or arr.dtype.kind in "SUV":
                        raise TypeError(f"{arr.dtype} values")
                    t = tf.constant(arr.astype(spec.dtype.as_numpy_dtype))
            except (TypeError, ValueError, OverflowError) as exc:
                raise bad_request(f"input {key!r}: expected {spec.dtype.name} "
                                  f"{spec.shape}: {exc}") from None
            if not spec.shape.is_compatible_with(t.shape):
                raise bad_request(f"input {key!r}: expected shape {spec.shape.as_list()} "
                                  f"(None = any), received {t.shape.as_list()}")
            tensors[key] = t
        try:
            out = fn(**tensors)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            raise bad_request(clean_tf_error(getattr(exc, "message", None) or str(exc))
                              ) from None
        out = {k: np.asarray(v.numpy()) for k, v in out.items()}
        if output_filter:
            unknown = sorted(set(output_filter) - set(out))
            if unknown:
                raise bad_request(f"output_filter names unknown outputs {unknown}; known: "
                                  f"{sorted(out)}")
            out = {k: out[k] for k in output_filter}
        return out


def clean_tf_error(message: str) -> str:
    """A TensorFlow error without its graph noise (node names, stack notes, op names)."""
    msg = " ".join(message.split())
    msg = re.sub(r"Graph execution error:|Detected at node \S+ defined at \(most recent "
                 r"call last\):|<stack traces unavailable>|\[\[\{\{node [^}]*\}\}\]\]|"
                 r"\[Op:[^\]]*\]|assertion failed:", " ", msg)
    msg = re.sub(r"\[(image_bytes: [^\]]*|predict_study: [^\]]*)\]", r"\1", msg)
    return " ".join(msg.split())[:2000] or "invalid request"


class ModelManager:
    """The versions under ``base_path``; serves the highest, loads new ones as they appear."""

    def __init__(self, name: str, base_path: str, poll_s: float):
        self.name, self.base_path, self.poll_s = name, base_path, poll_s
        self.current: Servable | None = None
        self.states: dict[int, str] = {}
        self.errors: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> None:
        from covid_keras.export import versions

        found = versions(self.base_path)
        if not found:
            return
        latest = found[-1]
        if self.current is not None and self.current.version == latest:
            return
        if latest in self.errors:
            return  # a version that failed to load is not retried (TF Serving's behaviour)
        self.states[latest] = "LOADING"
        try:
            servable = Servable(self.name, latest, os.path.join(self.base_path, str(latest)))
        except Exception as exc:  # noqa: BLE001 - a broken version must not stop serving
            self.errors[latest] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            self.states[latest] = "END"
            log.error("%s version %d failed to load: %s", self.name, latest,
                      self.errors[latest])
            return
        with self._lock:
            old, self.current = self.current, servable
            self.states[latest] = "AVAILABLE"
            if old is not None:
                self.states[old.version] = "END"
        log.info("serving %s version %d", self.name, latest)

    def start(self) -> None:
        self.poll()
        if self.poll_s > 0:
            self._thread = threading.Thread(target=self._loop, name="version-poll",
                                            daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - keep polling
                log.error("polling %s: %s", self.base_path, exc)

    def stop(self) -> None:
        self._stop.set()

    def get(self, name: str, version: int | None = None) -> Servable:
        if name != self.name:
            raise not_found(f"Servable not found for request: Latest({name})")
        with self._lock:
            current = self.current
        if current is None:
            raise not_found(f"Servable not found for request: Latest({name}) (no version "
                            "loaded yet)")
        if version is not None and version != current.version:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        return current

    def status(self, name: str, version: int | None = None) -> list[dict]:
        """TF Serving's model_version_status list."""
        if name != self.name:
            raise not_found(f"Could not find any versions of model {name}")
        states = dict(self.states)
        if version is not None:
            if version not in states:
                raise not_found(f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        if not states:
            raise not_found(f"Could not find any versions of model {name}")
        out = []
        for v in sorted(states, reverse=True):
            err = self.errors.get(v, "")
            out.append({"version": str(v), "state": states[v],
                        "status": {"error_code": "UNKNOWN" if err else "OK",
                                   "error_message": err}})
        return out


def signature_def_map(servable: Servable):
    from tensorflow_serving.apis import get_model_metadata_pb2

    sdm = get_model_metadata_pb2.SignatureDefMap()
    for key, value in servable.signature_defs.items():
        sdm.signature_def[key].CopyFrom(value)
    return sdm


# ------------------------------------------------------------------ REST JSON <-> arrays
def _decode_value(v):
    """JSON value -> nested lists with bytes for {"b64": ...} and for text."""
    if isinstance(v, dict):
        if set(v) == {"b64"} and isinstance(v["b64"], str):
            try:
                return base64.b64decode(v["b64"], validate=True)
            except ValueError:
                raise bad_request("invalid base64 in a {\"b64\": ...} value") from None
        raise bad_request("a tensor value is an object that is not {\"b64\": ...}")
    if isinstance(v, list):
        return [_decode_value(x) for x in v]
    if isinstance(v, str):
        return v.encode("utf-8")
    if v is None:
        raise bad_request("null is not a tensor value")
    return v


def _array(value, key: str) -> np.ndarray:
    if isinstance(value, list):  # fast path: a plain numeric tensor (no walk over values)
        try:
            fast = np.asarray(value)
        except ValueError:
            fast = None
        if fast is not None and fast.dtype.kind in "iuf":
            return fast
    value = _decode_value(value)
    try:
        arr = np.array(value)
    except ValueError:
        raise bad_request(f"input {key!r} is a ragged list (every row must have the same "
                          "shape)") from None
    if arr.dtype == object or arr.dtype.kind == "S":
        flat = list(np.asarray(value, dtype=object).flat) if arr.dtype == object else None
        if flat is not None and not all(isinstance(x, bytes) for x in flat):
            raise bad_request(f"input {key!r} is ragged or mixes text and numbers")
        arr = np.asarray(value, dtype=object)
    if arr.dtype == bool:
        raise bad_request(f"input {key!r}: booleans are not accepted")
    return arr


def parse_predict_body(body: dict, input_names: list[str]) -> tuple[dict, bool]:
    """A TF Serving REST predict body -> (inputs, row_format). Row: ``{"instances": [...]}``
    (one value per instance, or an object per instance when there are several inputs);
    columnar: ``{"inputs": value | {name: value}}``."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows == has_cols:
        raise bad_request("the request must have exactly one of \"instances\" (row format) "
                          "or \"inputs\" (columnar format)")
    unknown = set(body) - {"instances", "inputs", "signature_name"}
    if unknown:
        raise bad_request(f"unknown request keys {sorted(unknown)}")
    single = len(input_names) == 1
    if has_rows:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise bad_request("\"instances\" must be a non-empty list")
        named = all(isinstance(r, dict) and not (set(r) == {"b64"}) for r in rows)
        if named:
            keys = set(rows[0])
            if any(set(r) != keys for r in rows):
                raise bad_request("every instance must name the same inputs")
            return {k: _array([r[k] for r in rows], k) for k in keys}, True
        if not single:
            raise bad_request(f"the signature takes several inputs {input_names}: each "
                              "instance must be an object naming them")
        return {input_names[0]: _array(rows, input_names[0])}, True
    cols = body["inputs"]
    if isinstance(cols, dict) and not (set(cols) == {"b64"}):
        return {k: _array(v, k) for k, v in cols.items()}, False
    if not single:
        raise bad_request(f"the signature takes several inputs {input_names}: \"inputs\" "
                          "must be an object naming them")
    return {input_names[0]: _array(cols, input_names[0])}, False


def _jsonable(name: str, arr: np.ndarray):
    if arr.dtype == object or arr.dtype.kind == "S":
        def enc(v):
            if isinstance(v, list):
                return [enc(x) for x in v]
            if name.endswith("_bytes"):
                return {"b64": base64.b64encode(v).decode("ascii")}
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(v).decode("ascii")}
        return enc(arr.tolist())
    return files.strict(arr)


def format_predict_response(outputs: dict, row_format: bool) -> dict:
    """Outputs -> ``{"predictions": [...]}`` (row) or ``{"outputs": ...}`` (columnar), a
    single output unnamed, as TF Serving."""
    if not row_format:
        if len(outputs) == 1:
            return {"outputs": _jsonable(*next(iter(outputs.items())))}
        return {"outputs": {k: _jsonable(k, v) for k, v in outputs.items()}}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in outputs.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise bad_request(f"the outputs have different batch sizes {sizes}: the row format "
                          "(\"instances\") cannot return them; use the columnar \"inputs\" "
                          "format")
    values = {k: _jsonable(k, v) for k, v in outputs.items()}
    n = next(iter(sizes.values()))
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    return {"predictions": [{k: values[k][i] for k in values} for i in range(n)]}


def metadata_json(servable: Servable) -> dict:
    from google.protobuf import json_format

    return {"model_spec": {"name": servable.name, "signature_name": "",
                           "version": str(servable.version)},
            "metadata": {"signature_def": json_format.MessageToDict(
                signature_def_map(servable), preserving_proto_field_name=True)}}


# ------------------------------------------------------------------ REST
_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]+))?"
                   r"(?::(?P<verb>[a-z]+)|/(?P<meta>metadata))?/?$")


def make_rest_server(manager: ModelManager, host: str, port: int, max_bytes: int,
                     threads: int) -> ThreadingHTTPServer:
    slots = threading.BoundedSemaphore(max(1, threads))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "covid_keras.serve"

        def log_message(self, fmt, *args):  # method, path and status only, at debug
            log.debug("%s %s", self.command, self.path.split("?")[0][:200])

        def _send(self, status: int, obj: dict) -> None:
            body = files.dumps(obj, indent=None).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self):
            m = _PATH.match(self.path.split("?")[0])
            if not m:
                raise not_found(f"Malformed request: {self.command} "
                                f"{self.path.split('?')[0][:200]}")
            version = int(m["version"]) if m["version"] else None
            return m["name"], version, m["verb"], m["meta"]

        def _guard(self, fn) -> None:
            try:
                with slots:
                    fn()
            except ServingError as err:
                self._send(err.http, {"error": str(err)})
            except Exception as exc:  # noqa: BLE001 - one bad request never stops serving
                log.error("internal error: %s", type(exc).__name__)
                self._send(500, {"error": f"internal error ({type(exc).__name__})"})

        def do_GET(self):
            def go():
                name, version, verb, meta = self._route()
                if verb:
                    raise ServingError(405, "UNIMPLEMENTED", f"GET cannot :{verb}")
                if meta:
                    self._send(200, metadata_json(manager.get(name, version)))
                else:
                    self._send(200, {"model_version_status": manager.status(name, version)})
            self._guard(go)

        def do_POST(self):
            def go():
                name, version, verb, meta = self._route()
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self.close_connection = True
                    raise ServingError(411, "INVALID_ARGUMENT", "Content-Length required")
                if int(length) > max_bytes:
                    self.close_connection = True
                    raise ServingError(413, "RESOURCE_EXHAUSTED",
                                       f"request body of {int(length)} bytes exceeds "
                                       f"--max_request_mb ({max_bytes} bytes)")
                raw = self.rfile.read(int(length))
                if verb != "predict" or meta:
                    raise not_found(f"Malformed request: POST {self.path[:200]} (only "
                                    ":predict is served)")
                servable = manager.get(name, version)
                try:
                    body = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise bad_request(f"JSON Parse error: {exc}") from None
                sig = body.get("signature_name", "") if isinstance(body, dict) else ""
                if not isinstance(sig, str):
                    raise bad_request("signature_name must be a string")
                inputs, rows = parse_predict_body(body, sorted(servable.input_specs(sig)))
                self._send(200, format_predict_response(servable.run(sig, inputs), rows))
            self._guard(go)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


# ------------------------------------------------------------------ gRPC
def make_grpc_server(manager: ModelManager, host: str, port: int, max_bytes: int,
                     threads: int):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    def version_of(spec):
        if spec.HasField("version"):
            return int(spec.version.value)
        if spec.version_label:
            raise not_found(f"version labels are not served (label {spec.version_label!r})")
        return None

    def guarded(fn):
        def call(self, request, context):
            try:
                return fn(self, request, context)
            except ServingError as err:
                context.abort(getattr(grpc.StatusCode, err.grpc_code), str(err))
            except Exception as exc:  # noqa: BLE001 - one bad request never stops serving
                if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "_AbortError":
                    raise
                log.error("internal error: %s", type(exc).__name__)
                context.abort(grpc.StatusCode.INTERNAL,
                              f"internal error ({type(exc).__name__})")
        return call

    class Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
        @guarded
        def Predict(self, request, context):
            servable = manager.get(request.model_spec.name, version_of(request.model_spec))
            try:
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            except (TypeError, ValueError) as exc:
                raise bad_request(f"malformed TensorProto: {exc}") from None
            sig = request.model_spec.signature_name or DEFAULT_SIGNATURE
            out = servable.run(sig, inputs, list(request.output_filter))
            resp = predict_pb2.PredictResponse()
            resp.model_spec.name = servable.name
            resp.model_spec.version.value = servable.version
            resp.model_spec.signature_name = sig
            for k, v in out.items():
                resp.outputs[k].CopyFrom(tf.make_tensor_proto(v))
            return resp

        @guarded
        def GetModelMetadata(self, request, context):
            servable = manager.get(request.model_spec.name, version_of(request.model_spec))
            fields = list(request.metadata_field)
            if fields != ["signature_def"]:
                raise bad_request(f"metadata_field must be [\"signature_def\"]; received "
                                  f"{fields}")
            resp = get_model_metadata_pb2.GetModelMetadataResponse()
            resp.model_spec.name = servable.name
            resp.model_spec.version.value = servable.version
            resp.metadata["signature_def"].Pack(signature_def_map(servable))
            return resp

    class Models(model_service_pb2_grpc.ModelServiceServicer):
        @guarded
        def GetModelStatus(self, request, context):
            from tensorflow_serving.apis import status_pb2  # noqa: F401

            states = manager.status(request.model_spec.name, version_of(request.model_spec))
            resp = get_model_status_pb2.GetModelStatusResponse()
            for s in states:
                mvs = resp.model_version_status.add()
                mvs.version = int(s["version"])
                mvs.state = get_model_status_pb2.ModelVersionStatus.State.Value(s["state"])
                if s["status"]["error_message"]:
                    mvs.status.error_code = 2  # UNKNOWN
                    mvs.status.error_message = s["status"]["error_message"]
            return resp

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(1, threads)),
        options=[("grpc.max_receive_message_length", max_bytes),
                 ("grpc.max_send_message_length", max(max_bytes, 64 << 20))])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Prediction(), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(Models(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    return server, bound


# ------------------------------------------------------------------ main
def main(argv: list[str]) -> int:
    cli.setup_logging(FLAGS.verbosity)
    base = FLAGS.model_base_path
    if not os.path.isdir(base):
        raise FileNotFoundError(f"--model_base_path {base} is not a folder")
    if not FLAGS.port and not FLAGS.rest_api_port:
        raise ValueError("--port and --rest_api_port are both 0: nothing to serve")
    max_bytes = int(FLAGS.max_request_mb * 1024 * 1024)
    manager = ModelManager(FLAGS.model_name, base, FLAGS.file_system_poll_wait_seconds)
    manager.start()
    if manager.current is None:
        log.warning("no version of %s under %s yet: waiting for one", FLAGS.model_name, base)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rest = grpc_server = None
    where = []
    if FLAGS.rest_api_port:
        rest = make_rest_server(manager, FLAGS.host, FLAGS.rest_api_port, max_bytes,
                                FLAGS.rest_api_num_threads)
        threading.Thread(target=rest.serve_forever, name="rest", daemon=True).start()
        where.append(f"REST http://{FLAGS.host}:{rest.server_address[1]}")
    if FLAGS.port:
        grpc_server, bound = make_grpc_server(manager, FLAGS.host, FLAGS.port, max_bytes,
                                              FLAGS.rest_api_num_threads)
        grpc_server.start()
        where.append(f"gRPC {FLAGS.host}:{bound}")
    version = manager.current.version if manager.current else None
    print(f"serving {FLAGS.model_name} (version {version}) on {', '.join(where)}",
          flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        manager.stop()
        if rest is not None:
            rest.shutdown()
        if grpc_server is not None:
            grpc_server.stop(grace=2).wait()
        time.sleep(0)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, required=["model_base_path"], program="covid_keras.serve")
