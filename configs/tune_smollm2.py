"""Few-shot tuning of SmolLM2 (prompt, prefix, LoRA, QLoRA) against in-context learning.

Every method trains on n balanced labelled Rotten Tomatoes examples (n in num_examples) with the
next-token loss of the label word after the zero-shot prompt, and is scored on the test examples
exactly as zero-shot ICL is (`experiments/trainers/decoder_tuning.py`). The plot puts the ICL
points of configs/icl_smollm2.py (run it first into runs/icl_smollm2) on the same axes.

Run:
  python -m experiments.main --config=configs/icl_smollm2.py --workdir=runs/icl_smollm2
  python -m experiments.main --config=configs/tune_smollm2.py --workdir=runs/tune_smollm2

Options: quick (tiny random Llama, stand-in tokenizer, 2 steps: for the end-to-end test),
methods=prompt+lora+..., num_examples=8+32+128, seeds=N, num_test=N.

Results: recorded in README.md (measured, with hardware and date).
"""

import ml_collections

from configs import common
from ftlab import config_options


def get_config(arg=None):
    opts = config_options.parse(
        arg,
        quick=False,
        methods="prompt+prefix+lora+qlora",
        num_examples="8+32+128+512",
        seeds=1,
        num_test=200,
    )
    config = ml_collections.ConfigDict()
    config.experiment = "decoder_tuning"
    config.seed = 0
    config.seeds = opts.seeds
    config.methods = tuple(opts.methods.split("+"))

    config.model = ml_collections.ConfigDict()
    # "smollm2" (the real model) or "tiny" (random 2-layer Llama, stand-in tokenizer)
    config.model.name = "tiny" if opts.quick else "smollm2"
    config.model.vocab_size = 512

    config.data = ml_collections.ConfigDict()
    config.data.task = "sentiment"
    config.data.split_seed = 0
    config.data.num_examples = tuple(int(n) for n in opts.num_examples.split("+"))
    # the first num_test examples of the fixed test split (the ones ICL scores)
    config.data.num_test = 8 if opts.quick else opts.num_test
    # tokens of one query (right-padded; long reviews are cut, the cue is kept)
    config.data.query_len = 48
    # evaluation: the shared zero-shot instruction, left-padded, and the scoring batch
    config.data.prefix_len = 32
    config.data.eval_batch_size = 4 if opts.quick else 16

    config.peft = ml_collections.ConfigDict()
    # prompt / prefix: virtual tokens; prefix: width of the reparametrisation MLP
    config.peft.length = 10
    config.peft.prefix_hidden_mlp = 256
    # LoRA / QLoRA: on the attention query and value projections
    config.peft.targets = (r"decoder/layer_\d+/attention/(query|value)",)
    config.peft.rank = 8
    config.peft.alpha = 16.0
    # QLoRA: kernels kept as Q4_1 blocks (all of them; the tiny model's 16-wide inputs do not
    # fill a 32-block, so quick quantises the MLP's down projection only)
    config.peft.qlora_targets = (
        (r"decoder/layer_\d+/mlp/down",)
        if opts.quick
        else (r"decoder/layer_\d+/(attention|mlp)/(query|key|value|out|gate|up|down)",)
    )

    config.optim = ml_collections.ConfigDict()
    config.optim.batch_size = 4 if opts.quick else 8
    # steps = epochs * n / batch, clipped to [min_steps, max_steps]
    config.optim.epochs = 4
    config.optim.min_steps = 2 if opts.quick else 16
    config.optim.max_steps = 2 if opts.quick else 96
    # constant AdamW learning rate per method (one compiled step serves every n)
    config.optim.lr = ml_collections.ConfigDict(
        {"prompt": 3e-2, "prefix": 3e-4, "lora": 1e-3, "qlora": 1e-3}
    )
    # ICL results of configs/icl_smollm2.py to draw beside the tuning curves ("" for none)
    config.icl_results = "" if opts.quick else "runs/icl_smollm2/results.json"
    # data parallel over all devices (configs/common.py has the multi-host settings)
    config.parallel = common.parallel()
    # accumulation, rematerialisation, precision (configs/common.py)
    config.step = common.step()

    return config
