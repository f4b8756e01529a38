"""The optimizer: Keras-exact Adam, warmup + cosine schedule, decoupled weight decay, clipping.

Keras' Adam puts epsilon on the uncorrected sqrt(v) and folds the bias corrections into the step size;
optax's `scale_by_adam` adds epsilon after bias correction. The two differ most in the first steps (Keras'
effective epsilon is eps / sqrt(1 - b2^t), 3.2e-6 at t=1 for eps=1e-7), so `scale_by_keras_adam` follows
Keras' formula literally to reproduce Keras training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flaxresnet.config import Config
from flaxresnet.errors import UserError

# keras.optimizers.Adam defaults.
KERAS_ADAM_B1 = 0.9
KERAS_ADAM_B2 = 0.999
KERAS_ADAM_EPS = 1e-7


class KerasAdamState(NamedTuple):
    """Step count and first/second moments, as Keras' Adam keeps them."""

    count: jnp.ndarray
    mu: optax.Updates
    nu: optax.Updates


def scale_by_keras_adam(b1: float = KERAS_ADAM_B1, b2: float = KERAS_ADAM_B2,
                        eps: float = KERAS_ADAM_EPS) -> optax.GradientTransformation:
    """Adam direction as keras.optimizers.Adam computes it (multiply by -lr to get the update):
    m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); step = sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)."""

    def init(params: optax.Params) -> KerasAdamState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return KerasAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update(updates: optax.Updates, state: KerasAdamState,
               params: optax.Params | None = None) -> tuple[optax.Updates, KerasAdamState]:
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (jnp.square(g) - v) * (1 - b2), state.nu, updates)

        def direction(m: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
            t = count.astype(m.dtype)  # in the variable's dtype, as Keras computes it (float64 stays float64)
            return jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (jnp.sqrt(v) + eps)

        return jax.tree.map(direction, mu, nu), KerasAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


@dataclass(frozen=True)
class Settings:
    """What the optimizer computes with: hashable, so that it is part of the compiled step's identity.

    `total_steps` is the cosine schedule's length, None for a constant schedule (whose run length then never
    recompiles the step).
    """

    learning_rate: float
    schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    clip_norm: float | None = None
    total_steps: int | None = None

    @classmethod
    def from_config(cls, config: Config, total_steps: int | None = None) -> Settings:
        """The optimizer settings of `config`; `total_steps` is kept for the cosine schedule only."""
        return cls(learning_rate=config.learning_rate, schedule=config.schedule, warmup=config.warmup,
                   weight_decay=config.weight_decay, clip_norm=config.clip_norm,
                   total_steps=total_steps if config.schedule == "cosine" else None)


def learning_rate_schedule(settings: Settings) -> optax.Schedule:
    """Linear warmup over `warmup` steps to `learning_rate`, then constant or cosine to zero at `total_steps`
    (required for 'cosine')."""
    peak, warmup = settings.learning_rate, settings.warmup
    if settings.schedule == "cosine":
        if settings.total_steps is None or settings.total_steps <= warmup:
            raise UserError(f"the cosine schedule needs the total number of steps, more than warmup "
                            f"({warmup}); got {settings.total_steps}")
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, settings.total_steps, end_value=0.0)
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                [warmup])


def decay_mask(params: optax.Params) -> Any:
    """True for kernels (conv and dense), False for BN scale/bias and every bias: what weight decay touches."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def make_optimizer(settings: Settings) -> optax.GradientTransformation:
    """Clip -> Keras Adam -> decoupled weight decay -> learning rate, for the trainable parameters (the train
    step never hands it frozen ones: they get neither updates nor optimizer state)."""
    chain = []
    if settings.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(settings.clip_norm))
    chain.append(scale_by_keras_adam())
    if settings.weight_decay:
        chain.append(optax.add_decayed_weights(settings.weight_decay, mask=decay_mask))
    chain.append(optax.scale_by_learning_rate(learning_rate_schedule(settings)))
    return optax.chain(*chain)
