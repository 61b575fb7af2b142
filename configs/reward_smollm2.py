"""A reward model on SmolLM2-135M-Instruct: a scalar head on the last real token, LoRA.

The same trainer and data as configs/reward_minilm.py (`experiments/trainers/reward.py`): the
head reads the decoder's final hidden state at each snippet's last token
(`ftlab.posttrain.reward`), LoRA factors on the attention projections and the head train.

Run:
  python -m experiments.main --config=configs/reward_smollm2.py --workdir=runs/reward_smollm2

Options: method=lora|full|linear_probe, quick (a tiny random Llama with a stand-in tokenizer on
64 snippets per split, 4 steps: seconds), steps=N, margin=X, pairing=in_batch|sampled.

Not measured yet: SmolLM2 costs about six times MiniLM's compute per snippet, beyond this
repository's 2-core CPU budget for the issue's runs.
"""

from configs import reward_minilm

HEAD = reward_minilm.HEAD
METHODS = {
    "lora": ("lora", (HEAD, (".*/lora_(a|b)", "train"), (".*", "frozen")), 5e-4),
    "full": ("none", (HEAD, (".*", "train")), 2e-5),
    "linear_probe": ("none", (HEAD, (".*", "frozen")), 3e-3),
}


def get_config(arg=None):
    from ftlab import config_options  # noqa: PLC0415

    opts = config_options.parse(
        arg, method="lora", quick=False, steps=0, margin=0.0, pairing="in_batch"
    )
    if opts.method not in METHODS:
        raise ValueError(f"method={opts.method!r}; expected one of {sorted(METHODS)}")
    peft_method, rules, lr = METHODS[opts.method]
    passed = [f"method=full,steps={opts.steps},margin={opts.margin},pairing={opts.pairing}"]
    if opts.quick:
        passed.append("quick")
    config = reward_minilm.get_config(",".join(passed))
    config.method = opts.method
    config.model.backbone = "tiny_llama" if opts.quick else "smollm2"
    config.model.pooling = "last"
    config.model.dropout_rate = 0.0  # the Llama decoder has none
    config.partition.rules = rules
    config.peft.method = peft_method
    config.peft.targets = (r"decoder/layer_\d+/attention/(query|value)",)
    config.optim.lr = lr
    if not opts.quick:
        config.optim.batch_size = 16
        config.evals.batch_size = 64
    return config
