"""DOVE's encode and decode as serialized `jax.export` functions in a model folder, to run the model
with nothing but jax and safetensors installed (no dove_jax, no flax).

`export_portable(model, folder)` adds three files to a `save_pretrained` folder:

  encode.jax_exported  (params, images [b, H, W, 3] float32 in [-1, 1], token_budget [b] int32
                       [, query [b, Q] int32, query_mask [b, Q] bool])
                       -> tokens [b, n, D] float32, mask [b, n] bool, lengths [b] int32
  decode.jax_exported  (params, tokens [b, n, D], mask [b, n]) -> images [b, H, W, 3]
  portable.json        what each takes and returns, the platforms and jax version that wrote them

The batch size `b` is symbolic: one serialized function serves every batch size (each new size
compiles once, when first called). A budget of 0 keeps an image's predicted length. Only a Q-DOVE's
encode takes the query arguments, padded to a fixed length Q (portable.json's "query_length").

The parameters are the functions' first argument, the dict that `safetensors.numpy.load_file` reads
from model.safetensors (keyed by parameter path), not constants inside them: the folder holds the
weights once, and the functions stay small (tens of KB for the tiny model). `load_portable` binds
them; without dove_jax it reads:

  import jax, safetensors.numpy
  params = jax.device_put(safetensors.numpy.load_file("my_dove/model.safetensors"))
  encode = jax.export.deserialize(open("my_dove/encode.jax_exported", "rb").read())
  decode = jax.export.deserialize(open("my_dove/decode.jax_exported", "rb").read())
  tokens, mask, lengths = encode.call(params, images, budget)  # budget: [b] int32, 0 = predicted
  reconstruction = decode.call(params, tokens, mask)

This module imports only the standard library and jax at its top (safetensors in `load_portable`,
dove_jax and flax in `export_portable`), so a copy of this file is all `load_portable` needs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

ENCODE_FILE, DECODE_FILE = "encode.jax_exported", "decode.jax_exported"
PORTABLE_CONFIG = "portable.json"
# weights.MODEL_WEIGHTS, named again so that the loader needs no dove_jax.
WEIGHTS_FILE = "model.safetensors"
# jax.export lowers for every platform it names, no such device needed: the same files serve both.
PLATFORMS = ("cpu", "cuda")
QUERY_LENGTH = 32  # Q-DOVE's query length unless told (configs/qdove.py, query.max_length)

ENCODE_ARGUMENTS = ("params", "images", "token_budget", "query", "query_mask")
ENCODE_RESULTS = ("tokens", "mask", "lengths")
DECODE_ARGUMENTS, DECODE_RESULTS = ("params", "tokens", "mask"), ("images",)


def export_portable(
    model,
    directory: str | Path,
    *,
    query_length: int = QUERY_LENGTH,
    platforms: Sequence[str] = PLATFORMS,
) -> dict:
  """Writes `model`'s (a DOVE's) encode and decode as serialized `jax.export` functions with a
  symbolic batch size, and portable.json describing them, into `directory` (a `save_pretrained`
  folder, whose model.safetensors they take as their first argument). A Q-DOVE's encode takes
  queries of `query_length` token ids. Returns what portable.json holds."""
  # Imported here, not at the top, so that the loader runs without dove_jax and flax.
  from flax import nnx

  from dove_jax.models.dove import Tokens
  from dove_jax.tensor_io import param_path
  from dove_jax.weights import lists_to_tuples

  _, param_state, rest = nnx.split(model, nnx.Param, ...)
  # The same model computing with the kernels that suit each platform it is compiled for: the CPU's there,
  # plain XLA on a GPU (dove_jax/models/kernels.py, "portable").
  arguments = lists_to_tuples(json.loads(model.arguments))
  portable = nnx.eval_shape(lambda: type(model)(**arguments, kernels="portable", rngs=nnx.Rngs(0)))
  graphdef = nnx.split(portable, nnx.Param, ...)[0]

  def bind(params):
    """The model with the parameters of `params`, a dict keyed by parameter path (traced arrays)."""
    state = jax.tree_util.tree_map_with_path(lambda path, _: params[param_path(path)], param_state)
    return nnx.merge(graphdef, state, rest)

  def encode(params, images, token_budget, *query):
    tokens = bind(params).encode(images, token_budget, *query)
    return tokens.tokens, tokens.mask, tokens.lengths

  def decode(params, tokens, mask):
    # The decoder reads the tokens and the mask: the lengths follow from the mask, and the EOS
    # probabilities are not read at all.
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)  # [b]
    return bind(params).decode(Tokens(tokens, mask, lengths, jnp.zeros(mask.shape)))

  (b,) = jax.export.symbolic_shape("b")
  params = {
      param_path(path): jax.ShapeDtypeStruct(x.shape, x.dtype)
      for path, x in jax.tree_util.tree_flatten_with_path(param_state)[0]
  }
  images = jax.ShapeDtypeStruct((b, model.image_size, model.image_size, 3), jnp.float32)
  query = (
      (
          jax.ShapeDtypeStruct((b, query_length), jnp.int32),
          jax.ShapeDtypeStruct((b, query_length), jnp.bool_),
      )
      if model.query_embed is not None
      else ()
  )
  encoded = jax.export.export(jax.jit(encode), platforms=platforms)(
      params, images, jax.ShapeDtypeStruct((b,), jnp.int32), *query
  )
  tokens, mask, _ = encoded.out_avals  # [b, n, D], [b, n]: what decode reads
  decoded = jax.export.export(jax.jit(decode), platforms=platforms)(params, tokens, mask)
  exported = {ENCODE_FILE: encoded, DECODE_FILE: decoded}
  directory = Path(directory).expanduser()
  directory.mkdir(parents=True, exist_ok=True)
  for name, function in exported.items():
    (directory / name).write_bytes(function.serialize())
  config = {
      "weights": WEIGHTS_FILE,
      "params": "the weights file's tensors, a dict keyed by name (safetensors.numpy.load_file)",
      "encode": describe(encoded, ENCODE_ARGUMENTS, ENCODE_RESULTS),
      "decode": describe(decoded, DECODE_ARGUMENTS, DECODE_RESULTS),
      "token_budget": "0 keeps an image's predicted length; k >= 1 forces min(k, n) tokens",
      "query_length": query_length if query else None,
      "platforms": list(platforms),
      "jax_version": jax.__version__,
      "calling_convention_version": encoded.calling_convention_version,
  }
  (directory / PORTABLE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  return config


def describe(
    exported: jax.export.Exported, arguments: Sequence[str], results: Sequence[str]
) -> dict:
  """Each argument's and result's dtype and shape ('float32[b,16,32]', b the batch size), read from
  the exported function itself; the parameters (the first argument) are portable.json's "params"."""
  (inputs, _), outputs = jax.tree.unflatten(exported.in_tree, exported.in_avals), exported.out_avals
  return {
      "arguments": {name: str(x) for name, x in zip(arguments[1:], inputs[1:])},
      "results": {name: str(x) for name, x in zip(results, outputs)},
  }


def load_portable(directory: str | Path) -> tuple[Callable, Callable]:
  """The functions `export_portable` wrote into a model folder, its weights bound, needing only jax
  and safetensors: encode(images, token_budget[, query, query_mask]) -> (tokens, mask, lengths) and
  decode(tokens, mask) -> images (shapes and dtypes in the folder's portable.json)."""
  from safetensors.numpy import load_file

  directory = Path(directory).expanduser()
  params = jax.device_put(load_file(str(directory / WEIGHTS_FILE)))
  encode, decode = (
      jax.export.deserialize((directory / name).read_bytes()) for name in (ENCODE_FILE, DECODE_FILE)
  )
  return functools.partial(encode.call, params), functools.partial(decode.call, params)
