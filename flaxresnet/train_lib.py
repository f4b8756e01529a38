"""The fine-tuning step: TrainState, pure `train_step` / `eval_step` (and their head-only forms on cached
features), and the one place they are pmapped.

Data parallel over all devices with `jax.pmap(axis_name='batch')`: batches are shaped (devices, per_device,
...), gradients and BN statistics are averaged with `lax.pmean`, and training-mode BatchNorm computes its
statistics over the global batch (the model's `axis_name`). Inside the step, on device: the backbone family's
preprocessing (caffe or tf), augmentation, upsampling, forward, loss, gradients with respect to the trainable
parameters only (frozen weights never get a gradient), the optimizer.

What the step is compiled for is exactly what it computes with: the model and the `StepSettings` (optimizer
settings, frozen paths, augmentation, label smoothing), the static part of a TrainState. Nothing else of a
run's Config reaches it, so runs that differ in work folder, data folder, evaluation interval or (constant
schedule) epochs share one compiled step.

Cached features (`feature_cache`): when the backbone is frozen, in inference mode and fed unaugmented images,
`pooled_features` computes its pooled output once per image, and `head_train_step` / `head_eval_step` run the
head alone on it, on the state without the backbone (`split_backbone`). They share `train_step`'s keys,
optimizer and state structure, so either step continues the other's state (checkpoints are interchangeable).

Randomness: one root key. Step t uses fold_in(root, t); augmentation keys are fold_in(that, global example
index), so augmentations do not depend on the device count; dropout uses one key per device.

Many hosts: each process feeds its local devices its rows of every global batch (`distributed.process_rows`);
the step numbers examples by `lax.axis_index` over the devices of all processes, so its numbers are those of
one process with as many devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils, struct

from flaxresnet import augment as augment_lib
from flaxresnet import distributed, freeze, log, optim, trees, weights_file
from flaxresnet.config import Config
from flaxresnet.errors import UserError, option_name
from flaxresnet.models import Classifier, KerasResNet, ResNet, arch_name, family_of

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


def build_classifier(config: Config, backbone: KerasResNet | Classifier | None = None) -> Classifier:
    """The classifier a config describes: every Classifier attribute the Config declares too is taken from it;
    the backbone architecture comes from `backbone` (the module `load_converted` returned: a ResNet, or a
    classifier whose backbone it is) or, from scratch, is the config's family and depth with Keras defaults."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(Classifier) if hasattr(config, f.name)}
    arch = {} if backbone is None else {"family": family_of(backbone), "depth": backbone.depth}
    if isinstance(backbone, ResNet | Classifier):
        arch.update(bn_epsilon=backbone.bn_epsilon, pool1_pad=backbone.pool1_pad)
    if isinstance(backbone, Classifier):  # a converted Keras classifier keeps the preprocessing it was trained on
        arch.update(preprocess=backbone.preprocess)
    return Classifier(**{**shared, **arch}, backbone_bn_train=freeze.backbone_bn_train(config.freeze),
                      axis_name=AXIS)


def load_backbone(path: str | None, depth: int, family: str = "v1") -> tuple[KerasResNet, Variables] | None:
    """`load_converted` of the backbone file `path` for `create_train_state`, or None (saying so) to train the
    `family`'s ResNet of `depth` from scratch. UserError if the file holds a classifier."""
    if path is None:
        log.say(f"no backbone weights ({option_name('backbone_weights')} none): training "
                f"{arch_name(family, depth)} from scratch, randomly initialised")
        return None
    model, variables = weights_file.load_converted(path)
    if not isinstance(model, KerasResNet):
        raise UserError(f"{path} is a fine-tuned classifier, not a backbone: start a run from it with "
                        f"{option_name('init_from')} instead, or pass a backbone converted with "
                        f"`python -m convert keras_to_flax`", option="backbone_weights")
    log.say(f"backbone: {arch_name(family_of(model), model.depth)} from {path}")
    return model, variables


def load_init(path: str) -> tuple[Classifier, Variables]:
    """`load_converted` of the classifier file `path` that a run starts from (`Config.init_from`), saying so;
    UserError if it holds a backbone."""
    model, variables = weights_file.load_converted(path)
    arch = arch_name(family_of(model), model.depth)
    if not isinstance(model, Classifier):
        raise UserError(f"{path} holds a {arch} backbone, not a classifier: start from it with "
                        f"{option_name('backbone_weights')}", option="init_from")
    log.say(f"starting from the classifier {path}: {arch} + {model.head} head, {model.num_classes} classes "
            f"(a fresh optimizer, step 0)")
    return model, variables


def check_init_fits(config: Config, model: Classifier, path: str) -> None:
    """UserError unless the classifier `model` (from the file `path`) has the head the run trains: its class
    count (the dataset's), head kind and (seed head) hidden width."""
    if model.num_classes != config.num_classes:
        raise UserError(f"{path} classifies {model.num_classes} classes and the dataset has {config.num_classes}: "
                        f"start from it on a dataset with {model.num_classes} classes, or from its backbone alone "
                        f"(export it with `python -m convert flax_to_keras` and convert it back)",
                        option="dataset")
    if model.head != config.head:
        raise UserError(f"{path} has a {model.head} head and the run a {config.head} head: set "
                        f"{option_name('head')} {model.head}", option="head")
    if model.head == "seed" and model.hidden != config.hidden:
        raise UserError(f"{path}'s seed head has {model.hidden} hidden units and the run {config.hidden}: set "
                        f"{option_name('hidden')} {model.hidden}", option="hidden")


def create_train_state(config: Config, rng: jax.Array, image_shape: tuple[int, int, int] = (32, 32, 3),
                       backbone: tuple[KerasResNet | Classifier, Variables] | None = None,
                       total_steps: int | None = None) -> TrainState:
    """A fresh, unreplicated TrainState at step 0 with a fresh optimizer state.

    `backbone` is `load_converted`'s (model, variables) for a ResNet, whose tree must match the classifier's
    backbone exactly (an ImageNet `predictions` layer is dropped) and whose head is initialised from `rng`; or
    for a whole classifier (`load_init`), whose head must fit the config (`check_init_fits`) and whose
    variables are taken whole. Without one, everything is initialised from `rng`. `image_shape` is one input
    image's (H, W, C) at native size; `total_steps` is needed by the cosine schedule.
    """
    distributed.check_batch_size(config.batch_size)
    model = build_classifier(config, None if backbone is None else backbone[0])
    images = jnp.zeros((1, *image_shape), jnp.uint8)
    if backbone is None:
        variables = jax.jit(model.init)(rng, images)
    elif isinstance(backbone[0], Classifier):
        check_init_fits(config, backbone[0], config.init_from or "the classifier")
        variables = _whole_classifier(model, rng, images, backbone[1])
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
        variables[collection] = {"backbone": jax.device_put(given)}  # one transfer, nothing compiled
    head = jax.jit(functools.partial(model.init, method=Classifier.classify))(
        rng, jnp.zeros((1, 1, 1, Classifier.FEATURES), jnp.float32))
    for collection, tree in head.items():
        variables[collection]["head"] = tree["head"]
    return variables


def _whole_classifier(model: Classifier, rng: jax.Array, images: jax.Array, given: Variables) -> Variables:
    """A classifier file's variables for `model`, checked strictly against its names and shapes; nothing is
    initialised (only the shapes are traced)."""
    expected = jax.eval_shape(model.init, rng, images)
    for collection in ("params", "batch_stats"):
        trees.check(expected[collection], given.get(collection, {}), f"the classifier's {collection} do not match "
                    f"the run's model", "start from a file that train.py or keras_to_flax wrote")
    return jax.device_put({c: given[c] for c in ("params", "batch_stats")})


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


def _step_keys(rng: jax.Array, step: jax.Array | int) -> jax.Array:
    """Step `step`'s (augmentation key, dropout key) from the run's key."""
    return jax.random.split(jax.random.fold_in(rng, step))


def example_keys(rng: jax.Array, step: jax.Array | int, first: jax.Array | int, count: int) -> jax.Array:
    """The augmentation keys of the global batch's examples first .. first + count - 1 at step `step`: the
    step's augmentation key folded with each example's index, so that augmentations do not depend on the device
    count (and a reference implementation can draw the same ones outside the step)."""
    augment_key = _step_keys(rng, step)[0]
    return jax.vmap(functools.partial(jax.random.fold_in, augment_key))(first + jnp.arange(count))


def _dropout_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """This device's dropout key at step `step`."""
    return jax.random.fold_in(_step_keys(rng, step)[1], jax.lax.axis_index(AXIS))


# forward(variables, rngs) -> (logits, {'batch_stats': updated}): a step's model call in training mode.
Forward = Callable[[Variables, dict[str, jax.Array]], tuple[jax.Array, Variables]]


def _optimizer_step(state: TrainState, labels: jax.Array, forward: Forward,
                    dropout_key: jax.Array) -> tuple[TrainState, Metrics]:
    """Loss, gradients of the trainable parameters (averaged over the devices), the optimizer update and the
    metrics of one step whose model call is `forward`: the common part of `train_step` and `head_train_step`."""
    settings = state.settings
    trainable, frozen = freeze.split(state.params, settings.frozen)

    def loss_fn(trainable: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        variables = {"params": freeze.merge(trainable, frozen), "batch_stats": state.batch_stats}
        logits, updated = forward(variables, {"dropout": dropout_key})
        loss = cross_entropy(logits, labels, settings.label_smoothing).mean()
        return loss, (logits, updated["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = settings.tx.update(grads, state.opt_state, trainable)
    params = freeze.merge(optax.apply_updates(trainable, updates), frozen)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               **{k: v.mean() for k, v in _hits(logits, labels).items()}}
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=jax.lax.pmean(batch_stats, AXIS), opt_state=opt_state)
    return new_state, jax.lax.pmean(metrics, AXIS)


def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
    """One optimizer step on this device's share of a global batch; run it through `p_train_step`.

    `batch`: {'image': uint8 (B, H, W, 3) at native size, 'label': int32 (B,)}. Returns the new state and
    the global batch's mean loss (the training objective), accuracy, top5 and the global norm of the
    (averaged, unclipped) gradient of the trainable parameters.
    """
    settings = state.settings
    local = batch["label"].shape[0]
    keys = example_keys(rng, state.step, jax.lax.axis_index(AXIS) * local, local)
    augment = functools.partial(augment_lib.augment, keys=keys, names=settings.augment,
                                cutout_size=settings.cutout_size) if settings.augment else None

    def forward(variables: Variables, rngs: dict[str, jax.Array]) -> tuple[jax.Array, Variables]:
        return state.model.apply(variables, batch["image"], train=True, augment=augment, mutable=["batch_stats"],
                                 rngs=rngs)

    return _optimizer_step(state, batch["label"], forward, _dropout_key(rng, state.step))


def _head_logits(model: Classifier, variables: Variables, features: jax.Array, **apply: Any) -> Any:
    """The head on pooled backbone features (B, FEATURES), each a 1x1 feature map, whose pooling is itself."""
    return model.apply(variables, features[:, None, None, :], method=Classifier.classify, **apply)


def head_train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
    """`train_step` on cached features, for a backbone that is frozen, in inference mode and fed unaugmented
    images (`feature_cache`): the head alone; run it through `p_head_train_step`.

    `state` is `split_backbone`'s head part; `batch`: {'features': (B, FEATURES) pooled backbone features,
    'label': int32 (B,)}. The keys, the optimizer and the returned state and metrics are `train_step`'s, so the
    two steps continue each other's states.
    """
    def forward(variables: Variables, rngs: dict[str, jax.Array]) -> tuple[jax.Array, Variables]:
        return _head_logits(state.model, variables, batch["features"], train=True, mutable=["batch_stats"],
                            rngs=rngs)

    return _optimizer_step(state, batch["label"], forward, _dropout_key(rng, state.step))


def _eval_sums(logits: jax.Array, batch: Batch) -> tuple[Metrics, jax.Array]:
    """`eval_step`'s sums over the global batch and this device's top-1 classes, from the logits."""
    mask = batch.get("mask", jnp.ones(batch["label"].shape)).astype(jnp.float32)
    per_example = {"loss": cross_entropy(logits, batch["label"]), **_hits(logits, batch["label"])}
    sums = {k: jnp.sum(v * mask) for k, v in per_example.items()}
    return jax.lax.psum({**sums, "count": jnp.sum(mask)}, AXIS), jnp.argmax(logits, -1)


def eval_step(model: Classifier, variables: Variables, batch: Batch) -> tuple[Metrics, jax.Array]:
    """Sums over the global batch of loss (unsmoothed cross-entropy), accuracy and top5, plus 'count'; and
    this device's examples' top-1 classes, from the one forward pass.

    `batch` is as for `train_step` plus an optional 'mask' (B,) that zeroes padding examples, so a padded
    last batch counts every real example exactly once. No augmentation, BN on moving statistics.
    """
    return _eval_sums(model.apply(variables, batch["image"], train=False), batch)


def head_eval_step(model: Classifier, variables: Variables, batch: Batch) -> tuple[Metrics, jax.Array]:
    """`eval_step` on cached features: `variables` are the head's (`split_backbone`), `batch` holds 'features'
    (B, FEATURES) as for `head_train_step`, 'label' and an optional 'mask'."""
    return _eval_sums(_head_logits(model, variables, batch["features"]), batch)


def pooled_features(model: Classifier, variables: Variables, images: jax.Array) -> jax.Array:
    """The pooled backbone features (B, FEATURES) of raw images (B, H, W, 3), in inference mode: what the
    feature cache holds. `variables` are the backbone's (`split_backbone`)."""
    return model.apply(variables, images, method=Classifier.pooled_features)


# The one place the steps are mapped over devices. The state is donated: its buffers are reused. The model is
# the static argument of the others: equal models share one compilation.
p_train_step = jax.pmap(train_step, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
p_eval_step = jax.pmap(eval_step, axis_name=AXIS, in_axes=(None, 0, 0), static_broadcasted_argnums=(0,))
p_head_train_step = jax.pmap(head_train_step, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
p_head_eval_step = jax.pmap(head_eval_step, axis_name=AXIS, in_axes=(None, 0, 0), static_broadcasted_argnums=(0,))
p_pooled_features = jax.pmap(pooled_features, axis_name=AXIS, in_axes=(None, 0, 0), static_broadcasted_argnums=(0,))


def split_backbone(state: TrainState) -> tuple[TrainState, Variables]:
    """(the state without the backbone's variables, the backbone's {'params', 'batch_stats'}) of a (replicated)
    state: what `head_train_step` updates, and what `pooled_features` computes with; `join_backbone` undoes it."""
    head = state.replace(params={k: v for k, v in state.params.items() if k != "backbone"},
                         batch_stats={k: v for k, v in state.batch_stats.items() if k != "backbone"})
    return head, {"params": {"backbone": state.params["backbone"]},
                  "batch_stats": {"backbone": state.batch_stats["backbone"]}}


def join_backbone(head: TrainState, backbone: Variables) -> TrainState:
    """The whole TrainState of a `split_backbone`: what checkpoints and final.msgpack hold either way."""
    return head.replace(params={**backbone["params"], **head.params},
                        batch_stats={**backbone["batch_stats"], **head.batch_stats})


def replicate(tree: T) -> T:
    """One copy of a state (or variables) per local device, sharded exactly as `p_train_step` returns it (a
    mesh over the pmap axis name), so that feeding its output back in does not compile the step a second time.
    The copies are stacked on the host: stacking device arrays would compile a small program per leaf shape
    (about 60 for a ResNet state, seconds at every start on CPU)."""
    return jax_utils.replicate(jax.device_get(tree), axis_name=AXIS)


def unreplicate(tree: T) -> T:
    """Device 0's copy of a replicated state (all copies are equal), as host (numpy) arrays of their own: read
    from its shard, which compiles nothing (slicing the device array would compile a program per leaf shape)."""
    return jax.tree.map(lambda x: np.array(x.addressable_shards[0].data)[0, ...], tree)


def save_classifier(path: str, state: TrainState, **metadata: Any) -> None:
    """Write an unreplicated state's variables as a weights file that `load_converted` rebuilds into the
    classifier (logits from raw native-size images); `metadata` adds informative JSON-able entries (the
    training loop adds the run's `config`)."""
    variables = jax.device_get(state.variables())
    weights_file.save(path, variables, {"model": state.model.metadata(), **metadata})
