"""What every command-line entry point shares (train, evaluate, export, predict, serve).

* Quiet TensorFlow: its C++ notices (oneDNN, CPU features, the absl pre-init line, an
  E-level oneDNN fallback note in every CPU run) are off unless ``--verbosity`` >= 1 or
  ``TF_CPP_MIN_LOG_LEVEL`` is set by the user.
* Flagfiles: a nested ``--flagfile=`` resolves relative to the file that includes it
  (then, for older flagfiles, to the working directory), so configs work from any
  directory. A missing file is a one-line error naming the file that includes it.
* One-line errors: an exception in ``main`` prints ``<program>: error: <message>`` and
  exits 1; ``--verbosity=1`` shows the traceback instead. An unknown flag, a bad flag
  value, a stray positional argument and a missing required flag are errors of the same
  form.
* ``-h`` is ``--help``, and a help request exits 0 (absl's own exits 1).

    if __name__ == "__main__":
        cli.run(main, required=["data_dir", "run_dir"])
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Sequence

#: absl's help flags (``-h`` is taken as ``--help``).
HELP_FLAGS = ("--help", "--helpshort", "--helpfull", "--helpxml", "-?")

#: Exceptions a user causes (bad paths, bad values, a finished run...): the message alone.
USER_ERRORS = (ValueError, OSError, KeyError, LookupError)


def wants_debug(argv: Sequence[str]) -> bool:
    """``--verbosity=N`` / ``-v N`` with N >= 1 on the command line."""
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith(("--verbosity=", "-v=")):
            value = arg.split("=", 1)[1]
        elif arg in ("--verbosity", "-v") and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None:
            try:
                return int(value) >= 1
            except ValueError:
                return False
    return False


def quiet_tensorflow(debug: bool = False) -> None:
    """Environment defaults that silence TensorFlow's C++ logs (before it is imported)."""
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


@contextlib.contextmanager
def quiet_stderr(enabled: bool = True):
    """Sends file descriptor 2 to /dev/null (C++ lines printed at import, before logging is
    configured); Python exceptions still propagate and print once it is restored."""
    if not enabled or "tensorflow" in sys.modules:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def _quiet_import(debug: bool):
    quiet_tensorflow(debug)
    with quiet_stderr(not debug and os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "3"):
        yield


def import_keras_quietly(debug: bool = False):
    """``import keras`` (and with it TensorFlow on the TF backend) without its start-up
    notices on stderr. Returns the keras module."""
    with _quiet_import(debug):
        import keras
        if keras.backend.backend() == "tensorflow":
            import tensorflow  # noqa: F401
    return keras


def import_tensorflow_quietly(debug: bool = False):
    """``import tensorflow`` without its start-up notices (data_prep, which needs no
    Keras). Returns the tensorflow module."""
    with _quiet_import(debug):
        import tensorflow
    return tensorflow


def setup_logging(verbosity: int):
    """For an entry point's ``main``: Keras (and TensorFlow) imported quietly, INFO lines
    as plain messages, TensorFlow's saver / loader INFO lines off unless ``verbosity``
    >= 1. Returns the keras module."""
    import logging

    debug = verbosity >= 1
    keras = import_keras_quietly(debug)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if not debug and keras.backend.backend() == "tensorflow":
        from absl import logging as absl_logging

        tensorflow_info_off()
        absl_logging.set_verbosity(absl_logging.WARNING)
    return keras


def tensorflow_info_off() -> None:
    """TensorFlow's own Python INFO lines off (a SavedModel's saver and loader, a
    strategy's devices and cluster, each all-reduce's packing); its warnings stay."""
    import logging

    import tensorflow as tf

    tf.get_logger().setLevel(logging.WARNING)


# ------------------------------------------------------------------ shared flags
def define_server_token_flag() -> None:
    """``--server_token_file`` (predict and the page): the bearer token of a server started
    with ``--auth_token_file``."""
    from absl import flags

    if "server_token_file" in flags.FLAGS:  # the page and predict in one process
        return
    flags.DEFINE_string("server_token_file", None, "A file holding the token of a model "
                        "server started with --auth_token_file (with --server): sent as "
                        "'Authorization: Bearer <token>'.")


# ------------------------------------------------------------------ flagfiles
def _read_flagfile(path: str, included_from: str | None, stack: tuple[str, ...]
                   ) -> list[str]:
    real = os.path.realpath(path)
    if real in stack:
        raise ValueError(f"flagfile {path} includes itself (through "
                         f"{' -> '.join(stack)})")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        where = f" (included from {included_from})" if included_from else ""
        raise ValueError(f"cannot read flagfile {path}{where}: "
                         f"{exc.strerror or exc}") from None
    out: list[str] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", "//")):
            continue
        if line.startswith("--flagfile="):
            out += _read_flagfile(_resolve(line.split("=", 1)[1], path), path,
                                  stack + (real,))
        elif line.split("=", 1)[0] in FLAGFILE_FLAGS and "=" in line:
            name, value = line.split("=", 1)
            out.append(f"{name}={_resolve(value, path)}" if value else line)
        else:
            out.append(line)
    return out


#: Flags that name another flagfile: a relative path in a flagfile is read beside it too.
FLAGFILE_FLAGS = ("--pretrain_flagfile", "--classifier_flagfile")


def _resolve(name: str, including: str) -> str:
    """A nested flagfile: relative to the including file, else to the working directory."""
    name = os.path.expanduser(name)
    if os.path.isabs(name):
        return name
    beside = os.path.join(os.path.dirname(including), name)
    if os.path.exists(beside) or not os.path.exists(name):
        return beside
    return name


def expand_flagfiles(argv: Sequence[str]) -> list[str]:
    """argv with every ``--flagfile=F`` (or ``--flagfile F``) replaced by F's flags, in
    place (later flags still win), nested includes resolved by :func:`_resolve`."""
    out = [argv[0]] if argv else []
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--flagfile="):
            out += _read_flagfile(arg.split("=", 1)[1], None, ())
        elif arg == "--flagfile" and i + 1 < len(argv):
            out += _read_flagfile(argv[i + 1], None, ())
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


# ------------------------------------------------------------------ errors
def error_line(exc: BaseException) -> str:
    """One line for an exception: its message (with its type when it is not a user error)."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    if not isinstance(exc, USER_ERRORS):
        msg = f"{type(exc).__name__}: {msg} (--verbosity=1 shows the traceback)"
    return msg


def fail(program: str, message: str, code: int = 1):
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(main: Callable[[list[str]], int | None], required: Sequence[str] = (),
        argv: Sequence[str] | None = None, program: str | None = None,
        flags_parser: Callable[[list[str]], list[str]] | None = None) -> None:
    """absl's ``app.run(main)`` with the behaviour described in the module docstring.
    ``flags_parser``: absl's ``app.run`` argument (default: absl's strict parser); it
    raises ``flags.Error`` for a bad command line (printed as one line), and what it
    returns beyond the program name counts as stray positional arguments."""
    from absl import app, flags

    argv = list(sys.argv if argv is None else argv)
    program = program or os.path.basename(argv[0] if argv else "covid_keras")
    if program in ("__main__.py", "-c"):
        program = "covid_keras"
    debug = wants_debug(argv)
    quiet_tensorflow(debug)
    try:
        argv = expand_flagfiles(argv)
    except ValueError as exc:
        fail(program, str(exc))
    # -h is --help; absl ends its help with exit status 1, a help request here exits 0.
    argv = [a if a != "-h" else "--help" for a in argv]
    asked_help = any(a.split("=", 1)[0] in HELP_FLAGS for a in argv[1:])

    def wrapped(args: list[str]):
        if len(args) > 1:
            fail(program, f"unexpected argument(s) {' '.join(args[1:])!r}: every option "
                          "is a --flag (see --help)")
        missing = [f"--{name}" for name in required if flags.FLAGS[name].value in (None, "")]
        if missing:
            fail(program, f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          "required (see --help)")
        try:
            return main(args)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 (one line, or the traceback with -v 1)
            if flags.FLAGS["verbosity"].value >= 1:
                raise
            fail(program, error_line(exc))

    def parse(args: list[str]) -> list[str]:
        try:
            return (flags_parser or flags.FLAGS)(args)
        except flags.Error as exc:  # absl: "FATAL Flags parsing error" and a hint line
            error = exc
        except SystemExit as exc:  # only absl's help flags exit while parsing
            if asked_help and exc.code == 1:
                raise SystemExit(0) from None
            raise
        fail(program, f"{' '.join(str(error).split())} (see --help)")

    app.run(wrapped, argv=argv, flags_parser=parse)
