"""The model server of ``python -m covid_keras.serve`` (whose docstring describes it): TF
Serving's REST (Starlette + uvicorn) and gRPC APIs over the versions of an export, the
JSON fast path (:func:`loads_predict`), access control (:class:`Access`), the inference
pool and the byte budget.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import threading
from concurrent import futures

import numpy as np

from covid_keras.core import files

log = logging.getLogger("covid_keras.serve")
DEFAULT_SIGNATURE = "serving_default"
MAX_INSTANCES = 1024
MAX_IMAGE_PIXELS = 4096 * 4096  # serving_signatures.MAX_IMAGE_PIXELS (no TF import here)
VERSION_HEADER = "X-Model-Version"
MAX_INFLIGHT_BYTES = 256 << 20  # --max_inflight_mb's default
MAX_DEPTH = 32  # a tensor value nested deeper in JSON is refused (400), not recursed into


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


def busy(message: str) -> ServingError:
    return ServingError(503, "UNAVAILABLE", message)


class ClientGone(Exception):
    """The client closed its connection: nothing is computed or answered for it."""


# ------------------------------------------------------------------ access control
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, str | None]:
    """A Host header (or an Origin's netloc) -> (lower-case name, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        name, port = value.split(":")
        return name, port
    return value, None


def read_token(path: str) -> str:
    """The secret in ``path`` (whitespace stripped); at least 16 characters."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ValueError(f"--auth_token_file {path}: the token must be one word of at least "
                         "16 characters")
    return token


class Access:
    """Who may talk to a server: the Host header against ``allowed_hosts`` (None: any), the
    bearer ``token`` (None: none needed), and a browser's ``Origin`` against the Host (a
    cross-site POST; clients that are not browsers send no Origin)."""

    def __init__(self, allowed_hosts=None, token: str | None = None):
        hosts = [h.strip().lower() for h in (allowed_hosts or []) if h.strip()]
        self.allowed = None if (allowed_hosts is None or "*" in hosts) else [
            split_host(h) for h in hosts]
        self.token = token

    @classmethod
    def for_binding(cls, host: str, allowed_hosts, token_file: str | None) -> "Access":
        """The rules for a server on ``host``: on loopback the loopback names and no token
        by default; anywhere else both flags are required."""
        if not is_loopback(host) and (not allowed_hosts or not token_file):
            raise ValueError(f"--host {host} is not a loopback address: give --allowed_hosts "
                             "and --auth_token_file (and put TLS in front, see README)")
        if allowed_hosts is None:
            allowed_hosts = list(LOOPBACK_NAMES)
        return cls(allowed_hosts, read_token(token_file) if token_file else None)

    def host_ok(self, host_header: str | None) -> bool:
        if self.allowed is None:
            return True
        if not host_header:
            return False
        name, port = split_host(host_header)
        return any(name == n and (p is None or p == port) for n, p in self.allowed)

    def token_ok(self, authorization: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, value = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.token.encode())

    @staticmethod
    def same_origin(origin: str | None, host_header: str | None,
                    fetch_site: str | None = None) -> bool:
        """A browser's request is same-origin: its Origin (when sent) names the Host, and
        Sec-Fetch-Site (when sent) is not cross-site."""
        if fetch_site and fetch_site.lower() not in ("same-origin", "none"):
            return False
        if origin is None:
            return True
        netloc = origin.split("://", 1)[-1].rstrip("/")
        return bool(host_header) and split_host(netloc) == split_host(host_header)

    def check(self, headers, post: bool) -> None:
        """Raises ServingError (403 / 401) for a request these rules refuse."""
        if not self.host_ok(headers.get("host")):
            raise ServingError(403, "PERMISSION_DENIED", "Host not allowed (--allowed_hosts)")
        if post and not self.same_origin(headers.get("origin"), headers.get("host"),
                                         headers.get("sec-fetch-site")):
            raise ServingError(403, "PERMISSION_DENIED", "cross-site request refused")
        if not self.token_ok(headers.get("authorization")):
            raise ServingError(401, "UNAUTHENTICATED", "a valid bearer token is required "
                                                       "(--auth_token_file)")


# ------------------------------------------------------------------ the inference pool
def release_memory() -> None:
    """Gives freed heap pages back to the system (glibc keeps them after a large request,
    so RSS would stay at its peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class InferencePool:
    """``workers`` threads and at most ``queue`` requests waiting for them; a request over
    that is refused (503 / UNAVAILABLE) at once instead of waiting without bound."""

    def __init__(self, workers: int, queue: int):
        self.capacity = max(1, workers) + max(0, queue)
        self._executor = futures.ThreadPoolExecutor(max(1, workers),
                                                    thread_name_prefix="inference")
        self._lock = threading.Lock()
        self.pending = 0

    def submit(self, fn, *args, alive=None) -> futures.Future:
        """``fn(*args)`` in a worker; ``alive()`` (when given) is asked when its turn comes:
        False (the client has gone) and nothing is computed (ClientGone)."""
        with self._lock:
            if self.pending >= self.capacity:
                raise busy(f"{self.pending} requests are being served or waiting: try again "
                           "later")
            self.pending += 1

        def job():
            if alive is not None and not alive():
                raise ClientGone()
            return fn(*args)

        fut = self._executor.submit(job)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _fut) -> None:
        with self._lock:
            self.pending -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class ByteBudget:
    """The bytes of REST request bodies in flight (being read, waiting or computed), at most
    ``limit`` together: a body's Content-Length is reserved before it is read, so many
    clients sending large bodies at once are refused (503) instead of buffering them all."""

    def __init__(self, limit: int):
        self.limit = max(0, int(limit))
        self._lock = threading.Lock()
        self.used = 0

    def reserve(self, n: int) -> None:
        """Takes ``n`` bytes, or raises ServingError 503 when they do not fit."""
        with self._lock:
            if self.used + n > self.limit:
                raise busy(f"{self.used} bytes of request bodies are in flight (at most "
                           f"{self.limit}, --max_inflight_mb): try again later")
            self.used += n

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n


# ------------------------------------------------------------------ models
class Servable:
    """One loaded version: its signatures (callable) and their SignatureDefs (protos)."""

    max_instances = MAX_INSTANCES
    max_image_pixels = MAX_IMAGE_PIXELS

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
            check_instances(key, value, self.max_instances)
            try:
                if spec.dtype == tf.string:
                    arr = np.asarray(value, dtype=object)
                    if arr.size and not all(isinstance(v, bytes) for v in arr.flat):
                        raise TypeError("string input holds non-bytes values")
                    check_images(key, arr, self.max_image_pixels)
                    t = tf.constant(arr, tf.string) if arr.size else tf.zeros(arr.shape,
                                                                              tf.string)
                else:
                    arr = np.asarray(value)
                    if arr.dtype == object or arr.dtype.kind in "SUV":
                        raise TypeError(f"{arr.dtype} values")
                    arr = arr.astype(spec.dtype.as_numpy_dtype, copy=False)
                    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                        raise bad_request(f"input {key!r}: NaN and infinite values are not "
                                          "accepted")
                    t = tf.constant(arr)
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


def check_instances(key: str, value, limit: int | None) -> None:
    n = len(value) if isinstance(value, list) else (
        int(np.shape(value)[0]) if np.ndim(value) else 0)
    if limit is not None and n > limit:
        raise bad_request(f"input {key!r} holds {n} instances; at most {limit} per request "
                          "(--max_instances)")


def check_images(key: str, arr: np.ndarray, max_pixels: int | None) -> None:
    """Encoded PNG / JPEG values: their size from the header, refused over ``max_pixels``
    before anything decodes them; a PNG or JPEG whose header cannot be read is refused."""
    if not max_pixels or not key.endswith("_bytes"):
        return
    from covid_keras.serving.serving_signatures import image_header_size

    for i, v in enumerate(arr.flat):
        try:
            size = image_header_size(v)
        except ValueError as exc:
            raise bad_request(f"input {key!r}[{i}]: {exc}") from None
        if size is not None and size[0] * size[1] > max_pixels:
            raise bad_request(f"input {key!r}[{i}]: an image of {size[1]} x {size[0]} "
                              f"pixels; at most {max_pixels} pixels (--max_image_pixels)")


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

    def __init__(self, name: str, base_path: str, poll_s: float,
                 max_instances: int = MAX_INSTANCES, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.name, self.base_path, self.poll_s = name, base_path, poll_s
        self.max_instances, self.max_image_pixels = max_instances, max_image_pixels
        self.current: Servable | None = None
        self.states: dict[int, str] = {}
        self.errors: dict[int, str] = {}
        self.failed: dict[int, tuple] = {}  # version -> its folder's fingerprint at failure
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> None:
        """TF Serving's "latest" policy: serve the highest version that loads. A version
        that fails to load is tried again at a later poll once its folder has changed (its
        files' names, sizes or times: it may still be being copied), not at every poll;
        when the served version's folder is gone, the highest remaining one is served
        (none left: nothing is served, 404)."""
        from covid_keras.serving.exporter import versions

        found = versions(self.base_path)
        for v in list(self.failed):
            if v not in found:
                del self.failed[v]
        with self._lock:
            current = self.current
        for v in sorted(found, reverse=True):
            if current is not None and v == current.version:
                return
            if v in self.failed and self.failed[v] == self.fingerprint(v):
                continue  # failed, and nothing has changed since: not loaded again
            if self._load(v):
                return
        if current is not None and current.version not in found:
            with self._lock:
                if self.current is current:
                    self.current = None
                self.states[current.version] = "END"
            log.warning("%s version %d was removed: no version left to serve", self.name,
                        current.version)

    def fingerprint(self, version: int) -> tuple:
        """The version folder's files: (relative path, size, mtime in ns), sorted."""
        root = os.path.join(self.base_path, str(version))
        out = []
        for folder, dirs, names in os.walk(root):
            for name in names + dirs:
                path = os.path.join(folder, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                out.append((os.path.relpath(path, root), st.st_size if name in names else -1,
                            st.st_mtime_ns))
        return tuple(sorted(out))

    def _load(self, version: int) -> bool:
        self.states[version] = "LOADING"
        before = self.fingerprint(version)
        try:
            servable = Servable(self.name, version,
                                os.path.join(self.base_path, str(version)))
        except Exception as exc:  # noqa: BLE001 - a broken version must not stop serving
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            if self.errors.get(version) != error:  # logged once, retried when it changes
                log.error("%s version %d failed to load (retried when its files change): %s",
                          self.name, version, error)
            self.errors[version] = error
            self.failed[version] = before
            self.states[version] = "END"
            return False
        self.failed.pop(version, None)
        servable.max_instances = self.max_instances
        servable.max_image_pixels = self.max_image_pixels
        with self._lock:
            old, self.current = self.current, servable
            self.states[version] = "AVAILABLE"
            self.errors.pop(version, None)
            if old is not None and old.version != version:
                self.states[old.version] = "END"
        log.info("serving %s version %d", self.name, version)
        return True

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
def _too_deep() -> ServingError:
    return bad_request(f"JSON Parse error: a tensor value nested more than {MAX_DEPTH} levels "
                       "deep")


def _decode_value(v, depth: int = 1):
    """JSON value -> nested lists with bytes for {"b64": ...} and for text; a value nested
    more than MAX_DEPTH levels is refused before it is walked further (orjson accepts 1024
    levels, more than this recursion could take)."""
    if depth > MAX_DEPTH and isinstance(v, (list, dict)):
        raise _too_deep()
    if isinstance(v, dict):
        if set(v) == {"b64"} and isinstance(v["b64"], str):
            try:
                return base64.b64decode(v["b64"], validate=True)
            except ValueError:
                raise bad_request("invalid base64 in a {\"b64\": ...} value") from None
        raise bad_request("a tensor value is an object that is not {\"b64\": ...}")
    if isinstance(v, list):
        return [_decode_value(x, depth + 1) for x in v]
    if isinstance(v, str):
        return v.encode("utf-8")
    if v is None:
        raise bad_request("null is not a tensor value")
    return v


def _array(value, key: str) -> np.ndarray:
    if isinstance(value, np.ndarray):  # converted from the bytes by loads_predict
        return value
    if isinstance(value, list):  # fast path: a plain numeric tensor (no walk over values)
        try:
            fast = np.asarray(value)
        except ValueError:
            fast = None
        if fast is not None and fast.dtype.kind in "iuf":
            if fast.ndim > MAX_DEPTH:
                raise _too_deep()
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


def _no_constant(name: str):
    raise ValueError(f"{name} is not accepted (NaN and infinities are refused)")


def loads(raw: bytes):
    """JSON request bytes -> Python values (orjson when installed: a C parser, several times
    faster than json); NaN, Infinity, numbers that overflow to infinity and nesting past
    orjson's 1024 levels are refused, as malformed JSON is (400)."""
    try:
        if _orjson is not None:
            try:
                return _orjson.loads(raw)
            except _orjson.JSONDecodeError as exc:
                raise bad_request(f"JSON Parse error: {exc}") from None
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise bad_request("JSON Parse error: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"JSON Parse error: {exc}") from None


def dumps(obj) -> bytes:
    if _orjson is not None:
        return _orjson.dumps(files.strict(obj)) + b"\n"
    return files.dumps(obj, indent=None).encode("utf-8")


try:
    import orjson as _orjson
except ImportError:  # the [serving] extra installs it; json is the fallback
    _orjson = None


# ------------------------------------------------------------------ numeric tensors from bytes
FAST_MIN_BYTES = 1 << 16  # a numeric JSON array at least this long is converted from its bytes
_FAST_MAX_DIGITS = 15  # every such integer (and digits / 10**k) is exact in float64
_FAST_CHUNK = 1 << 20  # tokens converted at once (bounds the temporary arrays)


def _byte_table(chars: bytes) -> np.ndarray:
    table = np.zeros(256, bool)
    table[np.frombuffer(chars, np.uint8)] = True
    return table


_ARRAY_TEXT = _byte_table(b"0123456789-.[], \t\n\r")  # what a plain numeric array is made of
_P10_INT = 10 ** np.arange(_FAST_MAX_DIGITS + 1, dtype=np.int64)
_P10_FLOAT = 10.0 ** np.arange(_FAST_MAX_DIGITS + 2)


def _skeleton_shape(skel: bytes) -> tuple[int, ...] | None:
    """The shape of a regular nested array from its skeleton (each number written ``n``):
    its depth from the leading brackets, each level's length from where its first element
    closes. None when it is not one (the caller compares with :func:`_skeleton` anyway)."""
    k = len(skel) - len(skel.lstrip(b"["))
    if not 0 < k <= MAX_DEPTH or skel[k:k + 1] != b"n":
        return None
    close = skel.find(b"]")
    length = close - (k - 1) + 1  # [n,n,...,n]
    if length < 3 or length % 2 == 0:
        return None
    dims = [(length - 1) // 2]
    for level in range(k - 1, 0, -1):  # outwards
        run = skel.find(b"]" * (k - level + 1))
        if run < 0:
            return None
        group = run + (k - level) - (level - 1) + 1  # this level's first group, brackets in
        if (group - 1) % (length + 1):
            return None
        dims.append((group - 1) // (length + 1))
        length = group
    return tuple(reversed(dims))


def _skeleton(shape: tuple[int, ...]) -> bytes:
    group = b"[" + (b"n," * shape[-1])[:-1] + b"]"
    for d in reversed(shape[:-1]):
        group = b"[" + ((group + b",") * d)[:-1] + b"]"
    return group


def _numbers(c: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """:func:`_chunk_numbers` over _FAST_CHUNK tokens at a time (bounds the temporary
    arrays), as one array (float64 when any chunk is)."""
    parts = []
    for i in range(0, len(starts), _FAST_CHUNK):
        s, e = starts[i:i + _FAST_CHUNK], ends[i:i + _FAST_CHUNK]
        lo, hi = int(s[0]) - 1, int(e[-1]) + 1  # a bracket or comma on either side
        part = _chunk_numbers(c[lo:hi], s - lo, e - lo)
        if part is None:
            return None
        parts.append(part)
    if any(p.dtype.kind == "f" for p in parts):
        parts = [p.astype(np.float64, copy=False) for p in parts]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _chunk_numbers(c: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """The values of the number tokens ``c[starts[i]:ends[i]]`` (JSON's ``-?(0|[1-9]
    [0-9]*)(.[0-9]+)?``, at most 15 digits; every other byte of a token is a digit, a
    minus or a dot): int64 when none has a fraction, else float64, each exactly what a JSON
    parser and NumPy make of it (digits / 10**k is correctly rounded: both are exact in
    float64). The dots are taken out first (each token's fraction length kept), then the
    digits are summed column by column from the right, over all tokens at once. None when
    a token is not such a number."""
    neg = c[starts] == 45
    if np.count_nonzero(c == 45) != np.count_nonzero(neg):
        return None  # a minus that does not lead its number
    first = starts + neg  # the first digit
    frac = None
    dots = np.flatnonzero(c == 46)
    if len(dots):
        before = np.cumsum(c == 46, dtype=np.int64)  # dots up to and including each byte
        inside = before[ends - 1] - before[starts - 1]
        if (inside > 1).any():
            return None
        dotted = inside == 1
        where = dots[before[ends - 1][dotted] - 1]  # the token's dot
        if (where <= first[dotted]).any() or (where >= ends[dotted] - 1).any():
            return None  # no digit before or after it
        frac = np.zeros(len(starts), np.int64)
        frac[dotted] = ends[dotted] - 1 - where
        c = c[c != 46]  # the positions move left by the dots before them
        shift = before[starts - 1]
        starts, ends, first = starts - shift, ends - shift - inside, first - shift
        del before, inside, where, shift
    ndigits = ends - first
    int_len = ndigits if frac is None else ndigits - frac
    if (ndigits < 1).any() or (ndigits > _FAST_MAX_DIGITS).any() or (
            (c[np.minimum(first, len(c) - 1)] == 48) & (int_len > 1)).any():
        return None  # no digit, too many, or a leading zero
    fewest, most = int(ndigits.min()), int(ndigits.max())
    mant = np.zeros(len(starts), np.int64)
    for j in range(most):
        digit = c[ends - 1 - j].astype(np.int64) - 48
        if j >= fewest:
            digit[ndigits <= j] = 0
        mant += digit * int(_P10_INT[j])
    whole = np.where(neg, -mant, mant)
    if frac is None:
        return whole
    value = mant / _P10_FLOAT[frac]
    return np.where(frac > 0, np.where(neg, -value, value), whole.astype(np.float64))


def numeric_array(text: bytes) -> np.ndarray | None:
    """A JSON array of numbers, regular (every row the same length), non-empty and at most
    MAX_DEPTH deep -> the NumPy array ``np.asarray(json.loads(text))`` is, without a Python
    object per value. None when ``text`` is anything else (the caller parses it as JSON).
    ``text`` holds only the bytes of _ARRAY_TEXT (digits, ``-.,[]`` and JSON's spaces), as
    :func:`loads_predict` finds it."""
    c = np.frombuffer(text, np.uint8)
    runs = None
    if any(w in text for w in (b" ", b"\t", b"\n", b"\r")):
        num = (c - np.uint8(45)) <= 12
        runs = int(np.count_nonzero(num[1:] & ~num[:-1]))  # numbers, before the spaces go
        c = c[c > 32]  # JSON's spaces are the only bytes <= 32 here
    num = (c - np.uint8(45)) <= 12  # - . 0-9 (and /, which the caller's bytes never hold)
    if num[0] or num[-1]:
        return None
    edge = np.flatnonzero(num[1:] != num[:-1]) + 1
    starts, ends = edge[0::2], edge[1::2]  # the text starts and ends outside a number
    if not len(starts) or (runs is not None and runs != len(starts)):
        return None  # no number, or a space inside one (two numbers became one)
    mark = c.copy()
    mark[starts] = ord("n")
    kept = ~num
    kept[starts] = True
    skel = mark[kept].tobytes()
    del mark, kept, num
    shape = _skeleton_shape(skel)
    if shape is None or int(np.prod(shape)) != len(starts) or skel != _skeleton(shape):
        return None
    del skel
    values = _numbers(c, starts, ends)
    return None if values is None else values.reshape(shape)


def loads_predict(raw: bytes):
    """:func:`loads` for a predict body, with each long plain numeric array (a study's
    slices: millions of numbers) converted straight from the bytes by :func:`numeric_array`
    instead of becoming a Python object per value. The rest of the body (with a marker
    where each array was) is parsed by :func:`loads`; an array is kept only where a tensor
    may stand (``inputs``, ``inputs.<name>``, ``instances``). Anything else (a marker
    elsewhere, a number this path does not take, a parse error) is parsed by :func:`loads`
    from the original bytes, so answers and errors are the same as without this path."""
    if len(raw) < FAST_MIN_BYTES:
        return loads(raw)
    b = np.frombuffer(raw, np.uint8)
    text = _ARRAY_TEXT[b]
    edge = np.flatnonzero(text[1:] != text[:-1]) + 1
    run_starts = edge[text[edge]]
    run_ends = edge[~text[edge]]
    if text[0]:
        run_starts = np.concatenate([[0], run_starts])
    if text[-1]:
        run_ends = np.concatenate([run_ends, [len(raw)]])
    del b, text, edge
    spans = []
    for s, e in zip(run_starts.tolist(), run_ends.tolist()):
        if e - s < FAST_MIN_BYTES:
            continue
        first, last = raw.find(b"[", s, e), raw.rfind(b"]", s, e)
        if first < 0 or last < first or raw[s:first].strip(b" \t\n\r"):
            continue
        spans.append((first, last + 1))
    if not spans:
        return loads(raw)
    tag = os.urandom(8).hex()
    arrays, pieces, prev = {}, [], 0
    for i, (s, e) in enumerate(spans):
        arr = numeric_array(raw[s:e])
        if arr is None:
            return loads(raw)
        name = f"covid_keras.tensor.{i}.{tag}"
        arrays[name] = arr
        pieces += [raw[prev:s], b'"' + name.encode() + b'"']
        prev = e
    pieces.append(raw[prev:])
    try:
        body = loads(b"".join(pieces))
    except ServingError:
        return loads(raw)
    def take(value):
        return arrays.pop(value) if isinstance(value, str) and value in arrays else value

    if isinstance(body, dict):
        if "instances" in body:
            body["instances"] = take(body["instances"])
        cols = body.get("inputs")
        if isinstance(cols, dict):
            for k in list(cols):
                cols[k] = take(cols[k])
        elif "inputs" in body:
            body["inputs"] = take(cols)
    if arrays:  # a marker where no tensor stands: parsed the ordinary way
        return loads(raw)
    return body


def parse_predict_body(body: dict, input_names: list[str],
                       max_instances: int | None = None) -> tuple[dict, bool]:
    """A TF Serving REST predict body -> (inputs, row_format). Row: ``{"instances": [...]}``
    (one value per instance, or an object per instance when there are several inputs);
    columnar: ``{"inputs": value | {name: value}}``. More than ``max_instances`` instances
    are refused before any value is converted."""
    if max_instances is not None and isinstance(body, dict):
        cols = body.get("inputs")
        named = list(cols.items()) if isinstance(cols, dict) else [("inputs", cols)]
        for key, value in [("instances", body.get("instances"))] + named:
            if isinstance(value, (list, np.ndarray)):
                check_instances(key, value, max_instances)
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
        if isinstance(rows, np.ndarray):  # one numeric tensor, from loads_predict
            if not single:
                raise bad_request(f"the signature takes several inputs {input_names}: each "
                                  "instance must be an object naming them")
            return {input_names[0]: rows}, True
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


def predict_job(servable: Servable, raw: bytes, max_instances: int | None) -> bytes:
    """One REST predict, from the body's bytes to the answer's (in an inference worker:
    JSON decoding is CPU work that must not stall the event loop). After a large request
    the freed heap is given back, so RSS returns to its level before it."""
    size = len(raw)
    try:
        return _predict(servable, raw, max_instances)
    finally:
        if size > 1 << 20:
            release_memory()


def _predict(servable: Servable, raw: bytes, max_instances: int | None) -> bytes:
    body = loads_predict(raw)
    sig = body.get("signature_name", "") if isinstance(body, dict) else ""
    if not isinstance(sig, str):
        raise bad_request("signature_name must be a string")
    inputs, rows = parse_predict_body(body, sorted(servable.input_specs(sig)), max_instances)
    del body
    return dumps(format_predict_response(servable.run(sig, inputs), rows))


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def answer_unless_gone(fut: futures.Future, receive, gone: threading.Event):
    """The worker's result, or ClientGone as soon as the client disconnects (its job is
    then cancelled if it has not started: nothing is computed for it)."""
    work = asyncio.wrap_future(fut)
    watch = asyncio.ensure_future(_until_disconnect(receive))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    gone.set()
    fut.cancel()
    work.add_done_callback(lambda f: f.cancelled() or f.exception())
    raise ClientGone()


class RestApp:
    """TF Serving's REST API as an ASGI app (Starlette requests and responses)."""

    def __init__(self, manager: ModelManager, pool: InferencePool, max_bytes: int,
                 timeout_s: float, access: Access | None = None,
                 budget: ByteBudget | None = None):
        self.manager, self.pool, self.max_bytes = manager, pool, max_bytes
        self.timeout_s = timeout_s
        self.access = access or Access()
        self.budget = budget or ByteBudget(max(max_bytes, MAX_INFLIGHT_BYTES))

    async def __call__(self, scope, receive, send) -> None:
        from starlette.requests import Request

        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            response = await self.handle(request, receive)
        except ClientGone:
            return
        await response(scope, receive, send)

    @staticmethod
    def json(status: int, obj: dict | bytes, headers: dict | None = None):
        from starlette.responses import Response

        body = obj if isinstance(obj, bytes) else dumps(obj)
        return Response(body, status, headers=headers, media_type="application/json")

    async def handle(self, request, receive):
        from starlette.requests import ClientDisconnect

        method = request.method
        close = {"Connection": "close"}
        try:
            self.access.check(request.headers, post=method not in ("GET", "HEAD"))
            path = request.url.path
            m = _PATH.match(path)
            if not m:
                raise not_found(f"Malformed request: {method} {path[:200]}")
            name, verb, meta = m["name"], m["verb"], m["meta"]
            version = int(m["version"]) if m["version"] else None
            if method == "GET":
                if verb:
                    raise ServingError(405, "UNIMPLEMENTED", f"GET cannot :{verb}")
                if meta:
                    servable = self.manager.get(name, version)
                    return self.json(200, metadata_json(servable),
                                     {VERSION_HEADER: str(servable.version)})
                return self.json(200, {"model_version_status": self.manager.status(name,
                                                                                   version)})
            if method != "POST":
                raise ServingError(405, "UNIMPLEMENTED", f"{method[:10]} is not served")
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return self.json(411, {"error": "Content-Length required"}, close)
            if int(length) > self.max_bytes:
                return self.json(413, {"error": f"request body of {int(length)} bytes exceeds "
                                                f"--max_request_mb ({self.max_bytes} bytes)"},
                                 close)
            size = int(length)
            try:  # reserved before a byte of the body is read; released on every way out
                self.budget.reserve(size)
            except ServingError as err:
                return self.json(err.http, {"error": str(err)}, close)
            held = size
            try:
                raw = bytearray()
                stream = request.stream()
                try:
                    while True:  # an idle timeout: each piece within timeout_s of the last
                        with _deadline(self.timeout_s):
                            try:
                                chunk = await stream.__anext__()
                            except StopAsyncIteration:
                                break
                        raw += chunk
                except TimeoutError:
                    return self.json(408, {"error": f"the request body paused for more than "
                                                    f"{self.timeout_s:g} s"}, close)
                except ClientDisconnect:
                    raise ClientGone() from None
                if verb != "predict" or meta:
                    raise not_found(f"Malformed request: POST {path[:200]} (only :predict is "
                                    "served)")
                servable = self.manager.get(name, version)
                gone = threading.Event()
                fut = self.pool.submit(predict_job, servable, bytes(raw),
                                       self.manager.max_instances,
                                       alive=lambda: not gone.is_set())
                del raw
                held = 0  # the job holds the bytes now: released when it ends
                fut.add_done_callback(lambda _f: self.budget.release(size))
                body = await answer_unless_gone(fut, receive, gone)
                return self.json(200, body, {VERSION_HEADER: str(servable.version)})
            finally:
                if held:
                    self.budget.release(held)
        except ServingError as err:
            headers = {"WWW-Authenticate": "Bearer"} if err.http == 401 else None
            return self.json(err.http, {"error": str(err)}, headers)
        except ClientGone:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad request never stops serving
            log.error("internal error: %s", type(exc).__name__)
            return self.json(500, {"error": f"internal error ({type(exc).__name__})"})


class _deadline:
    """``with _deadline(s):`` in a coroutine: TimeoutError when it takes longer."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        import anyio

        self._scope = anyio.fail_after(self.seconds)
        return self._scope.__enter__()

    def __exit__(self, *exc):
        return self._scope.__exit__(*exc)


def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a header deadline: a connection that has not sent a
    whole request header within ``timeout_s`` of connecting (or of its last answer) is
    closed, so a client dribbling a header holds a socket for a while, never a thread."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._header_expired)

        def _header_expired(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return Protocol


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(1024)
    return sock


class RestServer:
    """The REST app on uvicorn in a thread of its own (its event loop)."""

    def __init__(self, app, host: str, port: int, timeout_s: float):
        import uvicorn

        self.sock = listen(host, port)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, access_log=False, log_level="warning",
                                server_header=False, lifespan="off", ws="none",
                                http=header_timeout_protocol(timeout_s),
                                timeout_keep_alive=max(1, min(5, int(timeout_s))),
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, name="rest",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def make_rest_server(manager: ModelManager, host: str, port: int, max_bytes: int,
                     threads: int, timeout_s: float = 30.0, queue: int = 32,
                     access: Access | None = None, pool: InferencePool | None = None,
                     budget: ByteBudget | None = None) -> RestServer:
    pool = pool or InferencePool(threads, queue)
    return RestServer(RestApp(manager, pool, max_bytes, timeout_s, access, budget), host,
                      port, timeout_s)


# ------------------------------------------------------------------ gRPC
def make_grpc_server(manager: ModelManager, host: str, port: int, max_bytes: int,
                     threads: int, queue: int = 32, access: Access | None = None,
                     pool: InferencePool | None = None):
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

    pool = pool or InferencePool(threads, queue)
    access = access or Access()

    def guarded(fn):
        """The handler's answer, or one abort with the status its error names. Handlers
        raise (ServingError, ClientGone) and never call ``context.abort`` themselves: grpc's
        abort raises a plain Exception, which would otherwise be taken for an internal
        error here and aborted again as INTERNAL."""
        def call(self, request, context):
            try:
                if not access.token_ok(dict(context.invocation_metadata()).get(
                        "authorization")):
                    raise ServingError(401, "UNAUTHENTICATED", "a valid bearer token is "
                                       "required in the 'authorization' metadata")
                return fn(self, request, context)
            except ServingError as err:
                code, message = getattr(grpc.StatusCode, err.grpc_code), str(err)
            except (ClientGone, futures.CancelledError):
                code, message = grpc.StatusCode.CANCELLED, "the client has gone"
            except Exception as exc:  # noqa: BLE001 - one bad request never stops serving
                if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "_AbortError":
                    raise
                log.error("internal error: %s", type(exc).__name__)
                code, message = grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"
            context.abort(code, message)
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
            fut = pool.submit(servable.run, sig, inputs, list(request.output_filter),
                              alive=context.is_active)
            del inputs
            out = fut.result()  # ClientGone: guarded ends the call as CANCELLED
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
        futures.ThreadPoolExecutor(max_workers=pool.capacity, thread_name_prefix="grpc"),
        maximum_concurrent_rpcs=pool.capacity,
        options=[("grpc.max_receive_message_length", max_bytes),
                 ("grpc.max_send_message_length", max(max_bytes, 64 << 20))])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Prediction(), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(Models(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    return server, bound
