"""Every DRENet layer through the shared helper, and the numbers checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from covid_keras.model.layers import (
    AnchorGrid,
    ConfidenceMapImage,
    MLPHead,
    PerImageStandardization,
    ProposalHead,
    RegionAttention,
    RegionCrop,
    TopKNMS,
    ZoomImage,
    anchor_boxes,
    iou_matrix,
)
from covid_keras.model.layers.anchors import CODE_LEVELS, PAPER_LEVELS, check_coverage, coverage
from tests.layer_helper import run_layer_test

pytestmark = pytest.mark.model
RNG = np.random.default_rng(0)


def test_anchor_grid_448_numbers(tmp_path):
    boxes = anchor_boxes(448, PAPER_LEVELS)
    assert boxes.shape == (245, 4)
    np.testing.assert_allclose(boxes[0], [16 - 24, 16 - 24, 16 + 24, 16 + 24])
    np.testing.assert_allclose(boxes[196], [32 - 48, 32 - 48, 32 + 48, 32 + 48])
    assert anchor_boxes(448, CODE_LEVELS).shape == (261, 4)
    x = np.zeros((2, 64, 64, 3), np.float32)
    out = run_layer_test(tmp_path, AnchorGrid, {"input_size": 64, "levels": PAPER_LEVELS}, x,
                         (2, 245, 4), 0)
    np.testing.assert_allclose(out[1], anchor_boxes(64, PAPER_LEVELS))


@pytest.mark.parametrize("size", [64, 128, 224, 448])
def test_anchors_tile_every_input_size_as_at_448(size):
    """Sizes and strides scale together: the 448 px layout, shrunk (245 anchors, the whole
    image covered), not 20 anchors over 30 % of a 128 px image."""
    boxes = anchor_boxes(size, PAPER_LEVELS)
    assert boxes.shape == (245, 4)
    np.testing.assert_allclose(boxes, anchor_boxes(448, PAPER_LEVELS) * size / 448, rtol=1e-5)
    assert coverage(size, PAPER_LEVELS) == 1.0
    assert coverage(size, CODE_LEVELS) == 1.0
    # the centres of the first level tile the image: 14 per side, evenly spaced
    grid = boxes[:196].reshape(14, 14, 4)
    np.testing.assert_allclose((grid[:, 0, 0] + grid[:, 0, 2]) / 2,
                               (np.arange(14) + 0.5) * size / 14, rtol=1e-4)
    np.testing.assert_allclose((grid[0, :, 1] + grid[0, :, 3]) / 2,
                               (np.arange(14) + 0.5) * size / 14, rtol=1e-4)


def test_a_layout_that_leaves_most_of_the_image_uncovered_is_refused():
    sparse = ((32, 4.0), (64, 8.0))  # 4 px anchors every 32 px: ~2 % of the image
    assert coverage(128, sparse) < 0.1
    with pytest.raises(ValueError, match=r"cover \d+% of a 128 px image.*Received"):
        check_coverage(128, sparse)
    with pytest.raises(ValueError, match="cover"):
        TopKNMS(128, sparse)
    with pytest.raises(ValueError, match="cover"):
        AnchorGrid(128, sparse)


def test_proposal_head(tmp_path):
    x = RNG.normal(size=(2, 4, 4, 8)).astype(np.float32)
    # 2 levels: down1 + tidy1 + down2 + tidy2 = 4 convs x (kernel, bias)
    run_layer_test(tmp_path, ProposalHead, {"num_levels": 2, "filters": 16,
                                            "grid_size": None}, x, (2, 16 + 4), 8)
    run_layer_test(tmp_path, ProposalHead, {"num_levels": 3, "filters": 16,
                                            "grid_size": None}, x, (2, 16 + 4 + 1), 12)


def test_proposal_head_scores_every_anchor_of_a_small_input(tmp_path):
    """A 128 px ResNet gives a 4x4 conv5; the head reads it resized to 14x14, one score for
    each of the 245 anchors, and a 14x14 conv5 (448 px) is read as it is."""
    small = RNG.normal(size=(2, 4, 4, 8)).astype(np.float32)
    run_layer_test(tmp_path, ProposalHead, {"num_levels": 2, "filters": 16}, small,
                   (2, 196 + 49), 8)
    run_layer_test(tmp_path, ProposalHead, {"num_levels": 3, "filters": 16}, small,
                   (2, 196 + 49 + 16), 12)
    head = ProposalHead(num_levels=2, filters=16)
    big = RNG.normal(size=(2, 14, 14, 8)).astype(np.float32)
    same = ProposalHead(num_levels=2, filters=16, grid_size=None)
    out, ref = head(big), same(big)
    for a, b in zip(head.weights, same.weights):
        b.assign(a)
    np.testing.assert_allclose(np.asarray(head(big)), np.asarray(same(big)), atol=1e-5)
    assert tuple(out.shape) == tuple(ref.shape) == (2, 245)


def _scores_for(input_size, levels, best):
    """A hand-made score map: anchor i gets best[i] (others 0..0.1 descending noise)."""
    n = len(anchor_boxes(input_size, levels))
    s = np.linspace(0.1, 0.0, n).astype(np.float32)
    for idx, value in best.items():
        s[idx] = value
    return s


def test_topk_picks_hand_computed_boxes(tmp_path):
    """At 448 px: 48 px anchors every 32 px (14 x 14), 96 px every 64 px (7 x 7)."""
    levels = PAPER_LEVELS
    boxes = anchor_boxes(448, levels)
    iou = iou_matrix(boxes)
    # 15 = small (row 1, col 1): y, x in 24..72; 16 = its right neighbour (x 56..104);
    # 17 = two to the right (x 88..136); 196 = large (row 0, col 0): -16..80; 0 = small
    # (row 0, col 0): -8..40.
    np.testing.assert_allclose(boxes[15], [24, 24, 72, 72])
    np.testing.assert_allclose(boxes[196], [-16, -16, 80, 80])
    assert iou[15, 196] == pytest.approx(0.25) and iou[15, 16] == pytest.approx(0.2)
    assert iou[15, 17] == 0.0 and iou[15, 0] < 0.1 and iou[17, 0] == 0.0
    s = _scores_for(448, levels, {15: 9.0, 196: 8.0, 16: 7.5, 17: 7.0, 0: 6.0})
    out = run_layer_test(tmp_path, TopKNMS, {"input_size": 448, "levels": levels,
                                             "groups": [(0, 2, 3)], "iou_threshold": 0.1},
                         np.stack([s, s[::-1].copy()]),
                         {"indices": (2, 3), "scores": (2, 3), "boxes": (2, 3, 4)}, 0)
    assert out["indices"][0].tolist() == [15, 17, 0]  # 196 and 16 suppressed by 15
    np.testing.assert_allclose(out["scores"][0], [9.0, 7.0, 6.0])
    np.testing.assert_allclose(out["boxes"][0], boxes[[15, 17, 0]])
    # Batched: the second image is an independent problem.
    picks = out["indices"][1]
    assert picks[0] == int(np.argmax(s[::-1]))
    for i in range(3):
        for j in range(i):
            assert iou[picks[i], picks[j]] <= 0.1


def test_topk_never_returns_overlapping_boxes():
    layer = TopKNMS(448, PAPER_LEVELS, [(0, 2, 3)], 0.1)
    iou = iou_matrix(anchor_boxes(448, PAPER_LEVELS))
    scores = RNG.normal(size=(64, 245)).astype(np.float32)
    idx = np.asarray(layer(scores)["indices"])
    for row in idx:
        assert len(set(row.tolist())) == 3
        for i in range(3):
            for j in range(i):
                assert iou[row[i], row[j]] <= 0.1


def test_topk_code_groups():
    layer = TopKNMS(448, CODE_LEVELS, [(0, 2, 3), (2, 3, 3)], 0.1)
    idx = np.asarray(layer(RNG.normal(size=(4, 261)).astype(np.float32))["indices"])
    assert idx.shape == (4, 6)
    assert np.all(idx[:, :3] < 245) and np.all(idx[:, 3:] >= 245)


def numpy_crop(image, box, size):
    """Reference: bilinear, align_corners over the box's pixel centres, zero outside."""
    h, w, c = image.shape
    y0, x0, y1, x1 = box
    out = np.zeros((size, size, c), np.float64)
    for i in range(size):
        y = y0 + i * (y1 - y0 - 1) / (size - 1)
        for j in range(size):
            x = x0 + j * (x1 - x0 - 1) / (size - 1)
            fy, fx = int(np.floor(y)), int(np.floor(x))
            for yy, wy in ((fy, 1 - (y - fy)), (fy + 1, y - fy)):
                for xx, wx in ((fx, 1 - (x - fx)), (fx + 1, x - fx)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[i, j] += wy * wx * image[yy, xx]
    return out


def test_crop_matches_numpy_bilinear(tmp_path):
    image = RNG.uniform(size=(2, 20, 24, 3)).astype(np.float32)
    boxes = np.array([[[2, 3, 12, 15], [-4.0, -2.5, 9.5, 10], [10.25, 18, 26, 30]],
                      [[0, 0, 20, 24], [5.5, 7.25, 8.75, 11], [15, -6, 22, 4]]], np.float32)
    out = run_layer_test(tmp_path, RegionCrop, {"size": 7}, [image, boxes], (2, 3, 7, 7, 3), 0)
    for b in range(2):
        for k in range(3):
            np.testing.assert_allclose(out[b, k], numpy_crop(image[b], boxes[b, k], 7),
                                       atol=1e-4)


def test_generated_image_zero_outside_boxes(tmp_path):
    image = RNG.uniform(0.1, 1.0, size=(2, 16, 16, 3)).astype(np.float32)
    boxes = np.array([[[0, 0, 4, 4], [8, 8, 12, 16], [2, 2, 6, 6]],
                      [[-4, -4, 4, 4], [10, 0, 16, 6], [0, 10, 6, 20]]], np.float32)
    scores = np.array([[3.0, 1.0, 2.0], [0.5, 0.5, -1.0]], np.float32)
    out = run_layer_test(tmp_path, ConfidenceMapImage, {}, [image, boxes, scores],
                         (2, 16, 16, 3), 0)
    for b in range(2):
        inside = np.zeros((16, 16), bool)
        weight = np.zeros((16, 16), np.float32)
        norm = np.exp(scores[b] - scores[b].max())
        for (y0, x0, y1, x1), wgt in zip(boxes[b], norm):
            ys = slice(max(int(y0), 0), max(int(y1), 0))
            xs = slice(max(int(x0), 0), max(int(x1), 0))
            inside[ys, xs] = True
            weight[ys, xs] = np.maximum(weight[ys, xs], wgt)
        assert np.all(out[b][~inside] == 0)
        np.testing.assert_allclose(out[b], image[b] * weight[..., None], atol=1e-6)
    # the best box keeps the image unchanged
    np.testing.assert_allclose(out[0, 0:4, 0:4], image[0, 0:4, 0:4], atol=1e-6)


def test_zoom_image(tmp_path):
    image = RNG.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    boxes = np.array([[[-8, -8, 8, 8], [0, 0, 16, 16]], [[4, 4, 12, 12], [0, 0, 8, 8]]],
                     np.float32)
    out = run_layer_test(tmp_path, ZoomImage, {"box_index": 0}, [image, boxes],
                         (2, 16, 16, 3), 0)
    # box clipped to the image: [0, 0, 8, 8] for image 0
    np.testing.assert_allclose(out[0], numpy_crop(image[0], (0, 0, 8, 8), 16), atol=1e-4)


def test_region_attention(tmp_path):
    x = RNG.normal(size=(2, 3, 8)).astype(np.float32)
    # query, key (kernels), hidden (kernel, bias), score (kernel)
    out = run_layer_test(tmp_path, RegionAttention, {"units": 4}, x,
                         {"features": (2, 3, 8), "weights": (2, 3)}, 5)
    np.testing.assert_allclose(out["weights"].sum(axis=1), 1.0, atol=1e-5)


def test_mlp_head(tmp_path):
    x = RNG.normal(size=(2, 10)).astype(np.float32)
    # input batch norm (gamma, beta; moving mean, variance) + hidden + logits
    run_layer_test(tmp_path, MLPHead, {"num_classes": 3, "hidden_units": 6, "dropout": 0.5},
                   x, (2, 3), 6, 2)
    run_layer_test(tmp_path, MLPHead, {"num_classes": 3, "hidden_units": 6, "dropout": 0.5,
                                       "normalize": False}, x, (2, 3), 4)
    run_layer_test(tmp_path, MLPHead, {"num_classes": 3, "hidden_units": 0, "dropout": 0.0},
                   x, (2, 3), 4, 2)


def test_mlp_head_dropout_off_at_inference():
    head = MLPHead(3, hidden_units=16, dropout=0.5)
    x = RNG.normal(size=(4, 10)).astype(np.float32)
    a, b = np.asarray(head(x, training=False)), np.asarray(head(x, training=False))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(np.asarray(head(x, training=True)), a)


@pytest.mark.parametrize("cls,kwargs", [
    (MLPHead, {"num_classes": 1}), (RegionCrop, {"size": 1}),
    (ProposalHead, {"num_levels": 0}), (RegionAttention, {"units": 0}),
    (PerImageStandardization, {"scale": 0.0}),
])
def test_bad_arguments_say_received(cls, kwargs):
    with pytest.raises(ValueError, match="Received"):
        cls(**kwargs)


def test_drenet_plumbing_layers(tmp_path):
    from covid_keras.model.drenet import BoxScores, RegionsFromBatch, RegionsToBatch

    crops = RNG.normal(size=(2, 3, 4, 4, 3)).astype(np.float32)
    flat = run_layer_test(tmp_path, RegionsToBatch, {}, crops, (6, 4, 4, 3), 0)
    np.testing.assert_array_equal(flat[4], crops[1, 1])
    feats = RNG.normal(size=(6, 5)).astype(np.float32)
    back = run_layer_test(tmp_path, RegionsFromBatch, {"regions": 3}, feats, (2, 3, 5), 0)
    np.testing.assert_array_equal(back[1, 2], feats[5])
    scores = np.array([[2.0, 0.0, 1.0], [-1.0, -1.0, 3.0]], np.float32)
    out = run_layer_test(tmp_path, BoxScores, {}, scores, (2, 3), 0)
    np.testing.assert_allclose(out, np.exp(scores - scores.max(axis=1, keepdims=True)),
                               rtol=1e-6)


def test_per_image_standardization_numbers(tmp_path):
    x = RNG.uniform(0, 255, size=(3, 8, 8, 3)).astype(np.float32)
    x[1] = x[1] * 0.2 + 40.0  # a darker, flatter image
    x[2] = 7.0  # a constant image
    out = run_layer_test(tmp_path, PerImageStandardization, {"scale": 64.0}, x,
                         (3, 8, 8, 3), 0)
    for i in (0, 1):  # each image on its own: mean 0, sd 64, over pixels and channels
        expected = (x[i] - x[i].mean()) / x[i].std() * 64.0
        np.testing.assert_allclose(out[i], expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(out[2], 0.0)
    # So a brighter or more contrasted copy of an image comes out the same.
    np.testing.assert_allclose(PerImageStandardization()(1.7 * x[:1] - 30.0)[0],
                               PerImageStandardization()(x[:1])[0], atol=1e-4)


def test_input_normalization_choices():
    from covid_keras.model.layers import input_normalization
    from covid_keras.model.layers.intensity import SCALE_BY_PREPROCESSING

    assert input_normalization("none", "resnet50") is None
    layer = input_normalization("per_image", "resnet50")
    assert layer.scale == SCALE_BY_PREPROCESSING["caffe"] and layer.name == "input_norm"
    assert input_normalization("per_image", "densenet121").scale == 1.0
    with pytest.raises(ValueError, match="Received: input_norm='zscore'"):
        input_normalization("zscore", "resnet50")
