"""The official keras-applications ResNet (V1 and V2) weight files: URL, md5, and the shared `~/.keras/models`
cache."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from flaxresnet.errors import UserError
from flaxresnet.weights_file import atomic_write, md5sum

BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
# (top, notop) md5 per depth, as keras.applications.resnet.WEIGHTS_HASHES: ResNet50/101/152 ('resnet50', ...)
# and ResNet50V2/101V2/152V2 ('resnet50v2', ...).
MD5 = {
    50: ("2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626"),
    101: ("f1aeb4b969a6efcfb50fad2f0c20cfc5", "88cf7a10940856eca736dc7b7e228a21"),
    152: ("100835be76be38e30d865e96f2aaae62", "ee4c566cf9a93f14d82f913c2dc6dd0c"),
}
MD5_V2 = {
    50: ("3ef43a0b657b3be2300d5770ece849e0", "fac2f116257151a9d068a22e544a4917"),
    101: ("6343647c601c52e1368623803854d971", "c0ed64b8031c3730f411d2eb4eea35b5"),
    152: ("a49b44d1979771252814e80f8ec446f9", "ed17cf2e0169df9d443503ef94b23b33"),
}
HASHES = {"v1": MD5, "v2": MD5_V2}  # per family, by its `naming.Family.version`
TIMEOUT_S = 10


def file_name(depth: int, include_top: bool, family: str = "v1") -> str:
    """The official file name, e.g. resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 (family 'v1') or
    resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5 ('v2')."""
    return (f"resnet{depth}{'v2' if family == 'v2' else ''}_weights_tf_dim_ordering_tf_kernels"
            f"{'' if include_top else '_notop'}.h5")


def cache_dir() -> Path:
    """Where Keras caches application weights: $KERAS_HOME/models, else ~/.keras/models."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def imagenet_weights(depth: int, include_top: bool, family: str = "v1") -> Path:
    """Path of the verified official file of `family` ('v1' or 'v2'): reused from the cache, else downloaded
    there (md5-checked)."""
    if family not in HASHES:
        raise UserError(f"no official ImageNet weights for family {family!r}: use --family v1 or v2")
    hashes = HASHES[family]
    if depth not in hashes:
        raise UserError(f"no official ImageNet weights for depth {depth}: use --depth 50, 101 or 152")
    name, expected = file_name(depth, include_top, family), hashes[depth][0 if include_top else 1]
    path = cache_dir() / name
    if path.is_file() and md5sum(path) == expected:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(BASE_URL + name, timeout=TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                def write(f) -> None:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        f.write(chunk)
                        bar.update(len(chunk))
                atomic_write(path, write)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise UserError(f"cannot download {BASE_URL + name} ({getattr(e, 'reason', e)}): offline? download "
                        f"it elsewhere and pass --weights PATH, or place it in {path.parent}") from e
    if md5sum(path) != expected:
        path.unlink()
        raise UserError(f"downloaded {name} has the wrong md5 (expected {expected}): the download was "
                        f"corrupted; run the command again")
    return path
