import numpy as np
import pytest

from covid_keras.core import schema


def _record(**over):
    import cv2

    png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    r = {f.name: {"bytes": b"x", "int64": 1, "float32": 0.5}[f.dtype] for f in schema.FIELDS}
    r.update({schema.IMAGE: png, schema.MASK: png, schema.SPLIT: "train"})
    r.update(over)
    return r


def test_serialize_parse_round_trip():
    rec = _record(**{schema.LABEL_NAME: "covid", schema.POSITION_MM: -12.25})
    out = schema.parse(schema.serialize(rec))
    assert set(out) == set(schema.FIELD_NAMES)
    assert out[schema.LABEL_NAME] == b"covid"
    assert out[schema.POSITION_MM] == pytest.approx(-12.25)
    assert out[schema.IMAGE] == rec[schema.IMAGE]


def test_parse_spec_in_tf():
    import tensorflow as tf

    rec = _record()
    parsed = tf.io.parse_single_example(schema.serialize(rec), schema.parse_spec())
    assert parsed[schema.SLICE_INDEX].dtype == tf.int64
    img = tf.io.decode_png(parsed[schema.IMAGE])
    assert img.shape == (8, 8, 1)


@pytest.mark.parametrize("change,match", [
    ({"extra": 1}, "unexpected"),
    ({schema.SLICE_INDEX: 1.5}, "int64"),
    ({schema.IMAGE: b"GIF89a"}, "PNG"),
    ({schema.SPLIT: "holdout"}, "split"),
])
def test_validate_rejects(change, match):
    with pytest.raises(ValueError, match=match):
        schema.validate(_record(**change))


def test_validate_rejects_missing_field():
    rec = _record()
    del rec[schema.PATIENT_KEY]
    with pytest.raises(ValueError, match="Missing"):
        schema.validate(rec)
