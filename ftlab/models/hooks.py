"""The hook protocol: the four named sites a model calls so that structural methods can reach it.

A model opts in by calling these functions where the site is, passing the bound module whose
params should hold a method's leaves (usually ``self``). Each hook reads optional leaves under
that module and, when they are absent, returns its input unchanged, so a tree without method
leaves traces exactly as the base model.

==========  =========================================  ========================================
site kind   the model calls                            leaves under the calling module
==========  =========================================  ========================================
embeddings  ``x = embeddings(self, x, table=...)``     ``prompt`` [n, d] (prompt tuning)
key_value   ``k, v, bias = key_value(self, k, v, b)``  ``prefix_key``, ``prefix_value``
                                                       [n, heads * head_dim] (prefix tuning)
sublayer    ``x = sublayer_output(self, name, x)``     ``<name>_adapter/{down,up}/...`` (adapters)
hidden      ``h = hidden(self, h, token_mask)``        ``reft/{rotation,weight,bias}`` (ReFT)
==========  =========================================  ========================================

- ``embeddings(module, x, *, table=None, prepend=True)``: ``x`` ``[batch, seq, d]`` is the
  embedded input (tokens, image patches). Returns ``[batch, n + seq, d]`` with the prompt rows
  first (``prepend=False``, e.g. a decoder's continuation call, reads the leaf but adds nothing).
  The model places the extra positions: it must widen its masks by ``n`` and, as ftlab's models
  do, keep them out of pooling. ``table`` names the token-embedding table (a slash path under
  ``module``'s params, e.g. ``"word_embeddings/embedding"``), which prompt tuning's vocabulary
  init copies rows from.
- ``key_value(module, key, value, bias)``: ``key`` and ``value`` ``[batch, kv_len, heads,
  head_dim]`` as attention will use them (after RoPE); ``bias`` either an additive float bias or
  a boolean mask whose last axis is ``kv_len`` (or None). Returns them with ``n`` prefix
  positions in front; the bias is extended with 0 (the mask with True): every query attends to
  the prefix.
- ``sublayer_output(module, name, x)``: ``x`` is a sublayer's output before the residual add,
  ``name`` one of :data:`SUBLAYERS` (``"attention"``; ``"output"``, the feed-forward block).
  Returns ``x + up(gelu(down(x)))`` with an adapter, ``x`` without.
- ``hidden(module, h, token_mask)``: ``h`` ``[batch, seq, d]`` is a layer's output,
  ``token_mask`` ``[batch, seq]`` 1 at real tokens (0 at padding and prompt rows). Returns ``h``
  as edited by the handlers a method installed (:func:`handling`; ReFT's positions are static
  settings, not leaves, so its wrapper installs one).

How a method attaches. ``sites = discover(apply_fn, params, *example_args)`` traces the model once
(``jax.eval_shape``, nothing is computed) and returns every hook call as a :class:`Site`: the
calling module's path in the params tree, the kind, and the shapes seen. A method's ``init`` takes
those sites and adds its leaves at ``site.path`` under names listed in
`ftlab.core.sites.METHOD_NAMES`; no method looks at a model's own path names or imports a model.

Nothing silent. Every hook reports the leaves it read to `ftlab.core.sites` (``consume``).
:func:`wrap_apply` (and each method's ``wrap_apply``) runs an application inside
``sites.tracking(params)``, and ftlab's own root modules track themselves (:func:`track_root`), so
applying a tree whose method leaves no hook read (a model that does not call the hook the method
needs, a wrapper left off) raises `UnconsumedLeavesError` naming them.

Limits. Hooks and handlers act while Python runs, i.e. while `jax.jit` traces: put `jax.jit`
outside a method's wrapper, never inside. Layers run under `nn.scan` are one module, so discover
sites on an unrolled tree (`ftlab.models.llama.unstack_layers`). A module that calls the same
hook twice (weight sharing) is one site, whose leaves both calls read.

A user's model opting in (a ViT block)::

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            a = MyAttention(name="attention")(nn.LayerNorm()(x), mask)   # calls hooks.key_value
            x = x + hooks.sublayer_output(self, "attention", a)
            m = nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x))))
            x = x + hooks.sublayer_output(self, "output", m)
            return hooks.hidden(self, x, mask)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftlab.core import sites as _sites

__all__ = [
    "EMBEDDINGS",
    "HIDDEN",
    "KEY_VALUE",
    "KINDS",
    "PREFIX_KEY",
    "PREFIX_VALUE",
    "PROMPT",
    "REFT",
    "SUBLAYER",
    "SUBLAYERS",
    "Site",
    "adapter",
    "adapter_name",
    "discover",
    "embeddings",
    "handling",
    "hidden",
    "hook_leaves",
    "key_value",
    "of_kind",
    "scope_path",
    "sublayer_output",
    "track_root",
    "tracking",
    "wrap_apply",
]

# Site kinds.
EMBEDDINGS, KEY_VALUE, SUBLAYER, HIDDEN = "embeddings", "key_value", "sublayer", "hidden"
KINDS = (EMBEDDINGS, KEY_VALUE, SUBLAYER, HIDDEN)
# Sublayer names a model may pass to `sublayer_output` (their adapters are `<name>_adapter`,
# names registered in `ftlab.core.sites.METHOD_NAMES`).
SUBLAYERS = ("attention", "output")
# Leaf names the hooks read.
PROMPT = "prompt"
PREFIX_KEY, PREFIX_VALUE = "prefix_key", "prefix_value"
REFT = "reft"

_local = threading.local()


@dataclasses.dataclass(frozen=True)
class Site:
    """One hook call of a model, as :func:`discover` records it.

    Attributes:
        kind: One of :data:`KINDS`.
        path: Slash path of the calling module in the params tree (``""`` for the root); a
            method's leaves go under it.
        name: The sublayer name (kind ``sublayer``), else ``""``.
        width: Feature width: of ``x``/``h`` (embeddings, sublayer, hidden), or
            ``heads * head_dim`` (key_value).
        heads: Key/value heads (key_value), else 0.
        head_dim: Width of one head (key_value), else 0.
        table: Slash path of the token-embedding table in the params tree (embeddings, when
            the model names one), else ``""``.
    """

    kind: str
    path: str
    name: str = ""
    width: int = 0
    heads: int = 0
    head_dim: int = 0
    table: str = ""

    def leaf(self, name: str) -> str:
        """The slash path of a method leaf ``name`` at this site."""
        return f"{self.path}/{name}" if self.path else name


def scope_path(module: nn.Module) -> str:
    """The slash path of a bound module, as error messages name it."""
    scope = getattr(module, "scope", None)
    return "/".join(scope.path) if scope is not None and scope.path else "<root>"


def _path(module: nn.Module) -> str:
    scope = getattr(module, "scope", None)
    return "/".join(scope.path) if scope is not None and scope.path else ""


def hook_leaves(module: nn.Module, name: str) -> Any:
    """The `params` entry `name` of `module` (a leaf or a subtree), or None when absent.

    Reports the read to `ftlab.core.sites` (a method's leaves count as used).
    """
    if not module.has_variable("params", name):
        return None
    _sites.consume(module, name)
    return module.variables["params"][name]


def _record(module: nn.Module, kind: str, **info) -> None:
    found = getattr(_local, "recording", None)
    if found is None:
        return
    site = Site(kind=kind, path=_path(module), **info)
    key = (site.kind, site.path, site.name)
    if key not in found:
        found[key] = site


# --- the four sites -------------------------------------------------------------------------


def embeddings(
    module: nn.Module, x: jax.Array, *, table: str | None = None, prepend: bool = True
) -> jax.Array:
    """The input-embeddings site: prepends a soft prompt ``prompt`` [n, d] when the tree has one.

    Args:
        module: The calling module; the prompt leaf sits in its params.
        x: Embedded inputs `[batch, seq, d]`.
        table: Slash path of the token-embedding table under ``module``'s params, for prompt
            tuning's vocabulary init (None: the model has no such table).
        prepend: False reads the prompt (a continuation of a sequence that started with it)
            but returns ``x`` unchanged.

    Returns:
        `[batch, n + seq, d]` with the prompt rows first, or ``x``.

    Raises:
        ValueError: a prompt that is not `[n, d]`, naming its path.
    """
    _record(module, EMBEDDINGS, width=int(x.shape[-1]), table=_join(_path(module), table))
    prompt = hook_leaves(module, PROMPT)
    if prompt is None or not prepend:
        return x
    if prompt.ndim != 2 or prompt.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{scope_path(module)}/{PROMPT} has shape {prompt.shape}; a soft prompt is "
            f"[n_prompt, hidden={x.shape[-1]}]. Re-create it with prompt.init(...)."
        )
    rows = jnp.broadcast_to(prompt.astype(x.dtype), (x.shape[0], *prompt.shape))
    return jnp.concatenate([rows, x], axis=1)


def _join(base: str, rel: str | None) -> str:
    if not rel:
        return ""
    return f"{base}/{rel}" if base else rel


def prefix_key_values(
    module: nn.Module, batch: int, *, heads: int, head_dim: int, dtype: Any, width: str
) -> tuple[jax.Array, jax.Array] | None:
    """`(keys, values)` `[batch, n_prefix, heads, head_dim]` from an attention module's prefix
    leaves `prefix_key`, `prefix_value` `[n_prefix, heads * head_dim]`, or None without them.

    Raises:
        ValueError: only one of the two leaves, or a shape other than `[n, heads * head_dim]`.
    """
    key, value = hook_leaves(module, PREFIX_KEY), hook_leaves(module, PREFIX_VALUE)
    if key is None and value is None:
        return None
    path = scope_path(module)
    if key is None or value is None:
        missing = PREFIX_KEY if key is None else PREFIX_VALUE
        raise ValueError(
            f"{path}/{missing} is missing; prefix tuning needs both {PREFIX_KEY} and "
            f"{PREFIX_VALUE}. Re-create them with prefix.init(...) and prefix.finalize(...)."
        )
    for name, leaf in ((PREFIX_KEY, key), (PREFIX_VALUE, value)):
        if leaf.ndim != 2 or leaf.shape[1] != heads * head_dim or leaf.shape != key.shape:
            raise ValueError(
                f"{path}/{name} has shape {leaf.shape}; {PREFIX_KEY} {key.shape} and "
                f"{PREFIX_VALUE} {value.shape} must both be [n_prefix, {width}]."
            )

    def split(leaf):
        leaf = leaf.reshape(leaf.shape[0], heads, head_dim).astype(dtype)
        return jnp.broadcast_to(leaf, (batch, *leaf.shape))

    return split(key), split(value)


def key_value(
    module: nn.Module, key: jax.Array, value: jax.Array, bias: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The attention keys-and-values site: prepends ``prefix_key``/``prefix_value`` positions.

    Args:
        module: The calling attention module; the prefix leaves sit in its params.
        key: `[batch, kv_len, heads, head_dim]`, as attention will use them (after RoPE).
        value: `[batch, kv_len, heads, head_dim]`.
        bias: Additive float bias or boolean mask with last axis `kv_len`, or None.

    Returns:
        ``(key, value, bias)`` with `n_prefix` positions in front; the bias gets 0 there (a
        boolean mask True), so every query attends to the prefix.

    Raises:
        ValueError: one prefix leaf without the other, or a shape other than
            `[n_prefix, heads * head_dim]`, naming the path.
    """
    batch, _, heads, head_dim = key.shape
    _record(module, KEY_VALUE, width=heads * head_dim, heads=int(heads), head_dim=int(head_dim))
    prefix = prefix_key_values(
        module, batch, heads=heads, head_dim=head_dim, dtype=key.dtype,
        width=f"heads * head_dim={heads * head_dim}",
    )  # fmt: skip
    if prefix is None:
        return key, value, bias
    n = prefix[0].shape[1]
    key = jnp.concatenate([prefix[0].astype(key.dtype), key], axis=1)
    value = jnp.concatenate([prefix[1].astype(value.dtype), value], axis=1)
    if bias is not None:
        fill = jnp.ones if bias.dtype == jnp.bool_ else jnp.zeros
        bias = jnp.concatenate([fill((*bias.shape[:-1], n), bias.dtype), bias], axis=-1)
    return key, value, bias


def adapter_name(name: str) -> str:
    """The adapter subtree of sublayer ``name``: ``"<name>_adapter"``."""
    return f"{name}_adapter"


def adapter(leaves: Mapping[str, Any], x: jax.Array) -> jax.Array:
    """``x + up(gelu(down(x)))`` from ``{"down": {kernel, bias}, "up": {kernel, bias}}``.

    Computed as `nn.Dense` computes each projection (in ``x``'s dtype, on a 2-D input), with the
    exact erf GELU. With ``up`` zero it is an exact identity.
    """

    def dense(p, h):
        k, b = p["kernel"].astype(h.dtype), p["bias"].astype(h.dtype)
        y = jax.lax.dot_general(h, k, (((h.ndim - 1,), (0,)), ((), ())))
        return y + b.reshape((1,) * (y.ndim - 1) + (-1,))

    flat = x.reshape(-1, x.shape[-1])
    h = nn.gelu(dense(leaves["down"], flat), approximate=False)
    return x + dense(leaves["up"], h).reshape(x.shape)


def sublayer_output(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
    """The sublayer-output site: applies the adapter ``<name>_adapter`` when the tree has one.

    Args:
        module: The calling module (a transformer layer); the adapter sits in its params.
        name: One of :data:`SUBLAYERS`.
        x: The sublayer's output `[..., d]`, before the residual add.

    Returns:
        ``x + up(gelu(down(x)))`` (Houlsby et al.'s placement), or ``x``.

    Raises:
        ValueError: an unknown ``name``, or an incomplete or mis-shaped adapter (naming the leaf).
    """
    if name not in SUBLAYERS:
        raise ValueError(f"hooks.sublayer_output: name={name!r} is not one of {SUBLAYERS}.")
    width = int(x.shape[-1])
    _record(module, SUBLAYER, name=name, width=width)
    tree = hook_leaves(module, adapter_name(name))
    if tree is None:
        return x
    path = f"{scope_path(module)}/{adapter_name(name)}"
    got = {}
    for sub in ("down", "up"):
        for leaf in ("kernel", "bias"):
            node = tree.get(sub) if isinstance(tree, Mapping) else None
            value = node.get(leaf) if isinstance(node, Mapping) else None
            if value is None:
                raise ValueError(
                    f"{path}/{sub}/{leaf} is missing; an adapter needs down/{{kernel,bias}} "
                    "and up/{kernel,bias}. Re-create it with adapters.init(...)."
                )
            got.setdefault(sub, {})[leaf] = value
    down = got["down"]["kernel"]
    k = down.shape[-1] if down.ndim == 2 else 0
    shapes = {
        "down/kernel": (width, k),
        "down/bias": (k,),
        "up/kernel": (k, width),
        "up/bias": (width,),
    }
    for leaf, shape in shapes.items():
        sub, part = leaf.split("/")
        if got[sub][part].shape != shape or k < 1:
            raise ValueError(
                f"{path}/{leaf} has shape {got[sub][part].shape}, expected {shape}: down/kernel "
                f"is [hidden={width}, bottleneck], up/kernel [bottleneck, hidden]."
            )
    return adapter(got, x)


def hidden(module: nn.Module, h: jax.Array, token_mask: jax.Array) -> jax.Array:
    """The hidden-state site: ``h`` as edited by the active handlers (see :func:`handling`).

    Args:
        module: The calling module (a layer); an intervention's leaves sit in its params.
        h: The layer's output `[batch, seq, d]`.
        token_mask: `[batch, seq]`, 1 at real tokens, 0 at padding and soft-prompt positions.

    Returns:
        ``h``, edited by each handler in the order they were installed.

    Raises:
        ValueError: the tree holds ``reft`` leaves here but no handler is active.
    """
    _record(module, HIDDEN, width=int(h.shape[-1]))
    handlers = _handlers().get(HIDDEN, [])
    for fn in handlers:
        h = fn(module, h, token_mask)
    recording = getattr(_local, "recording", None) is not None
    if not handlers and not recording and module.has_variable("params", REFT):
        raise ValueError(
            f"{scope_path(module)}/{REFT} is in the params, but the model was applied without "
            "the ReFT handler, so the intervention would be silently skipped; wrap the apply "
            "function with reft.wrap_apply(apply, first_n=..., last_n=...)."
        )
    return h


def _handlers() -> dict[str, list[Callable]]:
    if not hasattr(_local, "handlers"):
        _local.handlers = {}
    return _local.handlers


@contextlib.contextmanager
def handling(kind: str, fn: Callable) -> Iterator[None]:
    """Installs ``fn(module, *site_args) -> output`` on every call of site ``kind`` while active.

    For methods whose settings are not leaves (ReFT's positions). Python-level, like
    `nn.intercept_methods`: enter it inside the traced function (a method's ``wrap_apply``
    does), never around a jitted call.

    Args:
        kind: A site kind; only :data:`HIDDEN` takes handlers.
        fn: ``fn(module, h, token_mask) -> h``.
    """
    if kind != HIDDEN:
        raise ValueError(f"hooks.handling: kind={kind!r}; only {HIDDEN!r} sites take handlers.")
    stack = _handlers().setdefault(kind, [])
    stack.append(fn)
    try:
        yield
    finally:
        stack.remove(fn)


# --- discovery and tracking -----------------------------------------------------------------


def discover(apply_fn: Callable, params: Any, *args, **kwargs) -> tuple[Site, ...]:
    """Every hook call of ``apply_fn(params, *args, **kwargs)``, traced once without computing.

    Args:
        apply_fn: Applies the model to ``params`` as its root params, e.g.
            ``lambda p, ids, mask: model.apply({"params": p}, ids, mask)``. Not a jitted
            function that already ran: a cached trace runs no hook.
        params: The parameter tree (arrays or `jax.ShapeDtypeStruct`s).
        *args: Example inputs (shapes matter, values do not).
        **kwargs: Passed to ``apply_fn``.

    Returns:
        The sites in call order, each once (a module that calls a hook twice is one site).

    Method leaves already in ``params`` need not be used by ``apply_fn`` (no
    `UnconsumedLeavesError` here), so sites can be discovered on a tree another method extended.

    Raises:
        ValueError: no hook was called, or a site's path is not in ``params`` (``apply_fn``
            handed the model a subtree of ``params``).
    """
    previous = getattr(_local, "recording", None)
    _local.recording = found = {}
    try:
        # Discovery only looks: method leaves already in the tree (a method added earlier, whose
        # wrapper apply_fn may lack) are no reason to refuse, so their check is suppressed here.
        with contextlib.suppress(_sites.UnconsumedLeavesError):
            with _sites.tracking(params, what="hooks.discover"):
                jax.eval_shape(lambda p: apply_fn(p, *args, **kwargs), params)
    finally:
        _local.recording = previous
    if not found:
        raise ValueError(
            "hooks.discover: apply_fn called no hook of ftlab.models.hooks; the model must call "
            "them (embeddings, key_value, sublayer_output, hidden), and apply_fn must not be a "
            "jitted function that was already traced (pass the function itself)."
        )
    top = set(params) if isinstance(params, Mapping) else set()
    for site in found.values():
        head = site.path.split("/")[0]
        if site.path and head not in top:
            raise ValueError(
                f"hooks.discover: the {site.kind} hook at {site.path!r} is not under params "
                f"(top-level names: {sorted(top)}); apply_fn must pass params to the model as "
                "its root params, not a subtree."
            )
    return tuple(found.values())


def of_kind(sites: Sequence[Site], kind: str, *, what: str) -> list[Site]:
    """The sites of ``kind``; raises ValueError (naming ``what``) when there are none."""
    if isinstance(sites, Site) or not all(isinstance(s, Site) for s in sites):
        raise ValueError(f"{what}: sites must be a list of hooks.Site from hooks.discover(...).")
    out = [s for s in sites if s.kind == kind]
    if not out:
        kinds = sorted({s.kind for s in sites})
        raise ValueError(
            f"{what}: the model calls no {kind!r} hook (sites found: {kinds or 'none'}); "
            f"the method needs a model that calls ftlab.models.hooks' {kind} site."
        )
    return out


def wrap_apply(apply_fn: Callable, *, what: str | None = None) -> Callable:
    """Returns ``apply_fn`` checked for unused method leaves, same signature and result.

    The call runs inside ``ftlab.core.sites.tracking(params)`` (unless a caller already
    tracks), so a method leaf of ``params`` (the first argument) that no hook or interceptor
    read raises `UnconsumedLeavesError` naming it. Put `jax.jit` outside the wrapper.

    Args:
        apply_fn: ``apply_fn(params, *args, **kwargs)``.
        what: How errors name the application (default ``"hooks.wrap_apply(<name>)"``).
    """
    name = what or f"hooks.wrap_apply({getattr(apply_fn, '__name__', 'apply_fn')})"

    @functools.wraps(apply_fn)
    def wrapped(params, *args, **kwargs):
        with tracking(params, what=name):
            return apply_fn(params, *args, **kwargs)

    return wrapped


def tracking(params: Any, *, what: str) -> contextlib.AbstractContextManager:
    """``ftlab.core.sites.tracking(params, what=what)``, or nothing when a caller already tracks."""
    if _sites.is_tracking():
        return contextlib.nullcontext()
    return _sites.tracking(params, what=what)


def track_root(call: Callable) -> Callable:
    """Decorates a model's ``__call__`` so that, applied as the root, it checks its own tree.

    When the module is the root of an ``apply`` (scope path ``()``), not initializing, and no
    wrapper already tracks, the call runs inside ``sites.tracking(self.variables)``: a method
    leaf that nothing read raises instead of running the base model. Place it under
    ``@nn.compact``.
    """

    @functools.wraps(call)
    def wrapped(self, *args, **kwargs):
        scope = self.scope
        if scope is None or scope.path or self.is_initializing() or _sites.is_tracking():
            return call(self, *args, **kwargs)
        with _sites.tracking(self.variables, what=f"{type(self).__name__}.apply"):
            return call(self, *args, **kwargs)

    return wrapped
