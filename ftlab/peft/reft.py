"""LoReFT: low-rank interventions on hidden states, as a tree transformation plus a hook handler.

``init`` adds, for each chosen hidden-state site (`ftlab.models.hooks.hidden`, found by
`hooks.discover`; on ftlab's models one per layer, in order), the intervention's leaves::

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
model through :func:`wrap_apply`, which installs a handler on the model's hidden-state hook
(`hooks.handling`) inside the traced function, as `ftlab.peft.dense` does for LoRA. Applying
a tree with ``reft`` leaves without it is an error, never a silent no-op. A typical run::

    sites = hooks.discover(apply, params, example_batch, None)   # apply(params, batch, rng)
    params = reft.init(params, rng, sites=sites, layers=[2, 4], rank=4)
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

from ftlab.core import partition
from ftlab.models import hooks
from ftlab.types import Params, PRNGKey

__all__ = [
    "LEAVES",
    "Positions",
    "adapter",
    "init",
    "intercept",
    "intervene",
    "orthonormal_rows",
    "positions",
    "rules",
    "wrap_apply",
]

LEAVES = ("rotation", "weight", "bias")
_REFT_LEAF = re.compile(rf"(.*/)?{hooks.REFT}/({'|'.join(LEAVES)})")


@dataclasses.dataclass(frozen=True)
class Positions:
    """Which real tokens an intervention edits (static, not leaves).

    Attributes:
        first_n: Edit the first ``first_n`` real tokens.
        last_n: Edit the last ``last_n`` real tokens.
        what: The config group that set them, e.g. ``"config.peft"`` for
            ``config.peft.first_n``; None names the arguments alone.
    """

    first_n: int = 1
    last_n: int = 1
    what: str | None = None

    def __post_init__(self):
        arg = f"{self.what}." if self.what else "reft: "
        for name in ("first_n", "last_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{arg}{name}={v!r} must be an integer >= 0.")
        if self.first_n == 0 and self.last_n == 0:
            raise ValueError(
                f"{arg}first_n and last_n are both 0, so no position would be "
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
    sites: Sequence[hooks.Site],
    layers: Sequence[int],
    rank: int,
    what: str | None = None,
) -> dict:
    """Adds a LoReFT intervention at each hidden-state site in ``layers``.

    Positions are not chosen here: they are static settings of :func:`wrap_apply`.

    Args:
        params: The model's tree, without interventions.
        rng: Key for the initial rotations.
        sites: The model's hook sites, from `hooks.discover(apply, params, *example)`.
        layers: Indices into the model's hidden-state sites in call order (on ftlab's models,
            the layer indices; the paper edits all layers or a few, e.g. ``[2, 4]``).
        rank: The subspace dimension r (the paper uses 1 to 8), at most the hidden width.
        what: The config group that set these arguments (e.g. ``"config.peft"``); None names
            the arguments alone.

    Returns:
        A new tree with ``<site>/reft/{rotation,weight,bias}``: ``rotation`` a random
        orthonormal [r, hidden], ``weight`` equal to ``orthonormal_rows(rotation)`` and ``bias``
        zero, so the intervention is exactly zero at init.

    Raises:
        ValueError: a bad ``rank`` or layer index (naming the argument, or ``<what>.<field>``), no
            hidden-state site, or interventions already in the tree.

    >>> site = hooks.Site(hooks.HIDDEN, "layer_0", width=4)
    >>> sorted(init({}, jax.random.key(0), sites=[site], layers=[0], rank=2)["layer_0"]["reft"])
    ['bias', 'rotation', 'weight']
    """
    arg = f"{what}." if what else "reft.init: "
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"{arg}rank={rank!r} must be an integer >= 1 (the paper uses 1 to 8).")
    if isinstance(layers, (str, int)) or not len(layers):
        raise ValueError(f"{arg}layers={layers!r} must be a non-empty list of layer indices.")
    found = hooks.of_kind(sites, hooks.HIDDEN, what="reft.init")
    for j, i in enumerate(layers):
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(found):
            raise ValueError(
                f"{arg}layers[{j}]={i!r} is not a layer of this model; it has layers "
                f"0..{len(found) - 1}."
            )
    if len(set(int(i) for i in layers)) != len(layers):
        raise ValueError(f"{arg}layers={list(layers)} repeats a layer; list each once.")
    flat = partition.flatten(params)
    existing = [k for k in flat if _REFT_LEAF.fullmatch(k)]
    if existing:
        raise ValueError(
            f"reft.init: {existing[0]} already exists; start from the base parameters."
        )
    # The residual stream's width, as the hook saw it (under grouped-query attention it is wider
    # than the key projection's output, e.g. 576 against 192 in SmolLM2).
    hidden = found[int(layers[0])].width
    if rank > hidden:
        raise ValueError(
            f"{arg}rank={rank} exceeds the hidden width {hidden}; R has orthonormal rows, so "
            f"use rank <= {hidden}."
        )
    out = dict(flat)
    for i in sorted(int(i) for i in layers):
        key = jax.random.fold_in(rng, i)
        width = found[i].width
        rotation = orthonormal_rows(jax.random.normal(key, (rank, width), jnp.float32))
        name = found[i].leaf(hooks.REFT)
        out[f"{name}/rotation"] = rotation
        out[f"{name}/weight"] = jax.jit(orthonormal_rows)(rotation)
        out[f"{name}/bias"] = jnp.zeros((rank,), jnp.float32)
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
    tree = hooks.hook_leaves(module, hooks.REFT)  # reports the read to ftlab.core.sites
    if tree is None:
        return None
    path = f"{hooks.scope_path(module)}/{hooks.REFT}"
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


def _handler(where: Positions) -> Callable:
    def handler(module, h, token_mask):
        leaves = _leaves(module)
        if leaves is None:
            return h
        sel = positions(token_mask, first_n=where.first_n, last_n=where.last_n)
        return intervene(leaves, h, sel)

    return handler


@contextlib.contextmanager
def intercept(*, first_n: int = 1, last_n: int = 1, what: str | None = None) -> Iterator[None]:
    """Applies every ``reft`` intervention at the model's hidden-state sites while active.

    Enter it inside the traced function (as :func:`wrap_apply` does).

    Args:
        first_n: Edit the first ``first_n`` real tokens of each sequence.
        last_n: Edit the last ``last_n`` real tokens.
        what: The config group that set these arguments (e.g. ``"config.peft"``); None names
            the arguments alone.

    Raises:
        ValueError: both counts are 0, or (at apply time) an intervention is incomplete or
            mis-shaped (naming the leaf path).
    """
    where = Positions(first_n=first_n, last_n=last_n, what=what)
    with hooks.handling(hooks.HIDDEN, _handler(where)):
        yield


def wrap_apply(
    apply_fn: Callable, *, first_n: int = 1, last_n: int = 1, what: str | None = None
) -> Callable:
    """Returns ``apply_fn`` running inside :func:`intercept`, same signature and result.

    Wrapping (rather than entering the context around a jitted call) puts the handler inside
    whatever `jax.jit` or `jax.grad` traces it. The call is checked like `hooks.wrap_apply`: an
    intervention (or any method leaf) of the first argument that the model did not read raises.
    """
    Positions(first_n=first_n, last_n=last_n, what=what)  # validate now, not at trace time

    @functools.wraps(apply_fn)
    def wrapped(params, *args, **kwargs):
        with hooks.tracking(params, what="reft.wrap_apply(apply)"):
            with intercept(first_n=first_n, last_n=last_n, what=what):
                return apply_fn(params, *args, **kwargs)

    return wrapped


def rules(*, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Partition rules that train the interventions (and ``extra``) and freeze the rest.

    >>> rules()
    [('(.*/)?reft/.*', 'train'), ('.*', 'frozen')]
    """
    return [*extra, (rf"(.*/)?{hooks.REFT}/.*", "train"), (".*", partition.FROZEN)]


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
            f"reft.adapter: no '<...>/{hooks.REFT}/...' leaf in the tree (top-level "
            f"names: {', '.join(top)}); add them with reft.init(...) first."
        )
    return partition.unflatten(out)
