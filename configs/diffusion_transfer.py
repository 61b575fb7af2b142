"""A flow-matching U-Net pretrained on digits 0-4, adapted to digits 5-9 from a few images each.

A class-conditional flow (`ftlab.models.diffusion`: rectified-flow matching, a U-Net of
`nn.Conv` blocks at 8x8 and 4x4) is pretrained on every train image of scikit-learn's 8x8 digits
0-4, then trained on a few train images of each of the digits 5-9 from scratch, fully
fine-tuned, with LoRA on its convolutions and dense layers, or with only its class embedding;
each is scored by a separately trained CNN judge on samples of the new classes: its accuracy on
them and the Frechet distance of its features to the held-out test images of those classes
(experiments/trainers/diffusion_transfer.py).

Run:
  python -m experiments.main --config=configs/diffusion_transfer.py \
    --workdir=runs/diffusion_transfer

Options: shots=N (images per target class; several as shots=5+20), steps=N (adaptation steps),
quick (a tiny model, a few steps: seconds, for tests).
"""

import ml_collections

from configs import common
from ftlab import config_options


def get_config(arg=None):
    opts = config_options.parse(arg, quick=False, shots="3+10", steps=600)

    config = ml_collections.ConfigDict()
    config.experiment = "diffusion_transfer"
    config.seed = 0
    config.methods = ("scratch", "full", "lora", "embed")

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "digits"
    # the stratified train/test split
    config.data.seed = 0
    config.data.test_fraction = 0.2
    config.data.source_classes = (0, 1, 2, 3, 4)
    config.data.target_classes = (5, 6, 7, 8, 9)
    # train images per target class that the methods adapt on (one run per value)
    config.data.shots = tuple(int(k) for k in str(opts.shots).split("+"))

    config.model = ml_collections.ConfigDict()
    # U-Net channels per resolution (8x8, 4x4)
    config.model.features = (32, 64)
    # width of the time-and-class embedding
    config.model.embed_dim = 64

    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.steps = 3000
    config.pretrain.lr = 2e-3

    config.peft = ml_collections.ConfigDict()
    # LoRA on every nn.Conv and nn.Dense (module paths; the regex lookahead leaves out only the
    # 1-channel output convolution, whose [288, 1] kernel has no rank-4 update) ...
    config.peft.targets = (r"(?!out$).*",)
    # ... and these modules trained in full (their every leaf)
    config.peft.train = ("out",)
    config.peft.rank = 4
    config.peft.alpha = 8.0

    config.optim = ml_collections.ConfigDict()
    # images per step (drawn with replacement), pretraining and adaptation alike
    config.optim.batch_size = 64
    # adaptation steps on the target images, for every method
    config.optim.num_steps = opts.steps
    config.optim.lr = ml_collections.ConfigDict(
        {"scratch": 2e-3, "full": 5e-4, "lora": 2e-3, "embed": 1e-2}
    )

    # the CNN classifier of all classes whose view scores the samples
    config.judge = ml_collections.ConfigDict()
    # width of its penultimate layer, the Frechet distance's feature space
    config.judge.features = 32
    config.judge.steps = 1000
    config.judge.lr = 1e-3
    config.judge.batch_size = 64

    config.eval = ml_collections.ConfigDict()
    # samples generated per target class for the judge's accuracy and the Frechet distance
    config.eval.samples_per_class = 100
    # Euler steps of the sampler from noise (t = 1) to an image (t = 0)
    config.eval.sample_steps = 32
    # draws of (t, noise) per test image for the held-out flow-matching loss
    config.eval.loss_repeats = 8
    # samples per class shown in the PNG grids
    config.eval.grid_per_class = 8
    config.eval.batch_size = 512
    config.eval.seed = 0

    config.log_every_steps = 100

    config.parallel = common.parallel()

    if opts.quick:
        config.data.shots = (2,)
        config.model.features = (8,)
        config.model.embed_dim = 8
        config.pretrain.steps = 4
        config.pretrain.lr = 3e-3
        config.peft.rank = 2
        config.optim.batch_size = 8
        config.optim.num_steps = 3
        config.judge.features = 8
        config.judge.steps = 3
        config.judge.batch_size = 8
        config.eval.samples_per_class = 4
        config.eval.sample_steps = 2
        config.eval.loss_repeats = 1
        config.eval.grid_per_class = 2
        config.log_every_steps = 1
        # one learning rate: the runs that train every leaf share one compiled step
        config.optim.lr = ml_collections.ConfigDict(dict.fromkeys(config.methods, 3e-3))
    return config
