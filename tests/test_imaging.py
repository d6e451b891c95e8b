import numpy as np
import pytest

from covid_keras.imaging import grey_to_hu, parse_windows, unit_to_u8, window_hu


def test_window_hu_numpy_values():
    x = np.array([-2000, -1450, -700, 50, 3000], np.float32)
    np.testing.assert_allclose(window_hu(x, -700, 1500), [0, 0, 0.5, 1, 1], atol=1e-6)


def test_window_hu_same_in_tf_data():
    import tensorflow as tf

    x = np.linspace(-1500, 500, 64, dtype=np.float32).reshape(8, 8)
    eager = window_hu(x, -600, 1200)
    ds = tf.data.Dataset.from_tensors(x).map(lambda t: window_hu(t, -600, 1200))
    in_graph = next(iter(ds)).numpy()
    np.testing.assert_allclose(in_graph, eager, atol=1e-6)


def test_grey_to_hu_inverts_the_window():
    grey = np.arange(256, dtype=np.uint8)
    hu = grey_to_hu(grey, -700, 1500)
    assert hu[0] == pytest.approx(-1450) and hu[-1] == pytest.approx(50)
    np.testing.assert_array_equal(unit_to_u8(window_hu(hu, -700, 1500)), grey)


def test_parse_windows():
    assert parse_windows(["lung", "-600:1200"]) == [("lung", -700.0, 1500.0),
                                                    ("-600:1200", -600.0, 1200.0)]
    with pytest.raises(ValueError, match="Received"):
        parse_windows(["soft"])
    with pytest.raises(ValueError, match="positive"):
        parse_windows(["0:0"])


def test_brightness_jitter_is_multiplicative_and_keeps_the_background_black():
    import tensorflow as tf

    from covid_keras.data import BRIGHTNESS_RANGE, augment

    img = np.zeros((16, 16, 1), np.uint8)
    img[4:12, 4:12] = 200
    ratios = []
    for i in range(20):
        out = augment(tf.constant(img), tf.constant([3, i], tf.int64)).numpy()
        assert np.all(out[img == 0] == 0)  # masked background stays black
        ratios.append(out.max() / 200.0)
    assert BRIGHTNESS_RANGE[0] - 0.01 <= min(ratios) < 1.0 < max(ratios) <= \
        BRIGHTNESS_RANGE[1] + 0.01


def test_additive_brightness_jitter_greys_the_background_and_is_refused_by_name():
    # The earlier recipe, kept to measure the change (--brightness_jitter=additive).
    import tensorflow as tf

    from covid_keras.data import augment

    img = np.zeros((16, 16, 1), np.uint8)
    img[4:12, 4:12] = 200
    outs = [augment(tf.constant(img), tf.constant([3, i], tf.int64), brightness="additive")
            .numpy() for i in range(20)]
    assert max(int(o[img == 0].max()) for o in outs) > 0  # black is no longer black
    with pytest.raises(ValueError, match="Received: 'gamma'"):
        augment(tf.constant(img), tf.constant([3, 0], tf.int64), brightness="gamma")
