"""A byte-level GRU pretrained on ShareGPT text, adapted to Rotten Tomatoes review snippets.

The GRU language model (`ftlab.models.rnn`) is pretrained on ShareGPT turns, then trained on a
small slice of Rotten Tomatoes review snippets from scratch, fully fine-tuned, with LoRA on its
recurrent and output kernels, or with only its output head; each is scored in bits per byte on
held-out reviews and on held-out ShareGPT text (experiments/trainers/rnn_transfer.py).

Run:
  python -m experiments.main --config=configs/rnn_transfer.py --workdir=runs/rnn_transfer

Options: cell=gru|lstm, steps=N (adaptation steps), quick (a tiny model on Rotten Tomatoes plot
summaries -> reviews, a few steps: seconds, for tests).

Results (measured 2026-12-05 on a 2-core AMD EPYC VM shared with other jobs, load average 7 to
12; the command above with the defaults: a 1-layer GRU, 256 units, pretrained 1,000 steps of 32
x 128 bytes on 4 MB of ShareGPT text, then 250 steps on 50 kB of review snippets per method;
9 min 51 s wall in all; an earlier run under a load of 7 to 22 took 14 min 33 s and gave the
same numbers and samples, bit for bit). Held-out bits per byte on 39,936 bytes of each corpus:

  | method | trainable | rt_reviews test bits/byte | sharegpt test bits/byte | train s |
  |---|---|---|---|---|
  | pretrained | 0 | 2.832 | 2.443 |  |
  | scratch | 328,960 | 3.058 | 4.903 | 95 |
  | full | 328,960 | 2.493 | 2.923 | 79 |
  | lora | 16,384 | 2.588 | 2.909 | 54 |
  | head | 65,792 | 2.609 | 2.876 | 19 |

  Reading: with 50 kB of target text every adapted model beats the same GRU trained from
  scratch on it (3.06) and the unadapted one (2.83); full fine-tuning is best (2.49), LoRA of
  rank 8 on the recurrent kernels and the head (5% of the parameters) gets 2.59, the head alone
  2.61. All three forget ShareGPT alike (2.44 -> 2.88-2.92): the LoRA here includes the head,
  which moves the output distribution as much as the others do. Samples from the prompt
  "Performances are potent, and the women's" (temperature 0.7): the pretrained model drifts to
  code ("... the `man` object values of your output ..."), full fine-tuning writes review-like
  text ("... most film that with of the movie is from the strange that summer funny ..."),
  LoRA too ("... director govel last comedy and with the donest mode of subject ...").
"""

import ml_collections

from configs import common
from ftlab import config_options


def get_config(arg=None):
    opts = config_options.parse(arg, quick=False, cell="gru", steps=250)

    config = ml_collections.ConfigDict()
    config.experiment = "rnn_transfer"
    config.seed = 0
    config.methods = ("scratch", "full", "lora", "head")

    config.data = ml_collections.ConfigDict()
    config.data.source = "sharegpt"
    config.data.target = "rt_reviews"
    # the corpora's train/test split seed
    config.data.seed = 0
    # bytes (UTF-8; characters for English text) of train text taken from each corpus
    config.data.source_train_chars = 4_000_000
    config.data.target_train_chars = 50_000
    # held-out bytes of each corpus that score the models
    config.data.test_chars = 40_000
    # bytes per training and evaluation window
    config.data.seq_len = 128

    config.model = ml_collections.ConfigDict()
    config.model.cell = opts.cell
    config.model.embed_dim = 64
    config.model.hidden = 256
    config.model.num_layers = 1

    config.peft = ml_collections.ConfigDict()
    # LoRA on the recurrent kernels (GRU: hr, hz, hn; LSTM: hi, hf, hg, ho) and the output head
    config.peft.targets = (r"layer_\d+/cell/h[a-z]", "head")
    config.peft.rank = 8
    config.peft.alpha = 16.0

    config.optim = ml_collections.ConfigDict()
    # windows per step
    config.optim.batch_size = 32
    config.optim.pretrain_steps = 1000
    config.optim.pretrain_lr = 3e-3
    # adaptation steps on the target, for every method
    config.optim.num_steps = opts.steps
    config.optim.lr = ml_collections.ConfigDict(
        {"scratch": 3e-3, "full": 1e-3, "lora": 3e-3, "head": 3e-3}
    )

    # windows per evaluation batch
    config.eval_batch_size = 128

    config.sample = ml_collections.ConfigDict()
    # bytes of the first held-out target text that every sample continues
    config.sample.prompt_len = 40
    # bytes sampled
    config.sample.length = 160
    config.sample.temperature = 0.7
    config.sample.seed = 0

    config.log_every_steps = 50

    config.parallel = common.parallel()

    if opts.quick:
        config.data.source = "rt_plot"
        config.data.source_train_chars = 20_000
        config.data.target_train_chars = 5_000
        config.data.test_chars = 2_000
        config.data.seq_len = 16
        config.model.embed_dim = 8
        config.model.hidden = 16
        config.peft.rank = 2
        config.optim.batch_size = 8
        config.optim.pretrain_steps = 4
        config.optim.num_steps = 3
        config.eval_batch_size = 64
        config.sample.prompt_len = 8
        config.sample.length = 8
        config.log_every_steps = 1
        # one learning rate: the runs that train every leaf share one compiled step
        config.optim.lr = ml_collections.ConfigDict(dict.fromkeys(config.methods, 3e-3))
    return config
