"""Query tokenizers for Q-DOVE: text queries -> fixed-shape int32 ids and a bool mask.

Q-DOVE places an encoded text query H_q in the token generator's input (DOVE.md, Q-DOVE section). The
generator takes the query as ids [B, Q] with a mask [B, Q] (False = padding), so every batch has the same
shape whatever the query lengths:

  tokenizer = load_tokenizer("bytes")                 # or load_tokenizer("gpt-neox", "/models/pythia-70m")
  ids, mask = tokenizer.encode_batch(["the red striped square", ""], max_length=32)
  # ids int32 [2, 32], right-padded with tokenizer.pad_id; mask bool [2, 32], True on real tokens

An empty string gives an all-False mask row: the empty query, which means the whole image is the relevant
box (training drops half of the queries this way).

Two tokenizers:
  ByteTokenizer: UTF-8 bytes, needs no files: the offline default, and what tests use.
  HFTokenizer: a local tokenizer.json read with the `tokenizers` library, e.g. the GPT-NeoX BPE in a Pythia
    checkpoint folder, whose ids match the Pythia token embedding that the query embedding starts from.

Nothing here downloads, and `tokenizers` is imported only when an HFTokenizer is loaded, so `import
dove_jax` stays light.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Pythia's (GPT-NeoX's) padding token; its id is 1 there.
PADDING_TOKEN = "<|padding|>"
TOKENIZER_KINDS = ("bytes", "gpt-neox", "huggingface")


class QueryTokenizer(abc.ABC):
  """text <-> ids, plus the fixed-shape batching the model needs (written once, here)."""

  pad_id: int
  vocab_size: int

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """The ids of `text`, without special tokens."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`, padding skipped."""

  def encode_batch(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (ids int32 [B, max_length], mask bool [B, max_length]).

    Right-padded with `pad_id` and truncated to `max_length` tokens; the mask is True on real tokens, so an
    empty string gives an all-False row (the empty query). To read a row back: decode(ids[i][mask[i]]).
    """
    if isinstance(texts, str):  # iterating a str would make one query per character
      raise TypeError(
          f"encode_batch takes a list of queries, got the single string {texts!r}; wrap it "
          "in a list"
      )
    if max_length < 1:
      raise ValueError(f"max_length must be at least 1, got {max_length}")
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), bool)
    for row, text in enumerate(texts):
      tokens = self.encode(text)[:max_length]
      ids[row, : len(tokens)] = tokens
      mask[row, : len(tokens)] = True
    return ids, mask


class ByteTokenizer(QueryTokenizer):
  """UTF-8 bytes as ids: pad 0, byte b -> b + 1, so 257 ids. Needs no vocabulary file."""

  pad_id = 0
  vocab_size = 257

  def encode(self, text: str) -> list[int]:
    return [byte + 1 for byte in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids if i != self.pad_id]
    bad = [i for i in ids if not 0 < i < self.vocab_size]
    if bad:
      raise ValueError(f"byte-tokenizer ids are 0 (padding) to {self.vocab_size - 1}, got {bad[0]}")
    # A truncated query can end inside a multi-byte character: replace it rather than fail.
    return bytes(i - 1 for i in ids).decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class HFTokenizer(QueryTokenizer):
  """A `tokenizers.Tokenizer` (a tokenizer.json, e.g. Pythia's GPT-NeoX BPE).

  `pad_id` is the id of "<|padding|>" where the vocabulary has one (Pythia: 1), else 0. Which id pads does
  not matter to the model: the mask keeps padded slots out of attention. It does matter to `decode`, which
  skips special tokens (so "<|padding|>" too), but not a fallback pad id 0 that is an ordinary token:
  decode with the mask, decode(ids[i][mask[i]]).
  """

  def __init__(self, tokenizer, path: str = ""):
    """`tokenizer`: a `tokenizers.Tokenizer`; `path`: where it was read from, for repr and messages."""
    self._tokenizer = tokenizer
    self.path = path
    self.vocab_size = tokenizer.get_vocab_size()
    pad_id = tokenizer.token_to_id(PADDING_TOKEN)
    self.pad_id = 0 if pad_id is None else pad_id

  @classmethod
  def from_path(cls, path: str | Path) -> HFTokenizer:
    """Reads `path`: a tokenizer.json file, or a folder holding one (e.g. a Pythia checkpoint folder)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
      raise FileNotFoundError(
          f"no tokenizer file at {file}, and nothing is downloaded: copy the model's "
          "tokenizer.json there (Pythia checkpoint folders have one) or point at a "
          "tokenizer.json or a folder holding one"
      )
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel  # only when one is used

    try:
      tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # pylint: disable=broad-except  # `tokenizers` raises a plain Exception
      raise ValueError(
          f"{file} is not a tokenizer.json that the `tokenizers` library reads: {e}"
      ) from e
    return cls(tokenizer, str(file))

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id})"


def load_tokenizer(kind: str, path: str = "") -> QueryTokenizer:
  """The tokenizer the config names: `kind` is query.tokenizer, `path` is query.tokenizer_path.

  "bytes": ByteTokenizer (`path` unused). "gpt-neox" or "huggingface": HFTokenizer.from_path(path), where
  `path` is a tokenizer.json or a folder holding one.
  """
  if kind == "bytes":
    return ByteTokenizer()
  if kind in ("gpt-neox", "huggingface"):
    if not path:
      raise ValueError(
          f"query.tokenizer={kind!r} reads a local tokenizer.json, but query.tokenizer_path "
          "is empty: set it to that file or to a folder holding it (e.g. a Pythia checkpoint "
          "folder), or use query.tokenizer='bytes'"
      )
    return HFTokenizer.from_path(path)
  raise ValueError(f"unknown query.tokenizer {kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}")
