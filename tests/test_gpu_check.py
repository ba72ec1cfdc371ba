"""benchmarks/gpu_check.py on the CPU in its tiny mode: the registry trains on Keras 3's JAX backend
without importing TensorFlow, its batch split over two (simulated) devices by keras.distribution.
Without jax installed (CI) it runs on the TensorFlow backend instead, in mixed_bfloat16 (TensorFlow
emulates float16 on a CPU: VGG16's one step took 40 s), with the same rows and no TF-free check."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
JAX = importlib.util.find_spec("jax") is not None
PRECISION = "mixed_float16" if JAX else "mixed_bfloat16"


def test_gpu_check_quick_trains_a_backbone_with_mixed_precision():
    env = {**os.environ, "KERAS_BACKEND": "jax" if JAX else "tensorflow", "CUDA_VISIBLE_DEVICES": "",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    # vgg16 alone: the backbone path with the paper's head at the quick size (XLA compiles it on
    # 2 cores in ~20 s; all six take ~10 min).
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--quick", "--models", "vgg16", "--repeats", "1",
         "--steps", "1", "--precision", PRECISION],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    row = next(line.split() for line in lines if line.startswith("vgg16"))
    size, policy, images_s, loss = int(row[1]), row[3], float(row[5]), float(row[6])
    assert size == 32 and policy == PRECISION  # params.yaml's quick size; the run's precision
    assert images_s > 0 and math.isfinite(loss)
    if JAX:
        assert "data parallel: keras.distribution.DataParallel over 2 devices" in done.stdout
        assert "tensorflow imported: no" in lines


def test_gpu_check_refuses_an_unknown_model_in_one_line():
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--models", "vgg19"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KERAS_BACKEND": "jax" if JAX else "tensorflow"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("--models: unknown vgg19; choose from custom_cnn")
