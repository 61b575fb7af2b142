"""LoReFT: low-rank interventions on hidden states, as a tree transformation plus an interceptor.

``init`` adds, for each chosen layer, the intervention's leaves::

    encoder/layer_3/reft/rotation   [r, hidden]   trained; R = orthonormal_rows(rotation)
    encoder/layer_3/reft/weight     [r, hidden]   trained; W, starts equal to R
    encoder/layer_3/reft/bias       [r]           trained; b, starts at zero

and the layer's output ``h`` at the chosen positions becomes ``h + R^T (W h + b - R h)``: an edit
confined to the r-dimensional subspace spanned by R's rows. It is computed as
``R^T ((W - R) h + b)``, so at init (W = R, b = 0) the edit is exactly zero. (The whole jitted
model then agrees with the base model to one float32 ulp, not bit for bit: the hook changes how
XLA fuses the layer norm with the next dense layer.)

R must keep orthonormal rows while an ordinary optimizer moves it. The leaf ``rotation`` is a
free matrix and the forward pass uses ``orthonormal_rows(rotation)`` (the Q factor of its QR
decomposition, with signs fixed so that an orthonormal input maps to itself), so R R^T = I holds
to float precision at every step whatever the update; pyreft uses PyTorch's orthogonal
parametrisation to the same end. (The QR's gradient needs ``rotation`` to keep full row rank,
which a random start and small steps keep.)

Positions are static settings, not leaves: the first ``first_n`` and the last ``last_n`` real
tokens of each sequence (paper's "f1+l1" is ``first_n=1, last_n=1``), found from the attention
mask with static shapes (no dynamic slicing; padding and soft-prompt positions never count).
Where the two ranges overlap in a short sequence the position is edited once. They reach the
model through :func:`wrap_apply`, which installs an interceptor on the model's hidden-state hook
(`BertLayer.intervene`) inside the traced function, as `ftlab.peft.dense` does for LoRA. Applying
a tree with ``reft`` leaves without it is an error, never a silent no-op. A typical run::

    params = reft.init(params, rng, layers=[2, 4], rank=4)
    label_tree = partition.labels(params, reft.rules(extra=[("head/.*", "train")]))
    apply = reft.wrap_apply(apply, first_n=1, last_n=1)   # apply(params, batch, rng) -> logits

References:
    Wu et al., "ReFT: Representation Finetuning for Language Models",
    https://arxiv.org/abs/2404.03592
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab.core import partition, sites
from ftlab.models import bert
from ftlab.types import Params, PRNGKey

LEAVES = ("rotation", "weight", "bias")
_LAYER = re.compile(r"(?P<layer>(?:.*/)?layer_(?P<index>\d+))/attention/key/kernel")
_REFT_LEAF = re.compile(rf"(.*/)?layer_\d+/{bert.REFT}/({'|'.join(LEAVES)})")


@dataclasses.dataclass(frozen=True)
class Positions:
    """Which real tokens an intervention edits (static, not leaves).

    Attributes:
        first_n: Edit the first ``first_n`` real tokens.
        last_n: Edit the last ``last_n`` real tokens.
        what: How to name the config group in errors.
    """

    first_n: int = 1
    last_n: int = 1
    what: str = "config.peft"

    def __post_init__(self):
        for name in ("first_n", "last_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{self.what}.{name}={v!r} must be an integer >= 0.")
        if self.first_n == 0 and self.last_n == 0:
            raise ValueError(
                f"{self.what}.first_n and {self.what}.last_n are both 0, so no position would be "
                "edited; the paper's default is first_n=1, last_n=1."
            )


def orthonormal_rows(matrix: jax.Array) -> jax.Array:
    """The `[r, d]` matrix with orthonormal rows spanning the rows of ``matrix`` (r <= d).

    Gram-Schmidt order via QR of ``matrix.T``, with the signs chosen so that the result is
    ``matrix`` itself (to rounding) when ``matrix`` already has orthonormal rows. Differentiable.

    >>> r = orthonormal_rows(jnp.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    >>> (r + 0.0).tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    """
    q, upper = jnp.linalg.qr(matrix.astype(jnp.float32).T)
    signs = jnp.where(jnp.diagonal(upper) < 0, -1.0, 1.0).astype(jnp.float32)
    return (q * signs[None, :]).T


def positions(token_mask: jax.Array, *, first_n: int, last_n: int) -> jax.Array:
    """Boolean `[batch, seq]`: the first ``first_n`` and last ``last_n`` real tokens per row.

    Args:
        token_mask: `[batch, seq]`, nonzero at real tokens (anywhere in the row, not just a
            prefix).
        first_n: How many real tokens to take from the start.
        last_n: How many from the end.

    >>> positions(jnp.array([[1, 1, 1, 1, 0]]), first_n=1, last_n=2).astype(int).tolist()
    [[1, 0, 1, 1, 0]]
    """
    real = jnp.asarray(token_mask) > 0
    # 1-based rank of each real token among the real tokens of its row; static shapes throughout.
    rank = jnp.cumsum(real.astype(jnp.int32), axis=-1)
    count = rank[:, -1:]
    return real & ((rank <= first_n) | (rank > count - last_n))


def init(
    params: Params,
    rng: PRNGKey,
    *,
    layers: Sequence[int],
    rank: int,
    what: str = "config.peft",
) -> dict:
    """Adds a LoReFT intervention after each layer in ``layers``.

    Positions are not chosen here: they are static settings of :func:`wrap_apply`.

    Args:
        params: A BERT tree (`BertEncoder` or `BertClassifier`) without interventions.
        rng: Key for the initial rotations.
        layers: Indices of the layers whose outputs are edited (the paper edits all layers or a
            few; e.g. ``[2, 4]``).
        rank: The subspace dimension r (the paper uses 1 to 8), at most the hidden width.
        what: How to name the config group in errors.

    Returns:
        A new tree with ``<layer>/reft/{rotation,weight,bias}``: ``rotation`` a random
        orthonormal [r, hidden], ``weight`` equal to ``orthonormal_rows(rotation)`` and ``bias``
        zero, so the intervention is exactly zero at init.

    Raises:
        ValueError: a bad ``rank`` or layer index (naming ``config.peft.<field>``), or
            interventions already in the tree.

    >>> p = {"layer_0": {"attention": {"key": {"kernel": np.zeros((4, 4))}}}}
    >>> sorted(init(p, jax.random.key(0), layers=[0], rank=2)["layer_0"]["reft"])
    ['bias', 'rotation', 'weight']
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"{what}.rank={rank!r} must be an integer >= 1 (the paper uses 1 to 8).")
    if isinstance(layers, (str, int)) or not len(layers):
        raise ValueError(f"{what}.layers={layers!r} must be a non-empty list of layer indices.")
    flat = partition.flatten(params)
    found = {int(m["index"]): m["layer"] for k in flat if (m := _LAYER.fullmatch(k))}
    if not found:
        raise ValueError(
            f"reft.init: no '<...>/layer_<i>/attention/key/kernel' in the tree (example leaf: "
            f"{next(iter(flat), None)!r}); pass a BERT encoder or classifier tree."
        )
    for j, i in enumerate(layers):
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or int(i) not in found:
            raise ValueError(
                f"{what}.layers[{j}]={i!r} is not a layer of this model; it has layers "
                f"0..{max(found)}."
            )
    if len(set(int(i) for i in layers)) != len(layers):
        raise ValueError(f"{what}.layers={list(layers)} repeats a layer; list each once.")
    existing = [k for k in flat if _REFT_LEAF.fullmatch(k)]
    if existing:
        raise ValueError(
            f"reft.init: {existing[0]} already exists; start from the base parameters."
        )
    # The residual stream's width is the key projection's *input* size (its output is narrower
    # under grouped-query attention, e.g. 192 against 576 in SmolLM2).
    hidden = np.shape(flat[f"{found[int(layers[0])]}/attention/key/kernel"])[0]
    if rank > hidden:
        raise ValueError(
            f"{what}.rank={rank} exceeds the hidden width {hidden}; R has orthonormal rows, so "
            f"use {what}.rank <= {hidden}."
        )
    out = dict(flat)
    for i in sorted(int(i) for i in layers):
        key = jax.random.fold_in(rng, i)
        rotation = orthonormal_rows(jax.random.normal(key, (rank, hidden), jnp.float32))
        out[f"{found[i]}/{bert.REFT}/rotation"] = rotation
        out[f"{found[i]}/{bert.REFT}/weight"] = jax.jit(orthonormal_rows)(rotation)
        out[f"{found[i]}/{bert.REFT}/bias"] = jnp.zeros((rank,), jnp.float32)
    return partition.unflatten(out)


def intervene(leaves: Mapping[str, jax.Array], h: jax.Array, where: jax.Array) -> jax.Array:
    """``h + R^T (W h + b - R h)`` at the positions ``where``, ``h`` elsewhere.

    Args:
        leaves: ``{"rotation": [r, d], "weight": [r, d], "bias": [r]}``.
        h: Hidden states `[batch, seq, d]`.
        where: Boolean `[batch, seq]`.

    Returns:
        The edited hidden states, in the dtype of ``h``.

    >>> leaves = {"rotation": jnp.array([[1.0, 0.0]]), "weight": jnp.array([[0.0, 0.0]]),
    ...           "bias": jnp.array([5.0])}
    >>> h = jnp.array([[[2.0, 3.0], [2.0, 3.0]]])
    >>> intervene(leaves, h, jnp.array([[True, False]])).tolist()
    [[[5.0, 3.0], [2.0, 3.0]]]
    """
    r = orthonormal_rows(leaves["rotation"])
    w = leaves["weight"].astype(jnp.float32)
    dot = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
    # (W - R) h rather than W h - R h: exactly zero when W == R, so init is an exact identity.
    b = leaves["bias"].astype(jnp.float32)[None, None, :]
    coords = dot("bsd,rd->bsr", h.astype(jnp.float32), w - r) + b
    delta = dot("bsr,rd->bsd", coords, r)
    return jnp.where(where[..., None], h + delta.astype(h.dtype), h)


def _leaves(module: nn.Module) -> dict | None:
    if not module.has_variable("params", bert.REFT):
        return None
    tree = module.variables["params"][bert.REFT]
    sites.consume(module, bert.REFT)
    path = "/".join(module.scope.path) + f"/{bert.REFT}"
    got = {}
    for leaf in LEAVES:
        if not isinstance(tree, Mapping) or tree.get(leaf) is None:
            raise ValueError(
                f"{path}/{leaf} is missing; an intervention needs {', '.join(LEAVES)}. "
                "Re-create it with reft.init(...)."
            )
        got[leaf] = tree[leaf]
    rot, w, b = got["rotation"], got["weight"], got["bias"]
    if (
        rot.ndim != 2
        or w.shape != rot.shape
        or b.shape != rot.shape[:1]
        or rot.shape[0] > rot.shape[1]
    ):
        raise ValueError(
            f"{path}: rotation {rot.shape}, weight {w.shape} and bias {b.shape} must be "
            "[r, hidden], [r, hidden] and [r] with r <= hidden."
        )
    return got


def _interceptor(where: Positions) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != bert.INTERVENE_METHOD:
            return next_fun(*args, **kwargs)
        leaves = _leaves(context.module)
        if leaves is None:
            return next_fun(*args, **kwargs)
        h, token_mask = args
        sel = positions(token_mask, first_n=where.first_n, last_n=where.last_n)
        return intervene(leaves, h, sel)

    return interceptor


@contextlib.contextmanager
def intercept(*, first_n: int = 1, last_n: int = 1, what: str = "config.peft") -> Iterator[None]:
    """Applies every ``reft`` intervention in the tree while active; enter it inside traces.

    Args:
        first_n: Edit the first ``first_n`` real tokens of each sequence.
        last_n: Edit the last ``last_n`` real tokens.
        what: How to name the config group in errors.

    Raises:
        ValueError: both counts are 0, or (at apply time) an intervention is incomplete or
            mis-shaped (naming the leaf path).
    """
    where = Positions(first_n=first_n, last_n=last_n, what=what)
    with nn.intercept_methods(_interceptor(where)):
        yield


def wrap_apply(
    apply_fn: Callable, *, first_n: int = 1, last_n: int = 1, what: str = "config.peft"
) -> Callable:
    """Returns ``apply_fn`` running inside :func:`intercept`, same signature and result.

    Wrapping (rather than entering the context around a jitted call) puts the interceptor
    inside whatever `jax.jit` or `jax.grad` traces it.

    >>> model = bert.BertEncoder(bert.BertConfig.tiny(dropout_rate=0.0))
    >>> ids = jnp.ones((1, 4), jnp.int32)
    >>> p = init(model.init(jax.random.key(0), ids, ids)["params"], jax.random.key(1),
    ...          layers=[1], rank=2)
    >>> f = wrap_apply(lambda q: model.apply({"params": q}, ids, ids), first_n=1, last_n=0)
    >>> jax.jit(f)(p).shape
    (1, 4, 16)
    """
    Positions(first_n=first_n, last_n=last_n, what=what)  # validate now, not at trace time

    @functools.wraps(apply_fn)
    def wrapped(*args, **kwargs):
        with intercept(first_n=first_n, last_n=last_n, what=what):
            return apply_fn(*args, **kwargs)

    return wrapped


def rules(*, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Partition rules that train the interventions (and ``extra``) and freeze the rest.

    >>> rules()
    [('(.*/)?layer_\\\\d+/reft/.*', 'train'), ('.*', 'frozen')]
    """
    return [*extra, (rf"(.*/)?layer_\d+/{bert.REFT}/.*", "train"), (".*", partition.FROZEN)]


def adapter(params: Params) -> dict:
    """The intervention leaves of ``params`` only.

    Raises:
        ValueError: ``params`` holds no intervention.

    >>> adapter({"layer_0": {"reft": {"bias": 1}, "mlp": {"kernel": 2}}})
    {'layer_0': {'reft': {'bias': 1}}}
    """
    flat = partition.flatten(params)
    out = {k: v for k, v in flat.items() if _REFT_LEAF.fullmatch(k)}
    if not out:
        top = sorted({k.split("/")[0] for k in flat})
        raise ValueError(
            f"reft.adapter: no '<...>/layer_<i>/{bert.REFT}/...' leaf in the tree (top-level "
            f"names: {', '.join(top)}); add them with reft.init(...) first."
        )
    return partition.unflatten(out)
