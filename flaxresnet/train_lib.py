"""The fine-tuning step: TrainState, pure `train_step` / `eval_step`, and the one place they are pmapped.

Data parallel over all devices with `jax.pmap(axis_name='batch')`: batches are shaped (devices, per_device,
...), gradients and BN statistics are averaged with `lax.pmean`, and training-mode BatchNorm computes its
statistics over the global batch (the model's `axis_name`). Inside the step, on device: caffe
preprocessing, augmentation, upsampling, forward, loss, gradients with respect to the trainable
parameters only (frozen weights never get a gradient), the optimizer.

What the step is compiled for is exactly what it computes with: the model and the `StepSettings` (optimizer
settings, frozen paths, augmentation, label smoothing), the static part of a TrainState. Nothing else of a
run's Config reaches it, so runs that differ in work folder, data folder, evaluation interval or (constant
schedule) epochs share one compiled step.

Randomness: one root key. Step t uses fold_in(root, t); augmentation keys are fold_in(that, global example
index), so augmentations do not depend on the device count; dropout uses one key per device.

Many hosts: each process feeds its local devices its rows of every global batch (`distributed.process_rows`);
the step numbers examples by `lax.axis_index` over the devices of all processes, so its numbers are those of
one process with as many devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import optax
from flax import jax_utils, struct

from flaxresnet import augment as augment_lib
from flaxresnet import distributed, freeze, optim, trees, weights_file
from flaxresnet.config import Config
from flaxresnet.models import Classifier, ResNet

AXIS = "batch"
Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
Variables = dict[str, Any]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What `train_step` computes with besides the model and the arrays; hashable (a static part of the
    compiled step).

    Attributes:
      optimizer: the optimizer's settings (`optim.Settings`).
      frozen: '/'-joined paths of the frozen parameters (`freeze.frozen_paths`, computed once).
      augment, cutout_size: augmentation names in order, and the cutout side.
      label_smoothing: mass spread uniformly over the classes in the cross-entropy targets.
    """

    optimizer: optim.Settings
    frozen: frozenset[str]
    augment: tuple[str, ...] = ()
    cutout_size: int = 8
    label_smoothing: float = 0.0

    @property
    def tx(self) -> optax.GradientTransformation:
        """The optimizer of the trainable parameters."""
        return optim.make_optimizer(self.optimizer)


@struct.dataclass
class TrainState:
    """Everything a step changes (arrays), plus the static model and step settings it computes with."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    model: Classifier = struct.field(pytree_node=False)
    settings: StepSettings = struct.field(pytree_node=False)

    def variables(self) -> Variables:
        """{'params', 'batch_stats'}: what a weights file stores and `model.apply` takes."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def build_classifier(config: Config, backbone: ResNet | None = None) -> Classifier:
    """The classifier a config describes: every Classifier attribute the Config declares too is taken from it;
    the backbone architecture comes from `backbone` (e.g. the module `load_converted` returned) or, from
    scratch, is a ResNet{config.depth} with Keras defaults."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(Classifier) if hasattr(config, f.name)}
    arch = {} if backbone is None else {
        "depth": backbone.depth, "bn_epsilon": backbone.bn_epsilon, "pool1_pad": backbone.pool1_pad}
    return Classifier(**{**shared, **arch}, backbone_bn_train=freeze.backbone_bn_train(config.freeze),
                      axis_name=AXIS)


def create_train_state(config: Config, rng: jax.Array, image_shape: tuple[int, int, int] = (32, 32, 3),
                       backbone: tuple[ResNet, Variables] | None = None,
                       total_steps: int | None = None) -> TrainState:
    """A fresh, unreplicated TrainState: head (and backbone, if none is given) initialised from `rng`.

    `backbone` is `load_converted`'s (model, variables) for a ResNet; its tree must match the classifier's
    backbone exactly (an ImageNet `predictions` layer is dropped). `image_shape` is one input image's
    (H, W, C) at native size; `total_steps` is needed by the cosine schedule.
    """
    distributed.check_batch_size(config.batch_size)
    model = build_classifier(config, None if backbone is None else backbone[0])
    images = jnp.zeros((1, *image_shape), jnp.uint8)
    if backbone is None:
        variables = jax.jit(model.init)(rng, images)
    else:
        variables = _with_backbone(model, rng, images, backbone[1])
    settings = StepSettings(optimizer=optim.Settings.from_config(config, total_steps),
                            frozen=freeze.frozen_paths(variables["params"], config.freeze),
                            augment=config.augment, cutout_size=config.cutout_size,
                            label_smoothing=config.label_smoothing)
    trainable, _ = freeze.split(variables["params"], settings.frozen)
    return TrainState(step=jnp.zeros([], jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=settings.tx.init(trainable),
                      model=model, settings=settings)


def _with_backbone(model: Classifier, rng: jax.Array, images: jax.Array, backbone: Variables) -> Variables:
    """Classifier variables made of `backbone`'s (checked strictly against the model's names and shapes)
    and a head initialised from `rng`; the random backbone init is skipped, only its shapes are traced."""
    expected = jax.eval_shape(model.init, rng, images)
    variables: Variables = {}
    for collection in ("params", "batch_stats"):
        given = {k: v for k, v in backbone.get(collection, {}).items() if k != "predictions"}
        trees.check(expected[collection]["backbone"], given,
                    f"backbone {collection} do not match the classifier's ResNet",
                    "convert the weights again or pick the matching depth")
        variables[collection] = {"backbone": jax.tree.map(jnp.asarray, given)}
    head = jax.jit(functools.partial(model.init, method=Classifier.classify))(
        rng, jnp.zeros((1, 1, 1, Classifier.FEATURES), jnp.float32))
    for collection, tree in head.items():
        variables[collection]["head"] = tree["head"]
    return variables


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy on logits against integer labels, optionally label-smoothed."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def _hits(logits: jax.Array, labels: jax.Array) -> Metrics:
    """Per-example top-1 (and top-5 for >= 5 classes) correctness as floats."""
    hits = {"accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32)}
    if logits.shape[-1] >= 5:
        top5 = jax.lax.top_k(logits, 5)[1]
        hits["top5"] = jnp.any(top5 == labels[:, None], axis=-1).astype(jnp.float32)
    return hits


def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
    """One optimizer step on this device's share of a global batch; run it through `p_train_step`.

    `batch`: {'image': uint8 (B, H, W, 3) at native size, 'label': int32 (B,)}. Returns the new state and
    the global batch's mean loss (the training objective), accuracy, top5 and the global norm of the
    (averaged, unclipped) gradient of the trainable parameters.
    """
    settings = state.settings
    device = jax.lax.axis_index(AXIS)
    local = batch["label"].shape[0]
    augment_key, dropout_key = jax.random.split(jax.random.fold_in(rng, state.step))
    example_keys = jax.vmap(functools.partial(jax.random.fold_in, augment_key))(device * local + jnp.arange(local))
    augment = functools.partial(augment_lib.augment, keys=example_keys, names=settings.augment,
                                cutout_size=settings.cutout_size) if settings.augment else None
    trainable, frozen = freeze.split(state.params, settings.frozen)

    def loss_fn(trainable: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        variables = {"params": freeze.merge(trainable, frozen), "batch_stats": state.batch_stats}
        logits, updated = state.model.apply(variables, batch["image"], train=True, augment=augment,
                                            mutable=["batch_stats"],
                                            rngs={"dropout": jax.random.fold_in(dropout_key, device)})
        loss = cross_entropy(logits, batch["label"], settings.label_smoothing).mean()
        return loss, (logits, updated["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = settings.tx.update(grads, state.opt_state, trainable)
    params = freeze.merge(optax.apply_updates(trainable, updates), frozen)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               **{k: v.mean() for k, v in _hits(logits, batch["label"]).items()}}
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=jax.lax.pmean(batch_stats, AXIS), opt_state=opt_state)
    return new_state, jax.lax.pmean(metrics, AXIS)


def eval_step(model: Classifier, variables: Variables, batch: Batch) -> tuple[Metrics, jax.Array]:
    """Sums over the global batch of loss (unsmoothed cross-entropy), accuracy and top5, plus 'count'; and
    this device's examples' top-1 classes, from the one forward pass.

    `batch` is as for `train_step` plus an optional 'mask' (B,) that zeroes padding examples, so a padded
    last batch counts every real example exactly once. No augmentation, BN on moving statistics.
    """
    logits = model.apply(variables, batch["image"], train=False)
    mask = batch.get("mask", jnp.ones(batch["label"].shape)).astype(jnp.float32)
    per_example = {"loss": cross_entropy(logits, batch["label"]), **_hits(logits, batch["label"])}
    sums = {k: jnp.sum(v * mask) for k, v in per_example.items()}
    return jax.lax.psum({**sums, "count": jnp.sum(mask)}, AXIS), jnp.argmax(logits, -1)


# The one place the steps are mapped over devices. The state is donated: its buffers are reused. The model is
# the eval step's static argument: equal models share one compilation.
p_train_step = jax.pmap(train_step, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
p_eval_step = jax.pmap(eval_step, axis_name=AXIS, in_axes=(None, 0, 0), static_broadcasted_argnums=(0,))


def replicate(tree: T) -> T:
    """One copy of a state (or variables) per local device, sharded exactly as `p_train_step` returns it (a
    mesh over the pmap axis name), so that feeding its output back in does not compile the step a second time."""
    return jax_utils.replicate(tree, axis_name=AXIS)


def unreplicate(tree: T) -> T:
    """Device 0's copy of a replicated state (all copies are equal)."""
    return jax_utils.unreplicate(tree)


def save_classifier(path: str, state: TrainState, **metadata: Any) -> None:
    """Write an unreplicated state's variables as a weights file that `load_converted` rebuilds into the
    classifier (logits from raw native-size images); `metadata` adds informative JSON-able entries (the
    training loop adds the run's `config`)."""
    variables = jax.device_get(state.variables())
    weights_file.save(path, variables, {"model": state.model.metadata(), **metadata})
