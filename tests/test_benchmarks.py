"""Smoke tests of the benchmark scripts: every one explains itself, the cheap ones write their JSON, and the GPU
script refuses to run without a GPU. No timing is asserted (benchmarks are measured, never tested)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import checkpoint, compile_cache, convert, epoch, input_pipeline, train_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", [checkpoint, compile_cache, convert, epoch, input_pipeline, train_step])
def test_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    assert script.__doc__.splitlines()[0][:40] in " ".join(capsys.readouterr().out.split())


def test_input_pipeline_writes_json(tmp_path):
    out = tmp_path / "pipeline.json"
    input_pipeline.main(["--examples", "64", "--batch-sizes", "8", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [row["stage"] for row in result["rows"]] == ["host batches", "batches on devices"]
    assert all(row["img_per_s"] > 0 for row in result["rows"])


def test_train_step_writes_json(tmp_path):
    """The cheapest real run: the eval step only (the train steps compile for a minute on 2 cores)."""
    out = tmp_path / "step.json"
    train_step.main(["--variants", "flax-eval:convs:float32", "--image-size", "32", "--batch-size", "2",
                     "--steps", "1", "--warmup", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["variant"] == "flax-eval:convs:float32" and row["img_per_s"] > 0
    assert result["machine"]["jax_backend"] and result["settings"]["batch_size"] == 2


def test_variant_parsing():
    assert str(train_step.Variant.parse("keras:none:bfloat16")) == "keras:none:bfloat16"
    with pytest.raises(argparse.ArgumentTypeError, match="IMPL:FREEZE:DTYPE"):
        train_step.Variant.parse("flax:convs")


def test_gpu_script_needs_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    env.pop("GPU_BENCH_TINY", None)
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "GPU_BENCH_TINY=1" in run.stderr
