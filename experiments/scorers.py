"""Reward models (scorers) from a config: a pretrained backbone, the method of
``config.peft.method`` and a scalar head on its pooled final hidden states.

MiniLM through `experiments.models.encoder_classifier` with one output
(``config.model.backbone`` ``minilm``/``tiny``, pooling ``mean``/``cls``), or SmolLM2's last real
token through `ftlab.posttrain.reward` (``smollm2``/``tiny_llama``, pooling ``last``/``mean``).
The reward trainer (`experiments/trainers/reward.py`) trains one; the RLHF trainer rebuilds a
trained one from its run's config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from experiments import models
from ftlab.data import text
from ftlab.models import hooks, llama
from ftlab.posttrain import reward as reward_lib

__all__ = ["BACKBONES", "DECODERS", "ENCODERS", "HEAD", "METHODS", "Scorer", "build_scorer"]

ENCODERS = ("minilm", "tiny")
DECODERS = ("smollm2", "tiny_llama")
BACKBONES = ENCODERS + DECODERS
METHODS = ("none", "lora", "dora", "prompt")
# the scalar head's subtree, for every backbone (rules train it as "head/.*")
HEAD = "head"


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A reward model: its initial tree, ``apply(params, batch, rng) -> [batch]``, the tokenizer.

    Attributes:
        params: The tree with the method's leaves and the head (numpy).
        apply: Rewards of ``{"input_ids", "attention_mask"}`` rows; dropout with an rng.
        encode: ``texts -> {"input_ids", "attention_mask"}`` int32 ``[n, max_length]``.
        base_params: Parameters of the backbone alone, before the method (for counts).
    """

    params: dict
    apply: Callable
    encode: Callable
    base_params: dict


def _add_method(config, params, hidden_like_apply, example_batch):
    """``models.add_method`` with the hook sites the structural methods need."""
    method = config.peft.method
    if method not in METHODS:
        raise ValueError(f"config.peft.method={method!r}; expected one of {METHODS}")
    sites = None
    if method == "prompt":
        sites = hooks.discover(hidden_like_apply, params, example_batch, None)
    rng = jax.random.PRNGKey(config.seed + 1)
    return models.add_method(config.peft, method, params, rng, sites=sites)


def build_encoder_scorer(config: ml_collections.ConfigDict) -> Scorer:
    """MiniLM (or a tiny random BERT) with a one-output head on the pooled hidden states."""
    from third_party import minilm  # noqa: PLC0415 - reads the tokenizer only for this model

    m = config.model
    if m.pooling not in ("mean", "cls"):
        raise ValueError(f"config.model.pooling={m.pooling!r}; an encoder pools 'mean' or 'cls'")
    sub = ml_collections.ConfigDict(
        {
            "seed": config.seed,
            "model": {
                "encoder": m.backbone,
                "num_classes": 1,
                "pooling": m.pooling,
                "dropout_rate": m.dropout_rate,
                "dont_load": (f"{HEAD}/.*",),
            },
            "data": {"max_length": config.data.max_length},
        }
    )
    model, params = models.encoder_classifier(sub)
    classifier = models.classifier_apply(model)
    ids = np.zeros((1, config.data.max_length), np.int32)
    example = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    base = params
    params, wrap = _add_method(config, params, classifier, example)
    logits = wrap(classifier)

    def apply(params, batch, rng):
        return logits(params, batch, rng)[:, 0]

    tokenizer = minilm.load_tokenizer(
        minilm.model_dir() / "tokenizer.json", max_length=config.data.max_length
    )
    return Scorer(
        params,
        apply,
        lambda texts: text.encode(tokenizer, texts, max_length=config.data.max_length),
        base,
    )


def _encode_right_padded(tokenizer, texts, *, max_length: int, pad_id: int) -> dict:
    ids = np.full((len(texts), max_length), pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for i, enc in enumerate(tokenizer.encode_batch(list(texts), add_special_tokens=False)):
        row = enc.ids[:max_length]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def build_decoder_scorer(config: ml_collections.ConfigDict, texts) -> Scorer:
    """SmolLM2 (or a tiny random Llama with a stand-in tokenizer built from ``texts``) with a
    scalar head on the last real token's (or the mean) final hidden state."""
    m = config.model
    if m.pooling not in ("last", "mean"):
        raise ValueError(f"config.model.pooling={m.pooling!r}; a decoder pools 'last' or 'mean'")
    if m.dropout_rate:
        raise ValueError(
            f"config.model.dropout_rate={m.dropout_rate}: the Llama decoder has no dropout; set 0"
        )
    sub = ml_collections.ConfigDict(
        {
            "seed": config.seed,
            "model": {
                "name": "smollm2" if m.backbone == "smollm2" else "tiny",
                "vocab_size": m.vocab_size,
            },
        }
    )
    decoder = models.decoder(sub, list(texts))
    module = llama.LlamaForCausalLM(decoder.config)
    # Method targets name layers one by one (decoder/layer_3/...): unstack; the forward pass
    # stacks them again (stack_if_uniform), so the compiled step still holds one layer body.
    base = decoder.params
    if llama.LAYERS in base["decoder"]:
        base = llama.unstack_layers(base)

    def hidden(params, batch, rng):
        del rng  # no dropout in the decoder
        return module.apply(
            {"params": llama.stack_if_uniform(params)},
            batch["input_ids"],
            batch["attention_mask"],
            return_hidden=True,
        )

    ids = np.zeros((1, config.data.max_length), np.int32)
    example = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    params, wrap = _add_method(config, base, hidden, example)
    if config.peft.method in ("lora", "dora"):
        # The wrapper checks the leaves the model consumes (at decoder/layers/... once
        # stacked), so it must see the stacked tree; stacking again inside is a no-op.
        method_wrap = wrap

        def wrap(f):
            g = method_wrap(f)
            return lambda p, *args: g(llama.stack_if_uniform(p), *args)

    params = reward_lib.init(
        params, jax.random.PRNGKey(config.seed), dim=decoder.config.hidden_size, name=HEAD
    )
    apply = reward_lib.wrap_apply(wrap(hidden), pooling=m.pooling, name=HEAD)
    return Scorer(
        params,
        apply,
        lambda t: _encode_right_padded(
            decoder.tokenizer, t, max_length=config.data.max_length, pad_id=decoder.pad_id
        ),
        base,
    )


def build_scorer(config: ml_collections.ConfigDict, texts) -> Scorer:
    """The reward model of ``config.model.backbone``."""
    if config.model.backbone in ENCODERS:
        return build_encoder_scorer(config)
    if config.model.backbone in DECODERS:
        return build_decoder_scorer(config, texts)
    raise ValueError(
        f"config.model.backbone={config.model.backbone!r}; expected one of {BACKBONES}"
    )
