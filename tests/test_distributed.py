"""K-FAC under tf.distribute: MirroredStrategy over two logical CPUs and two
MultiWorkerMirroredStrategy processes give the weights of one device with the same global batch
(fisher="empirical"); every replica ends with the same weights and factors; each inversion is
computed by one replica and shared; checkpoints move between a strategy and one device.

The strategies run in subprocesses (tests/distributed_worker.py): logical devices and a
cluster must be set up before TensorFlow starts. The single-device references run here.
"""

import json
import os
import socket
import subprocess
import sys
import time

import distributed_worker as worker
import numpy as np
import pytest
import reference as ref

import keras_kfac
from keras_kfac import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 180


def _env(**extra):
    path = [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), TF_CPP_MIN_LOG_LEVEL="3", **extra)


class _Job:
    """A worker process whose output goes to a file (no pipe to fill up)."""

    def __init__(self, folder, name, mode, command=None, **env):
        self.out = str(folder / f"{name}.npz")
        self.log_path = folder / f"{name}.log"
        command = command or [sys.executable, os.path.join(HERE, "distributed_worker.py"), mode, self.out]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, env=_env(**env), stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()[-6000:]


def _wait(jobs: list) -> list:
    """Waits for the jobs; as soon as one fails, or after TIMEOUT_S, kills the others and fails
    with every job's output (a dead worker would leave its peer waiting forever)."""
    start = time.monotonic()
    while True:
        codes = [job.process.poll() for job in jobs]
        failed = any(code not in (None, 0) for code in codes)
        late = time.monotonic() - start > TIMEOUT_S
        if failed or late:
            for job in jobs:
                if job.process.poll() is None:
                    job.process.kill()
                job.process.wait()
            what = "a process failed" if failed else f"timeout after {TIMEOUT_S} s"
            outputs = "\n".join(
                f"----- process {i} (exit {j.process.returncode}):\n{j.log()}" for i, j in enumerate(jobs)
            )
            pytest.fail(f"{what}:\n{outputs}")
        if all(code == 0 for code in codes):
            return [dict(np.load(job.out)) for job in jobs]
        time.sleep(0.2)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Starts the MirroredStrategy process and the two workers together (they overlap on a
    machine with several cores); kills whatever is left at the end."""
    folder = tmp_path_factory.mktemp("distributed")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    started = {"mirrored": [_Job(folder, "mirrored", "mirrored")], "workers": []}
    for i in range(2):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        started["workers"].append(_Job(folder, f"worker{i}", "worker", TF_CONFIG=config))
    yield started
    for job in started["mirrored"] + started["workers"]:
        if job.process.poll() is None:
            job.process.kill()
        job.process.wait()


@pytest.fixture(scope="module")
def mirrored(jobs):
    return _wait(jobs["mirrored"])[0]


def _single_device(epochs=1, **settings):
    model = worker.build(**settings)
    worker.train(model, epochs)
    return worker.state(model)


def _assert_close(expected: dict, results: dict, prefix: str):
    """Weights and optimizer state within 1e-5 (relative); not the eigenvectors, which round-off
    turns within a group of near-equal eigenvalues (the weights they give are compared)."""
    assert len(expected) == len([k for k in results if k.startswith(prefix) and "replicas" not in k])
    for key, value in expected.items():
        if "eigenvectors" not in key:
            assert ref.rel_err(results[prefix + key], value) <= 1e-5, key


def _assert_replicas_identical(results: dict, prefix: str):
    keys = [k for k in results if k.startswith(prefix)]
    assert keys
    for key in keys:
        copies = results[key]
        assert copies.shape[0] == 2
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=key)


@pytest.mark.parametrize("config", list(worker.CONFIGS))
def test_mirrored_two_devices_equal_one_device(mirrored, config):
    expected = _single_device(**worker.CONFIGS[config])
    _assert_close(expected, mirrored, f"{config}_")
    _assert_replicas_identical(mirrored, f"{config}_replicas_")


def test_auto_learning_rate_reads_the_global_batch(mirrored):
    # 512 examples a step over two replicas (256 each): the variable that sets the decay horizon
    # holds 1e-3 · √(512 / 128), not √(256 / 128).  Both replicas hold it.
    assert mirrored["auto_learning_rate"].shape == (2,)
    np.testing.assert_allclose(mirrored["auto_learning_rate"], 1e-3 * np.sqrt(512 / 128), rtol=1e-6)


def test_fit_under_a_strategy_keeps_the_optimizers_settings(mirrored):
    # The default weight average (use_ema on, η = 8) is still on after fit under two replicas.
    np.testing.assert_array_equal(mirrored["settings_after_fit"], [1.0, 8.0])


def test_checkpoints_move_between_a_strategy_and_one_device(mirrored):
    expected = _single_device(epochs=2)  # one epoch, save, load elsewhere, one more epoch
    _assert_close(expected, mirrored, "to_single_")
    _assert_close(expected, mirrored, "to_mirrored_")
    _assert_replicas_identical(mirrored, "to_mirrored_replicas_")


def test_a_non_finite_batch_on_one_replica_skips_the_step_on_all(mirrored):
    model = worker.build()
    worker.train(model, nan_row=worker.NAN_ROW)
    assert int(model.optimizer.skipped_steps.numpy()) == 1
    expected = worker.state(model)  # one device skips the same step
    _assert_close(expected, mirrored, "nan_")
    _assert_replicas_identical(mirrored, "nan_replicas_")
    for key in expected:
        assert np.all(np.isfinite(mirrored["nan_" + key])), key


def _factored_inverses(a, g, damping):
    """float64 (A + π√λ I)⁻¹, (G + √λ/π I)⁻¹."""
    a, g = a.astype(np.float64), g.astype(np.float64)
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    root = np.sqrt(damping)
    return np.linalg.inv(a + pi * root * np.eye(a.shape[0])), np.linalg.inv(g + root / pi * np.eye(g.shape[0]))


def test_each_inverse_is_computed_by_its_owner_and_shared(mirrored):
    # The worker gave replica 1 other factors than replica 0, then ran one inversion.
    blocks = [(6, 8), (9, 6), (7, 3)]  # (dim_a, dim_g) of hidden, middle, out
    owners = distributed.owners([a**3 + g**3 for a, g in blocks], 2)
    assert sorted(set(owners)) == [0, 1]  # the work is split
    for tag in ("split", "all"):
        damping = float(mirrored[f"owners_{tag}_damping"])
        for b in range(len(blocks)):
            a, g = mirrored[f"owners_{tag}_{b}_a"], mirrored[f"owners_{tag}_{b}_g"]
            assert ref.rel_err(a[0], a[1]) > 0.1  # the replicas' factors differ
            for replica in (0, 1):
                source = owners[b] if tag == "split" else replica
                inv_a, inv_g = _factored_inverses(a[source], g[source], damping)
                assert ref.rel_err(mirrored[f"owners_{tag}_{b}_inv_a"][replica], inv_a) <= 1e-5
                assert ref.rel_err(mirrored[f"owners_{tag}_{b}_inv_g"][replica], inv_g) <= 1e-5


def test_distribute_inverses_is_checked_and_saved():
    with pytest.raises(ValueError, match="distribute_inverses"):
        keras_kfac.KFAC(distribute_inverses="yes")
    restored = keras_kfac.KFAC.from_config(keras_kfac.KFAC(distribute_inverses=False).get_config())
    assert restored.distribute_inverses is False


def test_owners_put_the_largest_cost_on_the_least_loaded_replica():
    # 8 -> r0; 5 -> r1; 3 -> r1 (5 < 8); 1 -> r0 (8 = 8, lowest id); 1 -> r1 (8 < 9).
    assert distributed.owners([8, 1, 1, 5, 3], 2) == [0, 0, 1, 1, 1]
    assert distributed.owners([4, 4, 4], 3) == [0, 1, 2]
    assert distributed.owners([7], 4) == [0]


def test_multi_worker_two_processes_equal_one_device(jobs):
    first, second = _wait(jobs["workers"])
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    _assert_close(_single_device(), first, "")


def test_a_dead_worker_fails_the_wait_at_once_with_its_output(tmp_path):
    dead = _Job(tmp_path, "dead", None, command=[sys.executable, "-c", "print('worker 0 died here'); exit(3)"])
    waiting = _Job(tmp_path, "waiting", None, command=[sys.executable, "-c", "import time; time.sleep(600)"])
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="(?s)a process failed.*exit 3.*worker 0 died here"):
        _wait([dead, waiting])
    assert time.monotonic() - start < 30
    assert waiting.process.returncode is not None  # killed, not left behind
