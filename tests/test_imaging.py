import numpy as np
import pytest

from covid_keras.core.imaging import grey_to_hu, parse_windows, unit_to_u8, window_hu


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

    from covid_keras.io.data import BRIGHTNESS_RANGE, augment

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

    from covid_keras.io.data import augment

    img = np.zeros((16, 16, 1), np.uint8)
    img[4:12, 4:12] = 200
    outs = [augment(tf.constant(img), tf.constant([3, i], tf.int64), brightness="additive")
            .numpy() for i in range(20)]
    assert max(int(o[img == 0].max()) for o in outs) > 0  # black is no longer black
    with pytest.raises(ValueError, match="Received: 'gamma'"):
        augment(tf.constant(img), tf.constant([3, 0], tf.int64), brightness="gamma")


def _augment_many(img, n=24, **kwargs):
    import tensorflow as tf

    from covid_keras.io.data import augment

    return [augment(tf.constant(img), tf.constant([5, i], tf.int64), **kwargs).numpy()
            for i in range(n)]


def test_zoom_and_gamma_jitter_are_off_by_default_and_leave_its_draws_alone():
    img = np.random.default_rng(0).integers(0, 256, (24, 24, 1), dtype=np.uint8)
    plain, off = _augment_many(img), _augment_many(img, zoom=0.0, gamma=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(plain, off))
    on = _augment_many(img, zoom=0.3, gamma=0.5)
    assert sum(not np.array_equal(a, b) for a, b in zip(plain, on)) == len(on)
    import tensorflow as tf

    from covid_keras.io.data import augment
    for bad in ({"zoom": 1.0}, {"zoom": -0.1}, {"gamma": -0.5}):
        with pytest.raises(ValueError, match="Received"):
            augment(tf.constant(img), tf.constant([5, 0], tf.int64), **bad)


def test_zoom_jitter_enlarges_a_centred_square_up_to_its_bound():
    # A 20 px square centred in 64 px: a crop of side f * 64 holds it whole while f > 0.7
    # (z = 0.25 keeps f >= 0.75), so it comes back 20 / f px wide: 20 to 26.7 px.
    img = np.zeros((64, 64, 1), np.uint8)
    img[22:42, 22:42] = 200
    widths = []
    for out in _augment_many(img, n=40, zoom=0.25):
        cols = np.flatnonzero(out[..., 0].max(axis=0) > 100)
        widths.append(cols[-1] - cols[0] + 1)
        assert out[0, 0, 0] == 0 and out.shape == img.shape
    assert min(widths) >= 19 and max(widths) <= 28
    assert max(widths) - min(widths) >= 3  # the zoom varies


def test_gamma_jitter_keeps_black_and_white_and_moves_the_greys_both_ways():
    img = np.zeros((16, 16, 1), np.uint8)
    img[4:12, 4:12] = 128
    img[0, 0] = img[0, -1] = 255  # white in both corners: the flip keeps them in place
    outs = _augment_many(img, n=40, gamma=0.5)
    # Black stays black. White stays white wherever the x U(0.874, 1.126) brightness jitter
    # (before the gamma, clipped at 1) left it white: about half the draws.
    assert all(np.all(o[img == 0] == 0) for o in outs)
    assert sum(int(o[0, 0, 0]) == 255 for o in outs) >= len(outs) // 4
    assert all(o[0, 0, 0] > o[8, 8, 0] for o in outs)  # the order of the greys is kept
    greys = [float(o[8, 8, 0]) for o in outs]
    # (128 / 255) x U(0.874, 1.126) = 0.44 to 0.57, then ** exp(U(-ln 1.5, ln 1.5)), i.e.
    # ** 0.67 to 1.5: 0.29 to 0.68 (74 to 174), well beyond brightness alone (112 to 144).
    assert all(73 <= g <= 175 for g in greys)
    assert min(greys) < 100 and max(greys) > 150
