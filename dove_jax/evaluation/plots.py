"""The evaluation's figures, one function each, from plain NumPy arrays and dicts to a PNG.

Matplotlib is imported inside each function, with the file-only Agg backend, so that `import dove_jax`
stays light and no display is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PREDICTED = "predicted"  # the key of the figures at the model's own lengths (also run.py's)
NO_QUERY = "no_query"  # Q-DOVE at its own lengths with the query left out
VQGAN = "vqgan"  # the VQ-GAN alone (encoder, codebook, decoder): the ceiling of DOVE's quality


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot

  return pyplot


def _save(figure, path: str | Path) -> None:
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  _pyplot().close(figure)


def _column_title(key: str) -> str:
  return {PREDICTED: "predicted length", NO_QUERY: "no query", VQGAN: "VQ-GAN alone"}.get(
      key, f"budget {key}"
  )


def reconstructions(
    inputs: np.ndarray,
    images: dict[str, np.ndarray],
    lengths: dict[str, np.ndarray],
    psnr: dict[str, np.ndarray],
    path: str | Path,
) -> None:
  """A row per input image: the input, then its reconstruction for each key of `images` (PREDICTED or a
  budget, or VQGAN), titled with its length (where `lengths` has the key) and PSNR. inputs [N, H, W, 3] and images[key] [N, H, W, 3] are in
  [-1, 1]; lengths[key] and psnr[key] are [N]."""
  plt = _pyplot()
  rows, columns = len(inputs), 1 + len(images)
  figure, axes = plt.subplots(
      rows, columns, figsize=(1.8 * columns, 1.9 * rows + 0.3), squeeze=False
  )
  for row in range(rows):
    cells = [(inputs[row], "input")]
    cells += [
        (
            images[key][row],
            f"{lengths[key][row]} tokens, {psnr[key][row]:.1f} dB"
            if key in lengths
            else f"{psnr[key][row]:.1f} dB",
        )
        for key in images
    ]
    for column, (image, title) in enumerate(cells):
      axis = axes[row, column]
      axis.imshow(np.clip((image + 1) / 2, 0, 1))
      axis.set_xticks([])
      axis.set_yticks([])
      axis.set_title(title, fontsize=8)
  for column, key in enumerate(images, start=1):
    axes[0, column].set_title(f"{_column_title(key)}\n{axes[0, column].get_title()}", fontsize=8)
  _save(figure, path)


def length_histogram(
    lengths: np.ndarray, max_tokens: int, path: str | Path, label: str = "predicted length"
) -> None:
  """Counts of the lengths [N] (`label`: which ones), one bar per length 1..max_tokens."""
  plt = _pyplot()
  counts = np.bincount(lengths, minlength=max_tokens + 1)[1:]
  figure, axis = plt.subplots(figsize=(7, 4))
  axis.bar(np.arange(1, max_tokens + 1), counts, width=1.0)
  axis.set_xlim(0.5, max_tokens + 0.5)
  axis.set_xlabel(f"{label} (tokens)")
  axis.set_ylabel("images")
  axis.set_title(
      f"{label}s of {len(lengths)} images: mean {np.mean(lengths):.1f}, "
      f"std {np.std(lengths):.1f}"
  )
  _save(figure, path)


def complexity_vs_length(
    complexities: dict[str, np.ndarray],
    lengths: np.ndarray,
    spearman: dict[str, float | None],
    path: str | Path,
) -> None:
  """A scatter of predicted length [N] against each complexity measure [N], its Spearman rho in the title
  (None: undefined, a constant)."""
  plt = _pyplot()
  figure, axes = plt.subplots(
      1, len(complexities), figsize=(6 * len(complexities), 4.5), squeeze=False
  )
  for axis, (name, complexity) in zip(axes[0], complexities.items()):
    axis.scatter(complexity, lengths, s=8, alpha=0.5)
    if np.all(complexity > 0) and np.ptp(complexity) > 0:  # spans orders of magnitude
      axis.set_xscale("log")
    rho = spearman[name]
    axis.set_title(f"Spearman rho = {'undefined (a constant)' if rho is None else f'{rho:.3f}'}")
    axis.set_xlabel(name.replace("_", " "))
    axis.set_ylabel("predicted length (tokens)")
  _save(figure, path)


def quality_vs_budget(
    reconstruction: dict[str, dict], path: str | Path, ceiling: dict | None = None
) -> None:
  """PSNR, SSIM, LPIPS (and rFID where it is a number) against the token budget, from run.py's
  `reconstruction` figures (keys: PREDICTED and budgets as strings); the predicted lengths are a star at
  their mean length, and `ceiling` (the VQ-GAN alone's figures) a dashed line."""
  plt = _pyplot()
  budgets = [key for key in reconstruction if key not in (PREDICTED, NO_QUERY)]
  names = ["psnr", "ssim", "lpips"]
  if all(isinstance(figures["rfid"], float) for figures in reconstruction.values()):
    names.append("rfid")
  figure, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
  predicted = reconstruction[PREDICTED]
  for axis, name in zip(axes[0], names):
    axis.plot(
        [int(b) for b in budgets],
        [reconstruction[b][name] for b in budgets],
        "o-",
        label="forced budget",
    )
    axis.plot(
        [predicted["mean_length"]],
        [predicted[name]],
        "*",
        markersize=14,
        label="predicted lengths (mean)",
    )
    if ceiling is not None and isinstance(ceiling.get(name), float):
      axis.axhline(ceiling[name], linestyle="--", color="gray", label="VQ-GAN alone")
    axis.set_xlabel("tokens")
    axis.set_title({"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "rfid": "rFID"}[name])
    axis.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  _save(figure, path)


def query_examples(
    inputs: np.ndarray,
    texts: list[str],
    boxes: list[np.ndarray],
    reconstructions: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    path: str | Path,
) -> None:
  """Q-DOVE: a row per image: the input with its query's boxes drawn and the query as the title, then each
  reconstruction (key -> (images [N, H, W, 3], lengths [N], PSNR inside the boxes [N])) with the same boxes.
  inputs [N, H, W, 3] in [-1, 1]; boxes[i] [K_i, 4] (ymin, xmin, ymax, xmax) in [0, 1]; an empty query
  ('' and no box) is the whole image."""
  from matplotlib.patches import Rectangle

  plt = _pyplot()
  rows, columns = len(inputs), 1 + len(reconstructions)
  figure, axes = plt.subplots(
      rows, columns, figsize=(2.2 * columns, 2.3 * rows + 0.3), squeeze=False
  )
  for row in range(rows):
    height, width = inputs[row].shape[:2]
    cells = [(inputs[row], f'"{texts[row]}"' if texts[row] else "(no query)")]
    cells += [
        (images[row], f"{_column_title(key)}: {lengths[row]} tokens\n{psnr[row]:.1f} dB in box")
        for key, (images, lengths, psnr) in reconstructions.items()
    ]
    for column, (image, title) in enumerate(cells):
      axis = axes[row, column]
      axis.imshow(np.clip((image + 1) / 2, 0, 1))
      for ymin, xmin, ymax, xmax in boxes[row]:
        axis.add_patch(
            Rectangle(
                (xmin * width - 0.5, ymin * height - 0.5),
                (xmax - xmin) * width,
                (ymax - ymin) * height,
                fill=False,
                edgecolor="red",
                linewidth=1.5,
            )
        )
      axis.set_xticks([])
      axis.set_yticks([])
      axis.set_title(title, fontsize=7)
  _save(figure, path)
