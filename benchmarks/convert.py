"""Conversion speed: flaxresnet `keras_to_flax` on a full-size ResNet file (--arch, default ResNet50; V2 too) vs
Keras building the same keras.applications model and loading the file. Without --weights, a random-weight no-top
file of that architecture is made first.
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


# --arch -> the keras.applications constructor.
ARCHS = {name.lower(): name for name in ("ResNet50", "ResNet101", "ResNet152", "ResNet50V2", "ResNet101V2",
                                         "ResNet152V2")}


def make_weights(path: Path, arch: str, include_top: bool) -> None:
    """A legacy .h5 of a random-weight keras.applications `arch`, laid out like the official file."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    model = getattr(keras.applications, arch)(weights=None, include_top=include_top)
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
    parser.add_argument("--arch", choices=sorted(ARCHS), default="resnet50",
                        help="the architecture (default: resnet50)")
    parser.add_argument("--weights", help="a Keras weights file of --arch (default: make a random one)")
    parser.add_argument("--include-top", action="store_true", help="with the default file: include the top")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/convert.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        arch = ARCHS[args.arch]
        src = Path(args.weights) if args.weights else Path(tmp) / f"{args.arch}.h5"
        if not args.weights:
            make_weights(src, arch, args.include_top)
        top = args.include_top
        out = Path(tmp) / "converted.msgpack"
        convert_first, convert_median = timed(lambda: keras_to_flax(str(src), str(out)), args.repeats)
        load_first, load_median = timed(lambda: load_converted(out), args.repeats)

        import keras

        def keras_load() -> None:
            getattr(keras.applications, arch)(weights=str(src), include_top=top)

        keras_first, keras_median = timed(keras_load, args.repeats)
        cli = wall(f"from convert.__main__ import main; main(['keras_to_flax', '--weights', {str(src)!r}, "
                   f"'--out', {str(out)!r}])")
        keras_cli = wall(f"import keras; keras.applications.{arch}(weights={str(src)!r}, include_top={top})")
        rows = [
            {"what": "flaxresnet keras_to_flax", "first_s": convert_first, "median_s": convert_median,
             "process_wall_s": cli},
            {"what": "flaxresnet load_converted", "first_s": load_first, "median_s": load_median},
            {"what": f"Keras {arch}(weights=file)", "first_s": keras_first, "median_s": keras_median,
             "process_wall_s": keras_cli},
        ]
        report(f"convert a full-size {arch} file", rows, args.out, arch=arch, file=src.name,
               file_mb=src.stat().st_size / 1e6, ratio_convert_vs_keras=convert_median / keras_median)


if __name__ == "__main__":
    main()
