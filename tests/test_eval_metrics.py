"""Evaluation metrics: PSNR, SSIM (against scikit-image), Laplacian complexity, streaming FID statistics,
the Frechet distance (against a direct SciPy computation), pytorch-fid's Inception (parity with a PyTorch
re-implementation of its blocks, random weights) and the linear probe."""

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from dove_jax.evaluation import fid, metrics
from dove_jax.evaluation.probe import linear_probe
from dove_jax.tensor_io import ConversionError


def random_images(seed: int, shape=(2, 32, 40, 3)) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def structured_images(shape=(2, 48, 48, 3)) -> np.ndarray:
  """Smooth ramps, stripes and a bright square: SSIM's luminance, contrast and structure terms all vary."""
  b, h, w, c = shape
  rows, cols = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
  base = np.stack([rows, np.sin(6 * cols), rows * cols], axis=-1)  # [H, W, 3]
  base[h // 4 : h // 2, w // 4 : w // 2] = 0.9
  return np.stack([base * (0.5 + 0.4 * i) for i in range(b)]).astype(np.float32)


# --- PSNR ------------------------------------------------------------------------------------------------


def test_psnr_from_a_known_mse():
  np.testing.assert_allclose(metrics.psnr_from_mse(0.01), 10 * np.log10(400), rtol=1e-6)  # 26.02 dB
  np.testing.assert_allclose(
      metrics.psnr_from_mse(np.array([0.01, 0.04]), data_range=1.0), [20.0, 13.9794], rtol=1e-5
  )


def test_psnr_is_psnr_from_mse_per_image():
  x, y = random_images(0), random_images(1)
  mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(jax.jit(metrics.psnr)(x, y), metrics.psnr_from_mse(mse), rtol=1e-6)


# --- SSIM ------------------------------------------------------------------------------------------------


def test_ssim_of_an_image_with_itself_is_one():
  x = random_images(0)
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_matches_scikit_image_on_unit_range_images(kind):
  """The standard SSIM: 8-bit images scaled to [0, 1], data_range 1 (scikit-image's float convention)."""
  structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
  x = random_images(0) if kind == "random" else structured_images()
  rng = np.random.default_rng(1)
  y = np.clip(x + 0.2 * rng.normal(size=x.shape) + 0.1, -1, 1)
  x, y = (
      np.round((v + 1) * 127.5).astype(np.uint8) / np.float32(255) for v in (x, y)
  )  # [0, 1], 8-bit steps
  ours = jax.jit(metrics.ssim)(x.astype(np.float32), y.astype(np.float32))
  theirs = [
      structural_similarity(
          a,
          b,
          gaussian_weights=True,
          sigma=1.5,
          use_sample_covariance=False,
          data_range=1.0,
          channel_axis=-1,
      )
      for a, b in zip(x, y)
  ]
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_evaluation_ssim_is_the_standard_one_of_its_unit_range_images():
  """eval's per-image SSIM of [-1, 1] images is SSIM of the same images in [0, 1], not of [-1, 1] with range 2
  (which differs: the luminance term does not follow a shift)."""
  from dove_jax.evaluation.functions import figures

  x = structured_images()
  y = np.clip(x + 0.2 * np.random.default_rng(1).normal(size=x.shape) + 0.1, -1, 1).astype(
      np.float32
  )
  ours = figures(jnp.asarray(y), jnp.asarray(x), None, uint8=False)["ssim"]
  np.testing.assert_allclose(ours, metrics.ssim((y + 1) / 2, (x + 1) / 2), atol=1e-6)
  assert np.abs(np.asarray(ours) - np.asarray(metrics.ssim(y, x, data_range=2.0))).max() > 1e-3


def test_evaluation_figures_are_of_the_reconstruction_rounded_to_8_bits():
  """A reconstruction between two 8-bit levels is scored as the level an image file would hold: 0.3 of a
  level off rounds back to the input (MSE 0, SSIM 1), 0.7 of a level off to the next level (MSE one level
  squared); without rounding both keep their float error."""
  from dove_jax.evaluation.functions import figures

  level = 2 / 255  # one 8-bit step on [-1, 1]
  pixels = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), np.uint8)  # 0..254: room above
  images = jnp.asarray(pixels.astype(np.float32) / 127.5 - 1)  # as the input pipeline makes them
  near, far = (figures(images + fraction * level, images, None) for fraction in (0.3, 0.7))
  np.testing.assert_allclose(
      near["reconstruction"], images, atol=1e-6
  )  # XLA divides by multiplying: 1 ulp
  np.testing.assert_allclose(near["mse"], 0, atol=1e-12)
  np.testing.assert_allclose(near["ssim"], 1, atol=1e-6)
  np.testing.assert_allclose(far["mse"], level**2, rtol=1e-4)
  float_far = figures(images + 0.7 * level, images, None, uint8=False)
  np.testing.assert_allclose(float_far["mse"], (0.7 * level) ** 2, rtol=1e-4)


# --- image complexity ------------------------------------------------------------------------------------


def test_laplacian_variance_of_a_flat_image_is_zero():
  np.testing.assert_allclose(metrics.laplacian_variance(np.full((2, 8, 8, 3), 0.3)), 0.0, atol=1e-9)


def test_laplacian_variance_of_a_checkerboard():
  """Black/white pixels (grey 0 and 255): the Laplacian is -4 * 255 on white and +4 * 255 on black, half of
  the 6x6 interior each, so its variance is 1020^2."""
  board = np.indices((8, 8)).sum(axis=0) % 2 * 2.0 - 1.0  # [8, 8] of -1, +1
  images = np.repeat(board[None, :, :, None], 3, axis=-1)  # [1, 8, 8, 3]
  np.testing.assert_allclose(metrics.laplacian_variance(images), [1020.0**2], rtol=1e-9)
  np.testing.assert_allclose(
      metrics.laplacian_variance(jnp.asarray(images, jnp.float32)), [1020.0**2], rtol=1e-6
  )


def test_laplacian_variance_grows_with_texture():
  smooth = structured_images((1, 48, 48, 3))
  noise = np.random.default_rng(0).normal(size=smooth.shape)
  values = [
      metrics.laplacian_variance(np.clip(smooth + s * noise, -1, 1))[0] for s in (0.0, 0.05, 0.3)
  ]
  assert values[0] < values[1] < values[2]


# --- FID statistics --------------------------------------------------------------------------------------


def test_spearman_is_undefined_for_constant_input_and_rank_based_otherwise():
  lengths = np.array([1, 4, 9, 64])
  assert metrics.spearman(np.array([0.1, 0.2, 0.3, 5.0]), lengths) == pytest.approx(
      1.0
  )  # ranks, not values
  assert metrics.spearman(-lengths, lengths) == pytest.approx(-1.0)
  assert metrics.spearman(np.ones(4), lengths) is None  # undefined, not 0
  assert metrics.spearman(lengths, np.full(4, 8)) is None
  assert metrics.spearman(np.array([1.0]), np.array([2.0])) is None


def test_feature_statistics_stream_equals_one_pass():
  features = np.random.default_rng(0).normal(3.0, 2.0, size=(301, 7))
  stats = metrics.FeatureStatistics()
  for start, stop in ((0, 1), (1, 50), (50, 50), (50, 263), (263, 301)):  # uneven, one empty
    stats.update(features[start:stop])
  assert stats.count == 301
  np.testing.assert_allclose(stats.mean(), features.mean(axis=0), rtol=1e-10)
  np.testing.assert_allclose(
      stats.covariance(), np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12
  )


def test_feature_statistics_merge_and_state_dict():
  features = (
      np.random.default_rng(1).normal(size=(200, 5)) + 1e3
  )  # a large mean, as a naive sum would hate
  whole, first, second = (
      metrics.FeatureStatistics(),
      metrics.FeatureStatistics(),
      metrics.FeatureStatistics(),
  )
  whole.update(features)
  first.update(features[:37])
  second.update(features[37:120])
  second.update(features[120:])
  merged = metrics.FeatureStatistics.from_state_dict(first.state_dict()).merge(second)
  assert merged.count == 200
  np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-12)
  np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(
      merged.covariance(), np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12
  )
  with pytest.raises(ValueError, match="width"):
    merged.update(features[:, :4])


def reference_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * root))


def gaussian_moments(seed: int, shift: float = 0.0, n: int = 500, d: int = 32):
  features = (
      np.random.default_rng(seed).normal(size=(n, d)) @ np.diag(np.linspace(0.5, 2, d)) + shift
  )
  return features.mean(axis=0), np.cov(features, rowvar=False)


def test_frechet_distance_matches_scipy_and_is_symmetric():
  (mu1, sigma1), (mu2, sigma2) = gaussian_moments(0), gaussian_moments(1)
  distance = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert isinstance(distance, float)
  np.testing.assert_allclose(
      distance, reference_frechet_distance(mu1, sigma1, mu2, sigma2), rtol=1e-9
  )
  np.testing.assert_allclose(
      distance, metrics.frechet_distance(mu2, sigma2, mu1, sigma1), rtol=1e-9
  )
  assert abs(metrics.frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-6


def test_frechet_distance_grows_with_a_mean_shift():
  mu, sigma = gaussian_moments(0)
  distances = [metrics.frechet_distance(mu, sigma, mu + shift, sigma) for shift in (0.1, 0.5, 2.0)]
  np.testing.assert_allclose(distances, [0.1**2 * 32, 0.5**2 * 32, 2.0**2 * 32], rtol=1e-6)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance_of_rank_deficient_covariances():
  mu, sigma = np.zeros(4), np.diag([1.0, 1.0, 0.0, 0.0])
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_adds_eps_when_the_root_is_not_finite(monkeypatch):
  """pytorch-fid's fallback for a singular product, whose root older SciPy returned as inf / NaN."""
  sqrtm, calls = scipy.linalg.sqrtm, []

  def not_finite_once(matrix):
    calls.append(matrix)
    return np.full_like(matrix, np.nan) if len(calls) == 1 else sqrtm(matrix)

  monkeypatch.setattr(scipy.linalg, "sqrtm", not_finite_once)
  mu, sigma = gaussian_moments(0)
  with pytest.warns(UserWarning, match="singular"):
    distance = metrics.frechet_distance(mu, sigma, mu, sigma)
  assert len(calls) == 2
  np.testing.assert_allclose(calls[1], (sigma + 1e-6 * np.eye(32)) @ (sigma + 1e-6 * np.eye(32)))
  assert abs(distance) < 1e-4  # -2 * eps * D from the offset


# --- FID Inception ---------------------------------------------------------------------------------------
# pytorch-fid's FID Inception, written out with torchvision's module names (torchvision is not a dependency).


class TorchConv(nn.Module):

  def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def torch_avg_pool(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def chain(x, *layers):
  for layer in layers:
    x = layer(x)
  return x


class TorchA(nn.Module):  # FIDInceptionA

  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = TorchConv(cin, 64, 1)
    self.branch5x5_1, self.branch5x5_2 = TorchConv(cin, 48, 1), TorchConv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = TorchConv(cin, 64, 1)
    self.branch3x3dbl_2 = TorchConv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = TorchConv(96, 96, 3, padding=1)
    self.branch_pool = TorchConv(cin, pool_features, 1)

  def forward(self, x):
    return torch.cat(
        [
            self.branch1x1(x),
            chain(x, self.branch5x5_1, self.branch5x5_2),
            chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(torch_avg_pool(x)),
        ],
        1,
    )


class TorchB(nn.Module):  # InceptionB

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = TorchConv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = TorchConv(cin, 64, 1)
    self.branch3x3dbl_2, self.branch3x3dbl_3 = TorchConv(64, 96, 3, padding=1), TorchConv(
        96, 96, 3, stride=2
    )

  def forward(self, x):
    branch3x3dbl = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)
    return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, 3, stride=2)], 1)


class TorchC(nn.Module):  # FIDInceptionC

  def __init__(self, cin, c7):
    super().__init__()
    row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    self.branch1x1 = TorchConv(cin, 192, 1)
    self.branch7x7_1, self.branch7x7_2 = TorchConv(cin, c7, 1), TorchConv(c7, c7, **row)
    self.branch7x7_3 = TorchConv(c7, 192, **col)
    self.branch7x7dbl_1, self.branch7x7dbl_2 = TorchConv(cin, c7, 1), TorchConv(c7, c7, **col)
    self.branch7x7dbl_3, self.branch7x7dbl_4 = TorchConv(c7, c7, **row), TorchConv(c7, c7, **col)
    self.branch7x7dbl_5 = TorchConv(c7, 192, **row)
    self.branch_pool = TorchConv(cin, 192, 1)

  def forward(self, x):
    return torch.cat(
        [
            self.branch1x1(x),
            chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            chain(x, *(getattr(self, f"branch7x7dbl_{i}") for i in range(1, 6))),
            self.branch_pool(torch_avg_pool(x)),
        ],
        1,
    )


class TorchD(nn.Module):  # InceptionD

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1, self.branch3x3_2 = TorchConv(cin, 192, 1), TorchConv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = TorchConv(cin, 192, 1)
    self.branch7x7x3_2 = TorchConv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = TorchConv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = TorchConv(192, 192, 3, stride=2)

  def forward(self, x):
    return torch.cat(
        [
            chain(x, self.branch3x3_1, self.branch3x3_2),
            chain(x, *(getattr(self, f"branch7x7x3_{i}") for i in range(1, 5))),
            F.max_pool2d(x, 3, stride=2),
        ],
        1,
    )


class TorchE(nn.Module):  # FIDInceptionE_1 (avg pool) and FIDInceptionE_2 (max pool)

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
    self.branch1x1 = TorchConv(cin, 320, 1)
    self.branch3x3_1 = TorchConv(cin, 384, 1)
    self.branch3x3_2a, self.branch3x3_2b = TorchConv(384, 384, **row), TorchConv(384, 384, **col)
    self.branch3x3dbl_1, self.branch3x3dbl_2 = TorchConv(cin, 448, 1), TorchConv(
        448, 384, 3, padding=1
    )
    self.branch3x3dbl_3a, self.branch3x3dbl_3b = TorchConv(384, 384, **row), TorchConv(
        384, 384, **col
    )
    self.branch_pool = TorchConv(cin, 192, 1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else torch_avg_pool(x)
    return torch.cat(
        [
            self.branch1x1(x),
            self.branch3x3_2a(b3),
            self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl),
            self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ],
        1,
    )


class TorchFIDInception(nn.Module):
  """pytorch-fid's InceptionV3([3]) with resize_input=True, fed [-1, 1] images (so no normalize_input)."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = TorchConv(3, 32, 3, stride=2), TorchConv(32, 32, 3)
    self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = TorchConv(32, 64, 3, padding=1), TorchConv(64, 80, 1)
    self.Conv2d_4a_3x3 = TorchConv(80, 192, 3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = TorchA(192, 32), TorchA(256, 64), TorchA(288, 64)
    self.Mixed_6a = TorchB(288)
    self.Mixed_6b, self.Mixed_6c = TorchC(768, 128), TorchC(768, 160)
    self.Mixed_6d, self.Mixed_6e = TorchC(768, 160), TorchC(768, 192)
    self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = (
        TorchD(768),
        TorchE(1280, False),
        TorchE(2048, True),
    )
    self.fc = nn.Linear(2048, 1008)  # in the weights file, unused by FID

  def forward(self, x):  # [B, 3, H, W] -> [B, 2048]
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    pool = functools.partial(F.max_pool2d, kernel_size=3, stride=2)
    x = chain(
        x,
        self.Conv2d_1a_3x3,
        self.Conv2d_2a_3x3,
        self.Conv2d_2b_3x3,
        pool,
        self.Conv2d_3b_1x1,
        self.Conv2d_4a_3x3,
        pool,
    )
    x = chain(
        x,
        *(
            getattr(self, f"Mixed_{name}")
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c")
        ),
    )
    return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def torch_inception() -> TorchFIDInception:
  """Random convs at a scale that keeps activations O(1) through the 94 layers, and random BatchNorm affine
  parameters and running statistics, so a swapped or unfolded one cannot hide."""
  torch.manual_seed(0)
  model = TorchFIDInception().eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
      elif isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
  return model


@pytest.fixture(scope="module")
def weights_file(torch_inception, tmp_path_factory):
  path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(torch_inception.state_dict(), path)
  return path


def test_inception_matches_pytorch_fid_blocks(torch_inception, weights_file):
  """Two unlike images, so the features differ by O(1) between them: a wrong pool or resize shows."""
  images = np.concatenate([structured_images((1, 75, 75, 3)), random_images(0, (1, 75, 75, 3))])
  with torch.no_grad():
    theirs = torch_inception(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  ours = np.asarray(fid.inception_features(fid.load_inception(weights_file), jnp.asarray(images)))
  assert (
      ours.shape == (2, fid.FEATURE_DIM) and np.abs(theirs).max() > 0.1
  )  # activations did not vanish
  assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_inception_resize_matches_torch_when_shrinking():
  """pytorch-fid resizes without antialiasing; jax.image.resize antialiases by default when shrinking."""
  images = random_images(0, (1, 331, 460, 3))
  theirs = (
      F.interpolate(
          torch.from_numpy(images.transpose(0, 3, 1, 2)),
          size=(299, 299),
          mode="bilinear",
          align_corners=False,
      )
      .numpy()
      .transpose(0, 2, 3, 1)
  )
  ours = jax.image.resize(images, (1, 299, 299, 3), "bilinear", antialias=False)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_load_inception_reports_a_missing_file_and_every_bad_tensor(torch_inception, tmp_path):
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
    fid.load_inception(tmp_path / "missing.pth")
  state = torch_inception.state_dict()
  del state["Mixed_5b.branch1x1.bn.running_var"]
  state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(191, 2048, 1, 1)
  state["Mixed_7c.branch_pool.bn.weight"] = torch.zeros(191)
  state["Mixed_7c.branch_pool.bn.bias"] = torch.zeros(191)
  state["Mixed_7c.branch_pool.bn.running_mean"] = torch.zeros(191)
  state["Mixed_7c.branch_pool.bn.running_var"] = torch.ones(191)
  state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
  torch.save(state, tmp_path / "wrong.pth")
  with pytest.raises(ConversionError) as error:
    fid.load_inception(tmp_path / "wrong.pth")
  message = str(error.value)
  assert "checkpoint lacks Mixed_5b.branch1x1.bn.running_var" in message
  assert (
      "Mixed_7c/branch_pool/conv/kernel: checkpoint shape (1, 1, 2048, 191) "
      "!= model shape (1, 1, 2048, 192)"
  ) in message
  assert "AuxLogits.fc.weight is not used" in message
  assert "tensor fc." not in message  # the classifier is ignorable


# --- linear probe ----------------------------------------------------------------------------------------


def clusters(seed: int, n: int, num_classes: int = 5, dim: int = 16, spread: float = 1.0):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(100).normal(scale=5.0, size=(num_classes, dim))
  labels = rng.integers(0, num_classes, n)
  return centres[labels] + spread * rng.normal(size=(n, dim)), labels


@pytest.mark.parametrize("learning_rate", [None, 0.5])  # line search, fixed steps
def test_linear_probe_separates_clusters(learning_rate):
  (train_x, train_y), (eval_x, eval_y) = clusters(0, 500), clusters(1, 500)
  result = linear_probe(
      train_x, train_y, eval_x, eval_y, num_classes=5, learning_rate=learning_rate
  )
  assert result == dict(accuracy=1.0, train_accuracy=1.0)


def test_linear_probe_is_at_chance_on_random_labels():
  rng = np.random.default_rng(0)
  train_x, eval_x = rng.normal(size=(500, 16)), rng.normal(size=(2000, 16))
  train_y, eval_y = rng.integers(0, 5, 500), rng.integers(0, 5, 2000)
  result = linear_probe(train_x, train_y, eval_x, eval_y, num_classes=5)
  assert abs(result["accuracy"] - 0.2) < 0.05  # 5 standard errors
  assert result["train_accuracy"] > result["accuracy"]  # it fits noise it cannot generalise


def test_probe_training_subset_is_class_balanced_random_and_seeded():
  from dove_jax.evaluation.probe import balanced_subset

  labels = np.repeat([0, 1, 2, 3], [50, 30, 20, 3])  # sorted by class, as many files are
  chosen = balanced_subset(labels, 10, seed=0)
  assert list(np.bincount(labels[chosen])) == [
      10,
      10,
      10,
      3,
  ]  # every image of a class that has fewer
  assert list(chosen) == sorted(set(chosen))  # distinct, in file order
  np.testing.assert_array_equal(chosen, balanced_subset(labels, 10, seed=0))
  assert not np.array_equal(chosen, balanced_subset(labels, 10, seed=1))
  assert not np.array_equal(chosen[:10], np.arange(10))  # not the first ten of class 0
  assert len(balanced_subset(np.zeros(0, np.int64), 10, seed=0)) == 0


# --- cached reference statistics -------------------------------------------------------------------------


@pytest.fixture
def counted_inception(monkeypatch):
  """fid.inception_features replaced by per-channel means and spreads [B, 6], with a count of its calls."""
  calls = []

  def features(model, images):
    calls.append(len(images))
    return jnp.concatenate([images.mean(axis=(1, 2)), images.std(axis=(1, 2))], axis=-1)

  monkeypatch.setattr(fid, "inception_features", features)
  return calls


def real_batches() -> list[dict]:
  return [
      {"image": random_images(seed, (4, 8, 8, 3)), "valid": np.array([True, True, True, seed == 0])}
      for seed in range(3)
  ]


def test_reference_statistics_are_computed_once_then_read_from_the_cache(
    counted_inception, tmp_path
):
  from dove_jax.evaluation import reference

  weights = tmp_path / "inception.pth"
  weights.write_bytes(b"weights")
  key = reference.reference_key(
      {"source": "tfds", "name": "imagenet2012", "split": "validation"}, 12, 256, True, weights
  )
  first, path, reused = reference.reference_statistics(
      tmp_path / "cache", key, None, real_batches()
  )
  assert counted_inception == [4, 4, 4] and not reused and path.parent == tmp_path / "cache"
  assert first.count == 10  # the invalid images left out
  again, same_path, reused = reference.reference_statistics(
      tmp_path / "cache", key, None, real_batches()
  )
  assert (
      counted_inception == [4, 4, 4] and reused and same_path == path
  )  # Inception did not run again
  np.testing.assert_array_equal(again.mean(), first.mean())
  np.testing.assert_array_equal(again.covariance(), first.covariance())

  fewer = {**key, "images": 8}  # another key: computed anew, into another file
  _, other_path, reused = reference.reference_statistics(
      tmp_path / "cache", fewer, None, real_batches()[:2]
  )
  assert counted_inception == [4, 4, 4, 4, 4] and not reused and other_path != path

  other_path.replace(path)  # a file that holds another key's statistics is refused, never read
  with pytest.raises(ValueError, match="holds the reference statistics of .*not of .*delete it"):
    reference.reference_statistics(tmp_path / "cache", key, None, real_batches())


def test_reference_key_names_all_the_statistics_depend_on(tmp_path):
  from dove_jax.evaluation import reference

  weights = tmp_path / "inception.pth"
  weights.write_bytes(b"weights")
  data = {
      "source": "tfds",
      "name": "imagenet2012",
      "split": "validation",
      "class_subset": {"file": "configs/imagenet100.txt", "classes": ["n02869837"]},
      "records": 50,
  }
  key = reference.reference_key(data, 50, 256, True, weights)
  assert key == {
      "data": data,
      "images": 50,
      "image_size": 256,
      "crop": "centre",
      "uint8": True,
      "inception_sha256": hashlib.sha256(b"weights").hexdigest(),
  }


# --- Q-DOVE's PSNR outside the boxes ---------------------------------------------------------------------


def test_psnr_outside_boxes_counts_only_images_with_pixels_outside_them():
  """An image whose box is the whole image (no query) has an outside MSE of 0 that measures nothing: left out,
  and counted."""
  from dove_jax.evaluation.run import quality

  per_image = {
      "mse": np.array([0.02, 0.03, 0.04]),
      "ssim": np.ones(3),
      "lpips": np.zeros(3),
      "mse_in_boxes": np.array([0.04, 0.06, 0.08]),
      "mse_outside_boxes": np.array([0.01, 0.03, 0.0]),
      "has_outside_pixels": np.array([True, True, False]),
  }
  figures = quality(per_image)
  assert figures["images_with_outside_pixels"] == 2
  np.testing.assert_allclose(figures["psnr_outside_boxes"], metrics.psnr_from_mse(0.02), rtol=1e-6)
  np.testing.assert_allclose(figures["psnr_in_boxes"], metrics.psnr_from_mse(0.06), rtol=1e-6)
  figures = quality({**per_image, "has_outside_pixels": np.zeros(3, bool)})
  assert figures["images_with_outside_pixels"] == 0 and figures["psnr_outside_boxes"] is None


def test_box_mse_says_which_images_have_pixels_outside_their_boxes():
  from dove_jax.evaluation.functions import box_mse

  images = jnp.zeros((2, 8, 8, 3))
  recon = images.at[:, :4].set(0.5)  # the top half is off by 0.5
  # (ymin, xmin, ymax, xmax): the top half; the whole image
  batch = {
      "boxes": jnp.array([[[0.0, 0.0, 0.5, 1.0]], [[0.0, 0.0, 1.0, 1.0]]]),
      "box_mask": jnp.array([[True], [True]]),
      "query_mask": jnp.ones((2, 3), bool),
  }
  out = box_mse(recon, images, batch)
  np.testing.assert_array_equal(out["has_outside_pixels"], [True, False])
  np.testing.assert_allclose(out["mse_in_boxes"], [0.25, 0.125])
  np.testing.assert_allclose(out["mse_outside_boxes"], [0.0, 0.0])
