"""CPU benchmark: DOVE in JAX beside the same model composed from diffusers + transformers in PyTorch.

  python benchmarks/bench_cpu.py                     tiny config (batch 8, 64 px): encode, decode, train step
  python benchmarks/bench_cpu.py --paper             + the paper config, encode and decode (slow)
  python benchmarks/bench_cpu.py --paper --paper-train   + the paper config's train step (slower)
  python benchmarks/bench_cpu.py --curve             + encode / decode time against the sequence length
  python benchmarks/bench_cpu.py --no-lpips          train steps without LPIPS on both sides
  python benchmarks/bench_cpu.py --no-torch --dtype bfloat16   ours alone, computing in bf16 (a GPU: the
                                                     PyTorch here is a CPU build, and computes in float32)

The train step is the config's own, LPIPS included (the PyTorch side's is `TorchLPIPS`, on the same weights).

In one run on one machine: the f32 matmul peak, then per config the encode / decode (and, tiny, train step)
time per batch, images/s, compile time, XLA's buffer memory, XLA's FLOP count and the fraction of the
matmul peak reached; the PyTorch reference on the same weights (benchmarks/torch_reference.py, in processes
of its own with the same number of threads, timed call by call in turn with ours) and the ratio ours/theirs.
On an accelerator the peak is also measured in bf16, and the device's peak memory is reported.
`--curve` times encode at forced lengths 256 ... 16 with the cached chunked generator, beside the one-pass
generator, and the length-bucketed decoder. Writes a JSON file and prints a table. Times are medians after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import bench_inputs, interleaved_times, max_rss_mib, median_time, seconds  # noqa: E402
from configs.dove import get_config  # noqa: E402
from dove_jax import xla  # noqa: E402
from dove_jax.convert.diffusers_vq import load_diffusers_vqgan  # noqa: E402
from dove_jax.convert.neox import load_pythia  # noqa: E402
from dove_jax.models import buckets  # noqa: E402
from dove_jax.models.dove import DOVE  # noqa: E402
from dove_jax.perceptual import load_lpips  # noqa: E402

# ------------------------------------------------------------------------------------------------ measuring


def aot_compile(fn, args, **jit_kwargs) -> tuple[object, float]:
  """xla.jit(fn).lower(*args).compile() (the library's XLA options) and the seconds it took (tracing + XLA
  compilation)."""
  start = time.perf_counter()
  compiled = xla.jit(fn, **jit_kwargs).lower(*args).compile()
  return compiled, time.perf_counter() - start


def xla_cost(compiled) -> dict:
  """XLA's FLOP count and buffer sizes of a compiled program (memory: arguments + outputs + temporaries,
  less what donation aliases: the program's peak working set, not the process's)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else {}
  memory = compiled.memory_analysis()
  mib = (
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      + memory.temp_size_in_bytes
      - memory.alias_size_in_bytes
  ) / 2**20
  return {
      "gflop": float(analysis["flops"]) / 1e9 if "flops" in analysis else None,
      "xla_memory_mib": mib,
  }


def rates(timing: dict, batch: int, gflop: float | None, peak_gflops: float) -> dict:
  result = dict(timing, images_per_s=batch / timing["median_s"])
  if gflop:
    result.update(
        gflops_per_s=gflop / timing["median_s"],
        peak_fraction=gflop / timing["median_s"] / peak_gflops,
    )
  return result


def bench_jax(
    fn,
    args,
    batch: int,
    repeats: int,
    peak_gflops: float,
    phase: str,
    references: list[TorchReference],
) -> tuple[dict, dict, object]:
  """A jitted fn(*args), timed in turn with the references' `phase`: (our stats: median time, compile time,
  XLA FLOPs and memory; the references' timings by name; one output of ours)."""
  compiled, compile_s = aot_compile(fn, args)
  cost = xla_cost(compiled)
  ours, theirs = compare(lambda: jax.block_until_ready(compiled(*args)), phase, references, repeats)
  return (
      dict(rates(ours, batch, cost["gflop"], peak_gflops), compile_s=compile_s, **cost),
      theirs,
      compiled(*args),
  )


def matmul_gflops(n: int, dtype, repeats: int) -> float:
  """The best of `repeats` [n, n] x [n, n] in `dtype`, in GFLOP/s (the best: a peak, not a typical figure),
  under XLA's default options and the library's, whichever is faster."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  best = min(
      median_time(lambda: dot(a, a).block_until_ready(), repeats)["best_s"]
      for dot in (jax.jit(jnp.dot), xla.jit(jnp.dot))
  )
  return 2 * n**3 / best / 1e9


def matmul_peak(repeats: int = 5) -> dict:
  """The f32 matmul peak the %peak figures divide by (n = 2048 on the CPU, 8192 on an accelerator, which a
  small product leaves idle), and on an accelerator the bf16 peak too."""
  if jax.default_backend() == "cpu":
    return {"n": 2048, "gflops": matmul_gflops(2048, jnp.float32, repeats)}
  return {
      "n": 8192,
      "gflops": matmul_gflops(8192, jnp.float32, repeats),
      "bf16_gflops": matmul_gflops(8192, jnp.bfloat16, repeats),
  }


def device_peak_mib() -> float | None:
  """The first device's peak memory in use so far (accelerators; None where the backend keeps no count)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


# ------------------------------------------------------------------------------------------------ PyTorch

SETTLE_S = 0.25  # between calls of different sides: see common.interleaved_times
# The reference's processes: PyTorch as it ships (glibc's default malloc), and with the malloc our train.py
# restarts into (xla.restart_with_fast_malloc), which speeds PyTorch's big allocations as well.
REFERENCES = {"stock": {}, "our_malloc": xla.fast_malloc_environment()}  # name -> malloc variables


class TorchReference:
  """benchmarks/torch_reference.py serving one config in a process of its own (OpenMP's default wait policy;
  `malloc`: its malloc variables, {} for glibc's defaults): `seconds(phase)` runs that phase there once and
  returns the seconds it took."""

  def __init__(
      self,
      preset: str,
      batch: int,
      threads: int,
      folder: Path,
      name: str,
      malloc: dict[str, str],
      lpips: bool,
  ):
    env = {k: v for k, v in os.environ.items() if k not in xla.MALLOC_VARIABLES}
    env.update(malloc)
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "torch_reference.py"),
        "--config",
        preset,
        "--batch",
        str(batch),
        "--threads",
        str(threads),
        "--out",
        str(folder),
        *([] if lpips else ["--no-lpips"]),
    ]
    self.name, self.folder = name, folder
    self.process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    self.info = self._reply()  # threads, torch version, its matmul peak
    self.max_rss_mib = None

  def _reply(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"torch_reference.py ({self.name}) exited with {self.process.wait()}")
    return json.loads(line)

  def seconds(self, phase: str) -> float:
    self.process.stdin.write(phase + "\n")
    self.process.stdin.flush()
    reply = self._reply()
    self.max_rss_mib = reply["max_rss_mib"]
    return reply["s"]

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait()


@contextlib.contextmanager
def torch_references(
    preset: str, batch: int, threads: int, folder: Path, names: list[str], lpips: bool
):
  """One TorchReference per name of REFERENCES, started one after the other (each measures its matmul peak
  on an idle machine)."""
  with contextlib.ExitStack() as stack:
    references = []
    for name in names:
      references.append(
          TorchReference(preset, batch, threads, folder / name, name, REFERENCES[name], lpips)
      )
      stack.callback(references[-1].close)
    yield references


def compare(ours, phase: str, references: list[TorchReference], repeats: int) -> tuple[dict, dict]:
  """ours() (blocking) and each reference's `phase`, timed in turn (interleaved_times): (our timing, the
  references' by name)."""
  calls = {
      "jax": seconds(ours),
      **{ref.name: functools.partial(ref.seconds, phase) for ref in references},
  }
  times = interleaved_times(calls, repeats, settle_s=SETTLE_S if references else 0.0, warm_calls=1)
  return times["jax"], {
      ref.name: dict(times[ref.name], max_rss_mib=ref.max_rss_mib) for ref in references
  }


def load_torch_weights(model: DOVE, weights: dict[str, np.ndarray]) -> None:
  """Fills our DOVE with the PyTorch reference's weights: VQ-GAN and transformers through our converters,
  the projections, positions and queries copied (torch Linear weights are [out, in])."""

  def part(prefix):
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}

  load_diffusers_vqgan(model.vqgan, part("vq."))
  load_pythia(model.generator.transformer, part("generator."), prefix="")
  load_pythia(model.token_decoder.transformer, part("decoder."), prefix="")
  for layer, name in [
      (model.generator.feature_proj, "feature_proj"),
      (model.generator.eos_head, "eos_head"),
      (model.token_decoder.token_proj, "token_proj"),
      (model.token_decoder.latent_out, "latent_out"),
  ]:
    layer.kernel.value = jnp.asarray(weights[f"{name}.weight"].T)
    layer.bias.value = jnp.asarray(weights[f"{name}.bias"])
  model.generator.feature_positions.value = jnp.asarray(weights["feature_positions"])
  model.token_decoder.latent_queries.value = jnp.asarray(weights["latent_queries"])


# ------------------------------------------------------------------------------------------------ JAX


def bench_forward(
    config, batch: int, repeats: int, peak: float, references: list[TorchReference]
) -> dict:
  """encode and decode under jax.jit over the nnx.split state, at full length (the PyTorch side forces the
  same), on the PyTorch reference's weights (none: our own initialisation), each timed in turn with the
  references'. Returns our stats, and theirs under "torch"."""
  model = DOVE(**config.model, rngs=nnx.Rngs(0))
  if references:
    load_torch_weights(model, dict(np.load(references[0].folder / "weights.npz")))
  graphdef, state = nnx.split(model)
  images = jnp.asarray(bench_inputs(config.model.image_size, batch))
  budget = jnp.full((batch,), config.model.max_tokens, jnp.int32)
  encode = lambda state, images, budget: nnx.merge(graphdef, state).encode(images, budget)  # noqa: E731
  decode = lambda state, tokens: nnx.merge(graphdef, state).decode(tokens)  # noqa: E731
  encode_stats, torch_encode, tokens = bench_jax(
      encode, (state, images, budget), batch, repeats, peak, "encode", references
  )
  decode_stats, torch_decode, recon = bench_jax(
      decode, (state, tokens), batch, repeats, peak, "decode", references
  )
  run = {
      "batch": batch,
      "image_size": config.model.image_size,
      "encode": encode_stats,
      "decode": decode_stats,
      "torch": {"encode": torch_encode, "decode": torch_decode},
  }  # phase -> reference name -> timing
  if not references:
    return run
  theirs = np.load(references[0].folder / "outputs.npz")
  lpips = load_lpips()(images, images[:, :, ::-1])  # the inputs against their mirror images
  diffs = {
      "tokens": np.abs(np.asarray(tokens.tokens) - theirs["tokens"]).max(),
      "eos_prob": np.abs(np.asarray(tokens.eos_prob) - theirs["eos_prob"]).max(),
      "reconstruction": np.abs(np.asarray(recon) - theirs["reconstruction"]).max(),
      "lpips": np.abs(np.asarray(lpips) - theirs["lpips"]).max(),
  }
  return dict(run, max_abs_diff_vs_torch={k: float(v) for k, v in diffs.items()})


def bench_train_step(
    config, batch: int, repeats: int, peak: float, references: list[TorchReference]
) -> tuple[dict, dict]:
  """The full train step (generator + discriminator, state donated) on a 1-device mesh, timed in turn with the
  references' train step: (our stats, theirs)."""
  from dove_jax import mesh as meshlib
  from dove_jax.training.setup import build_training

  mesh = meshlib.make_mesh(1, 1, devices=jax.devices()[:1])
  setup = build_training(config, mesh, num_steps=1000)
  images = bench_inputs(config.model.image_size, batch)
  data = meshlib.global_batch({"image": images, "valid": np.ones((batch,), bool)}, mesh)
  start = time.perf_counter()
  compiled = setup.train_step.lower(setup.state, data, setup.lpips).compile()
  compile_s = time.perf_counter() - start
  cost = xla_cost(compiled)
  holder = {"state": setup.state}

  def step():
    holder["state"], metrics = compiled(holder["state"], data, setup.lpips)  # the state is donated
    float(metrics["loss"])  # a host sync, as the PyTorch side's loss.item()

  ours, theirs = compare(step, "train_step", references, repeats)
  return (
      dict(
          rates(ours, batch, cost["gflop"], peak),
          compile_s=compile_s,
          lpips=bool(config.loss.lpips_weight),
          **cost,
      ),
      theirs,
  )


def curve_config():
  """The paper's transformers and n = 256 slots over a 16 x 16 feature grid, with the tiny VQ-GAN at 64 px
  in place of the aMUSEd one (same grid, so the same generator work; the full VQ-GAN's fixed ~2 s per image
  on this CPU would hide the generator's share)."""
  config = get_config()
  tiny = get_config("tiny")
  config.model.image_size, config.model.vqgan = tiny.model.image_size, tiny.model.vqgan
  return config


def bench_length_curve(batch: int, repeats: int, chunk_size: int, lengths: tuple[int, ...]) -> dict:
  """Encode time against the (forced) length: one-pass generator vs cached chunked generation; decode time
  against the length: full vs length-bucketed token decoder. One compiled program each for every length.
  """
  config = curve_config()
  model = DOVE(**config.model, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  images = jnp.asarray(bench_inputs(config.model.image_size, batch))
  encode = lambda state, budget, chunk: nnx.merge(graphdef, state).encode(images, budget, chunk_size=chunk)  # noqa: E731
  decode = lambda state, tokens: nnx.merge(graphdef, state).decode(tokens)  # noqa: E731
  sizes = buckets.bucket_sizes(model.max_tokens)
  decode_bucketed = lambda state, tokens: nnx.merge(graphdef, state).decode(tokens, sizes)  # noqa: E731
  budget0 = jnp.full((batch,), lengths[0], jnp.int32)
  one_pass, _ = aot_compile(encode, (state, budget0, 0), static_argnums=2)
  chunked, _ = aot_compile(encode, (state, budget0, chunk_size), static_argnums=2)
  tokens0 = one_pass(state, budget0)
  full_decode, _ = aot_compile(decode, (state, tokens0))
  bucketed_decode, _ = aot_compile(decode_bucketed, (state, tokens0))
  rows = []
  for length in lengths:
    budget = jnp.full((batch,), length, jnp.int32)
    tokens = one_pass(state, budget)
    rows.append(
        {
            "length": length,
            **{
                name: median_time(lambda: jax.block_until_ready(fn()), repeats)["median_s"]
                for name, fn in [
                    ("encode_one_pass_s", lambda: one_pass(state, budget)),
                    ("encode_chunked_s", lambda: chunked(state, budget)),
                    ("decode_full_s", lambda: full_decode(state, tokens)),
                    ("decode_bucketed_s", lambda: bucketed_decode(state, tokens)),
                ]
            },
        }
    )
  by_length = {row["length"]: row for row in rows}
  ratio = (
      by_length[64]["encode_chunked_s"] / by_length[256]["encode_chunked_s"]
      if {64, 256} <= by_length.keys()
      else None
  )
  return {
      "batch": batch,
      "chunk_size": chunk_size,
      "image_size": config.model.image_size,
      "vqgan": "tiny (64 px, 16x16 grid)",
      "transformers": "pythia-70m",
      "max_tokens": 256,
      "rows": rows,
      "encode_64_over_256": ratio,
  }


# ------------------------------------------------------------------------------------------------ report


def machine(threads: int) -> dict:
  cpu = next(
      (
          line.split(":", 1)[1].strip()
          for line in Path("/proc/cpuinfo").read_text().splitlines()
          if line.startswith("model name")
      ),
      platform.processor(),
  )
  return {
      "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "threads": threads,
      "platform": platform.platform(),
      "jax": jax.__version__,
      "jax_devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def fmt(value, spec: str = ".3g") -> str:
  return "-" if value is None else format(value, spec)


def table(results: dict) -> str:
  m, peak = results["machine"], results["matmul_peak"]
  lines = [
      f"machine: {m['cpu']} | {m['cpu_count']} CPUs, {m['threads']} threads | {m.get('device_kind', '-')} | "
      f"jax {m['jax']} | torch {results.get('torch_version', '-')} | "
      f"model dtype {results.get('dtype', 'float32')}",
      f"f32 matmul {peak['n']}^2 peak: JAX {peak['gflops']:.1f} GFLOP/s, "
      f"PyTorch {fmt(peak.get('torch_gflops'), '.1f')} GFLOP/s"
      + (f"; bf16: JAX {peak['bf16_gflops']:.1f} GFLOP/s" if "bf16_gflops" in peak else ""),
      "",
  ]
  header = (
      f"{'config':<6} {'phase':<7} {'impl':<17} {'s/batch':>8} {'best s':>8} {'img/s':>8} {'compile s':>9} "
      f"{'GFLOP':>8} {'GFLOP/s':>8} {'%peak':>6} {'mem MiB':>8} {'ours/theirs':>11} {'(best)':>6}"
  )
  lines += [header, "-" * len(header)]
  for name, run in results["configs"].items():
    for phase in ("encode", "decode", "train_step"):
      if phase not in run:
        continue
      ours = run[phase]
      pct = ours.get("peak_fraction") and 100 * ours["peak_fraction"]
      lines.append(
          f"{name:<6} {phase[:7]:<7} {'jax':<17} {ours['median_s']:>8.4f} {ours['best_s']:>8.4f} "
          f"{ours['images_per_s']:>8.2f} {ours['compile_s']:>9.2f} {fmt(ours.get('gflop')):>8} "
          f"{fmt(ours.get('gflops_per_s'), '.1f'):>8} {fmt(pct, '.1f'):>6} {ours['xla_memory_mib']:>8.0f}"
      )
      for reference, theirs in run["torch"].get(phase, {}).items():
        ratio = theirs["median_s"] / ours["median_s"]  # images/s, ours over theirs
        best_ratio = theirs["best_s"] / ours["best_s"]
        lines.append(
            f"{name:<6} {phase[:7]:<7} {'torch ' + reference:<17} {theirs['median_s']:>8.4f} "
            f"{theirs['best_s']:>8.4f} {run['batch'] / theirs['median_s']:>8.2f} {'-':>9} {'-':>8} {'-':>8} "
            f"{'-':>6} {theirs['max_rss_mib']:>8.0f} {ratio:>11.2f} {best_ratio:>6.2f}"
        )
    if "max_abs_diff_vs_torch" in run:
      diffs = ", ".join(f"{k} {v:.2e}" for k, v in run["max_abs_diff_vs_torch"].items())
      lines.append(f"{name:<6} jax vs torch max |diff|: {diffs}")
  if "length_curve" in results:
    curve = results["length_curve"]
    lines += [
        "",
        f"length curve: pythia-70m transformers, n = 256, {curve['vqgan']} VQ-GAN, batch {curve['batch']}, "
        f"chunks of {curve['chunk_size']} (seconds per batch)",
        f"{'length':>6} {'encode 1-pass':>13} {'encode chunked':>14} {'decode full':>11} {'decode bucketed':>15}",
    ]
    for row in curve["rows"]:
      lines.append(
          f"{row['length']:>6} {row['encode_one_pass_s']:>13.4f} {row['encode_chunked_s']:>14.4f} "
          f"{row['decode_full_s']:>11.4f} {row['decode_bucketed_s']:>15.4f}"
      )
    lines.append(f"chunked encode at length 64 / at 256: {fmt(curve['encode_64_over_256'], '.2f')}")
  if "max_rss_mib" in results:
    lines += [
        "",
        f"peak memory: this process {results['max_rss_mib']:.0f} MiB resident, device "
        f"{fmt(results.get('device_peak_mib'), '.0f')} MiB (high-water marks of the whole run)",
    ]
  return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", default="benchmarks/results_cpu.json")
  parser.add_argument("--batch", type=int, default=8, help="tiny-config batch")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up (tiny)")
  parser.add_argument("--no-train", action="store_true", help="skip the train step")
  parser.add_argument(
      "--no-lpips",
      action="store_true",
      help="train steps without LPIPS on both sides (the configs have it; earlier runs had not)",
  )
  parser.add_argument(
      "--paper", action="store_true", help="also the paper config, encode and decode (slow)"
  )
  parser.add_argument("--paper-batch", type=int, default=1)
  parser.add_argument("--paper-repeats", type=int, default=2)
  parser.add_argument(
      "--paper-train", action="store_true", help="also the paper config's train step (slower)"
  )
  parser.add_argument(
      "--curve", action="store_true", help="also encode / decode time against the length"
  )
  parser.add_argument("--curve-batch", type=int, default=4)
  parser.add_argument(
      "--chunk-size", type=int, default=32, help="chunked generation (32 measured best here)"
  )
  parser.add_argument(
      "--references",
      nargs="+",
      default=list(REFERENCES),
      choices=list(REFERENCES),
      help="the PyTorch processes: as it ships (stock), with our malloc (our_malloc)",
  )
  parser.add_argument("--no-torch", action="store_true", help="ours alone, no PyTorch reference")
  parser.add_argument(
      "--dtype",
      default="",
      choices=["", "bfloat16"],
      help="the model's compute dtype (config model.dtype; needs --no-torch)",
  )
  args = parser.parse_args(argv)
  if args.dtype and not args.no_torch:
    parser.error(
        f"--dtype {args.dtype} needs --no-torch: the PyTorch reference computes in float32, so the "
        "two sides would not compute the same function"
    )
  return args


def main() -> None:
  args = parse_args()
  threads = os.cpu_count()  # XLA's CPU backend uses every core; PyTorch gets as many threads
  reference_names = [] if args.no_torch else args.references

  runs = {"tiny": (get_config("tiny"), args.batch, args.repeats, not args.no_train)}
  if args.paper:
    runs["paper"] = (get_config(), args.paper_batch, args.paper_repeats, args.paper_train)
  results = {
      "configs": {},
      "machine": machine(threads),
      "matmul_peak": matmul_peak(),
      "dtype": args.dtype or "float32",
  }
  peak = results["matmul_peak"]["gflops"]
  for name, (config, batch, repeats, train) in runs.items():
    config.model.dtype = args.dtype
    if args.no_lpips:
      config.loss.lpips_weight = 0.0
    with (
        tempfile.TemporaryDirectory() as tmp,
        torch_references(
            name, batch, threads, Path(tmp), reference_names, not args.no_lpips
        ) as references,
    ):
      if references:
        results["torch_version"] = references[0].info["torch"]
        results["matmul_peak"]["torch_gflops"] = max(
            [results["matmul_peak"].get("torch_gflops", 0.0)]
            + [ref.info["matmul_gflops"] for ref in references]
        )
      run = bench_forward(config, batch, repeats, peak, references)
      if train:
        run["train_step"], run["torch"]["train_step"] = bench_train_step(
            config, batch, repeats, peak, references
        )
    results["configs"][name] = run
  if args.curve:
    results["length_curve"] = bench_length_curve(
        args.curve_batch, 3, args.chunk_size, (256, 192, 128, 64, 32, 16)
    )
  results["max_rss_mib"] = max_rss_mib()
  results["device_peak_mib"] = device_peak_mib()

  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2))
  print(table(results))
  print(f"\nwrote {out}")


if __name__ == "__main__":
  xla.restart_with_fast_malloc()  # as train.py (the PyTorch processes choose theirs: REFERENCES)
  main()
