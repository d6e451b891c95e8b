"""Shared by the bench/ scripts (run as files: ``python bench/<name>.py``)."""

from __future__ import annotations

import argparse
import json
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
