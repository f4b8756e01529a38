"""Synthetic datasets on disk, made offline without TensorFlow: real tfds ArrayRecord datasets of PNG-encoded
images (what a prepared CIFAR-100 is) and folders of JPEG photo-like images. The input-pipeline benchmark
reads them; the tests build their small tfds datasets with `prepare_tfds_images` too. tensorflow-datasets is
imported only to prepare a dataset (the GPU machine has none)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    """`image` (H, W[, C]) uint8 encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def prepare_tfds_images(data_dir: Path, splits: dict[str, int], num_classes: int = 3,
                        sizes: tuple[tuple[int, int], ...] = ((12, 12),), channels: int = 3,
                        label_key: str = "label", class_label: bool = True, seed: int = 0) -> str:
    """Prepare a real image classification dataset in tfds' ArrayRecord format (no TensorFlow needed).

    Example i of a split has label i % num_classes and size sizes[i % len(sizes)]; its top-left pixel holds
    its index (i % 256) so tests can check the read order. A single size is declared as the feature's fixed
    shape, several as varying (None, None). Returns the dataset name to pass to `tfds.builder`.
    """
    import tensorflow_datasets as tfds

    fixed = len(sizes) == 1
    shape = (*sizes[0], channels) if fixed else (None, None, channels)
    label = tfds.features.ClassLabel(num_classes=num_classes) if class_label else tfds.features.Scalar(np.int64)

    class TestImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Random images; registered nowhere, so tfds reads it back from its files like any prepared one."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=shape), label_key: label}))

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(n, k) for k, (name, n) in enumerate(splits.items())}

        def _generate_examples(self, n, split_seed):
            rng = np.random.default_rng((seed, split_seed))
            for i in range(n):
                image = rng.integers(0, 256, (*sizes[i % len(sizes)], channels), dtype=np.uint8)
                image[0, 0] = i % 256
                yield i, {"image": png_bytes(image.squeeze(-1) if channels == 1 else image),
                          label_key: i % num_classes}

    TestImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return "test_images"


def write_jpeg_folder(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> Path:
    """`classes` sub-folders of `per_class` JPEGs (quality 90) of `size` x `size` px: smooth random colour fields
    with noise, which compress about as photos do (noise alone would make decoding slower than for photos)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
                (size, size), Image.Resampling.BICUBIC)
            noisy = np.asarray(coarse).astype(np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / f"class{c:03d}" / f"{i}.jpg",
                                                                           quality=90)
    return root
