"""Training data: sources -> splits (decoded into memory, or streamed) -> seeded host batches -> device batches.

Sources (`open_dataset` specs):
- `cifar100` (= `tfds:cifar100:label`) and `tfds:NAME[:LABEL_KEY]`: a tfds dataset prepared in the ArrayRecord
  format, read with random access (no TensorFlow at training time, never a download). Validation is the
  'test' split, else 'validation', else a seeded, stratified 20% of 'train'.
- `folder:PATH`: one sub-folder of images per class (sorted names give the class ids), decoded with pillow and
  resized to `image_size`; validation is a seeded, stratified 20% of each class.
- `digits`: scikit-learn's 8x8 digits (optional extra `flaxresnet[digits]`) as RGB 0-255, seeded 80/20 split.

Every example of a dataset has one image size: the source's own when it has one (CIFAR 32x32, digits 8x8; the
model upsamples on device), else `image_size`. Each source decodes example i the same way wherever it runs
(`Source.read`), and a split holds its examples one of two ways, the input pipeline (`config.INPUT_PIPELINES`):
- `memory`: a `Split`, every image decoded into RAM as uint8 before the first step (`Dataset.in_memory`; a large
  dataset by worker processes, as a stream of chunks);
- `stream`: a `StreamSplit`, which decodes the examples of each batch when it is needed, in worker processes
  that read a few batches ahead (`stream.py`, on grain): memory does not grow with the dataset, and each process
  of a multi-process run decodes only its rows of every batch.
Batches are the same arrays either way: dicts {'image': (B, H, W, 3) uint8, 'label': (B,) int32} plus 'mask'
(B,) bool for evaluation, in the order of the (seed, epoch) permutation. Any other examples held in memory as
`Columns` (the feature cache's backbone features, `feature_cache.FeatureSplit`) are batched the same way.
`use_pipeline` picks the input pipeline a run asked for and says which in one line.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from flaxresnet import log, stream
from flaxresnet.config import DATASET_FORMS, MEMORY_BUDGET_FRACTION
from flaxresnet.errors import UserError

Batch = dict[str, np.ndarray]

VALIDATION_FRACTION = 0.2
DEFAULT_FOLDER_IMAGE_SIZE = 64
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
# `memory` decodes a split in worker processes (`decode`) from this many examples on: a worker takes ~3 s to start,
# in which one process decodes ~6,000 CIFAR-sized records; it hands over chunks of DECODE_CHUNK examples.
PARALLEL_DECODE_FROM = 10_000
DECODE_CHUNK = 256
_VERSION = re.compile(r"\d+\.\d+\.\d+")


class Source(Protocol):
    """Random access to a dataset's examples, decoded: what a `StreamSplit` reads from, in this process or in a
    worker process (so it must pickle, and hold no open files a copy could not reopen)."""

    image_shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """Example `index`: its image, uint8 `image_shape`, and its label."""

    def all_labels(self) -> np.ndarray:
        """Every example's label, int32, without decoding the images where the source can."""


@dataclasses.dataclass(frozen=True)
class Split:
    """Examples held in memory: `images` uint8 (N, H, W, 3), `labels` int32 (N,). Also a `Source`."""

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

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.images.shape[1:]

    def read(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def all_labels(self) -> np.ndarray:
        return self.labels

    def columns(self) -> dict[str, np.ndarray]:
        """The per-example arrays under their batch keys."""
        return {"image": self.images, "label": self.labels}


@dataclasses.dataclass(frozen=True)
class StreamSplit:
    """Examples decoded when they are batched: example i is `source.read(indices[i])`, decoded by `workers`
    processes (`stream.batches`; 0: in this process)."""

    source: Source
    indices: np.ndarray
    workers: int = 0

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.source.image_shape


class Columns(Protocol):
    """Examples held in memory as per-example arrays under their batch keys (a `Split`, cached features)."""

    def __len__(self) -> int: ...

    def columns(self) -> dict[str, np.ndarray]: ...


# What the batching functions take: images in memory or streamed, or other examples in memory.
Examples = Split | StreamSplit | Columns


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train and a validation split with the names of the classes (label i is `class_names[i]`)."""

    train: Split | StreamSplit
    validation: Split | StreamSplit
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def nbytes(self) -> int:
        """The bytes of every image of both splits decoded as uint8, what the `memory` pipeline holds."""
        return (len(self.train) + len(self.validation)) * math.prod(self.train.image_shape)

    def in_memory(self, workers: int = 0) -> Dataset:
        """Both splits decoded into memory (`Split`s), by `workers` processes where a split is large enough to
        gain from them (`decode`); shows a progress bar on a terminal."""
        return dataclasses.replace(self, train=decode(self.train, "decoding the training images", workers),
                                   validation=decode(self.validation, "decoding the validation images", workers))

    def streamed(self, workers: int) -> Dataset:
        """Both splits streamed (`StreamSplit`s), decoded by `workers` processes (0: in this one)."""
        return dataclasses.replace(self, train=_streamed(self.train, workers),
                                   validation=_streamed(self.validation, workers))


def _streamed(split: Split | StreamSplit, workers: int) -> StreamSplit:
    if isinstance(split, Split):
        return StreamSplit(split, np.arange(len(split)), workers)
    return dataclasses.replace(split, workers=workers)


def decode(split: Split | StreamSplit, description: str, workers: int = 0) -> Split:
    """Every example of `split` decoded into memory, in order: in chunks of DECODE_CHUNK by `workers` processes
    (`stream`) when it has at least PARALLEL_DECODE_FROM examples, else by a thread pool here (pillow's decoding
    and resizing release the GIL; tfds' parsing does not). CIFAR-100's 60,000 examples take 20-35 s in one
    process (300-450 us each: the record read, tfds' parsing and the PNG decoding, about a third each)."""
    if isinstance(split, Split):
        return split
    images = np.empty((len(split), *split.image_shape), np.uint8)
    labels = np.empty(len(split), np.int32)
    with tqdm(total=len(split), desc=description, unit="img", leave=False, disable=None) as bar:
        if workers and len(split) >= PARALLEL_DECODE_FROM:
            chunks = eval_batches(dataclasses.replace(split, workers=workers), DECODE_CHUNK)
            for start, chunk in zip(range(0, len(split), DECODE_CHUNK), chunks):
                count = int(chunk["mask"].sum())
                images[start:start + count] = chunk["image"][:count]
                labels[start:start + count] = chunk["label"][:count]
                bar.update(count)
        else:
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                for i, (image, label) in enumerate(pool.map(split.source.read, split.indices.tolist())):
                    images[i], labels[i] = image, label
                    bar.update()
    return Split(images, labels)


def physical_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_pipeline(choice: str, dataset: Dataset) -> tuple[str, str]:
    """The input pipeline `choice` (one of `config.INPUT_PIPELINES`) means for `dataset`: 'memory' or 'stream', and why
    in words. `auto` is 'memory' when the decoded dataset fits MEMORY_BUDGET_FRACTION of physical memory."""
    size = f"{_megabytes(dataset.nbytes)} decoded"
    if choice != "auto":
        return choice, f"as chosen; the dataset is {size}"
    budget = MEMORY_BUDGET_FRACTION * physical_memory()
    fits = dataset.nbytes <= budget
    return ("memory" if fits else "stream"), (
        f"auto: the dataset is {size}, {'within' if fits else 'over'} the memory budget of {_megabytes(budget)}, "
        f"{MEMORY_BUDGET_FRACTION:.0%} of this machine's memory")


def use_pipeline(dataset: Dataset, choice: str, workers: int | None) -> Dataset:
    """`dataset` decoded into memory or streamed, as the input pipeline `choice` means for it (`choose_pipeline`),
    by `workers` processes (None: `stream.default_workers`); says which in one line."""
    pipeline, why = choose_pipeline(choice, dataset)
    workers = stream.default_workers() if workers is None else workers
    if pipeline == "memory":
        log.say(f"input pipeline: memory, every image decoded before the first step ({why})")
        return dataset.in_memory(workers)
    decoders = "the training process" if not workers else f"{workers} worker process(es)" + (
        " of each training process" if jax.process_count() > 1 else "")
    log.say(f"input pipeline: stream, each batch decoded when needed by {decoders} ({why})")
    return dataset.streamed(workers)


def _megabytes(size: float) -> str:
    return f"{size / 1e6:,.1f} MB" if size < 1e9 else f"{size / 1e9:,.1f} GB"


def load_dataset(spec: str, data_dir: str | None = None, seed: int = 0, image_size: int | None = None) -> Dataset:
    """`open_dataset` decoded into memory (`Dataset.in_memory`)."""
    return open_dataset(spec, data_dir, seed, image_size).in_memory()


def open_dataset(spec: str, data_dir: str | None = None, seed: int = 0, image_size: int | None = None) -> Dataset:
    """The dataset named by `spec` (see the module docstring), its splits streamed in this process
    (`StreamSplit`, workers 0): opened and checked, nothing decoded yet.

    `data_dir` is the tfds data folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets), `seed` fixes any
    split-off validation part, and `image_size` is the side images are resized to where the source has no
    single size of its own (folders: default 64; tfds datasets of varying size: required); it is ignored
    otherwise. Raises UserError for an unknown spec or a source that cannot be read.
    """
    if spec == "cifar100":
        return _open_tfds("cifar100", "label", data_dir, seed, image_size)
    if spec == "digits":
        return _open_digits(seed)
    kind, _, rest = spec.partition(":")
    if kind == "tfds" and rest:
        name, _, label_key = rest.rpartition(":")
        if not name or _VERSION.fullmatch(label_key):  # no label key, or the tail is a version: NAME:1.2.3
            name, label_key = rest, "label"
        return _open_tfds(name, label_key, data_dir, seed, image_size)
    if kind == "folder" and rest:
        return _open_folder(Path(rest), seed, image_size or DEFAULT_FOLDER_IMAGE_SIZE)
    raise UserError(f"unknown dataset {spec!r}: use one of {DATASET_FORMS}", option="dataset")


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A split of a prepared tfds dataset (`Source`): its random-access data source, and the same with the images
    left encoded, for the labels alone. Images of another shape than `image_shape` are resized to it."""

    examples: Sequence[dict[str, Any]]
    undecoded: Sequence[dict[str, Any]]
    image_key: str
    label_key: str
    image_shape: tuple[int, int, int]

    def __len__(self) -> int:
        return len(self.examples)

    def read(self, index: int) -> tuple[np.ndarray, int]:
        example = self.examples[index]
        image = example[self.image_key]
        if image.shape != self.image_shape:
            image = fit_image(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image),
                              self.image_shape[:2])
        return image, int(example[self.label_key])

    def all_labels(self) -> np.ndarray:
        return self._labels

    @functools.cached_property
    def _labels(self) -> np.ndarray:
        """Read once (a pass over every record): splitting off validation and naming the classes both ask."""
        # Item by item: tfds.testing.mock_data breaks __getitems__.
        return np.array([self.undecoded[i][self.label_key] for i in range(len(self.undecoded))], np.int32)


def _open_tfds(name: str, label_key: str, data_dir: str | None, seed: int, image_size: int | None) -> Dataset:
    """Open a prepared tfds dataset through its random-access data source; never downloads."""
    tfds = _import_tfds(name)
    builder = _prepared_builder(tfds, name, data_dir)
    info = builder.info
    image_key, image_shape = _image_feature(tfds, name, info.features, label_key, image_size)
    if "train" not in info.splits:
        raise UserError(f"tfds dataset {name!r} has no 'train' split (it has {sorted(info.splits)})")

    def source(split: str) -> TfdsSource:
        undecoded = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
        return TfdsSource(builder.as_data_source(split=split), undecoded, image_key, label_key, image_shape)

    validation_split = next((s for s in ("test", "validation") if s in info.splits), None)
    if validation_split is None:
        sources = [source("train")]
        splits = _split_off(sources[0], seed, f"the 'train' split of tfds dataset {name!r}")
    else:
        sources = [source("train"), source(validation_split)]
        splits = tuple(StreamSplit(s, np.arange(len(s))) for s in sources)
    label_feature = info.features[label_key]
    if isinstance(label_feature, tfds.features.ClassLabel):
        class_names = list(label_feature.names)
    else:
        labels = np.concatenate([s.all_labels() for s in sources])
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    return Dataset(*splits, class_names)


def _import_tfds(name: str) -> Any:
    """tensorflow_datasets, imported here so that every other source works without it installed."""
    try:
        import tensorflow_datasets as tfds
    except ModuleNotFoundError as e:
        if e.name != "tensorflow_datasets":
            raise
        raise UserError(f"tfds dataset {name!r} needs tensorflow-datasets, which is not installed: pip install "
                        f"tensorflow-datasets (or use a folder:PATH or digits dataset)") from e
    return tfds


def _prepared_builder(tfds: Any, name: str, data_dir: str | None) -> Any:
    """The builder of tfds dataset `name`, prepared in `data_dir` in a format with random access; UserError with
    the command that prepares or converts it otherwise."""
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
    if not builder.info.available_file_formats() & set(tfds.core.FileFormat.with_random_access()):
        raise UserError(f"tfds dataset {name!r} in {builder.data_path} is stored as {builder.info.file_format.value}"
                        f", which has no random access: convert it once: pip install tensorflow-cpu apache-beam "
                        f"&& tfds convert_format --dataset_version_dir={builder.data_path} "
                        f"--out_file_format=array_record")
    return builder


def _image_feature(tfds: Any, name: str, features: Any, label_key: str,
                   image_size: int | None) -> tuple[str, tuple[int, int, int]]:
    """The key of the dataset's image feature ('image', or its only Image feature) and the shape its images are
    read at (their own, or `image_size` square when they vary); UserError unless `label_key` is a feature too and
    the images are uint8."""
    if label_key not in features:
        raise UserError(f"tfds dataset {name!r} has no label feature {label_key!r}: use tfds:{name}:KEY with "
                        f"KEY one of {sorted(features.keys())}", option="dataset")
    keys = ["image"] if "image" in features else [k for k, f in features.items()
                                                  if isinstance(f, tfds.features.Image)]
    if len(keys) != 1:
        raise UserError(f"tfds dataset {name!r} needs one image feature, found {keys or 'none'}: only "
                        f"image classification datasets can be used")
    image = features[keys[0]]
    if image.np_dtype != np.uint8:
        raise UserError(f"tfds dataset {name!r} has {np.dtype(image.np_dtype).name} images: only uint8 images are "
                        f"supported")
    height, width = image.shape[:2]
    if height is None or width is None:
        if image_size is None:
            raise UserError(f"tfds dataset {name!r} has images of varying size: give an image size to resize "
                            f"them to", option="image_size")
        height = width = image_size
    return keys[0], (height, width, 3)


def fit_image(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """`image` as RGB, resized (bilinear, aspect ratio not kept) to `size` = (height, width)."""
    image = image.convert("RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image)


@dataclasses.dataclass(frozen=True)
class FileSource:
    """Image files with their labels (`Source`), each decoded and resized to `image_size` when read."""

    files: list[str]
    labels: np.ndarray
    image_size: int

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.image_size, self.image_size, 3

    def read(self, index: int) -> tuple[np.ndarray, int]:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return fit_image(image, (self.image_size, self.image_size)), int(self.labels[index])
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot read image {path} ({e}): fix or remove the file") from e

    def all_labels(self) -> np.ndarray:
        return self.labels


def _open_folder(root: Path, seed: int, image_size: int) -> Dataset:
    """An image folder with one sub-folder per class; validation = a seeded stratified part."""
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
        files += map(str, class_files)
        labels += [label] * len(class_files)
    source = FileSource(files, np.asarray(labels, np.int32), image_size)
    return Dataset(*_split_off(source, seed, f"image folder {root}"), [d.name for d in class_dirs])


def _open_digits(seed: int) -> Dataset:
    """scikit-learn's 1797 8x8 digits, scaled 0..16 -> 0..255 and repeated to RGB."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UserError("the digits dataset needs scikit-learn: pip install 'flaxresnet[digits]'") from e
    digits = load_digits()
    gray = np.round(digits.images * (255 / 16)).astype(np.uint8)
    source = Split(np.repeat(gray[..., None], 3, axis=-1), digits.target.astype(np.int32))
    return Dataset(*_split_off(source, seed, "the digits dataset"), [str(d) for d in range(10)])


def _split_off(source: Source, seed: int, what: str) -> tuple[StreamSplit, StreamSplit]:
    """Split `source` into (train, validation), validation = a seeded VALIDATION_FRACTION of each class.

    Each class gives round-half-up(fraction * its size) examples, so every class keeps at least one training
    example; both parts keep the original order.
    """
    labels = source.all_labels()
    rng = np.random.default_rng(seed)
    is_validation = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        is_validation[members[:int(VALIDATION_FRACTION * len(members) + 0.5)]] = True
    if not is_validation.any():
        raise UserError(f"{what} has too few examples to split off a validation part ({VALIDATION_FRACTION:.0%} "
                        f"of each class): give a class at least 3 examples")
    return StreamSplit(source, np.flatnonzero(~is_validation)), StreamSplit(source, np.flatnonzero(is_validation))


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
    steps = num_train_steps(split, batch_size)
    order = np.random.default_rng((seed, epoch)).permutation(len(split))
    return _batches(split, order[:steps * batch_size].reshape(steps, batch_size)[start:, rows])


def eval_batches(split: Examples, batch_size: int, rows: slice = slice(None)) -> Iterator[Batch]:
    """Every example once, in order, in global batches of `batch_size`, the last zero-padded with 'mask' marking
    the real examples; of each only `rows` (a process's share)."""
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be at least 1", option="batch_size")
    count = math.ceil(len(split) / batch_size)
    positions = np.arange(count * batch_size).reshape(count, batch_size)[:, rows]
    positions[positions >= len(split)] = -1
    with contextlib.closing(_batches(split, positions)) as batches:
        for batch, batch_positions in zip(batches, positions):
            yield {**batch, "mask": batch_positions >= 0}


def _batches(split: Examples, positions: np.ndarray) -> Iterator[Batch]:
    """One batch for each row of `positions` (example numbers in `split`; -1: padding, all zeros)."""
    if isinstance(split, StreamSplit):
        indices = np.where(positions >= 0, split.indices[np.maximum(positions, 0)], -1)
        return stream.batches(split.source, indices, split.workers)
    return _memory_batches(split.columns(), positions)


def _memory_batches(columns: dict[str, np.ndarray], positions: np.ndarray) -> Iterator[Batch]:
    for batch_positions in positions:
        batch = {key: column[np.maximum(batch_positions, 0)] for key, column in columns.items()}  # copies
        for column in batch.values():
            column[batch_positions < 0] = 0
        yield batch


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
    Closing the returned iterator closes `batches`.
    """
    devices = list(devices or jax.local_devices())
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
    batches = iter(batches)

    def put(n: int) -> list[dict[str, jax.Array]]:
        return [jax.device_put(shard(b, len(devices)), sharding) for b in itertools.islice(batches, n)]

    try:
        queue = collections.deque(put(size))
        while queue:
            yield queue.popleft()
            queue.extend(put(1))
    finally:  # a streamed split's worker processes end with its batches, also when the loop stops early
        if hasattr(batches, "close"):
            batches.close()
