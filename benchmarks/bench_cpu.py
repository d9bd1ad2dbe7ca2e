"""CPU benchmark: DOVE in JAX beside the same model composed from diffusers + transformers in PyTorch.

  python benchmarks/bench_cpu.py                    tiny config (batch 8, 64 px)
  python benchmarks/bench_cpu.py --paper            + the paper config, forward only (slow)

Measures, in one process on one machine: the f32 matmul peak of both frameworks, then for each config the
encode / decode time per batch, images/s, compile time, XLA's FLOP count and the fraction of the matmul peak
it reaches, the same encode / decode in PyTorch on the same weights (and how far the outputs differ), and (tiny
only) the full train step. Writes everything to a JSON file and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs.dove import get_config  # noqa: E402
from dove_jax.convert.diffusers_vq import load_diffusers_vqgan  # noqa: E402
from dove_jax.convert.neox import load_pythia  # noqa: E402
from dove_jax.models.dove import DOVE, Tokens  # noqa: E402
from dove_jax.models.embeddings import timestep_encoding  # noqa: E402

# ------------------------------------------------------------------------------------------------ timing


def max_rss_mib() -> float:
  """The process's peak resident memory so far (monotonic: a high-water mark, not a per-phase figure)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_calls(fn, repeats: int) -> dict:
  """fn() (which must block until done) once cold, then `repeats` times; seconds."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"first_s": first, "best_s": min(times), "median_s": statistics.median(times)}


def blocked(fn):
  return lambda *args: jax.block_until_ready(fn(*args))


def xla_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None else None


# ------------------------------------------------------------------------------------------------ matmul peak


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
  """Best-of-`repeats` f32 [n, n] x [n, n] in GFLOP/s, JAX (jitted) and PyTorch."""
  flops = 2 * n ** 3
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax_t = time_calls(lambda: dot(a, a).block_until_ready(), repeats)
  ta = torch.randn(n, n)
  torch_t = time_calls(lambda: torch.mm(ta, ta), repeats)
  return {"n": n, "jax_gflops": flops / jax_t["best_s"] / 1e9, "torch_gflops": flops / torch_t["best_s"] / 1e9}


# ------------------------------------------------------------------------------------------------ PyTorch DOVE


def torch_vqmodel(vqgan: dict):
  from diffusers import VQModel
  stages = len(vqgan["block_out_channels"])
  return VQModel(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * stages,
      up_block_types=("UpDecoderBlock2D",) * stages, block_out_channels=tuple(vqgan["block_out_channels"]),
      layers_per_block=vqgan["layers_per_block"], act_fn="silu", latent_channels=vqgan["latent_channels"],
      num_vq_embeddings=vqgan["num_vq_embeddings"], norm_num_groups=vqgan["norm_num_groups"],
      vq_embed_dim=vqgan["vq_embed_dim"], norm_type="group",
      mid_block_add_attention=vqgan["mid_block_attention"])


def torch_neox(spec: dict, max_positions: int):
  from transformers import GPTNeoXConfig, GPTNeoXModel
  config = GPTNeoXConfig(hidden_size=spec["d_model"], num_hidden_layers=spec["num_layers"],
                         num_attention_heads=spec["num_heads"], intermediate_size=spec["mlp_dim"],
                         rotary_pct=0.25, rotary_emb_base=10000, layer_norm_eps=1e-5, use_parallel_residual=True,
                         hidden_act="gelu", max_position_embeddings=max_positions, vocab_size=16)
  return GPTNeoXModel(config)


def linear_like(layer: nnx.Linear) -> torch.nn.Linear:
  """A torch Linear holding an nnx.Linear's weights."""
  kernel = np.asarray(layer.kernel[...])
  out = torch.nn.Linear(*kernel.shape)
  with torch.no_grad():
    out.weight.copy_(torch.from_numpy(kernel.T.copy()))
    out.bias.copy_(torch.from_numpy(np.array(layer.bias[...])))
  return out


def parameter_like(param: nnx.Param) -> torch.nn.Parameter:
  return torch.nn.Parameter(torch.from_numpy(np.array(param[...])))


class TorchDOVE(torch.nn.Module):
  """DOVE composed from diffusers' VQModel and two transformers GPTNeoXModels, as dove_jax.models.dove."""

  def __init__(self, vq, generator, decoder, ours: DOVE):
    super().__init__()
    self.vq, self.generator, self.decoder = vq, generator, decoder
    self.max_tokens = ours.max_tokens
    self.feature_proj = linear_like(ours.generator.feature_proj)
    self.feature_positions = parameter_like(ours.generator.feature_positions)
    width = self.feature_positions.shape[-1]
    self.register_buffer("slots", torch.from_numpy(timestep_encoding(self.max_tokens, width).astype(np.float32)))
    self.eos_head = linear_like(ours.generator.eos_head)
    self.token_proj = linear_like(ours.token_decoder.token_proj)
    self.latent_queries = parameter_like(ours.token_decoder.latent_queries)
    self.latent_out = linear_like(ours.token_decoder.latent_out)

  def encode(self, images: torch.Tensor, budget: torch.Tensor):
    """images [B, 3, H, W], budget [B] -> tokens [B, n, W], mask [B, n], eos_prob [B, n]."""
    features = self.vq.encode(images).latents  # [B, C, h, w]
    b = features.shape[0]
    features = features.permute(0, 2, 3, 1).reshape(b, -1, features.shape[1])  # [B, P, C], row-major
    x = self.feature_proj(features) + self.feature_positions
    x = torch.cat([x, self.slots.expand(b, -1, -1)], dim=1)
    out = self.generator(inputs_embeds=x).last_hidden_state[:, -self.max_tokens:]  # causal
    eos_prob = torch.sigmoid(self.eos_head(out)[..., 0])
    mask = torch.arange(self.max_tokens)[None] < budget[:, None]
    return out * mask[..., None], mask, eos_prob

  def decode(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tokens [B, n, W], mask [B, n] -> images [B, 3, H, W]."""
    b, n = mask.shape
    queries = self.latent_queries.expand(b, -1, -1)
    x = torch.cat([self.token_proj(tokens), queries], dim=1)
    keys = torch.cat([mask, torch.ones(queries.shape[:2], dtype=torch.bool)], dim=1)  # [B, L]
    attention = torch.zeros(b, 1, x.shape[1], x.shape[1]).masked_fill(~keys[:, None, None], float("-inf"))
    out = self.decoder(inputs_embeds=x, attention_mask=attention).last_hidden_state[:, n:]  # bidirectional
    grid = int(round(out.shape[1] ** 0.5))
    latents = self.latent_out(out).reshape(b, grid, grid, -1).permute(0, 3, 1, 2)
    return self.vq.decode(latents, force_not_quantize=True).sample


def state_arrays(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def build_pair(model_config) -> tuple[DOVE, TorchDOVE]:
  """Our DOVE and the PyTorch one with the same weights (VQ-GAN and transformers converted torch -> JAX by our
  converters; projections, positions and queries copied JAX -> torch)."""
  torch.manual_seed(0)
  ours = DOVE(**model_config, rngs=nnx.Rngs(0))
  grid = model_config.image_size // 2 ** (len(model_config.vqgan["block_out_channels"]) - 1)
  positions = grid * grid + model_config.max_tokens
  vq = torch_vqmodel(model_config.vqgan)
  generator = torch_neox(model_config.generator, positions)
  decoder = torch_neox(model_config.decoder, positions)
  load_diffusers_vqgan(ours.vqgan, state_arrays(vq))
  load_pythia(ours.generator.transformer, state_arrays(generator), prefix="")
  load_pythia(ours.token_decoder.transformer, state_arrays(decoder), prefix="")
  return ours, TorchDOVE(vq, generator, decoder, ours).eval()


# ------------------------------------------------------------------------------------------------ benchmarks


def aot_compile(jitted, args) -> tuple[object, float]:
  """jitted.lower(*args).compile() and the seconds it took (tracing + XLA compilation)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def throughput(timing: dict, batch: int, flops: float | None, peak_gflops: float, compile_s: float) -> dict:
  """The first call here is already compiled (AOT), so compile_s is measured separately."""
  result = dict(timing, images_per_s=batch / timing["best_s"], compile_s=compile_s)
  if flops is not None:
    result.update(gflop=flops / 1e9, gflops_per_s=flops / timing["best_s"] / 1e9,
                  peak_fraction=flops / timing["best_s"] / 1e9 / peak_gflops)
  return result


def bench_jax(fn, args, batch: int, repeats: int, peak_gflops: float) -> tuple[dict, object]:
  """A jitted fn(*args): timing, compile time, XLA FLOPs. Returns (stats, output)."""
  compiled, compile_s = aot_compile(jax.jit(fn), args)
  timing = time_calls(lambda: jax.block_until_ready(compiled(*args)), repeats)
  stats = throughput(timing, batch, xla_flops(compiled), peak_gflops, compile_s)
  stats["max_rss_mib"] = max_rss_mib()
  return stats, compiled(*args)


def bench_torch(fn, batch: int, repeats: int) -> tuple[dict, object]:
  with torch.no_grad():
    timing = time_calls(fn, repeats)
    out = fn()
  stats = dict(timing, images_per_s=batch / timing["best_s"], max_rss_mib=max_rss_mib())
  return stats, out


def bench_forward(config, batch: int, repeats: int, peak_gflops: float) -> dict:
  """encode and decode, ours (jax.jit over nnx.split state, budget as an array) beside PyTorch."""
  ours, theirs = build_pair(config.model)
  graphdef, state = nnx.split(ours)
  size, n = config.model.image_size, config.model.max_tokens
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  budget = np.full((batch,), n, np.int32)  # full length: the torch side forces the same lengths

  # PyTorch first: right after XLA has run, its idle worker threads slowed PyTorch ~10x on 2 cores here.
  t_images, t_budget = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(budget)
  torch_encode, (t_tokens, t_mask, t_eos) = bench_torch(lambda: theirs.encode(t_images, t_budget), batch, repeats)
  torch_decode, t_recon = bench_torch(lambda: theirs.decode(t_tokens, t_mask), batch, repeats)

  encode = lambda state, images, budget: nnx.merge(graphdef, state).encode(images, budget)  # noqa: E731
  decode = lambda state, tokens: nnx.merge(graphdef, state).decode(tokens)  # noqa: E731
  jax_encode, tokens = bench_jax(encode, (state, jnp.asarray(images), jnp.asarray(budget)), batch, repeats,
                                 peak_gflops)
  jax_decode, recon = bench_jax(decode, (state, tokens), batch, repeats, peak_gflops)

  diffs = {"tokens": np.abs(np.asarray(tokens.tokens) - t_tokens.numpy()).max(),
           "eos_prob": np.abs(np.asarray(tokens.eos_prob) - t_eos.numpy()).max(),
           "reconstruction": np.abs(np.asarray(recon) - t_recon.numpy().transpose(0, 2, 3, 1)).max()}
  return {"batch": batch, "image_size": size,
          "encode": {"jax": jax_encode, "torch": torch_encode,
                     "jax_over_torch": jax_encode["images_per_s"] / torch_encode["images_per_s"]},
          "decode": {"jax": jax_decode, "torch": torch_decode,
                     "jax_over_torch": jax_decode["images_per_s"] / torch_decode["images_per_s"]},
          "max_abs_diff": {k: float(v) for k, v in diffs.items()}}


def bench_train_step(config, batch: int, repeats: int, peak_gflops: float) -> dict:
  """The full train step (generator + discriminator, LPIPS as configured) on a 1-device mesh."""
  from dove_jax.training import mesh as meshlib
  from dove_jax.training.loop import build_training
  mesh = meshlib.make_mesh(1, 1, devices=jax.devices()[:1])
  setup = build_training(config, mesh, num_steps=1000)
  size = config.model.image_size
  images = np.random.default_rng(1).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  data = meshlib.global_batch({"image": images, "valid": np.ones((batch,), bool)}, mesh)
  compiled, compile_s = aot_compile(setup.train_step, (setup.state, data, setup.lpips))
  holder = {"state": setup.state}

  def step():
    holder["state"], metrics = compiled(holder["state"], data, setup.lpips)  # the state is donated
    jax.block_until_ready(metrics)

  stats = throughput(time_calls(step, repeats), batch, xla_flops(compiled), peak_gflops, compile_s)
  stats.update(lpips=bool(config.loss.lpips_weight), max_rss_mib=max_rss_mib())
  return stats


# ------------------------------------------------------------------------------------------------ report


def machine() -> dict:
  return {"processor": platform.processor() or platform.machine(), "platform": platform.platform(),
          "cpu_count": os.cpu_count(), "jax_devices": [str(d) for d in jax.devices()],
          "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def fmt(value, spec: str = ".3g") -> str:
  return "-" if value is None else format(value, spec)


def table(results: dict) -> str:
  m, peak = results["machine"], results["matmul_peak"]
  lines = [f"machine: {m['processor']} | {m['cpu_count']} CPUs | jax {m['jax']} {m['jax_devices']} | "
           f"torch {m['torch']} ({m['torch_threads']} threads)",
           f"f32 matmul {peak['n']}^2 peak: JAX {peak['jax_gflops']:.1f} GFLOP/s, "
           f"PyTorch {peak['torch_gflops']:.1f} GFLOP/s", ""]
  header = (f"{'config':<6} {'phase':<7} {'impl':<6} {'s/batch':>8} {'img/s':>8} {'compile s':>9} "
            f"{'GFLOP':>8} {'GFLOP/s':>8} {'%peak':>6} {'maxRSS MiB':>10} {'jax/torch':>9}")
  lines += [header, "-" * len(header)]
  for name, run in results["configs"].items():
    for phase in ("encode", "decode"):
      for impl in ("jax", "torch"):
        s = run[phase][impl]
        ratio = fmt(run[phase]["jax_over_torch"], ".2f") if impl == "jax" else ""
        lines.append(f"{name:<6} {phase:<7} {impl:<6} {s['best_s']:>8.4f} {s['images_per_s']:>8.2f} "
                     f"{fmt(s.get('compile_s'), '.2f'):>9} {fmt(s.get('gflop')):>8} "
                     f"{fmt(s.get('gflops_per_s'), '.1f'):>8} {fmt(s.get('peak_fraction') and 100 * s['peak_fraction'], '.1f'):>6} "
                     f"{s['max_rss_mib']:>10.0f} {ratio:>9}")
    if "train_step" in run:
      s = run["train_step"]
      lines.append(f"{name:<6} {'train':<7} {'jax':<6} {s['best_s']:>8.4f} {s['images_per_s']:>8.2f} "
                   f"{s['compile_s']:>9.2f} {fmt(s.get('gflop')):>8} {fmt(s.get('gflops_per_s'), '.1f'):>8} "
                   f"{fmt(s.get('peak_fraction') and 100 * s['peak_fraction'], '.1f'):>6} {s['max_rss_mib']:>10.0f}")
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in run["max_abs_diff"].items())
    lines.append(f"{name:<6} jax vs torch max |diff|: {diffs}")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="benchmarks/results_cpu.json")
  parser.add_argument("--paper", action="store_true", help="also the paper config, forward only (slow)")
  parser.add_argument("--paper-batch", type=int, default=1)
  parser.add_argument("--batch", type=int, default=8, help="tiny-config batch")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first (tiny)")
  parser.add_argument("--no-train", action="store_true", help="skip the train step")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())  # XLA's CPU backend uses every core
  torch.set_flush_denormal(True)  # as XLA's CPU code does (FTZ/DAZ); random weights otherwise give denormals

  results = {"machine": machine(), "matmul_peak": matmul_peak(), "configs": {}}
  peak = results["matmul_peak"]["jax_gflops"]
  tiny = get_config("tiny")
  results["configs"]["tiny"] = bench_forward(tiny, args.batch, args.repeats, peak)
  if not args.no_train:
    results["configs"]["tiny"]["train_step"] = bench_train_step(tiny, args.batch, args.repeats, peak)
  if args.paper:
    results["configs"]["paper"] = bench_forward(get_config(), args.paper_batch, 2, peak)

  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2))
  print(table(results))
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
