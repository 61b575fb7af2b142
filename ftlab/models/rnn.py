"""A recurrent language model (GRU or LSTM) whose every weight is an ordinary Flax leaf.

``RNNLM`` embeds token (or byte) ids, runs ``num_layers`` recurrent layers and a ``head``
projection to the vocabulary. Each layer is Flax's own cell (`nn.GRUCell` or `nn.LSTMCell`)
under `nn.RNN` (a lifted `nn.scan` over time), so the input and recurrent kernels are plain
`nn.Dense` leaves at ``layer_<i>/cell/<gate>/kernel``::

    embed/embedding              [vocab, embed_dim]
    layer_0/cell/{ir,iz,in}      input kernels [in, hidden]      (GRU; LSTM: ii, if, ig, io)
    layer_0/cell/{hr,hz,hn}      recurrent kernels [hidden, hidden]   (LSTM: hi, hf, hg, ho)
    head                         [hidden, vocab]

and every dense-layer method of `ftlab.peft.dense` (LoRA, DoRA, IA3) reaches them without an
edit of the model: the interceptor acts inside the scan, once per time step, on the shared
weights. (Flax's ``OptimizedLSTMCell`` fuses its gates and reads its kernels itself, so it is
not offered: LoRA could not reach it.)

Hook sites (`ftlab.models.hooks`): ``embeddings`` at the root (a soft prompt is read by the
recurrence before the text; its positions are dropped from the logits) and ``hidden`` after
each layer (ReFT). Prefix tuning and adapters need attention or sublayer sites that a
recurrent net does not have.

References:
    Cho et al., "Learning Phrase Representations using RNN Encoder-Decoder" (GRU),
    https://arxiv.org/abs/1406.1078
    Hochreiter & Schmidhuber, "Long Short-Term Memory", Neural Computation 1997.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftlab.models import hooks
from ftlab.types import Params, PRNGKey

__all__ = [
    "CELLS",
    "RNNLM",
    "RecurrentLayer",
    "bits_per_token",
    "initial_carries",
    "make_loss_fn",
    "sample",
]

CELLS = {"gru": nn.GRUCell, "lstm": nn.LSTMCell}


class RecurrentLayer(nn.Module):
    """One recurrent layer ``[batch, seq, in] -> [batch, seq, hidden]`` and its final carry.

    Attributes:
        hidden: Width of the state.
        cell: ``"gru"`` or ``"lstm"``.
    """

    hidden: int
    cell: str = "gru"

    @nn.compact
    def __call__(self, x: jax.Array, carry: Any = None, token_mask: jax.Array | None = None):
        cell = CELLS[self.cell](self.hidden, name="cell")
        carry, h = nn.RNN(cell, return_carry=True)(x, initial_carry=carry)
        mask = jnp.ones(h.shape[:2], jnp.int32) if token_mask is None else token_mask
        return carry, hooks.hidden(self, h, mask)


class RNNLM(nn.Module):
    """Next-token model ``ids [batch, seq] -> logits [batch, seq, vocab]``.

    Attributes:
        vocab_size: Number of token ids.
        embed_dim: Width of the input embedding.
        hidden: Width of every recurrent layer.
        num_layers: Stacked recurrent layers.
        cell: ``"gru"`` or ``"lstm"`` (`CELLS`).
    """

    vocab_size: int
    embed_dim: int = 64
    hidden: int = 256
    num_layers: int = 1
    cell: str = "gru"

    @nn.compact
    @hooks.track_root
    def __call__(self, ids: jax.Array, carries: Sequence[Any] | None = None, *, prompt=True):
        """Logits of the next token at every position, and each layer's final carry.

        Args:
            ids: `[batch, seq]` int token ids.
            carries: Each layer's carry to continue from (`initial_carries`, or the carries a
                previous call returned); None starts from zeros.
            prompt: Whether a soft prompt (if the tree has one) is read first; False for the
                continuation of a sequence that started with it.

        Returns:
            ``(logits [batch, seq, vocab], carries)``.

        Raises:
            ValueError: ``cell`` is not one of `CELLS`.
        """
        if self.cell not in CELLS:
            raise ValueError(f"RNNLM: cell={self.cell!r}; expected one of {sorted(CELLS)}")
        seq = ids.shape[1]
        x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(ids)
        x = hooks.embeddings(self, x, table="embed/embedding", prepend=prompt)
        # Prompt rows are not text: ReFT and the like see them masked out.
        mask = jnp.concatenate(
            [jnp.zeros((x.shape[0], x.shape[1] - seq), jnp.int32), jnp.ones(ids.shape, jnp.int32)],
            axis=1,
        )
        out = []
        for i in range(self.num_layers):
            carry = None if carries is None else carries[i]
            layer = RecurrentLayer(self.hidden, self.cell, name=f"layer_{i}")
            carry, x = layer(x, carry, mask)
            out.append(carry)
        logits = nn.Dense(self.vocab_size, name="head")(x[:, x.shape[1] - seq :])
        return logits, tuple(out)


def initial_carries(model: RNNLM, batch: int) -> tuple:
    """Zero carries of every layer for ``batch`` sequences (what a fresh call starts from)."""
    cell = CELLS[model.cell](model.hidden, parent=None)
    return tuple(
        cell.initialize_carry(jax.random.key(0), (batch, model.hidden))
        for _ in range(model.num_layers)
    )


def make_loss_fn(apply: Callable[[Params, jax.Array], jax.Array]):
    """Mean next-token cross-entropy (nats) of ``apply(params, inputs) -> logits``.

    The batch holds ``inputs`` and ``targets``, both `[batch, seq]` (``targets`` = ``inputs``
    shifted by one); aux reports ``bits_per_token``.
    """

    def loss_fn(params, batch, rng):
        del rng  # no dropout
        logits = apply(params, batch["inputs"]).astype(jnp.float32)
        loss = jnp.mean(
            jax.nn.logsumexp(logits, -1)
            - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        )
        return loss, {"bits_per_token": loss / math.log(2)}

    return loss_fn


def bits_per_token(nats: float) -> float:
    """Nats per token to bits per token.

    >>> round(bits_per_token(math.log(2)), 6)
    1.0
    """
    return float(nats) / math.log(2)


def sample(
    apply: Callable,
    params: Params,
    prompt_ids: jax.Array,
    rng: PRNGKey,
    *,
    steps: int,
    temperature: float = 1.0,
) -> jax.Array:
    """Continues ``prompt_ids`` by ``steps`` sampled tokens, one recurrent step at a time.

    Args:
        apply: ``apply(params, ids, carries, prompt) -> (logits, carries)`` (e.g.
            ``lambda p, *a: model.apply({"params": p}, *a)``, wrapped by a method's
            ``wrap_apply``).
        params: The model's tree.
        prompt_ids: `[batch, n]` ids the sample starts from (n >= 1).
        rng: Draws the tokens.
        steps: Tokens to sample.
        temperature: Softmax temperature (> 0).

    Returns:
        `[batch, steps]` sampled ids.
    """
    if temperature <= 0:
        raise ValueError(f"sample: temperature={temperature}; expected a number > 0")
    logits, carries = apply(params, prompt_ids, None, True)
    first = jax.random.categorical(rng, logits[:, -1] / temperature)

    def body(state, key):
        token, carries = state
        logits, carries = apply(params, token[:, None], carries, False)
        nxt = jax.random.categorical(key, logits[:, -1] / temperature)
        return (nxt, carries), token

    keys = jax.random.split(jax.random.fold_in(rng, 1), steps)
    _, tokens = jax.lax.scan(body, (first, carries), keys)
    return tokens.T
