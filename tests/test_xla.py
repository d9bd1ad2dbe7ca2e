"""dove_jax.xla: the library's jit compiles with its XLA options, and they change the CPU program."""
import jax
import numpy as np
import pytest
from flax import nnx

from dove_jax import xla
from dove_jax.models import vqgan

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are the CPU backend's")


def encoder_program(jit) -> str:
  encoder = vqgan.Encoder(in_channels=3, out_channels=8, block_out_channels=(8, 16), layers_per_block=1,
                          norm_num_groups=4, mid_block_attention=False, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(encoder)
  apply = jit(lambda state, x: nnx.merge(graphdef, state)(x))
  return apply.lower(state, np.zeros((2, 16, 16, 3), np.float32)).compile().as_text()


def test_cpu_compiles_without_ynnpack_fusions():
  assert xla.compiler_options() == xla.CPU_OPTIONS
  # XLA's default hands the convolution stack to YNNPACK fusions; the library's jit keeps XLA's own kernels.
  assert "ynn_fusion" in encoder_program(jax.jit)
  assert "ynn_fusion" not in encoder_program(xla.jit)


def test_jit_as_decorator_passes_jit_arguments():
  @xla.jit(static_argnames="power")
  def raise_to(x, power):
    return x ** power

  assert float(raise_to(np.float32(3), power=2)) == 9.0
  assert "ynn_fusion" not in raise_to.lower(np.float32(3), power=2).compile().as_text()
