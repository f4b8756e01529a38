"""The figures of a benchmarks/gpu.sh run as the README's GPU table (Markdown on stdout) and a bar chart (PNG).

Reads the JSON files gpu.sh wrote into OUT_DIR; a row's cell is '-' where gpu.sh runs no such variant (at
that batch size) and 'no result' where the run's file is missing (the run failed or ran out of time).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

# The file of each run of gpu.sh, by (family of rows, batch column).
FILES = {("seed", 64): "seed_256px_b64.json", ("seed", 256): "seed_256px_b256.json",
         ("torch", 64): "torch_256px_b64.json", ("torch", 256): "torch_256px_b256.json",
         ("full", 64): "full_224px_b64.json"}
BATCHES = (64, 256)
Results = dict[tuple[str, int], dict[str, Any] | None]
# (README label, family, variant, field); img/s rows first, they make the chart.
ROWS = (
    ("flaxresnet train step, float32", "seed", "flax:convs:float32", "img_per_s"),
    ("flaxresnet train step, bfloat16", "seed", "flax:convs:bfloat16", "img_per_s"),
    ("Keras 3 (JAX) `train_on_batch`, float32", "seed", "keras:convs:float32", "img_per_s"),
    ("Keras 3 (JAX) `train_on_batch`, mixed_bfloat16", "seed", "keras:convs:bfloat16", "img_per_s"),
    ("PyTorch eager, float32 (TF32 convolutions)", "torch", "torch:eager:float32", "img_per_s"),
    ("PyTorch eager, bfloat16 autocast", "torch", "torch:eager:bfloat16", "img_per_s"),
    ("PyTorch `torch.compile`, bfloat16 autocast", "torch", "torch:compile:bfloat16", "img_per_s"),
    ("flaxresnet eval step, float32", "seed", "flax-eval:convs:float32", "img_per_s"),
    ("flaxresnet eval step, bfloat16", "seed", "flax-eval:convs:bfloat16", "img_per_s"),
    ("PyTorch eval (eager), bfloat16 autocast", "torch", "torch-eval:eager:bfloat16", "img_per_s"),
    ("full fine-tune at 224 px, flaxresnet float32", "full", "flax:none:float32", "img_per_s"),
    ("full fine-tune at 224 px, flaxresnet bfloat16", "full", "flax:none:bfloat16", "img_per_s"),
    ("full fine-tune at 224 px, Keras 3 (JAX) float32", "full", "keras:none:float32", "img_per_s"),
    ("15-epoch CIFAR-100 run, flaxresnet float32 (all but data loading)", "seed", "flax:convs:float32",
     "projected_total_min"),
    ("15-epoch CIFAR-100 run, flaxresnet bfloat16 (all but data loading)", "seed", "flax:convs:bfloat16",
     "projected_total_min"),
    ("15-epoch CIFAR-100 run, Keras 3 (JAX) float32 (training steps only)", "seed", "keras:convs:float32",
     "projected_train_min"),
    ("15-epoch CIFAR-100 run, PyTorch compiled bfloat16 (all but data loading; eager eval)", "torch",
     "torch:compile:bfloat16", "projected_total_min"),
)
UNITS = {"img_per_s": "img/s", "projected_total_min": "min", "projected_train_min": "min"}


def load(out_dir: Path) -> Results:
    """Each run's JSON by (family, batch column); None where the file is missing."""
    return {key: json.loads((out_dir / name).read_text()) if (out_dir / name).exists() else None
            for key, name in FILES.items()}


def figure(result: dict[str, Any] | None, variant: str, field: str) -> float | None:
    """The `field` of `variant`'s row in one run's JSON, or None."""
    row = next((r for r in (result or {}).get("rows", []) if r["variant"] == variant), None)
    return None if row is None else row.get(field)


def cell(results: Results, key: tuple[str, int], variant: str, field: str) -> str:
    """A table cell: '1,234 img/s', '3.2 min', '-' (not run) or 'no result' (run failed)."""
    if key in results and results[key] is None:
        return "no result"
    value = figure(results.get(key), variant, field)
    if value is None:
        return "-"
    return f"{value:,.0f} {UNITS[field]}" if field == "img_per_s" else f"{value:,.1f} {UNITS[field]}"


def gpu_name(results: Results) -> str:
    """The accelerator the runs saw, as the first JSON that names one says."""
    for result in filter(None, results.values()):
        machine = result["machine"]
        if name := machine.get("device_name") or machine.get("device_kind"):
            return name
    return "unknown device"


def table(results: Results) -> str:
    """The README's GPU table, filled in."""
    lines = [f"| {gpu_name(results)}, synthetic data, 32 px -> 256 px (seed recipe) | "
             + " | ".join(f"batch {b}" for b in BATCHES) + " |", "|---|" + "---|" * len(BATCHES)]
    for label, family, variant, field in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(results, (family, b), variant, field) for b in BATCHES) + " |")
    return "\n".join(lines)


def chart(results: Results, path: Path) -> None:
    """Horizontal bars of every img/s row, one bar per batch column."""
    rows = [r for r in ROWS if r[3] == "img_per_s"]
    fig = Figure(figsize=(10, 0.45 * len(rows) * len(BATCHES) + 1.5))
    ax = fig.subplots()
    height = 0.8 / len(BATCHES)
    for i, batch in enumerate(BATCHES):
        values = [figure(results.get((family, batch)), variant, field) or 0.0 for _, family, variant, field in rows]
        positions = [y + i * height for y in range(len(rows))]
        bars = ax.barh(positions, values, height, label=f"batch {batch}")
        ax.bar_label(bars, [f"{v:,.0f}" if v else "" for v in values], padding=3, fontsize=8)
    ax.set_yticks([y + height * (len(BATCHES) - 1) / 2 for y in range(len(rows))], [r[0] for r in rows],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images per second (median step)")
    ax.set_title(f"Seed recipe on {gpu_name(results)}: flaxresnet vs Keras 3 (JAX) vs PyTorch")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="the folder benchmarks/gpu.sh wrote its JSON files into")
    args = parser.parse_args(argv)
    results = load(args.out_dir)
    print(table(results))
    chart(results, args.out_dir / "gpu_summary.png")
    print(f"wrote {args.out_dir / 'gpu_summary.png'}")


if __name__ == "__main__":
    main()
