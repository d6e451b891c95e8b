"""Which study is ``line00017.3fa9c2d1e0``? The name -> path table, on the terminal only.

    python -m data_prep.study_names --input=manifest.csv --salt_file=tfrecords/x/patient_salt.key

failures.csv, the log and manifest.json name studies pseudonymously (see
:mod:`data_prep.errors`). Whoever holds the input and the salt can map a name back: this
prints ``<name><TAB><path>`` per study (paths escaped to printable ASCII) to stdout and writes
no file. Pass the same --manifest_columns / --manifest_encoding as the run.
"""

from __future__ import annotations

import sys

from absl import flags

from data_prep import inputs, redact

FLAGS = flags.FLAGS

flags.DEFINE_string("input", None, "The run's --input (manifest CSV or folder).")
flags.DEFINE_string("salt_file", None, "The run's salt file (default of the run: "
                    "<output_dir>/patient_salt.key).")
flags.DEFINE_list("manifest_columns", [], "As the run's.")
flags.DEFINE_string("manifest_encoding", "auto", "As the run's.")


def table(path: str, salt: bytes, columns: dict[str, str] | None = None,
          encoding: str = "auto") -> list[tuple[str, str]]:
    """(name, escaped path) of every study of the input, in input order."""
    tasks = inputs.read_input(path, columns=columns, encoding=encoding)
    return [(redact.study_name(t.origin, t.study_id, salt), redact.escaped(t.path or t.study_id))
            for t in tasks]


def main(argv: list[str]) -> int:
    with open(FLAGS.salt_file, "rb") as f:
        salt = f.read().strip()
    for name, path in table(FLAGS.input, salt,
                            inputs.parse_mapping(FLAGS.manifest_columns, "--manifest_columns"),
                            FLAGS.manifest_encoding):
        sys.stdout.write(f"{name}\t{path}\n")
    return 0


if __name__ == "__main__":
    from covid_keras.core import cli

    # cli.run: --help exits 0, a missing flag or path is a one-line error
    cli.run(main, required=["input", "salt_file"], program="data_prep.study_names")
