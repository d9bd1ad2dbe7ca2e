"""Making short sequences cheap. Cached chunked generation (`TokenGenerator.generate`) against the one-pass
generator: same tokens and EOS on every kept slot, same lengths, an early stop that really stops, and one
compilation for every budget. Length-bucketed decoding against the full decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dove_jax.models import buckets, eos
from dove_jax.models.dove import DOVE
from dove_jax.models.generator import TokenGenerator
from test_dove import TINY

N, WIDTH, THRESHOLD = (
    20,
    32,
    0.65,
)  # this seed and threshold give the batch different predicted lengths


@pytest.fixture(scope="module")
def generator():
  # EOS bias 0: probabilities near 0.5, so EOS fires within the sequence.
  return TokenGenerator(
      feature_dim=8,
      grid_size=4,
      max_tokens=N,
      eos_bias_init=0.0,
      transformer=dict(num_layers=2, d_model=WIDTH, num_heads=2, mlp_dim=64),
      rngs=nnx.Rngs(0),
  )


@pytest.fixture(scope="module")
def features():
  return jax.random.normal(jax.random.key(1), (3, 16, 8))  # [B, P, C]


def query_inputs():
  """A padded query prefix: left, none and right padding in one batch."""
  query = jax.random.normal(jax.random.key(2), (3, 5, WIDTH))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], bool)
  return query, mask


def assert_same_kept_slots(one_pass, chunked, budget):
  """Same lengths and mask as eos_mask on the full output, and the same tokens / EOS on every kept slot."""
  (tokens, eos_prob), (tokens_c, eos_prob_c) = one_pass, chunked
  mask, lengths = eos.eos_mask(eos_prob, budget, THRESHOLD)
  mask_c, lengths_c = eos.eos_mask(eos_prob_c, budget, THRESHOLD)
  np.testing.assert_array_equal(lengths_c, lengths)
  np.testing.assert_array_equal(mask_c, mask)
  for i, length in enumerate(np.asarray(lengths)):
    np.testing.assert_allclose(tokens_c[i, :length], tokens[i, :length], atol=1e-5)
    np.testing.assert_allclose(eos_prob_c[i, :length], eos_prob[i, :length], atol=1e-5)
  return np.asarray(lengths)


@pytest.mark.parametrize(
    "budget, chunk_size",
    [  # 7 and 32 do not divide n = 20
        (None, 7),
        (None, 32),
        (5, 4),
        ([3, 0, 20], 5),
        ([3, 0, 20], 7),
    ],
)
def test_chunked_equals_one_pass(generator, features, chunk_size, budget):
  budget = None if budget is None else jnp.asarray(budget)
  with jax.default_matmul_precision("highest"):
    chunked = generator.generate(
        features, token_budget=budget, threshold=THRESHOLD, chunk_size=chunk_size
    )
    lengths = assert_same_kept_slots(generator(features), chunked, budget)
  if budget is None:
    assert (
        len(set(lengths)) > 1 and lengths.max() < N
    ), lengths  # the test covers varied early stops


@pytest.mark.parametrize("chunk_size", [3])  # does not divide n = 20
def test_chunked_equals_one_pass_with_a_padded_query(generator, features, chunk_size):
  query, query_mask = query_inputs()
  budget = jnp.asarray([0, 6, 0])
  with jax.default_matmul_precision("highest"):
    chunked = generator.generate(
        features, query, query_mask, token_budget=budget, threshold=THRESHOLD, chunk_size=chunk_size
    )
    assert_same_kept_slots(generator(features, query, query_mask), chunked, budget)


def test_full_length_chunks_match_every_slot(generator, features):
  """With every image forced to n, every slot is computed: the whole output matches."""
  with jax.default_matmul_precision("highest"):
    tokens, eos_prob = generator(features)
    tokens_c, eos_prob_c = generator.generate(features, token_budget=N, chunk_size=6)
  np.testing.assert_allclose(tokens_c, tokens, atol=1e-5)
  np.testing.assert_allclose(eos_prob_c, eos_prob, atol=1e-5)


@pytest.mark.parametrize("budget, computed", [(1, 4), ([2, 5, 1], 8)])
def test_loop_stops_once_every_image_has_its_length(generator, features, budget, computed):
  """Never-computed slots hold tokens 0 and eos_prob 1: with chunks of 4, budget 1 runs one chunk only."""
  tokens, eos_prob = generator.generate(
      features, token_budget=jnp.asarray(budget), threshold=THRESHOLD, chunk_size=4
  )
  assert np.all(np.asarray(eos_prob[:, computed:]) == 1.0) and np.all(
      np.asarray(tokens[:, computed:]) == 0
  )
  assert np.all(np.asarray(eos_prob[:, :computed]) < 1.0) and np.all(
      np.any(tokens[:, :computed] != 0, -1)
  )


def test_predicted_lengths_stop_after_the_longest(generator, features):
  _, full_eos = generator(features)
  _, lengths = eos.eos_mask(full_eos, None, THRESHOLD)
  _, eos_prob = generator.generate(features, threshold=THRESHOLD, chunk_size=4)
  computed = (
      -(-int(lengths.max()) // 4) * 4
  )  # the chunk holding the longest image's EOS is the last one
  assert computed < N
  assert np.all(np.asarray(eos_prob[:, computed:]) == 1.0) and np.all(
      np.asarray(eos_prob[:, :computed]) < 1.0
  )


def test_no_recompile_for_new_budgets_or_lengths(generator, features, count_compiles):
  graphdef, state = nnx.split(generator)

  @jax.jit
  def generate(state, features, budget):
    return nnx.merge(graphdef, state).generate(
        features, token_budget=budget, threshold=THRESHOLD, chunk_size=4
    )

  generate(state, features, jnp.asarray([0, 0, 0]))
  with count_compiles() as c:
    for budget in ([1, 1, 1], [20, 3, 0], [7, 0, 12], [0, 0, 2]):
      jax.block_until_ready(generate(state, features, jnp.asarray(budget)))
  assert c.count == 0, f"{c.count} recompilations for new budgets"


@pytest.fixture(scope="module")
def dove():
  # Tokens narrower than the generator.
  return DOVE(**TINY, eos_bias_init=0.0, token_dim=8, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1.0, maxval=1.0)


def test_dove_encode_chunked_equals_one_pass(dove, images):
  graphdef, state = nnx.split(dove)
  budget = jnp.asarray([5, 0])
  encode = jax.jit(
      lambda state, chunk_size: nnx.merge(graphdef, state).encode(
          images, budget, chunk_size=chunk_size
      ),
      static_argnums=1,
  )
  with jax.default_matmul_precision("highest"):
    full, chunked = encode(state, 0), encode(state, 4)
  assert full.tokens.shape == chunked.tokens.shape == (2, 16, 8)  # token_dim
  np.testing.assert_array_equal(chunked.lengths, full.lengths)
  np.testing.assert_array_equal(chunked.mask, full.mask)
  np.testing.assert_allclose(
      chunked.tokens, full.tokens, atol=1e-5
  )  # zero after each length in both


def test_bucket_sizes():
  assert buckets.bucket_sizes(256) == (16, 32, 64, 128, 256)
  assert buckets.bucket_sizes(20, smallest=4) == (4, 8, 16, 20)
  assert buckets.bucket_sizes(16) == (16,)


def test_bucketed_decode_equals_full_decode_in_one_compilation(dove, images, count_compiles):
  graphdef, state = nnx.split(dove)
  sizes = (2, 4, 8, 16)

  @jax.jit
  def encode_decode(state, budget):
    model = nnx.merge(graphdef, state)
    tokens = model.encode(images, budget)
    return model.decode(tokens), model.decode(tokens, sizes)

  with jax.default_matmul_precision("highest"):
    encode_decode(state, jnp.asarray([1, 1]))
    with count_compiles() as c:
      for budget in (
          [1, 2],
          [3, 1],
          [8, 5],
          [9, 16],
          [0, 0],
      ):  # every bucket, and the predicted lengths
        full, bucketed = encode_decode(state, jnp.asarray(budget))
        np.testing.assert_allclose(bucketed, full, atol=1e-5)
  assert c.count == 0, f"{c.count} recompilations for new lengths"


def test_decoder_on_a_cut_sequence_matches_the_whole(dove):
  """The property bucketing rests on, per bucket: cut to m >= the longest length, with the rotary positions
  laid out for all n slots, the token decoder gives the same latents."""
  tokens = jax.random.normal(jax.random.key(3), (2, 16, 8))  # [B, n, token_dim]
  mask = eos.length_mask(jnp.asarray([3, 5]), 16)  # [B, n]
  graphdef, state = nnx.split(dove.token_decoder)

  @jax.jit
  def decode_three_ways(state):
    decoder = nnx.merge(graphdef, state)
    return (
        decoder(tokens, mask),
        decoder(tokens[:, :6], mask[:, :6], num_slots=16),
        decoder(tokens[:, :6], mask[:, :6]),
    )  # the last with the latent queries at the wrong positions

  with jax.default_matmul_precision("highest"):
    full, cut, wrong = decode_three_ways(state)
  np.testing.assert_allclose(cut, full, atol=1e-5)
  assert np.abs(np.asarray(wrong) - np.asarray(full)).max() > 1e-3
