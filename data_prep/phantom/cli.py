"""``python -m data_prep.phantom``: the command line (absl flags)."""

from __future__ import annotations

import csv
from pathlib import Path

from data_prep.phantom.anatomy import KINDS
from data_prep.phantom.dicom import write_dataset

# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _define_flags() -> None:
    from absl import flags

    # the flags belong to the module that runs main() (python -m: __main__), as when the
    # generator was one module: absl's --help lists the main module's flags
    flags.disclaim_key_flags()
    if "output_dir" in flags.FLAGS:  # already defined (e.g. main() called twice)
        return
    flags.DEFINE_string("output_dir", None, "Folder to write the synthetic dataset into.")
    flags.DEFINE_list("kinds", ["normal", "covid", "bacterial"],
                      f"Comma-separated phantom kinds, from {', '.join(KINDS)}.")
    flags.DEFINE_integer("patients_per_kind", 4, "Synthetic patients per kind.")
    flags.DEFINE_integer("num_slices", 40, "Axial slices per series (neck to upper abdomen).")
    flags.DEFINE_integer("matrix", 128, "Rows = columns of each axial slice.")
    flags.DEFINE_integer("seed", 0, "Random seed; the same flags give bit-identical files.")
    flags.DEFINE_enum("layout", "folders", ["folders", "manifest"],
                      "folders: <dir>/<kind>/<study>/; manifest: <dir>/studies/<study>/ plus "
                      "<dir>/manifest.csv.")


def _main(argv: list[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    fl = flags.FLAGS
    result = write_dataset(fl.output_dir, kinds=tuple(fl.kinds),
                           patients_per_kind=fl.patients_per_kind, num_slices=fl.num_slices,
                           matrix=fl.matrix, seed=fl.seed, layout=fl.layout)
    root = Path(fl.output_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    studies = sorted({p.parent for p in files if p.name != "manifest.csv"})
    print(f"SYNTHETIC phantom dataset (not real patients) written to {root}")
    print(f"  {len(studies)} studies, {len(files)} files, layout={fl.layout}, "
          f"{fl.num_slices} slices of {fl.matrix}x{fl.matrix}, seed={fl.seed}")
    if fl.layout == "manifest":
        with open(result, newline="", encoding="utf-8") as f:
            labels = [row["label"] for row in csv.DictReader(f)]
    else:
        labels = [s.parent.name for s in studies]
    for kind in fl.kinds:
        n = labels.count(kind)
        print(f"  {kind}: {n} studies")
    if fl.layout == "manifest":
        print(f"  manifest: {result}")


def main() -> None:
    from covid_keras.core import cli

    _define_flags()
    # cli.run: --help exits 0, a missing --output_dir is a one-line error
    cli.run(_main, required=["output_dir"], program="data_prep.phantom")
