"""What the test modules share: tiny run folders and exports (test_export, test_serve,
test_predict, ...); a user's environment for command tests, and the check that a command
kept TensorFlow quiet; tiny TFRecord datasets built once per session (``tiny_dataset``),
the servers' tiny DRENet export too (``drenet_export``, :func:`copy_export`);
commands run without an interpreter start each (``commands``). conftest.py makes the
fixtures visible to every module."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import httpx

    from data_prep.study import ScanConfig

REPO = Path(__file__).resolve().parents[1]

CLASSES3 = ["normal", "covid", "bacterial"]
CLASSES2 = ["normal", "covid"]


def forward(model, x, training: bool = False):
    """``model(x, training=training)``, compiled under JAX: eager JAX compiles each op of
    the model alone (DenseNet-121, 64 px, XLA at -O0: 15.5 s against 2.7 s for the whole
    forward pass compiled once; test_classifier_baselines[densenet121] 24 -> 10 s). Not
    everywhere: a ResNet-50 DRENet took longer compiled (27 s against 20 s eager, whose op
    kernels repeat); eager under the other backends."""
    import keras

    if keras.backend.backend() != "jax":
        return model(x, training=training)
    import jax

    call, trainable, non_trainable = stateless(model, training)
    return jax.jit(call)(trainable, non_trainable, x)


def stateless(model, training: bool = False):
    """``(call, trainable, non_trainable)``: ``call(trainable, non_trainable, x)`` is the
    model's outputs for those weight values (``stateless_call``: what jax.jit and jax.grad
    take), then the values the model holds now."""
    def call(trainable, non_trainable, x):
        return model.stateless_call(trainable, non_trainable, x, training=training)[0]

    return (call, [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables])


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the servers under test bind there)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc) -> None:
    """Ends a server started with subprocess.Popen: terminate, then kill after 30 s; its
    stdout pipe closed."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None and not proc.stdout.closed:
        proc.stdout.close()


def export_drenet(root: Path, data_dir: Path | None = None) -> Path:
    """A SavedModel export (``root/exports/drenet``, version 1) of :func:`make_run`'s tiny
    DRENet with a mean-rule decision (covid >= 0.3), as the servers' tests serve it."""
    from covid_keras.serving import exporter

    run = make_run(root / "run", "drenet", {"rule": "mean", "threshold": 0.3,
                                             "positive_class": "covid"}, data_dir)
    model, info, decision = exporter.load_run(str(run))
    exporter.export_model(model, info, decision, str(root / "exports"), "drenet")
    return root / "exports" / "drenet"


@pytest.fixture(scope="session")
def drenet_export(tmp_path_factory) -> Path:
    """:func:`export_drenet`'s export (``.../exports/drenet``), built once per session (an
    export costs ~16 s on these 2 cores): read it, or serve a :func:`copy_export` of it."""
    return export_drenet(tmp_path_factory.mktemp("drenet_export"))


def copy_export(export: Path, root: Path) -> Path:
    """A copy of the model folder ``export`` at ``root/exports/<its name>`` (returned): a
    test's own, to add versions to or change."""
    import shutil

    dst = root / "exports" / export.name
    shutil.copytree(export, dst)
    return dst


def make_run(run_dir: Path, kind: str = "drenet", decision: dict | None = None,
             data_dir: Path | None = None, seed: int = 0, input_norm: str = "none",
             include_preprocessing: bool = True) -> Path:
    """A run folder as the trainer leaves it (best.keras with class names, run_info.json,
    optionally decision.json) around an untrained tiny 64 px model (``input_norm``: the
    models' first layer, see covid_keras.model.layers.intensity; ``include_preprocessing``
    False: a model without BackboneNormalization, as every run made before it)."""
    import keras

    from covid_keras import build_classifier, build_drenet
    from covid_keras.core import files
    from covid_keras.model.saving import save_model

    keras.utils.set_random_seed(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if kind == "classifier":
        model = build_classifier("tiny", 2, input_size=64, input_norm=input_norm,
                                 include_preprocessing=include_preprocessing)
        classes = CLASSES2
    else:
        model = build_drenet(3, input_size=64, backbone="tiny",
                             variant="code" if kind == "drenet_code" else "paper",
                             input_norm=input_norm,
                             include_preprocessing=include_preprocessing)
        classes = CLASSES3
    save_model(model, str(run_dir / "best.keras"), classes)
    files.write_json(str(run_dir / "run_info.json"), {
        "flags": {"data_dir": str(data_dir) if data_dir else None}, "git_sha": "abc123"})
    if decision is not None:
        files.write_json(str(run_dir / "decision.json"), {
            "split": "val", "classes": classes, "criterion": "youden_j", **decision})
    return run_dir


def fake_manifest(data_dir: Path, image_size: int = 64) -> Path:
    """A dataset manifest.json with data_prep's preprocessing entries (what export reads)."""
    import dataclasses

    from data_prep.preprocess import PrepConfig

    data_dir.mkdir(parents=True, exist_ok=True)
    prep = dataclasses.asdict(PrepConfig(image_size=image_size))
    (data_dir / "manifest.json").write_text(json.dumps({
        "classes": CLASSES3, "image": {"size": image_size, "channels": 1},
        "windows": [{"name": "lung", "level_hu": -700.0, "width_hu": 1500.0}],
        "flags": {"image_size": image_size, "num_slices": 15, "sampling": "paper",
                  "min_slices": 5, "windows": ["lung"], "image_window": ["-700", "1500"],
                  "input": "/secret/path/of/patients"},
        "preprocessing": prep}))
    return data_dir


TF_NOTICES = ("oneDNN", "cpu_feature_guard", "absl::InitializeLog", "E0000")


def user_env() -> dict:
    """This environment without the TF_CPP_MIN_LOG_LEVEL that conftest sets: as a user runs
    a command, so that the command's own quietening is what is tested."""
    return {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def assert_no_tf_notices(stderr: str) -> None:
    for notice in TF_NOTICES:
        assert notice not in stderr, stderr[-2000:]


def quiet_env() -> dict:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "tensorflow"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


class ServeProcess:
    """``python -m covid_keras.serve`` on a free local REST port (no gRPC) for an export,
    as a context manager: ``with ServeProcess(export, tmp_path) as server: server.url``.
    Waits until it reports that it serves; ``stop()`` ends it early (a server gone away)."""

    def __init__(self, export: Path, tmp_path: Path, model_name: str = "drenet"):
        self.export, self.tmp_path, self.model_name = export, tmp_path, model_name

    def __enter__(self) -> "ServeProcess":
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.err = open(self.tmp_path / "serve.err", "w")  # noqa: SIM115 - closed in stop()
        repo = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "covid_keras.serve", f"--model_name={self.model_name}",
             f"--model_base_path={self.export}", f"--rest_api_port={self.port}", "--port=0"],
            cwd=repo, env=quiet_env(), stdout=subprocess.PIPE, stderr=self.err, text=True)
        try:
            line = self.proc.stdout.readline()
            assert f"serving {self.model_name}" in line, line
        except BaseException:
            self.stop()
            raise
        return self

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc)
        if not self.err.closed:
            self.err.close()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------ tiny datasets
SALT = "0123456789abcdef" * 4  # fixed: the same split (and shards) every run


def build_dataset(root: Path, *, kinds=tuple(CLASSES3), patients_per_kind: int = 3,
                  num_slices: int = 20, matrix: int = 64, seed: int = 0,
                  flags: tuple[str, ...] = ()) -> Path:
    """Phantom studies under ``root/studies`` turned into TFRecords in ``root/tfrecords``
    by data_prep.build_tfrecords, called in-process (``main`` after absl's parse, the flags
    unparsed again), with a fixed salt in ``root/salt.key``. ``flags``: more
    build_tfrecords flags (the defaults here: 64 px, --min_slices=5, one worker)."""
    import absl.logging  # noqa: F401 - defines --verbosity (app.run would import it)

    from data_prep import build_tfrecords, phantom

    root.mkdir(parents=True, exist_ok=True)
    phantom.write_dataset(root / "studies", kinds=tuple(kinds),
                          patients_per_kind=patients_per_kind, num_slices=num_slices,
                          matrix=matrix, seed=seed)
    (root / "salt.key").write_text(SALT)
    out = root / "tfrecords"
    argv = ["data_prep.build_tfrecords", f"--input={root / 'studies'}", f"--output_dir={out}",
            "--image_size=64", "--min_slices=5", "--workers=1",
            f"--salt_file={root / 'salt.key'}", *flags]
    FLAGS = build_tfrecords.FLAGS
    FLAGS.unparse_flags()
    try:
        assert build_tfrecords._parse_flags(argv) == argv[:1]
        assert build_tfrecords.main(argv[:1]) == 0
    finally:
        FLAGS.unparse_flags()
    return out


#: The classes of :func:`write_dataset`'s records.
RECORD_CLASSES = ["non_covid", "covid"]


def png(array) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root: Path, patients: dict, slices: int = 3, size: int = 64,
                  seed: int = 0) -> Path:
    """TFRecords like data_prep's, written directly (no DICOM): ``patients`` = split ->
    patients per class of :data:`RECORD_CLASSES`. COVID patients have a bright lesion.
    Sites: non_covid from "A"; covid from "A" and "B"."""
    import numpy as np

    from covid_keras.core import schema

    rng = np.random.default_rng(seed)
    import tensorflow as tf

    root.mkdir(parents=True, exist_ok=True)
    counts: dict = {}
    yy, xx = np.mgrid[:size, :size]
    for split, per_class in patients.items():
        path = root / f"{split}-00000-of-00001.tfrecord.gz"
        with tf.io.TFRecordWriter(str(path), "GZIP") as w:
            for c, name in enumerate(RECORD_CLASSES):
                for p in range(per_class):
                    key = f"{split[:2]}{c}{p:02d}".ljust(16, "0")
                    site = "A" if c == 0 or p % 2 == 0 else "B"
                    cell = counts.setdefault(split, {}).setdefault(name, {}).setdefault(
                        site, {"patients": 0, "slices": 0, "studies": 1})
                    cell["patients"] += 1
                    for s in range(slices):
                        img = rng.uniform(0, 90, (size, size)).astype(np.uint8)
                        if c == 1:
                            cy, cx = rng.integers(12, size - 12, 2)
                            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 240
                        cell["slices"] += 1
                        w.write(schema.serialize({
                            schema.IMAGE: png(img), schema.HEIGHT: size, schema.WIDTH: size,
                            schema.CHANNELS: 1, schema.MASK: png(np.full((size, size), 255,
                                                                         np.uint8)),
                            schema.LABEL_NAME: name, schema.LABEL_INDEX: c,
                            schema.PATIENT_KEY: key, schema.STUDY_KEY: key[::-1],
                            schema.SERIES_KEY: key, schema.SOP_KEY: f"{key}{s}",
                            schema.SLICE_INDEX: s, schema.SLICE_COUNT: slices,
                            schema.POSITION_MM: float(s), schema.LUNG_FRACTION: 0.5,
                            schema.SITE: site, schema.SPLIT: split}))
    (root / "manifest.json").write_text(json.dumps({"classes": RECORD_CLASSES,
                                                               "counts": counts}))
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """``tiny_dataset(**build_dataset_kwargs)``: the TFRecords folder of
    :func:`build_dataset`, built once per session for each set of arguments (read it, do not
    write into it; copy it to change it)."""
    built: dict = {}

    def get(**kw) -> Path:
        key = json.dumps(kw, sort_keys=True, default=list)
        if key not in built:
            built[key] = build_dataset(tmp_path_factory.mktemp("tiny_dataset"), **kw)
        return built[key]

    return get


@pytest.fixture(scope="session")
def split_dataset(tiny_dataset) -> str:
    """Three classes, 4 patients each, train / val / test 0.5 / 0.25 / 0.25 (the
    pretraining and stage tests' data)."""
    return str(tiny_dataset(kinds=("normal", "covid", "bacterial"), patients_per_kind=4,
                            num_slices=20, matrix=64, seed=1,
                            flags=("--classes=normal,covid,bacterial",
                                   "--split_fractions=0.5,0.25,0.25")))


# ------------------------------------------------------------------ commands
class Commands:
    """Runs ``python -m MODULE ARGS`` as a user would, minus the interpreter start and the
    TensorFlow / Keras import (~15 s a command on these 2 cores): a helper process imports
    them once, and each command is a fork of it that runs the module as ``__main__``
    (runpy: the command's absl flags are defined and parsed in the fork alone, so commands
    whose flags share names, and process-wide TensorFlow settings such as --cpu_devices or
    op determinism, never meet). A command is still a process of its own with its exit
    status, stdout and stderr. What needs a real interpreter start (TensorFlow's start-up
    notices, kill / resume, servers) is started with subprocess instead."""

    def __init__(self, tmp_dir: Path, env: dict | None = None):
        import subprocess
        import sys

        self.tmp_dir, self.count = tmp_dir, 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.helpers import _command_server; "
                                   "_command_server()"],
            cwd=REPO, env=env or dict(user_env(), KERAS_BACKEND="tensorflow"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line

    def run(self, module: str, *args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: int = 900, binary: bool = False):
        """A ``subprocess.CompletedProcess`` of the command: text stdout and stderr, or
        their raw bytes with ``binary``."""
        return self._run({"module": module, "argv": [module, *map(str, args)]}, cwd, env,
                         timeout, binary)

    def run_code(self, code: str, *args: str, cwd: Path | None = None,
                 env: dict | None = None, timeout: int = 900):
        """``python -c CODE ARGS`` the same way."""
        return self._run({"code": code, "argv": ["-c", *map(str, args)]}, cwd, env, timeout)

    def _run(self, request: dict, cwd, env, timeout, binary: bool = False):
        import subprocess

        self.count += 1
        out = self.tmp_dir / f"command{self.count}"
        request = {**request, "cwd": str(cwd or REPO), "env": env or {}, "out": str(out),
                   "timeout": timeout}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the command server ended"
        code = json.loads(reply)["returncode"]
        read = Path.read_bytes if binary else Path.read_text
        return subprocess.CompletedProcess(
            request["argv"], code, read(Path(f"{out}.out")), read(Path(f"{out}.err")))

    def close(self) -> None:
        self.proc.stdin.close()  # the server's loop ends
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


#: Imported once by the command server: the libraries behind the commands (none of them
#: defines absl flags; the command modules do, and are imported in each fork).
PRELOAD = ("tensorflow", "keras", "covid_keras.model.drenet", "covid_keras.model.baselines",
           "covid_keras.io.data", "covid_keras.training.callbacks",
           "covid_keras.evaluation.evaluation", "covid_keras.model.saving",
           "covid_keras.training.recipes")
COMMAND_MODULES = ("covid_keras.train", "covid_keras.evaluate", "covid_keras.export",
                   "covid_keras.predict", "covid_keras.pretrain", "covid_keras.serve",
                   "covid_keras.web", "data_prep.build_tfrecords", "data_prep.phantom")


#: The command server's socket for commands run from within a command (a training's
#: stages, :func:`run_stage_command`), in the environment of every command it runs.
FORK_SOCKET_ENV = "COVID_KERAS_TEST_FORK_SOCKET"
#: ``commands.run(..., env=FORKED_STAGES)``: the trainer runs its pretraining and classifier
#: stages (``python -m covid_keras.pretrain`` / ``covid_keras.train``, a subprocess for a
#: user) as forks of the command server too (covid_keras.training.trainer.run_stage).
FORKED_STAGES = {"COVID_KERAS_STAGE_RUNNER": "tests.helpers:run_stage_command"}


def run_stage_command(cmd: list[str]) -> int:
    """The trainer's stage runner under :data:`FORKED_STAGES` (in a command of
    :class:`Commands`): ``python -m MODULE ARGS`` as another fork of the command server,
    in this process's working directory and environment; its stdout and stderr are copied
    to this process's once it ends. Its exit status."""
    import shutil
    import socket
    import sys
    import tempfile

    assert cmd[1] == "-m", cmd
    tmp = tempfile.mkdtemp(prefix="covid_keras_stage_")
    out = os.path.join(tmp, "stage")
    request = {"module": cmd[2], "argv": [cmd[2], *cmd[3:]], "cwd": os.getcwd(),
               "env": dict(os.environ), "out": out, "timeout": 900}
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(os.environ[FORK_SOCKET_ENV])
            s.sendall((json.dumps(request) + "\n").encode())
            with s.makefile("r") as f:
                reply = f.readline()
        assert reply, "the command server ended"
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, suffix in ((1, ".out"), (2, ".err")):
            os.write(fd, Path(out + suffix).read_bytes())
        return json.loads(reply)["returncode"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_forked(request: dict, closed: list) -> int:
    """Forks the command of ``request`` (the child runs it and exits with its status;
    ``closed``: the server's sockets, which it closes); the child's pid."""
    import runpy
    import signal
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1  # the command
    try:
        for sock in closed:
            sock.close()
        signal.alarm(request["timeout"])
        os.chdir(request["cwd"])
        os.environ.update(request["env"])
        for fd, suffix in ((1, ".out"), (2, ".err")):
            f = os.open(request["out"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = list(request["argv"])
        try:
            if "code" in request:
                exec(compile(request["code"], "<string>", "exec"),  # noqa: S102
                     {"__name__": "__main__"})
            else:
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (
                0 if exc.code is None else 1)
            if exc.code not in (None, 0) and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - printed as python -m would
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _command_server() -> None:
    """The loop of :class:`Commands`' helper process: one JSON request a line on stdin
    (a module to run as ``__main__``, or code as ``python -c`` runs it), one
    ``{"returncode": N}`` a line on stdout once it ends; the same on a connection to its
    socket ($COVID_KERAS_TEST_FORK_SOCKET, one request and its reply a connection) for
    commands that a running command starts (:func:`run_stage_command`). Every command is
    a fork of this process."""
    import importlib
    import select
    import shutil
    import socket
    import sys
    import tempfile

    from covid_keras.core import cli

    cli.quiet_tensorflow()  # as the commands do before their own import
    for name in PRELOAD:
        importlib.import_module(name)
    loaded = [m for m in COMMAND_MODULES if m in sys.modules]
    assert not loaded, f"a preloaded library imported a command module: {loaded}"
    sock_dir = tempfile.mkdtemp(prefix="covid_keras_forks_")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.path.join(sock_dir, "socket"))
    listener.listen()
    os.environ[FORK_SOCKET_ENV] = listener.getsockname()
    reply = sys.stdout
    print("ready", file=reply, flush=True)

    def answer_stdin(code: int) -> None:
        print(json.dumps({"returncode": code}), file=reply, flush=True)

    def answer(conn):
        def send(code: int) -> None:
            conn.sendall((json.dumps({"returncode": code}) + "\n").encode())
            conn.close()
        return send

    running: dict = {}  # pidfd -> (pid, how to answer)
    conns: list = []
    pending, stdin_open = b"", True
    try:
        while stdin_open or running:
            ready, _, _ = select.select(
                ([0] if stdin_open else []) + [listener] + list(running), [], [])
            for fd in ready:
                if fd == 0:
                    chunk = os.read(0, 1 << 16)
                    stdin_open = bool(chunk)
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        pid = _run_forked(json.loads(line), [listener, *conns])
                        running[os.pidfd_open(pid)] = (pid, answer_stdin)
                elif fd is listener:
                    conn, _ = listener.accept()
                    with conn.makefile("r") as f:
                        request = json.loads(f.readline())
                    conns.append(conn)
                    pid = _run_forked(request, [listener, *conns])
                    running[os.pidfd_open(pid)] = (pid, answer(conn))
                else:
                    pid, send = running.pop(fd)
                    os.close(fd)
                    _, status = os.waitpid(pid, 0)
                    send(os.waitstatus_to_exitcode(status))
                    conns = [c for c in conns if c.fileno() != -1]
    finally:
        listener.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


_SHARED: list[Commands] = []


def shared_commands() -> Commands:
    """The :class:`Commands` of this test process (as a user runs them: :func:`user_env`,
    under TensorFlow), started on first use and closed at exit: for module-level helpers
    that have no fixture at hand; tests take the ``commands`` fixture."""
    if not _SHARED:
        import atexit
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="covid_keras_commands_"))
        _SHARED.append(Commands(tmp))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        atexit.register(_SHARED[0].close)
    return _SHARED[0]


@pytest.fixture(scope="session")
def commands():
    """:func:`shared_commands`."""
    return shared_commands()


# ------------------------------------------------------------------ DICOM series, data_prep
#: data_prep's tests' phantom series: 64 x 64, a 35 cm field of view as a real chest CT,
#: 20 slices over 30 cm.
MATRIX = 64
SPACING = 350.0 / MATRIX
SERIES_SLICES = 20
#: The salt of the studies the data_prep tests scan in-process (bytes, as ScanConfig's).
DICOM_SALT = b"s" * 32


def run_cli(*args: str, check: bool = True):
    """data_prep's command line: ``python -m data_prep.build_tfrecords ARGS``
    (:func:`shared_commands`: a process of its own without the interpreter start)."""
    proc = shared_commands().run("data_prep.build_tfrecords", *args,
                                 env={"TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def series(out: Path, **kw) -> list[Path]:
    """A phantom DICOM series (data_prep.phantom.write_series) of :data:`SERIES_SLICES`
    slices of :data:`MATRIX` pixels by default."""
    from data_prep import phantom

    kw.setdefault("num_slices", SERIES_SLICES)
    kw.setdefault("matrix", MATRIX)
    kw.setdefault("pixel_spacing_mm", SPACING)
    kw.setdefault("slice_thickness_mm", 300.0 / kw["num_slices"])
    return phantom.write_series(out, **kw)


def read_records(out_dir: Path) -> list[dict]:
    """Every record of the TFRecord shards in ``out_dir``, parsed (schema.parse)."""
    import glob

    import tensorflow as tf

    from covid_keras.core import schema

    recs = []
    for f in sorted(glob.glob(str(out_dir / "*.tfrecord.gz"))):
        for raw in tf.data.TFRecordDataset(f, compression_type="GZIP"):
            recs.append(schema.parse(raw.numpy()))
    return recs


def failures(out_dir: Path) -> list[dict]:
    """The rows of data_prep's failures.csv in ``out_dir``."""
    import csv

    with open(out_dir / "failures.csv", newline="") as f:
        return list(csv.DictReader(f))


def study_task(path: Path, origin: str = "line00002", **kw):
    """data_prep's StudyTask of the study folder ``path`` (label covid)."""
    from data_prep.study import StudyTask

    return StudyTask(study_id=str(path.name), path=str(path), label="covid", origin=origin,
                     **kw)


@contextlib.contextmanager
def lenient_pydicom():
    """Lets the test write (and re-read) invalid values; the code under test runs with
    pydicom's defaults."""
    import pydicom

    s = pydicom.config.settings
    old = s.reading_validation_mode, s.writing_validation_mode
    s.reading_validation_mode = s.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        s.reading_validation_mode, s.writing_validation_mode = old


def edit_dicom(paths: list[Path], fn) -> None:
    """``fn(dataset, i)`` on each DICOM file of ``paths`` (sorted), saved in place."""
    import pydicom

    with lenient_pydicom():
        for i, p in enumerate(sorted(paths)):
            ds = pydicom.dcmread(p)
            fn(ds, i)
            ds.save_as(p, enforce_file_format=True)


# ------------------------------------------------------------------ bad inputs
#: The bad-input and PHI tests' series length (test_bad_inputs, test_phi, test_target_batch,
#: test_workers)
SHORT_SERIES_SLICES = 12


def short_series(out: Path, **kw) -> list[Path]:
    """:func:`series` of :data:`SHORT_SERIES_SLICES` slices by default."""
    kw.setdefault("num_slices", SHORT_SERIES_SLICES)
    return series(out, **kw)


def scan_cfg(**limit_kw) -> ScanConfig:
    """data_prep's scan settings: :data:`DICOM_SALT`, 5 slices at least, the given limits."""
    from data_prep.limits import Limits
    from data_prep.study import ScanConfig

    return ScanConfig(salt=DICOM_SALT, min_slices=5, limits=Limits(**limit_kw))


def write_png_bomb(path: Path, side: int = 20000) -> Path:
    """A ~0.4 MB 8-bit grey PNG that decodes to side x side pixels (all zero)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    comp = zlib.compressobj(9)
    rows_per_block = 500
    block = b"\x00" * ((side + 1) * rows_per_block)  # filter byte 0 + a zero row
    idat = b"".join(comp.compress(block) for _ in range(side // rows_per_block)) + comp.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side,
                                                                           8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def undecodable(paths: list[Path]) -> None:
    """Rewrites the files as MPEG-2 encapsulated pixel data that no decoder here reads."""
    import pydicom

    def to_mpeg2(ds, i):
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
        ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
        ds["PixelData"].VR = "OB"
    edit_dicom(paths, to_mpeg2)


# ------------------------------------------------------------------ PHI planting
# (test_phi, test_target_batch): values planted in every DICOM tag, name and manifest cell
# that can hold them, then searched for in everything a run writes and prints
NAME_FAMILY, NAME_GIVEN = "Zqxvonk", "Wylbertha"
PATIENT_ID = "PHIID8842913"
DATE = "19230817"
UID_DIGITS = "9412837465"  # inside every planted (valid) UID
BAD_UID_WORD = "PHIUIDQXZ"  # inside planted invalid UIDs (pydicom warns, quoting them)
TEXT = "Qxzlandia"  # descriptions, institution, comments
PLANTED = (NAME_FAMILY, NAME_GIVEN, PATIENT_ID, DATE, "1923-08-17", UID_DIGITS, BAD_UID_WORD,
           TEXT, "PHIMODQXZ")

TEXT_TAGS = {
    "PatientName": f"{NAME_FAMILY}^{NAME_GIVEN}",
    "PatientID": PATIENT_ID,
    "OtherPatientIDs": PATIENT_ID,
    "PatientBirthDate": DATE,
    "StudyDate": DATE, "SeriesDate": DATE, "AcquisitionDate": DATE, "ContentDate": DATE,
    "AccessionNumber": PATIENT_ID[:16],
    "StudyID": PATIENT_ID[:16],
    "StudyDescription": f"{TEXT} {NAME_FAMILY}",
    "SeriesDescription": f"{NAME_FAMILY} {DATE} {TEXT}",
    "ProtocolName": f"{TEXT} protocol",
    "InstitutionName": f"{TEXT} Hospital",
    "InstitutionAddress": f"1 {TEXT} Road",
    "ReferringPhysicianName": f"{NAME_FAMILY}^Doctor",
    "PerformingPhysicianName": f"{NAME_FAMILY}^Doctor",
    "OperatorsName": f"{NAME_FAMILY}^Operator",
    "StationName": TEXT,
    "DeviceSerialNumber": PATIENT_ID,
    "PatientAddress": f"2 {TEXT} Street",
    "PatientComments": f"{NAME_GIVEN} {PATIENT_ID}",
    "ImageComments": f"{NAME_GIVEN} {DATE}",
    "AdditionalPatientHistory": f"{NAME_GIVEN}",
    "RequestingPhysician": f"{NAME_FAMILY}^Req",
    # numbers can hold a date too
    "SeriesNumber": int(DATE), "AcquisitionNumber": int(DATE), "SliceLocation": DATE,
}


def plant(paths: list[Path], *, invalid_uids: bool = False, **overrides: str) -> None:
    """Writes the planted values into every file of a series (UIDs: one study / series /
    frame of reference, one SOP per file)."""
    import pydicom

    s = pydicom.config.settings
    old = s.reading_validation_mode, s.writing_validation_mode
    s.reading_validation_mode = s.writing_validation_mode = pydicom.config.IGNORE
    root = f"1.2.826.0.1.3680043.{UID_DIGITS}"
    tag = "".join(str(ord(c) % 10) for c in str(paths[0].parent.name))[:8]
    try:
        for i, p in enumerate(sorted(paths)):
            ds = pydicom.dcmread(p)
            for kw, value in {**TEXT_TAGS, **overrides}.items():
                setattr(ds, kw, value)
            if invalid_uids:
                study, series = f"1.2.{BAD_UID_WORD}.1", f"1.2.{BAD_UID_WORD}.2.{tag}"
                sop, frame = f"1.2.{BAD_UID_WORD}.3.{tag}.{i}", f"1.2.{BAD_UID_WORD}.4"
            else:
                study, series = f"{root}.1.{tag}", f"{root}.2.{tag}"
                sop, frame = f"{root}.3.{tag}.{i}", f"{root}.4.{tag}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.FrameOfReferenceUID = frame
            ds.save_as(p, enforce_file_format=True)
    finally:
        s.reading_validation_mode, s.writing_validation_mode = old


def phi_series(folder: Path, seed: int, kind: str = "covid") -> list[Path]:
    """A :func:`short_series` whose files are named after the patient too (plant the tags
    with :func:`plant`)."""
    paths = short_series(folder, kind=kind, seed=seed)
    renamed = []
    for i, p in enumerate(sorted(paths)):
        q = p.with_name(f"{NAME_FAMILY}_{PATIENT_ID}_{DATE}_{i:03d}.dcm")
        p.rename(q)
        renamed.append(q)
    return renamed


def run_cli_bytes(*args: str, timeout: int = 300):
    """``python -m data_prep.build_tfrecords ARGS`` with its raw stdout and stderr bytes, as
    a fork of the command server (no interpreter start; its workers are still spawned)."""
    return shared_commands().run("data_prep.build_tfrecords", *args, cwd=REPO,
                                 env={"TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=timeout,
                                 binary=True)


def downstream_bytes(out: Path, proc) -> dict[str, bytes]:
    """Every output file (gzip shards decompressed) and what the run printed."""
    import gzip

    blobs = {"stdout": proc.stdout, "stderr": proc.stderr}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            blobs[str(p.relative_to(out))] = gzip.decompress(data) if p.suffix == ".gz" else data
    return blobs


def assert_nothing_planted(blobs: dict[str, bytes], planted=PLANTED) -> None:
    for where, data in blobs.items():
        low = data.lower()
        for secret in planted:
            for form in {secret, secret.replace("^", " ")}:
                assert form.lower().encode() not in low, (secret, where)


# ------------------------------------------------------------------ the page
# (test_web, test_serve_page, test_web_auth)
WEB_SALT = b"0123456789abcdef" * 4  # the page's and predict's salt
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
DICOM_PREAMBLE = b"\0" * 128 + b"DICM"


class FakeModel:
    """Stands where predict's model stands; these tests never reach it."""

    info = {"class_names": CLASSES3, "input_size": 64, "windows": [], "warnings": []}
    source = {"kind": "fake"}

    def predict_study(self, images):
        raise AssertionError("a refused upload reached the model")

    gradcam = predict_study


def multipart(files: list[tuple[str, bytes]]) -> dict:
    return {"files": [("files", (name, data, "application/octet-stream"))
                      for name, data in files]}


def zip_bytes(entries: list[tuple[str, bytes]], links: tuple = ()) -> bytes:
    import io
    import stat
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:  # a regular file's mode, as zip tools write it
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
        for name, target in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return buf.getvalue()


def study_files(folder: Path) -> list[tuple[str, bytes]]:
    return [(f"{folder.name}/{f.name}", f.read_bytes()) for f in sorted(folder.iterdir())]


def post(app, files, **kw) -> httpx.Response:
    """POST /api/predict to the ASGI app in-process (httpx)."""
    import asyncio

    import httpx

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            return await client.post("/api/predict", timeout=300, **kw,
                                     **(multipart(files) if files is not None else {}))

    return asyncio.run(go())


def get(app, path) -> httpx.Response:
    import asyncio

    import httpx

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            return await client.get(path)

    return asyncio.run(go())


class LiveServer:
    """The app on uvicorn in a thread, on a free 127.0.0.1 port."""

    def __init__(self, app):
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(
            app, access_log=False, log_level="warning", lifespan="off", ws="none",
            log_config=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def chromium_or_skip():
    """Skips, saying why, where Debian's chromium or playwright is absent."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install .[dev]; its browsers are not "
                    "needed: Debian's chromium is used)")
