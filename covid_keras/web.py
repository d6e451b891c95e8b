"""The diagnosis web page: upload a CT study, see the answer and its evidence.

    python -m covid_keras.web --model=exports/drenet [--port=8080] [--metrics=eval/metrics.json]
    python -m covid_keras.web --server=http://localhost:8501 --model=exports/drenet

A plain HTML/JS page (``web_static/``) on Starlette, served by uvicorn on 127.0.0.1 (``--host``
to change). It is a client of :mod:`covid_keras.predict`: an upload becomes a study folder in
a per-request temporary folder, :func:`covid_keras.serving.predictor.predict_study` prepares and
predicts it (locally, or through TF Serving / ``covid_keras.serve`` with ``--server``) and
writes ``prediction.json`` and the evidence PNGs there; the page shows them and offers that
``prediction.json`` for download; the folder is deleted before the answer leaves.

* **Upload:** one .zip of a DICOM study or of PNG/JPEG slices, or many DICOM / PNG / JPEG
  files (a folder). Limits: ``--max_upload_mb`` for the request, ``--max_files`` files,
  ``--max_zip_mb`` / ``--max_zip_files`` for what a zip expands to. Zips are unpacked by
  :func:`covid_keras.serving.predictor.unpack_zip` (no absolute or ``..`` paths, no links or special
  files, expansion counted while extracting). Every file must be DICOM (Part 10), PNG or
  JPEG by its bytes; ``.*`` files and ``__MACOSX/`` are ignored. A refused upload is answered
  with its reason and one sentence; it never affects another request.
* **Answer:** the patient's probabilities per class, the decision with its rule and
  threshold, the top slices with their boxes and Grad-CAM, predict's warnings.
* **Always shown:** "research use only: not for clinical use", and the model card built by
  :func:`model_card` from the export's ``assets.extra/covid_keras.json`` and an evaluation's
  ``metrics.json`` (``--metrics``; a run folder's ``eval_val/`` or ``eval_*/`` is found by
  itself) and, when given or found, the dataset's ``manifest.json`` (checked against the
  SHA-256 the export recorded).
* **Privacy:** nothing is logged (no access log; an unexpected error is answered with its
  type only, its traceback printed only with ``--verbosity=1``); the answer names the study
  by predict's salted pseudonym (the salt: random per process unless ``--salt_file``);
  nothing is kept after the answer.
* **Concurrency:** uploads are received and unpacked concurrently; predictions run one at a
  time (data_prep's capture of library warnings is process-wide, so two studies prepared at
  once could swap their warnings), at most ``--max_queue`` requests at once, receiving and
  unpacking included (then HTTP 503). A request whose client has gone is not predicted.
* **Disk:** per-request folders live in one folder the page owns (``--tmp_dir``, default
  ``covid_keras_web-<uid>`` in the system's temporary folder, private); what a killed page
  left there (uploaded DICOM, PHI) is removed at start. An upload's size and a zip's
  declared expansion are reserved against ``--disk_budget_mb`` before a byte is written
  (over it: 503); an entry that expands more than 200x is a bomb. A file that starts as
  DICOM must have a file meta header that parses within its first 4 KB, checked as it
  streams in: one that does not is skipped (the rest of it is not written) and named in
  the answer's warnings by its position in the upload, never by its name; the study is
  diagnosed from the other files, and the upload refused only when none is usable.
* **Versions:** with ``--server``, ``prediction.json`` names the version that answered
  (covid_keras.serve's ``X-Model-Version``), and the card follows it.
* **Access:** ``--allowed_hosts`` (the Host header of every request, unknown paths and the
  login included; on a loopback ``--host`` the loopback names by default), POSTs whose
  ``Origin`` is another site refused, ``--auth_token_file`` (a bearer header, or the login
  form at ``/login``: the token is POSTed, never put in a URL, and answered with an
  HttpOnly, SameSite=Strict, Path=/ cookie, Secure with ``--secure_cookies``); both flags
  are required when binding any other address. The cookie (:mod:`covid_keras.serving.web_auth`) is
  signed with a key derived from the token, not the token: it survives a restart, a new
  token ends it, and it ends ``--session_hours`` (12) after the login. ``POST /logout``
  (the page's Sign out button) clears and revokes it. Five bad tokens in a minute from one
  address (an IPv6 /64) are answered 429 with Retry-After.
"""

from __future__ import annotations

import logging
import os
import secrets

from absl import flags

from covid_keras.core import cli
from covid_keras.serving import predictor, web_app

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_bool("release_memory", True, "Give memory back after a large study "
                      "(TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 unless the environment sets it; as "
                      "covid_keras.serve --release_memory, ~13-16 % slower per study).")
    flags.DEFINE_string("model", None, "An export (<base>/<name> or <base>/<name>/<version>) "
                        "or a training run folder. With --server: optional, where the "
                        "preprocessing settings and the model card are read from.")
    flags.DEFINE_string("server", None, "http://host:8501: predict through TF Serving (or "
                        "covid_keras.serve) over REST instead of loading the model here.")
    flags.DEFINE_string("model_name", "drenet", "The served model's name (with --server).")
    flags.DEFINE_string("metrics", None, "An evaluation's metrics.json (python -m "
                        "covid_keras.evaluate), or its folder: the model card's evaluation "
                        "metrics (any split; the card names it). Default: a run folder's "
                        "eval_val/ (else eval_*/).")
    flags.DEFINE_string("data_manifest", None, "The training TFRecords' manifest.json (or "
                        "their folder) for the model card's training data; must be the one "
                        "the export recorded. Default: a run folder's data_dir.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind (127.0.0.1: this machine only).")
    flags.DEFINE_integer("port", 8080, "Port (0: any free port).")
    flags.DEFINE_float("max_upload_mb", 1024.0, "An upload (the whole request) may be at most "
                       "this large.")
    flags.DEFINE_integer("max_files", 2000, "An upload may hold at most this many files.")
    flags.DEFINE_float("max_zip_mb", 2048.0, "A zipped study may expand to at most this much.")
    flags.DEFINE_integer("max_zip_files", 20000, "A zipped study may hold at most this many "
                         "entries.")
    flags.DEFINE_integer("max_queue", 32, "Uploads waiting for the model at most (then 503).")
    flags.DEFINE_integer("top_slices", 3, "Slices shown with boxes and Grad-CAM.")
    flags.DEFINE_string("salt_file", None, "Secret salt for predict's study and slice hashes "
                        "(default: random for each start of the server).")
    flags.DEFINE_float("disk_budget_mb", 8192.0, "What every request at once may write to "
                       "disk (uploads and unpacked zips, reserved before a byte is written; "
                       "over it: 503).")
    flags.DEFINE_list("allowed_hosts", None, "Host header values accepted ('*': any). Default "
                      "on a loopback --host: localhost, 127.0.0.1, ::1; required on any other.")
    flags.DEFINE_string("auth_token_file", None, "A file holding a secret token the page "
                        "needs: 'Authorization: Bearer <token>', or typed once into the login "
                        "form at /login (then an HttpOnly same-site cookie). Required when "
                        "--host is not loopback.")
    flags.DEFINE_float("session_hours", 12.0, "A login (its cookie) lasts this long; then the "
                       "token is asked again. The cookie is signed with a key derived from the "
                       "token: a restart keeps users signed in, a new token signs them out.")
    flags.DEFINE_bool("secure_cookies", False, "Mark the login cookie Secure (sent over HTTPS "
                      "only): give it when a TLS proxy is in front (README). Without it the "
                      "cookie is Secure only for a request the proxy on 127.0.0.1 marks as "
                      "HTTPS (X-Forwarded-Proto).")
    flags.DEFINE_string("tmp_dir", None, "The folder the page owns for its per-request "
                        "folders; leftovers (a killed page's) are removed at start (default: "
                        "covid_keras_web-<uid> in the system's temporary folder). Was: where "
                        "the per-request folders go (default: the "
                        "system's temporary folder).")
    flags.DEFINE_float("timeout_s", 60.0, "REST request timeout (with --server).")
    cli.define_server_token_flag()


def main(argv: list[str]) -> int:
    import uvicorn

    debug = FLAGS.verbosity >= 1
    if FLAGS.release_memory:  # before TensorFlow loads
        os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")
    cli.import_keras_quietly(debug)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not debug:
        import tensorflow as tf
        from absl import logging as absl_logging

        tf.get_logger().setLevel(logging.WARNING)
        absl_logging.set_verbosity(absl_logging.WARNING)
    from covid_keras.serving import model_server

    access = model_server.Access.for_binding(FLAGS.host, FLAGS.allowed_hosts,
                                             FLAGS.auth_token_file)
    if not 0 < FLAGS.session_hours < float("inf"):  # inf and nan too: int() of them fails
        raise ValueError(f"--session_hours must be a positive number of hours. Received: "
                         f"{FLAGS.session_hours}")
    from covid_keras.serving import web_auth

    sessions = (web_auth.Sessions(access.token, FLAGS.session_hours * 3600.0)
                if access.token is not None else None)
    limits = web_app.Limits(int(FLAGS.max_upload_mb * (1 << 20)), FLAGS.max_files,
                            int(FLAGS.max_zip_mb * (1 << 20)), FLAGS.max_zip_files,
                            FLAGS.max_queue, int(FLAGS.disk_budget_mb * (1 << 20)))
    model = web_app.load(FLAGS.model, FLAGS.server, FLAGS.model_name, FLAGS.timeout_s,
                         predictor.server_token(FLAGS.server_token_file))
    card = web_app.build_card(model, FLAGS.model, FLAGS.metrics, FLAGS.data_manifest)
    salt = (predictor.read_salt(FLAGS.salt_file) if FLAGS.salt_file else
            secrets.token_hex(32).encode())
    app = web_app.create_app(model, card, salt, limits, FLAGS.top_slices, FLAGS.tmp_dir,
                             debug, access, sessions, secure_cookies=FLAGS.secure_cookies)
    config = uvicorn.Config(app, host=FLAGS.host, port=FLAGS.port, access_log=False,
                            log_level="info" if debug else "warning", server_header=False,
                            lifespan="off", ws="none",
                            http=model_server.header_timeout_protocol(30.0))
    sock = model_server.listen(FLAGS.host, FLAGS.port)
    print(f"covid_keras.web: http://{FLAGS.host}:{sock.getsockname()[1]}/ "
          f"({FLAGS.server or FLAGS.model}; {web_app.NOTICE.lower()})", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, program="covid_keras.web")
