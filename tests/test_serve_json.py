"""covid_keras.serve's REST predict path without a Python object per value (issue 29: the
serving cost that is not the model): a long plain numeric array is converted straight from
the request's bytes (model_server.loads_predict). Every body gives what the ordinary path gives
(orjson, then NumPy): the same arrays (dtype, shape, every bit), or the same 400 error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from covid_keras.serving import model_server


def outcome(parse, raw: bytes, names=("images",)):
    """("ok", row format, {name: (dtype, shape, bytes)}) or ("error", HTTP status, text)."""
    try:
        inputs, rows = model_server.parse_predict_body(parse(raw), sorted(names), 1024)
    except model_server.ServingError as err:
        return ("error", err.http, str(err))
    got = {}
    for k, v in inputs.items():
        got[k] = (v.dtype.str, v.shape, v.tolist() if v.dtype == object else v.tobytes())
    return ("ok", rows, got)


def same(raw: bytes, names=("images",)):
    """The fast path's outcome equals the ordinary path's; returns it."""
    want = outcome(model_server.loads, raw, names)
    got = outcome(model_server.loads_predict, raw, names)
    assert got == want, (raw[:200], got if got[0] == "error" else got[:2],
                         want if want[0] == "error" else want[:2])
    return got


@pytest.fixture()
def small(monkeypatch):
    """Short test bodies take the fast path too."""
    monkeypatch.setattr(model_server, "FAST_MIN_BYTES", 1)


def body(value: str, key: str = "inputs", extra: str = "") -> bytes:
    return ('{"signature_name": "predict_study", ' + f'"{key}": {value}{extra}' + "}").encode()


def test_a_study_is_converted_from_the_bytes_exactly():
    rng = np.random.default_rng(0)
    images = np.repeat(rng.integers(0, 256, (6, 32, 32, 1)), 3, axis=-1)
    raw = json.dumps({"signature_name": "predict_study", "inputs": {"images": images.tolist()}},
                     separators=(",", ":")).encode()
    assert len(raw) > model_server.FAST_MIN_BYTES
    parsed = model_server.loads_predict(raw)
    assert isinstance(parsed["inputs"]["images"], np.ndarray)  # no Python list per value
    assert parsed["inputs"]["images"].dtype == np.int64
    assert np.array_equal(parsed["inputs"]["images"], images)
    same(raw)
    floats = (images / 7.0 - 3.0).round(5)
    for text in (json.dumps({"inputs": {"images": floats.tolist()}}),  # ", " spaces
                 json.dumps({"instances": floats.tolist()}, indent=2)):  # newlines, indents
        raw = text.encode()
        assert isinstance(model_server.loads_predict(raw).get("inputs", {"images": None})["images"]
                          if "inputs" in text else model_server.loads_predict(raw)["instances"],
                          np.ndarray)
        kind, _, got = same(raw)
        assert kind == "ok" and got["images"][0] == "<f8"


VALID = ["[1,2,3]", "[[0,-0],[10,255]]", "[[-0.0, 0.5], [-10.25, 3]]", "[0.000001234]",
         "[[1],[2]]", "[[[1, 2]], [[3, 4]]]", "[ 1 ,\n 2\t,\r3 ]", "[999999999999999]",
         "[-999999999999.999]", "[0.1, 0.2, 0.3]", "[1.5, 2]",
         "[[[[[[1]]]]]]", "[123456789.123456]"]
ODD = ["[01]", "[1.]", "[.5]", "[-]", "[--1]", "[1-2]", "[1..2]", "[1.2.3]", "[1 2]",
       "[1,2,]", "[,1]", "[[1,2],[3]]", "[[1,2],3]", "[]", "[[]]", "[1e5]", "[1E5, 2]",
       "[NaN]", "[Infinity]", "[-Infinity]", "[1234567890123456]", "[0.1000000000000001]",
       "[0.1, 0.30000000000000004]",
       "[1,2]]", "[[1,2]", "[true, false]", "[null]", "[1,[2]]", "[-01]", "[-.5]",
       "[1e400]", "[" * 40 + "1" + "]" * 40, "[" * 20 + "1" + "]" * 20, "[1/2]"]


@pytest.mark.parametrize("value", VALID + ODD)
def test_each_value_as_the_ordinary_path(small, value):
    if value in VALID:  # taken from the bytes, not parsed into Python values
        assert isinstance(model_server.loads_predict(body(value))["inputs"], np.ndarray)
    for raw in (body(value), body("{\"images\": " + value + "}"), body(value, "instances"),
                body(value, extra=', "instances": [1]'), body(value, extra=', "x": ' + value)):
        same(raw)
    same(body('{"images": ' + value + ', "class_index": ' + value + "}"),
         ("class_index", "images"))


def test_where_a_tensor_may_not_stand_or_json_is_broken(small):
    cases = [b'[1,2,3]', b'{"inputs": [1,2], "inputs": [3,4,5]}',
             b'{"signature_name": "[1,2,3]", "inputs": [1,2]}',
             b'{"signature_name": [1,2,3], "inputs": [1,2]}',
             b'{"inputs": {"images": [[1,2],[3,4]], "b64": [1]}}',
             b'{"inputs": [1,2], "signature_name": "predict_study"',
             b'{"inputs": "covid_keras.tensor.0.0000000000000000"}',
             b'{"instances": [[1,2],[3,4]], "inputs": [1,2]}',
             b'{"instances": [{"images": [1,2]}, {"images": [3,4]}]}',
             b'{"inputs": [1,2]} [3]', b'  {"inputs": [1,2]}  ', b'{"inputs":[1,2]}\n']
    for raw in cases:
        same(raw)
    same(b'{"inputs": {"images": [[1,2]], "class_index": [1]}}', ("class_index", "images"))
    same(b'{"instances": [[1,2],[3,4]]}', ("class_index", "images"))


def test_random_arrays_and_random_damage(small):
    """Random shapes, number forms and spaces; then single bytes replaced at random by
    bytes a numeric array is made of: the two paths always agree."""
    rng = np.random.default_rng(7)
    forms = [lambda v: str(int(v)), lambda v: f"{v:.3f}", lambda v: f"{-v:.1f}",
             lambda v: str(-int(v)), lambda v: f"{v:.6f}".rstrip("0") + "0"]
    spaces = ["", " ", "\n  ", "\t"]

    def write(a, form, sp):
        if a.ndim == 1:
            return "[" + ("," + sp).join(form(v) for v in a) + "]"
        return "[" + sp + ("," + sp).join(write(x, form, sp) for x in a) + sp + "]"

    checked = 0
    for trial in range(60):
        shape = tuple(int(d) for d in rng.integers(1, 5, rng.integers(1, 5)))
        a = rng.uniform(0, 300, shape)
        text = write(a, forms[trial % len(forms)], spaces[trial % len(spaces)])
        raw = body(text) if trial % 2 else body('{"images": ' + text + "}")
        assert same(raw)[0] == "ok"
        alphabet = b"0123456789-.,[] 5e"
        for _ in range(8):
            damaged = bytearray(raw)
            i = int(rng.integers(raw.index(b"["), len(raw) - 1))
            damaged[i] = alphabet[int(rng.integers(len(alphabet)))]
            same(bytes(damaged))
            checked += 1
    assert checked == 480


def test_big_bodies_keep_the_limits():
    """Converted from the bytes, a tensor still meets --max_instances, and a non-numeric or
    too deep one goes the ordinary way (400)."""
    n = model_server.FAST_MIN_BYTES // 4 + 2000
    many = ("[" + ",".join(["[1,2]"] * n) + "]").encode()
    raw = b'{"inputs": ' + many + b"}"
    kind, status, text = same(raw)
    assert (kind, status) == ("error", 400) and "--max_instances" in text
    raw = b'{"inputs": [' + b",".join([b"[1,2]"] * 1000) + b', [1, NaN]]}' + b" " * (1 << 16)
    kind, status, text = same(raw)
    assert (kind, status) == ("error", 400)


def test_chunk_boundaries(small, monkeypatch):
    """Tokens converted a few at a time: ints, fractions and -0 across chunk ends give the
    ordinary path's array (a chunk of ints next to one with fractions: float64 throughout)."""
    monkeypatch.setattr(model_server, "_FAST_CHUNK", 7)
    rng = np.random.default_rng(3)
    for _ in range(100):
        rows, cols = int(rng.integers(1, 6)), int(rng.integers(1, 9))
        vals = rng.uniform(-50, 50, rows * cols)
        kinds = rng.integers(0, 3, rows * cols)
        words = [str(int(v)) if k == 0 else (f"{v:.2f}" if k == 1 else "-0")
                 for v, k in zip(vals, kinds)]
        text = "[" + ",".join("[" + ",".join(words[r * cols:(r + 1) * cols]) + "]"
                              for r in range(rows)) + "]"
        raw = ('{"inputs": ' + text + "}").encode()
        assert isinstance(model_server.loads_predict(raw)["inputs"], np.ndarray)
        same(raw)
