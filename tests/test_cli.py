"""covid_keras.core.cli (flagfiles, one-line errors) and covid_keras.core.files (atomic,
strict JSON)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from covid_keras.core import cli, files

REPO = Path(__file__).resolve().parents[1]


def test_nested_flagfiles_resolve_relative_to_the_including_file(tmp_path, monkeypatch):
    conf = tmp_path / "configs"
    (conf / "data").mkdir(parents=True)
    (conf / "base.cfg").write_text("# shared\n--epochs=120\n--batch_size=4\n")
    (conf / "data" / "more.cfg").write_text("--seed=3\n")
    (conf / "exp.cfg").write_text("--flagfile=base.cfg\n  --epochs=12  \n// comment\n"
                                  "--flagfile=data/more.cfg\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the configs' folder
    argv = cli.expand_flagfiles(["prog", "--data_dir=x", f"--flagfile={conf / 'exp.cfg'}",
                                 "--batch_size=8"])
    assert argv == ["prog", "--data_dir=x", "--epochs=120", "--batch_size=4", "--epochs=12",
                    "--seed=3", "--batch_size=8"]
    # the space-separated form too
    assert cli.expand_flagfiles(["prog", "--flagfile", str(conf / "base.cfg")])[1:] == [
        "--epochs=120", "--batch_size=4"]


def test_old_style_flagfiles_relative_to_the_working_directory_still_work(tmp_path,
                                                                         monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.cfg").write_text("--epochs=5\n")
    (tmp_path / "configs" / "exp.cfg").write_text("--flagfile=configs/base.cfg\n--seed=1\n")
    monkeypatch.chdir(tmp_path)
    assert cli.expand_flagfiles(["p", "--flagfile=configs/exp.cfg"])[1:] == [
        "--epochs=5", "--seed=1"]


def test_missing_and_cyclic_flagfiles_are_clear_errors(tmp_path):
    (tmp_path / "a.cfg").write_text("--flagfile=nope.cfg\n")
    with pytest.raises(ValueError, match=r"nope.cfg \(included from .*a.cfg\)"):
        cli.expand_flagfiles(["p", f"--flagfile={tmp_path / 'a.cfg'}"])
    (tmp_path / "b.cfg").write_text("--flagfile=c.cfg\n")
    (tmp_path / "c.cfg").write_text("--flagfile=b.cfg\n")
    with pytest.raises(ValueError, match="includes itself"):
        cli.expand_flagfiles(["p", f"--flagfile={tmp_path / 'b.cfg'}"])


def test_every_config_resolves_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in sorted((REPO / "configs").glob("*.cfg")):
        argv = cli.expand_flagfiles(["p", f"--flagfile={path}"])
        # base.cfg was included (a pretraining flagfile stands alone: its own --backbone)
        key = "--backbone=" if path.name.startswith("pretrain_") else "--model="
        assert any(a.startswith(key) for a in argv), path
        for arg in argv:  # a flagfile named inside a flagfile is found from anywhere
            if arg.startswith("--pretrain_flagfile="):
                assert os.path.isfile(arg.split("=", 1)[1]), (path, arg)


def test_a_pretrain_flagfile_is_read_beside_the_flagfile_that_names_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.cfg").write_text("--pretrain_flagfile=pre.cfg\n--x=pre.cfg\n")
    argv = cli.expand_flagfiles(["p", f"--flagfile={tmp_path / 'sub' / 'a.cfg'}",
                                 "--pretrain_flagfile=own.cfg"])
    assert argv == ["p", f"--pretrain_flagfile={tmp_path / 'sub' / 'pre.cfg'}",
                    "--x=pre.cfg", "--pretrain_flagfile=own.cfg"]


def test_error_line_is_one_line():
    assert cli.error_line(ValueError("bad\nthing  here")) == "bad thing here"
    line = cli.error_line(RuntimeError("boom"))
    assert line.startswith("RuntimeError: boom") and "--verbosity=1" in line
    assert "\n" not in cli.error_line(FileNotFoundError(2, "No such file", "/x/y"))


def test_wants_debug():
    assert cli.wants_debug(["p", "--verbosity=1"]) and cli.wants_debug(["p", "-v", "2"])
    assert not cli.wants_debug(["p", "--verbosity=0"]) and not cli.wants_debug(["p"])


def test_a_stray_argument_and_a_bad_flag_are_one_line(tmp_path):
    code = ("from absl import flags\n"
            "flags.DEFINE_integer('n', 1, 'n')\n"
            "from covid_keras.core import cli\n"
            "def main(argv):\n"
            "    raise ValueError('n must be even. Received: 3')\n"
            "cli.run(main, program='prog')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args, message in [(["x"], "prog: error: unexpected argument(s) 'x'"),
                          ([], "prog: error: n must be even. Received: 3")]:
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, env=env, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(message), proc.stderr
    proc = subprocess.run([sys.executable, "-c", code, "--verbosity=1"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_help_exits_0_and_flag_errors_are_one_line(tmp_path):
    code = ("from absl import flags\n"
            "flags.DEFINE_integer('n', 1, 'how many')\n"
            "flags.DEFINE_string('out', None, 'where')\n"
            "from covid_keras.core import cli\n"
            "def main(argv):\n"
            "    if flags.FLAGS.out == 'boom':\n"
            "        raise ValueError('boom')\n"
            "    print('ran', flags.FLAGS.out)\n"
            "cli.run(main, required=['out'], program='prog')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def call(*args):
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, env=env, timeout=60)

    for flag in ("--help", "-h", "--helpfull"):
        proc = call(flag)
        assert proc.returncode == 0 and "how many" in proc.stdout, (flag, proc.stderr)
        assert "ran" not in proc.stdout
    for args, message in [((), "prog: error: --out is required (see --help)"),
                          (("--out=",), "prog: error: --out is required (see --help)"),
                          (("--out=x", "--m=2"), "prog: error: Unknown command line flag 'm'"),
                          (("--out=x", "--n=two"), "prog: error: flag --n=two:"),
                          # an error beside a help flag is still an error (exit 1)
                          (("--n=two", "--help"), "prog: error: flag --n=two:"),
                          (("--out=boom", "--help=false"), "prog: error: boom"),
                          (("--out=x", "--", "--help"), "prog: error: unexpected argument")]:
        proc = call(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, (args, proc.stderr)
        assert lines[0].startswith(message), (args, proc.stderr)
    proc = call("--out=x")
    assert proc.returncode == 0 and proc.stdout.strip() == "ran x", proc.stderr


CLIS = ("covid_keras.train", "covid_keras.evaluate", "covid_keras.export",
        "covid_keras.predict", "covid_keras.serve", "covid_keras.web", "covid_keras.pretrain",
        "data_prep.build_tfrecords", "data_prep.phantom", "data_prep.study_names")


@pytest.mark.parametrize("module", CLIS)
def test_every_command_help_exits_0_and_reads_as_written(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    usage, _, flag_help = proc.stdout.partition("\nflags:\n")
    assert "python -m " in usage and "  --" in flag_help, proc.stdout[:500]
    assert "%%" not in proc.stdout  # a help string is printed as written, not %-formatted
    # a docstring's shell continuation stays a backslash and a new line: no two lines of a
    # command run together ("... --a=1         --b=2")
    assert not re.search(r"\S {4,}--\w", usage), usage


def test_strict_json_has_null_never_nan():
    text = files.dumps({"a": float("nan"), "b": [np.float32(1.5), np.inf, np.int64(3)],
                        "c": np.array([0.5, np.nan]), "d": (True, None)})
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert data == {"a": None, "b": [1.5, None, 3], "c": [0.5, None], "d": [True, None]}
    assert not math.isnan(data["b"][0])


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "m.json"
    files.write_json(str(path), {"x": 1})
    files.write_json(str(path), {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_remote_paths_go_through_tf_gfile():
    pytest.importorskip("tensorflow")
    path = "ram://covid_keras_test/run/metrics.json"
    files.makedirs("ram://covid_keras_test/run")
    files.write_json(path, {"auc": float("nan")})
    assert files.exists(path)
    assert json.loads(files.read_text(path)) == {"auc": None}


LOADED = ("import runpy, sys, time\n"
          "t0 = time.perf_counter()\n"
          "sys.argv = sys.argv[1:]\n"
          "try:\n"
          "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
          "finally:\n"
          "    print('tensorflow' in sys.modules, 'keras' in sys.modules,\n"
          "          round(time.perf_counter() - t0, 3))\n")


@pytest.mark.parametrize("argv,message", [
    (["covid_keras.evaluate", "--run_dir=runs/nope"], "runs/nope is not a run folder"),
    (["covid_keras.evaluate", "--compare", "runs/a", "runs/b", "--output_dir=o"],
     "--compare runs/a: no such folder"),
    (["covid_keras.export", "--run_dir=runs/nope", "--export_base=exports"],
     "--run_dir runs/nope is not a folder"),
    (["covid_keras.predict", "--study=studies/nope", "--model=exports/m", "--output_dir=o"],
     "--study studies/nope: no such file or folder"),
    (["covid_keras.predict", "--study=.", "--model=exports/m", "--output_dir=o"],
     "--model exports/m: no such file or folder"),
])
def test_a_missing_path_is_reported_before_tensorflow_loads(tmp_path, argv, message):
    """A mistyped path: one line, and neither TensorFlow nor Keras imported (it took 5-14 s
    to say so; evaluate --run_dir=runs/nope 12.9 s)."""
    proc = subprocess.run([sys.executable, "-c", LOADED, *argv], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{argv[0]}: error: "), proc.stderr
    assert message in lines[0], lines[0]
    # no TF, no Keras: what made it slow (the speed itself is not timed in a test)
    assert proc.stdout.split()[:2] == ["False", "False"], proc.stdout
