"""Keras-exact ResNet v1 (50/101/152) and v2 (50V2/101V2/152V2) in Flax linen.

Every submodule is named exactly after the Keras layer it mirrors (`conv1_conv`, `conv2_block1_0_conv`, ...,
`predictions`), so converting Keras weights is a rename plus checks, and a reader finds any tensor in both
worlds. Padding is explicit, as Keras' ZeroPadding2D layers do it: Flax 'SAME' differs for the strided stem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxresnet.preprocess import preprocess_input, upsample

# Blocks per stage (conv2..conv5) and bottleneck widths, as in keras.applications.
STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
STAGE_FILTERS = (64, 128, 256, 512)
# BN epsilon of the two weight origins: current keras-applications files, and the old v0.2 ResNet50 file.
KERAS_BN_EPSILON = 1.001e-5
LEGACY_BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99


def param_dtype(dtype: Any) -> jnp.dtype:
    """The dtype of parameters, BN statistics and outputs for compute `dtype`: float32 for float32, bfloat16 and
    float16 compute (mixed precision keeps the weights wide), float64 for float64 (a verification mode, which
    needs `jax_enable_x64`: without it JAX would silently compute in float32)."""
    wide = jnp.promote_types(dtype, jnp.float32)
    if wide == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 or call "
                         "jax.config.update('jax_enable_x64', True) before any JAX work")
    return wide


class BatchNorm(nn.Module):
    """Keras' BatchNormalization over the last axis, computed the way Keras 3 computes it.

    Parameters and statistics in `param_dtype(dtype)` (float32, or float64 in float64 mode); the batch variance
    is the mean squared deviation from the batch mean (both averaged over `axis_name` devices: global-batch
    statistics); moving statistics updated as `moving * momentum + batch * (1 - momentum)`; output `x * inv + (beta - mean * inv)` with
    `inv = gamma / sqrt(var + epsilon)`, cast to `dtype`. Besides matching Keras' rounding, this form makes
    the backward pass one reduction per layer cheaper than flax.linen.BatchNorm's `(x - mean) * inv + beta`
    (about 25% less time in BatchNorm layers on CPU). Variables are named as flax.linen.BatchNorm names them:
    params `scale`, `bias`; batch_stats `mean`, `var`.
    """

    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = KERAS_BN_EPSILON
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features, wide = x.shape[-1], param_dtype(self.dtype)
        scale = self.param("scale", nn.initializers.ones, (features,), wide)
        bias = self.param("bias", nn.initializers.zeros, (features,), wide)
        moving_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), wide)
        moving_var = self.variable("batch_stats", "var", jnp.ones, (features,), wide)
        x = x.astype(wide)
        if self.use_running_average:
            mean, var = moving_mean.value, moving_var.value
        else:
            mean = self._mean(x)
            var = self._mean(jnp.square(x - mean))
            if not self.is_initializing():
                moving_mean.value = moving_mean.value * self.momentum + mean * (1 - self.momentum)
                moving_var.value = moving_var.value * self.momentum + var * (1 - self.momentum)
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        return (x * inv + (bias - mean * inv)).astype(self.dtype)

    def _mean(self, x: jnp.ndarray) -> jnp.ndarray:
        """Per-channel mean over all but the last axis, and over the devices of `axis_name`."""
        mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
        return mean if self.axis_name is None else jax.lax.pmean(mean, self.axis_name)


class KerasResNet(nn.Module):
    """What both ResNet families share: the builders of their Keras layers (Conv2D with its ZeroPadding2D made
    explicit, BatchNormalization), the stem's max pool and the top, from the subclass's `depth`, `include_top`,
    `num_classes`, `bn_epsilon`, `axis_name` and `dtype`; and the keras.applications `preprocess_input` mode
    its inputs take (`preprocess`)."""

    preprocess: ClassVar[str]

    def _conv(self, features: int, kernel: int, stride: int, pad: int, name: str,
              use_bias: bool = True) -> nn.Conv:
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                       use_bias=use_bias, dtype=self.dtype, param_dtype=param_dtype(self.dtype), name=name)

    def _bn(self, train: bool, name: str) -> BatchNorm:
        return BatchNorm(use_running_average=not train, epsilon=self.bn_epsilon,
                         axis_name=self.axis_name if train else None, dtype=self.dtype, name=name)

    def _input(self, x: jnp.ndarray) -> jnp.ndarray:
        """`x` in the compute dtype, after checking the depth and (through `param_dtype`) the dtype."""
        if self.depth not in STAGE_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(STAGE_BLOCKS)}, got {self.depth}")
        param_dtype(self.dtype)  # refuses float64 without 64-bit JAX
        return jnp.asarray(x, self.dtype)

    def _pool1(self, x: jnp.ndarray, pad: int) -> jnp.ndarray:
        """`pool1_pad` (zero padding) and `pool1_pool` (3x3 max pool, stride 2), sown as 'pool1_pool'."""
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        self.sow("intermediates", "pool1_pool", x)
        return x

    def _top(self, x: jnp.ndarray) -> jnp.ndarray:
        """The output in `param_dtype(dtype)`: the feature map, or with `include_top` the `predictions` logits of
        its global average."""
        wide = param_dtype(self.dtype)
        if not self.include_top:
            return x.astype(wide)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=wide, name="predictions")(x)
        return x.astype(wide)


class ResNet(KerasResNet):
    """ResNet v1 with Keras layer names; inputs preprocessed in 'caffe' mode.

    Attributes:
      depth: 50, 101 or 152.
      include_top: end with global average pooling and the `predictions` Dense layer (logits, no softmax);
        otherwise return the (N, H/32, W/32, 2048) feature map.
      num_classes: width of `predictions`.
      bn_epsilon: 1.001e-5 for keras-applications weights, 1e-3 for the old v0.2 ResNet50 file.
      pool1_pad: zero padding before the stem max pool; 1 in keras-applications, 0 in the v0.2 model.
      axis_name: pmap axis over which training-mode BatchNorm computes its statistics (global batch).
      dtype: compute dtype; parameters, BN statistics and outputs are `param_dtype(dtype)`: float32, or
        float64 for float64.
    """

    depth: int = 50
    include_top: bool = False
    num_classes: int = 1000
    bn_epsilon: float = KERAS_BN_EPSILON
    pool1_pad: int = 1
    axis_name: str | None = None
    dtype: Any = jnp.float32

    preprocess: ClassVar[str] = "caffe"

    def _block(self, x: jnp.ndarray, filters: int, stride: int, shortcut_conv: bool, name: str,
               train: bool) -> jnp.ndarray:
        """One bottleneck block; the stride sits on the first 1x1 conv (v1, not v1.5)."""
        if shortcut_conv:
            shortcut = self._conv(4 * filters, 1, stride, 0, f"{name}_0_conv")(x)
            shortcut = self._bn(train, f"{name}_0_bn")(shortcut)
        else:
            shortcut = x
        y = nn.relu(self._bn(train, f"{name}_1_bn")(self._conv(filters, 1, stride, 0, f"{name}_1_conv")(x)))
        y = nn.relu(self._bn(train, f"{name}_2_bn")(self._conv(filters, 3, 1, 1, f"{name}_2_conv")(y)))
        y = self._bn(train, f"{name}_3_bn")(self._conv(4 * filters, 1, 1, 0, f"{name}_3_conv")(y))
        out = nn.relu(shortcut + y)
        self.sow("intermediates", f"{name}_out", out)
        return out

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Map Keras-preprocessed images (N, H, W, 3) to features or logits.

        `train=True` runs BatchNorm on batch statistics and updates `batch_stats` (make it mutable).
        Block outputs are sown into the `intermediates` collection under their Keras names.
        """
        x = self._input(x)
        x = nn.relu(self._bn(train, "conv1_bn")(self._conv(64, 7, 2, 3, "conv1_conv")(x)))
        self.sow("intermediates", "conv1_relu", x)
        x = self._pool1(x, self.pool1_pad)
        for stage, (blocks, filters) in enumerate(zip(STAGE_BLOCKS[self.depth], STAGE_FILTERS), start=2):
            for block in range(1, blocks + 1):
                stride = 2 if block == 1 and stage > 2 else 1
                x = self._block(x, filters, stride, block == 1, f"conv{stage}_block{block}", train)
        return self._top(x)


def ResNet50(**kwargs: Any) -> ResNet:
    """ResNet50 with Keras layer names; see `ResNet` for the options."""
    return ResNet(depth=50, **kwargs)


def ResNet101(**kwargs: Any) -> ResNet:
    """ResNet101 with Keras layer names; see `ResNet` for the options."""
    return ResNet(depth=101, **kwargs)


def ResNet152(**kwargs: Any) -> ResNet:
    """ResNet152 with Keras layer names; see `ResNet` for the options."""
    return ResNet(depth=152, **kwargs)


class ResNetV2(KerasResNet):
    """ResNet v2 (pre-activation) with Keras layer names, as keras.applications' `ResNet50V2` computes it (its
    `resnet.residual_block_v2` and `stack_residual_blocks_v2`); inputs preprocessed in 'tf' mode.

    The stem is `conv1_conv` (7x7/2, bias; padding `conv1_pad`) and the stem max pool, without BN or ReLU; each
    block pre-activates its input (`{n}_preact_bn`, relu), which the stack's first block also feeds to its
    shortcut `{n}_0_conv` (1x1, bias), while the others pass their input on (through a 1x1 max pool of the
    block's stride: a subsampling); the branch is `{n}_1_conv` (1x1, no bias) / `_1_bn` / relu, `{n}_2_conv`
    (3x3 of the block's stride, no bias; padding `{n}_2_pad`) / `_2_bn` / relu, `{n}_3_conv` (1x1, bias), added
    to the shortcut. The stride sits on the last block of conv2..conv4 (conv5 keeps its size); the blocks end in
    `post_bn`, relu (sown as 'post_relu'). BN epsilon 1.001e-5 everywhere.

    Attributes: `depth`, `include_top`, `num_classes`, `axis_name` and `dtype`, as in `ResNet`.
    """

    depth: int = 50
    include_top: bool = False
    num_classes: int = 1000
    axis_name: str | None = None
    dtype: Any = jnp.float32

    preprocess: ClassVar[str] = "tf"
    bn_epsilon: ClassVar[float] = KERAS_BN_EPSILON

    def _block(self, x: jnp.ndarray, filters: int, stride: int, shortcut_conv: bool, name: str,
               train: bool) -> jnp.ndarray:
        """One pre-activation bottleneck block; the stride sits on the 3x3 conv and the shortcut."""
        preact = nn.relu(self._bn(train, f"{name}_preact_bn")(x))
        if shortcut_conv:
            shortcut = self._conv(4 * filters, 1, stride, 0, f"{name}_0_conv")(preact)
        elif stride > 1:  # Keras' MaxPooling2D(1, strides=stride)
            shortcut = nn.max_pool(x, (1, 1), strides=(stride, stride), padding="VALID")
        else:
            shortcut = x
        y = nn.relu(self._bn(train, f"{name}_1_bn")(self._conv(filters, 1, 1, 0, f"{name}_1_conv", False)(preact)))
        y = nn.relu(self._bn(train, f"{name}_2_bn")(self._conv(filters, 3, stride, 1, f"{name}_2_conv", False)(y)))
        out = shortcut + self._conv(4 * filters, 1, 1, 0, f"{name}_3_conv")(y)
        self.sow("intermediates", f"{name}_out", out)
        return out

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Map 'tf'-preprocessed images (N, H, W, 3) to features (`post_relu`) or logits; `train` and the
        `intermediates` as in `ResNet`."""
        x = self._pool1(self._conv(64, 7, 2, 3, "conv1_conv")(self._input(x)), 1)
        for stage, (blocks, filters) in enumerate(zip(STAGE_BLOCKS[self.depth], STAGE_FILTERS), start=2):
            for block in range(1, blocks + 1):
                stride = 2 if block == blocks and stage < 5 else 1
                x = self._block(x, filters, stride, block == 1, f"conv{stage}_block{block}", train)
        x = nn.relu(self._bn(train, "post_bn")(x))
        self.sow("intermediates", "post_relu", x)
        return self._top(x)


def ResNet50V2(**kwargs: Any) -> ResNetV2:
    """ResNet50V2 with Keras layer names; see `ResNetV2` for the options."""
    return ResNetV2(depth=50, **kwargs)


def ResNet101V2(**kwargs: Any) -> ResNetV2:
    """ResNet101V2 with Keras layer names; see `ResNetV2` for the options."""
    return ResNetV2(depth=101, **kwargs)


def ResNet152V2(**kwargs: Any) -> ResNetV2:
    """ResNet152V2 with Keras layer names; see `ResNetV2` for the options."""
    return ResNetV2(depth=152, **kwargs)


# The backbone of each family a Classifier (and train.py's --family) names.
BACKBONES: dict[str, type[KerasResNet]] = {"v1": ResNet, "v2": ResNetV2}
def family_of(model: nn.Module) -> str:
    """'v1' for a ResNet, 'v2' for a ResNetV2 (its `BACKBONES` key); a `Classifier`'s is its backbone's."""
    if isinstance(model, Classifier):
        return model.family
    return next(family for family, kind in BACKBONES.items() if isinstance(model, kind))


# The suffix of Keras' model names of each family (ResNet50, ResNet50V2).
ARCH_SUFFIX = {"v1": "", "v2": "V2"}


def arch_name(family: str, depth: int | str = "") -> str:
    """Keras' name of the architecture: ResNet50, ..., ResNet152V2 (without a depth: ResNet, ResNetV2)."""
    return f"ResNet{depth}{ARCH_SUFFIX[family]}"


# Model kinds a weights file can name in its metadata (see weights_file.build_model).
MODEL_KINDS: dict[str, type[nn.Module]] = {"resnet": ResNet, "resnet_v2": ResNetV2}


def global_average_pool(features: jnp.ndarray) -> jnp.ndarray:
    """(N, H, W, C) -> (N, C): Keras' GlobalAveragePooling2D, the first layer of every head (it has no parameters,
    so the feature cache can hold its output)."""
    return jnp.mean(features, axis=(1, 2))


# Keras BatchNormalization defaults, which the seed head's BN layer used (not the backbone's 1.001e-5).
HEAD_BN_EPSILON = 1e-3
HEADS = ("seed", "linear")


class Head(nn.Module):
    """Classifier head on a backbone feature map, named after the seed's Keras Sequential layers.

    'seed': GlobalAveragePooling2D -> `dense` (hidden, relu) -> `dropout` -> `batch_normalization`
    (Keras defaults: epsilon 1e-3, momentum 0.99) -> `dense_1` (num_classes logits; Keras had softmax here).
    'linear': GlobalAveragePooling2D -> `dense` (num_classes logits).
    Dense kernels start glorot-uniform with zero biases, as Keras initialises them.
    """

    num_classes: int
    kind: str = "seed"
    hidden: int = 256
    dropout: float = 0.25
    axis_name: str | None = None
    dtype: Any = jnp.float32

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, kernel_init=nn.initializers.glorot_uniform(), dtype=self.dtype,
                        param_dtype=param_dtype(self.dtype), name=name)

    @nn.compact
    def __call__(self, features: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """(N, H, W, C) features -> (N, num_classes) logits in `param_dtype(dtype)`; `train` enables dropout and
        batch BN."""
        wide = param_dtype(self.dtype)
        x = global_average_pool(features)
        if self.kind == "linear":
            return self._dense(self.num_classes, "dense")(x).astype(wide)
        if self.kind != "seed":
            raise ValueError(f"head must be one of {HEADS}, got {self.kind!r}")
        x = nn.relu(self._dense(self.hidden, "dense")(x))
        x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        x = BatchNorm(use_running_average=not train, epsilon=HEAD_BN_EPSILON,
                      axis_name=self.axis_name if train else None, dtype=self.dtype,
                      name="batch_normalization")(x)
        return self._dense(self.num_classes, "dense_1")(x).astype(wide)


class Classifier(nn.Module):
    """Raw RGB images in, logits out: preprocessing (the backbone family's, unless `preprocess` says otherwise),
    optional augmentation, upsampling, backbone, head.

    Preprocessing and upsampling live in the model so that they run on device inside the jitted step, and a
    saved classifier predicts from raw images of their native size (e.g. 32 px CIFAR). Submodules `backbone`
    (a no-top `ResNet` or `ResNetV2`, whose variables are exactly a converter tree) and `head` (`Head`). Every attribute
    but `axis_name` is JSON-able, so `metadata()` rebuilds the model through `weights_file.build_model`.

    Attributes:
      num_classes: number of logits.
      family: the backbone's, 'v1' (`ResNet`, caffe preprocessing) or 'v2' (`ResNetV2`, tf preprocessing).
      depth, bn_epsilon, pool1_pad: the backbone's, as in `ResNet` (take them from the converted file); a
        ResNetV2 has Keras' epsilon and padding only, so these two keep their defaults for 'v2'.
      head, hidden, dropout: the head's kind ('seed' or 'linear'), hidden width and dropout rate.
      preprocess: how the raw images are preprocessed, a `preprocess_input` mode ('caffe', 'tf', 'none'); None
        (train.py's classifiers): the family's, caffe for 'v1' and tf for 'v2'. A converted Keras classifier
        records the preprocessing its model was trained on.
      image_size: side the images are upsampled to before the backbone; None keeps the input size.
      upsample: 'nearest' (Keras UpSampling2D, integer factor) or 'bilinear'.
      backbone_bn_train: whether the backbone's BatchNorm uses batch statistics (and updates its moving
        statistics) when `train=True`; False for feature extraction (the `backbone` freeze preset).
      axis_name: pmap axis over which training-mode BatchNorm computes statistics (global batch).
      dtype: compute dtype name, e.g. 'float32' or 'bfloat16'; parameters stay float32, logits are float32
        ('float64' keeps everything in float64, to verify against a float64 reference).
    """

    num_classes: int
    family: str = "v1"
    depth: int = 50
    bn_epsilon: float = KERAS_BN_EPSILON
    pool1_pad: int = 1
    head: str = "seed"
    hidden: int = 256
    dropout: float = 0.25
    preprocess: str | None = None
    image_size: int | None = None
    upsample: str = "nearest"
    backbone_bn_train: bool = True
    axis_name: str | None = None
    dtype: str = "float32"

    # Width of the backbone's feature map (4 x the last stage's bottleneck width) for every depth.
    FEATURES = 4 * STAGE_FILTERS[-1]

    def setup(self) -> None:
        dtype = jnp.dtype(self.dtype)
        if self.family not in BACKBONES:
            raise ValueError(f"family must be one of {sorted(BACKBONES)}, got {self.family!r}")
        v1 = {"bn_epsilon": self.bn_epsilon, "pool1_pad": self.pool1_pad} if self.family == "v1" else {}
        self.backbone_net = BACKBONES[self.family](depth=self.depth, axis_name=self.axis_name, dtype=dtype,
                                                   name="backbone", **v1)
        self.head_net = Head(self.num_classes, kind=self.head, hidden=self.hidden, dropout=self.dropout,
                             axis_name=self.axis_name, dtype=dtype, name="head")

    @property
    def preprocess_mode(self) -> str:
        """The `preprocess_input` mode of the raw images: `preprocess`, else the family's."""
        return self.preprocess or BACKBONES[self.family].preprocess

    def metadata(self) -> dict[str, Any]:
        """The weights-file `model` entry ({'kind', 'config'}) that rebuilds this classifier: every attribute but
        the pmap axis (and Flax's parent and name), so a new attribute is saved without a further edit."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("axis_name", "parent", "name")}
        return {"kind": "classifier", "config": config}

    def features(self, images: jnp.ndarray, train: bool = False,
                 augment: Callable[[jnp.ndarray], jnp.ndarray] | None = None) -> jnp.ndarray:
        """Raw RGB images (N, H, W, 3), uint8 or 0..255 floats -> backbone feature map.

        `augment`, if given, maps the preprocessed images at their native size to augmented ones (it runs
        after preprocessing and before upsampling, as the seed's random erasing did).
        """
        x = preprocess_input(images, param_dtype(self.dtype), mode=self.preprocess_mode)
        if augment is not None:
            x = augment(x)
        if self.image_size is not None:
            x = upsample(x, self.image_size, self.upsample)
        return self.backbone_net(x, train=train and self.backbone_bn_train)

    def pooled_features(self, images: jnp.ndarray) -> jnp.ndarray:
        """Raw RGB images -> (N, FEATURES): the backbone's inference-mode features globally average-pooled, the
        head's input after its parameter-free first layer (what the feature cache holds, `feature_cache`)."""
        return global_average_pool(self.features(images))

    def classify(self, features: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Backbone feature map (N, h, w, FEATURES) -> (N, num_classes) logits (the head alone)."""
        return self.head_net(features, train=train)

    def __call__(self, images: jnp.ndarray, train: bool = False,
                 augment: Callable[[jnp.ndarray], jnp.ndarray] | None = None) -> jnp.ndarray:
        """Raw RGB images -> logits; see `features`. `train` enables dropout and batch statistics."""
        return self.classify(self.features(images, train, augment), train)


MODEL_KINDS["classifier"] = Classifier
