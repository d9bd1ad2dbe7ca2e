"""Sharding: the train step on one device, on 8 (data parallel) and on 4 x 2 (data x fsdp) gives the same
losses and parameters (8 CPU devices in a child process: the device count is fixed when jax starts).
"""

import json
import textwrap

from test_training import python

# Two steps of the tiny model on 1 device, on 8 (data parallel) and on 4 x 2 (data x fsdp), same batches.
SHARDING_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, ".")
    from configs import dove
    from dove_jax import mesh as meshlib
    from dove_jax.training.setup import build_training

    config = dove.get_config("tiny")
    config.data.global_batch_size = 8
    config.loss.lpips_weight = 0.0  # the perceptual net adds compile time, not sharding logic
    config.optim.warmup_steps = 1  # the second step moves parameters by the full learning rate

    def comparable(path, value):
      # A key bias shifts every logit of a query by the same amount, which softmax ignores: its gradient is
      # exactly zero (outside the rotary dimensions), so what reaches Adam is rounding noise, and Adam turns
      # noise of either sign into a full-size step. Those entries differ by summation order alone.
      name = jax.tree_util.keystr(path)
      if "qkv" in name and value.ndim == 1:
        heads = config.model["generator" if "generator" in name else "decoder"].num_heads
        value = value.reshape(heads, 3, -1)[:, ::2]  # [heads, (q, v), head_dim]: the key bias left out
      return value

    def run(mesh):
      setup = build_training(config, mesh, num_steps=10)
      state, rng, losses = setup.state, np.random.default_rng(0), []
      initial = [comparable(*leaf) for leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))]
      for _ in range(2):
        batch = dict(image=rng.uniform(-1, 1, (8, 64, 64, 3)).astype(np.float32), valid=np.ones(8, bool))
        state, metrics = setup.train_step(state, meshlib.global_batch(batch, mesh), setup.lpips)
        losses.append(float(metrics["loss"]))
      final = [comparable(*leaf) for leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))]
      return losses, final, max(float(np.abs(a - b).max()) for a, b in zip(final, initial))

    assert jax.device_count() == 8
    ref_losses, ref_params, ref_change = run(meshlib.make_mesh(devices=jax.devices()[:1]))
    result = {}
    for name, mesh in [("data8", meshlib.make_mesh(data=8)), ("data4_fsdp2", meshlib.make_mesh(data=4, fsdp=2))]:
      losses, params, change = run(mesh)
      result[name] = dict(loss_diff=max(abs(a - b) for a, b in zip(losses, ref_losses)),
                          param_diff=max(float(np.abs(a - b).max()) for a, b in zip(params, ref_params)),
                          change=change, ref_change=ref_change)
    print(json.dumps(result))
""")


def test_one_device_and_eight_devices_give_the_same_steps():
  result = python(SHARDING_SCRIPT, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  print(figures)
  for name, diff in figures.items():
    assert diff["loss_diff"] <= 1e-5, (name, diff)
    assert diff["param_diff"] <= 1e-5, (name, diff)
    assert (
        diff["change"] > 1e-4 and diff["ref_change"] > 1e-4
    ), "the steps should move the parameters"
