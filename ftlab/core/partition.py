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
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import optax

from ftlab.types import Params, PyTree

FROZEN = "frozen"
Rules = Sequence[tuple[str, str]]


def path_name(key_path: Sequence) -> str:
    """Returns the slash-joined name of a `jax.tree_util` key path: ``encoder/layer_0/kernel``."""
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    return "/".join(parts)


def flatten(tree: PyTree) -> dict[str, object]:
    """Returns ``{path_name: leaf}`` in tree order.

    >>> flatten({"a": {"b": 1, "c": 2}})
    {'a/b': 1, 'a/c': 2}
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_name(p): v for p, v in leaves}


def unflatten(flat: Mapping[str, object]) -> dict:
    """Inverse of :func:`flatten` for nested-dict trees."""
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


def labels(params: Params, rules: Rules, *, what: str = "config.partition.rules") -> dict:
    """Labels every leaf with the label of the first rule whose regex fully matches its path.

    Args:
      params: a nested-dict parameter tree.
      rules: ordered ``(regex, label)`` pairs; end with a catch-all such as ``(".*", "frozen")``.
      what: how to name the rules in error messages (the config key they came from).

    Returns:
      A nested dict of the same structure as ``params`` with string labels as leaves.

    Raises:
      ValueError: a rule claims no leaf, a leaf is claimed by no rule, or a regex is invalid.
    """
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(f"{what}[{i}]: expected a (regex, label) pair, got {rule!r}")
        pattern, label = rule
        try:
            compiled.append((re.compile(pattern), str(label)))
        except re.error as e:
            raise ValueError(f"{what}[{i}]: invalid regex {pattern!r}: {e}") from None
    flat = flatten(params)
    out, claimed, uncovered = {}, collections.Counter(), []
    for name in flat:
        for i, (regex, label) in enumerate(compiled):
            if regex.fullmatch(name):
                out[name] = label
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
    return unflatten(out)


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


def split(params: Params, label_tree: Mapping) -> tuple[dict, dict]:
    """Splits ``params`` into ``(trainable, frozen)`` nested dicts with disjoint leaves.

    Leaves labelled :data:`FROZEN` go to ``frozen``; all others to ``trainable``. Empty branches are
    dropped, so either part may be ``{}``.
    """
    flat, flat_labels = flatten(params), flatten(label_tree)
    if flat.keys() != flat_labels.keys():
        only_p = sorted(flat.keys() - flat_labels.keys())[:5]
        only_l = sorted(flat_labels.keys() - flat.keys())[:5]
        raise ValueError(
            f"label tree does not match params: only in params {only_p}, only in labels {only_l}"
        )
    trainable = {k: v for k, v in flat.items() if flat_labels[k] != FROZEN}
    frozen = {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}
    return unflatten(trainable), unflatten(frozen)


def merge(*trees: Mapping) -> dict:
    """Merges disjoint nested dicts (e.g. ``trainable`` and ``frozen``) into one tree.

    Cheap and traceable: under `jax.jit` it only rearranges references.
    """
    out: dict = {}
    for tree in trees:
        _merge_into(out, tree, "")
    return out


def _merge_into(out: dict, tree: Mapping, prefix: str) -> None:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            node = out.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"merge: {prefix}{k} is both a leaf and a subtree")
            _merge_into(node, v, f"{prefix}{k}/")
        else:
            if k in out:
                raise ValueError(f"merge: leaf {prefix}{k} appears in more than one tree")
            out[k] = v


def trainable_labels(label_tree: Mapping) -> dict:
    """The label tree restricted to trainable leaves (same structure as ``trainable``)."""
    flat = flatten(label_tree)
    return unflatten({k: v for k, v in flat.items() if v != FROZEN})


def optimizer(
    transforms: Mapping[str, optax.GradientTransformation], label_tree: Mapping
) -> optax.GradientTransformation:
    """One optax transformation per trainable label, applied to the ``trainable`` subtree.

    Args:
      transforms: ``{label: transformation}`` for every trainable label in ``label_tree``.
      label_tree: from :func:`labels` (frozen leaves are ignored: they are not in ``trainable``).

    Returns:
      A transformation whose ``init``/``update`` take the ``trainable`` tree from :func:`split`.
    """
    used = sorted(set(flatten(trainable_labels(label_tree)).values()))
    missing = [label for label in used if label not in transforms]
    if missing:
        raise ValueError(
            f"no optimizer for partition label(s) {missing}; configured: {sorted(transforms)}"
        )
    if len(used) == 1:
        return transforms[used[0]]
    return optax.partition({k: transforms[k] for k in used}, trainable_labels(label_tree))


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
