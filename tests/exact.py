"""K-FAC settings under which one step is exactly the damped Kronecker solve of the batch's
own factors (no moving averages, no momentum, no grafting, inverses every step, every example and
location in the statistics, no average of the weights), so that it
can be compared with a float64 NumPy reference."""

import keras_kfac


def exact_kfac(**overrides) -> keras_kfac.KFAC:
    """`overrides` must give `learning_rate` and `damping`; any other setting may be changed."""
    settings = dict(
        momentum=0.0,
        stats_decay=0.0,
        inverse_every=1,
        fisher="empirical",
        damping_mode="eigen",
        graft=None,
        stats_every=1,
        stats_batch_size=None,
        stats_locations=None,
        input_stats_batch_size=None,
        polynomial_averaging=None,
    )
    return keras_kfac.KFAC(**{**settings, **overrides})
