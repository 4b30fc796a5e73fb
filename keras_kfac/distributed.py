"""How a K-FAC step meets `tf.distribute` (MirroredStrategy, MultiWorkerMirroredStrategy).

The step (`KFAC.kfac_step`) is written once and asks a reducer for the few things that differ
between one device and data-parallel replicas:

- `all_true(flag)`: a non-finite loss or gradient on any replica skips the step on all;
- `mean(tensors)`: statistics steps average each replica's batch estimates (one all-reduce;
  equal per-replica batches give the factors of the global batch);
- `update_inverses(blocks, damping)`: each block is inverted by one replica (blocks spread over
  the replicas by cost, largest first onto the least loaded one) and shared by an all-reduce in
  which the other replicas contribute zeros (`distribute_inverses=False`: every replica inverts
  all of them);
- `apply_if(ok, apply, skip, grads)`: the weight update goes through Keras' own code (its all-reduce
  of the gradients, then `update_step` through the strategy) from a cross-replica `tf.cond`, as
  Keras' `LossScaleOptimizer` does it.

On one device (`LocalReducer`) each of these is the identity or a plain `tf.cond`.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kfac import _private


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


def all_reduce(values: list, op: str = "mean") -> list:
    """All-reduces float32 tensors over the replicas ("sum" or "mean") from replica context."""
    if not values or num_replicas() == 1:  # no collective for a group of one
        return list(values)
    reduce_op = tf.distribute.ReduceOp.SUM if op == "sum" else tf.distribute.ReduceOp.MEAN
    return _private.collective_all_reduce(values, reduce_op)


def owners(costs: list, replicas: int) -> list:
    """Replica of each block: largest cost first onto the least loaded replica (ties: lowest id)."""
    load = [0] * replicas
    owner = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        target = min(range(replicas), key=lambda r: (load[r], r))
        owner[index] = target
        load[target] += costs[index]
    return owner


class LocalReducer:
    """One device: nothing to reduce."""

    replicated = False

    def all_true(self, flag):
        return flag

    def mean(self, tensors: list) -> list:
        return list(tensors)

    def update_inverses(self, blocks, damping) -> None:
        for block in blocks:
            values, ok = block.compute_inverse(damping)
            block.assign_inverse(values, ok)

    def apply_if(self, ok, apply, skip, grads: list):
        """`apply(grads)` when `ok`, else `skip()`."""
        return tf.cond(ok, lambda: apply(grads), skip)


class ReplicaReducer(LocalReducer):
    """Data-parallel replicas of a strategy (see module doc)."""

    replicated = True

    def __init__(self, distribute_inverses: bool = True):
        self.distribute_inverses = distribute_inverses

    def all_true(self, flag):
        (bad,) = all_reduce([1.0 - tf.cast(flag, tf.float32)], "sum")
        return tf.equal(bad, 0.0)

    def mean(self, tensors: list) -> list:
        return all_reduce(list(tensors), "mean")

    def update_inverses(self, blocks, damping) -> None:
        if not self.distribute_inverses:
            return super().update_inverses(blocks, damping)
        replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int32)
        owner = owners([b.inverse_cost() for b in blocks], num_replicas())
        results = []
        for index, block in enumerate(blocks):

            def compute(block=block):
                values, ok = block.compute_inverse(damping)
                return [tf.cast(v, tf.float32) for v in values] + [tf.cast(ok, tf.float32)]

            def zeros(block=block):
                return [tf.zeros(v.shape, tf.float32) for v in block.inverse_variables] + [tf.zeros((), tf.float32)]

            results.append(tf.cond(tf.equal(replica, owner[index]), compute, zeros))
        flat = all_reduce([t for r in results for t in r], "sum")
        position = 0
        for block, local in zip(blocks, results):
            shared = flat[position : position + len(local)]
            position += len(local)
            block.assign_inverse(shared[:-1], shared[-1] > 0.5)

    def apply_if(self, ok, apply, skip, grads: list):
        # Per-replica values (each replica's gradients) reach the cross-replica function only
        # through merge_call's arguments.
        def cross_replica(strategy, ok, grads):
            # `ok` is the same on every replica; Keras' apply (gradient all-reduce, update
            # through merge_call) runs from here, as Keras' LossScaleOptimizer does it.
            ok = strategy.experimental_local_results(ok)[0]

            def apply_on_replicas():
                strategy.extended.call_for_each_replica(apply, args=(grads,))
                return tf.constant(True)

            return tf.cond(ok, apply_on_replicas, skip)

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(ok, list(grads)))
        return ok


def reducer(distribute_inverses: bool = True) -> LocalReducer:
    """The reducer for the current context: replicas inside `strategy.run`, else one device."""
    return ReplicaReducer(distribute_inverses) if replicated() else LocalReducer()
