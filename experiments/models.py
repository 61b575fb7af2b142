"""Models that several trainers build from a config: the BERT classifier and the Llama decoder.

Trainers import these from here, never from one another (``multitask`` trains the classifier
with a LoRA per task, ``decoder_tuning`` tunes the decoder that ``icl`` prompts).

`experiments/trainers/classification.py` names `encoder_classifier` and `classifier_apply`
`build_model` and `make_apply`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ftlab import icl
from ftlab.core import loading
from ftlab.models import attention, bert, llama

__all__ = ["DECODER_TASKS", "Decoder", "classifier_apply", "decoder", "encoder_classifier"]


# -- the BERT classifier -------------------------------------------------------------------------


def encoder_classifier(config: ml_collections.ConfigDict) -> tuple[bert.BertClassifier, dict]:
    """The classifier and its initial parameters (pretrained encoder + fresh head)."""
    from third_party import minilm  # noqa: PLC0415 - reads weights only for this model

    pretrained = None
    m = config.model
    if m.encoder == "minilm" and m.get("pretrained", True):
        pretrained = minilm.load()
        encoder_config = pretrained.config
    elif m.encoder == "minilm":
        encoder_config = minilm.architecture()
    elif m.encoder == "tiny":
        # MiniLM's tokenizer still does the tokenizing: the tiny model needs its vocabulary.
        encoder_config = bert.BertConfig.tiny(vocab_size=30522, max_position_embeddings=512)
    else:
        raise ValueError(f"config.model.encoder={m.encoder!r}; expected minilm or tiny")
    kernel = m.get("attention", "auto")
    attention.check(kernel, what="config.model.attention")
    dtype = m.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype={dtype!r}; expected 'float32' or 'bfloat16'")
    encoder_config = dataclasses.replace(
        encoder_config,
        dropout_rate=m.dropout_rate,
        attention_dropout_rate=m.get("attention_dropout_rate"),
        attention=kernel,
        dtype=jnp.dtype(dtype),
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
            what="all-MiniLM-L6-v2",
        )
    return model, params


def classifier_apply(model: bert.BertClassifier):
    """``apply(params, batch, rng) -> logits``; dropout on when an rng is given (training)."""

    def apply(params, batch, rng):
        kwargs = {} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}
        return model.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], **kwargs
        )

    return apply


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


def decoder(config: ml_collections.ConfigDict, texts: list[str]) -> Decoder:
    """SmolLM2, or (`config.model.name == "tiny"`) a random tiny Llama with a word-level stand-in
    tokenizer built from `texts` (for end-to-end tests: seconds instead of minutes)."""
    if config.model.name == "smollm2":
        from third_party import smollm2  # noqa: PLC0415 (loads 540 MB of weights)

        m = smollm2.load()
        # Stacked once here, so the compiled prefill/score do not restack 30 layers per call.
        return Decoder(m.config, llama.stack_layers(m.params), m.tokenizer, m.pad_id)
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
    cfg = llama.LlamaConfig.tiny(vocab_size=config.model.vocab_size, max_position_embeddings=1024)
    return Decoder(cfg, llama.init(cfg, jax.random.key(config.seed)), tok, 1)
