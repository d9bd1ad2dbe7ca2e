"""DoveShapes: a procedural TFDS data set made on this machine, for training and probing DOVE offline.

A variable-length tokenizer needs images whose complexity varies a lot, so a scene is a flat or smoothly
graded background with 0 to 12 overlapping objects (nine shapes, five textures, twelve named colours); the
object count is a half-uniform, half-geometric mix, so about a fifth of the images are empty and some are very
busy. Every example is drawn with NumPy from `np.random.default_rng([SEED, split_id, index])`, so the same
files come out on every machine, and nothing is downloaded.

Features of one example:
  image: uint8 [S, S, 3], stored as PNG (encoded with Pillow, so writing and reading need no TensorFlow).
  label: ClassLabel, LABELS: 'empty' when no object is visible, else the shape of the object that covers the
    most pixels in the final image (occlusion counted): 10 classes for linear probing.
  boxes: float32 [num_objects, 4], (ymin, xmin, ymax, xmax) in [0, 1], of each object's own pixels inside
    the image (occluded parts included), in drawing order (back to front).
  descriptions: one text per box, e.g. "the red striped square" ("the red square" when plain); a data
    source returns them as a list of bytes.
  complexity: float32, the generator's figure: 0.5 for a graded background, plus 1 per object (its outline),
    plus for each object its visible fraction of the image times its texture's detail (about the number of
    pattern cycles across the image width: striped and dotted `cycles`, checkered `2 * cycles`, noisy 24,
    plain 0). It grows with the object count and with the area of fine texture.

  builder = DoveShapes(config="64", data_dir=...)   # or load_builtin(64, data_dir) for both splits
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

SEED = 2506_03643  # the paper's arXiv number; fixed so that every machine generates the same files
SPLIT_IDS = {"train": 0, "validation": 1}
MAX_OBJECTS = 12

SHAPES = (
    "square",
    "rectangle",
    "circle",
    "ellipse",
    "triangle",
    "pentagon",
    "hexagon",
    "ring",
    "cross",
)
LABELS = ("empty",) + SHAPES
TEXTURES = ("plain", "striped", "checkered", "dotted", "noisy")
COLOURS = {
    "red": (215, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 210),
    "purple": (130, 50, 180),
    "pink": (240, 130, 180),
    "brown": (130, 80, 40),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
NOISE_DETAIL = (
    24.0  # texture detail of per-pixel noise, on the scale of pattern cycles per image width
)


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One object, in units of the image size, so that one scene renders at any resolution."""

  shape: str
  texture: str
  colour: str
  rgb: tuple[int, int, int]  # the named colour, slightly jittered
  centre: tuple[float, float]  # (y, x) in [0, 1]
  radius: float  # half-extent before rotation, as a fraction of the image size
  aspect: float  # length / width of rectangles and ellipses (1 for the other shapes)
  angle: float  # rotation in radians
  cycles: float  # texture repeats per image width
  noise_seed: int

  @property
  def description(self) -> str:
    texture = "" if self.texture == "plain" else f"{self.texture} "
    return f"the {self.colour} {texture}{self.shape}"

  @property
  def detail(self) -> float:
    """How much fine structure the texture adds, in pattern cycles per image width (see the module doc)."""
    return {
        "plain": 0.0,
        "striped": self.cycles,
        "dotted": self.cycles,
        "checkered": 2 * self.cycles,
        "noisy": NOISE_DETAIL,
    }[self.texture]


@dataclasses.dataclass(frozen=True)
class Scene:
  background: tuple[
      tuple[int, int, int], tuple[int, int, int]
  ]  # colours at the two ends of the gradient
  gradient_angle: float
  objects: tuple[SceneObject, ...]

  @property
  def graded(self) -> bool:
    return self.background[0] != self.background[1]


# ---------------------------------------------------------------------------------------------------------
# Sampling: a resolution-independent scene from a seeded generator.


def num_objects(rng: np.random.Generator) -> int:
  """Half uniform over 0..12, half geometric from 0 (mean ~1.9): trivial and busy images both common."""
  if rng.random() < 0.5:
    return int(rng.integers(0, MAX_OBJECTS + 1))
  return int(min(rng.geometric(0.35) - 1, MAX_OBJECTS))


def random_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
  return tuple(int(c) for c in rng.integers(0, 256, size=3))


def sample_object(rng: np.random.Generator) -> SceneObject:
  shape = SHAPES[rng.integers(len(SHAPES))]
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  jitter = rng.integers(-12, 13, size=3)
  return SceneObject(
      shape=shape,
      texture=TEXTURES[rng.integers(len(TEXTURES))],
      colour=colour,
      rgb=tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255)),
      centre=tuple(float(c) for c in rng.uniform(0.05, 0.95, size=2)),
      radius=float(np.exp(rng.uniform(np.log(0.07), np.log(0.38)))),  # log-uniform: small and large
      aspect=float(rng.uniform(1.6, 2.8)) if shape in ("rectangle", "ellipse") else 1.0,
      angle=float(rng.uniform(0, 2 * np.pi)),
      cycles=float(rng.uniform(3, 10)),
      noise_seed=int(rng.integers(2**31)),
  )


def sample_scene(rng: np.random.Generator) -> Scene:
  start = random_rgb(rng)
  end = random_rgb(rng) if rng.random() < 0.5 else start  # half flat, half graded
  gradient_angle = float(rng.uniform(0, 2 * np.pi))
  return Scene(
      (start, end), gradient_angle, tuple(sample_object(rng) for _ in range(num_objects(rng)))
  )


# ---------------------------------------------------------------------------------------------------------
# Rendering: shapes are signed distances (pixels, negative inside) in the object's rotated frame (u, v), so
# edges are antialiased by clip(0.5 - distance) and textures turn with the object.


def _box(u, v, half_u, half_v):
  return np.maximum(np.abs(u) - half_u, np.abs(v) - half_v)


def _regular_polygon(u, v, radius, sides):
  """Distance to the polygon's furthest edge line: max over edge normals of the projection minus apothem."""
  normals = 2 * np.pi * np.arange(sides) / sides
  projections = u[..., None] * np.cos(normals) + v[..., None] * np.sin(normals)  # [h, w, sides]
  return projections.max(-1) - radius * math.cos(math.pi / sides)


def signed_distance(
    shape: str, u: np.ndarray, v: np.ndarray, radius: float, aspect: float
) -> np.ndarray:
  if shape == "square":
    return _box(u, v, radius, radius)
  if shape == "rectangle":
    return _box(u, v, radius, radius / aspect)
  if shape == "circle":
    return np.hypot(u, v) - radius
  if (
      shape == "ellipse"
  ):  # scaled implicit distance: exact on the short axis, conservative elsewhere
    return (np.hypot(u / radius, v * aspect / radius) - 1) * radius / aspect
  if shape in ("triangle", "pentagon", "hexagon"):
    return _regular_polygon(u, v, radius, {"triangle": 3, "pentagon": 5, "hexagon": 6}[shape])
  if shape == "ring":  # outer radius `radius`, inner 0.6 * radius
    return np.abs(np.hypot(u, v) - 0.8 * radius) - 0.2 * radius
  if shape == "cross":  # two bars with half-width 0.3 * radius
    return np.minimum(_box(u, v, radius, 0.3 * radius), _box(u, v, 0.3 * radius, radius))
  raise ValueError(f"unknown shape {shape!r}")


def texture_pattern(obj: SceneObject, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
  """Where the texture's second shade shows: [h, w] float32 in [0, 1] (0 = the object's own colour)."""
  half = period / 2
  if obj.texture == "plain":
    return np.zeros(u.shape, np.float32)
  if obj.texture == "striped":
    return (np.floor(u / half) % 2).astype(np.float32)
  if obj.texture == "checkered":
    return ((np.floor(u / half) + np.floor(v / half)) % 2).astype(np.float32)
  if obj.texture == "dotted":
    return (np.hypot(u % period - half, v % period - half) <= period / 4).astype(np.float32)
  if obj.texture == "noisy":
    return np.random.default_rng(obj.noise_seed).random(u.shape, np.float32)
  raise ValueError(f"unknown texture {obj.texture!r}")


def second_shade(rgb: tuple[int, int, int]) -> np.ndarray:
  """The texture's other colour: a darker shade of a light colour, a lighter shade of a dark one."""
  rgb = np.asarray(rgb, np.float32)
  return rgb * 0.45 if rgb @ [0.299, 0.587, 0.114] > 110 else rgb + (255 - rgb) * 0.55


def render_background(scene: Scene, size: int) -> np.ndarray:
  """A linear ramp between the two background colours along `gradient_angle`: [S, S, 3] float32."""
  coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  ramp = (
      np.cos(scene.gradient_angle) * coords[None, :]
      + np.sin(scene.gradient_angle) * coords[:, None]
  )
  ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)  # [S, S] in [0, 1]
  start, end = (np.asarray(c, np.float32) for c in scene.background)
  return start + ramp[..., None] * (end - start)


def render(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Draws the scene back to front.

  Returns:
    image: [S, S, 3] uint8.
    boxes: [n, 4] float32 (ymin, xmin, ymax, xmax) in [0, 1] of each object's own pixels.
    visible: [n] float32, the fraction of the image where each object is on top.
  """
  canvas = render_background(scene, size)  # [S, S, 3]
  on_top = np.full(
      (size, size), -1, np.int32
  )  # index of the front object per pixel, -1 = background
  boxes = np.zeros((len(scene.objects), 4), np.float32)
  for index, obj in enumerate(scene.objects):
    # Only the window that can hold the object is computed: sqrt(2) * radius bounds every shape's extent.
    cy, cx = obj.centre[0] * size, obj.centre[1] * size
    reach = math.sqrt(2) * obj.radius * size + 1
    y0, y1 = max(0, int(cy - reach)), min(size, int(math.ceil(cy + reach)))
    x0, x1 = max(0, int(cx - reach)), min(size, int(math.ceil(cx + reach)))
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]  # [h, 1]
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]  # [1, w]
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    u, v = dx * cos + dy * sin, dy * cos - dx * sin  # [h, w] each
    distance = signed_distance(obj.shape, u, v, obj.radius * size, obj.aspect)
    alpha = np.clip(0.5 - distance, 0, 1)[..., None]  # [h, w, 1]
    shade = texture_pattern(obj, u, v, size / obj.cycles)[..., None]  # [h, w, 1]
    base = np.asarray(obj.rgb, np.float32)
    colour = base + shade * (second_shade(obj.rgb) - base)  # [h, w, 3]
    window = canvas[y0:y1, x0:x1]
    window += alpha * (colour - window)
    inside = distance <= 0  # [h, w]
    on_top[y0:y1, x0:x1][inside] = index
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    boxes[index] = [y0 + rows[0], x0 + cols[0], y0 + rows[-1] + 1, x0 + cols[-1] + 1]
  visible = np.bincount(on_top[on_top >= 0], minlength=len(scene.objects)) / size**2
  image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
  return image, boxes / size, visible.astype(np.float32)


def scene_label(scene: Scene, visible: np.ndarray) -> int:
  if not scene.objects or visible.max() == 0:
    return LABELS.index("empty")
  return LABELS.index(scene.objects[int(np.argmax(visible))].shape)


def scene_complexity(scene: Scene, visible: np.ndarray) -> float:
  detail = sum(float(area) * obj.detail for obj, area in zip(scene.objects, visible))
  return 0.5 * scene.graded + len(scene.objects) + detail


def generate_example(size: int, split: str, index: int) -> dict:
  """Example `index` of `split` at `size` pixels, with the image as a uint8 array."""
  scene = sample_scene(np.random.default_rng([SEED, SPLIT_IDS[split], index]))
  image, boxes, visible = render(scene, size)
  return {
      "image": image,
      "label": scene_label(scene, visible),
      "boxes": boxes,
      "descriptions": [obj.description for obj in scene.objects],
      "complexity": np.float32(scene_complexity(scene, visible)),
  }


def encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# The TFDS builder.


@dataclasses.dataclass(eq=False)
class DoveShapesConfig(tfds.core.BuilderConfig):
  """Image side in pixels and split sizes (64 px: ~18 s to generate on 2 cores, 256 px: ~60 s)."""

  image_size: int = 64
  num_train: int = 8192
  num_validation: int = 512


class DoveShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural scenes from empty to busy (see the module doc); generated locally, nothing to download."""

  VERSION = tfds.core.Version("1.0.0")
  # Nothing to download, so no URL checksums to look up. Declaring it also skips TFDS 4.9's search for a
  # checksums file beside this module, which imports the `importlib_resources` backport that TFDS does not
  # install on Python >= 3.9.
  url_infos = None
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      DoveShapesConfig(
          name="64", description="64 x 64 pixels", image_size=64, num_train=8192, num_validation=512
      ),
      DoveShapesConfig(
          name="256",
          description="256 x 256 pixels",
          image_size=256,
          num_train=4096,
          num_validation=512,
      ),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(
                    names=LABELS, doc="'empty' or the shape covering the most pixels"
                ),
                "boxes": tfds.features.Tensor(
                    shape=(None, 4),
                    dtype=np.float32,
                    doc="(ymin, xmin, ymax, xmax) in [0, 1], back to front",
                ),
                "descriptions": tfds.features.Sequence(tfds.features.Text(), doc="one per box"),
                "complexity": tfds.features.Scalar(
                    dtype=np.float32, doc="the generator's figure, see the doc"
                ),
            }
        ),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in SPLIT_IDS}

  def _generate_examples(self, split: str):
    config = self.builder_config
    num_examples = {"train": config.num_train, "validation": config.num_validation}[split]
    for index in range(num_examples):
      example = generate_example(config.image_size, split, index)
      yield index, {**example, "image": encode_png(example["image"])}


def load_builtin(size: int, data_dir: str):
  """The train and validation `tfds.data_source`s of `dove_shapes/{size}`, generated into `data_dir` the
  first time (about 20 s for 64 px) and reused afterwards. Never downloads."""
  builder = DoveShapes(config=str(size), data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder.as_data_source(split="train"), builder.as_data_source(split="validation")
