"""Online learning as one compiled `lax.scan`: predict, suffer the loss, update; with regret.

The protocol, for t = 1..T over a stream of examples (x_t, y_t):

    1. predict with the current parameters w_t on x_t,
    2. suffer the loss l_t(w_t) = loss(apply(w_t, x_t), y_t) (and update the progressive metrics),
    3. update w_t -> w_{t+1} with the gradient of the loss of an example whose label has arrived
       (x_t itself, or x_{t-d} when labels arrive `delay=d` steps late).

All three happen inside one `jax.lax.scan`, so a whole stream is one XLA program; `run` is a pure
function of arrays and composes with `jax.jit` and `jax.vmap` (`sweep` runs many learners at once).
A long stream can also go chunk by chunk (`start`, then `advance` per chunk, the carry saved
in between): the same numbers as one `run`, bit for bit, for a run that checkpoints and resumes.

    model = online.logistic_regression(num_features=9)
    stream = online.prepare(x, y, on_error="skip")          # names bad examples by index
    steps = online.checkpoints(len(y))                       # log-spaced t, ending at T
    prefix = online.best_fixed_prefixes(model, stream, steps)  # hindsight solutions
    u = jax.tree.map(lambda a: a[-1], prefix.params)          # best fixed model on the stream
    result = jax.jit(lambda s: online.run(model, model.init(), s,
                                          learner=online.ogd(0.1, decay="sqrt"),
                                          comparator=u),
                     compiler_options=online.compiler_options())(stream)
    regret = online.regret_curve(result.metrics["loss"], steps, prefix)
    slope, _ = online.fit_slope(steps, regret)

Regret: R(t) = sum_{s<=t} l_s(w_s) - min_u sum_{s<=t} l_s(u). `run` reports, at every step, the
regret against one fixed comparator (pass the hindsight solution of the whole stream, u*_T);
`best_fixed_prefixes` solves the batch problem on each prefix of a log-spaced grid and
`regret_curve` gives R(t) there exactly as defined (up to the solver tolerance it reports),
and `fit_slope` the log-log slope.

Losses follow river's conventions so that SGD steps are the same as river's `linear_model`:
squared loss (p - y)^2 for regression, log loss log(1 + exp(-(2y - 1) z)) on the logit z for
binary labels y in {0, 1}, cross-entropy for integer class labels.

References:
    Zinkevich 2003, online gradient descent: https://dl.acm.org/doi/10.5555/3041838.3041955
    Hazan 2016, Introduction to Online Convex Optimization: https://arxiv.org/abs/1909.05207
    Duchi et al. 2011, AdaGrad: https://jmlr.org/papers/v12/duchi11a.html
    Joulani et al. 2013, online learning under delayed feedback: https://arxiv.org/abs/1306.0686
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from ftlab.core import parallel, xla
from ftlab.types import Params, PyTree

__all__ = [
    "TASKS",
    "Model",
    "squared_loss",
    "log_loss",
    "cross_entropy",
    "linear_regression",
    "logistic_regression",
    "softmax_regression",
    "custom_model",
    "ogd",
    "Stream",
    "prepare",
    "Result",
    "compiler_options",
    "running_sum",
    "run",
    "Carry",
    "start",
    "advance",
    "progressive_metrics",
    "sweep",
    "sweep_start",
    "chunked",
    "sweep_step",
    "BatchSolution",
    "best_fixed",
    "checkpoints",
    "best_fixed_prefixes",
    "regret_curve",
    "fit_slope",
]


TASKS = ("regression", "binary", "multiclass")


# ----------------------------------------------------------------------------------------------
# Models


class Model(NamedTuple):
    """A per-example model for the online protocol.

    Attributes:
        apply: `(params, x) -> output` for ONE example: x `[*feature_shape]`; output `[]` (a value
            or a logit) or `[num_classes]` (logits).
        loss: `(output, y) -> []` for one example.
        task: "regression", "binary" (y in {0, 1}, output a logit) or "multiclass" (y an int).
        init: `() -> params`, the starting point (zeros for the linear models).
        feature_shape: The shape of one x, checked by `prepare` and `run`.
    """

    apply: Callable[[Params, jax.Array], jax.Array]
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    task: str
    init: Callable[[], Params]
    feature_shape: tuple[int, ...]


def squared_loss(output: jax.Array, y: jax.Array) -> jax.Array:
    """(output - y)^2, river's `optim.losses.Squared` (gradient 2 (output - y))."""
    return jnp.square(output - y)


@jax.custom_jvp
def log_loss(logit: jax.Array, y: jax.Array) -> jax.Array:
    """log(1 + exp(-(2y - 1) z)) for y in {0, 1}: river's `optim.losses.Log` on the logit.

    Value and derivative share one exp (d/dz = -(2y - 1) sigmoid(-(2y - 1) z), which is
    sigmoid(z) - y for y in {0, 1}); `jax.nn.softplus`'s own derivative (through `logaddexp`)
    made a compiled online step about 5x slower on CPU.
    """
    return _log_loss_parts(logit, y)[0]


def _log_loss_parts(logit, y):
    a = -(2.0 * y - 1.0) * logit
    e = jnp.exp(-jnp.abs(a))
    value = jnp.maximum(a, 0.0) + jnp.log1p(e)
    sigmoid_a = jnp.where(a >= 0, 1.0, e) / (1.0 + e)
    return value, sigmoid_a


@log_loss.defjvp
def _log_loss_jvp(primals, tangents):
    logit, y = primals
    logit_dot, y_dot = tangents
    value, sigmoid_a = _log_loss_parts(logit, y)
    dz = -(2.0 * y - 1.0) * sigmoid_a
    dy = -2.0 * logit * sigmoid_a
    return value, dz * logit_dot + dy * y_dot


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """-log softmax(logits)[y] for an integer label y."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


_LOSSES = {"regression": squared_loss, "binary": log_loss, "multiclass": cross_entropy}


def _linear_apply(params, x):
    # Multiply-and-sum, not `x @ w`: under `jax.vmap` over learners XLA:CPU turns the product
    # into a library dot call per step, which made a 64-learner scan step about 20x slower.
    w = params["w"]
    if w.ndim == 1:
        return jnp.sum(x * w) + params["b"]
    return jnp.sum(x[:, None] * w, axis=0) + params["b"]


def _linear(num_features: int, task: str, num_outputs: int | None = None) -> Model:
    out = () if num_outputs is None else (num_outputs,)

    def init():
        return {
            "w": jnp.zeros((num_features, *out), jnp.float32),
            "b": jnp.zeros(out, jnp.float32),
        }

    return Model(_linear_apply, _LOSSES[task], task, init, (num_features,))


def linear_regression(num_features: int) -> Model:
    """`x @ w + b` with the squared loss; params `{"w": [d], "b": []}`, zeros at init."""
    return _linear(num_features, "regression")


def logistic_regression(num_features: int) -> Model:
    """Logit `x @ w + b` with the log loss, labels in {0, 1}; params `{"w": [d], "b": []}`."""
    return _linear(num_features, "binary")


def softmax_regression(num_features: int, num_classes: int) -> Model:
    """Logits `x @ w + b` with cross-entropy; params `{"w": [d, k], "b": [k]}`."""
    return _linear(num_features, "multiclass", num_classes)


def custom_model(
    apply: Callable[[Params, jax.Array], jax.Array],
    *,
    task: str,
    init: Callable[[], Params],
    feature_shape: Sequence[int],
    loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Model:
    """Any per-example `apply(params, x)` (e.g. a flax module's `apply` on a frozen trunk's codes).

    Args:
        apply: `(params, x) -> output` for one example of shape `feature_shape`.
        task: "regression", "binary" or "multiclass"; picks the default loss and the metrics.
        init: Returns the starting parameters.
        feature_shape: The shape of one x.
        loss: `(output, y) -> []`; defaults to the task's loss (squared, log, cross-entropy).
    """
    if task not in TASKS:
        raise ValueError(f"custom_model: task={task!r}; expected one of {TASKS}")
    return Model(apply, loss or _LOSSES[task], task, init, tuple(feature_shape))


# ----------------------------------------------------------------------------------------------
# Learners (optax transformations used one update per example or minibatch)


def ogd(
    learning_rate: float | jax.Array,
    *,
    decay: str = "constant",
    radius: float | None = None,
) -> optax.GradientTransformation:
    """Online gradient descent: w <- Proj(w - eta_t g_t).

    Args:
        learning_rate: eta_0; may be a traced array (so `jax.vmap` can sweep it).
        decay: "constant" (eta_t = eta_0) or "sqrt" (eta_t = eta_0 / sqrt(t), t = 1, 2, ... counting
            updates, not skipped steps).
        radius: If set, project the whole parameter tree onto the L2 ball of this radius after each
            step (the projected OGD of Zinkevich 2003, whose regret bound needs a bounded set).

    Returns:
        An optax transformation whose updates are `new_params - params`.
    """
    if decay not in ("constant", "sqrt"):
        raise ValueError(f"ogd: decay={decay!r}; expected 'constant' or 'sqrt'")

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(grads, state, params=None):
        eta = jnp.asarray(learning_rate, jnp.float32)
        if decay == "sqrt":
            eta = eta / jnp.sqrt((state.count + 1).astype(jnp.float32))
        updates = jax.tree.map(lambda g: -eta * g, grads)
        if radius is not None:
            if params is None:
                raise ValueError("ogd(radius=...) needs params in update()")
            new = optax.apply_updates(params, updates)
            norm = optax.tree_utils.tree_norm(new)
            scale = jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-30))
            updates = jax.tree.map(lambda n, p: n * scale - p, new, params)
        return updates, optax.ScaleByScheduleState(count=state.count + 1)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------------
# Streams


class Stream(NamedTuple):
    """A stream in memory, in arrival order.

    Attributes:
        x: `[T, *feature_shape]` float32, bad examples zeroed.
        y: `[T]` (float32 for regression and binary, int32 for multiclass).
        valid: `[T]` bool; False for examples skipped by `prepare(on_error="skip")`.
    """

    x: jax.Array
    y: jax.Array
    valid: jax.Array


def prepare(
    x: Any,
    y: Any,
    *,
    model: Model | None = None,
    on_error: str = "raise",
) -> Stream:
    """Checks a stream on the host and turns it into arrays; names any bad example by its index.

    Args:
        x: `[T, *feature_shape]` array, or a sequence of T per-example arrays (which may disagree
            in shape: that is an error, or a skipped example).
        y: `[T]` labels or targets (or a sequence of T scalars).
        model: If given, each example's shape must be `model.feature_shape`.
        on_error: "raise": raise at the first bad example; "skip": mark it invalid (it is not
            predicted, scored or learned from, and counts in `Result.num_skipped`).

    Returns:
        A `Stream` with bad examples zeroed and `valid` False for them.

    Raises:
        ValueError: `on_error="raise"` and an example has a non-finite value or the wrong shape
            (the message gives its index, the feature and value, and the expected shape), or
            x and y have different lengths.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"prepare: on_error={on_error!r}; expected 'raise' or 'skip'")
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"prepare: y has shape {y.shape}; expected [T] (one target per example)")
    if isinstance(x, np.ndarray | jax.Array):
        x = np.asarray(x, np.float32)
        if model is not None and tuple(x.shape[1:]) != tuple(model.feature_shape):
            raise ValueError(
                f"stream example 0 onward: x has shape {x.shape}, i.e. examples of shape "
                f"{x.shape[1:]}; the model expects {tuple(model.feature_shape)}."
            )
        if len(x) != len(y):
            raise ValueError(
                f"prepare: x has {len(x)} examples but y has {len(y)}; they must pair one to one."
            )
        out_x = x.copy()
        valid = np.ones(len(y), bool)
    else:
        rows = [np.asarray(r, np.float32) for r in x]
        if len(rows) != len(y):
            raise ValueError(
                f"prepare: x has {len(rows)} examples but y has {len(y)}; "
                "they must pair one to one."
            )
        if model is not None:
            expected, source = tuple(model.feature_shape), "the model's feature_shape"
        else:
            expected, source = (rows[0].shape if rows else ()), "example 0"
        valid = np.array([r.shape == expected for r in rows], bool)
        if on_error == "raise" and not valid.all():
            i = int(np.flatnonzero(~valid)[0])
            raise ValueError(
                f"stream example {i}: x[{i}] has shape {rows[i].shape}, expected {expected} "
                f"({source}). Fix the data or pass on_error='skip' to skip such examples."
            )
        out_x = np.zeros((len(rows), *expected), np.float32)
        for i in np.flatnonzero(valid):
            out_x[i] = rows[i]
    flat = out_x.reshape(len(y), -1)
    y_float = y.astype(np.float64) if y.dtype.kind in "fiub" else None
    if y_float is None:
        raise ValueError(f"prepare: y has dtype {y.dtype}; expected numbers or booleans")
    finite = np.isfinite(flat).all(axis=1) & np.isfinite(y_float)
    bad = np.flatnonzero(valid & ~finite)
    if len(bad) and on_error == "raise":
        i = int(bad[0])
        if not np.isfinite(y_float[i]):
            what = f"y[{i}] = {y_float[i]}"
        else:
            j = int(np.flatnonzero(~np.isfinite(flat[i]))[0])
            what = f"x[{i}] has {flat[i, j]} at flat feature {j}"
        raise ValueError(
            f"stream example {i}: {what} ({len(bad)} non-finite examples in all, first at {i}). "
            "Clean the data or pass on_error='skip' (no update for them; counted in num_skipped)."
        )
    valid &= finite
    out_x[~valid] = 0.0
    if model is not None and model.task == "multiclass":
        out_y = np.where(valid, y_float, 0).astype(np.int32)
    else:
        out_y = np.where(valid, y_float, 0.0).astype(np.float32)
    return Stream(jnp.asarray(out_x), jnp.asarray(out_y), jnp.asarray(valid))


# ----------------------------------------------------------------------------------------------
# The online run


class Result(NamedTuple):
    """What `run` returns. Every per-example array is `[T]` in stream order.

    Attributes:
        params: The parameters after the last update (in the run's `param_dtype`).
        opt_state: The learner's final state.
        metrics: Per-example arrays:
            "loss": l_t(w_t), the online loss suffered on x_t (0 where skipped);
            "prediction": the value (regression), P(y=1) (binary) or argmax class (multiclass);
            "valid": whether the example was used;
            "cumulative_loss": sum of the online losses so far;
            progressive metrics after each example, as river's `progressive_val_score` reports
            them: "accuracy" and "log_loss" (classification) or "mae" and "rmse" (regression);
            with a comparator: "comparator_loss" (l_t(u)) and "regret" (cumulative_loss minus
            the comparator's cumulative loss), and "average_regret" (regret / examples so far).
        update_index: `[T]` int32 (None if `per_step=False`), the stream index of the example
            whose gradient was applied at step t (-1: no update, e.g. the first `delay` steps
            or a skipped example). With `batch_size=b`, the first index of the minibatch used,
            at the position of the current minibatch's first example.
        num_updates: Number of updates applied.
        num_skipped: Number of invalid examples (not predicted, scored or learned from).
    """

    params: Params
    opt_state: PyTree
    metrics: dict[str, jax.Array]
    update_index: jax.Array
    num_updates: jax.Array
    num_skipped: jax.Array


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


# XLA:CPU's newer fusion emitters turn the per-example metric pass after the scan (a log loss
# over every example of the stream) into slow code: 0.7 ms for 49k log losses where the classic
# emitter takes 0.15-0.3 ms (jax 0.10.2), a large part of a whole `run` on Shuttle. The numbers
# are the same bit for bit (tests/online_test.py).
_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def compiler_options(backend: str | None = None) -> dict[str, Any]:
    """XLA options to compile a single-learner `run` with: `jax.jit(f, compiler_options=...)`.

    On CPU, the classic fusion emitter (see `_CPU_OPTIONS`): `run` on Shuttle (49k examples)
    takes 4.0 ms instead of 5.3-6.5 ms. Not for `sweep`: its vmapped `[learners, T]` metric pass
    is 15% faster with XLA's defaults (63 learners on Shuttle). Elsewhere, or where this XLA no
    longer knows the option, none.
    """
    return xla.cpu_options(_CPU_OPTIONS, backend)


def running_sum(a: jax.Array, initial: jax.Array | None = None) -> jax.Array:
    """Cumulative sums over axis 0, added in order: one sequential `lax.scan`.

    On CPU this is several times faster than `jnp.cumsum` (a `reduce_window`) for long streams,
    and it rounds exactly as a running total in a loop does.

    Args:
        a: `[T, ...]` rows to add up.
        initial: The totals before `a[0]` (zeros if None): a stream summed chunk by chunk, each
            chunk starting from the last total of the one before, rounds as one pass does.
    """

    def add(total, row):
        total = total + row
        return total, total

    total = jnp.zeros(a.shape[1:], a.dtype) if initial is None else initial
    return jax.lax.scan(add, total, a)[1]


def _check_arguments(fn: str, model: Model, stream: Stream, delay: int, batch_size: int) -> None:
    if tuple(stream.x.shape[1:]) != tuple(model.feature_shape):
        raise ValueError(
            f"{fn}: stream.x has shape {tuple(stream.x.shape)}, i.e. examples of shape "
            f"{tuple(stream.x.shape[1:])}; the model expects {tuple(model.feature_shape)} "
            "(example 0 onward). Check the feature columns or the model's num_features."
        )
    if delay < 0 or batch_size < 1:
        raise ValueError(f"{fn}: delay={delay} must be >= 0 and batch_size={batch_size} >= 1")


def _protocol(
    model: Model,
    learner: optax.GradientTransformation,
    *,
    b: int,
    delay: int,
    param_dtype: Any,
    update_dtype: Any,
    comparator: Params | None,
    per_step: bool,
    length: int | None = None,
):
    """What `run` and `advance` share: the batched forward pass and loss, the per-example
    metric terms, and the scan's step over one block of `b` examples.

    The step's carry is `(held, opt_state, sums, ring, t)` with `t` the blocks done; blocks
    that start at or after `length` (padding at the end of a chunked stream) make no update.
    """
    forward = jax.vmap(model.apply, in_axes=(None, 0))
    per_example_loss = jax.vmap(model.loss)

    def batch_loss(p, x, y, v):
        losses = jnp.where(v, per_example_loss(forward(p, x), y), 0.0)
        if b == 1:  # an invalid example makes no update at all (`do` below)
            return jnp.sum(losses)
        return jnp.sum(losses) / jnp.maximum(jnp.sum(v), 1)

    grad_fn = jax.grad(batch_loss)

    def metric_terms(out, y, v):
        """The kept prediction and per-example [valid, loss, correct (or |err|), err^2] rows."""
        losses = jnp.where(v, per_example_loss(out, y), 0.0)
        if model.task == "binary":
            prediction = out  # the logit; the probability is taken after the scan
            score = ((out > 0) == (y > 0.5)).astype(jnp.float32)  # hit
            square = jnp.zeros_like(losses)
        elif model.task == "multiclass":
            prediction = jnp.argmax(out, axis=-1).astype(jnp.float32)
            score = (prediction == y).astype(jnp.float32)
            square = jnp.zeros_like(losses)
        else:
            prediction = out
            score = jnp.abs(out - y)
            square = jnp.square(out - y)
        terms = [v.astype(jnp.float32), losses, jnp.where(v, score, 0.0), jnp.where(v, square, 0)]
        return prediction, jnp.stack(terms, axis=-1)

    # Only what depends on the parameters being learned runs in the scan: the prediction and the
    # update. Each step emits its raw output (per_step) or adds its metric terms to running sums
    # in the carry (not per_step); losses, hits, running means and the comparator's losses are
    # then computed for all examples at once, outside the sequential loop.
    def step(carry, inputs):
        held, opt_state, sums, ring, t = carry
        x, y, v = inputs if b > 1 else (a[None] for a in inputs)
        params = _cast(held, jnp.float32)
        out = forward(params, x)
        if per_step:
            # The comparator's output is formed here too, in the same shapes as the learner's,
            # so that a learner holding the comparator's parameters has regret exactly 0.
            emit = (out, None if comparator is None else forward(comparator, x))
        else:
            sums, emit = sums + jnp.sum(metric_terms(out, y, v)[1], axis=0), None
        if delay:
            slot = t % delay
            rx, ry, rv = ring
            ux, uy, uv = rx[slot], ry[slot], rv[slot]
            ring = (rx.at[slot].set(x), ry.at[slot].set(y), rv.at[slot].set(v))
        else:
            ux, uy, uv = x, y, v
        grads = grad_fn(params, ux, uy, uv)
        updates, new_opt_state = learner.update(grads, opt_state, params)
        if update_dtype is not None:
            updates = _cast(_cast(updates, update_dtype), jnp.float32)
        new_params = optax.apply_updates(params, updates)
        if param_dtype is not None:
            new_params = _cast(new_params, param_dtype)
        do = jnp.any(uv)
        if length is not None:
            do = do & (t * b < length)
        held = jax.tree.map(lambda a, o: jnp.where(do, a, o), new_params, held)
        opt_state = jax.tree.map(lambda a, o: jnp.where(do, a, o), new_opt_state, opt_state)
        return (held, opt_state, sums, ring, t + 1), emit

    return forward, per_example_loss, metric_terms, step


def _progressive(model: Model, n, cum_loss, cum_score, cum_square, cum_comp) -> dict:
    """The progressive metrics from the running sums (`cum_comp` None: no comparator)."""
    denominator = jnp.maximum(n, 1.0)
    per = {"cumulative_loss": cum_loss}
    if model.task == "regression":
        per["mae"] = cum_score / denominator
        per["rmse"] = jnp.sqrt(cum_square / denominator)
    else:
        per["accuracy"] = cum_score / denominator
        per["log_loss"] = cum_loss / denominator
    if cum_comp is not None:
        per["regret"] = cum_loss - cum_comp
        per["average_regret"] = per["regret"] / denominator
    return per


_PREDICTION = {
    "binary": jax.nn.sigmoid,
    "multiclass": lambda p: p.astype(jnp.int32),
    "regression": lambda p: p,
}


def run(
    model: Model,
    params: Params,
    stream: Stream,
    *,
    learner: optax.GradientTransformation,
    delay: int = 0,
    batch_size: int = 1,
    param_dtype: Any = None,
    update_dtype: Any = None,
    comparator: Params | None = None,
    per_step: bool = True,
    unroll: int = 1,
) -> Result:
    """Runs the online protocol over `stream` in one `lax.scan`; pure, so jit and vmap apply.

    Args:
        model: The model (`linear_regression`, `logistic_regression`, ..., `custom_model`).
        params: Starting parameters.
        stream: From `prepare`: `x [T, *feature_shape]`, `y [T]`, `valid [T]`.
        learner: Any optax transformation (`ogd(...)`, `optax.adagrad(...)`, `optax.adam(...)`),
            applied once per update, with `params` passed to `update`.
        delay: Labels arrive this many steps late: the update at step t uses (x_{t-d}, y_{t-d}),
            held in a ring buffer of d steps in the scan carry, with its gradient taken at the
            current parameters w_t. Prediction and the suffered loss are still l_t(w_t).
        batch_size: Minibatch OGD: predict b examples with the same parameters, then update once
            with the mean gradient of the valid ones. The stream is padded with invalid examples
            to a multiple of b. With b > 1, `delay` counts minibatches.
        param_dtype: Hold the parameters in this dtype (e.g. `jnp.bfloat16`) between steps; the
            forward pass and the update are computed in float32 and rounded once per step.
        update_dtype: Round each update to this dtype (e.g. `jnp.bfloat16`) before applying it.
        comparator: Fixed parameters u; if given, l_t(u) and the regret against u are tracked in
            the same scan (pass `best_fixed(...).params` for the regret against the hindsight
            solution of the whole stream).
        per_step: True: every metric at every example (`[T]` arrays). False: only the final
            values (scalars) of the cumulative metrics, from the running sums in the carry, and
            no `update_index`; for sweeps over many learners, whose per-step outputs are
            memory bound (64 learners x 49k examples x 8 floats per step).
        unroll: `lax.scan` unroll factor (speed only).

    Returns:
        A `Result`.

    Raises:
        ValueError: The stream's example shape is not the model's, or delay/batch_size < 0/1.

    >>> model = linear_regression(2)
    >>> s = prepare(np.ones((4, 2)), np.ones(4))
    >>> r = run(model, model.init(), s, learner=ogd(0.1))
    >>> r.metrics["loss"].shape
    (4,)
    """
    _check_arguments("run", model, stream, delay, batch_size)
    num = stream.x.shape[0]
    b = batch_size
    blocks = -(-num // b)
    pad = blocks * b - num

    def blocked(a, fill):
        if b == 1:
            return a  # scanned as [T, ...]; the step adds the block axis
        a = jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)]) if pad else a
        return a.reshape(blocks, b, *a.shape[1:])

    xs = blocked(stream.x, 0)
    ys = blocked(stream.y, 0)
    vs = blocked(stream.valid, False)
    index = blocked(jnp.arange(num, dtype=jnp.int32), -1)

    p32 = _cast(params, jnp.float32)
    opt_state = learner.init(p32)
    held = p32 if param_dtype is None else _cast(p32, param_dtype)
    forward, per_example_loss, metric_terms, step = _protocol(
        model,
        learner,
        b=b,
        delay=delay,
        param_dtype=param_dtype,
        update_dtype=update_dtype,
        comparator=comparator,
        per_step=per_step,
    )

    ring = None
    if delay:
        ring = (
            jnp.zeros((delay, b, *stream.x.shape[1:]), xs.dtype),
            jnp.zeros((delay, b, *stream.y.shape[1:]), ys.dtype),
            jnp.zeros((delay, b), bool),
        )

    carry = (held, opt_state, jnp.zeros([4], jnp.float32), ring, jnp.zeros([], jnp.int32))
    (held, opt_state, final, _, _), emitted = jax.lax.scan(step, carry, (xs, ys, vs), unroll=unroll)
    if per_step:
        outs, comp_outs = (
            None if a is None else a.reshape(blocks * b, *a.shape[2:])[:num] for a in emitted
        )
        prediction, terms = metric_terms(outs, stream.y, stream.valid)
        if comparator is not None:
            comp = jnp.where(stream.valid, per_example_loss(comp_outs, stream.y), 0.0)
            terms = jnp.concatenate([terms, comp[:, None]], axis=1)
        n, cum_loss, cum_score, cum_square, *cum_comp = running_sum(terms).T
        cum_comp = cum_comp[0] if cum_comp else None
        loss = terms[:, 1]
    else:
        n, cum_loss, cum_score, cum_square = final
        cum_comp = None
        if comparator is not None:
            comp = per_example_loss(forward(comparator, stream.x), stream.y)
            cum_comp = jnp.sum(jnp.where(stream.valid, comp, 0.0))
    per = _progressive(model, n, cum_loss, cum_score, cum_square, cum_comp)
    if per_step:
        per["loss"] = loss
        per["prediction"] = _PREDICTION[model.task](prediction)
        per["valid"] = stream.valid
        if comparator is not None:
            per["comparator_loss"] = comp
    # Which example each update used: block k learns from block k - delay (its first valid one).
    vs, index = vs.reshape(blocks, b), index.reshape(blocks, b)
    has = jnp.any(vs, axis=1)
    num_updates = jnp.sum(has[: max(blocks - delay, 0)])
    update_index = None
    if per_step:
        first = jnp.where(has, index[jnp.arange(blocks), jnp.argmax(vs, axis=1)], -1)
        used = jnp.concatenate(
            [jnp.full((delay,), -1, jnp.int32), first[: max(blocks - delay, 0)]]
        )[:blocks]
        update_index = jnp.full((blocks, b), -1, jnp.int32).at[:, 0].set(used).reshape(-1)[:num]
    return Result(
        params=held,
        opt_state=opt_state,
        metrics=per,
        update_index=update_index,
        num_updates=num_updates,
        num_skipped=num - jnp.sum(stream.valid),
    )


class Carry(NamedTuple):
    """A run's state between chunks of its stream (`start`, then `advance` chunk by chunk).

    Attributes:
        params: The parameters (in the run's `param_dtype`).
        opt_state: The learner's state.
        sums: `[5]` float32 running totals since the stream's start: valid examples, online
            loss, hits (or absolute errors), squared errors, the comparator's loss.
        ring: The examples whose labels have not arrived yet (`delay` > 0), else None.
        blocks: int32 updates steps taken (blocks of `batch_size` examples, padding included).
    """

    params: Params
    opt_state: PyTree
    sums: jax.Array
    ring: Any
    blocks: jax.Array


def start(
    model: Model,
    params: Params,
    *,
    learner: optax.GradientTransformation,
    delay: int = 0,
    batch_size: int = 1,
    param_dtype: Any = None,
) -> Carry:
    """The carry before the first example; `advance` runs the protocol on from it.

    Args are as for `run` (pass `advance` the same `learner`, `delay`, `batch_size` and
    `param_dtype`).
    """
    if delay < 0 or batch_size < 1:
        raise ValueError(f"start: delay={delay} must be >= 0 and batch_size={batch_size} >= 1")
    p32 = _cast(params, jnp.float32)
    held = p32 if param_dtype is None else _cast(p32, param_dtype)
    ring = None
    if delay:
        y_dtype = jnp.int32 if model.task == "multiclass" else jnp.float32
        ring = (
            jnp.zeros((delay, batch_size, *model.feature_shape), jnp.float32),
            jnp.zeros((delay, batch_size), y_dtype),
            jnp.zeros((delay, batch_size), bool),
        )
    return Carry(
        held, learner.init(p32), jnp.zeros([5], jnp.float32), ring, jnp.zeros([], jnp.int32)
    )


def advance(
    model: Model,
    carry: Carry,
    chunk: Stream,
    *,
    learner: optax.GradientTransformation,
    delay: int = 0,
    batch_size: int = 1,
    param_dtype: Any = None,
    update_dtype: Any = None,
    comparator: Params | None = None,
    length: int | None = None,
    unroll: int = 1,
) -> tuple[Carry, dict[str, jax.Array]]:
    """Runs the protocol over the next chunk of a stream, from the carry the last chunk left.

    `start`, then `advance` over consecutive chunks, is `run(..., per_step=True)` over their
    concatenation: the same updates and the same running sums, added in the same order (so a
    run can stop between chunks, be saved, and go on). Pure: jit and vmap apply.

    Args:
        model: The model.
        carry: From `start` or the previous `advance`.
        chunk: The next examples, `[C, ...]` with C a multiple of `batch_size`; the stream's
            end may be padded with invalid examples (see `length`).
        learner, delay, batch_size, param_dtype, update_dtype, comparator, unroll: As for
            `run`; the same for every chunk of one stream.
        length: The stream's length. Blocks of examples that start at or beyond it are padding
            and make no update (with `delay`, they would apply the last blocks' labels). None:
            no padding.

    Returns:
        `(carry, metrics)`: the per-example `[C]` arrays of `Result.metrics` for this chunk
        (cumulative ones counted from the stream's start).

    Raises:
        ValueError: As `run`; C is not a multiple of `batch_size`, or the carry was started
            with another `delay` or `batch_size`.
    """
    _check_arguments("advance", model, chunk, delay, batch_size)
    num, b = chunk.x.shape[0], batch_size
    if num % b:
        raise ValueError(f"advance: the chunk has {num} examples, not a multiple of batch_size={b}")
    ring_shape = None if carry.ring is None else tuple(carry.ring[2].shape)
    if ring_shape != ((delay, b) if delay else None):
        raise ValueError(
            f"advance: delay={delay}, batch_size={b}, but the carry was started with a ring of "
            f"shape {ring_shape} (delay, batch_size); pass `start` and `advance` the same ones"
        )
    _, per_example_loss, metric_terms, step = _protocol(
        model,
        learner,
        b=b,
        delay=delay,
        param_dtype=param_dtype,
        update_dtype=update_dtype,
        comparator=comparator,
        per_step=True,
        length=length,
    )

    def blocked(a):
        return a if b == 1 else a.reshape(num // b, b, *a.shape[1:])

    inputs = (blocked(chunk.x), blocked(chunk.y), blocked(chunk.valid))
    (held, opt_state, _, ring, blocks), (outs, comp_outs) = jax.lax.scan(
        step, (*carry[:2], jnp.zeros([4], jnp.float32), *carry[3:]), inputs, unroll=unroll
    )
    outs = outs.reshape(num, *outs.shape[2:])
    prediction, terms = metric_terms(outs, chunk.y, chunk.valid)
    comp = None
    if comparator is not None:
        comp_outs = comp_outs.reshape(num, *comp_outs.shape[2:])
        comp = jnp.where(chunk.valid, per_example_loss(comp_outs, chunk.y), 0.0)
    zero = jnp.zeros_like(terms[:, 1])
    cumulative = running_sum(
        jnp.concatenate([terms, (zero if comp is None else comp)[:, None]], axis=1), carry.sums
    )
    n, cum_loss, cum_score, cum_square, cum_comp = cumulative.T
    per = _progressive(
        model, n, cum_loss, cum_score, cum_square, None if comp is None else cum_comp
    )
    per["loss"] = terms[:, 1]
    per["prediction"] = _PREDICTION[model.task](prediction)
    per["valid"] = chunk.valid
    if comp is not None:
        per["comparator_loss"] = comp
    return Carry(held, opt_state, cumulative[-1], ring, blocks), per


def progressive_metrics(model: Model, carry: Carry, *, comparator: bool) -> dict[str, jax.Array]:
    """The cumulative metrics after the examples `carry` has seen: `Result.metrics`' last values.

    Args:
        model: The model.
        carry: From `advance`.
        comparator: Whether `advance` was given a comparator (adds "regret" and
            "average_regret").
    """
    n, loss, score, square, comp = carry.sums
    return _progressive(model, n, loss, score, square, comp if comparator else None)


def sweep(
    model: Model,
    params: Params,
    stream: Stream,
    *,
    make_learner: Callable[[jax.Array], optax.GradientTransformation],
    learning_rates: jax.Array,
    **run_kwargs,
) -> Result:
    """Many learners at once: `run` vmapped over step sizes (one compiled scan).

    Args:
        make_learner: `learning_rate -> learner`, e.g. `lambda lr: ogd(lr, decay="sqrt")`.
        learning_rates: `[L]` step sizes.
        **run_kwargs: Passed to `run`.

    Returns:
        A `Result` whose leaves have a leading `[L]` axis.
    """
    return jax.vmap(lambda lr: run(model, params, stream, learner=make_learner(lr), **run_kwargs))(
        jnp.asarray(learning_rates, jnp.float32)
    )


def sweep_start(
    model: Model,
    learning_rates: Sequence[float],
    *,
    make_learner: Callable[[jax.Array], optax.GradientTransformation],
    padded_length: int,
    num_devices: int = 1,
    **options,
) -> dict[str, Any]:
    """The state `sweep_step` runs on from (on the host): a learner per step size, nothing
    seen, room for the losses of a stream of ``padded_length`` (its chunks, padding included).

    The step sizes are padded with copies of the last to a multiple of ``num_devices`` (each
    device then runs as many learners); ``options`` are `start`'s.
    """
    lrs = tuple(learning_rates)
    padded = np.asarray(lrs + lrs[-1:] * (-len(lrs) % num_devices), np.float32)
    start_one = lambda lr: start(model, model.init(), learner=make_learner(lr), **options)  # noqa: E731
    return {
        "lr": padded,
        "carry": jax.device_get(jax.vmap(start_one)(padded)),
        "losses": np.zeros(padded_length, np.float32),
        "seen": np.zeros((), np.int32),
    }


def chunked(stream: Stream, size: int) -> dict[str, np.ndarray]:
    """The stream on the host as ``{"x", "y", "valid"}``, padded with invalid examples (zeros,
    ``valid`` False) to a multiple of ``size``: `sweep_step` takes one chunk of ``size`` at a
    time, and ``len(y)`` is `sweep_start`'s ``padded_length``.

    >>> chunked(Stream(np.ones((3, 1)), np.ones(3), np.ones(3, bool)), 2)["valid"].tolist()
    [True, True, True, False]

    Raises:
        ValueError: ``size`` is not a positive integer.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"chunked: size={size!r} must be a positive integer")
    pad = -len(stream.y) % size
    return {
        k: np.concatenate([np.asarray(a), np.zeros((pad, *np.shape(a)[1:]), np.asarray(a).dtype)])
        for k, a in zip(("x", "y", "valid"), stream, strict=True)
    }


def sweep_step(
    model: Model,
    *,
    make_learner: Callable[[jax.Array], optax.GradientTransformation],
    plan: parallel.Plan,
    length: int,
    main: int,
    comparator: Params,
    **options,
) -> Callable:
    """``step(state, chunk) -> (state, metrics)``: every learner of a sweep runs on over one
    chunk of the stream (`advance`).

    The state (`sweep_start`) is ``{"lr", "carry", "losses", "seen"}``: per learner its step
    size and `Carry`; learner ``main``'s per-example losses so far (for the exact prefix regret
    afterwards) and the examples seen. The chunk is ``{"x", "y", "valid"}`` (a `Stream`).
    Online learning is sequential in time, so the learners are what is parallel: they are split
    over ``plan``'s data axis (under ``pmap``, each device runs its share of the learners on the
    whole chunk, gathered after it). The metrics are learner ``main``'s: ``train/loss`` (the
    chunk's mean), ``online/<progressive metric>``, ``regret/final_comparator`` and
    ``regret/average`` after the chunk.

    Args:
        model: The model.
        make_learner: ``learning_rate -> learner``.
        plan: Places the learners (`ftlab.core.parallel.Plan`).
        length: The stream's length (padding after it makes no update).
        main: The index of the learner whose metrics are reported.
        comparator: The fixed parameters regret is measured against.
        **options: `advance`'s ``delay``, ``batch_size``, ``param_dtype``.
    """
    axis = parallel.DATA_AXIS
    learners = jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec(axis))

    def advance_one(lr, carry, chunk):
        return advance(
            model,
            carry,
            chunk,
            learner=make_learner(lr),
            comparator=comparator,
            length=length,
            **options,
        )

    def step(state, batch):
        chunk = Stream(batch["x"], batch["y"], batch["valid"])
        lr, carry = state["lr"], state["carry"]
        if plan.mode == "pmap":  # this device's learners; every device sees the whole chunk
            chunk = jax.tree.map(lambda a: jax.lax.all_gather(a, axis, tiled=True), chunk)
            share = lr.shape[0] // plan.num_devices
            first = jax.lax.axis_index(axis) * share
            lr, carry = jax.tree.map(
                lambda a: jax.lax.dynamic_slice_in_dim(a, first, share), (lr, carry)
            )
        else:
            lr, carry = jax.lax.with_sharding_constraint((lr, carry), learners)
        carry, m = jax.vmap(advance_one, in_axes=(0, 0, None))(lr, carry, chunk)
        if plan.mode == "pmap":
            carry, m = jax.tree.map(lambda a: jax.lax.all_gather(a, axis, tiled=True), (carry, m))
        m = jax.tree.map(lambda a: a[main], m)
        losses = jax.lax.dynamic_update_slice(state["losses"], m["loss"], (state["seen"],))
        size = chunk.valid.shape[0]
        metrics = {"train/loss": jnp.sum(m["loss"]) / jnp.maximum(jnp.sum(chunk.valid), 1)}
        for k in ("accuracy", "log_loss", "mae", "rmse", "cumulative_loss"):
            if k in m:
                metrics[f"online/{k}"] = m[k][-1]
        metrics["regret/final_comparator"] = m["regret"][-1]
        metrics["regret/average"] = m["average_regret"][-1]
        state = {"lr": state["lr"], "carry": carry, "losses": losses, "seen": state["seen"] + size}
        return state, metrics

    return step


# ----------------------------------------------------------------------------------------------
# The best fixed model in hindsight, and regret


class BatchSolution(NamedTuple):
    """`best_fixed`'s answer.

    Attributes:
        params: The minimiser u of the mean loss (+ l2/2 ||u||^2) over the valid examples.
        total_loss: sum_t l_t(u) over the valid examples (without the L2 term).
        grad_norm: L2 norm of the objective's gradient at u (the tolerance reached).
        iterations: Solver iterations used.
    """

    params: Params
    total_loss: jax.Array
    grad_norm: jax.Array
    iterations: jax.Array


def best_fixed(
    model: Model,
    stream: Stream,
    *,
    mask: jax.Array | None = None,
    init: Params | None = None,
    l2: float = 0.0,
    tol: float = 1e-6,
    max_iterations: int = 500,
    method: str = "newton",
) -> BatchSolution:
    """Solves the batch problem on the stream: min_u mean_t l_t(u) (+ l2/2 ||u||^2).

    Stops when the gradient norm of the objective is below `tol` (or after `max_iterations`);
    the norm reached is returned, so report it. For the convex linear models this is the best
    fixed model in hindsight. With l2 > 0 it is the best fixed model of a regularised problem,
    and regret against it is a lower bound on regret against the best fixed model.

    Args:
        model: The model.
        stream: The stream.
        mask: `[T]` bool, examples to include (default: all valid ones), e.g. a prefix.
        init: Start point (default `model.init()`).
        l2: L2 penalty on all parameters (0: none).
        tol: Gradient-norm tolerance on the mean objective.
        max_iterations: Iteration cap.
        method: "newton" (damped Newton with an Armijo line search on the flattened
            parameters; for small models such as the linear ones on a few features: its Hessian
            is formed forward-over-reverse, so memory grows as parameters x examples) or
            "lbfgs" (`optax.lbfgs` with its zoom line search; for larger models).

    Returns:
        A `BatchSolution`. Pure, so `jax.vmap` over `mask` solves many prefixes at once.
    """
    weight = stream.valid if mask is None else stream.valid & mask
    weight = weight.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    forward = jax.vmap(model.apply, in_axes=(None, 0))
    per_example_loss = jax.vmap(model.loss)

    def total(u):
        return jnp.sum(weight * per_example_loss(forward(u, stream.x), stream.y))

    def objective(u):
        penalty = 0.5 * l2 * sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(u))
        return total(u) / count + penalty

    u0 = _cast(model.init() if init is None else init, jnp.float32)
    if method == "newton":
        u, iterations = _newton(objective, u0, tol=tol, max_iterations=max_iterations)
    elif method == "lbfgs":
        u, iterations = _lbfgs(objective, u0, tol=tol, max_iterations=max_iterations)
    else:
        raise ValueError(f"best_fixed: method={method!r}; expected 'newton' or 'lbfgs'")
    grad_norm = optax.tree_utils.tree_norm(jax.grad(objective)(u))
    return BatchSolution(u, total(u), grad_norm, iterations)


def _lbfgs(objective, u0, *, tol, max_iterations):
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(carry):
        u, state = carry
        value, grad = value_and_grad(u, state=state)
        updates, state = solver.update(grad, state, u, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(u, updates), state

    def cond(carry):
        _, state = carry
        k = optax.tree_utils.tree_get(state, "count")
        g = optax.tree_utils.tree_get(state, "grad")
        return (k == 0) | ((k < max_iterations) & (optax.tree_utils.tree_norm(g) >= tol))

    u, state = jax.lax.while_loop(cond, body, (u0, solver.init(u0)))
    return u, optax.tree_utils.tree_get(state, "count")


def _newton(objective, u0, *, tol, max_iterations):
    """Damped Newton with a backtracking (Armijo) line search, on the flattened parameters."""
    theta0, unravel = jax.flatten_util.ravel_pytree(u0)

    def f(theta):
        return objective(unravel(theta))

    value_and_grad = jax.value_and_grad(f)
    hessian = jax.hessian(f)

    def body(carry):
        theta, _, k = carry
        value, grad = value_and_grad(theta)
        h = hessian(theta)
        # A tiny ridge keeps the solve defined on flat (e.g. separable logistic) directions.
        ridge = 1e-8 * (1.0 + jnp.trace(h) / theta.size)
        direction = -jnp.linalg.solve(h + ridge * jnp.eye(theta.size, dtype=h.dtype), grad)
        slope = jnp.vdot(grad, direction)
        direction, slope = jax.lax.cond(
            slope < 0, lambda: (direction, slope), lambda: (-grad, -jnp.vdot(grad, grad))
        )

        # Armijo backtracking over the steps 1, 1/2, ..., 2^-30, evaluated at once (a nested
        # while loop compiled far slower under vmap): the first step that decreases enough.
        steps = 0.5 ** jnp.arange(31, dtype=theta.dtype)
        values = jax.vmap(lambda a: f(theta + a * direction))(steps)
        enough = values <= value + 1e-4 * steps * slope
        step = jnp.where(jnp.any(enough), steps[jnp.argmax(enough)], 0.0)
        theta = theta + step * direction
        return theta, jnp.linalg.norm(jax.grad(f)(theta)), k + 1

    def cond(carry):
        _, grad_norm, k = carry
        return (k < max_iterations) & (grad_norm >= tol)

    norm0 = jnp.linalg.norm(jax.grad(f)(theta0))
    theta, _, k = jax.lax.while_loop(cond, body, (theta0, norm0, jnp.zeros([], jnp.int32)))
    return unravel(theta), k


def checkpoints(num: int, *, points: int = 24, start: int = 10) -> np.ndarray:
    """Log-spaced distinct step counts in [min(start, num), num], ending at num."""
    lo = min(start, num)
    grid = np.unique(np.round(np.geomspace(lo, num, points)).astype(int))
    return grid


def best_fixed_prefixes(model: Model, stream: Stream, steps: Any, **solver_kwargs) -> BatchSolution:
    """`best_fixed` on each prefix `x[:t]` for t in `steps`, solved together (vmapped).

    Args:
        model: The model.
        stream: The stream.
        steps: `[K]` prefix lengths (e.g. `checkpoints(T)`); if the last is T, its solution is
            the best fixed model on the whole stream.
        **solver_kwargs: For `best_fixed` (tol, l2, max_iterations, method).

    Returns:
        A `BatchSolution` whose leaves have a leading `[K]` axis.
    """
    steps = jnp.asarray(steps, jnp.int32)
    masks = jnp.arange(stream.x.shape[0])[None, :] < steps[:, None]
    return jax.vmap(lambda m: best_fixed(model, stream, mask=m, **solver_kwargs))(masks)


def regret_curve(online_losses: Any, steps: Any, solutions: BatchSolution) -> np.ndarray:
    """Regret as defined, R(t) = sum_{s<=t} l_s(w_s) - min_u sum_{s<=t} l_s(u), at given t.

    Args:
        online_losses: `[T]` a run's `metrics["loss"]`.
        steps: `[K]` the prefix lengths t.
        solutions: `best_fixed_prefixes(model, stream, steps)` (its `grad_norm` is the
            tolerance reached on each prefix).

    Returns:
        `[K]` float64 regret.
    """
    cumulative = np.cumsum(np.asarray(online_losses, np.float64))
    steps = np.asarray(steps, np.int64)
    return cumulative[steps - 1] - np.asarray(solutions.total_loss, np.float64)


def fit_slope(steps: Any, regret: Any) -> tuple[float, float]:
    """Least-squares fit of log R(t) = slope * log t + c over the points with R(t) > 0.

    Returns:
        `(slope, c)`; NaN if fewer than two points have positive regret.
    """
    steps, regret = np.asarray(steps, np.float64), np.asarray(regret, np.float64)
    keep = regret > 0
    if keep.sum() < 2:
        return math.nan, math.nan
    slope, intercept = np.polyfit(np.log(steps[keep]), np.log(regret[keep]), 1)
    return float(slope), float(intercept)
