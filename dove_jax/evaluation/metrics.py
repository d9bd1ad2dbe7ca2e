"""Image metrics and FID statistics: PSNR, SSIM, the paper's image complexity, Spearman's rank correlation
(of lengths with complexity), streaming feature moments and the Frechet distance.

Images are NHWC in [-1, 1], so the data range of PSNR and SSIM defaults to 2. PSNR, SSIM and the complexity
are per image ([B]) and jit; the FID pieces are NumPy / SciPy in float64, as pytorch-fid computes them.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from dove_jax.losses import mse_per_image

# SSIM of Wang et al. (2004) as scikit-image computes it with gaussian_weights=True: a Gaussian of sigma 1.5
# truncated at 3.5 sigma (11 taps), stabilising constants K1 = 0.01 and K2 = 0.03.
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = int(3.5 * _SSIM_SIGMA + 0.5)  # 5
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
# ITU-R BT.601 luma, as OpenCV's RGB -> grey conversion.
_LUMA = np.array([0.299, 0.587, 0.114])


def psnr_from_mse(mse: jax.Array | np.ndarray | float, data_range: float = 2.0) -> jax.Array:
  """10 log10(data_range^2 / mse), any shape; inf where mse is 0.

  A data set's PSNR is conventionally the mean of the per-image values, not this of the mean MSE.
  """
  return 10.0 * jnp.log10(data_range**2 / jnp.asarray(mse, jnp.float32))


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
  """[B, H, W, C] x2 -> [B] PSNR in dB."""
  return psnr_from_mse(mse_per_image(jnp.asarray(x), jnp.asarray(y)), data_range)


def _gaussian_taps() -> tuple[float, ...]:
  """scipy.ndimage.gaussian_filter's normalised 1-D kernel, as Python floats so it keeps the image dtype."""
  offsets = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1)
  taps = np.exp(-0.5 * (offsets / _SSIM_SIGMA) ** 2)
  return tuple(float(t) for t in taps / taps.sum())


def _blur_valid(x: jax.Array) -> jax.Array:
  """Separable Gaussian blur where the window fits: [B, H, W, C] -> [B, H - 10, W - 10, C]."""
  taps = _gaussian_taps()
  height, width = x.shape[1] - len(taps) + 1, x.shape[2] - len(taps) + 1
  x = sum(t * x[:, i : i + height] for i, t in enumerate(taps))
  return sum(t * x[:, :, i : i + width] for i, t in enumerate(taps))


def ssim(x: jax.Array, y: jax.Array, data_range: float = 1.0) -> jax.Array:
  """[B, H, W, C] x2 -> [B] mean SSIM over pixels and channels, H and W >= 11.

  Give images in [0, 1] with data_range 1, the standard convention: SSIM's constants scale with the range
  but its luminance term does not follow a shift, so [-1, 1] images with data_range 2 give another number.

  The same number as skimage.metrics.structural_similarity(x[i], y[i], gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=data_range, channel_axis=-1). scikit-image filters with reflected
  borders and then drops the 5 pixels at each border from the mean; those are exactly the pixels whose window
  reaches the border, so filtering only where the window fits gives the same mean with no padding at all.
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  if x.shape != y.shape or x.ndim != 4 or min(x.shape[1:3]) < 2 * _SSIM_RADIUS + 1:
    raise ValueError(
        f"SSIM takes two [B, H, W, C] batches of one shape with H, W >= {2 * _SSIM_RADIUS + 1}; "
        f"got {x.shape} and {y.shape}."
    )
  c1, c2 = (_SSIM_K1 * data_range) ** 2, (_SSIM_K2 * data_range) ** 2
  mean_x, mean_y = _blur_valid(x), _blur_valid(y)  # [B, H', W', C]
  var_x = _blur_valid(x * x) - mean_x**2
  var_y = _blur_valid(y * y) - mean_y**2
  cov_xy = _blur_valid(x * y) - mean_x * mean_y
  similarity = (
      (2 * mean_x * mean_y + c1)
      * (2 * cov_xy + c2)
      / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
  )
  return similarity.mean(axis=(1, 2, 3))


def laplacian_variance(images: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
  """Image complexity as in the paper: the variance of the Laplacian of the grey image. [B, H, W, 3] -> [B].

  Images in [-1, 1] become grey on the 0..255 scale (BT.601 luma, not rounded to integers) and are filtered
  with OpenCV's ksize=1 Laplacian [[0, 1, 0], [1, -4, 1], [0, 1, 0]]. Only the (H-2) x (W-2) interior, where
  the 3x3 stencil fits, enters the variance; OpenCV would also count the border pixels of a reflect-101
  padded image, which moves the value by O(1/H). Takes and returns NumPy or JAX arrays alike.
  """
  grey = ((images + 1.0) * 127.5) @ _LUMA.astype(images.dtype)  # [B, H, W]
  laplacian = (
      grey[:, :-2, 1:-1]
      + grey[:, 2:, 1:-1]
      + grey[:, 1:-1, :-2]
      + grey[:, 1:-1, 2:]
      - 4.0 * grey[:, 1:-1, 1:-1]
  )  # [B, H-2, W-2]
  return laplacian.var(axis=(1, 2))


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
  """Spearman's rank correlation; None where x or y is constant (it is undefined there, not 0)."""
  from scipy import stats

  if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return None
  return float(stats.spearmanr(x, y).statistic)


class FeatureStatistics:
  """Streaming mean and covariance of feature vectors in float64, for FID over sets too big to hold.

  Every batch is reduced to its count, mean and centred scatter matrix, and merged with Chan et al.'s
  pairwise update, which never subtracts two large sums (the naive sum(x x^T) - n mu mu^T loses digits).
  Partial statistics of several hosts or shards combine with `merge`; the width is set by the first batch.

    stats = FeatureStatistics()
    for batch in batches: stats.update(features(batch))   # [N, D]
    mu, sigma = stats.mean(), stats.covariance()            # [D], [D, D]
  """

  def __init__(self):
    self.count = 0
    self._mean = np.zeros(0)  # [D]
    self._scatter = np.zeros((0, 0))  # [D, D]: sum over samples of (x - mean)(x - mean)^T

  def update(self, features: jax.Array | np.ndarray) -> None:
    """Adds a batch of feature vectors [N, D]."""
    batch = np.asarray(features, np.float64)
    if batch.ndim != 2:
      raise ValueError(f"features must be [N, D]; got shape {batch.shape}.")
    if len(batch):
      mean = batch.mean(axis=0)
      centred = batch - mean
      self._combine(len(batch), mean, centred.T @ centred)

  def merge(self, other: FeatureStatistics) -> FeatureStatistics:
    """Adds another set's statistics in place; returns self, so partial statistics fold with reduce."""
    self._combine(other.count, other._mean, other._scatter)
    return self

  def _combine(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
    if count == 0:
      return
    if self.count == 0:
      self.count, self._mean, self._scatter = count, mean.copy(), scatter.copy()
      return
    if mean.shape != self._mean.shape:
      raise ValueError(
          f"feature width {mean.shape[0]} does not match the statistics' {self._mean.shape[0]}."
      )
    total = self.count + count
    delta = mean - self._mean
    self._mean = self._mean + delta * (count / total)
    self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self.count * count / total)
    self.count = total

  def mean(self) -> np.ndarray:
    """[D] float64."""
    if self.count == 0:
      raise ValueError("no features were added.")
    return self._mean.copy()

  def covariance(self) -> np.ndarray:
    """[D, D] float64, unbiased (divided by count - 1), as np.cov(features, rowvar=False)."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 feature vectors; got {self.count}.")
    return self._scatter / (self.count - 1)

  def state_dict(self) -> dict[str, np.ndarray]:
    return {
        "count": np.asarray(self.count, np.int64),
        "mean": self._mean.copy(),
        "scatter": self._scatter.copy(),
    }

  @classmethod
  def from_state_dict(cls, state: Mapping[str, np.ndarray]) -> FeatureStatistics:
    stats = cls()
    stats._combine(
        int(state["count"]),
        np.asarray(state["mean"], np.float64),
        np.asarray(state["scatter"], np.float64),
    )
    return stats


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
  """Frechet distance of two Gaussians: |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

  As pytorch-fid's calculate_frechet_distance, in float64: if the product's square root is not finite (a
  singular product), `eps` is added to both diagonals; imaginary parts that numerical error leaves on the
  root's diagonal (< 1e-3) are dropped, larger ones raise ValueError.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
    raise ValueError(
        f"means {mu1.shape}, {mu2.shape} and covariances {sigma1.shape}, {sigma2.shape} "
        "do not match."
    )
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals.")
    offset = eps * np.eye(len(mu1))
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
          f"FID: imaginary component {np.abs(covmean.imag).max()} in the covariance root."
      )
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
