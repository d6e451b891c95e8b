"""Benchmark: CPU latency of one study through the model server, DRENet vs ResNet-50.

Not a test: it prints figures. Random weights (``weights=None``, nothing downloaded),
synthetic slices. What runs, in order:

1. **Export** (a child process, so that the timing process never imports TensorFlow):
   DRENet (:func:`covid_keras.build_drenet`, ``--variant`` paper, ``--backbone`` resnet50)
   and the plain classifier (:func:`covid_keras.build_classifier`, the same backbone) at
   the SAME ``--input_size`` (default 224; the paper's is 448), each exported with the
   export library (:func:`covid_keras.serving.exporter.export_model`, the signatures and
   ``assets.extra`` of ``python -m covid_keras.export``; no decision.json, so argmax) into a
   temporary export base: ``<base>/drenet/1`` and ``<base>/resnet50/1``.
2. **Servers**: one ``python -m covid_keras.serve`` per model (TF Serving's flags, REST on a
   free port, no gRPC, no version polling), both up for the whole run; ready when
   ``GET /v1/models/<name>`` says AVAILABLE.
3. **Requests**: one study = ``--slices`` (15) random windowed slices (uint8 values,
   ``--input_size`` px, grey repeated on 3 channels), sent as TF Serving's REST predict with
   the columnar body ``{"signature_name": "predict_study", "inputs": {"images": [...]}}``
   (the same body bytes for both models; built once, not timed). Latency = wall time from
   opening the connection to the parsed JSON answer (HTTP 200 checked), one
   ``http.client`` connection per request. First ``--warmup`` requests per model (and one
   untimed round at the highest concurrency), excluded.
4. **Timing, models alternated**: per concurrency c in ``--clients`` (1 and 4): rounds in
   which c threads start together (a barrier) and each sends ``--per_client`` requests
   back to back, to one model; the models alternate round by round (A B, B A, ...), until
   each has ``--requests`` timed requests. p50 / p95 (NumPy's linear interpolation) of the
   requests' latencies, requests/s = requests / summed wall time of that model's rounds,
   and the server's CPU seconds per request (``/proc/<pid>/stat`` user + system of the
   server process, all threads; Linux only), which other jobs on a shared machine distort
   less than wall time.
5. **REST overhead probe**: in the first ``--probe`` rounds at 1 client, each model's
   request is followed by one with the same body but the input renamed: the server reads
   and parses the whole JSON body into arrays, then refuses it (400) before the model runs.
   Its p50 (wall) and mean server CPU are the serving cost that is not the model (mostly
   JSON parsing in Python, the same for both models), measured at the same time as the
   requests; (DRENet - probe) / (ResNet-50 - probe) at 1 client estimates the model-only
   ratio, in wall time and in server CPU.

6. **Under attack** (DRENet's server, after the timing): predict_study latency at 1 client,
   ``--attack_requests`` requests without and then with ``--slow_loris`` connections open
   (each sends a predict header announcing 1000 bytes and one byte; one the server closes
   is opened again, as an attacker would). Target: p95 with them within 1.5x of p95
   without. Then the server's RSS (``/proc/<pid>/status`` VmRSS) after ``--rss_requests``
   (100) normal requests, and after as many oversized or bomb requests (in turn: a large
   VALID batch, a predict_study of as many slices as fit just under the servers'
   ``--max_request_mb`` (64) and ``--max_instances`` (1024), answered 200
   (``--big_batch_slices`` sets its size, 0 leaves it out); a 20000 x 20000 PNG of a few
   hundred KB to predict_images, a body over ``--max_request_mb``, a study of more than
   ``--max_instances`` slices, JSON nested 100000 deep, NaN). Target: within 10 %.
7. **JSON decoding** (this process, no server): the study body through ``json.loads`` and
   through ``orjson.loads`` (when installed), and the conversion to arrays
   (:func:`covid_keras.serving.model_server.parse_predict_body`); then the server's path
   (:func:`covid_keras.serving.model_server.loads_predict`: the numeric array converted
   straight from the bytes, then parse_predict_body) and its ratio to parse-then-convert,
   best of 3 each: the serving cost that is not the model (target <= 0.3 s).

Target: DRENet / ResNet-50 latency <= 3.0 (ideal 2 + K / 4 = 2.75: two full backbone
passes + K = 3 half-size crops), checked on the p50 at 1 client. Prints a table and one
``RESULT {json}`` line; ``--output_json`` also writes the JSON.

    .venv/bin/python bench/serve.py            # 224 px, 10 requests per setting: 5-7 min
    .venv/bin/python bench/serve.py --quick    # smoke: tiny backbone, 64 px: < 1 min
    .venv/bin/python bench/serve.py --input_size 448 --requests 10   # the paper's size
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):  # run as a file (bench/ on the path) or imported
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from common import emit_result  # noqa: E402 (bench/common.py)

DEFAULTS = dict(input_size=224, backbone="resnet50", requests=10, warmup=1, probe=3,
                slow_loris=50, attack_requests=20, rss_requests=100)
QUICK = dict(input_size=64, backbone="tiny", requests=4, warmup=1, probe=2, slow_loris=10,
             attack_requests=4, rss_requests=5)
SERVER_MAX_REQUEST_MB = 64.0  # the servers' --max_request_mb (covid_keras.serve's default)
SERVER_MAX_INSTANCES = 1024  # their --max_instances (covid_keras.serve's default)
SLOW_TARGET = 1.5  # p95 with the slow clients / without
RSS_TARGET = 0.10  # RSS after the bombs within 10 % of RSS after the normal requests
TARGET_RATIO = 3.0
IDEAL_RATIO = 2.75  # 2 + K / 4 for K = 3 (paper)
CLASSES = {2: ["normal", "covid"], 3: ["normal", "covid", "bacterial"]}
MODELS = ("drenet", "classifier")  # model names on the servers (drenet first in tables)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="CPU latency of one study (15 slices) through covid_keras.serve (TF "
                    "Serving's REST API): DRENet vs the plain classifier at the same input "
                    "size, 1 and 4 concurrent clients, random weights. Prints a table and a "
                    "RESULT {json} line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny backbone, 64 px, 4 requests per setting (explicit "
                        "flags still win)")
    p.add_argument("--input_size", type=int, default=None,
                   help="input side of both models (default 224; the paper's is 448)")
    p.add_argument("--backbone", default=None,
                   help="backbone of both models (resnet50, vgg16, densenet121, "
                        "densenet169, tiny); default resnet50")
    p.add_argument("--variant", choices=("paper", "code"), default="paper",
                   help="DRENet variant")
    p.add_argument("--num_classes", type=int, choices=(2, 3), default=3)
    p.add_argument("--slices", type=int, default=15, help="slices per study (request)")
    p.add_argument("--signature", choices=("predict_study", "serving_default"),
                   default="predict_study", help="signature the requests call")
    p.add_argument("--clients", default="1,4",
                   help="comma-separated concurrency levels (threads sending at once)")
    p.add_argument("--requests", type=int, default=None,
                   help="timed requests per model per concurrency level, rounded up to whole "
                        "rounds (default 10)")
    p.add_argument("--per_client", type=int, default=1,
                   help="requests each client sends back to back in one round")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed requests per model at 1 client before timing, plus one "
                        "untimed round at the highest concurrency unless 0 (default 1)")
    p.add_argument("--probe", type=int, default=None,
                   help="REST overhead probe requests per model (0: none; default 3)")
    p.add_argument("--slow_loris", type=int, default=None,
                   help="slow-loris connections held open in the attack phase (0: no "
                        "attack phase; default 50)")
    p.add_argument("--attack_requests", type=int, default=None,
                   help="timed requests without and with the slow clients (default 20)")
    p.add_argument("--rss_requests", type=int, default=None,
                   help="normal, then bomb / oversized requests before each RSS reading "
                        "(default 100; fewer for a quick check)")
    p.add_argument("--big_batch_slices", type=int, default=-1,
                   help="slices of the large valid batch among the bomb / oversized "
                        "requests (-1: as many as fit under the servers' --max_request_mb "
                        "and --max_instances; 0: none)")
    p.add_argument("--server_threads", type=int, default=8,
                   help="the servers' --rest_api_num_threads")
    p.add_argument("--ready_timeout", type=float, default=600.0,
                   help="seconds to wait for a server to load its model")
    p.add_argument("--request_timeout", type=float, default=600.0,
                   help="seconds one request may take")
    p.add_argument("--work_dir", default=None,
                   help="folder for the exports and server logs (default: a temporary "
                        "folder, removed at the end)")
    p.add_argument("--output_json", default=None, help="also write the RESULT JSON here")
    p.add_argument("--export_only", default=None, help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    try:
        args.client_levels = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    except ValueError:
        p.error(f"--clients must be comma-separated integers. Received: {args.clients!r}")
    if not args.client_levels or min(args.client_levels) < 1:
        p.error("--clients: at least one level, each >= 1")
    if min(args.requests, args.slices, args.per_client, args.input_size) < 1:
        p.error("--requests, --slices, --per_client and --input_size must be >= 1")
    if args.warmup < 0 or args.probe < 0:
        p.error("--warmup and --probe must be >= 0")
    return args


def child_env() -> dict:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "tensorflow"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


# ------------------------------------------------------------------ export (child process)
def export_both(args: argparse.Namespace) -> None:
    """Builds both models with random weights and exports them under ``--export_only``;
    writes ``export_report.json`` there."""
    from covid_keras import build_classifier, build_drenet
    from covid_keras.core import cli
    from covid_keras.model import saving
    from covid_keras.serving import exporter

    keras = cli.setup_logging(0)  # TensorFlow's start-up notices and saver INFO lines off

    base = args.export_only
    classes = CLASSES[args.num_classes]
    report = {}
    for name in MODELS:
        keras.utils.set_random_seed(0)
        t0 = time.perf_counter()
        if name == "drenet":
            model = build_drenet(args.num_classes, input_size=args.input_size,
                                 backbone=args.backbone, weights=None, variant=args.variant)
        else:
            model = build_classifier(args.backbone, args.num_classes,
                                     input_size=args.input_size, weights=None)
        build_s = time.perf_counter() - t0
        minfo = saving.model_info(model, classes)
        prep, warnings = exporter.data_prep_settings(None, args.input_size)
        info = exporter.export_info(minfo, prep, None, None, "random_weights.keras", warnings)
        t0 = time.perf_counter()
        path = exporter.export_model(model, info, None, base, name, 1)
        report[name] = {"build_s": round(build_s, 2),
                        "export_s": round(time.perf_counter() - t0, 2),
                        "params": int(model.count_params()), "model": info["model"],
                        "backbone": info["backbone"], "input_size": info["input_size"],
                        "path": os.path.relpath(path, base)}
        if name == "drenet":
            report[name]["regions"] = int(model.get_layer("top_k").k)
        print(f"  exported {name}: {report[name]['params']:,} parameters, built in "
              f"{build_s:.1f} s, exported in {report[name]['export_s']:.1f} s", flush=True)
        del model
        keras.backend.clear_session()
    report["tensorflow"] = sys.modules["tensorflow"].__version__
    report["keras"] = keras.__version__
    Path(base, "export_report.json").write_text(json.dumps(report))


# ------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``python -m covid_keras.serve`` process serving one model over REST."""

    def __init__(self, name: str, base: str, work: Path, threads: int):
        self.name = name
        self.port = free_port()
        self.log_path = work / f"serve_{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.t_start = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "covid_keras.serve", f"--model_name={name}",
             f"--model_base_path={os.path.join(base, name)}", "--port=0",
             f"--rest_api_port={self.port}", "--file_system_poll_wait_seconds=0",
             f"--rest_api_num_threads={threads}",
             f"--max_request_mb={SERVER_MAX_REQUEST_MB}",
             f"--max_instances={SERVER_MAX_INSTANCES}"],
            cwd=REPO, env=child_env(), stdout=self._log, stderr=subprocess.STDOUT)
        self.ready_s = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/models/{self.name}"

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}:"
                                   f"\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    states = json.loads(r.read())["model_version_status"]
                if any(s["state"] == "AVAILABLE" for s in states):
                    self.ready_s = time.perf_counter() - self.t_start
                    return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server {self.name} not ready after {timeout:.0f} s:\n"
                           f"{self.log_tail()}")

    def cpu_s(self) -> float | None:
        """User + system CPU seconds of the server process (all threads), Linux only."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ------------------------------------------------------------------ requests
def study_body(args: argparse.Namespace, input_name: str = "images") -> bytes:
    """One study as TF Serving's columnar REST predict body (uint8 values, grey x 3)."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (args.slices, args.input_size, args.input_size, 1))
    images = np.repeat(grey, 3, axis=-1).tolist()
    return json.dumps({"signature_name": args.signature, "inputs": {input_name: images}},
                      separators=(",", ":")).encode("ascii")


def big_batch_body(args: argparse.Namespace) -> tuple[bytes, int]:
    """A large VALID predict_study request: as many random slices (15 distinct, repeated)
    as fit just under the servers' --max_request_mb (2 % spare) and --max_instances, or
    ``--big_batch_slices``. Returns (body, slices)."""
    rng = np.random.default_rng(1)
    size = args.input_size
    texts = [json.dumps(np.repeat(rng.integers(0, 256, (size, size, 1)), 3, axis=-1)
                        .tolist(), separators=(",", ":")).encode("ascii")
             for _ in range(15)]
    head = b'{"signature_name":"predict_study","inputs":{"images":['
    tail = b"]}}"
    n = args.big_batch_slices
    if n < 0:
        room = int(SERVER_MAX_REQUEST_MB * (1 << 20) * 0.98) - len(head) - len(tail)
        n = min(SERVER_MAX_INSTANCES - 1, room // (max(len(t) for t in texts) + 1))
    body = head + b",".join(texts[i % len(texts)] for i in range(n)) + tail
    return body, n


def post(server: Server, body: bytes, timeout: float, expect: int = 200) -> float:
    """One predict request; returns its wall time (connect -> parsed JSON answer)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", f"/v1/models/{server.name}:predict", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    dt = time.perf_counter() - t0
    if resp.status != expect:
        raise RuntimeError(f"{server.name}: HTTP {resp.status} (expected {expect}): "
                           f"{str(answer)[:500]}\n{server.log_tail()}")
    if expect == 200 and "outputs" not in answer:
        raise RuntimeError(f"{server.name}: no outputs in the answer: {str(answer)[:500]}")
    return dt


def run_round(server: Server, body: bytes, clients: int, per_client: int,
              timeout: float) -> tuple[list[float], float]:
    """``clients`` threads start together, each sends ``per_client`` requests; returns
    (latencies, round wall time)."""
    barrier = threading.Barrier(clients + 1)
    lat: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client() -> None:
        barrier.wait()
        try:
            for _ in range(per_client):
                dt = post(server, body, timeout)
                with lock:
                    lat.append(dt)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return lat, wall


def summarise(lat: list[float], wall: float, cpu: float | None) -> dict:
    a = np.asarray(lat)
    return {"n": len(lat), "p50_s": round(float(np.percentile(a, 50)), 4),
            "p95_s": round(float(np.percentile(a, 95)), 4),
            "mean_s": round(float(a.mean()), 4), "min_s": round(float(a.min()), 4),
            "max_s": round(float(a.max()), 4), "wall_s": round(wall, 3),
            "req_per_s": round(len(lat) / wall, 4),
            "server_cpu_s_per_req": None if cpu is None else round(cpu / len(lat), 4),
            "latencies_s": [round(x, 4) for x in lat]}


def time_level(servers: list[Server], body: bytes, clients: int, args, log,
               probe_body: bytes | None = None, probe: dict | None = None) -> dict:
    """Rounds alternating between the models (A B, B A, ...) until each has
    ``--requests`` timed requests at this concurrency. With ``probe_body``, the first
    ``--probe`` rounds also send one probe per model after its round (untimed for the
    level); ``probe[name]`` gets (wall s, server CPU s) pairs."""
    per_round = clients * args.per_client
    rounds = -(-args.requests // per_round)
    lat = {s.name: [] for s in servers}
    wall = {s.name: 0.0 for s in servers}
    cpu = {s.name: 0.0 for s in servers}
    for r in range(rounds):
        for s in (servers if r % 2 == 0 else servers[::-1]):
            c0 = s.cpu_s()
            got, w = run_round(s, body, clients, args.per_client, args.request_timeout)
            c1 = s.cpu_s()
            lat[s.name] += got
            wall[s.name] += w
            if c0 is None or c1 is None or cpu[s.name] is None:
                cpu[s.name] = None
            else:
                cpu[s.name] += c1 - c0
            if probe_body is not None and r < args.probe:
                p0 = s.cpu_s()
                dt = post(s, probe_body, args.request_timeout, expect=400)
                p1 = s.cpu_s()
                probe.setdefault(s.name, []).append(
                    (dt, None if p0 is None or p1 is None else p1 - p0))
        log(f"    round {r + 1}/{rounds}: " + ", ".join(
            f"{s.name} p50 {np.median(lat[s.name]):.3f} s" for s in servers))
    return {s.name: summarise(lat[s.name], wall[s.name], cpu[s.name]) for s in servers}


# ------------------------------------------------------------------ under attack
def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class SlowLoris:
    """``n`` connections that each send a predict header announcing 1000 bytes and one
    byte, kept open (reopened when the server closes one) until stop()."""

    HEAD = (b"POST /v1/models/%s:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")

    def __init__(self, port: int, name: str, n: int):
        self.port, self.head, self.n = port, self.HEAD % name.encode(), n
        self.socks: list[socket.socket] = []
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, daemon=True)

    def _open(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.sendall(self.head)
        s.setblocking(False)
        return s

    def start(self) -> "SlowLoris":
        self.socks = [self._open() for _ in range(self.n)]
        self._thread.start()
        return self

    def _keep(self) -> None:
        while not self._stop.wait(0.5):
            for i, s in enumerate(self.socks):
                try:
                    s.recv(4096)  # an answer (408) or the close: this one is over
                except BlockingIOError:
                    continue  # still held open by the server
                except OSError:
                    pass
                s.close()
                try:
                    self.socks[i] = self._open()
                    self.reopened += 1
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for s in self.socks:
            s.close()


def bomb_png(side: int = 20000) -> bytes:
    """A valid grey PNG of side x side zero pixels (a few hundred KB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    comp = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def bomb_bodies(args: argparse.Namespace) -> list[tuple[str, bytes, int]]:
    """(what, body, expected HTTP status): requests the server must refuse cheaply, and the
    large valid batch it must answer (200) and then give its memory back."""
    import base64

    png = base64.b64encode(bomb_png()).decode("ascii")
    many = np.zeros((SERVER_MAX_INSTANCES + 76, 4, 4, 3), np.uint8).tolist()
    big = []
    if args.big_batch_slices != 0:
        body, n = big_batch_body(args)
        big = [(f"valid_batch_{n}_slices_{len(body) / 2**20:.1f}MiB", body, 200)]
    return big + [
        ("png_bomb_20000px", json.dumps({"signature_name": "predict_images",
                                         "instances": [{"b64": png}]}).encode(), 400),
        ("over_max_request_mb", b"[" + b"0," * (33 << 20) + b"0]", 413),
        ("over_max_instances", json.dumps({"signature_name": "predict_study",
                                           "inputs": {"images": many}}).encode(), 400),
        ("nested_100000", b"[" * 100000 + b"]" * 100000, 400),
        ("nan", b'{"inputs": {"images": [[[[NaN, 0, 0]]]]}, "signature_name": '
                b'"predict_study"}', 400),
    ]


def post_raw(server: Server, body: bytes, timeout: float) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", f"/v1/models/{server.name}:predict", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (ConnectionError, OSError):
        return -1  # the server may close before reading an oversized body
    finally:
        conn.close()


def under_attack(server: Server, body: bytes, args, log) -> dict:
    """Section 6 of the module docstring."""
    def timed(n: int) -> list[float]:
        return [post(server, body, args.request_timeout) for _ in range(n)]

    log(f"under attack ({server.name}): {args.attack_requests} requests without, then with "
        f"{args.slow_loris} slow-loris connections")
    calm = timed(args.attack_requests)
    loris = SlowLoris(server.port, server.name, args.slow_loris).start()
    try:
        time.sleep(0.5)
        attacked = timed(args.attack_requests)
        threads = len(os.listdir(f"/proc/{server.proc.pid}/task")) if os.path.isdir(
            f"/proc/{server.proc.pid}/task") else None
    finally:
        loris.stop()
    p95 = {"without": float(np.percentile(calm, 95)), "with": float(np.percentile(attacked,
                                                                              95))}
    slow = {"connections": args.slow_loris, "requests": args.attack_requests,
            "p50_without_s": round(float(np.median(calm)), 4),
            "p95_without_s": round(p95["without"], 4),
            "p50_with_s": round(float(np.median(attacked)), 4),
            "p95_with_s": round(p95["with"], 4),
            "p95_ratio": _ratio(p95["with"], p95["without"]),
            "server_threads_during": threads, "target": SLOW_TARGET}
    slow["pass"] = bool(slow["p95_ratio"] is not None and slow["p95_ratio"] <= SLOW_TARGET)
    log(f"  p95 {slow['p95_without_s']:.3f} s without, {slow['p95_with_s']:.3f} s with: "
        f"{slow['p95_ratio']}x ({'PASS' if slow['pass'] else 'FAIL'} <= {SLOW_TARGET})")

    log(f"  RSS: {args.rss_requests} normal requests, then {args.rss_requests} bomb / "
        "oversized ones")
    rss0 = rss_bytes(server.proc.pid)
    for _ in range(args.rss_requests):
        post(server, body, args.request_timeout)
    rss_normal = rss_bytes(server.proc.pid)
    bombs = bomb_bodies(args)
    statuses: dict = {}
    for i in range(args.rss_requests):
        what, b, want = bombs[i % len(bombs)]
        got = post_raw(server, b, args.request_timeout)
        statuses.setdefault(what, {"expected": want, "got": []})["got"].append(got)
    time.sleep(1.0)
    rss_bombs = rss_bytes(server.proc.pid)
    rss = {"requests": args.rss_requests, "start_mb": _mb(rss0),
           "after_normal_mb": _mb(rss_normal), "after_bombs_mb": _mb(rss_bombs),
           "statuses": {k: {"expected": v["expected"], "got": sorted(set(v["got"]))}
                        for k, v in statuses.items()}, "target": RSS_TARGET}
    rss["change"] = (None if not rss_normal or not rss_bombs
                     else round(rss_bombs / rss_normal - 1.0, 4))
    # every request answered as it should (an oversized body may also be cut off: -1)
    rss["statuses_ok"] = all(set(v["got"]) <= {v["expected"]} | (
        {-1} if v["expected"] == 413 else set()) for v in statuses.values())
    rss["pass"] = bool(rss["change"] is not None and abs(rss["change"]) <= RSS_TARGET
                       and rss["statuses_ok"])
    log(f"  RSS {rss['after_normal_mb']} MB after normal, {rss['after_bombs_mb']} MB after "
        f"bombs: {rss['change']:+.1%} ({'PASS' if rss['pass'] else 'FAIL'} within "
        f"{RSS_TARGET:.0%}); statuses " + ", ".join(
            f"{k} {v['got']} (want {v['expected']})" for k, v in rss["statuses"].items()))
    return {"slow_clients": slow, "rss": rss}


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def json_cost(body: bytes) -> dict:
    """Section 7 of the module docstring (best of 3, seconds)."""
    from covid_keras.serving import model_server

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(min(times), 4)

    out = {"body_mb": round(len(body) / 2**20, 2), "json_loads_s": best(lambda: json.loads(
        body))}
    try:
        import orjson
    except ImportError:
        orjson = None
    if orjson is not None:
        out["orjson_loads_s"] = best(lambda: orjson.loads(body))
    parsed = model_server.loads(body)
    out["parser"] = "orjson" if model_server._orjson is not None else "json"
    out["to_arrays_s"] = best(lambda: model_server.parse_predict_body(parsed, ["images"], 1024))
    parse = out["orjson_loads_s"] if out["parser"] == "orjson" else out["json_loads_s"]
    out["parse_then_arrays_s"] = round(parse + out["to_arrays_s"], 4)  # before loads_predict
    # what the server does now: the numeric array converted straight from the bytes
    out["server_path_s"] = best(lambda: model_server.parse_predict_body(
        model_server.loads_predict(body), ["images"], 1024))
    out["server_path_vs_parse_then_arrays"] = _ratio(out["server_path_s"],
                                                     out["parse_then_arrays_s"])
    out["target_s"] = 0.3
    out["pass"] = out["server_path_s"] <= 0.3
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


# ------------------------------------------------------------------ the benchmark
def bench(args: argparse.Namespace) -> dict:
    def log(msg: str) -> None:
        print(msg, flush=True)

    keep = args.work_dir is not None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_serve_"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "exports"
    if base.exists():
        shutil.rmtree(base)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    servers: list[Server] = []
    t_all = time.perf_counter()
    try:
        log(f"exporting DRENet ({args.variant}) and the {args.backbone} classifier at "
            f"{args.input_size} px (random weights) to {base}")
        t0 = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--export_only", str(base),
               "--input_size", str(args.input_size), "--backbone", args.backbone,
               "--variant", args.variant, "--num_classes", str(args.num_classes)]
        with open(work / "export.log", "w") as err:
            done = subprocess.run(cmd, cwd=REPO, env=child_env(), stderr=err)
        if done.returncode:
            raise RuntimeError(f"export failed ({done.returncode}):\n"
                               f"{(work / 'export.log').read_text(errors='replace')[-3000:]}")
        export_wall = time.perf_counter() - t0
        exported = json.loads((base / "export_report.json").read_text())

        log("starting one covid_keras.serve per model")
        servers = [Server(name, str(base), work, args.server_threads) for name in MODELS]
        for s in servers:
            s.wait_ready(args.ready_timeout)
            log(f"  {s.name} ready on port {s.port} after {s.ready_s:.1f} s")

        t0 = time.perf_counter()
        body = study_body(args)
        probe_body = study_body(args, "bench_probe_not_an_input")
        body_s = time.perf_counter() - t0
        log(f"request body: {len(body) / 2**20:.1f} MiB of JSON ({args.slices} slices x "
            f"{args.input_size}^2 x 3), built in {body_s:.1f} s")

        log(f"warm-up: {args.warmup} request(s) per model at 1 client, 1 round at "
            f"{max(args.client_levels)} clients (not timed)")
        warm = {s.name: [] for s in servers}
        for s in servers:
            for _ in range(args.warmup):
                warm[s.name].append(round(post(s, body, args.request_timeout), 4))
            if args.warmup and max(args.client_levels) > 1:
                run_round(s, body, max(args.client_levels), 1, args.request_timeout)

        levels = {}
        probe: dict = {}
        for i, c in enumerate(args.client_levels):
            with_probe = i == 0 and args.probe > 0
            log(f"timing {args.requests} requests per model at {c} client(s), "
                f"{c * args.per_client} per round, models alternated"
                + (f"; REST overhead probe in the first {args.probe} round(s) (body "
                   "parsed, refused before the model)" if with_probe else ""))
            levels[c] = time_level(servers, body, c, args, log,
                                   probe_body if with_probe else None, probe)
        attack = under_attack(servers[0], body, args, log) if args.slow_loris else None
        decode = json_cost(body)
        log(f"JSON decoding of the {decode['body_mb']} MiB study: json {decode['json_loads_s']}"
            f" s, orjson {decode.get('orjson_loads_s')} s; to arrays {decode['to_arrays_s']} s;"
            f" parse then arrays {decode['parse_then_arrays_s']} s; the server's path "
            f"(loads_predict) {decode['server_path_s']} s "
            f"({decode['server_path_vs_parse_then_arrays']}x)")
    finally:
        for s in servers:
            s.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    d_name, c_name = MODELS
    models = {}
    for s in servers:
        m = {**exported[s.name], "server_ready_s": round(s.ready_s, 2),
             "warmup_latencies_s": warm[s.name],
             "clients": {str(c): levels[c][s.name] for c in args.client_levels}}
        if s.name in probe:
            walls = [w for w, _ in probe[s.name]]
            cpus = [c for _, c in probe[s.name]]
            m["rest_overhead_p50_s"] = round(float(np.median(walls)), 4)
            m["rest_overhead_cpu_s"] = (None if None in cpus
                                        else round(float(np.mean(cpus)), 4))
            m["rest_overhead_clients"] = min(args.client_levels)
        models[s.name] = m
    ratio = {}
    for c in args.client_levels:
        d, b = models[d_name]["clients"][str(c)], models[c_name]["clients"][str(c)]
        ratio[str(c)] = {"p50": _ratio(d["p50_s"], b["p50_s"]),
                         "p95": _ratio(d["p95_s"], b["p95_s"]),
                         "req_per_s": _ratio(b["req_per_s"], d["req_per_s"])}
        if d["server_cpu_s_per_req"] and b["server_cpu_s_per_req"]:
            ratio[str(c)]["server_cpu"] = _ratio(d["server_cpu_s_per_req"],
                                                 b["server_cpu_s_per_req"])
        if probe and c == min(args.client_levels):  # measured alongside this level only
            od = models[d_name]["rest_overhead_p50_s"]
            ob = models[c_name]["rest_overhead_p50_s"]
            ratio[str(c)]["p50_model_only_est"] = _ratio(d["p50_s"] - od, b["p50_s"] - ob)
            ocd = models[d_name]["rest_overhead_cpu_s"]
            ocb = models[c_name]["rest_overhead_cpu_s"]
            if None not in (ocd, ocb, d["server_cpu_s_per_req"], b["server_cpu_s_per_req"]):
                ratio[str(c)]["server_cpu_model_only_est"] = _ratio(
                    d["server_cpu_s_per_req"] - ocd, b["server_cpu_s_per_req"] - ocb)
    lo = str(min(args.client_levels))
    hi = str(max(args.client_levels))
    headline = ratio[lo]["p50"]
    res = {
        "mode": "cpu_quick" if args.quick else "cpu",
        "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "tensorflow": exported["tensorflow"], "keras": exported["keras"],
        "backbone": args.backbone, "variant": args.variant, "input_size": args.input_size,
        "num_classes": args.num_classes, "slices": args.slices, "signature": args.signature,
        "transport": "REST (TF Serving's columnar JSON), one connection per request",
        "clients": args.client_levels, "requests": args.requests,
        "per_client": args.per_client, "warmup": args.warmup, "probe": args.probe,
        "server_threads": args.server_threads, "body_mb": round(len(body) / 2**20, 2),
        "export_wall_s": round(export_wall, 1),
        "models": models, "ratio": ratio,
        "summary": {
            "drenet_p50_s": {c: models[d_name]["clients"][c]["p50_s"] for c in ratio},
            "drenet_p95_s": {c: models[d_name]["clients"][c]["p95_s"] for c in ratio},
            "resnet_p50_s": {c: models[c_name]["clients"][c]["p50_s"] for c in ratio},
            "resnet_p95_s": {c: models[c_name]["clients"][c]["p95_s"] for c in ratio},
            "drenet_req_per_s": models[d_name]["clients"][hi]["req_per_s"],
            "resnet_req_per_s": models[c_name]["clients"][hi]["req_per_s"],
            "req_per_s_clients": int(hi),
            "ratio_p50": headline, "ratio_clients": int(lo),
        },
        "target_ratio": TARGET_RATIO, "ideal_ratio": IDEAL_RATIO,
        "pass": bool(headline is not None and headline <= TARGET_RATIO),
        "loadavg_before": None if load_before is None else [round(x, 2) for x in load_before],
        "loadavg_after": ([round(x, 2) for x in os.getloadavg()]
                          if hasattr(os, "getloadavg") else None),
        "total_s": round(time.perf_counter() - t_all, 1),
        "attack": attack, "json_decode": decode,
    }
    return res


def print_table(res: dict) -> None:
    print()
    print(f"{res['mode']}: {res['device']}, TF {res['tensorflow']}, Keras {res['keras']}; "
          f"{res['slices']} slices per study at {res['input_size']} px via "
          f"{res['signature']} ({res['body_mb']} MiB JSON), {res['requests']} requests per "
          f"model per level")
    header = (f"{'model':<12}{'clients':>8}{'p50 s':>9}{'p95 s':>9}{'mean s':>9}"
              f"{'req/s':>8}{'srv CPU s/req':>15}")
    print(header)
    print("-" * len(header))
    names = {"drenet": "DRENet", "classifier": res["backbone"]}
    for c in (str(x) for x in res["clients"]):
        for name, m in res["models"].items():
            s = m["clients"][c]
            cpu = s["server_cpu_s_per_req"]
            print(f"{names[name]:<12}{c:>8}{s['p50_s']:>9.3f}{s['p95_s']:>9.3f}"
                  f"{s['mean_s']:>9.3f}{s['req_per_s']:>8.2f}"
                  f"{'-' if cpu is None else f'{cpu:.3f}':>15}")
    for c, r in res["ratio"].items():
        extra = ""
        if "server_cpu" in r:
            extra += f", server CPU {r['server_cpu']:.2f}x"
        if r.get("p50_model_only_est") is not None:
            extra += f"; model only (minus the probe): p50 ~{r['p50_model_only_est']:.2f}x"
        if r.get("server_cpu_model_only_est") is not None:
            extra += f", server CPU ~{r['server_cpu_model_only_est']:.2f}x"
        print(f"DRENet / {res['backbone']} at {c} client(s): p50 {r['p50']:.2f}x, p95 "
              f"{r['p95']:.2f}x, throughput {r['req_per_s']:.2f}x{extra}")
    over = {n: m.get("rest_overhead_p50_s") for n, m in res["models"].items()}
    if all(v is not None for v in over.values()):
        ocpu = {n: m.get("rest_overhead_cpu_s") for n, m in res["models"].items()}
        print("REST overhead probe (body read + JSON parse, no model), p50 wall / mean "
              "server CPU: " + ", ".join(
                  f"{names[n]} {v:.3f} s / "
                  f"{'-' if ocpu[n] is None else f'{ocpu[n]:.3f} s'}"
                  for n, v in over.items()))
    s = res["summary"]
    print(f"target DRENet / {res['backbone']} p50 at {s['ratio_clients']} client(s) <= "
          f"{res['target_ratio']} (ideal {res['ideal_ratio']}): {s['ratio_p50']:.2f}x "
          f"{'PASS' if res['pass'] else 'FAIL'}")
    if res["mode"].endswith("quick"):
        print("  (--quick: tiny backbone and size, the ratio is not meaningful)")
    a = res.get("attack")
    if a:
        sl, r = a["slow_clients"], a["rss"]
        print(f"under attack: predict_study p95 {sl['p95_without_s']:.3f} s without, "
              f"{sl['p95_with_s']:.3f} s with {sl['connections']} slow-loris connections: "
              f"{sl['p95_ratio']}x ({'PASS' if sl['pass'] else 'FAIL'} <= {sl['target']}); "
              f"RSS {r['after_normal_mb']} MB after {r['requests']} normal, "
              f"{r['after_bombs_mb']} MB after {r['requests']} bomb / oversized: "
              f"{r['change']:+.1%} ({'PASS' if r['pass'] else 'FAIL'} within "
              f"{r['target']:.0%})")
    d = res.get("json_decode")
    if d:
        print(f"JSON decoding of the {d['body_mb']} MiB study: json.loads {d['json_loads_s']} s"
              f", orjson {d.get('orjson_loads_s')} s, to arrays {d['to_arrays_s']} s "
              f"({d['parser']} then arrays {d['parse_then_arrays_s']} s); the server's path "
              f"(loads_predict: arrays from the bytes) {d['server_path_s']} s, "
              f"{d['server_path_vs_parse_then_arrays']}x ("
              f"{'PASS' if d['pass'] else 'FAIL'} <= {d['target_s']} s)")
    print(f"load average before {res['loadavg_before']}, after {res['loadavg_after']}; "
          f"total {res['total_s']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.export_only:
        os.environ["KERAS_BACKEND"] = "tensorflow"
        export_both(args)
        return
    res = bench(args)
    emit_result(res, print_table, args.output_json)


if __name__ == "__main__":
    main()
