"""Linear probing (the paper's second table): multinomial logistic regression on frozen features.

Features are standardised with the training set's mean and standard deviation; the classifier minimises
mean cross-entropy + l2/2 |W|^2 (the bias is not penalised) full-batch with L-BFGS, in one compiled loop.
The objective is convex, so the result depends on `l2` and the features, not on the optimiser's state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dove_jax import xla

_GRADIENT_TOLERANCE = (
    1e-6  # stop once the gradient norm is this small: float32 cannot do much better
)
L2 = 1e-4  # the weight decay of the classifier: l2/2 |W|^2 beside the mean cross-entropy
MAX_STEPS = 1000  # L-BFGS iterations at most
CLASSIFIER = (
    "multinomial logistic regression on features standardised by the training set's mean and std, "
    "mean cross-entropy + l2/2 |W|^2 (bias not penalised), full-batch L-BFGS"
)


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """Indices [M], in increasing order, of `per_class` records of each class in `labels` [N], drawn at random
  with `seed` (every record of a class that has fewer): a class-balanced training set whatever the order of
  the file."""
  rng = np.random.default_rng(seed)
  chosen = [
      rng.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)
  ]
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _standardise(train: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both sets scaled by the train set's mean and std (constant features stay 0, not NaN)."""
  mean, std = train.mean(axis=0), train.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  return (train - mean) / std, (other - mean) / std


def _logits(params: dict[str, jax.Array], features: jax.Array) -> jax.Array:
  return features @ params["kernel"] + params["bias"]  # [N, D] -> [N, K]


@xla.jit(static_argnames=("num_classes", "steps", "learning_rate"))
def _fit(
    features: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    num_classes: int,
    l2: float,
    steps: int,
    learning_rate: float | None,
) -> dict[str, jax.Array]:
  """L-BFGS on [N, D] features and [N] labels for at most `steps` iterations -> {'kernel', 'bias'}."""

  def loss(params):
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
        _logits(params, features), labels
    )
    return cross_entropy.mean() + 0.5 * l2 * jnp.sum(jnp.square(params["kernel"]))

  # With no learning rate the zoom line search picks every step; a learning rate fixes the step instead.
  optimizer = (
      optax.lbfgs()
      if learning_rate is None
      else optax.lbfgs(learning_rate=learning_rate, linesearch=None)
  )
  params = {
      "kernel": 1e-3 * jax.random.normal(key, (features.shape[1], num_classes)),
      "bias": jnp.zeros(num_classes),
  }

  def step(carry):
    params, state, _, i = carry
    value, grad = jax.value_and_grad(loss)(params)
    updates, state = optimizer.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state, optax.tree.norm(grad), i + 1

  def unfinished(carry):
    _, _, grad_norm, i = carry
    return (i < steps) & (grad_norm > _GRADIENT_TOLERANCE)

  params, *_ = jax.lax.while_loop(unfinished, step, (params, optimizer.init(params), jnp.inf, 0))
  return params


def _accuracy(params: dict[str, jax.Array], features: np.ndarray, labels: np.ndarray) -> float:
  predictions = np.asarray(jnp.argmax(_logits(params, jnp.asarray(features, jnp.float32)), axis=-1))
  return float(np.mean(predictions == labels))


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    eval_features: np.ndarray,
    eval_labels: np.ndarray,
    *,
    num_classes: int,
    l2: float = L2,
    steps: int = MAX_STEPS,
    learning_rate: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
  """Trains a linear classifier on [N, D] features with [N] integer labels; evaluates it on [M, D], [M].

  learning_rate: None (default) for L-BFGS with its line search; a number for fixed-size L-BFGS steps.
  seed: the small random initial weights (the optimum does not depend on it).
  Returns {'accuracy': on the eval set, 'train_accuracy': on the train set}, fractions in [0, 1].
  """
  train_features, eval_features = _standardise(
      np.asarray(train_features, np.float64), np.asarray(eval_features, np.float64)
  )
  train_labels, eval_labels = np.asarray(train_labels), np.asarray(eval_labels)
  params = _fit(
      jnp.asarray(train_features, jnp.float32),
      jnp.asarray(train_labels),
      jax.random.key(seed),
      num_classes=num_classes,
      l2=l2,
      steps=steps,
      learning_rate=learning_rate,
  )
  return dict(
      accuracy=_accuracy(params, eval_features, eval_labels),
      train_accuracy=_accuracy(params, train_features, train_labels),
  )
