"""Strategies and precision (covidtl.distribute), on CPU: a step on two replicas, mirrored on one
machine or two worker processes, changes the weights as one device does on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from covidtl import distribute
from covidtl.errors import UserError

STEP = Path(__file__).with_name("distribute_step.py")
PER_REPLICA = 4


def run_step(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(STEP), str(out), "--per-replica", str(PER_REPLICA), *args],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finished(proc: subprocess.Popen) -> str:
    """The step's summary line (TensorFlow logs to stderr, also after it)."""
    output, errors = proc.communicate("\n", timeout=300)
    assert proc.returncode == 0, errors[-3000:]
    return next(line for line in output.splitlines() if line.startswith("strategy="))


def weights(path: Path) -> list[np.ndarray]:
    stored = np.load(path)
    return [stored[f"w{i}"] for i in range(len(stored.files))]


def loss_of(line: str) -> float:
    return float(line.rsplit("loss=", 1)[1])


def assert_same_step(one: Path, other: Path, one_line: str, other_line: str) -> None:
    """The same loss on the global batch (BatchNorm statistics over all of it), and the same weights."""
    assert loss_of(other_line) == pytest.approx(loss_of(one_line), rel=1e-5)
    start, after_one, after_other = weights(one.with_suffix(".init.npz")), weights(one), weights(other)
    assert len(after_one) == len(after_other)
    moved = sum(not np.allclose(a, b) for a, b in zip(start, after_one))
    assert moved > len(start) // 2  # the step did move the network
    for i, (a, b) in enumerate(zip(after_one, after_other)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=f"weight {i}")


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> tuple[Path, str]:
    """One step on one device over the global batch of two replicas: its weights and its line."""
    out = tmp_path_factory.mktemp("one") / "one.npz"
    line = finished(run_step(out, "--strategy", "default", "--per-replica", str(2 * PER_REPLICA)))
    assert "replicas=1 global_batch=8" in line
    return out, line


def test_mirrored_on_two_cpus_steps_like_one_device(one_device, tmp_path):
    one, one_line = one_device
    out = tmp_path / "mirrored.npz"
    line = finished(run_step(out, "--strategy", "mirrored", "--cpus", "2", "--graph",
                             "--init", str(one.with_suffix(".init.npz"))))
    assert "strategy=mirrored replicas=2 global_batch=8" in line
    assert_same_step(one, out, one_line, line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_from_tf_config_step_like_one_device(one_device, tmp_path):
    one, one_line = one_device
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(run_step(tmp_path / f"worker{index}.npz",  # strategy auto: TF_CONFIG decides
                              "--init", str(one.with_suffix(".init.npz")), *(["--hold"] if index == 0 else []),
                              env={"TF_CONFIG": json.dumps(tf_config)}))
    lines = [finished(p) for p in reversed(procs)][::-1]  # the chief last: the others need it to exit
    assert "strategy=multiworker replicas=2 global_batch=8 chief=True" in lines[0]
    assert "chief=False" in lines[1]
    for index in range(2):
        assert_same_step(one, tmp_path / f"worker{index}.npz", one_line, lines[index])


def test_auto_rules():
    assert distribute.resolve_precision("auto", gpus=1) == "mixed_float16"
    assert distribute.resolve_precision("auto", gpus=0) == "float32"
    assert distribute.resolve_precision("mixed_bfloat16", gpus=0) == "mixed_bfloat16"
    assert distribute.resolve_strategy("auto", gpus=0, workers=0) == "default"
    assert distribute.resolve_strategy("auto", gpus=1, workers=0) == "default"
    assert distribute.resolve_strategy("auto", gpus=4, workers=0) == "mirrored"
    assert distribute.resolve_strategy("auto", gpus=4, workers=2) == "multiworker"
    assert distribute.resolve_strategy("mirrored", gpus=0, workers=0) == "mirrored"
    assert distribute.scaled_rate(1e-3, 4, "none") == 1e-3
    assert distribute.scaled_rate(1e-3, 4, "linear") == pytest.approx(4e-3)
    assert distribute.scaled_rate(1e-3, 4, "sqrt") == pytest.approx(2e-3)


def test_several_workers_run_graphs_whatever_run_eagerly_says():
    import tensorflow as tf

    def on(kind: str) -> distribute.Distribution:
        return distribute.Distribution(tf.distribute.get_strategy(), kind, "float32", "none")

    few, many = distribute.EAGER_MAX_BATCHES, distribute.EAGER_MAX_BATCHES + 1
    assert [on("default").run_eagerly(s, n) for s, n in (("auto", few), ("auto", many), (True, many), (False, 1))] \
        == [True, False, True, False]
    assert not on("multiworker").run_eagerly(True, 1) and not on("multiworker").run_eagerly("auto", 1)


def test_tf_config_is_read_or_refused_in_one_line():
    two = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}
    assert distribute.tf_config_workers({"TF_CONFIG": json.dumps(two)}) == 2
    assert distribute.tf_config_workers({}) == 0
    with pytest.raises(UserError, match="TF_CONFIG: not a JSON object"):
        distribute.tf_config_workers({"TF_CONFIG": "worker=a:1,b:1"})


def test_a_run_records_its_precision_and_strategy_and_keeps_a_float32_output(tmp_path, monkeypatch):
    """`covidtl train` under mixed_bfloat16 (the CPU's mixed precision) inside a MirroredStrategy."""
    import keras
    import mlflow

    from covidtl.train import RunOptions, plan_run, train
    from helpers_train import make_workdir

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg, _ = make_workdir(tmp_path, **{"train.precision": "mixed_bfloat16", "train.strategy": "mirrored",
                                       "train.lr_scaling": "linear", "train.max_train_samples": 8})
    result = train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp_path / "cell"),
                   RunOptions(log_model=False))

    ran = {"precision": "mixed_bfloat16", "strategy": "mirrored", "replicas": 1, "lr_scaling": "linear",
           "global_batch_size": 8}
    card = json.loads((tmp_path / "cell" / "model" / "card.json").read_text())
    assert {key: card[key] for key in ran} == ran
    assert card["learning_rate"] == cfg.train.learning_rates["custom_cnn"]  # linear x 1 replica
    params = mlflow.tracking.MlflowClient(uri).get_run(result.run_id).data.params
    assert {key: params[key] for key in ran} == {key: str(value) for key, value in ran.items()}
    model = keras.models.load_model(result.model_path)
    assert model.get_layer("probabilities").dtype_policy.name == "float32"
    assert model.layers[1].dtype_policy.name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"  # restored for whatever runs next


def test_multiworker_without_tf_config_is_one_line(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="train.strategy=multiworker: TF_CONFIG is not set"):
        distribute.make_strategy("multiworker")
