"""The benchmarks' protocol (benchmarks/compare_optimizers.py, used by benchmarks/vit.py): the sweep
grids, the schedules, the optimizers of each row, the schedule-free evaluation point, the table
against the best first-order row, and a tiny end-to-end run with --sweep-only and --resume."""

import argparse
import importlib
import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(name: str):
    """Imports benchmarks/<name>.py as a module."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


@pytest.fixture(scope="module")
def modules():
    return _benchmark("compare_optimizers"), _benchmark("vit")


def _check_grid(table, first_order, kfac_rows):
    for kind, settings in kfac_rows.items():
        assert table[kind] == [settings]  # K-FAC rows are not swept
    for kind in first_order:
        rates = sorted({c["learning_rate"] for c in table[kind]})
        assert len(rates) >= 4 and rates[-1] / rates[0] >= 30
        assert {c["schedule"] for c in table[kind]} == {"constant", "cosine"}
        assert len(table[kind]) == 2 * len(rates)


def test_sweep_grids_span_30x_with_both_schedules(modules):
    compare, vit = modules
    assert set(compare.FIRST_ORDER) == {"adam", "adamw", "muon", "sf_adamw", "sgd"}
    assert compare.KFAC_SETTINGS["kfac"] == {}  # KFAC() with the package defaults
    _check_grid(compare.SEED_TASK.table, compare.FIRST_ORDER, compare.KFAC_SETTINGS)
    _check_grid(vit.sweep_table(vit.LEARNING_RATES), vit.FIRST_ORDER, vit.KFAC_SETTINGS)


def test_warmup_cosine_schedule_and_optimizers(modules):
    compare, _ = modules
    schedule = compare.learning_rate({"learning_rate": 1e-3, "schedule": "cosine"}, 100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(1e-3)  # the end of the 5% warm-up
    assert float(schedule(50)) < 1e-3 and float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
    assert compare.learning_rate({"learning_rate": 3e-3, "schedule": "constant"}, 100) == 3e-3
    make = compare.make_optimizer
    assert make("kfac_reduce", {"weight_sharing": "reduce"}, 10).weight_sharing == "reduce"
    drop_name = lambda config: {k: v for k, v in config.items() if k != "name"}  # noqa: E731
    assert drop_name(make("kfac", {}, 10).get_config()) == drop_name(keras_kfac.KFAC().get_config())
    muon = make("muon", {"learning_rate": 1e-3, "schedule": "cosine"}, 10)
    assert isinstance(muon, keras.optimizers.Muon) and muon.exclude_layers == ["predictions"]
    assert isinstance(make("adamw", {"learning_rate": 1e-3}, 10), keras.optimizers.AdamW)
    sgd = make("sgd", {"learning_rate": 0.1, "schedule": "constant"}, 10)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.9
    free = make("sf_adamw", {"learning_rate": 3e-3, "schedule": "cosine"}, 200)
    assert isinstance(free, keras.optimizers.ScheduleFreeAdamW) and free.warmup_steps == 10
    assert make("sf_adamw", {"learning_rate": 3e-3, "schedule": "constant"}, 200).warmup_steps == 0


def _schedule_free_reference(weights, inputs, targets, steps, rate, beta_1=0.9, beta_2=0.999, eps=1e-8):
    """Schedule-free AdamW in float64 (Defazio et al. 2024) on a linear layer with the mean squared
    error, full batch; returns y (the weights), z and x."""
    kernel, bias = (np.asarray(w, np.float64) for w in weights)
    y = np.concatenate([kernel.ravel(), bias])
    z, x, v = y.copy(), y.copy(), np.zeros_like(y)
    features = np.concatenate([inputs, np.ones((len(inputs), 1))], axis=1).astype(np.float64)
    for t in range(1, steps + 1):
        w = y.reshape(features.shape[1], -1)
        residual = features @ w - targets
        g = (2.0 / residual.size * features.T @ residual).ravel()
        v = beta_2 * v + (1 - beta_2) * g * g
        z = z - rate * g / (np.sqrt(v / (1 - beta_2**t)) + eps)
        x = (1 - 1 / t) * x + z / t
        y = (1 - beta_1) * z + beta_1 * x
    return y, z, x


def test_schedule_free_follows_its_paper_and_is_evaluated_at_its_average(modules):
    """The benchmark's ScheduleFreeAdamW, trained by `fit`, against a float64 reference (y, z and
    x after three steps); `evaluation_point` shows x = (y − (1 − β₁) z) / β₁ and restores y."""
    compare, _ = modules
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    start = model.get_weights()
    model.compile(optimizer=compare.ScheduleFreeAdamW(0.1), loss="mse")
    x, y = rng.normal(size=(8, 3)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    y_ref, z_ref, x_ref = _schedule_free_reference(start, x, y, 3, 0.1)
    layer, optimizer = model.layers[0], model.optimizer
    flat = lambda kernel, bias: np.concatenate([kernel.ravel(), bias])  # noqa: E731
    z = [optimizer._momentums[optimizer._get_variable_index(v)].numpy() for v in (layer.kernel, layer.bias)]
    np.testing.assert_allclose(flat(layer.kernel.numpy(), layer.bias.numpy()), y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(*z), z_ref, rtol=1e-5, atol=1e-6)
    y_point = layer.kernel.numpy()
    with compare.evaluation_point(model):
        np.testing.assert_allclose(flat(layer.kernel.numpy(), layer.bias.numpy()), x_ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(x_ref, y_ref, atol=1e-4)
    np.testing.assert_array_equal(layer.kernel.numpy(), y_point)
    adam = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    adam.compile(optimizer="adam", loss="mse")
    before = adam.layers[0].kernel.numpy()
    with compare.evaluation_point(adam):
        np.testing.assert_array_equal(adam.layers[0].kernel.numpy(), before)


def test_weight_average_is_evaluated_in_place_of_the_weights(modules):
    """A K-FAC run with `polynomial_averaging=0` (the plain mean of the weights after each step) is
    evaluated at that mean, checked against the float64 mean of the weights seen after steps 1..4;
    the weights themselves come back afterwards."""
    compare, _ = modules
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 3)).astype("float32"), rng.integers(0, 2, size=32)
    model = keras_kfac.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras_kfac.KFAC(polynomial_averaging=0.0), loss="sparse_categorical_crossentropy")
    seen, shown, restored = [], [], []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            kernel = self.model.layers[0].kernel
            seen.append(kernel.numpy().astype(np.float64))
            with compare.evaluation_point(self.model):
                shown.append(kernel.numpy())
            restored.append(kernel.numpy())

    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[Probe()])
    assert len(seen) == 4
    for step in range(4):
        np.testing.assert_allclose(shown[step], np.mean(seen[: step + 1], axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(restored[step], seen[step])
    assert not np.allclose(shown[-1], seen[-1], atol=1e-5)
    # The recorder evaluates at the average and, beside it, at the weights: with the average's
    # kernel set to minus the weights' and labels that the weights predict, 1 and 0.
    kernel, optimizer = model.layers[0].kernel, model.optimizer
    kernel.assign(seen[-1].astype("float32"))
    model.layers[0].bias.assign(np.zeros(2, "float32"))
    optimizer._model_variables_moving_average[optimizer._get_variable_index(kernel)].assign(-kernel.value)
    optimizer._model_variables_moving_average[optimizer._get_variable_index(model.layers[0].bias)].assign([0.0, 0.0])
    images = rng.normal(size=(64, 3)).astype("float32")
    labels = np.argmax(images @ seen[-1], axis=1)
    recorder = compare.Recorder(eval_every=1, eval_data=(images, labels))
    recorder.set_model(model)
    recorder.step_seconds = [0.0]
    recorder.evaluate(1)
    assert recorder.evals[-1]["weights_accuracy"] == 1.0 and recorder.evals[-1]["accuracy"] == 0.0
    np.testing.assert_array_equal(kernel.numpy(), seen[-1].astype("float32"))


def test_kfac_args_are_keyword_arguments(modules):
    compare, _ = modules
    parsed = compare.keyword_arguments("stats_batch_size=128, stats_locations=16, polynomial_averaging=8.0")
    assert parsed == {"stats_batch_size": 128, "stats_locations": 16, "polynomial_averaging": 8.0}
    assert compare.keyword_arguments(' damping_mode="eigen" ') == {"damping_mode": "eigen"}
    assert compare.keyword_arguments("") == {}
    for bad in ("128", "stats_batch_size=n", "a=1,, b=2", "**x"):
        with pytest.raises(argparse.ArgumentTypeError):
            compare.keyword_arguments(bad)
    chosen = {"kfac": {"best": {"seed": 1}}, "adam": {"best": {"learning_rate": 1e-3}}}
    assert compare.row_settings("kfac", chosen, {"damping": 1e-3}) == {"seed": 1, "damping": 1e-3}
    assert compare.row_settings("adam", chosen, {"damping": 1e-3}) == {"learning_rate": 1e-3}


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


def test_table_targets_the_best_first_order_final_accuracy(modules):
    compare, vit = modules
    runs = {
        "kfac_expand": [_run("kfac_expand", s, [0.7, 0.85, 0.9], 12.0) for s in (0, 1)],
        "adamw": [_run("adamw", s, [0.6, 0.8, 0.86], 10.0) for s in (0, 1)],
        "muon": [_run("muon", s, [0.5, 0.7, 0.8], 10.0) for s in (0, 1)],
    }
    table = compare.summarize(runs, vit.FIRST_ORDER, "adamw")
    assert table["_best_first_order"] == "adamw" and table["_target_accuracy"] == pytest.approx(0.86)
    assert table["kfac_expand"]["steps_to_target"] == 6  # 0.9 at step 6 is the first eval >= 0.86
    assert table["adamw"]["steps_to_target"] == 6
    assert table["muon"]["steps_to_target"] is None and table["muon"]["seeds_reaching_target"] == 0
    assert table["kfac_expand"]["step_ratio"] == pytest.approx(1.2)
    text = compare.markdown("ViT, batch 128", table, [0, 1], vit.KINDS)
    assert "adamw's final acc. (0.8600)" in text and "| kfac_expand | KFAC() | 6 |" in text
    assert "| x adamw |" in text


def test_second_table_for_the_rows_with_more_seeds(modules, tmp_path):
    """Rows run on different seeds: the first table keeps the seeds every row has, the second the
    rows that have the most seeds, with its own best first-order row as the target."""
    compare, vit = modules
    runs = {
        "kfac_expand": [_run("kfac_expand", s, [0.7, 0.85, 0.9], 12.0) for s in (0, 1, 2)],
        "adamw": [_run("adamw", 0, [0.6, 0.8, 0.95], 10.0)],  # best on seed 0 alone
        "muon": [_run("muon", s, [0.5, 0.7, 0.8 + 0.01 * s], 10.0) for s in (0, 1, 2)],
    }
    seeds, rows = compare.rows_on_most_seeds(runs)
    assert seeds == [0, 1, 2] and sorted(rows) == ["kfac_expand", "muon"]
    bench = compare.Benchmark(
        name="vit",
        title="ViT",
        build=None,
        kinds=vit.KINDS,
        first_order=vit.FIRST_ORDER,
        table={},
        colors={kind: "tab:blue" for kind in vit.KINDS},
        reference="adamw",
    )
    record = compare.report(bench, 128, runs, str(tmp_path))
    assert record["table"]["_best_first_order"] == "adamw" and record["table"]["adamw"]["seeds"] == [0]
    assert record["table"]["_target_accuracy"] == pytest.approx(0.95)
    second = record["table_most_seeds"]
    assert second["_best_first_order"] == "muon" and second["_target_accuracy"] == pytest.approx(0.81)
    assert second["kfac_expand"]["steps_to_target"] == 4 and second["kfac_expand"]["seeds"] == [0, 1, 2]
    assert "adamw" not in second and second["muon"]["step_ratio"] is None  # no adamw row to compare with
    text = record["table_markdown"]
    assert "(1 seed(s): 0;" in text and "only the rows run on every one of these seeds (3 seed(s): 0, 1, 2;" in text
    assert "muon's final acc. (0.8100)" in text and "| muon | lr 0.001, cosine | — (2 reach it) |" in text
    # With every row on the same seeds there is one table.
    same = compare.report(bench, 128, {k: v for k, v in runs.items() if k != "adamw"}, str(tmp_path))
    assert same["table_most_seeds"] is None and same["table_markdown"].count("###") == 1


def test_sweep_only_then_resume(modules, tmp_path, monkeypatch):
    """A tiny benchmark: --sweep-only saves the sweep and trains nothing; --resume trains the rows
    with the kept candidate, and a second --resume trains nothing again."""
    compare, _ = modules
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(300, 28, 28, 1)).astype("uint8")
    labels = (images.reshape(300, -1).mean(axis=1) > 127).astype("int64")
    monkeypatch.setattr(
        compare, "load_arrays", lambda name, data_dir=None: ((images, labels), (images[:50], labels[:50]))
    )
    monkeypatch.setattr(compare, "VALIDATION_SIZE", 100)
    table = {
        "kfac": [{}],
        "adam": [{"learning_rate": 1e-3, "schedule": "constant"}, {"learning_rate": 1e-2, "schedule": "cosine"}],
    }
    bench = compare.Benchmark(
        name="tiny",
        title="MLP",
        build=lambda: keras_kfac.models.mlp(hidden=(8,)),
        kinds=("kfac", "adam"),
        first_order=("adam",),
        table=table,
        colors={"kfac": "tab:red", "adam": "tab:blue"},
        reference="adam",
    )
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser, bench, epochs=1)
    common = ["--out", str(tmp_path), "--seeds", "0", "--sweep-steps", "4", "--max-steps", "6"]
    # A sweep stopped after its first candidate keeps that candidate's score for --resume.
    real_train, calls = compare.train, []

    def train_then_stop(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(compare, "train", train_then_stop)
    with pytest.raises(KeyboardInterrupt):
        compare.run_benchmark(bench, parser.parse_args(common + ["--sweep-only"]), 50)
    monkeypatch.setattr(compare, "train", real_train)
    stopped = json.loads((tmp_path / "tiny_b50.json").read_text())
    assert list(stopped["sweep_scores"]) == [compare.candidate_key("adam", table["adam"][0])]
    first_score = stopped["sweep_scores"][compare.candidate_key("adam", table["adam"][0])]
    monkeypatch.setattr(compare, "train", train_then_stop)  # the third call trains on
    assert compare.run_benchmark(bench, parser.parse_args(common + ["--sweep-only", "--resume"]), 50) is None
    monkeypatch.setattr(compare, "train", real_train)
    assert calls == [table["adam"][0], table["adam"][1], table["adam"][1]]  # the first not trained again
    saved = json.loads((tmp_path / "tiny_b50.json").read_text())
    assert saved["sweep"]["adam"]["candidates"][0]["val_accuracy"] == first_score[0]
    assert [c["settings"] for c in saved["sweep"]["adam"]["candidates"]] == table["adam"]
    assert saved["runs"] == {"kfac": [], "adam": []}
    record = compare.run_benchmark(bench, parser.parse_args(common + ["--resume"]), 50)
    assert [len(record["runs"][k]) for k in ("kfac", "adam")] == [1, 1]
    assert record["runs"]["adam"][0]["settings"] == saved["sweep"]["adam"]["best"]
    assert len(record["runs"]["adam"][0]["losses"]) == 6
    assert record["table"]["_best_first_order"] == "adam"
    again = compare.run_benchmark(bench, parser.parse_args(common + ["--resume"]), 50)
    assert again["runs"]["adam"][0]["losses"] == record["runs"]["adam"][0]["losses"]
    # Other keras_kfac sources: a K-FAC row is trained again only when --kinds names it.
    old_digest = record["runs"]["kfac"][0]["source_digest"]
    monkeypatch.setattr(compare, "source_digest", lambda: "other sources")
    kept = compare.run_benchmark(bench, parser.parse_args(common + ["--resume", "--kinds", "adam"]), 50)
    assert kept["runs"]["kfac"][0]["source_digest"] == old_digest
    assert kept["runs"]["kfac"][0]["losses"] == record["runs"]["kfac"][0]["losses"]
    retrained = compare.run_benchmark(bench, parser.parse_args(common + ["--resume", "--kinds", "kfac"]), 50)
    assert [r["source_digest"] for r in retrained["runs"]["kfac"]] == ["other sources"]
    assert retrained["runs"]["adam"][0]["losses"] == record["runs"]["adam"][0]["losses"]
    # Other --kfac-args: the K-FAC row is trained again with them; the same ones keep it.
    with_args = common + ["--resume", "--kinds", "kfac", "--kfac-args", "damping=1e-3"]
    other = compare.run_benchmark(bench, parser.parse_args(with_args), 50)
    assert [r["settings"] for r in other["runs"]["kfac"]] == [{"damping": 1e-3}]
    assert other["runs"]["kfac"][0]["losses"] != retrained["runs"]["kfac"][0]["losses"]
    monkeypatch.setattr(compare, "train", lambda *args, **kwargs: pytest.fail("trained a kept row again"))
    same = compare.run_benchmark(bench, parser.parse_args(with_args), 50)
    assert same["runs"]["kfac"][0]["losses"] == other["runs"]["kfac"][0]["losses"]
    assert same["runs"]["adam"][0]["losses"] == record["runs"]["adam"][0]["losses"]


def test_step_time_rejects_unknown_configurations(capsys):
    """A row named by `--only` that no longer exists (the KFAC-expand row became the default's and
    the extra row is KFAC-reduce) is an error, not a run that silently times the core alone."""
    step_time = _benchmark("step_time")
    assert step_time.configurations()["kfac (KFAC-reduce)"]().weight_sharing == "reduce"
    with pytest.raises(SystemExit):
        step_time.main(["--models", "mlp", "--only", "kfac (KFAC-expand)"])
    assert "unknown configurations ['kfac (KFAC-expand)']" in capsys.readouterr().err


def test_step_time_only_keeps_commas_inside_a_name():
    """Row names may hold a comma inside their parentheses; `--only` splits between names only,
    so every row can be asked for (splitting on every comma made such rows unknown)."""
    step_time = _benchmark("step_time")
    names = step_time.configuration_names("kfac (stats of 128 examples),kfac (stats every step, 16 locations), adam")
    assert names == ["kfac (stats of 128 examples)", "kfac (stats every step, 16 locations)", "adam"]
    known = step_time.configurations()
    assert all(step_time.configuration_names(name) == [name] for name in known)
    assert step_time.configuration_names(",".join(known)) == list(known)
    made = known["kfac (stats of 128 examples, 16 locations)"]()
    assert (made.stats_batch_size, made.stats_locations) == (128, 16)


def test_weight_averaging_parses_the_averages_it_is_asked_for():
    """`--averages` names ema<β> / poly<η> averages; each update weight matches its closed form."""
    averaging = _benchmark("weight_averaging")
    averages = averaging.parse_averages("poly16, ema0.98,poly3")
    assert averages == {"poly16": ("poly", 16.0), "ema0.98": ("ema", 0.98), "poly3": ("poly", 3.0)}
    assert averaging.averaging_weight(*averages["poly16"], step=5) == pytest.approx(17.0 / 21.0)
    assert averaging.averaging_weight(*averages["ema0.98"], step=5) == pytest.approx(0.02)
    assert list(averaging.parse_averages(averaging.DEFAULT_AVERAGES)) == averaging.DEFAULT_AVERAGES.split(",")
    for name in ("poly", "sma3", "ema0.9x"):
        with pytest.raises(ValueError, match="unknown average"):
            averaging.parse_averages(name)


def test_step_time_times_the_inversions_the_train_step_runs():
    """The breakdown's inversion is timed as the train step runs it, inside a graph (called
    eagerly, `update_inverses` runs op by op: another, slower, path), and that call computes
    the same inverses as the training step's: (A + π√λ I)⁻¹ against NumPy in float64."""
    step_time = _benchmark("step_time")
    model = keras_kfac.Sequential([keras.Input((6,)), keras.layers.Dense(4), keras.layers.Dense(3)])
    opt = keras_kfac.KFAC(learning_rate=1e-3)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(32, 6)), rng.integers(0, 3, 32), batch_size=32, epochs=1, verbose=0)
    eager_flags = []
    inner = opt._update_inverses

    def recording(*args, **kwargs):
        eager_flags.append(tf.executing_eagerly())
        return inner(*args, **kwargs)

    opt._update_inverses = recording
    opt._state.compiled.pop("inverses", None)  # traced again, through `recording`
    seconds = step_time.time_inversions(opt, repeats=2)
    assert seconds > 0.0
    assert eager_flags and not any(eager_flags)  # traced into a graph, never run eagerly
    block = opt.blocks[0]
    a = block.factor_a.numpy().astype(np.float64)
    g = block.factor_g.numpy().astype(np.float64)
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    shift = pi * np.sqrt(float(opt.damping))
    expected = np.linalg.inv(a + shift * np.eye(a.shape[0]))
    np.testing.assert_allclose(
        block.inverse_variables[0].numpy(), expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max()
    )


def test_step_time_inversions_only_times_both_calls(tmp_path):
    """`--inversions-only` reports one inversion call per model, compiled and eager, and writes them."""
    step_time = _benchmark("step_time")
    out = tmp_path / "inversions.json"
    result = step_time.main(["--models", "mlp", "--inversions-only", "--rounds", "1", "--json", str(out)])
    calls = result["inversion_calls"]["mlp"]
    assert calls["compiled_ms"] > 0.0 and calls["eager_ms"] > 0.0
    assert calls["inverse_every"] == keras_kfac.KFAC().inverse_every
    assert json.loads(out.read_text())["inversion_calls"]["mlp"] == calls
