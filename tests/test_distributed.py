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

import distributed_worker as worker
import numpy as np
import pytest
import reference as ref

from keras_kfac import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 180


def _env(**extra):
    path = [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), TF_CPP_MIN_LOG_LEVEL="3", **extra)


def _run(processes: list, outputs: list) -> list:
    """Waits for every process (killing all on the timeout); fails with the output of any that
    failed or hung."""
    texts = []
    try:
        for process in processes:
            text, _ = process.communicate(timeout=TIMEOUT_S)
            texts.append(text)
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        texts = [p.communicate()[0] for p in processes]
        joined = "\n-----\n".join(t[-4000:] for t in texts)
        pytest.fail(f"timeout after {TIMEOUT_S} s; outputs:\n{joined}")
    for i, (process, text) in enumerate(zip(processes, texts)):
        if process.returncode != 0:
            pytest.fail(f"process {i} exited with {process.returncode}:\n{text[-6000:]}")
    return [dict(np.load(path)) for path in outputs]


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mirrored") / "results.npz")
    command = [sys.executable, os.path.join(HERE, "distributed_worker.py"), "mirrored", out]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return _run([process], [out])[0]


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


def test_checkpoints_move_between_a_strategy_and_one_device(mirrored):
    expected = _single_device(epochs=2)  # one epoch, save, load elsewhere, one more epoch
    _assert_close(expected, mirrored, "to_single_")
    _assert_close(expected, mirrored, "to_mirrored_")
    _assert_replicas_identical(mirrored, "to_mirrored_replicas_")


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


def test_owners_put_the_largest_cost_on_the_least_loaded_replica():
    # 8 -> r0; 5 -> r1; 3 -> r1 (5 < 8); 1 -> r0 (8 = 8, lowest id); 1 -> r1 (8 < 9).
    assert distributed.owners([8, 1, 1, 5, 3], 2) == [0, 0, 1, 1, 1]
    assert distributed.owners([4, 4, 4], 3) == [0, 1, 2]
    assert distributed.owners([7], 4) == [0]


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_two_processes_equal_one_device(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    outputs = [str(tmp_path / f"worker{i}.npz") for i in range(2)]
    processes = []
    for i, out in enumerate(outputs):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        command = [sys.executable, os.path.join(HERE, "distributed_worker.py"), "worker", out]
        processes.append(
            subprocess.Popen(
                command, env=_env(TF_CONFIG=config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    first, second = _run(processes, outputs)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    _assert_close(_single_device(), first, "")
