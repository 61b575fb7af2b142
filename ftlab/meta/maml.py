"""MAML, first-order MAML, ANIL and Meta-SGD as pure functions over a partitioned parameter tree.

Three sets of leaves take part in a meta-step:

- *adapted* leaves, chosen by the inner ``rules``: the inner loop takes gradient steps on them
  (every leaf for MAML, ``head/.*`` for ANIL, ``.*/lora_(a|b)`` for MAML over LoRA factors);
- *meta-trained* leaves, the ``trainable`` part of the state (`ftlab.core.train.TrainState`, the
  same state every ftlab step carries): the outer optimizer updates them from the gradient of the
  query loss after adaptation;
- *frozen* leaves: no inner gradient, no outer gradient, no optimizer state, bit-identical.

Meta-SGD's learned per-parameter inner learning rates are leaves of the same tree, under
``inner_lr/...`` (:data:`INNER_LR`, added by :func:`with_inner_lr`): partition rules train or
freeze them like any other leaf, checkpoints save them, and the meta-step reads its inner step
sizes from them when they are there.

A task batch is a dict ``{"support": {...}, "query": {...}}`` whose leaves are
``[tasks, shots, ...]`` arrays (``x`` and ``y`` for regression); one task is the same without the
leading axis. ``loss_fn(params, batch, rng) -> (loss, aux)`` is the loss of every ftlab step
(`ftlab.core.train.LossFn`), here the mean loss over a batch of one task::

    rules = maml.ALL                                       # or maml.head_rules() for ANIL
    state = train.init_state(params, label_tree, optax.adam(1e-3), seed=0)
    step = jax.jit(maml.make_meta_step(loss_fn, tx, inner_lr=0.01, num_steps=1, rules=rules))
    state, metrics = step(state, tasks)                   # metrics["train/loss"]: query loss
    adapted = maml.adapt(state.params, support, loss_fn=loss_fn, inner_lr=0.01, num_steps=10)

The inner loop is a `jax.lax.scan` over steps (``remat=True`` wraps each step in
`jax.checkpoint`, so backpropagating through many steps stores only the adapted leaves per step,
not every activation); the task batch is a `jax.vmap`; the meta-step is one function to jit (or
pmap with ``axis_name``). Under `jax.jit` with the task axis sharded over a mesh (e.g. with
`ftlab.core.parallel.Plan.compile_train_step`), the step runs data parallel over tasks. The loss
gets its own key per task and inner step, from ``fold_in(state.rng, state.step)``.

References:
    Finn et al., "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks" (MAML and
    first-order MAML), https://arxiv.org/abs/1703.03400
    Raghu et al., "Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of
    MAML" (ANIL), https://arxiv.org/abs/1909.09157
    Li et al., "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
    https://arxiv.org/abs/1707.09835
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ftlab.core import partition, train, xla
from ftlab.types import Params, PRNGKey, PyTree

__all__ = [
    "ADAPT",
    "ALL",
    "INNER_LR",
    "LossFn",
    "adapt",
    "check_tasks",
    "compiler_options",
    "head_rules",
    "init_inner_lr",
    "make_meta_step",
    "meta_loss",
    "split_inner_lr",
    "with_inner_lr",
]

# The loss of every ftlab step: loss_fn(params, batch, rng) -> (scalar mean loss, aux).
LossFn = train.LossFn
Rules = Sequence[tuple[str, str]]

ADAPT = "adapt"
# Inner rules: every leaf adapts (MAML, Meta-SGD). A leaf labelled `partition.FROZEN` in the inner
# rules is held fixed by the inner loop (it may still be meta-trained by the outer loop).
ALL: Rules = ((".*", ADAPT),)
# The top-level key of Meta-SGD's learned inner learning rates in the parameter tree.
INNER_LR = "inner_lr"


def head_rules(head: str = "head") -> Rules:
    """ANIL's inner rules: only the leaves under ``head`` adapt; the body is reused as is.

    >>> head_rules()
    (('head/.*', 'adapt'), ('.*', 'frozen'))
    """
    return ((f"{head}/.*", ADAPT), (".*", partition.FROZEN))


def init_inner_lr(
    params: Params, rng: PRNGKey, *, rules: Rules = ALL, low: float = 0.005, high: float = 0.1
) -> dict:
    """Meta-SGD's per-parameter inner learning rates, drawn uniform in ``[low, high)``.

    Li et al. (2017, section 4.1) initialise every entry of alpha at random in [0.005, 0.1].

    Returns:
      A tree with the structure and shapes of the adapted leaves (those ``rules`` select).

    >>> lr = init_inner_lr({"w": jnp.zeros((2, 3))}, jax.random.key(0))
    >>> lr["w"].shape, bool(jnp.all((lr["w"] >= 0.005) & (lr["w"] < 0.1)))
    ((2, 3), True)
    """
    fast, _ = partition.split(params, partition.labels(params, rules, what="rules"))
    leaves, treedef = jax.tree.flatten(fast)
    keys = jax.random.split(rng, max(len(leaves), 1))
    lrs = [
        jax.random.uniform(k, jnp.shape(x), jnp.result_type(x), low, high)
        for k, x in zip(keys, leaves, strict=False)
    ]
    return jax.tree.unflatten(treedef, lrs)


def with_inner_lr(params: Params, rng: PRNGKey, **kwargs) -> dict:
    """``params`` plus Meta-SGD's learned rates under :data:`INNER_LR`, from `init_inner_lr`.

    Label the result with rules that cover ``inner_lr/...`` (a catch-all does) and build the state
    with `ftlab.core.train.init_state`: the meta-step then adapts with these rates and, where they
    are trainable, learns them.

    Raises:
      ValueError: ``params`` already has an ``inner_lr`` entry.

    >>> sorted(with_inner_lr({"w": jnp.zeros(2)}, jax.random.key(0)))
    ['inner_lr', 'w']
    """
    if INNER_LR in params:
        raise ValueError(f"with_inner_lr: params already has an {INNER_LR!r} entry")
    return {**params, INNER_LR: init_inner_lr(params, rng, **kwargs)}


def split_inner_lr(params: Params) -> tuple[dict, PyTree | None]:
    """``(params without inner_lr, the learned rates or None)``.

    >>> split_inner_lr({"w": 1.0, "inner_lr": {"w": 0.1}})
    ({'w': 1.0}, {'w': 0.1})
    """
    if INNER_LR not in params:
        return params, None
    rest = {k: v for k, v in params.items() if k != INNER_LR}
    return rest, params[INNER_LR]


def adapt(
    params: Params,
    support: Mapping[str, jax.Array],
    *,
    loss_fn: LossFn,
    inner_lr: float | PyTree,
    num_steps: int,
    rules: Rules = ALL,
    first_order: bool = False,
    remat: bool = False,
    rng: PRNGKey | None = None,
) -> Params:
    """Takes ``num_steps`` gradient steps on the support loss, on the leaves ``rules`` select.

    ``phi_{s+1} = phi_s - inner_lr * grad_phi loss_fn(merge(phi_s, rest), support)``, where
    ``phi`` are the adapted leaves and ``rest`` every other leaf, which is passed through untouched
    (the same array objects) and gets no gradient. Differentiating the result with respect to
    ``params`` gives the MAML meta-gradient, second-order terms included unless ``first_order``.

    Args:
      params: the full parameter tree (without an ``inner_lr`` entry: see `split_inner_lr`).
      support: one task's support batch, arrays ``[shots, ...]``.
      loss_fn: ``loss_fn(params, batch, rng) -> (loss, aux)``; ``aux`` is not used here.
      inner_lr: a step size, or (Meta-SGD) a tree of step sizes with the structure and shapes of
        the adapted leaves (see :func:`init_inner_lr`).
      num_steps: inner gradient steps (static); 0 returns ``params``.
      rules: ``(regex, label)`` rules over leaf paths; leaves labelled ``"frozen"`` do not adapt.
      first_order: treat the inner gradients as constants (`jax.lax.stop_gradient`): FOMAML.
      remat: rematerialise each inner step's activations in the backward pass (`jax.checkpoint`).
      rng: the loss's key; inner step ``s`` gets ``fold_in(rng, s)``. None: ``PRNGKey(0)``.

    Returns:
      The adapted full tree.

    Raises:
      ValueError: bad ``num_steps``, support leaves without a shared ``[shots]`` axis, rules that
        select no leaf, an ``inner_lr`` tree that does not match the adapted leaves, or
        ``params`` holding an ``inner_lr`` entry.

    >>> loss = lambda p, b, rng: (jnp.mean((b["x"] * p["w"] - b["y"]) ** 2), {})
    >>> s = {"x": jnp.ones(4), "y": jnp.full(4, 2.0)}
    >>> float(adapt({"w": 0.0}, s, loss_fn=loss, inner_lr=0.25, num_steps=1)["w"])
    1.0
    """
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps={num_steps!r}; expected an integer >= 0")
    if isinstance(params, Mapping) and INNER_LR in params:
        raise ValueError(
            f"adapt: params holds learned rates under {INNER_LR!r}; pass "
            "meta.split_inner_lr(params) as (params, inner_lr) instead"
        )
    _check_batch(support, what="support", lead=1)
    label_tree = partition.labels(params, rules, what="rules")
    fast, rest = partition.split(params, label_tree)
    if not jax.tree.leaves(fast):
        raise ValueError(f"rules {list(rules)} select no leaf to adapt")
    if num_steps == 0:
        return params
    lrs = _inner_lr_tree(inner_lr, fast)
    if rng is None:
        rng = jax.random.PRNGKey(0)

    def support_loss(f, key):
        return loss_fn(partition.merge(f, rest), support, key)[0]

    def inner_step(f, s):
        grads = jax.grad(support_loss)(f, jax.random.fold_in(rng, s))
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        return jax.tree.map(lambda p, g, a: p - a * g, f, grads, lrs), None

    if remat:
        inner_step = jax.checkpoint(inner_step)
    fast, _ = jax.lax.scan(inner_step, fast, jnp.arange(num_steps))
    return partition.merge(fast, rest)


def make_meta_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    inner_lr: float | None,
    num_steps: int,
    rules: Rules = ALL,
    first_order: bool = False,
    remat: bool = False,
    axis_name: str | None = None,
) -> Callable[[train.TrainState, Mapping], tuple[train.TrainState, dict]]:
    """Builds ``step(state, tasks) -> (state, metrics)`` for MAML, FOMAML, ANIL and Meta-SGD.

    The meta-loss is the query loss after :func:`adapt` on the support set, averaged over the
    task batch (`jax.vmap`); its gradient with respect to ``state.trainable`` goes to ``tx``
    through `ftlab.core.train.apply_gradients`, the update every ftlab step ends in. Meta-SGD is
    MAML over a state whose tree holds learned rates under ``inner_lr/...`` (:func:`with_inner_lr`).

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> (loss, aux)``, the mean loss over one task's
        batch: the same function `ftlab.core.train.make_train_step` takes. The query ``aux``
        metrics, averaged over tasks, are reported as ``train/<name>``.
      tx: the outer (meta) optimizer over ``state.trainable``.
      inner_lr: the inner step size; None for Meta-SGD, whose state carries learned rates.
      num_steps: inner gradient steps per task.
      rules: inner rules (:data:`ALL`; :func:`head_rules` for ANIL).
      first_order: first-order MAML (Finn et al. 2017, section 5.2).
      remat: `jax.checkpoint` each inner step.
      axis_name: the pmapped device axis to average gradients over; None under `jax.jit`.

    Returns:
      The pure step. Metrics: ``train/loss`` (query loss after adaptation, mean over tasks),
      ``train/grad_norm`` and the loss's own metrics.

    Raises:
      ValueError (when the step is traced): the state holds learned rates and ``inner_lr`` is
        given, or neither; or the state holds collections (meta-steps do not update them).
    """

    def step(state: train.TrainState, tasks):
        _check_no_collections(state, "make_meta_step")
        rng = _step_rng(state, axis_name)

        def objective(trainable):
            return _meta_objective(
                trainable,
                state.frozen,
                tasks,
                loss_fn=loss_fn,
                inner_lr=inner_lr,
                num_steps=num_steps,
                rules=rules,
                first_order=first_order,
                remat=remat,
                rng=rng,
            )

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
        return train.apply_gradients(state, tx, grads, loss, aux, axis_name=axis_name)

    return step


def meta_loss(
    trainable: Mapping,
    frozen: Params,
    tasks: Mapping,
    *,
    loss_fn: LossFn,
    inner_lr: float | None,
    num_steps: int,
    rules: Rules = ALL,
    first_order: bool = False,
    remat: bool = False,
    rng: PRNGKey | None = None,
) -> jax.Array:
    """The MAML objective: query loss after :func:`adapt`, averaged over the task batch.

    Args:
      trainable: the meta-trained subtree (``state.trainable``); differentiate with respect to it.
      frozen: the frozen subtree (``state.frozen``).
      tasks: ``{"support": ..., "query": ...}`` of ``[tasks, shots, ...]`` arrays.
      loss_fn, inner_lr, num_steps, rules, first_order, remat: as in :func:`make_meta_step`.
      rng: the key tasks and inner steps draw theirs from; None: ``PRNGKey(0)``.

    Returns:
      The scalar meta-loss.
    """
    return _meta_objective(
        trainable,
        frozen,
        tasks,
        loss_fn=loss_fn,
        inner_lr=inner_lr,
        num_steps=num_steps,
        rules=rules,
        first_order=first_order,
        remat=remat,
        rng=jax.random.PRNGKey(0) if rng is None else rng,
    )[0]


def _meta_objective(
    trainable, frozen, tasks, *, loss_fn, inner_lr, num_steps, rules, first_order, remat, rng
):
    """``(meta-loss, aux averaged over tasks)``."""
    check_tasks(tasks)
    params, rates = split_inner_lr(partition.merge(trainable, frozen))
    if rates is not None and inner_lr is not None:
        raise ValueError(
            f"inner_lr={inner_lr!r}, but the parameters hold learned rates under "
            f"{INNER_LR!r} (Meta-SGD); pass inner_lr=None to use them"
        )
    if rates is None and inner_lr is None:
        raise ValueError(
            f"inner_lr=None and the parameters hold no learned rates under {INNER_LR!r}; give "
            "a step size, or add rates with meta.with_inner_lr"
        )
    num_tasks = jax.tree.leaves(tasks["support"])[0].shape[0]

    def task_loss(task, key):
        adapted = adapt(
            params,
            task["support"],
            loss_fn=loss_fn,
            inner_lr=inner_lr if rates is None else rates,
            num_steps=num_steps,
            rules=rules,
            first_order=first_order,
            remat=remat,
            rng=key,
        )
        return loss_fn(adapted, task["query"], jax.random.fold_in(key, num_steps))

    losses, aux = jax.vmap(task_loss)(tasks, jax.random.split(rng, num_tasks))
    return jnp.mean(losses), jax.tree.map(jnp.mean, aux)


def _step_rng(state, axis_name):
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    return rng


def _check_no_collections(state, what):
    if state.collections:
        raise ValueError(
            f"{what}: the state holds collections {sorted(state.collections)}; meta-steps "
            "adapt parameters only and do not update collections"
        )


# A meta-step over a small network is ~100 small kernels: XLA:CPU's YNNPACK fusions of dots with
# their neighbours and of reductions cost more there than they save. Dots alone through YNNPACK,
# everything else through XLA's emitters: the sinusoid MAML step (meta-batch 25, 1 -> 40 -> 40 -> 1,
# 1 inner step) takes 0.51-0.55 ms instead of 0.59-0.61 ms (jax 0.10.2, 2 cores, 300-step windows
# interleaved; experiments/bench/RESULTS.md). It makes large models slower (MiniLM steps), so it is
# not a default anywhere else.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def compiler_options(backend: str | None = None) -> dict[str, Any]:
    """XLA options for a meta-step over a small network: ``jax.jit(step, compiler_options=...)``.

    On CPU, dots one at a time through YNNPACK and no other library fusion (see `_CPU_OPTIONS`);
    elsewhere, or where this XLA no longer knows the option, none. The numbers agree with the
    default compile to float32 rounding (reductions are summed in another order).
    """
    return xla.cpu_options(_CPU_OPTIONS, backend)


def check_tasks(tasks: Mapping, *, what: str = "tasks", need_query: bool = True) -> None:
    """Raises unless ``tasks`` is ``{"support": {...}, "query": {...}}`` of ``[tasks, shots, ...]``.

    Every support and query leaf must share the task axis; within each set, the shot axis too.
    Checked on shapes only, so it costs nothing inside `jax.jit`.

    Raises:
      ValueError: naming the offending array, its shape and the shape expected.
    """
    if not isinstance(tasks, Mapping) or "support" not in tasks:
        parts = "'support' and 'query'" if need_query else "'support'"
        raise ValueError(
            f"{what} must be a dict with {parts} batches "
            f"of [tasks, shots, ...] arrays; got {type(tasks).__name__} with keys "
            f"{sorted(tasks) if isinstance(tasks, Mapping) else None}"
        )
    if need_query and "query" not in tasks:
        raise ValueError(f"{what} has no 'query' batch; keys are {sorted(tasks)}")
    num_tasks = None
    for part in ("support", "query"):
        if part not in tasks:
            continue
        ref = _check_batch(tasks[part], what=f"{what}[{part!r}]", lead=2)
        name, shape = ref
        if num_tasks is None:
            num_tasks = (f"{what}[{part!r}][{name!r}]", shape[0])
        elif shape[0] != num_tasks[1]:
            raise ValueError(
                f"{what}[{part!r}][{name!r}] has shape {shape}; expected "
                f"[tasks={num_tasks[1]}, shots, ...] (the task axis of {num_tasks[0]})"
            )


def _check_batch(batch: Mapping, *, what: str, lead: int) -> tuple[str, tuple]:
    """Checks that all leaves of ``batch`` share their first ``lead`` axes; returns the first."""
    axes = "[tasks, shots, ...]" if lead == 2 else "[shots, ...]"
    if not isinstance(batch, Mapping) or not batch:
        raise ValueError(f"{what} must be a non-empty dict of {axes} arrays; got {batch!r:.80}")
    ref = None
    for name, x in partition.flatten(batch).items():
        shape = tuple(jnp.shape(x))
        if len(shape) < lead:
            raise ValueError(f"{what}[{name!r}] has shape {shape}; expected {axes}")
        if ref is None:
            ref = (name, shape)
        elif shape[:lead] != ref[1][:lead]:
            want = ", ".join(str(d) for d in ref[1][:lead])
            raise ValueError(
                f"{what}[{name!r}] has shape {shape}; expected [{want}, ...] to match "
                f"{what}[{ref[0]!r}] of shape {ref[1]}"
            )
    return ref


def _inner_lr_tree(inner_lr, fast):
    if not isinstance(inner_lr, Mapping):
        return jax.tree.map(lambda _: inner_lr, fast)
    want, got = partition.flatten(fast), partition.flatten(inner_lr)
    if want.keys() != got.keys():
        raise ValueError(
            "inner_lr tree does not match the adapted leaves: only in inner_lr "
            f"{sorted(got.keys() - want.keys())[:5]}, only in the adapted leaves "
            f"{sorted(want.keys() - got.keys())[:5]}; build it with maml.init_inner_lr"
        )
    for k, v in want.items():
        if jnp.shape(got[k]) != jnp.shape(v):
            raise ValueError(
                f"inner_lr[{k!r}] has shape {jnp.shape(got[k])}; expected {jnp.shape(v)}"
            )
    return partition.unflatten({k: got[k] for k in want})
