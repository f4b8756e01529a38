"""Training data: sources -> in-memory uint8 splits -> seeded host batches -> sharded device batches.

Sources (`load_dataset` specs):
- `cifar100` (= `tfds:cifar100:label`) and `tfds:NAME[:LABEL_KEY]`: a tfds dataset prepared in the ArrayRecord
  format, read with random access (no TensorFlow at training time, never a download). Validation is the
  'test' split, else 'validation', else a seeded, stratified 20% of 'train'.
- `folder:PATH`: one sub-folder of images per class (sorted names give the class ids), decoded with pillow and
  resized to `image_size`; validation is a seeded, stratified 20% of each class.
- `digits`: scikit-learn's 8x8 digits (optional extra `flaxresnet[digits]`) as RGB 0-255, seeded 80/20 split.

Every example of a dataset has one image size: the source's own when it has one (CIFAR 32x32, digits 8x8; the
model upsamples on device), else `image_size`. Images stay uint8 on the host; batches are dicts
{'image': (B, H, W, 3) uint8, 'label': (B,) int32} plus 'mask' (B,) bool for evaluation. A `FeatureSplit` (the
backbone features of a split's images, `feature_cache`) is batched the same way, under 'features'.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from flaxresnet.errors import UserError

Batch = dict[str, np.ndarray]

VALIDATION_FRACTION = 0.2
DEFAULT_FOLDER_IMAGE_SIZE = 64
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
SPEC_FORMS = "cifar100, tfds:NAME[:LABEL_KEY], folder:PATH or digits"
_VERSION = re.compile(r"\d+\.\d+\.\d+")


@dataclasses.dataclass(frozen=True)
class Split:
    """Examples held in memory: `images` uint8 (N, H, W, 3), `labels` int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int32 ({len(self.images)},), got {self.labels.dtype} "
                             f"{self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def columns(self) -> dict[str, np.ndarray]:
        """The per-example arrays under their batch keys."""
        return {"image": self.images, "label": self.labels}


@dataclasses.dataclass(frozen=True)
class FeatureSplit:
    """A split's examples as backbone features (`feature_cache`): `features` float (N, F), one row an image;
    `labels` int32 (N,). Batched like a Split, with 'features' in place of 'image'."""

    features: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if not np.issubdtype(self.features.dtype, np.floating) or self.features.ndim != 2:
            raise ValueError(f"features must be float (N, F), got {self.features.dtype} {self.features.shape}")
        if self.labels.dtype != np.int32 or self.labels.shape != self.features.shape[:1]:
            raise ValueError(f"labels must be int32 ({len(self.features)},), got {self.labels.dtype} "
                             f"{self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def columns(self) -> dict[str, np.ndarray]:
        """The per-example arrays under their batch keys."""
        return {"features": self.features, "label": self.labels}


# What the batching functions take: images, or their cached features.
Examples = Split | FeatureSplit


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train and a validation split with the names of the classes (label i is `class_names[i]`)."""

    train: Split
    validation: Split
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_dataset(spec: str, data_dir: str | None = None, seed: int = 0, image_size: int | None = None) -> Dataset:
    """Load the dataset named by `spec` into memory; see the module docstring for the specs.

    `data_dir` is the tfds data folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets), `seed` fixes any
    split-off validation part, and `image_size` is the side images are resized to where the source has no
    single size of its own (folders: default 64; tfds datasets of varying size: required); it is ignored
    otherwise. Raises UserError for an unknown spec or a source that cannot be read.
    """
    if spec == "cifar100":
        return _load_tfds("cifar100", "label", data_dir, seed, image_size)
    if spec == "digits":
        return _load_digits(seed)
    kind, _, rest = spec.partition(":")
    if kind == "tfds" and rest:
        name, _, label_key = rest.rpartition(":")
        if not name or _VERSION.fullmatch(label_key):  # no label key, or the tail is a version: NAME:1.2.3
            name, label_key = rest, "label"
        return _load_tfds(name, label_key, data_dir, seed, image_size)
    if kind == "folder" and rest:
        return _load_folder(Path(rest), seed, image_size or DEFAULT_FOLDER_IMAGE_SIZE)
    raise UserError(f"unknown dataset {spec!r}: use one of {SPEC_FORMS}")


def _load_tfds(name: str, label_key: str, data_dir: str | None, seed: int, image_size: int | None) -> Dataset:
    """Read a prepared tfds dataset through its random-access data source; never downloads."""
    try:  # imported here, so that every other source works without tensorflow-datasets installed
        import tensorflow_datasets as tfds
    except ModuleNotFoundError as e:
        if e.name != "tensorflow_datasets":
            raise
        raise UserError(f"tfds dataset {name!r} needs tensorflow-datasets, which is not installed: pip install "
                        f"tensorflow-datasets (or use a folder:PATH or digits dataset)") from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise UserError(f"no tfds dataset named {name!r}: check the name against the tfds catalog "
                        f"(https://www.tensorflow.org/datasets/catalog)") from e
    if not builder.is_prepared():  # the `tfds build` CLI would also need apache-beam, so give Python
        data_dir_arg = f"data_dir={data_dir!r}, " if data_dir else ""
        raise UserError(f"tfds dataset {name!r} is not prepared in {builder.data_path}: prepare it once (needs "
                        f"TensorFlow and the network): pip install tensorflow-cpu && python -c \"import "
                        f"tensorflow_datasets as tfds; tfds.builder({name!r}, {data_dir_arg}"
                        f"file_format='array_record').download_and_prepare()\"")
    info = builder.info
    if not info.available_file_formats() & set(tfds.core.FileFormat.with_random_access()):
        raise UserError(f"tfds dataset {name!r} in {builder.data_path} is stored as {info.file_format.value}, "
                        f"which has no random access: convert it once: pip install tensorflow-cpu apache-beam "
                        f"&& tfds convert_format --dataset_version_dir={builder.data_path} "
                        f"--out_file_format=array_record")
    features = info.features
    if label_key not in features:
        raise UserError(f"tfds dataset {name!r} has no label feature {label_key!r}: use tfds:{name}:KEY with "
                        f"KEY one of {sorted(features.keys())}")
    image_key = _image_feature(name, features)
    if features[image_key].np_dtype != np.uint8:
        raise UserError(f"tfds dataset {name!r} has {np.dtype(features[image_key].np_dtype).name} images: only "
                        f"uint8 images are supported")
    height, width = features[image_key].shape[:2]
    if height is None or width is None:
        if image_size is None:
            raise UserError(f"tfds dataset {name!r} has images of varying size: give an image size to "
                            f"resize them to (--image-size)")
        height = width = image_size
    if "train" not in info.splits:
        raise UserError(f"tfds dataset {name!r} has no 'train' split (it has {sorted(info.splits)})")

    def read(split: str) -> Split:
        source = builder.as_data_source(split=split)
        return _read_source(source, image_key, label_key, (height, width), f"reading {name} {split}")

    train = read("train")
    validation_split = next((s for s in ("test", "validation") if s in info.splits), None)
    if validation_split is None:
        train, validation = _split_off(train, seed, f"the 'train' split of tfds dataset {name!r}")
    else:
        validation = read(validation_split)
    label_feature = features[label_key]
    if isinstance(label_feature, tfds.features.ClassLabel):
        class_names = list(label_feature.names)
    else:
        class_names = [str(i) for i in range(int(max(train.labels.max(), validation.labels.max())) + 1)]
    return Dataset(train, validation, class_names)


def _image_feature(name: str, features: Any) -> str:
    """The key of the dataset's image feature: 'image', or its only Image feature."""
    import tensorflow_datasets as tfds

    if "image" in features:
        return "image"
    keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if len(keys) != 1:
        raise UserError(f"tfds dataset {name!r} needs one image feature, found {keys or 'none'}: only "
                        f"image classification datasets can be used")
    return keys[0]


def _read_source(source: Sequence[dict[str, Any]], image_key: str, label_key: str, size: tuple[int, int],
                 description: str) -> Split:
    """Decode every example of a tfds data source, in index order, into uint8 RGB images of `size`.

    Shows a progress bar on a terminal: CIFAR-100's 60,000 examples take 20-35 s on one CPU core (300-450 us
    each: the record read, tfds' parsing and the PNG decoding, about a third each).
    """
    images = np.empty((len(source), *size, 3), np.uint8)
    labels = np.empty(len(source), np.int32)
    # Item by item: tfds.testing.mock_data breaks __getitems__ (and batched reads gained only ~25%).
    for i in tqdm(range(len(source)), description, unit="img", leave=False, disable=None):
        example = source[i]
        image = example[image_key]
        if image.shape == (*size, 3):
            images[i] = image
        else:
            images[i] = fit_image(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image), size)
        labels[i] = example[label_key]
    return Split(images, labels)


def fit_image(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """`image` as RGB, resized (bilinear, aspect ratio not kept) to `size` = (height, width)."""
    image = image.convert("RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _load_folder(root: Path, seed: int, image_size: int) -> Dataset:
    """Decode an image folder with one sub-folder per class; validation = a seeded stratified part."""
    if not root.is_dir():
        raise UserError(f"image folder {root} not found: give folder:PATH with one sub-folder of images per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(f"image folder {root} has no class sub-folders: put each class's images in its own "
                        f"sub-folder ({root}/CLASS/IMAGE.jpg)")
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        class_files = sorted(p for p in class_dir.iterdir()
                             if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not class_files:
            raise UserError(f"class folder {class_dir} has no images ({' '.join(IMAGE_EXTENSIONS)}): add "
                            f"some or remove the folder")
        files += class_files
        labels += [label] * len(class_files)
    images = np.empty((len(files), image_size, image_size, 3), np.uint8)
    with ThreadPoolExecutor() as pool:  # pillow releases the GIL while decoding and resizing
        for i, image in enumerate(pool.map(lambda f: _read_image(f, image_size), files)):
            images[i] = image
    train, validation = _split_off(Split(images, np.asarray(labels, np.int32)), seed, f"image folder {root}")
    return Dataset(train, validation, [d.name for d in class_dirs])


def _read_image(path: Path, image_size: int) -> np.ndarray:
    """One image file as uint8 RGB (image_size, image_size, 3); UserError naming the file if unreadable."""
    try:
        with Image.open(path) as image:
            return fit_image(image, (image_size, image_size))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path} ({e}): fix or remove the file") from e


def _load_digits(seed: int) -> Dataset:
    """scikit-learn's 1797 8x8 digits, scaled 0..16 -> 0..255 and repeated to RGB."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UserError("the digits dataset needs scikit-learn: pip install 'flaxresnet[digits]'") from e
    digits = load_digits()
    gray = np.round(digits.images * (255 / 16)).astype(np.uint8)
    split = Split(np.repeat(gray[..., None], 3, axis=-1), digits.target.astype(np.int32))
    train, validation = _split_off(split, seed, "the digits dataset")
    return Dataset(train, validation, [str(d) for d in range(10)])


def _split_off(split: Split, seed: int, what: str) -> tuple[Split, Split]:
    """Split `split` into (train, validation), validation = a seeded VALIDATION_FRACTION of each class.

    Each class gives round-half-up(fraction * its size) examples, so every class keeps at least one training
    example; both parts keep the original order.
    """
    rng = np.random.default_rng(seed)
    is_validation = np.zeros(len(split), bool)
    for label in np.unique(split.labels):
        members = rng.permutation(np.flatnonzero(split.labels == label))
        is_validation[members[:int(VALIDATION_FRACTION * len(members) + 0.5)]] = True
    if not is_validation.any():
        raise UserError(f"{what} has too few examples to split off a validation part ({VALIDATION_FRACTION:.0%} "
                        f"of each class): give a class at least 3 examples")
    return (Split(split.images[~is_validation], split.labels[~is_validation]),
            Split(split.images[is_validation], split.labels[is_validation]))


def num_train_steps(split: Examples, batch_size: int) -> int:
    """Full batches in one training epoch (the last partial batch is dropped); UserError if there are none."""
    if batch_size < 1 or len(split) < batch_size:
        raise UserError(f"batch size {batch_size} does not fit the {len(split)} training examples: choose a "
                        f"batch size between 1 and {len(split)}", option="batch_size")
    return len(split) // batch_size


def train_batches(split: Examples, batch_size: int, seed: int, epoch: int, start: int = 0,
                  rows: slice = slice(None)) -> Iterator[Batch]:
    """The global batches of one training epoch from batch `start` on, shuffled by (seed, epoch) alone, the last
    partial batch dropped; of each only `rows` (a process's share, `distributed.process_rows`)."""
    order = np.random.default_rng((seed, epoch)).permutation(len(split))
    columns = split.columns()
    for step in range(start, num_train_steps(split, batch_size)):
        indices = order[step * batch_size:(step + 1) * batch_size][rows]
        yield {key: column[indices] for key, column in columns.items()}


def eval_batches(split: Examples, batch_size: int, rows: slice = slice(None)) -> Iterator[Batch]:
    """Every example once, in order, in global batches of `batch_size`, the last zero-padded with 'mask' marking
    the real examples; of each only `rows` (a process's share)."""
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be at least 1", option="batch_size")
    columns = split.columns()
    for start in range(0, len(split), batch_size):
        indices = np.arange(start, start + batch_size)[rows]
        mask = indices < len(split)
        indices = np.where(mask, indices, 0)
        batch = {key: column[indices] for key, column in columns.items()}  # copies: zeroing the padding is safe
        for column in batch.values():
            column[~mask] = 0
        yield {**batch, "mask": mask}


def shard(batch: Batch, num_devices: int) -> Batch:
    """Reshape each array from (B, ...) to (num_devices, B // num_devices, ...); UserError if B does not divide."""
    size = len(next(iter(batch.values())))
    if size % num_devices:
        raise UserError(f"batch size {size} does not divide over {num_devices} devices: choose a batch size "
                        f"that is a multiple of {num_devices}", option="batch_size")
    return {k: v.reshape(num_devices, size // num_devices, *v.shape[1:]) for k, v in batch.items()}


def prefetch_to_device(batches: Iterable[Batch], size: int = 2,
                       devices: Sequence[jax.Device] | None = None) -> Iterator[dict[str, jax.Array]]:
    """Shard each host batch over `devices` (default: the local devices, in `jax.pmap` order) `size` ahead.

    Each array is put with a sharding over its leading (device) axis that `jax.pmap` uses as is: no copy or
    reshard when the step runs. Transfers are asynchronous, so the next batches move while a step computes.
    """
    devices = list(devices or jax.local_devices())
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
    batches = iter(batches)

    def put(n: int) -> list[dict[str, jax.Array]]:
        return [jax.device_put(shard(b, len(devices)), sharding) for b in itertools.islice(batches, n)]

    queue = collections.deque(put(size))
    while queue:
        yield queue.popleft()
        queue.extend(put(1))
