"""Partition a parameter tree into trainable and frozen leaves by rules over leaf paths.

A leaf's name is its slash-joined path, e.g. ``encoder/layer_3/attention/query/kernel``. Rules are
ordered ``(regex, label)`` pairs matched with ``re.fullmatch``; the first match wins. The label
``"frozen"`` (:data:`FROZEN`) freezes a leaf; any other label makes it trainable and names its
optimizer group, so per-group learning rates are just more labels::

    rules = [("head/.*", "train"), (".*/bias", "train"), (".*", "frozen")]   # BitFit
    labels = partition.labels(params, rules)
    trainable, frozen = partition.split(params, labels)
    loss = loss_fn(partition.merge(trainable, frozen))                      # forward pass
    grads = jax.grad(lambda t: loss_fn(partition.merge(t, frozen)))(trainable)

Differentiating with respect to ``trainable`` alone means frozen leaves get no gradient computed,
no optimizer state (build the optimizer on ``trainable``), and stay bit-identical.

``"frozen"`` is the only frozen label. Words a reader could take for it (``"freeze"``, optax's
word; ``"Frozen"``, ``"frozen "``, ``"fixed"``, ``"none"``, ...) are refused with an error that
suggests ``"frozen"``, because as ordinary labels they would silently make a trainable group.

Any pytree works, not only nested dicts: lists, tuples, dataclasses (``flax.struct``), registered
custom nodes and ``nnx.State``. :func:`split` keeps the tree's own node types; a leaf or subtree
that belongs to the other part is left out of a dict and is ``None`` anywhere else (``None`` is
an empty subtree to `jax.grad`, `jax.tree.map` and optax, so the trainable part goes straight to
them). :func:`merge` puts the parts back into the original structure.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import optax

from ftlab.types import Params, PyTree

__all__ = [
    "FROZEN",
    "Rules",
    "claims",
    "count",
    "flatten",
    "labels",
    "merge",
    "optimizer",
    "path_name",
    "paths",
    "split",
    "summary",
    "trainable_labels",
    "unflatten",
]

FROZEN = "frozen"
Rules = Sequence[tuple[str, str]]

# Labels that read as "do not train" but are not FROZEN; compared after strip() and lower().
_FROZEN_LIKE = frozenset(
    {
        "freeze",
        "frozen",
        "freezed",
        "fixed",
        "fix",
        "none",
        "null",
        "no",
        "off",
        "false",
        "0",
        "const",
        "constant",
        "stop",
        "stop_gradient",
        "set_to_zero",
        "zero",
        "skip",
        "ignore",
        "lock",
        "locked",
        "notrain",
        "no_train",
        "untrained",
        "not_trainable",
        "nontrainable",
        "non_trainable",
        "inference",
        "eval",
    }
)


def path_name(key_path: Sequence) -> str:
    """Returns the slash-joined name of a `jax.tree_util` key path: ``encoder/layer_0/kernel``.

    >>> path_name((jax.tree_util.DictKey("encoder"), jax.tree_util.SequenceKey(2)))
    'encoder/2'
    """
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def flatten(tree: PyTree) -> dict[str, object]:
    """Returns ``{path_name: leaf}`` in tree order.

    Args:
      tree: any pytree.

    Returns:
      The leaves by name; ``None`` subtrees hold no leaves and do not appear.

    Raises:
      ValueError: a dict key contains ``/``, or two leaves would share a name.

    >>> flatten({"a": {"b": 1, "c": 2}, "d": [3]})
    {'a/b': 1, 'a/c': 2, 'd/0': 3}
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for path, leaf in leaves:
        for i, k in enumerate(path):
            if isinstance(k, jax.tree_util.DictKey) and "/" in str(k.key):
                where = path_name(path[:i])
                raise ValueError(
                    f"dict key {str(k.key)!r}"
                    + (f" under {where!r}" if where else "")
                    + " contains '/', the separator of leaf paths, so its leaves would be "
                    "renamed and regrouped; rename the key (e.g. replace '/' by '_')."
                )
        name = path_name(path)
        if name in out:  # e.g. dict keys 1 and "1"
            raise ValueError(f"two leaves share the path name {name!r}; rename one of their keys.")
        out[name] = leaf
    return out


def unflatten(flat: Mapping[str, object], *, like: PyTree | None = None) -> PyTree:
    """Inverse of :func:`flatten`.

    Args:
      flat: ``{path_name: leaf}``.
      like: a tree with the structure to rebuild (lists, dataclasses, ...); its leaves are
        ignored and ``flat`` must name exactly its leaves. None builds nested dicts from the names.

    Returns:
      The tree.

    Raises:
      ValueError: with ``like``, the names differ from its leaves' names.

    >>> unflatten({"a/b": 1, "a/c": 2})
    {'a': {'b': 1, 'c': 2}}
    >>> unflatten({"0": 5, "1/x": 6}, like=[0, {"x": 0}])
    [5, {'x': 6}]
    """
    if like is not None:
        names = list(flatten(like))
        if set(names) != set(flat):
            raise ValueError(
                f"unflatten: flat and like name different leaves: only in flat "
                f"{sorted(set(flat) - set(names))[:5]}, only in like "
                f"{sorted(set(names) - set(flat))[:5]}"
            )
        treedef = jax.tree_util.tree_structure(like)
        return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])
    out: dict = {}
    for name, leaf in flat.items():
        node = out
        *parents, last = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def paths(tree: PyTree) -> PyTree:
    """Returns a tree of the same structure whose leaves are their own path names."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_name(p), tree)


def labels(params: Params, rules: Rules, *, what: str = "rules") -> PyTree:
    """Labels every leaf with the label of the first rule whose regex fully matches its path.

    Args:
      params: a parameter pytree (nested dicts, lists, dataclasses, ...).
      rules: ordered ``(regex, label)`` pairs; end with a catch-all such as ``(".*", "frozen")``.
        A label is a string: :data:`FROZEN` or the name of a trainable optimizer group.
      what: how to name the rules in error messages; a caller that read them from a config
        passes the config key (e.g. ``"config.partition.rules"``).

    Returns:
      A tree of the same structure as ``params`` with string labels as leaves.

    Raises:
      ValueError: a rule claims no leaf, a leaf is claimed by no rule, a regex is invalid, a label
        is not a string or reads as frozen without being ``"frozen"`` (``"freeze"``), or a dict
        key of ``params`` contains ``/``.

    >>> labels({"w": 1.0, "head": [2.0]}, [("head/.*", "train"), (".*", "frozen")])
    {'head': ['train'], 'w': 'frozen'}
    """
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(f"{what}[{i}]: expected a (regex, label) pair, got {rule!r}")
        pattern, label = rule
        _check_label(label, f"{what}[{i}]")
        try:
            compiled.append((re.compile(pattern), label))
        except (re.error, TypeError) as e:
            raise ValueError(f"{what}[{i}]: invalid regex {pattern!r}: {e}") from None
    flat = flatten(params)
    out, claimed, uncovered = [], collections.Counter(), []
    for name in flat:
        for i, (regex, label) in enumerate(compiled):
            if regex.fullmatch(name):
                out.append(label)
                claimed[i] += 1
                break
        else:
            uncovered.append(name)
    if uncovered:
        raise ValueError(
            f"{what}: {len(uncovered)} leaves match no rule, e.g. {uncovered[:5]}; "
            "end the rules with a catch-all such as ('.*', 'frozen')."
        )
    unused = [rules[i][0] for i in range(len(compiled)) if claimed[i] == 0]
    if unused:
        top = sorted({n.split("/")[0] for n in flat})
        raise ValueError(
            f"{what}: pattern {unused[0]!r} matched no leaf"
            + (f" (nor did {unused[1:]})" if len(unused) > 1 else "")
            + f"; top-level names are: {', '.join(top)}. Example leaf: {next(iter(flat), None)!r}."
        )
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), out)


def _check_label(label: object, what: str) -> None:
    if not isinstance(label, str):
        raise ValueError(
            f"{what}: label {label!r} is not a string; use {FROZEN!r} or a trainable group name "
            "such as 'train'."
        )
    if label != FROZEN and label.strip().lower() in _FROZEN_LIKE:
        raise ValueError(
            f"{what}: label {label!r} is not a partition label; the label that freezes is "
            f"{FROZEN!r} (any other label would make {label!r} a trainable group)."
        )


def claims(params: Params, rules: Rules) -> list[tuple[str, str, int]]:
    """Returns ``(regex, label, n_leaves_claimed)`` per rule, for the start-up log."""
    flat = flatten(params)
    counts = collections.Counter()
    for name in flat:
        for i, (pattern, _) in enumerate(rules):
            if re.fullmatch(pattern, name):
                counts[i] += 1
                break
    return [(p, lab, counts[i]) for i, (p, lab) in enumerate(rules)]


def split(params: Params, label_tree: PyTree) -> tuple[PyTree, PyTree]:
    """Splits ``params`` into ``(trainable, frozen)`` trees with disjoint leaves.

    Leaves labelled :data:`FROZEN` go to ``frozen``; all others to ``trainable``. Both keep the
    node types of ``params``. A dict leaves out keys whose subtree has no leaf in that part, so a
    nested-dict tree gives nested dicts and either part may be ``{}``; under any other node
    (list, tuple, dataclass, custom node) a missing leaf or subtree is ``None``. Subtrees that
    hold no leaf at all (an empty dict or list) go to ``frozen``, so :func:`merge` rebuilds them.

    Args:
      params: the parameter pytree.
      label_tree: labels for the leaves of ``params``, from :func:`labels`.

    Returns:
      ``(trainable, frozen)``; ``merge(trainable, frozen)`` has the structure of ``params``.

    Raises:
      ValueError: ``label_tree`` does not name the same leaves as ``params``, or holds a label
        that is not a string or reads as frozen without being ``"frozen"``.

    >>> trainable, frozen = split([{"w": 1, "b": 2}, 3], [{"w": "frozen", "b": "train"}, "frozen"])
    >>> trainable, frozen
    ([{'b': 2}, None], [{'w': 1}, 3])
    >>> merge(trainable, frozen)
    [{'b': 2, 'w': 1}, 3]
    """
    flat, flat_labels = flatten(params), flatten(label_tree)
    if flat.keys() != flat_labels.keys():
        only_p = sorted(flat.keys() - flat_labels.keys())[:5]
        only_l = sorted(flat_labels.keys() - flat.keys())[:5]
        raise ValueError(
            f"label_tree does not match params: only in params {only_p}, only in labels {only_l}"
        )
    for name, label in flat_labels.items():
        _check_label(label, f"label_tree[{name!r}]")
    # By name, in the order of params' leaves: a label tree of another node type (nested dicts
    # for a dataclass, say) may list the same leaves in another order.
    is_frozen = [flat_labels[name] == FROZEN for name in flat]
    return _part(params, [not f for f in is_frozen], keep_empty=False), _part(
        params, is_frozen, keep_empty=True
    )


# Stands for a leaf of the other part while a part is pruned; never leaves this module.
_OTHER = type("_Other", (), {"__repr__": lambda self: "<other part>"})()
_EMPTY = object()  # a pruned subtree with nothing left


def _part(tree: PyTree, keep: Sequence[bool], *, keep_empty: bool) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    marked = treedef.unflatten([x if k else _OTHER for x, k in zip(leaves, keep, strict=True)])
    out = _prune(marked, keep_empty)
    if out is not _EMPTY:
        return out
    if isinstance(tree, dict):
        return {}
    children = _children(tree)
    if children is None:  # the tree is a single leaf
        return None
    return children[0].unflatten([None] * len(children[1]))


def _children(node: PyTree) -> tuple[jax.tree_util.PyTreeDef, list] | None:
    """The one-level structure and children of a pytree node, or None for a leaf."""
    kids, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if len(kids) == 1 and kids[0] is node:
        return None
    return treedef, kids


def _prune(node: PyTree, keep_empty: bool) -> object:
    if node is _OTHER:
        return _EMPTY
    if not jax.tree_util.tree_leaves(node):  # no leaf of either part below: None, {}, []
        return node if keep_empty else _EMPTY
    if type(node) is dict:
        out = {}
        for k, v in node.items():
            p = _prune(v, keep_empty)
            if p is not _EMPTY:
                out[k] = p
        return out if out else _EMPTY
    children = _children(node)
    if children is None:
        return node
    treedef, kids = children
    pruned = [_prune(k, keep_empty) for k in kids]
    if all(p is _EMPTY for p in pruned):
        return _EMPTY
    return treedef.unflatten([None if p is _EMPTY else p for p in pruned])


def merge(*trees: PyTree) -> PyTree:
    """Merges trees with disjoint leaves (e.g. ``trainable`` and ``frozen``) into one tree.

    Dicts are united key by key; any other node must have the same type (and, for dataclasses
    and custom nodes, the same static fields) in every tree that holds it, and ``None`` or a
    missing key stands for "in another tree". So ``merge(*split(params, label_tree))`` has the
    structure of ``params``, and merging nested dicts works as it always did.

    Cheap and traceable: under `jax.jit` it only rearranges references.

    Raises:
      ValueError: a leaf appears in more than one tree, a path is a leaf in one tree and a
        subtree in another, or two trees hold different node types at a path.
    """
    return _merge_nodes(list(trees), "")


def _absent(x: object) -> bool:
    return x is None or (type(x) is dict and not x)


def _merge_nodes(nodes: list, path: str) -> PyTree:
    present = [n for n in nodes if not _absent(n)]
    if not present:
        # Keep an empty dict or list over None: it may be part of the original structure.
        return next((n for n in nodes if n is not None), None)
    if len(present) == 1:
        return present[0]
    where = path.rstrip("/") or "the root"
    if all(type(n) is dict for n in present):
        out: dict = {}
        keys = list(dict.fromkeys(k for n in present for k in n))
        for k in keys:
            out[k] = _merge_nodes([n[k] for n in present if k in n], f"{path}{k}/")
        return out
    structures = [_children(n) for n in present]
    if all(s is None for s in structures):
        raise ValueError(f"merge: leaf {where} appears in more than one tree")
    if any(s is None for s in structures):
        raise ValueError(f"merge: {where} is both a leaf and a subtree")
    treedef = structures[0][0]
    for n, (other, _) in zip(present[1:], structures[1:], strict=True):
        if other != treedef:
            raise ValueError(
                f"merge: {where} is {_describe(present[0], treedef)} in one tree and "
                f"{_describe(n, other)} in another"
            )
    keys = [
        path_name(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(
            present[0], is_leaf=lambda x: x is not present[0]
        )[0]
    ]
    merged = [
        _merge_nodes([s[1][i] for s in structures], f"{path}{keys[i]}/")
        for i in range(len(structures[0][1]))
    ]
    return treedef.unflatten(merged)


def _describe(node: object, treedef: jax.tree_util.PyTreeDef) -> str:
    return f"a {type(node).__name__} ({treedef})"


def trainable_labels(label_tree: PyTree) -> PyTree:
    """The label tree restricted to trainable leaves (same structure as ``trainable``)."""
    return split(label_tree, label_tree)[0]


def optimizer(
    transforms: Mapping[str, optax.GradientTransformation], label_tree: PyTree
) -> optax.GradientTransformation:
    """One optax transformation per trainable label, applied to the ``trainable`` subtree.

    Args:
      transforms: ``{label: transformation}`` for every trainable label in ``label_tree``.
      label_tree: from :func:`labels` (frozen leaves are ignored: they are not in ``trainable``).

    Returns:
      A transformation whose ``init``/``update`` take the ``trainable`` tree from :func:`split`.

    Raises:
      ValueError: a trainable label has no transformation in ``transforms``.
    """
    tl = trainable_labels(label_tree)
    used = sorted(set(flatten(tl).values()))
    missing = [label for label in used if label not in transforms]
    if missing:
        raise ValueError(
            f"no optimizer for partition label(s) {missing}; transforms has: {sorted(transforms)}"
        )
    if len(used) == 1:
        return transforms[used[0]]
    return optax.partition({k: transforms[k] for k in used}, tl)


def summary(params: Params, label_tree: Mapping, *, depth: int = 1) -> str:
    """A one-screen table of trainable/frozen leaf counts, parameters and bytes per module."""
    flat, flat_labels = flatten(params), flatten(label_tree)
    rows: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0, 0, 0])
    for name, leaf in flat.items():
        module = "/".join(name.split("/")[:depth])
        size = int(np.prod(np.shape(leaf)))
        nbytes = size * np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
        col = 0 if flat_labels[name] != FROZEN else 3
        r = rows[module]
        r[col] += 1
        r[col + 1] += size
        r[col + 2] += nbytes
    total = [sum(r[i] for r in rows.values()) for i in range(6)]
    lines = [
        f"{'module':<28}{'trainable':>12}{'params':>14}{'bytes':>11}"
        f"{'frozen':>9}{'params':>14}{'bytes':>11}"
    ]
    for module, r in list(rows.items()) + [("TOTAL", total)]:
        lines.append(
            f"{module:<28}{r[0]:>12,}{r[1]:>14,}{_human(r[2]):>11}"
            f"{r[3]:>9,}{r[4]:>14,}{_human(r[5]):>11}"
        )
    pct = 100.0 * total[1] / max(total[1] + total[4], 1)
    lines.append(f"trainable: {total[1]:,} of {total[1] + total[4]:,} parameters ({pct:.3f}%)")
    return "\n".join(lines)


def count(tree: PyTree) -> int:
    """Number of scalar parameters in a tree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)
