"""Shared by the bench/ scripts (run as files: ``python bench/<name>.py``)."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Callable


def emit_result(res: dict, print_table: Callable[[dict], None],
                output_json: str | None) -> None:
    """The table for people, one ``RESULT {json}`` line for tools, and the JSON file."""
    print_table(res)
    line = json.dumps(res, sort_keys=True)
    print("RESULT " + line)
    if output_json:
        Path(output_json).write_text(line + "\n")


def parser(doc: str) -> argparse.ArgumentParser:
    """A bench script's command line, its help led by the docstring's first paragraph."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


#: How a bench script's child process hands its figures back: one line, this prefix, JSON.
CHILD = "CHILD "


def print_child(result: dict) -> None:
    """The child's side: its figures on one ``CHILD {json}`` line."""
    print(CHILD + json.dumps(result), flush=True)


def child_result(cmd: list[str], what: str, cwd: Path | None = None) -> dict:
    """Runs the child process ``cmd`` and returns the figures of its ``CHILD {json}``
    line; without one, a RuntimeError naming ``what``, its exit status and stderr's end."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD):
            return json.loads(line[len(CHILD):])
    raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
