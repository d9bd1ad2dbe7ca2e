"""Sinusoidal position encodings: the output slots' t_1..t_n, and the 2-D latent grid's positions."""

from __future__ import annotations

import numpy as np


def sinusoid(positions: np.ndarray, dim: int, max_period: float = 10_000.0) -> np.ndarray:
  """[N] positions -> [N, dim] encodings (sines then cosines, zero-padded to an odd `dim`)."""
  freqs = np.exp(-np.log(max_period) * np.arange(dim // 2) / max(dim // 2, 1))  # [dim/2]
  angles = np.asarray(positions, np.float64)[:, None] * freqs[None, :]
  enc = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  return np.pad(enc, ((0, 0), (0, dim % 2))).astype(np.float32)


def timestep_encoding(num_slots: int, dim: int) -> np.ndarray:
  """t_1..t_n, one per output slot: [n, dim]."""
  return sinusoid(np.arange(1, num_slots + 1), dim)


def grid_encoding(grid_size: int, dim: int) -> np.ndarray:
  """Row-major positions of a grid_size x grid_size grid: [grid_size^2, dim], half the channels encode the
  row and half the column (as MAE's 2-D sin-cos embedding). GPT-NeoX has only rotary positions along the
  sequence, which barely tell two far-apart grid cells apart; this tells every cell its place in 2-D.
  """
  rows, cols = np.divmod(np.arange(grid_size * grid_size), grid_size)
  half = dim // 2
  return np.concatenate([sinusoid(rows, half), sinusoid(cols, dim - half)], axis=1)
