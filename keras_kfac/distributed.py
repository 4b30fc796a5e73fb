"""K-FAC under `tf.distribute` (MirroredStrategy, MultiWorkerMirroredStrategy): data parallel.

Every replica keeps a full copy of the factors and inverses and ends each step with the same
values as the others:

- statistics steps: each replica computes (A, G) from its part of the batch and the estimates
  are averaged over the replicas (one all-reduce); equal per-replica batches give the factors
  of the global batch;
- inversion steps: each block is inverted by one replica (blocks spread over the replicas by
  cost, largest first onto the least loaded one) and shared by an all-reduce in which the
  other replicas contribute zeros (`distribute_inverses=False`: every replica inverts all);
- the update: Keras' all-reduce of the gradients, then the preconditioning of the reduced
  gradients, the same on every replica.

The statistics and inversions run under `tf.cond` in replica context, where TensorFlow's
`merge_call` (which `ReplicaContext.all_reduce` uses on CPU) is not allowed, so their
all-reduces call the strategy's collective ops directly. The weight update goes through
Keras' own code from a cross-replica `tf.cond`, as Keras' `LossScaleOptimizer` does.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kfac import linalg


def replicated() -> bool:
    """True inside `strategy.run` of a (non-default) strategy, one replica included."""
    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


def num_replicas() -> int:
    """Replicas in sync under the current strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_seed(seed: tf.Tensor) -> tf.Tensor:
    """`seed` on one device; under a strategy, `seed` folded with the replica id, so that the
    replicas draw independent sampled targets for their examples."""
    if not replicated():
        return seed
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    return tf.cast(tf.random.experimental.stateless_fold_in(seed, tf.cast(replica, tf.int32)), tf.int64)


def _collective_ops(strategy):
    """The strategy's `CollectiveAllReduce`, which reduces in replica context without merge_call."""
    extended = strategy.extended
    for name in ("_collective_ops", "_cross_device_ops"):
        ops = getattr(extended, name, None)
        if ops is not None and hasattr(ops, "_all_reduce") and hasattr(ops, "_launchers"):
            return ops
    raise NotImplementedError(
        f"K-FAC needs collective all-reduce ops under {type(strategy).__name__}; use MirroredStrategy or "
        "MultiWorkerMirroredStrategy."
    )


def all_reduce(values: list, op: str = "mean") -> list:
    """All-reduces a list of float32 tensors over the replicas ("sum" or "mean") from replica
    context, inside `tf.cond` too (no merge_call). Uses TensorFlow's private
    `CollectiveAllReduce._all_reduce`, the path TF itself takes when merge_call is off."""
    strategy = tf.distribute.get_strategy()
    if not values or strategy.num_replicas_in_sync == 1:  # no collective for a group of one
        return list(values)
    ctx = tf.distribute.get_replica_context()
    reduce_op = tf.distribute.ReduceOp.SUM if op == "sum" else tf.distribute.ReduceOp.MEAN
    options = getattr(strategy.extended, "_communication_options", None)
    if options is None:
        options = tf.distribute.experimental.CommunicationOptions()
    return list(_collective_ops(strategy)._all_reduce(reduce_op, list(values), ctx._replica_id, options))


def owners(costs: list, replicas: int) -> list:
    """Replica of each block: largest cost first onto the least loaded replica (ties: lowest id)."""
    load = [0] * replicas
    owner = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        target = min(range(replicas), key=lambda r: (load[r], r))
        owner[index] = target
        load[target] += costs[index]
    return owner


def inverse_cost(block) -> int:
    """Flops of a block's inversion, up to a constant: dim_a³ + dim_g³."""
    return block.dim_a**3 + block.dim_g**3


def reduce_statistics(batch: list, ok):
    """Averages the per-replica batch factors; returns (batch, ok) with ok from the averages."""
    if not replicated():
        return batch, ok
    flat = [t for pair in batch if pair is not None for t in pair]
    reduced = iter(all_reduce(flat, "mean"))
    out, ok = [], tf.constant(True)
    for pair in batch:
        if pair is None:
            out.append(None)
            continue
        pair = (next(reduced), next(reduced))
        ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(pair[0])))
        ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(pair[1])))
        out.append(pair)
    return out, ok


def update_inverses(opt):
    """`KFAC._update_inverses` with each block inverted by its owner replica and shared."""
    ctx = tf.distribute.get_replica_context()
    replica = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    owner = owners([inverse_cost(b) for b in opt.blocks], num_replicas())
    dtype = tf.as_dtype(opt.inverse_dtype)
    damping = opt.damping
    results = []
    for index, ((a, g), state) in enumerate(zip(opt._state.factors, opt._state.inverses)):
        if opt.damping_mode == "eigen":

            def compute(a=a, g=g):
                return [*linalg.symmetric_eigh(a, dtype), *linalg.symmetric_eigh(g, dtype)]

        else:

            def compute(a=a, g=g):
                new_a, new_g, ok = linalg.factored_inverses(a, g, damping, dtype)
                return [new_a, new_g, tf.cast(ok, tf.float32)]

        def zeros(state=state):
            shapes = [v.shape for v in state] + ([()] if opt.damping_mode != "eigen" else [])
            return [tf.zeros(s, tf.float32) for s in shapes]

        mine = tf.equal(replica, owner[index])
        results.append([tf.cast(t, tf.float32) for t in tf.cond(mine, compute, zeros)])
    flat = all_reduce([t for r in results for t in r], "sum")
    position = 0
    for state, local in zip(opt._state.inverses, results):
        shared = flat[position : position + len(local)]
        position += len(local)
        if opt.damping_mode == "eigen":
            for variable, value in zip(state, shared):
                variable.assign(value)
        else:
            ok = shared[2] > 0.5
            for variable, value in zip(state, shared[:2]):
                variable.assign(tf.where(ok, value, variable))
    return tf.constant(True)


def kfac_step(opt, grads, variables, loss, statistics_fn):
    """`KFAC.kfac_step` for one replica of a strategy; returns whether the step was applied."""
    local_ok = tf.reduce_all(tf.math.is_finite(tf.cast(loss, tf.float32)))
    for g in grads:
        if g is not None:
            local_ok = tf.logical_and(local_ok, tf.reduce_all(tf.math.is_finite(g)))
    # Non-finite anywhere skips the step everywhere.
    (bad,) = all_reduce([1.0 - tf.cast(local_ok, tf.float32)], "sum")
    finite = tf.equal(bad, 0.0)

    def collect():
        return opt._update_statistics(*statistics_fn())

    stats_ok = tf.cond(tf.logical_and(finite, opt.due(opt.stats_every)), collect, lambda: tf.constant(True))
    ok = tf.logical_and(finite, stats_ok)
    inverses = (lambda: update_inverses(opt)) if opt.distribute_inverses else opt._update_inverses
    tf.cond(tf.logical_and(ok, opt.due(opt.inverse_every)), inverses, lambda: tf.constant(False))

    present = [i for i, g in enumerate(grads) if g is not None]
    present_vars = [variables[i] for i in present]

    def apply_fn(gs):
        opt._kfac_active = True
        try:
            opt.apply(list(gs), present_vars)
        finally:
            opt._kfac_active = False

    def cross_replica(strategy, ok, gs):
        # `ok` is the same on every replica; Keras' apply (gradient all-reduce, update through
        # merge_call) runs from here, as Keras' LossScaleOptimizer does it.
        ok = strategy.experimental_local_results(ok)[0]

        def apply():
            strategy.extended.call_for_each_replica(apply_fn, args=(gs,))
            return tf.constant(True)

        def skip():
            opt._skipped_steps.assign_add(1)
            return tf.constant(False)

        return tf.cond(ok, apply, skip)

    tf.distribute.get_replica_context().merge_call(cross_replica, args=(ok, [grads[i] for i in present]))
    return ok
