"""Sharding rules: which leaf lives where on a named device mesh (FSDP, tensor parallel).

A mesh has up to three named axes: ``data`` (batch rows; parameters replicated), ``fsdp`` (batch
rows *and* parameter shards, ZeRO-3 style) and ``tensor`` (Megatron-style splits of kernels).
Sharding rules are ordered ``(regex, tactic)`` pairs over leaf paths, in the same path language
as partition rules (`ftlab.core.partition`): ``re.fullmatch``, first match wins::

    rules = [
        (".*/lora_(a|b)", "replicate"),                      # small: one copy per device
        (r".*/(query|key|value|intermediate)/kernel", "column"),
        (r".*/(attention_output|output)/kernel", "row"),
        (".*", "fsdp"),                                       # everything else
    ]
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    state_shardings = sharding.state_shardings(state, rules, mesh)

Tactics:

- ``"replicate"``: every device holds the whole leaf.
- ``"fsdp"``: the largest dimension divisible by the ``fsdp`` axis size is split over it (ties go
  to the later dimension, as in big_vision). Leaves under ``min_bytes`` are replicated: sharding
  a bias saves nothing and costs a gather. A leaf at or over ``min_bytes`` with no divisible
  dimension is an error (replicate it with an earlier rule).
- ``"column"`` / ``"row"``: a 2-D kernel ``[in, out]`` split over the ``tensor`` axis on ``out``
  (column) or ``in`` (row); the other dimension goes over ``fsdp`` when the mesh has one (and the
  leaf is at least ``min_bytes``).
- a `jax.sharding.PartitionSpec`: exactly that placement.

A leaf that no rule matches is an error unless a ``default`` tactic is given; a rule that
matches no leaf is an error; so is a dimension not divisible by the axes it is split over. Each
names the rule and the leaf.

For a whole train state (:func:`state_shardings`): trainable and frozen parameters and the
collections (``batch_stats/...`` paths) follow the rules; an optimizer-state leaf whose path ends
in a trainable parameter's path and that has its shape (Adam's ``mu``/``nu``, momentum, under any
optax wrapper: ``0/mu/encoder/.../kernel``) gets that parameter's sharding; every other leaf
(step counts, the rng, factored statistics) is replicated. Batches are split on their leading
axis over ``("data", "fsdp")`` together (:func:`batch_sharding`).

This is jit + `NamedSharding` only: XLA inserts the all-gathers and reduce-scatters that the
placement implies (no hand-written collectives), and the same program runs on one CPU, a GPU host
or a multi-host TPU slice.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ftlab.core import partition
from ftlab.types import PyTree

__all__ = [
    "AXES",
    "DATA",
    "DEFAULT_MIN_BYTES",
    "FSDP",
    "TACTICS",
    "TENSOR",
    "Rules",
    "Tactic",
    "batch_sharding",
    "batch_size_divisor",
    "device_bytes",
    "make_mesh",
    "shardings",
    "specs",
    "state_shardings",
]

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
TACTICS = ("replicate", "fsdp", "column", "row")
# Leaves smaller than this are not split by "fsdp" (nor the fsdp half of "column"/"row"): a
# MiniLM bias is 1.5 kB, its kernels 590 kB.
DEFAULT_MIN_BYTES = 1 << 16

Tactic = str | P
Rules = Sequence[tuple[str, Tactic]]


def make_mesh(shape: Mapping[str, int], *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``("data", "fsdp", "tensor")`` over all global devices.

    Args:
      shape: ``{axis: size}`` for some of ``data``, ``fsdp``, ``tensor``; one size may be -1
        for "the devices left over"; axes not given have size 1.
      devices: the devices to lay out (default: `jax.devices()`, every process's).

    Returns:
      A `Mesh` with `AxisType.Auto` axes (jit propagates shardings; no explicit-axis typing).

    Raises:
      ValueError: an unknown axis name, a size that is not a positive integer or -1, more than
        one -1, or sizes whose product is not the number of devices.

    >>> dict(make_mesh({"fsdp": -1}, devices=jax.devices()[:1]).shape)
    {'data': 1, 'fsdp': 1, 'tensor': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(shape) - set(AXES))
    if unknown:
        raise ValueError(f"make_mesh: shape names unknown axes {unknown}; the axes are {AXES}")
    sizes = {}
    for axis in AXES:
        size = shape.get(axis, 1)
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(
                f"make_mesh: shape[{axis!r}]={size!r}; expected a positive integer or -1 "
                "(the devices left over)"
            )
        sizes[axis] = size
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"make_mesh: shape has -1 for {rest}; at most one axis may take the rest")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if len(devices) % known:
            raise ValueError(
                f"make_mesh: shape={dict(shape)} leaves {len(devices)}/{known} devices for "
                f"axis {rest[0]!r}, not a whole number; {len(devices)} devices exist"
            )
        sizes[rest[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"make_mesh: shape={dict(shape)} needs {math.prod(sizes.values())} devices but "
            f"{len(devices)} exist; give one axis -1 to take the rest"
        )
    return jax.make_mesh(
        tuple(sizes[a] for a in AXES),
        AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
        devices=devices,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (row) axis of a batch split over the mesh's ``data`` and ``fsdp`` axes."""
    axes = tuple(a for a in (DATA, FSDP) if a in mesh.shape)
    return NamedSharding(mesh, P(axes if axes else None))


def batch_size_divisor(mesh: Mesh) -> int:
    """The number a global batch size must be a multiple of: ``data`` x ``fsdp`` sizes."""
    return _size(mesh, DATA) * _size(mesh, FSDP)


def specs(
    tree: PyTree,
    rules: Rules,
    mesh: Mesh,
    *,
    default: Tactic | None = None,
    min_bytes: int = DEFAULT_MIN_BYTES,
    check_unused: bool = True,
    what: str = "rules",
) -> PyTree:
    """A `PartitionSpec` per leaf of ``tree`` by the first rule whose regex matches its path.

    Args:
      tree: arrays or `jax.ShapeDtypeStruct`s (anything with ``shape`` and ``dtype``).
      rules: ordered ``(regex, tactic)`` pairs (see the module docstring).
      mesh: the mesh the specs refer to; an axis it lacks counts as size 1.
      default: the tactic of a leaf no rule matches; None makes such a leaf an error.
      min_bytes: leaves smaller than this are not split over ``fsdp``.
      check_unused: raise when a rule matches no leaf (off only for a part of a tree whose
        other part holds the leaves some rules are for).
      what: how errors name ``rules`` (a caller with a config passes its key).

    Returns:
      A tree of the structure of ``tree`` with `PartitionSpec` leaves.

    Raises:
      ValueError: an invalid regex or tactic, a leaf matched by no rule (without ``default``), a
        rule matching no leaf, or a dimension not divisible by the mesh axes it is split over.
    """
    flat = partition.flatten(tree)
    chosen = _choose(flat, rules, default=default, check_unused=check_unused, what=what)
    out = {
        name: _spec(name, leaf, *chosen[name], mesh, min_bytes=min_bytes)
        for name, leaf in flat.items()
    }
    return partition.unflatten(out, like=tree)


def shardings(
    tree: PyTree,
    rules: Rules,
    mesh: Mesh,
    *,
    default: Tactic | None = None,
    min_bytes: int = DEFAULT_MIN_BYTES,
    check_unused: bool = True,
    what: str = "rules",
) -> PyTree:
    """A `NamedSharding` per leaf of ``tree``; the arguments are :func:`specs`'s.

    >>> mesh = make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
    >>> tree = {"w": jax.ShapeDtypeStruct((8, 4), "float32")}
    >>> shardings(tree, [(".*", "fsdp")], mesh, min_bytes=0)["w"].spec  # fsdp has size 1
    P()
    """
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        specs(
            tree,
            rules,
            mesh,
            default=default,
            min_bytes=min_bytes,
            check_unused=check_unused,
            what=what,
        ),
        is_leaf=lambda x: isinstance(x, P),
    )


def state_shardings(
    state: Any,
    rules: Rules,
    mesh: Mesh,
    *,
    default: Tactic | None = None,
    min_bytes: int = DEFAULT_MIN_BYTES,
    check_unused: bool = True,
    what: str = "rules",
) -> Any:
    """Shardings for a whole `ftlab.core.train.TrainState`: its structure, a sharding per leaf.

    The rules are matched against the paths of the full parameter tree (trainable and frozen
    together, so one rule list serves full fine-tuning and LoRA alike) and of the collections
    (``batch_stats/...``). Optimizer-state leaves mirror their parameter (see the module
    docstring); ``step``, ``rng`` and everything else are replicated.

    Args:
      state: a `TrainState` of arrays or `jax.ShapeDtypeStruct`s.
      rules, mesh, default, min_bytes, what: as in :func:`specs`.
      check_unused: as in :func:`specs`; a state without frozen leaves (a checkpoint's
        ``state.checkpointable()``) may leave rules for frozen leaves unused, so pass False there.

    Returns:
      The state's tree with a `NamedSharding` per leaf.

    Raises:
      ValueError: as :func:`specs`; also when a collection name is also a top-level parameter
        name (their paths would be ambiguous to the rules).
    """
    params = partition.flatten(partition.merge(state.trainable, state.frozen))
    colls = partition.flatten(state.collections)
    clash = sorted(set(params) & set(colls))
    if clash:
        raise ValueError(
            f"state_shardings: parameter and collection paths coincide: {clash[:3]}; rules "
            "could not tell them apart"
        )
    named = {**params, **colls}
    chosen = _choose(named, rules, default=default, check_unused=check_unused, what=what)
    by_name = {
        name: NamedSharding(
            mesh, _spec(name, named[name], *chosen[name], mesh, min_bytes=min_bytes)
        )
        for name in named
    }
    replicated = NamedSharding(mesh, P())

    def of_params(tree):
        return jax.tree_util.tree_map_with_path(lambda p, _: by_name[partition.path_name(p)], tree)

    trainable = partition.flatten(state.trainable)

    def of_opt(path, leaf):
        # The longest suffix of the path that names a trainable leaf of the same shape.
        parts = partition.path_name(path).split("/")
        for i in range(len(parts)):
            name = "/".join(parts[i:])
            if name in trainable and np.shape(trainable[name]) == np.shape(leaf):
                return by_name[name]
        return replicated

    return state.replace(
        step=replicated,
        trainable=of_params(state.trainable),
        frozen=of_params(state.frozen),
        opt_state=jax.tree_util.tree_map_with_path(of_opt, state.opt_state),
        rng=replicated,
        collections=of_params(state.collections),
    )


def device_bytes(tree: PyTree) -> dict[jax.Device, int]:
    """Bytes each local device holds of the `jax.Array` leaves of ``tree`` (addressable shards)."""
    out: dict[jax.Device, int] = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                out[shard.device] += shard.data.nbytes
    return dict(out)


# -- internals -------------------------------------------------------------------------------


def _size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape.get(axis, 1))


def _choose(
    flat: Mapping[str, Any], rules: Rules, *, default, check_unused: bool, what: str
) -> dict[str, tuple[Tactic, str]]:
    """``{leaf name: (tactic, how errors name the rule)}``; the checks of :func:`specs`."""
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(f"{what}[{i}]: expected a (regex, tactic) pair, got {rule!r}")
        pattern, tactic = rule
        _check_tactic(tactic, f"{what}[{i}]")
        try:
            compiled.append((re.compile(pattern), tactic))
        except (re.error, TypeError) as e:
            raise ValueError(f"{what}[{i}]: invalid regex {pattern!r}: {e}") from None
    if default is not None:
        _check_tactic(default, "default")
    out, used, unmatched = {}, set(), []
    for name in flat:
        for i, (regex, tactic) in enumerate(compiled):
            if regex.fullmatch(name):
                out[name] = (tactic, f"{what}[{i}] ({regex.pattern!r}, {_show(tactic)})")
                used.add(i)
                break
        else:
            if default is None:
                unmatched.append(name)
            else:
                out[name] = (default, f"default={_show(default)}")
    if unmatched:
        raise ValueError(
            f"{what}: leaf {unmatched[0]!r} matches no rule"
            + (
                f" (nor do {len(unmatched) - 1} more, e.g. {unmatched[1:4]})"
                if unmatched[1:]
                else ""
            )
            + "; add a rule for it, end the rules with a catch-all such as ('.*', 'fsdp'), or "
            "pass default='replicate'"
        )
    unused = [i for i in range(len(compiled)) if i not in used]
    if check_unused and unused:
        top = sorted({n.split("/")[0] for n in flat})
        raise ValueError(
            f"{what}[{unused[0]}]: pattern {rules[unused[0]][0]!r} matched no leaf"
            + (f" (nor did {[rules[i][0] for i in unused[1:]]})" if unused[1:] else "")
            + f"; top-level names are: {', '.join(top)}. Example leaf: {next(iter(flat), None)!r}."
        )
    return out


def _check_tactic(tactic: object, what: str) -> None:
    if isinstance(tactic, P):
        return
    if not isinstance(tactic, str) or tactic not in TACTICS:
        raise ValueError(
            f"{what}: tactic {tactic!r} is not one of {TACTICS} or a jax.sharding.PartitionSpec"
        )


def _show(tactic: Tactic) -> str:
    return repr(tactic) if isinstance(tactic, str) else str(tactic)


def _nbytes(leaf) -> int:
    return int(np.prod(np.shape(leaf), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def _divisible(name, shape, dim, axes, mesh, rule) -> None:
    n = math.prod(_size(mesh, a) for a in axes)
    if shape[dim] % n:
        names = axes[0] if len(axes) == 1 else axes
        raise ValueError(
            f"{rule}: dimension {dim} of leaf {name!r} (shape {tuple(shape)}) has size "
            f"{shape[dim]}, not divisible by mesh axis {names!r} of size {n}; pick another "
            "tactic for this leaf with an earlier rule (e.g. 'replicate'), or another mesh shape"
        )


def _spec(name: str, leaf, tactic: Tactic, rule: str, mesh: Mesh, *, min_bytes: int) -> P:
    shape = tuple(np.shape(leaf))
    if isinstance(tactic, P):
        if len(tactic) > len(shape):
            raise ValueError(
                f"{rule}: {tactic} has {len(tactic)} entries but leaf {name!r} has "
                f"{len(shape)} dimensions (shape {shape})"
            )
        seen = []
        for dim, entry in enumerate(tactic):
            if entry is None:
                continue
            axes = (entry,) if isinstance(entry, str) else tuple(entry)
            for a in axes:
                if a not in mesh.shape:
                    raise ValueError(
                        f"{rule}: leaf {name!r}: mesh axis {a!r} is not in the mesh "
                        f"{tuple(mesh.shape)}"
                    )
                if a in seen:
                    raise ValueError(f"{rule}: leaf {name!r}: mesh axis {a!r} used twice")
                seen.append(a)
            _divisible(name, shape, dim, axes, mesh, rule)
        return tactic
    if tactic == "replicate":
        return P()
    fsdp = _size(mesh, FSDP)
    shard_fsdp = fsdp > 1 and _nbytes(leaf) >= min_bytes
    if tactic == "fsdp":
        if not shard_fsdp:
            return P()
        # Largest first; among equal sizes the later dimension (numpy's argsort is stable).
        for dim in np.argsort(shape, kind="stable")[::-1]:
            if shape[dim] % fsdp == 0:
                entries = [None] * len(shape)
                entries[dim] = FSDP
                return P(*entries)
        raise ValueError(
            f"{rule}: no dimension of leaf {name!r} (shape {shape}) is divisible by mesh axis "
            f"{FSDP!r} of size {fsdp}; replicate it with an earlier rule ({name!r}, 'replicate'), "
            f"or raise min_bytes above its {_nbytes(leaf)} bytes"
        )
    # "column" / "row": Megatron's split of a [in, out] kernel.
    if len(shape) != 2:
        raise ValueError(
            f"{rule}: {tactic!r} splits 2-D [in, out] kernels, but leaf {name!r} has shape {shape}"
        )
    split, other = (1, 0) if tactic == "column" else (0, 1)
    entries = [None, None]
    if _size(mesh, TENSOR) > 1:
        _divisible(name, shape, split, (TENSOR,), mesh, rule)
        entries[split] = TENSOR
    if shard_fsdp:
        _divisible(name, shape, other, (FSDP,), mesh, rule)
        entries[other] = FSDP
    return P(*entries)
