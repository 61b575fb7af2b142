"""Data from a config: text classification (Rotten Tomatoes or the user's files, tokenized),
the online trainer's streams and the rated movie snippets of the reward model.

The classification trainer (and the fine-tuning configs over a user's files), the multi-task
trainer's text path, the online trainer and the reward and RLHF trainers read their data here.
"""

from __future__ import annotations

import functools

import ml_collections
import numpy as np
from absl import logging

from ftlab.data import files, ratings, rotten_tomatoes, streams, text

__all__ = [
    "build",
    "build_files",
    "rated_movies",
    "read_file_splits",
    "rotten_tomatoes_tasks",
    "rotten_tomatoes_tokens",
    "stream",
]


def rotten_tomatoes_tokens(
    config: ml_collections.ConfigDict, task: str
) -> dict[str, dict[str, np.ndarray]]:
    """``{split: {"input_ids", "attention_mask", "label"}}`` of one Rotten Tomatoes task,
    tokenized by MiniLM's tokenizer to ``config.data.max_length``."""
    from third_party import minilm  # noqa: PLC0415 - reads the tokenizer only for this data

    splits = rotten_tomatoes.load(task=task, seed=config.data.seed, limit=config.data.limit or None)
    tokenizer = minilm.load_tokenizer(
        minilm.model_dir() / "tokenizer.json", max_length=config.data.max_length
    )
    return {
        name: {
            **text.encode(tokenizer, s.text, max_length=config.data.max_length),
            "label": s.label,
        }
        for name, s in splits.items()
    }


def build(config: ml_collections.ConfigDict) -> dict[str, dict[str, np.ndarray]]:
    """Tokenized splits: ``{split: {"input_ids", "attention_mask", "label"}}`` as numpy."""
    if config.data.dataset == "files":
        return build_files(config)
    if config.data.dataset != "rotten_tomatoes":
        raise ValueError(
            f"config.data.dataset={config.data.dataset!r}; expected 'rotten_tomatoes' or 'files'"
        )
    return rotten_tomatoes_tokens(config, config.data.task)


def read_file_splits(config: ml_collections.ConfigDict) -> dict[str, files.TextClassification]:
    """The user's train / validation / test files; a split without a file is carved from train.

    ``config.data.holdout_fraction`` of the training file's rows goes to each missing split, by
    a permutation seeded with ``config.data.seed``. Errors name the config key and the bad row.
    """
    d, num_classes = config.data, config.model.num_classes
    names = tuple(d.label_names) or None
    if not d.train:
        raise ValueError("config.data.train is empty; pass --config.data.train=FILE.")

    def read(key):
        try:
            return files.read_classification(
                d[key],
                text_column=d.text_column,
                label_column=d.label_column,
                label_names=names,
                num_classes=num_classes if d.integer_labels else None,
            )
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"config.data.{key}={d[key]!r}: {e}") from e

    if d.integer_labels and names:
        raise ValueError(
            f"config.data.label_names={names} cannot take effect with config.data.integer_labels"
        )
    train = read("train")
    if train.label_names is not None:
        if len(train.label_names) != num_classes:
            raise ValueError(
                f"config.model.num_classes={num_classes}, but config.data.train has "
                f"{len(train.label_names)} labels {train.label_names}; set num_classes to match "
                "or list config.data.label_names"
            )
        names = train.label_names
    missing = [k for k in ("validation", "test") if not d[k]]
    splits = {k: read(k) for k in ("validation", "test") if d[k]}
    if missing:
        f = d.holdout_fraction
        fractions = {"train": 1 - f * len(missing), **{k: f for k in missing}}
        try:
            splits.update(files.seeded_split(train, fractions, seed=d.seed))
        except ValueError as e:
            raise ValueError(f"config.data.holdout_fraction={f}: {e}") from e
    else:
        splits["train"] = train
    limit = d.limit or None
    return {
        k: files.TextClassification(s.text[:limit], s.label[:limit], s.label_names)
        for k, s in splits.items()
    }


def build_files(config: ml_collections.ConfigDict) -> dict[str, dict[str, np.ndarray]]:
    """`read_file_splits`, tokenised with the checkpoint folder's own tokenizer."""
    from third_party import hf  # noqa: PLC0415 - reads the folder only for this data

    if not config.model.path:
        raise ValueError("config.model.path is empty; pass --config.model.path=DIR (a folder).")
    tokenizer_files = hf.load_tokenizer(config.model.path)
    if tokenizer_files is None:
        raise ValueError(f"config.model.path={config.model.path!r} has no tokenizer.json")
    tokenizer = tokenizer_files.build(config.data.max_length)
    splits = read_file_splits(config)
    logging.info("labels (id order): %s", splits["train"].label_names or "integers")
    return {
        name: files.encode_classification(tokenizer, s, max_length=config.data.max_length)
        for name, s in splits.items()
    }


def rotten_tomatoes_tasks(config: ml_collections.ConfigDict) -> tuple[dict, dict, list[str]]:
    """Tokenized train/test splits of each Rotten Tomatoes task of ``config.data.tasks``, padded
    to ``[T, N, L]`` (``mask`` ``[T, N]`` marks the real rows; test padded to whole batches of
    ``config.evals.batch_size``), and the task names."""
    per_task = {"train": [], "test": []}
    for task in config.data.tasks:
        splits = rotten_tomatoes_tokens(config, task)
        for name in per_task:
            per_task[name].append(splits[name])

    def pad(tasks, multiple):
        width = -(-max(len(t["label"]) for t in tasks) // multiple) * multiple
        out = {}
        for key in ("input_ids", "attention_mask", "label"):
            shape = (len(tasks), width, *tasks[0][key].shape[1:])
            out[key] = np.zeros(shape, np.int32)
            for i, t in enumerate(tasks):
                out[key][i, : len(t[key])] = t[key]
        out["mask"] = np.zeros((len(tasks), width), np.float32)
        for i, t in enumerate(tasks):
            out["mask"][i, : len(t["label"])] = 1.0
        return out

    return (
        pad(per_task["train"], 1),
        pad(per_task["test"], config.evals.batch_size),
        list(config.data.tasks),
    )


def stream(config: ml_collections.ConfigDict, workdir) -> tuple[np.ndarray, np.ndarray, tuple]:
    """``(x, y, columns)`` of the configured stream, limited and standardised as configured.

    ``config.data.source``: "river" (``config.data.stream`` from `ftlab.data.streams`) or
    "minilm_rotten_tomatoes" (Rotten Tomatoes training snippets in their seeded order, embedded
    once by the frozen MiniLM trunk, cached in ``workdir``: `features.sentence_embeddings`).
    """
    source = config.data.get("source", "river")
    if source == "minilm_rotten_tomatoes":
        from experiments import features  # noqa: PLC0415 - this source only

        x, y = features.sentence_embeddings(config, workdir)
        columns = tuple(f"e{i}" for i in range(x.shape[1]))
    elif source == "river":
        x, y, columns = streams.load(config.data.stream, limit=config.data.limit or None)
    else:
        raise ValueError(
            f"config.data.source={source!r}; expected 'river' or 'minilm_rotten_tomatoes'"
        )
    if config.data.standardize:
        x = streams.running_standardize(x)
    return x, y, columns


@functools.lru_cache(maxsize=2)
def _movies(split_seed: int):
    # read once per process: a sweep or a test runs the trainer several times
    snippets = ratings.load("movies")
    return snippets, ratings.split_movies(snippets, seed=split_seed)


def rated_movies(config: ml_collections.ConfigDict):
    """The rated movie snippets (`ftlab.data.ratings`) and ``{split: indices}`` by
    ``config.data.split_seed``, each split cut to ``config.data.limit`` if set."""
    snippets, splits = _movies(config.data.split_seed)
    if config.data.limit:
        splits = {k: v[: config.data.limit] for k, v in splits.items()}
    return snippets, splits
