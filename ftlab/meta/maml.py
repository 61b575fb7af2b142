"""MAML, first-order MAML, ANIL and Meta-SGD as pure functions over a partitioned parameter tree.

Three sets of leaves take part in a meta-step:

- *adapted* leaves, chosen by the inner ``rules``: the inner loop takes gradient steps on them
  (every leaf for MAML, ``head/.*`` for ANIL, ``.*/lora_(a|b)`` for MAML over LoRA factors);
- *meta-trained* leaves, the ``trainable`` part of the outer partition (`ftlab.core.partition`):
  the outer optimizer updates them from the gradient of the query loss after adaptation;
- *frozen* leaves: no inner gradient, no outer gradient, no optimizer state, bit-identical.

A task batch is a dict ``{"support": {...}, "query": {...}}`` whose leaves are
``[tasks, shots, ...]`` arrays (``x`` and ``y`` for regression); one task is the same without the
leading axis. ``loss_fn(params, batch) -> scalar`` is the mean loss over a batch of one task::

    rules = maml.ALL                                       # or maml.head_rules() for ANIL
    state = maml.init_state(params, label_tree, optax.adam(1e-3), seed=0)
    step = jax.jit(maml.make_meta_step(loss_fn, tx, inner_lr=0.01, num_steps=1, rules=rules))
    state, metrics = step(state, tasks)                   # metrics["train/loss"]: query loss
    adapted = maml.adapt(state.params, support, loss_fn=loss_fn, inner_lr=0.01, num_steps=10)

The inner loop is a `jax.lax.scan` over steps (``remat=True`` wraps each step in
`jax.checkpoint`, so backpropagating through many steps stores only the adapted leaves per step,
not every activation); the task batch is a `jax.vmap`; the meta-step is one function to jit (or
pmap with ``axis_name``). Under `jax.jit` with the task axis sharded over a mesh (e.g. with
`ftlab.core.parallel.Plan.compile_train_step`), the step runs data parallel over tasks.

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

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ftlab.core import partition, xla
from ftlab.types import Params, PRNGKey, PyTree

# loss_fn(params, batch) -> scalar mean loss over one task's batch; params is the full tree.
LossFn = Callable[[Params, Mapping[str, jax.Array]], jax.Array]
Rules = Sequence[tuple[str, str]]

ADAPT = "adapt"
# Inner rules: every leaf adapts (MAML, Meta-SGD). A leaf labelled `partition.FROZEN` in the inner
# rules is held fixed by the inner loop (it may still be meta-trained by the outer loop).
ALL: Rules = ((".*", ADAPT),)


def head_rules(head: str = "head") -> Rules:
    """ANIL's inner rules: only the leaves under ``head`` adapt; the body is reused as is.

    >>> head_rules()
    (('head/.*', 'adapt'), ('.*', 'frozen'))
    """
    return ((f"{head}/.*", ADAPT), (".*", partition.FROZEN))


@flax.struct.dataclass
class MetaState:
    """Everything a meta-step reads and writes.

    Attributes:
      step: int32 scalar, meta-updates applied so far.
      trainable: ``{"params": meta-trained subtree}``, plus ``"inner_lr"`` (a tree over the
        adapted leaves) for Meta-SGD.
      frozen: the frozen subtree; never updated.
      opt_state: the outer optimizer's state over ``trainable``.
      rng: a raw PRNG key (for methods or losses that need randomness).
    """

    step: jax.Array
    trainable: dict
    frozen: Params
    opt_state: Any
    rng: jax.Array

    @property
    def params(self) -> Params:
        """The full parameter tree."""
        return partition.merge(self.trainable["params"], self.frozen)

    @property
    def inner_lr(self) -> PyTree | None:
        """Meta-SGD's learned per-leaf inner learning rates, or None."""
        return self.trainable.get("inner_lr")


def init_state(
    params: Params,
    label_tree: Mapping,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    inner_lr: PyTree | None = None,
) -> MetaState:
    """Splits ``params`` by the outer ``label_tree``; adds Meta-SGD's ``inner_lr`` tree if given."""
    trainable, frozen = partition.split(params, label_tree)
    meta = {"params": trainable}
    if inner_lr is not None:
        meta["inner_lr"] = inner_lr
    return MetaState(
        step=jnp.zeros((), jnp.int32),
        trainable=meta,
        frozen=frozen,
        opt_state=tx.init(meta),
        rng=jax.random.PRNGKey(seed),
    )


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
    fast, _ = partition.split(params, partition.labels(params, rules, what="inner rules"))
    leaves, treedef = jax.tree.flatten(fast)
    keys = jax.random.split(rng, max(len(leaves), 1))
    lrs = [
        jax.random.uniform(k, jnp.shape(x), jnp.result_type(x), low, high)
        for k, x in zip(keys, leaves, strict=False)
    ]
    return jax.tree.unflatten(treedef, lrs)


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
) -> Params:
    """Takes ``num_steps`` gradient steps on the support loss, on the leaves ``rules`` select.

    ``phi_{s+1} = phi_s - inner_lr * grad_phi loss_fn(merge(phi_s, rest), support)``, where
    ``phi`` are the adapted leaves and ``rest`` every other leaf, which is passed through untouched
    (the same array objects) and gets no gradient. Differentiating the result with respect to
    ``params`` gives the MAML meta-gradient, second-order terms included unless ``first_order``.

    Args:
      params: the full parameter tree.
      support: one task's support batch, arrays ``[shots, ...]``.
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_lr: a step size, or (Meta-SGD) a tree of step sizes with the structure and shapes of
        the adapted leaves (see :func:`init_inner_lr`).
      num_steps: inner gradient steps (static); 0 returns ``params``.
      rules: ``(regex, label)`` rules over leaf paths; leaves labelled ``"frozen"`` do not adapt.
      first_order: treat the inner gradients as constants (`jax.lax.stop_gradient`): FOMAML.
      remat: rematerialise each inner step's activations in the backward pass (`jax.checkpoint`).

    Returns:
      The adapted full tree.

    Raises:
      ValueError: bad ``num_steps``, support leaves without a shared ``[shots]`` axis, rules that
        select no leaf, or an ``inner_lr`` tree that does not match the adapted leaves.

    >>> loss = lambda p, b: jnp.mean((b["x"] * p["w"] - b["y"]) ** 2)
    >>> s = {"x": jnp.ones(4), "y": jnp.full(4, 2.0)}
    >>> float(adapt({"w": 0.0}, s, loss_fn=loss, inner_lr=0.25, num_steps=1)["w"])
    1.0
    """
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps={num_steps!r}; expected an integer >= 0")
    _check_batch(support, what="support", lead=1)
    label_tree = partition.labels(params, rules, what="inner rules")
    fast, rest = partition.split(params, label_tree)
    if not jax.tree.leaves(fast):
        raise ValueError(f"inner rules {list(rules)} select no leaf to adapt")
    if num_steps == 0:
        return params
    lrs = _inner_lr_tree(inner_lr, fast)

    def support_loss(f):
        return loss_fn(partition.merge(f, rest), support)

    def inner_step(f, _):
        grads = jax.grad(support_loss)(f)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        return jax.tree.map(lambda p, g, a: p - a * g, f, grads, lrs), None

    if remat:
        inner_step = jax.checkpoint(inner_step)
    fast, _ = jax.lax.scan(inner_step, fast, None, length=num_steps)
    return partition.merge(fast, rest)


def make_meta_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    inner_lr: float,
    num_steps: int,
    rules: Rules = ALL,
    first_order: bool = False,
    remat: bool = False,
    axis_name: str | None = None,
) -> Callable[[MetaState, Mapping], tuple[MetaState, dict]]:
    """Builds ``step(state, tasks) -> (state, metrics)`` for MAML, FOMAML, ANIL and Meta-SGD.

    The meta-loss is the query loss after :func:`adapt` on the support set, averaged over the
    task batch (`jax.vmap`); its gradient with respect to ``state.trainable`` (meta-trained leaves
    and, for Meta-SGD, the inner learning rates) goes to ``tx``. Meta-SGD is MAML whose state holds
    an ``inner_lr`` tree (:func:`init_state` with ``inner_lr=init_inner_lr(...)``); it then
    overrides the scalar ``inner_lr``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over one task's batch.
      tx: the outer (meta) optimizer over ``state.trainable``.
      inner_lr: the inner step size (ignored when the state carries learned rates).
      num_steps: inner gradient steps per task.
      rules: inner rules (:data:`ALL`; :func:`head_rules` for ANIL).
      first_order: first-order MAML (Finn et al. 2017, section 5.2).
      remat: `jax.checkpoint` each inner step.
      axis_name: the pmapped device axis to average gradients over; None under `jax.jit`.

    Returns:
      The pure step. Metrics: ``train/loss`` (query loss after adaptation, mean over tasks) and
      ``train/grad_norm``.
    """

    def step(state: MetaState, tasks):
        loss, grads = jax.value_and_grad(meta_loss)(
            state.trainable,
            state.frozen,
            tasks,
            loss_fn=loss_fn,
            inner_lr=inner_lr,
            num_steps=num_steps,
            rules=rules,
            first_order=first_order,
            remat=remat,
        )
        return _apply_meta_grads(state, tx, loss, grads, axis_name)

    return step


def meta_loss(
    trainable: Mapping,
    frozen: Params,
    tasks: Mapping,
    *,
    loss_fn: LossFn,
    inner_lr: float,
    num_steps: int,
    rules: Rules = ALL,
    first_order: bool = False,
    remat: bool = False,
) -> jax.Array:
    """The MAML objective: query loss after :func:`adapt`, averaged over the task batch.

    Args:
      trainable: ``{"params": meta-trained subtree}`` (plus ``"inner_lr"`` for Meta-SGD), as in
        :attr:`MetaState.trainable`; differentiate with respect to it.
      frozen: the frozen subtree.
      tasks: ``{"support": ..., "query": ...}`` of ``[tasks, shots, ...]`` arrays.
      loss_fn, inner_lr, num_steps, rules, first_order, remat: as in :func:`make_meta_step`.

    Returns:
      The scalar meta-loss.
    """
    check_tasks(tasks)

    def task_loss(task):
        adapted = adapt(
            partition.merge(trainable["params"], frozen),
            task["support"],
            loss_fn=loss_fn,
            inner_lr=trainable.get("inner_lr", inner_lr),
            num_steps=num_steps,
            rules=rules,
            first_order=first_order,
            remat=remat,
        )
        return loss_fn(adapted, task["query"])

    return jnp.mean(jax.vmap(task_loss)(tasks))


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


def _apply_meta_grads(state, tx, loss, grads, axis_name):
    if axis_name is not None:
        grads, loss = jax.lax.pmean((grads, loss), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads)}
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics
