"""Where a file came from, written once for data_prep, train and export: the code's git sha
and the package versions (no TensorFlow import; cheap)."""

from __future__ import annotations

import os
import platform
import subprocess

#: Every package whose version can change what the project writes or computes.
PACKAGES = ("covid_keras", "keras", "tensorflow", "tensorflow-cpu", "jax", "numpy",
            "scikit-learn", "tensorboard", "opencv-python-headless", "pydicom", "pylibjpeg",
            "python-gdcm", "apache-beam")


def git_sha() -> str:
    """HEAD of the checkout this code runs from (``-dirty`` with local changes to tracked
    files), or ``unknown`` (an installed package, no git)."""
    # covid_keras/core/provenance.py -> the checkout
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{"python": ..., <installed package>: version}`` (packages not installed left out)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def module_flags(module_name: str, exclude: tuple[str, ...] = ()) -> dict:
    """The absl flags ``module_name`` defines and their values (what a run records: the
    program's own flags, never absl's or TensorFlow's), less ``exclude``."""
    import sys

    from absl import flags

    return {f.name: f.value for f in flags.FLAGS.get_flags_for_module(sys.modules[module_name])
            if f.name not in exclude}
