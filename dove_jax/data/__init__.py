"""Input data: the built-in DoveShapes TFDS data set, image sources, and the grain input pipeline."""
