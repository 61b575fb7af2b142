"""Online adaptation of a pretrained model: a frozen MiniLM trunk with an online logistic head.

The stream is the Rotten Tomatoes training split (fresh vs rotten, in its seeded order). The
frozen all-MiniLM-L6-v2 trunk embeds each snippet once (mean-pooled, L2-normalised, 384-d; the
trunk never changes, so embedding once is exactly the online run with a frozen trunk); the head
then learns online by OGD with eta_t = eta_0 / sqrt(t) in compiled scans over chunks of the stream
(the steps of `experiments/loop.py`), with progressive
accuracy and regret against the best fixed head in hindsight (L-BFGS on the 385 head
parameters with a small L2 term, see below; gradient-norm tolerance reported), as
`configs/online_river.py` does. river's
`LogisticRegression` with the same SGD schedule on the same embeddings runs beside it.

Run:
  python -m experiments.main --config=configs/online_minilm.py --workdir=runs/online_minilm

Options: limit=N (snippets of the stream; default 2000), lr=<float>, quick (64 snippets, for a
smoke run; it still loads the real MiniLM weights).

Results (measured 2026-11-23 on the 2-core CPU VM shared with other jobs, load average ~15;
`python -m experiments.main --config=configs/online_minilm.py --workdir=...`, 2,000 snippets,
OGD eta_0 = 2.0 / sqrt(t), progressive metrics: predict, then learn):

    ftlab online head             progressive accuracy 0.6805, log loss 0.6051
    river LogisticRegression,     progressive accuracy 0.6805, log loss 0.6051
      same SGD schedule, same embeddings
    best fixed head in hindsight  total log loss 816.26 (L2 1e-4, L-BFGS 77 iterations,
                                  gradient norm <= 1e-5 on every prefix)
    regret R(T) = 393.9, R(T)/T = 0.197, log-log slope 0.73 over t = 10..2,000 (12 prefixes;
      R(t) = 8.9, 30.9, 106.6, 257.5, 393.9 at t = 10, 42, 180, 763, 2,000)
    step-size sweep (one vmapped scan): accuracy 0.5715 / 0.6420 / 0.6805 / 0.6950 / 0.7065
      at eta_0 = 0.3 / 1 / 2 / 3 / 10

The slope is sublinear but above 0.5 at this length: with 384 dimensions the hindsight
comparator keeps improving (early prefixes are separable; the L2 term bounds it), and the
curve is still bending down at T. Wall time 8 min 31 s, nearly all of it embedding 2,000
snippets with the frozen trunk on the loaded CPU (the online scan itself is milliseconds).
"""

from configs import online_river
from ftlab import config_options


def get_config(arg=None):
    opts = config_options.parse(arg, limit=2000, lr=2.0, quick=False)
    config = online_river.get_config(f"lr={opts.lr}" + (",quick" if opts.quick else ""))
    config.data.source = "minilm_rotten_tomatoes"
    config.data.stream = "rotten_tomatoes_minilm"
    config.data.limit = 64 if opts.quick else opts.limit
    # embeddings are unit vectors already
    config.data.standardize = False
    config.data.seed = 0
    # tokens per snippet; the median snippet is about 25 tokens
    config.data.max_length = 64
    config.data.embed_batch_size = 64
    config.sweep.learning_rates = (0.3, 1.0, 3.0, 10.0) if not opts.quick else (1.0,)
    # 385 head parameters: L-BFGS (Newton's Hessian by forward-over-reverse would hold
    # [385, T, 384] floats per prefix). Prefixes shorter than the 384 dimensions are separable,
    # where the unregularised optimum is at infinity: a small L2 term makes the comparator exist.
    config.regret.method = "lbfgs"
    config.regret.l2 = 1e-4
    config.regret.max_iterations = 500
    config.regret.points = 12 if not opts.quick else 4
    return config
