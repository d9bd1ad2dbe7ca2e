"""Q-DOVE: DOVE with a text query, so the tokens describe the region the query asks about (DOVE.md, Q-DOVE).

  python train.py --config configs/qdove.py:tiny --workdir runs/qdove_tiny     built-in data, 64 px, CPU
  python train.py --config configs/qdove.py --workdir runs/qdove \\
      --config.init.checkpoint=runs/dove --config.init.pythia=/models/pythia-70m \\
      --config.data.folder=/data/visual_genome                                the paper's recipe

Everything of configs/dove.py (the same presets), plus the `query` section and a query vocabulary. The
paper starts from a trained DOVE (init.checkpoint: its workdir) and trains 5 more epochs on Visual Genome
region descriptions; its query tokens start from Pythia's own embedding, with Pythia's tokenizer.
"""

import ml_collections

from configs import dove


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config = dove.get_config(preset)
  with config.unlocked():
    config.query = ml_collections.ConfigDict()
    # "bytes" (UTF-8 bytes, offline, no files) or "gpt-neox" (a tokenizer.json, e.g. Pythia's).
    config.query.tokenizer = "gpt-neox"
    config.query.tokenizer_path = ""  # tokenizer.json or its folder; "" = the init.pythia folder
    config.query.max_length = 32  # query tokens per example; longer texts are cut
    config.query.max_boxes = 4  # boxes per query (regions with the same text)
    config.query.drop_rate = (
        0.5  # the fraction of queries dropped in training (the image is the box)
    )
    config.query.outside_weight = 1e-10  # lambda_o: the MSE outside every box
    config.query.crop_size = 256  # each box is resampled to this size for L_rec (MSE, LPIPS, GAN)
    # The EOS threshold: "shared", the paper's mean L_rec of every image's relevant region; or "region": an
    # image with its query stops once its boxes are as good as images without their query get them.
    config.query.threshold = "shared"
    config.model.query_vocab_size = (
        50304  # Pythia-70M's embedding rows (its tokenizer has 50277 tokens)
    )

    config.data.source = "visual_genome"
    config.data.folder = (
        ""  # the Visual Genome root: region_descriptions.json, image_data.json, VG_100K*/
    )
    config.data.eval_size = 1000  # images held out from the end of the set for evaluation
    config.train.num_epochs = 5

    if preset == "tiny":
      config.query.tokenizer = "bytes"
      config.query.max_length = 40  # "the purple checkered pentagon" is 29 bytes
      config.query.max_boxes = 2
      config.query.crop_size = 64
      config.model.query_vocab_size = 257  # the byte tokenizer
      config.data.source = "builtin"
      # As the paper, from a trained DOVE: the shipped tiny one, whose lengths already follow the images, so
      # lambda_eos is at its end value from the first step.
      config.init.weights = str(dove.SHIPPED / "tiny" / "dove.safetensors")
      config.loss.eos_weight_kind = "constant"
      config.optim.learning_rate = (
          1e-3  # a fine-tune: the DOVE's own rate would first undo some of it
      )
      # The built-in data's boxes hold its textured shapes, harder than the flat backgrounds around them: with
      # one shared threshold a query lengthens the sequence (docs/fidelity.md).
      config.query.threshold = "region"
      # lambda_eos is at 0.1 from the first step: at the EOS head's full rate the lengths swing (a mean of 2 to
      # 40 from one 50 steps to the next) and those without a query drift short; a fifth of it damps that.
      config.optim.eos_head_learning_rate = 0.2
      config.train.num_steps = 1500
  config.lock()
  return config
