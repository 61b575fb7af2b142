"""One train state and one step core for every trainer: ``step(state, batch) -> (state, metrics)``.

Every step in ftlab (plain training, MAML / ANIL / Meta-SGD / Reptile meta-steps, multi-task
training, pretraining) carries the same :class:`TrainState` and calls the same loss signature::

    loss_fn(params, batch, rng) -> (loss, aux)        # loss: scalar mean; aux: {name: scalar}

and ends in the same update, :func:`apply_gradients`. The step kinds differ only in how they turn
``(state, batch)`` into a gradient of ``state.trainable``: :func:`make_train_step` differentiates
the loss; `ftlab.meta.make_meta_step` differentiates the query loss after an inner loop that
calls the same ``loss_fn``; `ftlab.meta.make_reptile_step` hands the optimizer a direction.
:func:`scan_steps` runs any of them many times inside one `jax.lax.scan`.

The state holds three kinds of leaves:

- ``trainable``: the leaves the optimizer updates from a gradient (their optimizer state is
  ``opt_state``). Meta-SGD's learned inner learning rates are trainable leaves like any other,
  under ``inner_lr/...`` in the same tree (see `ftlab.meta.with_inner_lr`).
- ``frozen``: parameter leaves that get no gradient, no optimizer state, and never change
  (bit-identical). ``partition.split(params, label_tree)`` decides, by rules over leaf paths.
- ``collections``: non-parameter variables a model updates in its forward pass (Flax's
  ``batch_stats``, or any other mutable collection), as ``{name: tree}``. They get no gradient
  and no optimizer state. Labels over their paths (``batch_stats/bn_0/mean``) decide whether the
  step updates them: a leaf labelled ``"frozen"`` stays bit-identical (a linear probe on a
  BatchNorm trunk in eval mode), any other label lets the step take the loss's new value.

What the loss receives: with no collections, the merged parameter tree (``state.params``), as
``model.apply({"params": params}, ...)`` wants it. Once the state holds collections, the full
Flax variables dict ``{"params": params, **collections}`` (``state.variables``), and the loss
returns the updated collections in ``aux["collections"]``::

    def loss_fn(variables, batch, rng):
        logits, updates = model.apply(variables, batch["x"], train=True, mutable=["batch_stats"])
        return xent(logits, batch["y"]), {"collections": updates}

A state with collections whose loss returns no ``aux["collections"]`` (or one that lacks an
updated leaf), or a loss that returns collections the state does not hold, is an error: nothing
is dropped silently. ``aux["collections"]`` never reaches the metrics.

Donation: compile a step with the state donated (``jax.jit(step, donate_argnums=0)``). A donated
array is deleted, so :func:`init_state` copies the caller's arrays into the state: the caller's
``params`` stay usable after any number of donated steps (pass ``copy=False`` to hold one copy
of a large model, and drop your own reference). Checkpoints (`ftlab.core.checkpoint`) save the
state, collections included; :meth:`TrainState.checkpointable` leaves out the frozen parameters,
which come from the pretrained source on resume.

At scale (see `ftlab.core.sharding` for placing the state over a mesh):

- Gradient accumulation: ``make_train_step(..., accumulate=k)`` splits each batch into ``k``
  micro-batches of equal size, runs them one after another in a `jax.lax.scan` (one micro-batch's
  activations alive at a time) and applies one update with the mean gradient. For a loss that is
  a mean over examples this is the update of the whole batch, exactly up to float reassociation.
  A loss that is a mean over a varying number of units (tokens under a padding mask) is exact
  only when the loss reports that number in its aux (``weight="tokens"``): the micro-batch
  gradients and metrics are then averaged with those weights, which is the global token mean.
  Without ``weight`` such a loss gives the mean of micro-batch means.
- Rematerialisation: :func:`remat` wraps a loss so that the chosen Flax modules (by a regex over
  their paths, e.g. ``encoder/layer_\\d+``) recompute their activations in the backward pass under
  a `jax.checkpoint` policy by name; no model edit.
- Precision: a :class:`Precision` keeps trainable leaves in a master dtype (float32), stores the
  frozen base in a narrower one (bfloat16), and runs the forward pass in a compute dtype. A 4-bit
  base (`ftlab.peft.qlora.quantize`) keeps its own integer and float16 leaves: only float leaves
  wider than the target dtype are cast.

Why this shape: the parameter tree keeps the paths every rule, log and checkpoint already speak
of (``encoder/layer_3/attention/query/kernel``); collections sit beside it under their Flax names,
so a BatchNorm model's rules read ``batch_stats/.*``; and a meta-learned inner learning rate is
not a second kind of state but a subtree that partition rules freeze or train like the rest.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftlab.core import partition
from ftlab.types import Params, PRNGKey

__all__ = [
    "COLLECTIONS",
    "REMAT_POLICIES",
    "EvalFn",
    "LossFn",
    "Precision",
    "StepFn",
    "TrainState",
    "apply_gradients",
    "cast_floats",
    "copy_tree",
    "init_state",
    "make_eval_step",
    "make_train_step",
    "remat",
    "scan_steps",
]

# loss_fn(params, batch, rng) -> (scalar loss, aux); params is the merged tree (or the variables
# dict when the state holds collections); aux is {metric name: scalar}, plus "collections".
LossFn = Callable[[Params, Mapping[str, jax.Array], PRNGKey], tuple[jax.Array, dict]]
# eval_fn(params, batch) -> {name: per-example values [batch]}; summed under batch["mask"].
EvalFn = Callable[[Params, Mapping[str, jax.Array]], dict]
# The key of aux under which a loss returns its updated collections.
COLLECTIONS = "collections"


# `jax.checkpoint_policies` that take no argument, by name.
REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
)


@dataclasses.dataclass(frozen=True)
class Precision:
    """Which dtypes a train state stores and a step computes in.

    Only floating leaves wider than the target are cast: integer leaves and the float16 scales
    of a 4-bit QLoRA base (`ftlab.peft.qlora`) stay as they are, so a Q4 base composes with any
    policy.

    Attributes:
      compute: the forward pass's dtype (e.g. ``"bfloat16"``): the step casts the parameters to
        it inside the loss, so gradients flow back to the master leaves in their own dtype.
        None: no cast.
      master: the dtype of trainable leaves in the state (and so of their optimizer state).
      frozen: the storage dtype of frozen leaves (e.g. ``"bfloat16"``, half the bytes of
        float32); None keeps them as given. A frozen base in int8 (or Q4) is no dtype here: call
        ``ftlab.peft.qlora.quantize(params, targets=..., bits=8)`` on the frozen kernels first
        (the core cannot import ftlab.peft); their int8 leaves then stay as they are.
    """

    compute: str | None = None
    master: str | None = "float32"
    frozen: str | None = None

    def __post_init__(self):
        if self.frozen in ("int8", "int4", "q4_1"):
            # A cast cannot store a kernel in integers: the layer must dequantize it on the fly.
            raise ValueError(
                f"Precision: frozen={self.frozen!r} is not a cast; quantize the frozen kernels "
                "first with ftlab.peft.qlora.quantize(params, targets=..., bits=8) (int8) or "
                "bits=4 (QLoRA's 4-bit blocks), which the dense layers dequantize when they read"
            )
        for field in ("compute", "master", "frozen"):
            value = getattr(self, field)
            if value is not None and not jnp.issubdtype(_dtype(value, field), jnp.floating):
                raise ValueError(f"Precision: {field}={value!r} is not a floating dtype")


def _dtype(name, what: str):
    try:
        return jnp.dtype(name)
    except TypeError:
        raise ValueError(f"{what}={name!r} is not a dtype name such as 'bfloat16'") from None


def cast_floats(tree, dtype):
    """Casts the floating leaves of ``tree`` wider than ``dtype`` to it (None: unchanged).

    >>> cast_floats({"w": jnp.ones(2), "i": jnp.arange(2)}, "bfloat16")["w"].dtype
    dtype(bfloat16)
    """
    if dtype is None:
        return tree
    dtype = jnp.dtype(dtype)

    def cast(x):
        if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if jnp.dtype(x.dtype).itemsize <= dtype.itemsize:
            return x
        return x.astype(dtype)

    return jax.tree.map(cast, tree)


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes.

    Attributes:
      step: int32 scalar, the number of updates applied so far.
      trainable: the subtree the optimizer updates (see `partition.split`).
      frozen: the frozen parameter subtree; never updated.
      opt_state: optimizer state over ``trainable`` only.
      rng: a raw uint32 PRNG key; step ``s`` uses ``fold_in(rng, s)``.
      collections: ``{name: tree}`` of non-parameter variables (``batch_stats``); ``{}`` if none.
      fixed: the paths (``batch_stats/bn/mean``) of collection leaves the step never updates;
        static, so it is part of the compiled step rather than an input.
    """

    step: jax.Array
    trainable: Params
    frozen: Params
    opt_state: Any
    rng: jax.Array
    collections: dict = flax.struct.field(default_factory=dict)
    fixed: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

    @property
    def params(self) -> Params:
        """The full parameter tree, for the forward pass."""
        return partition.merge(self.trainable, self.frozen)

    @property
    def variables(self) -> Params:
        """What a loss or eval function receives: ``params``, or with collections the Flax
        variables dict ``{"params": params, **collections}``."""
        if not self.collections:
            return self.params
        return {"params": self.params, **self.collections}

    def checkpointable(self) -> TrainState:
        """The state without frozen parameters: they come from the pretrained source."""
        return self.replace(frozen={})


def copy_tree(tree):
    """Copies every `jax.Array` leaf (same sharding), so donating the copy cannot delete them."""
    return jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, tree)


def init_state(
    params: Params,
    label_tree: Mapping,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    collections: Mapping | None = None,
    collection_labels: Mapping | None = None,
    copy: bool = True,
    precision: Precision | None = None,
) -> TrainState:
    """Splits ``params`` by ``label_tree`` and initialises the optimizer on the trainable part.

    Args:
      params: the parameter tree (with Meta-SGD's ``inner_lr`` subtree, if any).
      label_tree: labels of ``params`` from `partition.labels`.
      tx: the optimizer over the trainable subtree.
      seed: seeds ``state.rng``.
      collections: non-parameter variables, ``{"batch_stats": ...}`` as `Module.init` returns
        them beside ``"params"``; None or ``{}`` for a model without any.
      collection_labels: labels of ``collections`` (from `partition.labels(collections, rules)`
        with rules over ``batch_stats/...`` paths): ``"frozen"`` keeps a leaf bit-identical, any
        other label lets the step update it. None: every collection leaf is updated.
      copy: copy the caller's arrays into the state (default), so a step compiled with the state
        donated never deletes ``params`` or ``collections``; False shares their buffers.
      precision: stores trainable float leaves in ``precision.master`` (cast up or down) and
        frozen ones narrowed to ``precision.frozen``; None keeps the given dtypes.

    Returns:
      The state at step 0.

    Raises:
      ValueError: ``collections`` has a ``"params"`` entry, or ``collection_labels`` does not
        match ``collections``.

    >>> state = init_state({"w": jnp.ones(2), "b": jnp.zeros(2)}, {"w": "train", "b": "frozen"},
    ...                    optax.sgd(0.1), seed=0)
    >>> sorted(state.trainable), sorted(state.frozen)
    (['w'], ['b'])
    """
    collections = dict(collections or {})
    if "params" in collections:
        raise ValueError(
            "init_state: collections has a 'params' entry; pass the parameters as params and "
            f"only the other collections ({sorted(k for k in collections if k != 'params')}) "
            "as collections"
        )
    fixed: tuple[str, ...] = ()
    if collection_labels is not None:
        flat, flat_labels = partition.flatten(collections), partition.flatten(collection_labels)
        if flat.keys() != flat_labels.keys():
            raise ValueError(
                "init_state: collection_labels does not match collections: only in collections "
                f"{sorted(flat.keys() - flat_labels.keys())[:5]}, only in collection_labels "
                f"{sorted(flat_labels.keys() - flat.keys())[:5]}"
            )
        fixed = tuple(k for k, v in flat_labels.items() if v == partition.FROZEN)
    if copy:
        params, collections = copy_tree((params, collections))
    trainable, frozen = partition.split(params, label_tree)
    if precision is not None:
        if precision.master is not None:
            trainable = jax.tree.map(
                lambda x: (
                    x.astype(precision.master) if jnp.issubdtype(x.dtype, jnp.floating) else x
                ),
                trainable,
            )
        frozen = cast_floats(frozen, precision.frozen)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=tx.init(trainable),
        rng=jax.random.PRNGKey(seed),
        collections=collections,
        fixed=fixed,
    )


def apply_gradients(
    state: TrainState,
    tx: optax.GradientTransformation,
    grads: Params,
    loss: jax.Array,
    aux: Mapping | None = None,
    *,
    axis_name: str | None = None,
) -> tuple[TrainState, dict]:
    """The end of every step: average over devices, update, count, report.

    Args:
      state: the state the gradient was computed at.
      tx: the optimizer over ``state.trainable``.
      grads: a tree like ``state.trainable`` (a gradient, or any update direction).
      loss: the scalar loss.
      aux: the loss's aux: ``{name: scalar}`` metrics, plus the updated collections under
        ``"collections"`` when the state holds collections.
      axis_name: the `jax.pmap` axis to average over; None under `jax.jit`.

    Returns:
      ``(new state, metrics)``: metrics ``train/loss``, ``train/grad_norm`` and ``train/<name>``
      for each metric in ``aux``.

    Raises:
      ValueError: the collections in ``aux`` do not match ``state.collections`` (see the module
        docstring).
    """
    aux = dict(aux or {})
    updated = aux.pop(COLLECTIONS, None)
    collections = _updated_collections(state, updated, axis_name)
    if axis_name is not None:
        grads, loss, aux = jax.lax.pmean((grads, loss, aux), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads)}
    metrics.update({f"train/{k}": v for k, v in aux.items()})
    new_state = state.replace(
        step=state.step + 1, trainable=trainable, opt_state=opt_state, collections=collections
    )
    return new_state, metrics


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
    accumulate: int = 1,
    weight: str | None = None,
    precision: Precision | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """Builds ``step(state, batch) -> (state, metrics)``; jit or pmap it with the state donated.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> (loss, aux)`` with ``loss`` the mean over the
        batch, so that the mean over equal device shards equals the global mean. It receives
        ``state.variables`` (see the module docstring for collections).
      tx: an optax transformation over the trainable subtree.
      axis_name: the mapped axis to average gradients, metrics and collections over under
        `jax.pmap`; None under `jax.jit`, where sharding propagation makes the batch mean global.
      accumulate: micro-batches per update. The batch's leading axis is split into
        ``accumulate`` equal micro-batches (rows ``i, i + accumulate, ...``, so every device
        keeps its own rows), their gradients averaged in a `jax.lax.scan`, and one update
        applied: the update of the whole batch (see the module docstring for which losses this
        is exact for). Micro-batch ``i`` draws its randomness from ``fold_in(rng, i)``.
      weight: the name of a scalar in the loss's aux that weights its micro-batch (e.g. the
        number of target tokens); None: equal weights. Reported summed over micro-batches.
      precision: with ``precision.compute``, the loss sees the parameters cast to that dtype
        (float leaves wider than it), and the loss and metrics are cast back to float32.

    Returns:
      The pure step function. Metrics: ``train/loss``, ``train/grad_norm`` and ``train/<name>``
      for each metric ``loss_fn`` returns.

    Raises:
      ValueError: ``accumulate`` is not a positive integer; at trace time, a batch size not
        divisible by ``accumulate``, ``weight`` missing from the aux, or ``accumulate > 1`` on a
        state with collections the step updates (BatchNorm statistics of micro-batches are not
        those of the batch).
    """
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"make_train_step: accumulate={accumulate!r}; expected an integer >= 1")
    if weight is not None and accumulate == 1:
        raise ValueError(
            f"make_train_step: weight={weight!r} only weights micro-batches; it has no effect "
            "with accumulate=1"
        )
    compute = None if precision is None else precision.compute

    def grad_of(state: TrainState, batch, rng):
        def loss_of_trainable(trainable):
            variables = cast_floats(state.replace(trainable=trainable).variables, compute)
            loss, aux = loss_fn(variables, batch, rng)
            if compute is not None:
                aux = {
                    k: v if k == COLLECTIONS else jnp.asarray(v, jnp.float32)
                    for k, v in aux.items()
                }
                loss = jnp.asarray(loss, jnp.float32)
            return loss, aux

        return jax.value_and_grad(loss_of_trainable, has_aux=True)(state.trainable)

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            # Different dropout masks per device, as one big batch would have.
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        if accumulate == 1:
            (loss, aux), grads = grad_of(state, batch, rng)
        else:
            loss, aux, grads = _accumulated(grad_of, state, batch, rng, accumulate, weight)
        return apply_gradients(state, tx, grads, loss, aux, axis_name=axis_name)

    return step


def _accumulated(grad_of, state: TrainState, batch, rng, k: int, weight: str | None):
    """The (weighted) mean loss, aux and gradient over ``k`` micro-batches, in one scan."""
    moving = [n for n in partition.flatten(state.collections) if n not in state.fixed]
    if moving:
        raise ValueError(
            f"make_train_step: accumulate={k} on a state whose collections the step updates "
            f"(e.g. {moving[:3]}): statistics of micro-batches differ from those of the batch; "
            "use accumulate=1 or label those leaves 'frozen'"
        )
    rows = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
    bad = [r for r in rows if r is None or r % k]
    if bad:
        raise ValueError(
            f"make_train_step: accumulate={k} must divide the batch's leading axis; the batch "
            f"has leading sizes {sorted(r for r in rows if r is not None)}"
            + (" and scalars" if None in rows else "")
        )

    # [n, ...] -> [k, n / k, ...] with micro-batch i = rows i, i + k, ...: a device's rows stay
    # on it, so splitting a sharded batch moves no data.
    def split(x):
        x = jnp.reshape(x, (x.shape[0] // k, k) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    micro = jax.tree.map(split, batch)

    def one(i, mb):
        (loss, aux), grads = grad_of(state, mb, jax.random.fold_in(rng, i))
        aux = {n: v for n, v in aux.items() if n != COLLECTIONS}
        if weight is not None and weight not in aux:
            raise ValueError(
                f"make_train_step: weight={weight!r} is not in the loss's aux, which has "
                f"{sorted(aux)}"
            )
        w = jnp.asarray(aux[weight], jnp.float32) if weight is not None else jnp.float32(1.0)
        return loss, aux, grads, w

    def body(carry, x):
        i, mb = x
        loss, aux, grads, w = one(i, mb)
        sums = jax.tree.map(lambda s, v: s + w * v, carry[:3], (loss, aux, grads))
        return (*sums, carry[3] + w), None

    shapes = jax.eval_shape(one, 0, jax.tree.map(lambda x: x[0], micro))
    # Sums in float32 whatever the master dtype, cast back once at the end.
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes[:3])
    (loss, aux, grads, total), _ = jax.lax.scan(
        body, (*zeros, jnp.float32(0.0)), (jnp.arange(k), micro)
    )
    loss, aux = jax.tree.map(lambda v: v / total, (loss, aux))
    grads = jax.tree.map(lambda g, s: (g / total).astype(s.dtype), grads, shapes[2])
    if weight is not None:
        aux[weight] = total
    return loss, aux, grads


def remat(loss_fn: LossFn, *, policy: str, modules: str | None = None) -> LossFn:
    """``loss_fn`` with activations recomputed in the backward pass, by a named policy.

    Args:
      loss_fn: any loss of this module's signature that applies a `flax.linen` model.
      policy: a name in :data:`REMAT_POLICIES` (`jax.checkpoint_policies`): what each wrapped
        call may keep for the backward pass (``"nothing_saveable"``: only its inputs;
        ``"dots_saveable"``: matmul outputs too).
      modules: a regex ``re.fullmatch``-ed against Flax module paths (``encoder/layer_3``); the
        ``__call__`` of each matching module runs under `jax.checkpoint`, so only one layer's
        activations are alive at a time in the backward pass. Found with
        `flax.linen.intercept_methods`, so no model is edited. None: the whole loss is one
        checkpointed call (saves the policy's residuals only; per-layer is the usual choice).

    Returns:
      A loss with the same signature and values (gradients equal up to float reassociation).

    Raises:
      ValueError: an unknown ``policy``; at trace time, ``modules`` matching no module the loss
        called (the paths it called are listed).
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat: policy={policy!r}; expected one of {REMAT_POLICIES}")
    checkpoint_policy = getattr(jax.checkpoint_policies, policy)
    if modules is None:
        return jax.checkpoint(loss_fn, policy=checkpoint_policy)
    try:
        pattern = re.compile(modules)
    except re.error as e:
        raise ValueError(f"remat: modules={modules!r} is not a valid regex: {e}") from None

    def wrapped(params, batch, rng):
        seen, hits = set(), []

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            path = "/".join(context.module.path)
            seen.add(path)
            if not pattern.fullmatch(path):
                return next_fun(*args, **kwargs)
            hits.append(path)
            return _checkpointed_call(next_fun, args, kwargs, checkpoint_policy)

        with nn.intercept_methods(interceptor):
            out = loss_fn(params, batch, rng)
        if not hits:
            raise ValueError(
                f"remat: modules={modules!r} matched no module the loss called; module paths: "
                f"{sorted(p for p in seen if p)[:8]}"
            )
        return out

    return wrapped


def _checkpointed_call(next_fun, args, kwargs, policy):
    # Only array arguments are traced; the rest (a `train` flag, a config) stay Python values,
    # as jax.checkpoint's static_argnums would keep them.
    leaves, treedef = jax.tree.flatten((args, kwargs))
    traced = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray))]

    def call(*values):
        filled = list(leaves)
        for i, v in zip(traced, values, strict=True):
            filled[i] = v
        a, kw = jax.tree.unflatten(treedef, filled)
        return next_fun(*a, **kw)

    return jax.checkpoint(call, policy=policy)(*(leaves[i] for i in traced))


StepFn = Callable[[TrainState, Any], tuple[TrainState, dict]]


def scan_steps(
    step: StepFn, state: TrainState, batch_at: Callable[[TrainState], Any], *, num_steps: int
) -> tuple[TrainState, dict]:
    """Runs ``num_steps`` steps in one `jax.lax.scan`, each on ``batch_at(state)``.

    For data that lives on the device (sampled inside the scan from ``state.step``), this removes
    the per-step host round trip that dominates a small network's step. Call it inside
    `jax.jit` (donating the state where the caller keeps no reference to it).

    Args:
      step: any step of this module's kind (not jitted: it is traced into the scan).
      state: the state to start from.
      batch_at: ``batch_at(state) -> batch``, traced; e.g. rows drawn with
        ``fold_in(state.rng, state.step)``.
      num_steps: steps to run (static).

    Returns:
      ``(state, metrics)`` with each metric stacked, ``[num_steps]``.
    """

    def body(state, _):
        return step(state, batch_at(state))

    return jax.lax.scan(body, state, None, length=num_steps)


def make_eval_step(
    eval_fn: EvalFn, *, axis_name: str | None = None, precision: Precision | None = None
) -> Callable[[TrainState, Mapping[str, jax.Array]], dict]:
    """Builds ``eval_step(state, batch) -> {name: masked sum}`` plus ``count``.

    ``eval_fn`` receives ``state.variables`` (the parameters, or with collections the variables
    dict). ``batch["mask"]`` marks real rows (1) against padding (0); dividing the summed values by
    the summed ``count`` over all batches gives exact means regardless of padding or device count.
    With ``precision.compute``, ``eval_fn`` sees the parameters in that dtype, as the train step.
    """
    compute = None if precision is None else precision.compute

    def eval_step(state: TrainState, batch):
        values = eval_fn(cast_floats(state.variables, compute), batch)
        mask = batch["mask"]
        if compute is not None:  # sums in float32, not the compute dtype
            values = {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
        sums = {k: jnp.sum(v * mask) for k, v in values.items()}
        sums["count"] = jnp.sum(mask)
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return eval_step


def _updated_collections(state: TrainState, updated: Mapping | None, axis_name) -> dict:
    """The state's collections after a step: the loss's values (averaged over devices under
    `jax.pmap`), except where ``fixed``: those leaves pass through as they are, bit for bit."""
    if updated is None:
        moving = [k for k in partition.flatten(state.collections) if k not in state.fixed]
        if moving:
            raise ValueError(
                f"loss_fn returned no aux[{COLLECTIONS!r}], but the state holds collections the "
                f"step updates, e.g. {moving[:3]}; return the updated collections (model.apply("
                "..., mutable=[...]) gives them) or label those leaves 'frozen' in "
                "init_state's collection_labels"
            )
        return state.collections
    old, new = partition.flatten(state.collections), partition.flatten(updated)
    extra = sorted(new.keys() - old.keys())
    if extra:
        raise ValueError(
            f"loss_fn returned aux[{COLLECTIONS!r}] leaves the state does not hold: {extra[:5]}; "
            "pass them to init_state(..., collections=...)"
        )
    missing = sorted(k for k in old.keys() - new.keys() if k not in state.fixed)
    if missing:
        raise ValueError(
            f"loss_fn's aux[{COLLECTIONS!r}] lacks collection leaves the step updates: "
            f"{missing[:5]}; return every mutable collection, or label those leaves 'frozen' "
            "in init_state's collection_labels"
        )
    fixed = set(state.fixed)
    flat = {}
    for name, leaf in old.items():
        if name in fixed:
            flat[name] = leaf
            continue
        value = new[name]
        if jnp.shape(value) != jnp.shape(leaf):
            raise ValueError(
                f"loss_fn's aux[{COLLECTIONS!r}][{name!r}] has shape {jnp.shape(value)}; the "
                f"state's has {jnp.shape(leaf)}"
            )
        value = jnp.asarray(value, jnp.result_type(leaf))
        flat[name] = value if axis_name is None else jax.lax.pmean(value, axis_name)
    return partition.unflatten(flat)
