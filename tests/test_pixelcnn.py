"""Masked convolutions, the Gated PixelCNN block and the PixelCNN prior: causality, saving, config."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_config_round_trip

from keras_vqpix.config import PriorConfig, get_config
from keras_vqpix.layers.causal_attention import CausalSelfAttention
from keras_vqpix.layers.gated_pixelcnn import GatedBlock
from keras_vqpix.layers.layout_context import LayoutContext
from keras_vqpix.layers.masked_conv import MaskedConv2D, causal_mask
from keras_vqpix.layers.slice_context import SliceContext
from keras_vqpix.models.pixelcnn import PixelCNN

# -- Causality over every position ------------------------------------------------------------------


def dependencies(logits_fn, embedded: np.ndarray) -> np.ndarray:
    """`D[p, q]`: do the logits at raster position p depend on the input at position q?

    The gradient of the logits of each output position with respect to the embedded input,
    nonzero anywhere in the batch or the embedding channels. One backward pass: the batch is
    repeated once per output position p, and copy p only back-propagates from position p (the
    network has no batch interaction).
    """
    batch, height, width, _ = embedded.shape
    positions = height * width
    x = tf.constant(np.tile(embedded, (positions, 1, 1, 1)), tf.float32)  # [P * B, h, w, E]
    selector = np.repeat(np.eye(positions, dtype=np.float32), batch, axis=0)  # [P * B, P]
    selector = tf.constant(selector.reshape(positions * batch, height, width))
    with tf.GradientTape() as tape:
        tape.watch(x)
        selected = tf.reduce_sum(tf.reduce_sum(logits_fn(x), axis=-1) * selector)
    gradient = tape.gradient(selected, x).numpy().reshape(positions, batch, positions, -1)
    return np.abs(gradient).sum(axis=(1, 3)) > 0


def causality_violations(logits_fn, embedded: np.ndarray) -> dict[str, list]:
    """Positions that leak (depend on themselves or later) and blind spots (miss an earlier one)."""
    depends = dependencies(logits_fn, embedded)
    size = depends.shape[0]
    earlier = np.arange(size)[None, :] < np.arange(size)[:, None]
    width = embedded.shape[2]

    def where(mask):
        return [
            (divmod(int(p), width), divmod(int(q), width))
            for p, q in zip(*np.nonzero(mask), strict=True)
        ]

    return {"leaks": where(depends & ~earlier), "blind_spots": where(~depends & earlier)}


def random_embedded(height=6, width=6, channels=4, batch=2, seed=0) -> np.ndarray:
    return (
        np.random.default_rng(seed).normal(size=(batch, height, width, channels)).astype(np.float32)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_layers": 5, "kernel_size": 3, "conditional": True},
        {"num_layers": 2, "kernel_size": 5, "conditional": False},
        {"num_layers": 5, "conditional": True, "previous_slice": True, "slice_positions": 3},
        {"num_layers": 5, "layout_levels": 4, "layout_upsample": 2, "code_shape": (6, 6)},
        # Attention after every block, the first (mask "A") too.
        {"num_layers": 5, "attention_every": 1, "attention_dim": 8, "code_shape": (6, 6)},
    ],
    ids=["k3-conditional", "k5-unconditional", "slice-context", "layout", "attention"],
)
def test_every_position_sees_exactly_the_earlier_positions(kwargs):
    # On a 6x6 map the receptive field of (num_layers + 1) * (k // 2) >= 6 covers every earlier
    # position, so each output must depend on all of them (no blind spot) and on nothing at or
    # after itself (no leak). A slice-context prior is checked with a previous slice and
    # positions given, a layout prior with a layout: the condition must not open a path from a
    # map's own codes.
    keras.utils.set_random_seed(1)
    prior = PixelCNN(num_embeddings=8, filters=8, embedding_dim=4, **kwargs)
    labels = tf.constant([0, 1])
    codes = tf.zeros((2, 6, 6), tf.int32)
    rng = np.random.default_rng(3)
    previous, layout = None, None
    if prior.layout_levels:
        layout = tf.constant(rng.integers(0, 4, (2, 3, 3)), tf.int32)
    else:
        previous = tf.constant(rng.integers(0, 8, (2, 6, 6)), tf.int32)
    prior(codes, labels, layout=layout)
    condition = prior.context(codes, previous, tf.constant([0, 2]), layout)

    def logits(x):
        copies = x.shape[0] // 2
        tiled = None if condition is None else tf.tile(condition, [copies, 1, 1, 1])
        return prior.logits_from_embeddings(x, tf.tile(labels, [copies]), condition=tiled)

    violations = causality_violations(logits, random_embedded(batch=2))
    assert violations == {"leaks": [], "blind_spots": []}


def test_the_slice_context_reads_the_previous_slice_above_and_at_each_row_only():
    # Row r of the context reads the previous slice's rows r - 2 .. r (never a row below: a
    # stack can be drawn as a wavefront), and its row steps compute `call`'s function.
    keras.utils.set_random_seed(2)
    context = SliceContext(8, 6, previous_slice=True, num_positions=3)
    previous = tf.constant(np.random.default_rng(0).integers(-1, 8, (2, 7, 5)), tf.int32)
    positions = tf.constant([1, -1])
    full = context(previous, positions).numpy()
    for row in range(7):
        changed = previous.numpy().copy()
        changed[:, row] = (changed[:, row] + 3) % 8
        moved = np.abs(context(tf.constant(changed), positions).numpy() - full).sum(axis=(0, 2, 3))
        assert (moved[:row] == 0).all() and (moved[row : row + 3] > 0).all()
        assert (moved[row + 3 :] == 0).all()
    cache = context.start_rows(2, 5, "float32")
    rows = []
    for row in range(7):
        values, cache = context.row(cache, previous[:, row], positions)
        rows.append(values.numpy())
    np.testing.assert_allclose(np.stack(rows, axis=1), full, rtol=0, atol=1e-5 * np.abs(full).max())
    # The position is read: another bin changes every row.
    other = context(previous, tf.constant([2, 0])).numpy()
    assert (np.abs(other - full).sum(axis=(2, 3)) > 0).all()


def test_a_slice_context_prior_reads_the_previous_slice_and_the_position():
    keras.utils.set_random_seed(1)
    prior = PixelCNN(
        num_embeddings=8,
        num_layers=2,
        filters=8,
        embedding_dim=4,
        slice_positions=3,
        previous_slice=True,
    )
    rng = np.random.default_rng(0)
    codes = tf.constant(rng.integers(0, 8, (2, 5, 5)), tf.int32)
    previous = tf.constant(rng.integers(0, 8, (2, 5, 5)), tf.int32)
    labels = tf.constant([0, 1])
    base = prior(codes, labels, previous, tf.constant([0, 1])).numpy()
    assert not np.allclose(
        base, prior(codes, labels, (previous + 1) % 8, tf.constant([0, 1])).numpy()
    )
    assert not np.allclose(base, prior(codes, labels, previous, tf.constant([2, 2])).numpy())
    # None means "no previous slice" and "unknown position": the -1 rows.
    np.testing.assert_array_equal(
        prior(codes, labels).numpy(),
        prior(codes, labels, -tf.ones_like(codes), tf.constant([-1, -1])).numpy(),
    )


def test_a_layout_prior_reads_the_layout_below_and_around_each_position():
    # The layout is drawn before the codes, so the condition at a code position may read the
    # cells below it too (no mask): two 3x3 convolutions over the cells, so the cells within
    # two of its own; the logits at (0, 0) thus know the layout four code rows ahead.
    keras.utils.set_random_seed(1)
    prior = PixelCNN(
        num_embeddings=8,
        num_layers=2,
        filters=8,
        embedding_dim=4,
        code_shape=(8, 8),
        layout_levels=5,
        layout_upsample=2,
    )
    codes = tf.zeros((1, 8, 8), tf.int32)
    layout = np.random.default_rng(0).integers(0, 5, (1, 4, 4))
    base = prior(codes, None, layout=tf.constant(layout)).numpy()
    for cell, reads in (((2, 2), True), ((3, 0), False)):
        changed = layout.copy()
        changed[(0, *cell)] = (changed[(0, *cell)] + 1) % 5
        moved = np.abs(prior(codes, None, layout=tf.constant(changed)).numpy() - base).sum(-1)
        assert bool(moved[0, 0, 0] > 0) == reads, cell
        assert (moved[0, 2 * cell[0] :, 2 * cell[1]] > 0).all()  # and every code below it
    with pytest.raises(ValueError, match="needs a layout"):
        prior(codes, None)
    for kwargs, message in (
        (dict(code_shape=(8, 8), layout_levels=1), "layout_levels must be 0 or >= 2"),
        (dict(code_shape=(6, 6), layout_levels=4, layout_upsample=4), "divisible"),
        (dict(layout_levels=4, layout_upsample=2), "divisible"),
        (
            dict(code_shape=(8, 8), layout_levels=4, layout_upsample=2, previous_slice=True),
            "not both",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            PixelCNN(num_embeddings=8, **kwargs)


def test_dilated_vertical_stacks_see_every_earlier_row_of_a_tall_map():
    # 4 blocks dilated 1, 2, 4, 8 reach 16 rows above: on a 12x3 map every position must see
    # every earlier one (no gap between the dilated taps, no leak); undilated, they reach 5.
    keras.utils.set_random_seed(1)
    labels = tf.constant([0, 1])
    found = {}
    for cycle in (4, 1):
        prior = PixelCNN(
            num_embeddings=8, num_layers=3, filters=8, embedding_dim=4, dilation_cycle=cycle
        )
        prior(tf.zeros((2, 12, 3), tf.int32), labels)
        found[cycle] = (
            [block.dilation for block in prior.blocks],
            prior.receptive_rows,
            causality_violations(
                lambda x, prior=prior: prior.logits_from_embeddings(
                    x, tf.tile(labels, [x.shape[0] // 2])
                ),
                random_embedded(height=12, width=3, batch=2),
            ),
        )
    assert found[4] == ([1, 2, 4, 8], 16, {"leaks": [], "blind_spots": []})
    dilations, rows, undilated = found[1]
    assert dilations == [1, 1, 1, 1] and rows == 5 and not undilated["leaks"]
    blind = {(p, q) for p, q in undilated["blind_spots"] if p == (11, 0)}
    assert blind == {((11, 0), (r, c)) for r in range(6) for c in range(3)}  # 6 rows up and more


def test_the_causality_check_catches_a_blind_spot_and_a_leak():
    """The same assertion fails on a plain masked-conv stack (blind spot) and on a leaky one."""
    keras.utils.set_random_seed(2)

    def masked_stack(first_mask):
        convs = [MaskedConv2D(8, 3, first_mask)] + [MaskedConv2D(8, 3, "B") for _ in range(5)]
        head = keras.layers.Conv2D(8, 1)

        def logits(x):
            for conv in convs:
                x = tf.tanh(conv(x))
            return head(x)

        return logits

    plain = causality_violations(masked_stack("A"), random_embedded())
    assert not plain["leaks"]
    # The blind spot of stacked k x k masks: (i, j) never sees (i - 1, j + 2) and beyond.
    assert ((2, 0), (1, 2)) in plain["blind_spots"]
    leaky = causality_violations(masked_stack("B"), random_embedded())
    assert ((0, 0), (0, 0)) in leaky["leaks"]


# -- MaskedConv2D ---------------------------------------------------------------------------------


def test_causal_masks():
    np.testing.assert_array_equal(causal_mask(3, "B")[..., 0, 0], [[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(causal_mask((1, 5), "A")[..., 0, 0], [[1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(causal_mask((1, 5), "B")[..., 0, 0], [[1, 1, 1, 0, 0]])


def test_masked_conv_matches_numpy_and_ignores_masked_taps():
    layer = MaskedConv2D(3, 3, "A", kernel_initializer="ones", bias_initializer="zeros")
    inputs = np.random.default_rng(0).normal(size=(1, 5, 5, 2)).astype(np.float32)
    outputs = layer(inputs).numpy()
    padded = np.pad(inputs, [(0, 0), (1, 1), (1, 1), (0, 0)])
    # Mask A of a 3x3 kernel: the row above (3 taps) and the left neighbour.
    expected = np.zeros((1, 5, 5))
    for i in range(5):
        for j in range(5):
            expected[0, i, j] = padded[0, i, j : j + 3].sum() + padded[0, i + 1, j].sum()
    np.testing.assert_allclose(outputs[..., 0], expected, rtol=1e-5, atol=1e-5)
    # The mask is a non-trainable weight, not a graph constant, and survives a kernel update.
    assert [w.path for w in layer.non_trainable_weights] == [layer.mask.path]
    assert layer.mask.path not in [w.path for w in layer.trainable_weights]
    layer.kernel.assign(np.full(layer.kernel.shape, 5.0, np.float32))
    np.testing.assert_allclose(layer(inputs).numpy(), 5 * outputs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"filters": 4, "kernel_size": 3, "mask_type": "C"}, r"Received: mask_type='C'"),
        ({"filters": 4, "kernel_size": 2}, r"Received: kernel_size=2"),
        ({"filters": 4, "kernel_size": (3, 4)}, r"Received: kernel_size=\(3, 4\)"),
        ({"filters": 0, "kernel_size": 3}, r"Received: filters=0"),
    ],
)
def test_masked_conv_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskedConv2D(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"filters": 4, "kernel_size": 4}, r"Received: kernel_size=4"),
        ({"filters": 4, "mask_type": "a"}, r"Received: mask_type='a'"),
        ({"filters": 4, "num_labels": -1}, r"Received: num_labels=-1"),
        ({"filters": 4, "dilation": 0}, r"Received: dilation=0"),
    ],
)
def test_gated_block_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedBlock(**kwargs)


def test_gated_block_mask_b_needs_matching_residual_channels():
    block = GatedBlock(8, 3, "B")
    x = tf.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="residual"):
        block(x, x)


def test_pixelcnn_and_config_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"Received: label_dropout=1.0"):
        PixelCNN(num_embeddings=8, label_dropout=1.0)
    with pytest.raises(ValueError, match=r"Received: label_dropout=-0.1"):
        PriorConfig(label_dropout=-0.1)
    with pytest.raises(ValueError, match=r"Received: embedding_dim=0"):
        PriorConfig(embedding_dim=0)
    with pytest.raises(ValueError, match=r"Received: dilation_cycle=0"):
        PixelCNN(num_embeddings=8, dilation_cycle=0)
    with pytest.raises(ValueError, match=r"Received: dilation_cycle=0"):
        PriorConfig(dilation_cycle=0)
    for ratio in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"Received: final_learning_rate_ratio={ratio}"):
            PriorConfig(final_learning_rate_ratio=ratio)
    with pytest.raises(ValueError, match=r"needs a code_shape .* Received: code_shape=None"):
        PixelCNN(num_embeddings=8, attention_every=2)
    with pytest.raises(ValueError, match=r"previous_slice=True"):
        PixelCNN(num_embeddings=8, attention_every=2, code_shape=(4, 4), previous_slice=True)
    with pytest.raises(ValueError, match=r"attention_every needs previous_slice off"):
        PriorConfig(attention_every=2, previous_slice=True)
    with pytest.raises(ValueError, match=r"Received: attention_dim=6, attention_heads=4"):
        PriorConfig(attention_dim=6, attention_heads=4)
    with pytest.raises(ValueError, match=r"Received: attention_dim=0, attention_heads=1"):
        PriorConfig(attention_dim=0, attention_heads=1)
    with pytest.raises(ValueError, match=r"pose_copies must be >= 0"):
        PriorConfig(pose_copies=-1)
    with pytest.raises(ValueError, match=r"pose_rotation, pose_shift and pose_scale"):
        PriorConfig(pose_shift=-0.01)
    with pytest.raises(ValueError, match=r"Received: key_dim=6, num_heads=4"):
        CausalSelfAttention(6, 4)


def test_config_replace_names_unknown_keys_and_keeps_each_fields_type():
    import numpy as np

    config = get_config("quick")
    changed = config.replace(**{"data.image_size": np.int64(64), "prior.epochs": np.int32(3)})
    assert type(changed.data.image_size) is int and changed.data.image_size == 64
    assert type(changed.prior.epochs) is int and changed.prior.epochs == 3
    assert type(config.replace(**{"prior.learning_rate": 1}).prior.learning_rate) is float
    assert changed.replace(**{"prior.epochs": config.prior.epochs}).prior == config.prior
    with pytest.raises(ValueError, match=r"'prior.dropot'; section 'prior' has: .*dropout"):
        config.replace(**{"prior.dropot": 0.1})
    with pytest.raises(ValueError, match=r"no section 'decoder'; the sections are data, vqvae"):
        config.replace(**{"decoder.filters": 8})
    with pytest.raises(ValueError, match=r"'prior.epochs' takes an integer .* Received: 2.5"):
        config.replace(**{"prior.epochs": 2.5})
    with pytest.raises(ValueError, match=r"'prior.mirror' takes true or false"):
        config.replace(**{"prior.mirror": 1})


def test_the_priors_learning_rate_follows_a_cosine_to_its_final_share_by_the_last_epoch():
    from keras_vqpix.training.prior_training import build_prior

    config = get_config("quick").replace(
        **{"prior.learning_rate": 0.01, "prior.final_learning_rate_ratio": 0.1, "prior.epochs": 2}
    )

    def rates(config):
        optimizer = build_prior(config, steps_per_epoch=5).optimizer
        found = []
        for step in (0, 5, 10, 20):  # start, half-way, the last epoch's end, beyond
            optimizer.iterations.assign(step)
            found.append(float(optimizer.learning_rate))
        return found

    np.testing.assert_allclose(rates(config), [0.01, 0.0055, 0.001, 0.001], rtol=1e-5)
    constant = config.replace(**{"prior.final_learning_rate_ratio": 1.0})
    np.testing.assert_allclose(rates(constant), [0.01] * 4, rtol=1e-6)


def test_the_default_prior_is_dilated_and_the_other_priors_stay_presets():
    default = get_config("default")
    patients, undilated = get_config("patients"), get_config("default-undilated")
    prior = PixelCNN.from_run_config(default.prior, 256, code_shape=(32, 32))
    assert [block.dilation for block in prior.blocks] == [1, 2, 4, 8, 1, 2, 4, 8, 1, 2]
    assert prior.receptive_rows == 34 >= default.code_size
    # The default prior reads each slice's position in its stack (one bin per demo slice),
    # not the previous slice: its slices are drawn one by one.
    assert prior.has_slice_context and prior.slice_positions == 20
    assert not prior.previous_slice
    # The patients preset adds the previous slice (and the width that keeps a 20-slice patient
    # within 2 s): the VQ-VAE stage of every preset is the same run.
    context = {"prior.previous_slice": True, "prior.filters": 32}
    context |= {"prior.mirror": False, "prior.dropout": 0.0}  # as measured (docs/synthetic.md)
    assert default.prior.filters == 48
    assert default.replace(name="patients", **context) == patients
    # The ablation presets are the earlier defaults, each undoing one more idea: dropout and
    # twice the training, slice positions, then mirror images (twice the maps, half the
    # epochs: the same steps), then dilation.
    assert default.prior.dropout == 0.1 and default.prior.epochs == 20
    short = default.replace(name="default-short", **{"prior.epochs": 10, "prior.dropout": 0.0})
    assert short == get_config("default-short")
    positionless = short.replace(name="default-positionless", **{"prior.slice_positions": 0})
    assert positionless == get_config("default-positionless")
    unmirrored = {"prior.mirror": False, "prior.epochs": 20}
    assert positionless.replace(name="default-unmirrored", **unmirrored) == (
        get_config("default-unmirrored")
    )
    assert (
        get_config("default-unmirrored").replace(
            name="default-undilated", **{"prior.dilation_cycle": 1}
        )
        == undilated
    )
    assert default.prior.mirror
    stacked = PixelCNN.from_run_config(patients.prior, 256, (32, 32))
    assert stacked.previous_slice and stacked.slice_positions == 20
    undilated_prior = PixelCNN.from_run_config(undilated.prior, 256, code_shape=(32, 32))
    assert undilated_prior.receptive_rows == 11 and not undilated_prior.has_slice_context


class _BlockCodec:
    """A VQ-VAE stand-in that inverts exactly: code k decodes to a 2x2 block of brightness k / 8."""

    downsample_factor = 2

    def decode(self, codes):
        blocks = tf.repeat(tf.repeat(tf.cast(codes, tf.float32) / 8.0, 2, axis=1), 2, axis=2)
        return blocks[..., None]

    def encode(self, images):
        pooled = tf.nn.avg_pool2d(images, 2, 2, "VALID")[..., 0]
        return tf.cast(tf.round(pooled * 8.0), tf.int32)


def test_mirrored_codes_are_the_codes_of_the_mirrored_reconstructions():
    # With a codec that inverts exactly, the mirror image of a map's reconstruction encodes to
    # the map's columns in reverse order (not its rows, not the map itself); any batch size.
    from keras_vqpix.codes import mirrored_codes

    codes = np.random.default_rng(0).integers(0, 8, (5, 6, 6)).astype(np.int32)  # square, as runs
    for batch_size in (2, 32):
        np.testing.assert_array_equal(
            mirrored_codes(_BlockCodec(), codes, batch_size), codes[:, :, ::-1]
        )


def test_mirror_images_of_a_stack_are_a_mirrored_stack():
    # A mirrored slice's previous slice is the mirrored previous slice, so the training batches
    # pair a mirrored map with a mirrored neighbour, never with an unmirrored one.
    from keras_vqpix.codes import with_mirror_images
    from keras_vqpix.training.prior_training import code_dataset

    codes = np.random.default_rng(1).integers(0, 8, (4, 6, 6)).astype(np.int32)
    labels = np.array([0, 0, 1, 1], np.int32)
    context = (np.array([-1, 0, -1, 2], np.int32), np.array([0, 1, 0, 1], np.int32))
    both, both_labels, (previous, positions) = with_mirror_images(
        _BlockCodec(), codes, labels, context, batch_size=3
    )
    np.testing.assert_array_equal(both, np.concatenate([codes, codes[:, :, ::-1]]))
    np.testing.assert_array_equal(both_labels, np.tile(labels, 2))
    np.testing.assert_array_equal(previous, [-1, 0, -1, 2, -1, 4, -1, 6])
    np.testing.assert_array_equal(positions, np.tile(context[1], 2))
    batch = next(iter(code_dataset(both, both_labels, 8, context=(previous, positions))))
    maps, _, before, _ = (tensor.numpy() for tensor in batch)
    np.testing.assert_array_equal(before[5], maps[4])  # mirrored slice 1 after mirrored slice 0
    np.testing.assert_array_equal(before[4], -1)
    assert with_mirror_images(_BlockCodec(), codes, labels)[2] is None


def test_transformed_codes_move_each_map_by_its_own_transform():
    # With the exact codec, a shift by one code (2 pixels) moves the map one column (the border
    # column repeated where nothing moves in) and a quarter turn about the centre turns it.
    from keras_vqpix.codes import transformed_codes

    codes = np.random.default_rng(2).integers(0, 8, (3, 6, 6)).astype(np.int32)
    identity = [1, 0, 0, 0, 1, 0, 0, 0]
    shift_right = [1, 0, -2, 0, 1, 0, 0, 0]  # output x reads input x - 2
    quarter_turn = [0, 1, 0, -1, 0, 11, 0, 0]  # output (x, y) reads input (y, 11 - x)
    moved = transformed_codes(
        _BlockCodec(), codes, np.array([identity, shift_right, quarter_turn], np.float32), 2
    )
    np.testing.assert_array_equal(moved[0], codes[0])
    np.testing.assert_array_equal(moved[1][:, 1:], codes[1][:, :-1])
    np.testing.assert_array_equal(moved[1][:, 0], codes[1][:, 0])
    np.testing.assert_array_equal(moved[2], np.rot90(codes[2], k=-1))


def test_pose_copies_move_each_patient_as_one_head_and_keep_its_stack():
    from keras_vqpix.codes import pose_transforms, with_mirror_images, with_pose_copies

    config = get_config("default").prior
    groups = np.array(["a", "a", "b", "b"])
    rng = np.random.default_rng(0)
    poses = pose_transforms(groups, 12, rng, 2.0, 0.006, 0.02)
    np.testing.assert_array_equal(poses[0], poses[1])  # one pose per patient
    assert not np.allclose(poses[1], poses[2])
    assert np.allclose(poses[:, [0, 4]], 1, atol=0.2) and not np.allclose(poses[:, 0], 1)
    still = pose_transforms(groups, 12, rng, 0.0, 0.0, 0.0, mirrored=True)
    np.testing.assert_array_equal(still[0], [-1, 0, 11, 0, 1, 0, 0, 0])  # a mirror image

    codes = np.random.default_rng(3).integers(0, 8, (4, 6, 6)).astype(np.int32)
    labels = np.array([0, 0, 1, 1], np.int32)
    context = (np.array([-1, 0, -1, 2], np.int32), np.array([0, 1, 0, 1], np.int32))
    mirrored = with_mirror_images(_BlockCodec(), codes, labels, context)
    # Standing still, every copy is the training set again, mirror images included.
    still_config = dataclasses.replace(
        config, pose_copies=2, pose_rotation=0, pose_shift=0, pose_scale=0
    )
    copies, copy_labels, (previous, positions) = with_pose_copies(
        _BlockCodec(), *mirrored[:2], np.tile(groups, 2), mirrored[2], still_config, 0, True, 3
    )
    np.testing.assert_array_equal(copies, np.tile(mirrored[0], (3, 1, 1)))
    np.testing.assert_array_equal(copy_labels, np.tile(labels, 6))
    np.testing.assert_array_equal(previous[8:16], [-1, 8, -1, 10, -1, 12, -1, 14])
    np.testing.assert_array_equal(positions, np.tile(context[1], 6))
    # Moved, a copy differs from its original, the same way for the same seed.
    moving = dataclasses.replace(config, pose_copies=1, pose_rotation=20, pose_shift=0.1)
    moved = with_pose_copies(_BlockCodec(), codes, labels, groups, None, moving, 0)
    assert moved[2] is None and (moved[0][4:] != codes).mean() > 0.3
    again = with_pose_copies(_BlockCodec(), codes, labels, groups, None, moving, 0)
    np.testing.assert_array_equal(moved[0], again[0])


# -- Config and saving ------------------------------------------------------------------------------


# Every PixelCNN argument but the layout's, none at its default.
PRIOR_ARGUMENTS = dict(
    num_embeddings=8,
    num_layers=1,
    filters=8,
    kernel_size=5,
    embedding_dim=4,
    conditional=False,
    num_classes=3,
    label_dropout=0.2,
    dropout=0.3,
    code_shape=(4, 6),
    seed=3,
    position_embedding=True,
    dilation_cycle=2,
    previous_slice=True,
    slice_positions=4,
    previous_dropout=0.3,
)
# A layout prior reads no slice context: those two arguments give way to the layout's.
LAYOUT_PRIOR_ARGUMENTS = {
    **{k: v for k, v in PRIOR_ARGUMENTS.items() if k not in ("previous_slice", "slice_positions")},
    "layout_levels": 3,
    "layout_upsample": 2,
}
# Attention reads no previous slice (its sampler has no attention cache).
ATTENTION_PRIOR_ARGUMENTS = {
    **{k: v for k, v in PRIOR_ARGUMENTS.items() if k != "previous_slice"},
    "attention_every": 1,
    "attention_dim": 6,
    "attention_heads": 3,
}


@pytest.mark.parametrize(
    ("cls", "arguments"),
    [
        (
            MaskedConv2D,
            dict(
                filters=4,
                kernel_size=(1, 3),
                mask_type="A",
                use_bias=False,
                kernel_initializer="he_normal",
                bias_initializer="ones",
            ),
        ),
        (
            GatedBlock,
            dict(
                filters=8,
                kernel_size=5,
                mask_type="A",
                num_labels=3,
                dilation=2,
                spatial_condition=True,
            ),
        ),
        (
            SliceContext,
            dict(num_embeddings=8, filters=4, previous_slice=False, num_positions=3),
        ),
        (PixelCNN, PRIOR_ARGUMENTS),
        (LayoutContext, dict(num_levels=5, filters=4, upsample=2)),
        (PixelCNN, LAYOUT_PRIOR_ARGUMENTS),
        (PixelCNN, ATTENTION_PRIOR_ARGUMENTS),
        (CausalSelfAttention, dict(key_dim=6, num_heads=3)),
    ],
    ids=[
        "MaskedConv2D",
        "GatedBlock",
        "SliceContext",
        "PixelCNN",
        "LayoutContext",
        "PixelCNN-layout",
        "PixelCNN-attention",
        "CausalSelfAttention",
    ],
)
def test_get_config_round_trips(cls, arguments):
    # A prior reads a slice context or a layout, not both: each PixelCNN case leaves the other's
    # arguments at their defaults.
    exclusive = {"layout_levels", "layout_upsample", "previous_slice", "slice_positions"}
    exclusive |= {"attention_every", "attention_dim", "attention_heads"}
    assert_config_round_trip(
        cls, arguments, optional_kept=tuple(exclusive - set(arguments)) if cls is PixelCNN else ()
    )


def tiny_prior(**kwargs) -> PixelCNN:
    keras.utils.set_random_seed(0)
    defaults = dict(num_embeddings=8, num_layers=2, filters=8, embedding_dim=4, code_shape=(5, 5))
    prior = PixelCNN(**(defaults | kwargs))
    prior(tf.zeros((1, *prior.code_shape), tf.int32), tf.zeros((1,), tf.int32))
    return prior


@pytest.mark.parametrize("conditional", [True, False])
def test_keras_round_trip_keeps_masks_and_outputs(tmp_path, conditional):
    # The conditional case also reads a slice context (previous slice, positions).
    prior = tiny_prior(
        conditional=conditional,
        position_embedding=conditional,
        previous_slice=conditional,
        slice_positions=3 if conditional else 0,
    )
    codes = np.random.default_rng(0).integers(0, 8, (3, 5, 5)).astype(np.int32)
    labels = np.array([0, 1, -1], np.int32)
    context = (codes[::-1].copy(), np.array([0, 2, -1], np.int32)) if conditional else ()
    path = tmp_path / "prior.keras"
    prior.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded(codes, labels, *context).numpy(), prior(codes, labels, *context).numpy()
    )
    masks = [w for w in loaded.non_trainable_weights if w.path.endswith("mask")]
    assert len(masks) == 3
    np.testing.assert_array_equal(masks[0].numpy(), causal_mask((1, 3), "A"))
    np.testing.assert_array_equal(masks[1].numpy(), causal_mask((1, 3), "B"))
    assert loaded.code_shape == (5, 5) and loaded.conditional is conditional
    assert loaded.position_embedding is conditional


def test_the_position_embedding_tells_the_prior_where_a_code_is():
    # On a blank map, positions whose receptive field stays inside the map and sees the same
    # codes get the same logits from a convolutional prior; with a position embedding they differ.
    codes = np.zeros((1, 12, 12), np.int32)
    inner = (slice(None), slice(7, 9), slice(5, 7))  # beyond the 3-row reach of 2 + 1 blocks
    plain = tiny_prior(code_shape=(12, 12))(codes).numpy()[inner]
    np.testing.assert_allclose(plain, np.broadcast_to(plain[:, :1, :1], plain.shape), atol=1e-6)
    placed = tiny_prior(code_shape=(12, 12), position_embedding=True)(codes).numpy()[inner]
    assert np.abs(placed - placed[:, :1, :1]).max() > 1e-3
    with pytest.raises(ValueError, match="needs a code_shape"):
        PixelCNN(num_embeddings=8, position_embedding=True)


def test_a_prior_with_positions_samples_its_own_code_shape_only():
    from keras_vqpix.sampling import sample_codes

    prior = tiny_prior(position_embedding=True)
    with pytest.raises(ValueError, match=r"prior's own \(5, 5\).*code_shape=\(6, 5\)"):
        sample_codes(prior, 1, code_shape=(6, 5))
    assert sample_codes(prior, 1, code_shape=(5, 5)).shape == (1, 5, 5)


def test_logits_are_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        prior = PixelCNN(num_embeddings=8, num_layers=1, filters=8, embedding_dim=4)
        logits = prior(tf.zeros((2, 4, 4), tf.int32), tf.constant([0, 1]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert logits.dtype == tf.float32 and logits.shape == (2, 4, 4, 8)


# -- Conditioning -----------------------------------------------------------------------------------


def test_conditioning_changes_the_output_and_minus_one_is_unconditional():
    prior = tiny_prior()
    codes = np.random.default_rng(1).integers(0, 8, (2, 5, 5)).astype(np.int32)

    def logits(label):
        return prior(codes, None if label is None else np.full(2, label, np.int32)).numpy()

    nc, ad, unconditional = logits(0), logits(1), logits(-1)
    assert np.abs(nc - ad).max() > 1e-4
    assert np.abs(nc - unconditional).max() > 1e-4
    np.testing.assert_array_equal(logits(None), unconditional)


def test_unconditional_prior_ignores_labels():
    prior = tiny_prior(conditional=False)
    codes = np.random.default_rng(1).integers(0, 8, (2, 5, 5)).astype(np.int32)
    assert not any("label" in w.path for w in prior.weights)
    np.testing.assert_array_equal(
        prior(codes, np.array([0, 0])).numpy(), prior(codes, np.array([1, -1])).numpy()
    )


@pytest.mark.parametrize("label_dropout", [0.0, 0.5])
def test_label_dropout_trains_the_unconditional_embedding(label_dropout):
    prior = tiny_prior(label_dropout=label_dropout, seed=0)
    prior.compile(optimizer=keras.optimizers.SGD(0.1))
    table = prior.blocks[0].horizontal_label.embeddings
    before = table.numpy()
    codes = np.random.default_rng(2).integers(0, 8, (16, 5, 5)).astype(np.int32)
    labels = np.tile(np.array([0, 1], np.int32), 8)
    prior.fit(codes, labels, batch_size=16, epochs=2, verbose=0)
    changed = np.abs(table.numpy() - before).max(axis=1) > 0
    assert changed[0] and changed[1]
    assert changed[2] == (label_dropout > 0)  # row 2: the "unconditional" label


def test_training_reports_bits_per_code():
    prior = tiny_prior()
    # SGD: Keras' Adam takes seconds longer to trace, for nothing this test checks.
    prior.compile(optimizer=keras.optimizers.SGD(0.5))
    codes = np.zeros((8, 5, 5), np.int32)
    history = prior.fit(codes, np.zeros(8, np.int32), batch_size=8, epochs=3, verbose=0).history
    np.testing.assert_allclose(
        history["bits_per_code"], np.array(history["loss"]) / np.log(2), rtol=1e-5
    )
    assert history["bits_per_code"][-1] < history["bits_per_code"][0]


# The prior's training recipe of 0.1.0 and 0.2.0: a constant learning rate of 1e-3.
CONSTANT_RATE = {"prior.learning_rate": 1e-3, "prior.final_learning_rate_ratio": 1.0}
# The prior those versions wrote: that recipe, 32 channels, 20 epochs of unmirrored maps, no
# dropout.
EARLIER_PRIOR = {**CONSTANT_RATE, "prior.filters": 32, "prior.mirror": False, "prior.epochs": 20}
EARLIER_PRIOR |= {"prior.dropout": 0.0}


def read_as_written_before(preset: str, missing: tuple[str, ...]):
    """`RunConfig.from_dict` of the `config.json` an older version wrote for `preset`: its
    constant learning rate and 32 channels, and none of the prior fields `missing` (added
    since)."""
    from keras_vqpix.config import RunConfig

    old = get_config(preset).replace(**EARLIER_PRIOR).to_dict()
    for name in (*missing, "final_learning_rate_ratio", "mirror"):
        del old["prior"][name]
    return RunConfig.from_dict(old)


def test_a_config_json_written_before_dilation_reads_as_the_undilated_run_it_was():
    config = read_as_written_before(  # as 0.1.0 wrote it
        "default", ("dilation_cycle", "previous_slice", "slice_positions", "previous_dropout")
    )
    assert config.prior == get_config("default-undilated").replace(**EARLIER_PRIOR).prior
    assert config != get_config("default")  # resuming it with the new default is refused


def test_a_config_json_written_before_slice_context_reads_as_the_per_slice_run_it_was():
    config = read_as_written_before(  # as 0.2.0 wrote it
        "patients", ("previous_slice", "slice_positions", "previous_dropout")
    )
    assert config.prior == get_config("default-positionless").replace(**EARLIER_PRIOR).prior
    assert not PixelCNN.from_run_config(config.prior, 256, (32, 32)).has_slice_context
