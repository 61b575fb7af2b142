"""Features of a frozen trunk, cached in the workdir: computed once, reused while their key holds.

The pure pieces (the key, batching over the trunk, which leaves train below a cut, the module
input at the cut) are in `ftlab.data.features`; this module is the experiments' policy: one file
per workdir, recomputed (with the reason in the log) when anything it depends on changes, written
by process 0 only. The classifier's head inputs (`head_inputs`) and the online trainer's MiniLM
sentence embeddings share it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ftlab.core import partition, tensorfile
from ftlab.data import features
from ftlab.models import attention, bert, hooks

__all__ = [
    "FILE",
    "blocker",
    "cached",
    "for_head",
    "head_apply",
    "head_inputs",
    "sentence_embeddings",
    "settings_of",
]

# The cache's file in the workdir.
FILE = "features.safetensors"


def settings_of(model: Any, *, batch_size: int, modules=(bert, attention, hooks), **extra) -> dict:
    """The settings part of a cache key: the model, the batch size, the code and the versions.

    The source of ``modules`` is hashed: a change to the model's code between releases (same
    ftlab version) must not reuse features computed by the old code.
    """
    return {
        "model": repr(model),
        "batch_size": batch_size,
        "source": {
            m.__name__: hashlib.sha256(inspect.getsource(m).encode()).hexdigest()
            for m in (*modules, features)
        },
        **extra,
        "versions": {p: importlib.metadata.version(p) for p in ("ftlab", "jax", "jaxlib", "flax")},
        "platform": jax.devices()[0].platform,
    }


def cached(
    workdir: pathlib.Path,
    fn: Callable[[dict[str, np.ndarray]], Any],
    inputs: Mapping[str, Mapping[str, np.ndarray]],
    *,
    trunk: Any,
    settings: Mapping[str, Any],
    batch_size: int,
    is_chief: bool,
    cut_padding: bool,
) -> dict[str, np.ndarray]:
    """``{split: fn over inputs[split]}``, read from ``workdir/features.safetensors`` when its key
    (``trunk``, ``inputs``, ``settings``, the code version) matches; else computed and written.

    ``cut_padding``: each batch is cut after its longest row (``inputs`` hold ``input_ids`` and
    ``attention_mask``; the model must not look at padded positions).
    """
    key = features.cache_key(trunk=trunk, inputs=inputs, settings=settings)
    path = workdir / FILE
    try:
        got = features.load(path, key=key)
        if set(got) == set(inputs):
            logging.info("features: reusing %s", path)
            return got
        logging.info(
            "features: %s holds splits %s, not %s; recomputing", path, sorted(got), sorted(inputs)
        )
    except FileNotFoundError:
        logging.info("features: none cached in %s yet; computing them once", workdir)
    except features.StaleCacheError as e:
        logging.info("features: recomputing, the cache cannot be used: %s", e)
    except tensorfile.CorruptFileError as e:
        logging.warning("features: recomputing, the cache cannot be used: %s", e)
    start = time.perf_counter()
    cut = {"sequence_keys": ("input_ids", "attention_mask")} if cut_padding else {}
    computed = {
        split: features.compute(
            fn,
            arrays,
            batch_size=batch_size,
            # Padding is most of a short snippet's tokens: cut each batch after its longest row.
            lengths=arrays["attention_mask"].sum(axis=1) if cut_padding else None,
            **cut,
        )
        for split, arrays in inputs.items()
    }
    logging.info(
        "features: computed %s in %.1f s",
        {k: v.shape for k, v in computed.items()},
        time.perf_counter() - start,
    )
    if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
        features.save(path, computed, key=key)
    return computed


def sentence_embeddings(config: ml_collections.ConfigDict, workdir) -> tuple[np.ndarray, ...]:
    """``(x, y)``: Rotten Tomatoes' training snippets (`experiments.data`'s tokens, by
    ``config.data``'s seed, limit and max_length) embedded by the frozen all-MiniLM-L6-v2 trunk
    (``[T, 384]`` unit vectors), and their labels (fresh: 1).

    The trunk runs once, in batches of ``config.data.embed_batch_size`` (jit-compiled once, the
    last batch padded), cached in ``workdir``.
    """
    from experiments import data as data_lib  # noqa: PLC0415 - this source only
    from experiments import loop  # noqa: PLC0415
    from third_party import minilm  # noqa: PLC0415

    train = data_lib.rotten_tomatoes_tokens(config, "sentiment")["train"]
    pretrained = minilm.load()
    # The weights are an argument, not a closed-over constant (XLA would constant-fold them).
    encode = jax.jit(functools.partial(bert.encode_sentences, pretrained.config))
    weights, size = jax.device_put(pretrained.params), config.data.embed_batch_size
    x = cached(
        pathlib.Path(workdir),
        lambda b: encode(weights, b["input_ids"], b["attention_mask"]),
        {"train": {k: train[k] for k in ("input_ids", "attention_mask")}},
        trunk=pretrained.params,
        settings=settings_of(pretrained.config, batch_size=size, cut="sentences"),
        batch_size=size,
        is_chief=loop.is_chief(),
        cut_padding=False,  # every batch of one shape, as the stream's numbers were measured
    )["train"]
    return x.astype(np.float32), train["label"].astype(np.float32)


# -- the classifier's head inputs ---------------------------------------------------------------


def blocker(config: ml_collections.ConfigDict, model, label_tree) -> str | None:
    """Why the head's inputs cannot be computed once for the whole run; None when they can.

    They can when nothing below the head trains (every trainable leaf is under ``head/``, no PEFT
    method wraps the model) and nothing below it is random in training (no dropout on the
    encoder's activations or attention probabilities, the same rate the head's input dropout
    uses): then the head sees the same inputs at every step as a forward pass would give it.
    """
    trainable = features.trained_below(label_tree, head="head")
    if trainable:
        return f"config.partition.rules train leaves below the head, e.g. {trainable[0]}"
    if config.peft.method != "none":
        return f"config.peft.method={config.peft.method!r} changes the forward pass"
    if model.config.dropout_rate or model.config.probs_dropout_rate:
        return (
            f"dropout (config.model.dropout_rate={model.config.dropout_rate}, on attention "
            f"probabilities {model.config.probs_dropout_rate}) makes the encoder's outputs "
            "random in training"
        )
    return None


def head_apply(model: bert.BertClassifier):
    """``apply(params, batch, rng) -> logits`` from ``batch["features"]`` (the head's inputs).

    The classifier's head as it is built there (float32 Dense); no dropout, as `blocker`
    allows the cache only without it.
    """
    head = nn.Dense(model.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)

    def apply(params, batch, rng):
        del rng
        return head.apply({"params": params["head"]}, batch["features"])

    return apply


def head_inputs(
    config: ml_collections.ConfigDict,
    model: bert.BertClassifier,
    params,
    label_tree,
    data: dict[str, dict[str, np.ndarray]],
    workdir: pathlib.Path,
    *,
    is_chief: bool,
) -> dict[str, np.ndarray]:
    """``{split: the head's inputs [rows, hidden]}`` in evaluation mode, cached in ``workdir``.

    The key covers the frozen weights, the token ids and masks of every split, the model
    configuration, the computation settings and the code version.
    """
    _, frozen = partition.split(params, label_tree)
    inputs = {
        split: {k: arrays[k] for k in ("input_ids", "attention_mask")}
        for split, arrays in data.items()
    }
    cut = features.input_of(
        lambda p, b: model.apply({"params": p}, b["input_ids"], b["attention_mask"]), "head"
    )
    # Weights placed once, not copied from host memory at every batch.
    placed, jitted = jax.device_put(params), jax.jit(cut)
    return cached(
        workdir,
        lambda batch: jitted(placed, batch),
        inputs,
        trunk=frozen,
        settings=settings_of(model, batch_size=config.evals.batch_size, cut="head input"),
        batch_size=config.evals.batch_size,
        is_chief=is_chief,
        cut_padding=True,
    )


def for_head(config, model, params, label_tree, data, apply, workdir, *, is_chief):
    """``(data, apply)``: the head's cached inputs and the head alone, or both unchanged.

    ``config.data.cache_features``: None caches when the trunk allows it (`blocker`), True
    requires it (an error naming the blocker otherwise), False never caches.
    """
    cache = config.data.get("cache_features")
    why = blocker(config, model, label_tree)
    if cache and why:
        raise ValueError(
            f"config.data.cache_features=True, but {why}; set it to False (a forward pass "
            "per step) or None (cache when possible)."
        )
    if cache is None and why:
        logging.info("features: computed at every step, not cached: %s", why)
    if cache is False or why:
        return data, apply
    got = head_inputs(config, model, params, label_tree, data, workdir, is_chief=is_chief)
    data = {s: {"features": got[s], "label": arrays["label"]} for s, arrays in data.items()}
    return data, head_apply(model)
