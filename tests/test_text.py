"""Query tokenizers: byte and BPE round trips, the fixed-shape batches, and the config errors.

The BPE tokenizer is a tiny one trained here on a few sentences (GPT-NeoX-like: byte-level, with a
"<|padding|>" special token), so nothing is downloaded.
"""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dove_jax.text import ByteTokenizer, HFTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SENTENCES = [
    "the red striped square",
    "a blue circle on the left",
    "two green triangles",
    "the man riding a horse",
    "white clouds in the blue sky",
]


def save_bpe(folder: Path, special_tokens: list[str]) -> Tokenizer:
  """Trains a byte-level BPE on SENTENCES and saves it as folder/tokenizer.json."""
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300,
      special_tokens=special_tokens,
      show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tokenizer.train_from_iterator(SENTENCES, trainer)
  folder.mkdir(parents=True, exist_ok=True)
  tokenizer.save(str(folder / "tokenizer.json"))
  return tokenizer


@pytest.mark.parametrize("text", ["the red striped square", "Ünïcödé 猫"])
def test_byte_round_trip(text):
  tokenizer = ByteTokenizer()
  ids = tokenizer.encode(text)
  assert ids == [b + 1 for b in text.encode("utf-8")]
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids + [0, 0]) == text  # padding skipped
  assert (tokenizer.pad_id, tokenizer.vocab_size) == (0, 257)


def test_byte_encode_batch_pads_truncates_and_masks():
  ids, mask = ByteTokenizer().encode_batch(["ab", "", "abcdef", "é"], max_length=4)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (4, 4)
  a, b = ord("a") + 1, ord("b") + 1
  np.testing.assert_array_equal(
      ids, [[a, b, 0, 0], [0, 0, 0, 0], [a, b, b + 1, b + 2], [0xC3 + 1, 0xA9 + 1, 0, 0]]
  )
  np.testing.assert_array_equal(
      mask,
      [
          [True, True, False, False],
          [False, False, False, False],  # the empty query
          [True, True, True, True],
          [True, True, False, False],
      ],
  )


def test_byte_decode_of_a_truncated_character_replaces_it():
  ids, mask = ByteTokenizer().encode_batch(["a猫"], max_length=2)  # 猫 is 3 bytes: 1 survives
  assert ByteTokenizer().decode(ids[0][mask[0]]) == "a\ufffd"


def test_encode_batch_rejects_a_single_string_and_a_bad_length():
  with pytest.raises(TypeError, match="single string 'abc'; wrap it in a list"):
    ByteTokenizer().encode_batch("abc", max_length=4)
  with pytest.raises(ValueError, match="max_length must be at least 1, got 0"):
    ByteTokenizer().encode_batch(["abc"], max_length=0)


def test_byte_decode_rejects_ids_outside_the_vocabulary():
  with pytest.raises(ValueError, match="0 \\(padding\\) to 256, got 300"):
    ByteTokenizer().decode([300])


def test_hf_tokenizer_round_trip(tmp_path):
  trained = save_bpe(tmp_path / "pythia", ["<|endoftext|>", "<|padding|>"])
  tokenizer = load_tokenizer("gpt-neox", str(tmp_path / "pythia"))
  assert isinstance(tokenizer, HFTokenizer)
  assert tokenizer.pad_id == 1  # "<|padding|>", as in Pythia
  assert tokenizer.vocab_size == trained.get_vocab_size()
  for text in ["the red striped square", "Ünïcödé 猫"]:
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
  ids, mask = tokenizer.encode_batch(["the red striped square", ""], max_length=32)
  assert ids.shape == mask.shape == (2, 32)
  assert tokenizer.decode(ids[0]) == "the red striped square"  # "<|padding|>" is skipped
  assert not mask[1].any() and (ids[1] == 1).all()
  assert (
      mask[0].sum()
      == len(tokenizer.encode("the red striped square"))
      < len("the red striped square")
  )


def test_hf_tokenizer_adds_no_special_tokens(tmp_path):
  trained = save_bpe(tmp_path, ["<|endoftext|>", "<|padding|>"])
  trained.post_processor = processors.TemplateProcessing(
      single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
  )
  trained.save(str(tmp_path / "tokenizer.json"))
  tokenizer = HFTokenizer.from_path(tmp_path / "tokenizer.json")  # the file itself works too
  assert trained.encode("the sky").ids[0] == 0
  assert tokenizer.encode("the sky") == trained.encode("the sky", add_special_tokens=False).ids


def test_hf_tokenizer_without_a_padding_token_pads_with_0(tmp_path):
  save_bpe(tmp_path, ["<|endoftext|>"])
  tokenizer = load_tokenizer("huggingface", str(tmp_path))
  assert tokenizer.pad_id == 0
  ids, mask = tokenizer.encode_batch(["sky", ""], max_length=8)
  assert (ids[~mask] == 0).all()


def test_load_tokenizer_errors(tmp_path):
  assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
  with pytest.raises(FileNotFoundError) as missing:
    load_tokenizer("gpt-neox", str(tmp_path / "pythia-70m"))
  assert str(tmp_path / "pythia-70m") in str(missing.value)
  assert "nothing is downloaded" in str(missing.value)
  with pytest.raises(
      ValueError, match="query.tokenizer='gpt-neox' .* query.tokenizer_path is empty"
  ):
    load_tokenizer("gpt-neox")
  with pytest.raises(
      ValueError,
      match="unknown query.tokenizer 'gpt2'; choose one of bytes, gpt-neox, " "huggingface",
  ):
    load_tokenizer("gpt2")
  (tmp_path / "tokenizer.json").write_text("not json")
  with pytest.raises(
      ValueError, match="tokenizer.json is not a tokenizer.json that the `tokenizers`"
  ):
    load_tokenizer("gpt-neox", str(tmp_path))


def test_text_module_does_not_import_tokenizers_until_used():
  # Loads the file alone: importing the dove_jax package would cost seconds of JAX start-up.
  code = (
      "import importlib.util, sys; spec = importlib.util.spec_from_file_location('text', sys.argv[1]); "
      "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
      "print(sorted(m for m in ('tokenizers', 'tensorflow', 'torch') if m in sys.modules))"
  )
  result = subprocess.run(
      [sys.executable, "-c", code, str(REPO / "dove_jax" / "text.py")],
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


def test_tokenizers_pickle_for_grain_workers(tmp_path):
  save_bpe(tmp_path, ["<|endoftext|>", "<|padding|>"])
  for tokenizer in (load_tokenizer("bytes"), load_tokenizer("gpt-neox", str(tmp_path))):
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert (copy.pad_id, copy.vocab_size) == (tokenizer.pad_id, tokenizer.vocab_size)
    assert copy.encode("the red striped square") == tokenizer.encode("the red striped square")
