"""Embedding and EinsumDense blocks (and Dense over sequences) with KFAC-expand and KFAC-reduce:
one exact K-FAC step against float64 NumPy references (forward and backward passes by hand,
layouts of the gradient matrices written out per layer, dense np.kron solves), the equation
parsing, IndexedSlices gradients, and a tiny Transformer classifier trained with KFAC."""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from exact import exact_kfac

import keras_kfac
from keras_kfac.blocks import (
    BlockOptions,
    DenseBlock,
    DenseExpandBlock,
    DenseReduceBlock,
    EinsumDenseBlock,
    EinsumDenseExpandBlock,
    EinsumDenseReduceBlock,
    EmbeddingBlock,
    block_for_layer,
)

LR, DAMPING = 0.5, 1e-2
TOL = 2e-4  # float32 against float64, as tests/test_one_step.py


def _f64(v):
    return np.asarray(v, dtype=np.float64)


# ----------------------------------------------------------------------- NumPy references
def _factors(rows_a, rows_g, has_bias, sharing):
    """A and G from per-example rows: rows_a (m, P, in), rows_g (m, P, out), written directly
    from the definitions (module doc of keras_kfac/blocks/einsum_dense.py)."""
    m, p, _ = rows_a.shape
    if has_bias:
        rows_a = np.concatenate([rows_a, np.ones((m, p, 1))], axis=2)
    if sharing == "expand":
        a = sum(np.outer(rows_a[n, t], rows_a[n, t]) for n in range(m) for t in range(p)) / (m * p)
        g = sum(np.outer(rows_g[n, t], rows_g[n, t]) for n in range(m) for t in range(p)) / m
    else:
        a = sum(np.outer(rows_a[n].mean(0), rows_a[n].mean(0)) for n in range(m)) / m
        g = sum(np.outer(rows_g[n].sum(0), rows_g[n].sum(0)) for n in range(m)) / m
    return a, g


def einsum_reference(x, y, w, sharing, mode):
    """x (m, T, D) → q: "abc,cde->abde" tanh → o: "abcd,cde->abe" tanh → dense: Dense tanh →
    perm: "abc,dc->adb" tanh (bias (F2, 1)) → Flatten → head: "ab,bc->ac" softmax.
    Returns per layer {A, G, kernel, bias} after one exact K-FAC step."""
    m = x.shape[0]
    (k1, b1), (k2, b2), (w3, b3), (k4, b4), (k5, b5) = (w[n] for n in ("q", "o", "dense", "perm", "head"))
    h1 = np.tanh(np.einsum("abc,cde->abde", x, k1) + b1)
    h2 = np.tanh(np.einsum("abcd,cde->abe", h1, k2) + b2)
    h3 = np.tanh(h2 @ w3 + b3)
    h4 = np.tanh(np.einsum("abc,dc->adb", h3, k4) + b4)
    f = h4.reshape(m, -1)
    p = ref.softmax(f @ k5 + b5)
    # Per-example gradients of each example's own loss w.r.t. each pre-activation.
    g5 = p - np.eye(k5.shape[1])[y]
    g4 = (g5 @ k5.T).reshape(h4.shape) * (1 - h4**2)
    g3 = np.einsum("adb,dc->abc", g4, k4) * (1 - h3**2)
    g2 = (g3 @ w3.T) * (1 - h2**2)
    g1 = np.einsum("abe,cde->abcd", g2, k2) * (1 - h1**2)
    # Gradients of the mean loss, straight from the layer equations.
    grads = {
        "q": (np.einsum("abc,abde->cde", x, g1) / m, g1.sum((0, 1)) / m),
        "o": (np.einsum("abcd,abe->cde", h1, g2) / m, g2.sum((0, 1)) / m),
        "dense": (np.einsum("abc,abd->cd", h2, g3) / m, g3.sum((0, 1)) / m),
        "perm": (np.einsum("abc,adb->dc", h3, g4) / m, g4.sum((0, 2))[:, None] / m),
        "head": (f.T @ g5 / m, g5.sum(0) / m),
    }
    t = x.shape[1]
    # Rows (m, positions, features) and gradient matrices (dim_a, dim_g), laid out by hand.
    layout = {
        "q": (x, g1.reshape(m, t, -1), lambda k: k.reshape(k.shape[0], -1), lambda u, k: u.reshape(k.shape)),
        "o": (h1.reshape(m, t, -1), g2, lambda k: k.reshape(-1, k.shape[2]), lambda u, k: u.reshape(k.shape)),
        "dense": (h2, g3, lambda k: k, lambda u, k: u),
        "perm": (h3, g4.transpose(0, 2, 1), lambda k: k.T, lambda u, k: u.T),
        "head": (f[:, None, :], g5[:, None, :], lambda k: k, lambda u, k: u),
    }
    out = {}
    for name, (rows_a, rows_g, to_mat, from_mat) in layout.items():
        kernel, bias = w[name]
        dk, db = grads[name]
        a, g = _factors(rows_a, rows_g, True, sharing)
        v = np.concatenate([to_mat(dk), db.reshape(1, -1)], axis=0)
        u = ref.kron_solve(a, g, v, DAMPING, mode)
        out[name] = dict(
            A=a, G=g, kernel=kernel - LR * from_mat(u[:-1], kernel), bias=bias - LR * u[-1].reshape(bias.shape)
        )
    return out


def embedding_reference(ids, y, table, head, case, mode):
    """One exact K-FAC step of the Embedding of `case` (see `_embedding_model`)."""
    m = ids.shape[0]
    vocab, d = table.shape
    w, b = head
    e = table[ids]  # (m, *positions, d)
    if case.startswith("gap"):
        mask = (ids != 0).astype(np.float64) if case == "gap-mask" else np.ones(ids.shape)
        pooled = (e * mask[..., None]).sum(1) / mask.sum(1)[:, None]
        gz = ref.softmax(pooled @ w + b) - np.eye(w.shape[1])[y]
        g_e = (gz @ w.T)[:, None, :] * (mask / mask.sum(1)[:, None])[..., None]
    else:  # rank1 / rank3: the looked-up vectors are flattened into the head
        gz = ref.softmax(e.reshape(m, -1) @ w + b) - np.eye(w.shape[1])[y]
        g_e = (gz @ w.T).reshape(e.shape)
    flat_ids = ids.reshape(m, -1)
    flat_g = g_e.reshape(m, -1, d)
    counts = np.zeros(vocab)
    grad = np.zeros((vocab, d))
    for n in range(m):
        for t in range(flat_ids.shape[1]):
            counts[flat_ids[n, t]] += 1
            grad[flat_ids[n, t]] += flat_g[n, t] / m
    a = counts / flat_ids.size
    g = sum(np.outer(flat_g[n, t], flat_g[n, t]) for n in range(m) for t in range(flat_ids.shape[1])) / m
    u = ref.kron_solve(np.diag(a), g, grad, DAMPING, mode)
    return dict(A=a, G=g, table=table - LR * u)


# ------------------------------------------------------------------------ exact steps
def _einsum_model(t, d):
    return keras_kfac.Sequential(
        [
            keras.Input((t, d)),
            keras.layers.EinsumDense("abc,cde->abde", (t, 2, 2), bias_axes="de", activation="tanh", name="q"),
            keras.layers.EinsumDense("abcd,cde->abe", (t, 3), bias_axes="e", activation="tanh", name="o"),
            keras.layers.Dense(3, activation="tanh", name="dense"),
            keras.layers.EinsumDense("abc,dc->adb", (2, t), bias_axes="d", activation="tanh", name="perm"),
            keras.layers.Flatten(),
            keras.layers.EinsumDense("ab,bc->ac", 3, bias_axes="c", activation="softmax", name="head"),
        ]
    )


@pytest.mark.parametrize(
    "sharing, mode",
    [("expand", "eigen"), ("expand", "factored"), ("reduce", "eigen"), ("reduce", "factored"), (None, "factored")],
)
def test_einsum_dense_and_sequence_dense_step_matches_numpy(sharing, mode):
    """Factors and the updated kernels/biases of every layer, for equations with several
    input/output feature axes, a kernel whose output axis comes first and a bias of shape
    (F, 1), with either weight-sharing approximation; without one (None), the step is
    KFAC-expand's, the blocks' default."""
    rng = np.random.default_rng(3)
    m, t, d = 6, 4, 3
    x = rng.normal(size=(m, t, d)).astype("float32")
    y = rng.integers(0, 3, size=m)
    model = _einsum_model(t, d)
    layers = {layer.name: layer for layer in model.layers if layer.weights}
    weights = {name: (_f64(layer.kernel.numpy()), _f64(layer.bias.numpy())) for name, layer in layers.items()}
    used = sharing or "expand"
    expected = einsum_reference(_f64(x), y, weights, used, mode)
    opt = exact_kfac(learning_rate=LR, damping=DAMPING, damping_mode=mode, weight_sharing=sharing)
    # Compiled (graph) for eigen, eager for factored: both step paths, at half the compile time.
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", run_eagerly=mode == "factored")
    model.train_on_batch(x, y)
    kinds = {b.name: (b.kind, b.weight_sharing) for b in opt.blocks}
    assert kinds == {
        "q": ("EinsumDenseBlock", used),
        "o": ("EinsumDenseBlock", used),
        "dense": ("DenseBlock", used),
        "perm": ("EinsumDenseBlock", used),
        "head": ("EinsumDenseBlock", used),
    }
    factors = opt.factors()
    for name, layer in layers.items():
        a, g = factors[name]
        exp = expected[name]
        assert ref.rel_err(a.numpy(), exp["A"]) < TOL, name
        assert ref.rel_err(g.numpy(), exp["G"]) < TOL, name
        old_kernel, old_bias = weights[name]
        assert ref.rel_err(layer.kernel.numpy() - old_kernel, exp["kernel"] - old_kernel) < TOL, name
        assert ref.rel_err(layer.bias.numpy() - old_bias, exp["bias"] - old_bias) < TOL, name


def _embedding_model(case, vocab, d):
    if case == "rank1":
        shape, mask_zero, middle = (), False, []
    elif case == "rank3":
        shape, mask_zero, middle = (2, 3), False, [keras.layers.Flatten()]
    else:
        shape, mask_zero, middle = (5,), case == "gap-mask", [keras.layers.GlobalAveragePooling1D()]
    embedding = keras.layers.Embedding(vocab, d, mask_zero=mask_zero, name="tokens")
    head = keras.layers.Dense(3, activation="softmax", name="head")
    model = keras_kfac.Sequential([keras.Input(shape, dtype="int32"), embedding, *middle, head])
    return model, embedding, head, shape


@pytest.mark.parametrize(
    "case, mode",
    [("gap", "eigen"), ("gap-mask", "factored"), ("gap-mask", "eigen"), ("rank1", "factored"), ("rank3", "eigen")],
)
def test_embedding_step_matches_numpy(case, mode):
    """Token frequencies as the diagonal A, G over the looked-up vectors, and the embedding
    update of one exact step (ids of rank 1, 2 and 3; mask_zero with padding)."""
    rng = np.random.default_rng(4)
    vocab, d, m = 7, 3, 6
    model, embedding, head, shape = _embedding_model(case, vocab, d)
    ids = rng.integers(1 if case == "gap-mask" else 0, vocab, size=(m, *shape)).astype("int32")
    if case == "gap-mask":
        ids[:, 3:] = 0  # padding at the end of some sequences
        ids[0, 1:] = 0
    y = rng.integers(0, 3, size=m)
    table = _f64(embedding.embeddings.numpy())
    expected = embedding_reference(ids, y, table, (_f64(head.kernel.numpy()), _f64(head.bias.numpy())), case, mode)
    opt = exact_kfac(learning_rate=LR, damping=DAMPING, damping_mode=mode)
    compiled = (case, mode) == ("gap-mask", "eigen")  # one graph run (IndexedSlices through tf.function)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", run_eagerly=not compiled)
    model.train_on_batch(ids, y)
    block = opt.blocks[0]
    assert isinstance(block, EmbeddingBlock) and block.side_a.diagonal and not block.side_g.diagonal
    a, g = opt.factors()["tokens"]
    assert a.shape == (vocab,)
    assert ref.rel_err(a.numpy(), expected["A"]) < TOL
    assert ref.rel_err(g.numpy(), expected["G"]) < TOL
    assert ref.rel_err(embedding.embeddings.numpy() - table, expected["table"] - table) < TOL
    assert f"A {vocab} (diagonal) ⊗ G {d}x{d}" in model.kfac_summary(print_fn=None)


# --------------------------------------------------------------------- block-level checks
def test_embedding_a_side_is_diagonal_whatever_max_factor_size_says():
    layer = keras.layers.Embedding(50_000, 8)
    layer.build()
    for limit in (None, 8192, 4):
        block, reason = block_for_layer(layer, BlockOptions(max_factor_size=limit))
        assert reason == "" and block.side_a.diagonal and block.side_a.size == 50_000
        assert block.side_g.diagonal == (limit == 4)
    block, _ = block_for_layer(layer, BlockOptions(max_factor_size=None, damping_mode="factored"))
    # The diagonal A and its inverse, G (8x8) and its inverse: never 50,000².
    assert block.memory_bytes() == 4 * (2 * 50_000 + 2 * 64)


def _built_block(block):
    def add(shape, initializer, name):
        return tf.Variable(keras.initializers.get(initializer)(shape), name=name)

    block.build(add)
    return block


def test_embedding_multiply_inverse_accepts_indexed_slices():
    layer = keras.layers.Embedding(6, 3)
    layer.build()
    block = _built_block(EmbeddingBlock(layer, BlockOptions(damping_mode="eigen")))
    rng = np.random.default_rng(5)
    ids = tf.constant([[1, 2, 2], [5, 1, 0]])
    grads = tf.constant(rng.normal(size=(2, 3, 3)), tf.float32)
    block.update_statistics(block.batch_statistics([ids], [grads], 2), 0.0)
    block.assign_inverse(*block.compute_inverse(1e-2))
    values = tf.constant(rng.normal(size=(4, 3)), tf.float32)
    indices = tf.constant([4, 1, 4, 0])  # a repeated id is summed
    sparse = tf.IndexedSlices(values, indices, dense_shape=tf.constant([6, 3]))
    dense = tf.math.unsorted_segment_sum(values, indices, 6)
    (from_sparse,) = block.multiply_inverse([sparse], 1e-2)
    (from_dense,) = block.multiply_inverse([dense], 1e-2)
    np.testing.assert_allclose(from_sparse.numpy(), from_dense.numpy(), rtol=1e-6)
    assert from_sparse.shape == (6, 3)


@pytest.mark.parametrize(
    "equation, output_shape, bias_axes, input_shape, in_chars, out_chars, positions",
    [
        ("ab,bc->ac", 4, "c", (3,), "b", "c", ""),
        ("abc,cde->abde", (5, 2, 3), "de", (5, 4), "c", "de", "b"),
        ("abcd,cde->abe", (5, 3), "e", (5, 2, 4), "cd", "e", "b"),
        ("abc,dc->adb", (2, 5), "d", (5, 4), "c", "d", "b"),
        ("...b,bc->...c", 4, None, (5, 6, 3), "b", "c", "BC"),
    ],
)
def test_einsum_layout_and_gradient_matrix_round_trip(
    equation, output_shape, bias_axes, input_shape, in_chars, out_chars, positions
):
    layer = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    layer.build((None, *input_shape))
    block, reason = block_for_layer(layer)
    assert reason == "" and isinstance(block, EinsumDenseBlock)
    layout = block.layout
    assert (layout.in_chars, layout.out_chars, layout.positions) == (in_chars, out_chars, positions)
    assert block.dim_a * block.dim_g == sum(int(np.prod(v.shape)) for v in block.variables)
    grads = [tf.random.normal(v.shape) for v in block.variables]
    back = block.from_matrix(block.to_matrix(grads))
    for g, b in zip(grads, back):
        np.testing.assert_array_equal(g.numpy(), b.numpy())
    assert block.to_matrix(grads).shape == (block.dim_a, block.dim_g)


def test_ellipsis_einsum_gives_the_factors_of_the_equivalent_dense():
    x = tf.random.normal((4, 5, 3))
    g = tf.random.normal((4, 5, 2))
    dense = keras.layers.Dense(2)
    dense.build((None, 5, 3))
    einsum = keras.layers.EinsumDense("...b,bc->...c", 2, bias_axes="c")
    einsum.build((None, 5, 3))
    pairs = (
        (DenseBlock, EinsumDenseBlock),
        (DenseExpandBlock, EinsumDenseExpandBlock),
        (DenseReduceBlock, EinsumDenseReduceBlock),
    )
    for dense_cls, einsum_cls in pairs:
        expected = dense_cls(dense).batch_statistics([x], [g], 4)
        got = einsum_cls(einsum).batch_statistics([x], [g], 4)
        for e, o in zip(expected, got):
            np.testing.assert_allclose(o.numpy(), e.numpy(), rtol=1e-5, atol=1e-6)
    # Expand (the default) differs from reduce on sequences, against the float64 definitions.
    x64, g64 = _f64(x), _f64(g)
    defaults = ((EinsumDenseBlock, "expand"), (EinsumDenseExpandBlock, "expand"), (EinsumDenseReduceBlock, "reduce"))
    stats = {}
    for cls, sharing in defaults:
        a, gg = _factors(x64, g64, True, sharing)
        block = cls(einsum)
        stats[cls] = block.batch_statistics([x], [g], 4)
        assert block.weight_sharing == sharing
        assert ref.rel_err(stats[cls][0].numpy(), a) < 1e-5 and ref.rel_err(stats[cls][1].numpy(), gg) < 1e-5
    assert not np.allclose(stats[EinsumDenseReduceBlock][1].numpy(), stats[EinsumDenseBlock][1].numpy())
    assert EinsumDenseBlock(einsum, weight_sharing="reduce").weight_sharing == "reduce"
    with pytest.raises(ValueError, match="weight_sharing"):
        EinsumDenseBlock(einsum, weight_sharing="sum")


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: keras.layers.EinsumDense("abc,bc->ac", 5), "elementwise"),  # c in input, kernel, output
        (lambda: keras.layers.EinsumDense("abc,cd->abd", (4, 3), bias_axes="bd"), "bias_axes"),
        (lambda: keras.layers.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="e"), "bias_axes"),
        (lambda: keras.layers.EinsumDense("ab,bc->ac", 3, lora_rank=2), "LoRA"),
        (lambda: keras.layers.Embedding(10, 3, lora_rank=2), "LoRA"),
    ],
)
def test_unsupported_settings_go_to_the_fallback(make, reason):
    layer = make()
    if isinstance(layer, keras.layers.Embedding):
        layer.build()
    else:
        rank = 2 if layer.equation.startswith("ab,") else 3
        layer.build((None, 4, 5)[:rank])
    block, why = block_for_layer(layer)
    assert block is None and reason in why


def test_quantized_embedding_goes_to_the_fallback():
    layer = keras.layers.Embedding(10, 4)
    layer.build()
    layer.quantize("int8")
    block, why = block_for_layer(layer)
    assert block is None and "quantized" in why


def test_weight_sharing_option_reaches_the_blocks():
    inputs = keras.Input((4, 3))
    hidden = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 5), bias_axes="d")(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.Dense(3)(hidden))
    model = keras_kfac.Model(inputs, outputs)
    # None: each block's default, KFAC-expand for Dense and EinsumDense.
    for option, used in (("reduce", "reduce"), (None, "expand"), ("expand", "expand")):
        opt = keras_kfac.KFAC(weight_sharing=option)
        model.compile(optimizer=opt, loss="mse")
        opt.build(model.trainable_variables)
        assert [b.weight_sharing for b in opt.blocks] == [used] * 3
        assert keras_kfac.KFAC.from_config(opt.get_config()).weight_sharing == option
        assert opt.block_options.weight_sharing == option
    with pytest.raises(ValueError, match="weight_sharing"):
        keras_kfac.KFAC(weight_sharing="sum")


# ------------------------------------------------------------------------- a Transformer
def _transformer(vocab, t):
    inputs = keras.Input((t,), dtype="int32")
    x = keras.layers.Embedding(vocab, 16, name="tokens")(inputs)
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(x, x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="classifier")(x)
    return keras_kfac.Model(inputs, outputs)


def test_transformer_classifier_trains_with_kfac_and_lists_the_attention_projections():
    rng = np.random.default_rng(6)
    vocab, t, m = 20, 8, 256
    ids = rng.integers(0, vocab, size=(m, t)).astype("int32")
    y = (ids == 3).any(axis=1).astype("int32")  # does token 3 occur?
    model = _transformer(vocab, t)
    opt = keras_kfac.KFAC(learning_rate=0.01, fisher="empirical", stats_every=2, inverse_every=4)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    history = model.fit(ids, y, batch_size=32, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    assert int(opt.skipped_steps.numpy()) == 0
    kinds = {b.name: b.kind for b in opt.blocks}
    assert kinds == {
        "tokens": "EmbeddingBlock",
        "query": "EinsumDenseBlock",
        "key": "EinsumDenseBlock",
        "value": "EinsumDenseBlock",
        "attention_output": "EinsumDenseBlock",
        "classifier": "DenseBlock",
    }
    text = model.kfac_summary(print_fn=None)
    for name in ("query", "key", "value", "attention_output"):
        assert any(line.startswith(name) and "EinsumDenseBlock" in line for line in text.splitlines()), text
    assert "Trainable parameters under curvature blocks" in text and "(100.0%)" in text


@pytest.mark.parametrize(
    "sharing, named", [(None, "KFAC-expand"), ("reduce", "KFAC-reduce"), ("expand", "KFAC-expand")]
)
def test_transformer_summary_names_the_weight_sharing(sharing, named):
    model = _transformer(20, 8)
    opt = keras_kfac.KFAC(fisher="empirical", weight_sharing=sharing)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    text = model.kfac_summary(print_fn=None)
    for name in ("query", "key", "value", "attention_output"):
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert "EinsumDenseBlock" in line and named in line
    # The classifier sees one vector per example (no shared positions): its line names neither.
    classifier = next(line for line in text.splitlines() if line.startswith("classifier"))
    assert "DenseBlock" in classifier and "KFAC-" not in classifier
    assert "(100.0%)" in text
