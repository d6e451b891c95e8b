"""Tiny run folders and exports shared by test_export, test_serve and test_predict; a
user's environment for command tests, and the check that a command kept TensorFlow quiet."""

from __future__ import annotations

import json
import os
from pathlib import Path

CLASSES3 = ["normal", "covid", "bacterial"]
CLASSES2 = ["normal", "covid"]


def make_run(run_dir: Path, kind: str = "drenet", decision: dict | None = None,
             data_dir: Path | None = None, seed: int = 0, input_norm: str = "none") -> Path:
    """A run folder as the trainer leaves it (best.keras with class names, run_info.json,
    optionally decision.json) around an untrained tiny 64 px model (``input_norm``: the
    models' first layer, see covid_keras.layers.intensity)."""
    import keras

    from covid_keras import build_classifier, build_drenet, files
    from covid_keras.saving import save_model

    keras.utils.set_random_seed(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if kind == "classifier":
        model = build_classifier("tiny", 2, input_size=64, input_norm=input_norm)
        classes = CLASSES2
    else:
        model = build_drenet(3, input_size=64, backbone="tiny",
                             variant="code" if kind == "drenet_code" else "paper",
                             input_norm=input_norm)
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
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        if not self.proc.stdout.closed:
            self.proc.stdout.close()
        if not self.err.closed:
            self.err.close()

    def __exit__(self, *exc) -> None:
        self.stop()
