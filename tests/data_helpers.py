"""Test data builders: mock tfds datasets, small real ArrayRecord datasets (`benchmarks.datasets`, shared with the
benchmarks; import it from there) and image folders, all offline.

`mock_tfds` is how a test gets mock CIFAR-100: plain `tfds.testing.mock_data()` finds no metadata files (the
tfds wheel does not ship them), so it knows no split names and `is_prepared()` is False, which flaxresnet
rightly reports as an unprepared dataset. `mock_tfds` writes the metadata (splits, ArrayRecord format) first.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


@contextlib.contextmanager
def mock_tfds(data_dir: Path, name: str = "cifar100", num_examples: int = 16,
              splits: dict[str, int] | None = None) -> Iterator[None]:
    """Within the block, every split of tfds dataset `name` yields `num_examples` random examples.

    `splits` ({name: size}, default CIFAR's train 50000 / test 10000) only sets the metadata; the mock ignores
    the sizes. Any `data_dir` the code under test passes is replaced by this one.
    """
    write_tfds_metadata(data_dir, name, splits or {"train": 50_000, "test": 10_000})
    with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(data_dir)):
        yield


def write_tfds_metadata(data_dir: Path, name: str, splits: dict[str, int],
                        file_format: str = "array_record") -> None:
    """Write the metadata files of registered tfds dataset `name` (no data): tfds then deems it prepared."""
    builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
    builder.info.set_splits(tfds.core.SplitDict(
        [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in splits.items()]))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)


def write_image_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """Write `counts[class]` images of random sizes and modes per class sub-folder, as PNG and JPEG."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            height, width = rng.integers(10, 80, 2)
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            if i % 3 == 2:
                image = image.convert("L")
            image.save(root / name / (f"{i}.png" if i % 2 else f"{i}.JPG"))
    return root


def write_digits_folder(root: Path, per_class: int) -> Path:
    """The first `per_class` of each of scikit-learn's 8x8 digits as RGB PNGs in one sub-folder per digit (0..16
    scaled to 0..255 as the digits dataset does): a learnable image folder smaller than the digits dataset."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[:per_class]:
            gray = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(gray).convert("RGB").save(root / str(label) / f"{i}.png")
    return root
