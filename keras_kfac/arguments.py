"""Checks of the `KFAC` constructor arguments: each bad value is a ValueError naming it."""

from __future__ import annotations

import math


def check_number(name: str, value, low=None, high=None, low_open=False, high_open=False, integer=False) -> None:
    """Raises ValueError naming `name` unless `value` is a finite number with low (<|<=) value (<|<=) high."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"`{name}` must be {kind}; received {name}={value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite; received {name}={value!r}.")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"`{name}` must be in {left}{lo}, {hi}{right}; received {name}={value!r}.")


def is_auto(name: str, value, otherwise: str) -> bool:
    """True when `value` is the string "auto"; any other string is a ValueError saying that `name`
    must be `otherwise` or 'auto'."""
    if not isinstance(value, str):
        return False
    if value != "auto":
        raise ValueError(f"`{name}` must be {otherwise} or 'auto'; received {name}={value!r}.")
    return True


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}; received {name}={value!r}.")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False; received {name}={value!r}.")


def check_exclude(value) -> None:
    """`exclude`: None, a callable on the layer, or layer names (a string or a list of them)."""
    if value is None or callable(value) or isinstance(value, str):
        return
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return
    raise ValueError(
        "`exclude` must be None, a layer name, a list of layer names or a callable taking a layer; "
        f"received exclude={value!r}."
    )


def check_fallback(value) -> None:
    """`fallback`: None, a Keras optimizer, or a name/config that `keras.optimizers.get` resolves."""
    import keras

    if value is None or isinstance(value, keras.optimizers.Optimizer):
        return
    if not isinstance(value, (str, dict)):
        raise ValueError(
            "`fallback` must be None, a keras.optimizers.Optimizer, an optimizer name or a config dict; "
            f"received fallback={value!r}."
        )
    try:
        resolved = keras.optimizers.get(value)
    except (ValueError, TypeError) as error:
        raise ValueError(f"`fallback`={value!r} is not a Keras optimizer: {error}") from None
    if not isinstance(resolved, keras.optimizers.Optimizer):
        raise ValueError(f"`fallback`={value!r} is not a Keras optimizer.")
