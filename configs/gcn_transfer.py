"""A GCN on the larval Drosophila connectome: few labels, with and without pretraining.

Semi-supervised classification of the 209 neurons of the left mushroom body (Eichler et al.
2017, shipped in graspologic's wheel: `ftlab.data.graphs`) into 4 cell types, from 1, 3 or 10
labelled neurons per class, by a two-layer GCN (Kipf & Welling 2017; their Cora/CiteSeer/PubMed
files are not shipped by any package, so their 81.5% cannot be reproduced here) trained from
scratch, or pretrained as a graph auto-encoder on the unlabelled graph and then probed,
fine-tuned, or adapted with LoRA (experiments/trainers/gcn_transfer.py).

Run:
  python -m experiments.main --config=configs/gcn_transfer.py --workdir=runs/gcn_transfer

Options: seeds=N (default 5), sparse (segment_sum propagation instead of the dense Â), quick
(a tiny model and a few steps: seconds, for tests).

Results (measured 2026-12-05 on a 2-core AMD EPYC VM shared with other jobs, load average about
9; the command above with the defaults, 5 seeds, dense propagation; 61 s wall in all).
Test accuracy (%) on the unlabelled neurons, mean ± std over seeds 0-4 (each seed draws its own
labelled neurons, pretraining and heads); always answering the largest class (Kenyon cells) is
48%:

  | method | 1/class | 3/class | 10/class |
  |---|---|---|---|
  | scratch | 49.3 ± 15.0 | 73.6 ± 4.2 | 77.6 ± 4.2 |
  | probe | 47.5 ± 11.3 | 55.3 ± 7.5 | 59.1 ± 7.6 |
  | finetune | 56.1 ± 15.5 | 76.5 ± 3.5 | 81.2 ± 3.6 |
  | lora | 45.8 ± 10.4 | 68.4 ± 5.8 | 75.0 ± 5.4 |

  The auto-encoder's loss falls from 1.386 (chance, ln 2 twice) to 1.18 (mean over seeds): on a
  graph this dense (5,559 undirected edges among 209 neurons, a quarter of the pairs), a good
  share of the random "non-edges" are edges. Reading: fine-tuning the pretrained encoder is
  best at every label count (+3.6 points over scratch at 10 labels per class, +6.8 at 1), while
  its frozen embeddings alone (probe) are weak, 59% at 10 per class: link prediction learns
  which neurons connect, which predicts cell type only in part; LoRA (rank 4 on both GCN
  kernels, plus the head) sits between. A variant with wider layers (64, 32) and 1,000
  pretraining steps (3 seeds) was no better (finetune 76.7, probe 63.1 at 10 per class).
"""

import ml_collections

from ftlab import config_options


def get_config(arg=None):
    opts = config_options.parse(arg, quick=False, seeds=5, sparse=False)

    config = ml_collections.ConfigDict()
    config.experiment = "gcn_transfer"
    config.seeds = tuple(range(opts.seeds))
    config.methods = ("scratch", "probe", "finetune", "lora")

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "drosophila_left"
    # labelled nodes per class (all of a smaller class); every other node is a test node
    config.data.labels_per_class = (1, 3, 10)
    # "dense": Â as an [n, n] matrix; "sparse": its non-zeros with segment_sum
    config.data.propagation = "sparse" if opts.sparse else "dense"

    config.model = ml_collections.ConfigDict()
    # GCN layer widths of the encoder (the classifier adds a Dense head)
    config.model.features = (32, 16)
    config.model.dropout_rate = 0.5

    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.steps = 300
    config.pretrain.lr = 1e-2
    # random node pairs per edge, the non-edges of the auto-encoder's loss
    config.pretrain.negatives = 1

    config.peft = ml_collections.ConfigDict()
    config.peft.targets = (r"layer_\d+/dense",)
    config.peft.rank = 4
    config.peft.alpha = 8.0

    config.optim = ml_collections.ConfigDict()
    # full-batch steps on the labelled nodes (Kipf & Welling: 200, lr 0.01, weight decay 5e-4)
    config.optim.num_steps = 200
    config.optim.lr = ml_collections.ConfigDict(
        {"scratch": 1e-2, "probe": 1e-2, "finetune": 1e-2, "lora": 1e-2}
    )
    config.optim.weight_decay = 5e-4

    config.log_every_steps = 50

    if opts.quick:
        config.data.labels_per_class = (1, 3)
        config.model.features = (8, 4)
        config.peft.rank = 2
        config.pretrain.steps = 3
        config.optim.num_steps = 3
        config.log_every_steps = 1
    return config
