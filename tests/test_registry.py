"""The block registry, `KFAC(exclude=...)`, diagonal factors above `max_factor_size`, and what
`kfac_summary` reports, each against a float64 NumPy reference where there is a number."""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from exact import exact_kfac

import keras_kfac
from keras_kfac.blocks import block_for_layer, registered_blocks

LR, DAMPING = 0.5, 1e-2


class Affine(keras.layers.Layer):
    """y = tanh(x·W + b): not a Dense (no `activation` attribute, its own call)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, shape):
        self.kernel = self.add_weight(shape=(shape[-1], self.units), name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="random_normal", name="bias")

    def call(self, x):
        return tf.tanh(x @ self.kernel + self.bias)


class AffineBlock(keras_kfac.KroneckerBlock):
    kind = "AffineBlock"

    def preactivation(self, x):
        return x @ self.layer.kernel + self.layer.bias

    def recording_call(self, call, record):
        def recorded(x, *args, **kwargs):
            pre = self.preactivation(x)
            record(x, pre)
            return tf.tanh(pre)

        return recorded

    def input_rows(self, x, locations=None, seed=None):
        return tf.reshape(x, (-1, self.in_features))


def _data(m=16, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, features)).astype("float32"), rng.integers(0, classes, size=m)


def test_a_registered_custom_layer_gets_its_block_and_the_exact_step():
    x, y = _data()
    assert Affine not in registered_blocks()
    assert block_for_layer(Affine(4))[0] is None  # unknown before registration
    keras_kfac.register_block(Affine, AffineBlock)
    try:
        affine, head = Affine(4), keras.layers.Dense(3, activation="softmax")
        model = keras_kfac.Sequential([keras.Input((5,)), affine, head])
        before = [
            (affine.kernel.numpy().astype(np.float64), affine.bias.numpy().astype(np.float64), "tanh"),
            (head.kernel.numpy().astype(np.float64), head.bias.numpy().astype(np.float64), "softmax"),
        ]
        expected = ref.mlp_step(x.astype(np.float64), y, before, LR, DAMPING, "eigen")
        opt = exact_kfac(learning_rate=LR, damping=DAMPING)
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        model.train_on_batch(x, y)
        assert [b.kind for b in opt.blocks] == ["AffineBlock", "DenseBlock"]
        assert opt.fallback_optimizer is None
        a, g = opt.factors()[affine.name]
        assert ref.rel_err(a.numpy(), expected[0]["A"]) < 2e-4
        assert ref.rel_err(g.numpy(), expected[0]["G"]) < 2e-4
        assert ref.rel_err(affine.kernel.numpy(), expected[0]["kernel"]) < 2e-4
        assert ref.rel_err(affine.bias.numpy(), expected[0]["bias"]) < 2e-4
        assert "AffineBlock" in model.kfac_summary(print_fn=None)
    finally:
        from keras_kfac.blocks import registry

        registry._BLOCKS.pop(Affine, None)


def test_register_block_checks_its_arguments():
    with pytest.raises(TypeError, match="layer_class"):
        keras_kfac.register_block(int, AffineBlock)
    with pytest.raises(TypeError, match="block_class"):
        keras_kfac.register_block(Affine, dict)


def test_a_subclass_that_overrides_call_gets_no_inherited_block():
    class Doubled(keras.layers.Dense):
        def call(self, inputs):
            return 2.0 * super().call(inputs)

    layer = Doubled(3)
    layer.build((None, 4))
    block, reason = block_for_layer(layer)
    assert block is None and "overrides call()" in reason


@pytest.mark.parametrize(
    "exclude", ["first", ["first"], lambda layer: layer.name == "first"], ids=["name", "list", "callable"]
)
def test_excluded_layers_go_to_the_fallback(exclude):
    x, y = _data()
    model = keras_kfac.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh", name="first"),
            keras.layers.Dense(3, activation="softmax", name="second"),
        ]
    )
    kernel = model.layers[0].kernel.numpy().copy()
    opt = keras_kfac.KFAC(learning_rate=0.1, exclude=exclude)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    assert [b.name for b in opt.blocks] == ["second"]
    assert opt.fallback_optimizer is not None
    assert not np.array_equal(kernel, model.layers[0].kernel.numpy())  # trained by the fallback
    summary = model.kfac_summary(print_fn=None)
    assert "first (Dense" in summary and "excluded by KFAC(exclude=...)" in summary


def test_exclude_must_be_names_or_a_callable():
    with pytest.raises(ValueError, match="exclude"):
        keras_kfac.KFAC(exclude=3)


def test_a_side_above_max_factor_size_keeps_its_diagonal_and_the_step_solves_with_it():
    x, y = _data(m=32, features=3)
    wide, head = keras.layers.Dense(12, activation="tanh"), keras.layers.Dense(3, activation="softmax")
    model = keras_kfac.Sequential([keras.Input((3,)), wide, head])
    before = [
        (wide.kernel.numpy().astype(np.float64), wide.bias.numpy().astype(np.float64), "tanh"),
        (head.kernel.numpy().astype(np.float64), head.bias.numpy().astype(np.float64), "softmax"),
    ]
    expected = ref.mlp_step(x.astype(np.float64), y, before, LR, DAMPING, "eigen")
    opt = exact_kfac(learning_rate=LR, damping=DAMPING, max_factor_size=10)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    block = opt.blocks[0]
    assert block.side_g.diagonal and not block.side_a.diagonal  # G is 12 wide, A is 4 (3 inputs + bias)
    a, g = opt.factors()[wide.name]
    assert g.shape == (12,)
    assert ref.rel_err(g.numpy(), np.diag(expected[0]["G"])) < 2e-4
    # The reference step with G replaced by its diagonal.
    u = ref.kron_solve(expected[0]["A"], np.diag(np.diag(expected[0]["G"])), expected[0]["grad"], DAMPING, "eigen")
    step = np.concatenate([wide.kernel.numpy() - before[0][0], (wide.bias.numpy() - before[0][1])[None]])
    assert ref.rel_err(step, -LR * u) < 2e-4
    summary = model.kfac_summary(print_fn=None)
    assert "G 12 (diagonal)" in summary and "A 4x4" in summary


def test_the_default_limit_keeps_a_50000_wide_output_side_diagonal():
    layer = keras.layers.Dense(50_000)
    layer.build((None, 64))
    block, _ = block_for_layer(layer, keras_kfac.KFAC().block_options)
    assert block.side_g.diagonal and not block.side_a.diagonal
    # A 65x65 (and its inverse) plus G's diagonal (and its inverse): far from 50,000².
    assert block.memory_bytes() == 4 * (2 * 65 * 65 + 2 * 50_000)


def test_summary_gives_memory_and_the_share_of_parameters_under_blocks():
    model = keras_kfac.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, name="fc"),
            keras.layers.PReLU(name="act"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ]
    )
    opt = keras_kfac.KFAC(damping_mode="eigen")
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    text = model.kfac_summary(print_fn=None)
    # fc: A 6x6, G 4x4; out: A 5x5, G 3x3; eigen keeps factors, eigenvalues and eigenvectors.
    fc_bytes = 4 * (2 * 36 + 6 + 2 * 16 + 4)
    assert f"{fc_bytes / 2**20:.3f}" in text.splitlines()[1]
    assert "act (PReLU, 4 parameters): no block for this layer kind" in text
    assert text.splitlines()[-1] == "Trainable parameters under curvature blocks: 39 of 43 (90.7%)"
