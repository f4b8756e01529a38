"""Smoke tests of the benchmark scripts: every one explains itself, the cheap ones write their JSON, the GPU
script refuses to run without a GPU and its summary fills the README table; the project imports without
tensorflow-datasets (the lent GPU machine has none). No timing is asserted (benchmarks are measured, never
tested). The PyTorch ones run only where torch is installed (not in CI: it is not a test dependency)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import (checkpoint, compile_cache, convert, epoch, feature_cache, gpu_summary, input_pipeline,
                        torch_step, train_step)
from benchmarks.common import report
from flaxresnet import augment

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", [checkpoint, compile_cache, convert, epoch, feature_cache, gpu_summary,
                                    input_pipeline, torch_step, train_step])
def test_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    assert script.__doc__.splitlines()[0][:40] in " ".join(capsys.readouterr().out.split())


def test_input_pipeline_writes_json(tmp_path):
    """The in-memory and streamed sections on tiny generated data (the others start processes: by hand only)."""
    out = tmp_path / "pipeline.json"
    input_pipeline.main(["--sections", "memory", "stream", "--examples", "64", "--batch-sizes", "8", "--records",
                         "60", "--jpegs", "40", "--batch-size", "4", "--batches", "2", "--jpeg-batches", "1",
                         "--no-step", "--data", str(tmp_path / "data"), "--out", str(out)])
    result = json.loads(out.read_text())
    memory = [row for row in result["rows"] if row["section"] == "memory"]
    assert [row["stage"] for row in memory] == ["host batches", "batches on devices"]
    streamed = [row for row in result["rows"] if row["section"] == "stream"]
    assert [(row["source"][:6], row["workers"]) for row in streamed] == [
        (source, workers) for source in ("32 px ", "256 px") for workers in sorted({0, 1, result["default_workers"]})]
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
    v2 = train_step.Variant.parse("flax:convs:float32:v2")
    assert (v2.family, str(v2)) == ("v2", "flax:convs:float32:v2")
    assert train_step.Variant.parse("flax:convs:float32:v1") == train_step.Variant.parse("flax:convs:float32")
    assert str(torch_step.Variant.parse("torch:compile:bfloat16")) == "torch:compile:bfloat16"
    with pytest.raises(argparse.ArgumentTypeError, match="IMPL:EXEC:DTYPE"):
        torch_step.Variant.parse("torch:jit:bfloat16")


def test_train_step_ratios_pair_each_family_with_its_own_kind():
    times = {train_step.Variant.parse(spec): seconds for spec, seconds in (
        ("flax:convs:float32", [1.0, 1.0]), ("keras:convs:float32", [4.0, 2.0]),
        ("flax:convs:float32:v2", [3.0, 1.5]), ("keras:convs:float32:v2", [6.0, 6.0]))}
    assert train_step.ratios(times) == {
        "flax/keras convs float32": 0.375, "v2/v1 flax convs float32": 2.25,
        "flax/keras convs float32 v2": 0.375, "v2/v1 keras convs float32": 2.25}


def test_torch_step_writes_json(tmp_path):
    """The cheapest real PyTorch run: the eager eval step on the CPU."""
    pytest.importorskip("torchvision")
    out = tmp_path / "torch.json"
    torch_step.main(["--variants", "torch-eval:eager:float32", "--image-size", "32", "--batch-size", "2",
                     "--steps", "1", "--warmup", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["variant"] == "torch-eval:eager:float32" and row["img_per_s"] > 0
    assert result["machine"]["torch"].startswith("2.") and result["settings"]["batch_size"] == 2


def test_torch_random_erasing_samples_as_flaxresnet():
    """Same gate, rectangle sizes and fill as flaxresnet.augment.random_erasing, over 4,000 images of 32 px."""
    torch = pytest.importorskip("torch")
    n, size = 4000, 32
    torch.manual_seed(0)
    torch.manual_seed(0)  # -1 lies outside the noise's [0, 1): erased pixels are the changed ones
    torch_mask = torch_step.random_erasing(torch.full((n, size, size, 3), -1.0)).numpy() != -1
    flax_mask = np.asarray(jax.vmap(augment.random_erasing)(jax.random.split(jax.random.key(0), n),
                                                            jax.numpy.full((n, size, size, 3), -1.0))) != -1
    mean_areas = []
    for mask in (torch_mask, flax_mask):
        areas = mask[..., 0].sum((1, 2))
        rows, cols = mask[..., 0].any(2).sum(1), mask[..., 0].any(1).sum(1)
        assert (mask == mask[..., :1]).all() and (areas == rows * cols).all()  # one rectangle, every channel
        assert abs((areas > 0).mean() - 0.5) < 0.03  # p = 0.5
        assert areas.max() <= 0.4 * size * size
        mean_areas.append(areas[areas > 0].mean())
    assert mean_areas[0] == pytest.approx(mean_areas[1], rel=0.05)


def test_gpu_summary_fills_the_readme_table(tmp_path, capsys):
    h200 = {"device_name": "NVIDIA H200"}
    report("b64", [{"variant": "flax:convs:float32", "img_per_s": 1234.4, "projected_total_min": 3.21},
                   {"variant": "flax-eval:convs:float32", "img_per_s": 5000.0}],
           str(tmp_path / "seed_256px_b64.json"), accelerator=h200)
    report("torch", [{"variant": "torch:compile:bfloat16", "img_per_s": 2100.0, "projected_total_min": 4.06}],
           str(tmp_path / "torch_256px_b256.json"), accelerator=h200)
    capsys.readouterr()
    gpu_summary.main([str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| NVIDIA H200, synthetic data, 32 px -> 256 px (seed recipe) | batch 64 | batch 256 |"
    assert len(lines) == 2 + len(gpu_summary.ROWS) + 1  # header, rule, rows, "wrote ..."
    cells = {label: rest for label, *rest in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in lines[2:-1])}
    assert cells["flaxresnet train step, float32"] == ["1,234 img/s", "no result"]
    assert cells["flaxresnet train step, bfloat16"] == ["-", "no result"]
    assert cells["flaxresnet eval step, float32"] == ["5,000 img/s", "no result"]
    assert cells["PyTorch `torch.compile`, bfloat16 autocast"] == ["no result", "2,100 img/s"]
    assert cells["15-epoch CIFAR-100 run, flaxresnet float32 (all but data loading)"] == ["3.2 min", "no result"]
    assert cells["full fine-tune at 224 px, flaxresnet float32"] == ["no result", "-"]  # gpu.sh: batch 64 only
    assert (tmp_path / "gpu_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_project_imports_without_tensorflow_datasets(tmp_path):
    """Every module imports and the digits source loads with tensorflow_datasets blocked; asking for cifar100
    is then one clear line on stderr and exit status 2, as train.py would end."""
    script = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        sys.modules["tensorflow_datasets"] = None  # `import tensorflow_datasets` raises ModuleNotFoundError
        import benchmarks, convert, flaxresnet
        for package in (flaxresnet, convert, benchmarks):
            for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                importlib.import_module(module.name)
        import train
        from flaxresnet import data
        ds = data.load_dataset("digits")
        assert len(ds.train) + len(ds.validation) == 1797, len(ds.train)
        sys.exit(train.main(["--dataset", "cifar100", "--backbone-weights", "none", "--workdir", {str(tmp_path)!r}]))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines()[-1] == ("error: tfds dataset 'cifar100' needs tensorflow-datasets, which is not "
                                           "installed: pip install tensorflow-datasets (or use a folder:PATH or "
                                           "digits dataset)")
    assert "Traceback" not in run.stderr


def test_gpu_script_needs_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    env.pop("GPU_BENCH_TINY", None)
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "GPU_BENCH_TINY=1" in run.stderr
