"""Every flagfile: starts with its command, has no commented-out flags, and parses with
the program it is for (unknown flags or bad values fail)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = sorted((REPO / "configs").glob("pretrain_*.cfg"))
TRAIN = sorted(set((REPO / "configs").glob("*.cfg")) - set(PRETRAIN))
DATA = sorted((REPO / "configs" / "data").glob("*.cfg"))


@pytest.mark.parametrize("path", TRAIN + PRETRAIN + DATA, ids=lambda p: p.name)
def test_flagfile_header_and_no_commented_out_flags(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# python -m ") or lines[0].startswith("# make demo:") or \
        lines[0].startswith("# Shared"), lines[0]
    for line in lines:
        stripped = line.strip()
        assert not stripped.startswith("#--") and not stripped.startswith("# --"), line
        assert not stripped or stripped.startswith("#") or stripped.startswith("--"), line


PARSE = """
import sys
from absl import flags
import {module} as m
getattr(m, "define_flags", lambda: None)()
from covid_keras.core import cli
from covid_keras.training import recipes
bad = []
for path in sys.argv[1:]:
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(cli.expand_flagfiles(["prog", "--flagfile=" + path]) + {extra})
        for stage in getattr(flags.FLAGS, "stages", None) or []:
            recipes.Stage.parse(stage)
    except Exception as exc:
        bad.append(f"{{path}}: {{exc}}")
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""


@pytest.mark.parametrize("module,paths,extra", [
    ("covid_keras.train", TRAIN, ["--data_dir=d", "--run_dir=r"]),
    ("covid_keras.pretrain", PRETRAIN, ["--data_dir=d", "--run_dir=r"]),
    ("data_prep.build_tfrecords", DATA, ["--input=i"]),
])
def test_flagfiles_parse(module, paths, extra, commands):
    """In a process of its own (the command's absl flags, defined at its import), forked
    from helpers.Commands' (no interpreter start)."""
    code = PARSE.format(module=module, extra=repr(extra))
    proc = commands.run_code(code, *map(str, paths), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
