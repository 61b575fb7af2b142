"""What several trainers build from a config: models, PEFT methods, the train step's axis.

Trainers import these from here, never from one another (``multitask`` trains the classifier
with a LoRA per task, ``decoder_tuning`` tunes the decoder that ``icl`` prompts).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from safetensors import numpy as safetensors_numpy

from experiments import loop
from ftlab import icl
from ftlab.core import loading, parallel, partition
from ftlab.models import attention, bert, hooks, llama
from ftlab.peft import adapters, dora, ia3, lora, prefix, prompt, qlora, reft

__all__ = [
    "DECODER_METHODS",
    "DECODER_TASKS",
    "axis_name",
    "Decoder",
    "HFEncoder",
    "ConvNet",
    "MLP",
    "Norm",
    "PEFT_METHODS",
    "STRUCTURAL",
    "adamw",
    "add_method",
    "classifier_apply",
    "decoder",
    "decoder_method",
    "encoder_classifier",
    "encoder_method",
    "encoder_sites",
    "hf_encoder",
    "partition_of",
    "save_method",
]


def axis_name(plan: parallel.Plan) -> str | None:
    """The train step's ``axis_name`` for ``plan``: under pmap the step runs per device, and
    the gradient mean needs the axis' name."""
    return parallel.DATA_AXIS if plan.mode == "pmap" else None


class MLP(nn.Module):
    """``[batch, in] -> [batch, out]``: ReLU layers ``<layer>_i`` of widths ``hidden``, a linear
    ``head``. Finn et al.'s sinusoid regressor (``meta``), the multi-task net (``multitask``,
    with ``layer="trunk"``); the layer names seed their initialisation, so they are kept."""

    hidden: Sequence[int] = (40, 40)
    out: int = 1
    layer: str = "hidden"

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"{self.layer}_{i}")(x))
        return nn.Dense(self.out, name="head")(x)


class Norm(nn.Module):
    """Normalisation without running statistics; learned ``scale`` and ``bias`` per channel.

    ``batch``: over (examples, H, W) of the batch given, i.e. transductive within an episode.
    ``instance``: over (H, W, C) of each example alone.
    """

    kind: str = "batch"
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):  # [n, H, W, C]
        axes = {"batch": (0, 1, 2), "instance": (1, 2, 3)}[self.kind]
        mean = jnp.mean(x, axes, keepdims=True)
        var = jnp.var(x, axes, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return x * scale.reshape(1, 1, 1, c) + bias.reshape(1, 1, 1, c)


class ConvNet(nn.Module):
    """``blocks`` x [conv 3x3 stride 2, Norm, ReLU] -> flatten -> Dense ``head``."""

    ways: int
    filters: int = 32
    blocks: int = 3
    norm: str = "batch"

    @nn.compact
    def __call__(self, x):  # [n, H, W] -> [n, ways]
        x = x[..., None]
        for i in range(self.blocks):
            x = nn.Conv(self.filters, (3, 3), strides=2, padding="SAME", name=f"conv_{i}")(x)
            x = nn.relu(Norm(self.norm, name=f"norm_{i}")(x))
        return nn.Dense(self.ways, name="head")(x.reshape(x.shape[0], -1))


# -- PEFT methods: a tree transformation and an apply wrapper --------------------------------

PEFT_METHODS = ("none", "lora", "dora", "ia3", "adapters", "prompt", "prefix", "reft")


def add_method(peft: ml_collections.ConfigDict, method: str, params, rng, *, sites=None):
    """Adds ``method``'s leaves to ``params`` as ``peft`` (``config.peft``) says.

    Args:
        peft: The method's options (``rank``, ``alpha``, ``targets``, ``length``, ...).
        method: One of `PEFT_METHODS`.
        params: The model's tree.
        rng: Initialises the method's random leaves.
        sites: The model's hook sites (`ftlab.models.hooks.discover`), for the structural
            methods (adapters, prompt, prefix, reft).

    Returns:
        ``(params, wrap)``: the tree (numpy leaves) and ``wrap(apply) -> apply`` that applies
        the method in the model's forward pass.
    """
    p = peft
    if method == "none":
        return params, lambda apply: apply
    if method in ("lora", "dora"):
        module = lora if method == "lora" else dora
        params = module.init(
            params, rng, targets=list(p.targets), rank=p.rank, alpha=p.alpha, what="config.peft"
        )
        dropout = p.get("dropout", 0.0)

        def wrap(apply):
            return module.wrap_apply(apply, alpha=p.alpha, rank=p.rank, dropout=dropout)

    elif method == "ia3":
        params = ia3.init(
            params,
            targets_out=list(p.ia3_targets_out),
            targets_in=list(p.ia3_targets_in),
            what="config.peft",
        )
        wrap = ia3.wrap_apply
    elif method == "adapters":
        params = adapters.init(
            params, rng, sites=sites, bottleneck=p.bottleneck, what="config.peft"
        )
        wrap = adapters.wrap_apply
    elif method == "prompt":
        params = prompt.init(params, rng, sites=sites, length=p.length, what="config.peft")
        wrap = prompt.wrap_apply
    elif method == "prefix":
        params = prefix.init(
            params,
            rng,
            sites=sites,
            length=p.length,
            hidden_mlp=p.prefix_hidden_mlp,
            what="config.peft",
        )

        def wrap(apply):
            return prefix.wrap_apply(apply, sites)

    elif method == "reft":
        try:
            params = reft.init(
                params, rng, sites=sites, layers=list(p.reft_layers), rank=p.rank,
                what="config.peft",
            )  # fmt: skip
        except ValueError as e:  # reft.init's `layers` is this config's `peft.reft_layers`
            raise ValueError(
                str(e).replace("config.peft.layers", "config.peft.reft_layers")
            ) from None

        def wrap(apply):
            return reft.wrap_apply(
                apply, first_n=p.reft_first_n, last_n=p.reft_last_n, what="config.peft"
            )

    else:
        raise ValueError(f"config.peft.method={method!r}; expected one of {PEFT_METHODS}")
    return jax.tree.map(np.asarray, params), wrap


# -- the BERT classifier -------------------------------------------------------------------------


def encoder_classifier(config: ml_collections.ConfigDict) -> tuple[bert.BertClassifier, dict]:
    """The classifier and its initial parameters (pretrained encoder + fresh head)."""
    from third_party import minilm  # noqa: PLC0415 - reads weights only for this model

    pretrained = None
    m = config.model
    what = "all-MiniLM-L6-v2"
    if m.encoder == "hf":
        pretrained, what = hf_encoder(m.path), m.path
        encoder_config = pretrained.config
        if not m.get("pretrained", True):  # the folder's architecture, random weights
            pretrained = None
        room = encoder_config.max_position_embeddings - encoder_config.position_offset
        if config.data.max_length > room:
            raise ValueError(
                f"config.data.max_length={config.data.max_length} is more than the {room} "
                f"positions of {m.path}; lower it."
            )
    elif m.encoder == "minilm" and m.get("pretrained", True):
        pretrained = minilm.load()
        encoder_config = pretrained.config
    elif m.encoder == "minilm":
        encoder_config = minilm.architecture()
    elif m.encoder == "tiny":
        # MiniLM's tokenizer still does the tokenizing: the tiny model needs its vocabulary.
        encoder_config = bert.BertConfig.tiny(vocab_size=30522, max_position_embeddings=512)
    else:
        raise ValueError(f"config.model.encoder={m.encoder!r}; expected minilm, tiny or hf")
    kernel = m.get("attention", "auto")
    attention.check(kernel, what="config.model.attention")
    dtype = compute_dtype(config)
    encoder_config = dataclasses.replace(
        encoder_config,
        dropout_rate=m.dropout_rate,
        attention_dropout_rate=m.get("attention_dropout_rate"),
        attention=kernel,
        dtype=dtype,
    )
    model = bert.BertClassifier(
        encoder_config, num_classes=config.model.num_classes, pooling=config.model.pooling
    )
    ids = jnp.zeros((1, config.data.max_length), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(config.seed), ids, jnp.ones_like(ids))
    params = jax.tree.map(np.asarray, params["params"])
    if pretrained is not None:
        params = loading.merge_pretrained(
            params,
            {"encoder": pretrained.params},
            dont_load=config.model.dont_load,
            what=what,
        )
    return model, params


class HFEncoder(NamedTuple):
    """An encoder checkpoint folder's `BertConfig`, weights and tokenizer files."""

    config: bert.BertConfig
    params: dict
    tokenizer: Any


def hf_encoder(path: str) -> HFEncoder:
    """Loads a Hugging Face encoder folder (BERT, RoBERTa, DistilBERT) for the classifier.

    Raises:
        ValueError: naming ``config.model.path`` when the folder holds a decoder, has no
            tokenizer, or `third_party.hf.load` refuses it.
    """
    from third_party import hf  # noqa: PLC0415 - reads weights only for this model

    if not path:
        raise ValueError("config.model.path is empty; pass --config.model.path=DIR (a folder).")
    try:
        model_config, params, tokenizer = hf.load(path)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"config.model.path={path!r}: {e}") from e
    if model_config.model_type in hf.DECODERS:
        raise ValueError(
            f"config.model.path={path!r} holds a {model_config.model_type} decoder; the "
            "classifier needs an encoder (BERT, RoBERTa or DistilBERT)."
        )
    if tokenizer is None:
        raise ValueError(f"config.model.path={path!r} has no tokenizer.json to encode the data.")
    return HFEncoder(model_config.config, params, tokenizer)


def classifier_apply(model: bert.BertClassifier):
    """``apply(params, batch, rng) -> logits``; dropout on when an rng is given (training)."""

    def apply(params, batch, rng):
        kwargs = {} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}
        return model.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], **kwargs
        )

    return apply


# Methods that attach through the model's hook sites (`ftlab.models.hooks`).
STRUCTURAL = ("adapters", "prompt", "prefix", "reft")


def encoder_sites(config: ml_collections.ConfigDict, params, apply) -> tuple[hooks.Site, ...]:
    """The model's hook sites (`hooks.discover`), traced on a one-row batch of the data's length."""
    ids = np.zeros((1, config.data.max_length), np.int32)
    return hooks.discover(
        apply, params, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, None
    )


def encoder_method(config: ml_collections.ConfigDict, params, apply, *, sites=None):
    """Applies ``config.peft``'s tree transformation (`add_method`) to the classifier.

    Returns ``(params, apply)``. ``sites``: the model's hook sites (`encoder_sites`), traced here
    when needed.
    """
    if config.peft.method in STRUCTURAL and sites is None:
        sites = encoder_sites(config, params, apply)
    rng = jax.random.PRNGKey(config.seed + 1)
    params, wrap = add_method(config.peft, config.peft.method, params, rng, sites=sites)
    return params, wrap(apply)


def save_method(
    config: ml_collections.ConfigDict, trainable, frozen, workdir: pathlib.Path, *, sites=None
) -> dict:
    """Writes the trained leaves alone (method leaves + head), not the frozen base.

    LoRA adapters are also exported in Hugging Face PEFT's format (``adapter_peft/``). Prefix
    tuning needs the model's hook ``sites`` (`encoder_sites`) to lay out its prefixes.
    """
    from third_party import peft_format  # noqa: PLC0415 - only LoRA exports

    if config.peft.method == "none":
        return {}
    trainable = jax.device_get(trainable)
    if config.peft.method == "prefix":
        # Inference needs only the prefixes: evaluate the reparametrising MLP once, drop it.
        full = prefix.finalize(partition.merge(trainable, jax.device_get(frozen)), sites)
        trainable = partition.merge(prefix.adapter(full), {"head": trainable["head"]})
    path = workdir / "adapter.safetensors"
    safetensors_numpy.save_file(
        {k: np.asarray(v) for k, v in partition.flatten(trainable).items()},
        str(path),
        metadata={"peft": json.dumps(config.peft.to_dict())},
    )
    if config.peft.method == "lora":
        peft_format.export(
            workdir / "adapter_peft",
            lora.adapter(trainable),
            rank=config.peft.rank,
            alpha=config.peft.alpha,
            lora_dropout=config.peft.dropout,
        )
    return {"adapter_bytes": path.stat().st_size}


# -- the Llama decoder (SmolLM2 or a tiny stand-in) and its prompted tasks -----------------------

DECODER_TASKS = {
    "sentiment": icl.Task(
        instruction="Classify the sentiment of each movie review as positive or negative.",
        template="Review: {text}\nSentiment:",
        label_words=(" negative", " positive"),  # rotten_tomatoes labels: rotten 0, fresh 1
    ),
    "subjectivity": icl.Task(
        instruction="Say whether each movie text is a plot summary or a critic's opinion.",
        template="Text: {text}\nType:",
        label_words=(" opinion", " plot"),  # rotten_tomatoes labels: review 0, plot 1
    ),
}


class Decoder:
    """What prompting and scoring need: config, params, tokenizer, pad id."""

    def __init__(self, config, params, tokenizer, pad_id):
        self.config, self.params, self.tokenizer, self.pad_id = config, params, tokenizer, pad_id


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """``config.model.dtype`` (absent: float32), the model's computation dtype; the weights stay
    float32. Anything but float32 or bfloat16 is an error naming the key."""
    dtype = config.model.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype={dtype!r}; expected 'float32' or 'bfloat16'")
    return jnp.dtype(dtype)


def decoder_model_options(config: ml_collections.ConfigDict) -> dict:
    """The ``config.model`` keys `decoder` reads, for a trainer that builds its own sub-config."""
    m = config.model
    return {"name": m.name, "vocab_size": m.vocab_size, "dtype": m.get("dtype", "float32")}


def decoder(config: ml_collections.ConfigDict, texts: list[str]) -> Decoder:
    """SmolLM2, or (`config.model.name == "tiny"`) a random tiny Llama with a word-level stand-in
    tokenizer built from `texts` (for end-to-end tests: seconds instead of minutes).

    ``config.model.dtype``: the computation dtype (`compute_dtype`, `llama.LlamaConfig.dtype`).
    """
    dtype = compute_dtype(config)
    if config.model.name == "smollm2":
        from third_party import smollm2  # noqa: PLC0415 (loads 540 MB of weights)

        m = smollm2.load()
        cfg = dataclasses.replace(m.config, dtype=dtype)
        # Stacked once here, so the compiled prefill/score do not restack 30 layers per call.
        return Decoder(cfg, llama.stack_layers(m.params), m.tokenizer, m.pad_id)
    if config.model.name != "tiny":
        raise ValueError(f"config.model.name={config.model.name!r}; expected 'smollm2' or 'tiny'.")
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415

    words: dict[str, int] = {"[UNK]": 0, "[PAD]": 1}
    extra = " ".join(
        t.instruction + " " + t.template + " ".join(t.label_words) for t in DECODER_TASKS.values()
    )
    for text in [extra, *texts]:
        for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text):
            if len(words) < config.model.vocab_size:
                words.setdefault(w, len(words))
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = llama.LlamaConfig.tiny(
        vocab_size=config.model.vocab_size, max_position_embeddings=1024, dtype=dtype
    )
    return Decoder(cfg, llama.init(cfg, jax.random.key(config.seed)), tok, 1)


DECODER_METHODS = ("prompt", "prefix", "lora", "qlora")


def decoder_method(peft: ml_collections.ConfigDict, method: str, params, rng, *, model_config):
    """`add_method` for the decoder: ``(params, rules, wrap, to_plain)``, ``to_plain(trained)``
    the plain tree the prompts score (LoRA merged, the prefix MLP evaluated and dropped, the
    Q4 base dequantised).

    ``model_config``: the decoder's `llama.LlamaConfig`, to trace its hook sites.
    """
    sites = None
    if method not in DECODER_METHODS:
        raise ValueError(f"config.methods: {method!r} is not one of {DECODER_METHODS}.")
    if method in ("prompt", "prefix"):
        if method == "prefix" and llama.LAYERS in params["decoder"]:
            # A prefix per layer needs the layers one by one: unstack the scanned layers (the
            # loss stacks them again, prefixes included, so the step still compiles one layer).
            params = llama.unstack_layers(params)
        module = llama.LlamaForCausalLM(model_config)
        ids = jnp.ones((1, 2), jnp.int32)
        sites = hooks.discover(lambda q: module.apply({"params": q}, ids), params)
    # QLoRA trains the LoRA leaves of a quantised base
    params, wrap = add_method(peft, method.removeprefix("q"), params, rng, sites=sites)
    if method == "prompt":
        return params, prompt.rules(), wrap, (lambda t: t)
    if method == "prefix":
        return params, prefix.rules(), wrap, functools.partial(prefix.finalize, sites=sites)

    def stacked(f):
        # Stack before the wrapper, so that it checks the tree the model sees (the LoRA
        # leaves are consumed at `decoder/layers/...`); stacking again inside is a no-op.
        g = wrap(f)
        return lambda q, *args: g(llama.stack_if_uniform(q), *args)

    p = peft
    if method == "lora":
        return params, lora.rules(), stacked, lambda t: lora.merge(t, alpha=p.alpha, rank=p.rank)
    params = qlora.quantize(params, targets=list(p.qlora_targets), what="config.peft.qlora")
    return params, lora.rules(), stacked, lambda t: qlora.merge(t, alpha=p.alpha, rank=p.rank)


def partition_of(params, rules, *, what: str) -> tuple[Any, int]:
    """``(label_tree, trainable parameters)`` of ``rules`` over ``params`` (`partition.labels`;
    ``what`` names the rules in its errors); process 0 logs each rule's claims and prints the
    partition's summary, for the start-up log."""
    label_tree = partition.labels(params, rules, what=what)
    if loop.is_chief():
        for pattern, label, n in partition.claims(params, rules):
            logging.info("partition rule %-24r -> %-8s claims %d leaves", pattern, label, n)
        print(partition.summary(params, label_tree), flush=True)
    return label_tree, partition.count(partition.split(params, label_tree)[0])


def adamw(config: ml_collections.ConfigDict, label_tree) -> optax.GradientTransformation:
    """``config.optim``'s AdamW: linear warmup then cosine decay, gradient clipping, no weight
    decay on biases and norms (1-D leaves); one instance per trainable group of ``label_tree``.

    Reads ``optim.lr``, ``warmup_steps``, ``num_steps``, ``grad_clip_norm``, ``weight_decay``.
    """
    o = config.optim
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.lr, warmup_steps=o.warmup_steps, decay_steps=max(o.num_steps, o.warmup_steps + 1)
    )

    def tx():
        return optax.chain(
            optax.clip_by_global_norm(o.grad_clip_norm),
            optax.adamw(
                schedule,
                weight_decay=o.weight_decay,
                mask=lambda t: jax.tree.map(lambda x: np.ndim(x) > 1, t),
            ),
        )

    groups = set(partition.flatten(partition.trainable_labels(label_tree)).values())
    return partition.optimizer({g: tx() for g in groups}, label_tree)
