"""Conversion speed: flaxresnet `keras_to_flax` on a full-size ResNet50 file vs Keras building ResNet50 and
loading the same file. Without --weights, a random-weight keras-applications ResNet50 no-top file is made first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

from benchmarks.common import report  # noqa: E402
from convert.keras_to_flax import keras_to_flax  # noqa: E402
from flaxresnet import load_converted  # noqa: E402


def make_weights(path: Path, include_top: bool) -> None:
    """A legacy .h5 of a random-weight ResNet50, laid out like the official keras-applications file."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    model = keras.applications.ResNet50(weights=None, include_top=include_top)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of the next `repeats`) in seconds."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def wall(code: str) -> float:
    """Wall time of a fresh Python process running `code` (imports included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env={**os.environ, "KERAS_BACKEND": "jax"})
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="a Keras ResNet50 weights file (default: make a random one)")
    parser.add_argument("--include-top", action="store_true", help="with the default file: include the top")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/convert.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.weights) if args.weights else Path(tmp) / "resnet50.h5"
        if not args.weights:
            make_weights(src, args.include_top)
        top = args.include_top
        out = Path(tmp) / "converted.msgpack"
        convert_first, convert_median = timed(lambda: keras_to_flax(str(src), str(out)), args.repeats)
        load_first, load_median = timed(lambda: load_converted(out), args.repeats)

        import keras

        def keras_load() -> None:
            keras.applications.ResNet50(weights=str(src), include_top=top)

        keras_first, keras_median = timed(keras_load, args.repeats)
        cli = wall(f"from convert.__main__ import main; main(['keras_to_flax', '--weights', {str(src)!r}, "
                   f"'--out', {str(out)!r}])")
        keras_cli = wall(f"import keras; keras.applications.ResNet50(weights={str(src)!r}, include_top={top})")
        rows = [
            {"what": "flaxresnet keras_to_flax", "first_s": convert_first, "median_s": convert_median,
             "process_wall_s": cli},
            {"what": "flaxresnet load_converted", "first_s": load_first, "median_s": load_median},
            {"what": "Keras ResNet50(weights=file)", "first_s": keras_first, "median_s": keras_median,
             "process_wall_s": keras_cli},
        ]
        report("convert a full-size ResNet50 file", rows, args.out, file=src.name,
               file_mb=src.stat().st_size / 1e6, ratio_convert_vs_keras=convert_median / keras_median)


if __name__ == "__main__":
    main()
