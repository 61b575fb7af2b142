"""Fine-tune any Hugging Face encoder folder, with any method, on your own classification file.

  python -m experiments.main --config=configs/finetune.py:method=lora --workdir=runs/mine \\
      --config.model.path=DIR --config.data.train=train.csv \\
      --config.data.text_column=review --config.data.label_column=sentiment

``DIR`` is a folder with ``config.json``, ``model.safetensors`` (or shards) and ``tokenizer.json``
(BERT, RoBERTa, DistilBERT; `third_party/hf.py`). Data: CSV, JSON Lines or Parquet
(`ftlab/data/files.py`); a bad row is an error naming its file and line. String labels are
numbered in sorted order (``config.data.label_names`` fixes the set and order); set
``config.data.integer_labels=True`` for labels 0..num_classes-1. ``config.data.validation`` and
``config.data.test`` name their files; an empty one is carved from the training file
(``config.data.holdout_fraction`` of its rows each, seeded by ``config.data.seed``).

Options (after the colon): the methods and settings of `configs/finetune_minilm.py` (method=,
rank=, steps=, quick, tiny); ``tiny`` here means a few steps on short sequences.
"""

from configs import finetune_minilm


def get_config(arg=None):
    config = finetune_minilm.get_config(arg)
    quick = config.model.encoder == "tiny" or config.data.limit
    config.data.dataset = "files"
    del config.data.task
    config.data.train = ""
    config.data.validation = ""
    config.data.test = ""
    config.data.holdout_fraction = 0.1
    config.data.text_column = "text"
    config.data.label_column = "label"
    config.data.label_names = ()
    config.data.integer_labels = False
    if not quick:
        config.data.max_length = 128
    config.model.encoder = "hf"
    config.model.path = ""
    return config
