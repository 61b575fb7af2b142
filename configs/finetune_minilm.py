"""Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes fresh/rotten: one config, three methods.

The three methods are the same trainer with different partition rules (and learning rates):

  full          every leaf trains (full fine-tuning)
  linear_probe  only the new head trains (feature extraction)
  bitfit        biases + head train (Ben Zaken et al. 2021, arXiv:2106.10199)
  lora          LoRA factors on attention query/value + head (Hu et al. 2021, arXiv:2106.09685)
  dora          DoRA: LoRA + per-column magnitudes (Liu et al. 2024, arXiv:2402.09353)
  ia3           IA3 rescaling of keys, values, FFN activations (Liu et al. 2022, arXiv:2205.05638)
  adapters      Houlsby bottleneck adapters (arXiv:1902.00751); prompt: soft prompt (2104.08691);
  prefix        per-layer key/value prefixes via an MLP (2101.00190); reft: LoReFT (2404.03592)

Run (a thin config per method lives beside this file):
  python -m experiments.main --config=configs/finetune_minilm.py:method=bitfit --workdir=runs/bitfit

Options: method=<one of the above>, rank=N (LoRA, DoRA), quick (real MiniLM, a few steps on a
few examples), tiny (a 2-layer random BERT instead of MiniLM; seconds, for tests), steps=N.
Results are recorded in README.md (measured, with command, hardware and date).
"""

import ml_collections

from configs import common
from ftlab import config_options

METHODS = {
    # method: (rules, peak learning rate, steps); 320 steps of batch 32 is one epoch
    "full": ((("head/.*", "train"), (".*", "train")), 5e-5, 320),
    "linear_probe": ((("head/.*", "train"), (".*", "frozen")), 3e-3, 640),
    "bitfit": ((("head/.*", "train"), (".*/bias", "train"), (".*", "frozen")), 1e-3, 480),
    # method leaves (added by config.peft) + head
    "lora": ((("head/.*", "train"), (".*/lora_(a|b)", "train"), (".*", "frozen")), 1e-3, 480),
    "dora": (
        (("head/.*", "train"), (".*/(lora_a|lora_b|dora_m)", "train"), (".*", "frozen")),
        1e-3,
        480,
    ),
    "ia3": ((("head/.*", "train"), (".*/ia3_scale(_in)?", "train"), (".*", "frozen")), 3e-3, 480),
    "adapters": (
        (
            ("head/.*", "train"),
            (".*/(attention_adapter|output_adapter)/.*", "train"),
            (".*", "frozen"),
        ),
        1e-3,
        480,
    ),
    "prompt": (
        (("head/.*", "train"), ("(.*/)?embeddings/prompt", "train"), (".*", "frozen")),
        3e-3,
        480,
    ),
    "prefix": ((("head/.*", "train"), ("prefix_mlp/.*", "train"), (".*", "frozen")), 1e-3, 480),
    "reft": (
        (("head/.*", "train"), (r"(.*/)?layer_\d+/reft/.*", "train"), (".*", "frozen")),
        1e-3,
        480,
    ),
}
PEFT = ("lora", "dora", "ia3", "adapters", "prompt", "prefix", "reft")


def get_config(arg=None):
    opts = config_options.parse(arg, method="full", quick=False, tiny=False, steps=0, rank=8)
    if opts.method not in METHODS:
        raise ValueError(f"method={opts.method!r}; expected one of {sorted(METHODS)}")
    rules, lr, num_steps = METHODS[opts.method]

    config = ml_collections.ConfigDict()
    config.experiment = "classification"
    config.method = opts.method
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "rotten_tomatoes"
    config.data.task = "sentiment"
    config.data.seed = 0
    # tokens per example; the median snippet is about 25 tokens
    config.data.max_length = 64
    # 0: all examples; otherwise the first N of each split (quick runs)
    config.data.limit = 0
    # Train the head on its inputs computed once (cached in the workdir, keyed by weights, data,
    # settings and code) instead of a forward pass per step. None: whenever nothing below the
    # head trains or is random (no dropout); True: required (an error says what prevents it);
    # False: never.
    config.data.cache_features = ml_collections.config_dict.placeholder(bool)

    config.model = ml_collections.ConfigDict()
    # "minilm": the pretrained all-MiniLM-L6-v2 encoder; "tiny": a random 2-layer BERT
    config.model.encoder = "minilm"
    config.model.num_classes = 2
    config.model.pooling = "mean"
    config.model.dropout_rate = 0.1
    # dropout on the attention probabilities alone; None: dropout_rate. 0 lets cuDNN's fused
    # attention run in training (it has no probability dropout)
    config.model.attention_dropout_rate = ml_collections.config_dict.placeholder(float)
    # attention kernel: "auto" (cuDNN on a GPU in bfloat16 without probability dropout, else
    # "einsum"), "einsum", "xla" or "cudnn"
    config.model.attention = "auto"
    # computation dtype ("float32" or "bfloat16"); parameters and optimizer state stay float32
    config.model.dtype = "float32"
    # False: MiniLM's architecture with random weights (benchmarks on a machine without them)
    config.model.pretrained = True
    # leaves that keep their initialisation when the pretrained encoder is loaded
    config.model.dont_load = ("head/.*",)

    config.partition = ml_collections.ConfigDict()
    config.partition.rules = rules

    # A tree transformation applied after loading: "none" or "lora".
    config.peft = ml_collections.ConfigDict()
    config.peft.method = opts.method if opts.method in PEFT else "none"
    # regexes over the module path of nn.Dense kernels (fullmatch)
    config.peft.targets = (r"encoder/layer_\d+/attention/(query|value)",)
    config.peft.rank = opts.rank
    config.peft.alpha = 2.0 * opts.rank
    # LoRA/DoRA dropout on the low-rank branch's input while training (PEFT's lora_dropout)
    config.peft.dropout = 0.0
    # IA3: scale the outputs of these kernels, and the inputs of those (the FFN activation)
    config.peft.ia3_targets_out = (r"encoder/layer_\d+/attention/(key|value)",)
    config.peft.ia3_targets_in = (r"encoder/layer_\d+/mlp/output",)
    # adapters: bottleneck width; prompt/prefix: number of virtual tokens
    config.peft.bottleneck = 16
    config.peft.length = 10
    config.peft.prefix_hidden_mlp = 128
    # ReFT: intervened layers and positions (first/last real tokens)
    config.peft.reft_layers = (0, 1, 2, 3, 4, 5)
    config.peft.reft_first_n = 1
    config.peft.reft_last_n = 1

    config.optim = ml_collections.ConfigDict()
    config.optim.batch_size = 32
    # the training split has 10,246 snippets: 320 steps of 32 is one epoch
    config.optim.num_steps = num_steps
    config.optim.lr = lr
    config.optim.warmup_steps = num_steps // 10
    config.optim.weight_decay = 0.01
    config.optim.grad_clip_norm = 1.0

    config.evals = ml_collections.ConfigDict()
    config.evals.every_steps = 160
    config.evals.batch_size = 128

    config.log_every_steps = 20
    # stop this process after this many steps (0: never); the next run resumes from there
    config.max_steps_per_run = 0
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 160
    config.checkpoint.keep = 2

    config.parallel = common.parallel()
    # accumulation, rematerialisation, precision (configs/common.py)
    config.step = common.step()

    if opts.quick or opts.tiny:
        config.data.limit = 64
        config.data.max_length = 32
        config.optim.batch_size = 8
        config.optim.num_steps = 6
        config.optim.warmup_steps = 1
        config.evals.every_steps = 3
        config.evals.batch_size = 16
        config.log_every_steps = 1
        config.checkpoint.every_steps = 3
    if opts.tiny:
        config.model.encoder = "tiny"
        config.peft.reft_layers = (0, 1)
        # Dropout's random bits double a tiny step's compile time; `quick` keeps dropout on.
        config.model.dropout_rate = 0.0
    if opts.steps:
        config.optim.num_steps = opts.steps
    return config
