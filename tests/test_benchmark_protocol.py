"""benchmarks/vit.py: the sweep grid, the schedules and the table, without training."""

import os
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import vit as module
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    return module


def test_sweep_grid_spans_30x_with_both_schedules(bench):
    table = bench.sweep_table(bench.LEARNING_RATES)
    assert table["kfac_expand"] == [{}] and table["kfac_reduce"] == [{"weight_sharing": "reduce"}]
    for kind in bench.FIRST_ORDER:
        rates = sorted({c["learning_rate"] for c in table[kind]})
        assert len(rates) >= 4 and rates[-1] / rates[0] >= 30
        assert {c["schedule"] for c in table[kind]} == {"constant", "cosine"}
        assert len(table[kind]) == 2 * len(rates)


def test_warmup_cosine_schedule_and_optimizers(bench):
    schedule = bench.learning_rate({"learning_rate": 1e-3, "schedule": "cosine"}, 100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(1e-3)  # the end of the 5% warm-up
    assert float(schedule(50)) < 1e-3 and float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
    assert bench.learning_rate({"learning_rate": 3e-3, "schedule": "constant"}, 100) == 3e-3
    assert bench.make_optimizer("kfac_reduce", {"weight_sharing": "reduce"}, 10).weight_sharing == "reduce"
    muon = bench.make_optimizer("muon", {"learning_rate": 1e-3, "schedule": "cosine"}, 10)
    assert isinstance(muon, keras.optimizers.Muon) and muon.exclude_layers == ["predictions"]
    assert isinstance(bench.make_optimizer("adamw", {"learning_rate": 1e-3}, 10), keras.optimizers.AdamW)


def _run(kind, seed, accuracies, step_ms):
    return {
        "kind": kind,
        "seed": seed,
        "settings": {} if kind.startswith("kfac") else {"learning_rate": 1e-3, "schedule": "cosine"},
        "losses": [2.0, 1.5, 1.0, 0.8, 0.7, 0.6, 0.5],
        "step_seconds": [5.0] + [step_ms / 1e3] * 6,
        "evals": [{"step": 2 * (i + 1), "seconds": 0.1 * (i + 1), "accuracy": a} for i, a in enumerate(accuracies)],
        "skipped_steps": 0,
    }


def test_table_targets_the_best_first_order_final_accuracy(bench):
    runs = {
        "kfac_expand": [_run("kfac_expand", s, [0.7, 0.85, 0.9], 12.0) for s in (0, 1)],
        "adamw": [_run("adamw", s, [0.6, 0.8, 0.86], 10.0) for s in (0, 1)],
        "muon": [_run("muon", s, [0.5, 0.7, 0.8], 10.0) for s in (0, 1)],
    }
    table = bench.summarize(runs)
    assert table["_best_first_order"] == "adamw" and table["_target_accuracy"] == pytest.approx(0.86)
    assert table["kfac_expand"]["steps_to_target"] == 6  # 0.9 at step 6 is the first eval >= 0.86
    assert table["adamw"]["steps_to_target"] == 6
    assert table["muon"]["steps_to_target"] is None and table["muon"]["seeds_reaching_target"] == 0
    assert table["kfac_expand"]["step_ratio_to_adamw"] == pytest.approx(1.2)
    text = bench.markdown(128, table, [0, 1])
    assert "adamw's final acc. (0.8600)" in text and "| kfac_expand | KFAC() | 6 |" in text
