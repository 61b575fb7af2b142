"""The one training loop that step-based trainers configure.

A trainer builds its data, model, loss and evaluators, then hands them to `train`, which owns
everything between the first and the last step:

    run = loop.train(config, workdir, plan=plan, state=state, step_fn=train_step,
                     batch_at=lambda step: sample(step), evaluators=[...])
    if not run.finished:      # config.max_steps_per_run, SIGTERM or SIGINT: rerun to resume
        return {"step": run.step}
    results = final_evaluation(run.plan.get_state(run.state))
    run.write(results)        # the final line of metrics.jsonl (process 0 only)
    run.close()

What it owns: resume from the workdir's newest good orbax checkpoint (`resume.restore`), data-
parallel placement of state and batches over the device mesh (`ftlab.core.parallel.Plan`: jit +
sharding, ``pmap`` on request, multi-host), the step schedule (`itstime`: log every
``config.log_every_steps``, evaluate per evaluator, checkpoint every
``config.checkpoint.every_steps``, trace the steps in ``config.profile.steps``), the stop on a
non-finite loss or evaluation metric naming the step (before that step is saved), writers and the
progress bar on process 0 only, and the clean stop with a checkpoint on SIGTERM/SIGINT.

It lives in ``experiments/`` rather than ``ftlab/`` because it reads the config (and opens the
workdir's files and signal handlers through `experiments.resume`): the library below
stays free of flags and I/O, and a notebook that wants a loop of its own composes
`ftlab.core.train` and `ftlab.core.parallel` directly.

Evaluators are plugins: ``config.evals.plugins = {"val": dict(type="accuracy", every_steps=100,
...)}`` picks factories registered under their type with `register` (the shared ones in
`experiments.evaluation`: a classifier's ``accuracy``, ``loss``, ``classification``; a tuned
decoder's ``label_accuracy``, ``label_loss``, ``generation``; a meta-learned initialisation's
``finetune_mse`` (sinusoids) and ``finetune_accuracy`` (image episodes)); `from_config` builds
those a trainer offers and refuses any other type, or an option its factory does not take, in
one error naming the key.
"""

from __future__ import annotations

import dataclasses
import pathlib
import resource
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from experiments import reports, resume
from ftlab.core import metrics as metrics_lib
from ftlab.core import parallel, partition, sharding
from ftlab.core import train as train_lib

__all__ = [
    "MEASURED",
    "PROFILE_DIR",
    "Evaluator",
    "Run",
    "StepPolicy",
    "fetch",
    "is_chief",
    "from_config",
    "itstime",
    "parse_mesh",
    "plan_from",
    "refuse_pmap",
    "register",
    "registered",
    "short_run_config",
    "step_policy",
    "train",
]

# Profiler traces of ``config.profile.steps`` go here (TensorBoard's profile plugin reads it).
PROFILE_DIR = "profile"


def itstime(
    step: int,
    every_n_steps: int = 0,
    *,
    steps: Iterable[int] = (),
    total_steps: int | None = None,
    last: bool = False,
) -> bool:
    """Whether ``step`` (the number of steps done) is one of a schedule's steps.

    As big_vision's ``itstime``: every ``every_n_steps`` (0: never), at the listed ``steps``,
    and at ``total_steps`` when ``last``.

    >>> [s for s in range(1, 11) if itstime(s, 4, steps=(1,), total_steps=10, last=True)]
    [1, 4, 8, 10]
    """
    if every_n_steps and step % every_n_steps == 0:
        return True
    if step in tuple(steps):
        return True
    return last and total_steps is not None and step == total_steps


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """An evaluation the loop runs during training.

    Attributes:
        name: Its name (the key under ``config.evals.plugins``, or the trainer's own).
        run: ``run(state) -> {metric name: scalar}``; ``state`` is as placed on the devices.
        every_steps: Run every that many steps (0: only at ``steps``). Never at the last step:
            trainers evaluate the final state themselves, with everything they report.
        steps: Also run at these steps.
        check_finite: A NaN or infinite metric stops the run, naming the step. Off for
            evaluations whose divergence is a result (fine-tuning with a learned step size).
    """

    name: str
    run: Callable[[Any], Mapping[str, Any]]
    every_steps: int = 0
    steps: tuple[int, ...] = ()
    check_finite: bool = True


# type name -> factory(**options, **context) -> run(state) -> metrics
_REGISTRY: dict[str, Callable[..., Callable[[Any], Mapping[str, Any]]]] = {}


def register(type_name: str):
    """Decorator: registers an evaluator factory under ``type_name``.

    The factory is called as ``factory(**options, **context)``, where ``options`` are the
    plugin's config entries other than ``type`` and ``every_steps``/``steps``, and ``context``
    what the trainer passes to `from_config` (its predict function, data, ...); it returns
    ``run(state) -> metrics``.

    Raises:
        ValueError: Another factory holds ``type_name`` (type names are global).
    """

    def decorate(factory):
        old = _REGISTRY.get(type_name)
        where = lambda f: f"{f.__module__}.{f.__qualname__}"  # noqa: E731
        if old is not None and where(old) != where(factory):  # a module reloaded may register again
            raise ValueError(f"evaluator type {type_name!r} is registered already, by {where(old)}")
        _REGISTRY[type_name] = factory
        return factory

    return decorate


def registered() -> tuple[str, ...]:
    """The evaluator types registered so far."""
    return tuple(sorted(_REGISTRY))


def from_config(
    plugins: Mapping[str, Mapping[str, Any]] | None,
    *,
    types: Iterable[str] | None = None,
    what: str = "config.evals.plugins",
    check_finite: bool = True,
    **context: Any,
) -> list[Evaluator]:
    """Builds the evaluators that ``plugins`` (``{name: {"type": ..., ...}}``) choose by name.

    Args:
        plugins: Name -> options; ``type`` picks the factory, ``every_steps`` and ``steps`` the
            schedule, the rest goes to the factory.
        types: The types the trainer offers (their factories take its ``context``); None: all
            registered.
        what: How errors name ``plugins``.
        check_finite: `Evaluator.check_finite` of every evaluator built.
        **context: What every factory receives besides its options.

    Raises:
        ValueError: A type that is not registered, or options its factory does not take or
            refuses (a factory raises TypeError or ValueError for those).
    """
    out, offered = [], sorted(registered() if types is None else types)
    for name, spec in (plugins or {}).items():
        spec = dict(spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else spec)
        type_name = spec.pop("type", None)
        if type_name not in offered:
            raise ValueError(
                f"{what}.{name}.type={type_name!r}; expected one of {', '.join(offered)}"
            )
        every = spec.pop("every_steps", 0)
        steps = tuple(spec.pop("steps", ()))
        try:
            run = _REGISTRY[type_name](**spec, **context)
        except (TypeError, ValueError) as e:  # an option it does not take, or a bad value
            raise ValueError(f"{what}.{name}: {e}") from None
        out.append(Evaluator(name, run, every_steps=every, steps=steps, check_finite=check_finite))
    return out


def refuse_pmap(plan: parallel.Plan, why: str, *, otherwise: str = "") -> None:
    """Refuses a pmap plan over several devices for a loss that couples a batch's rows: each
    device would compute it over its own share (``why`` says how), where a mesh computes it over
    the global batch.

    Raises:
        ValueError: ``config.parallel.mode='pmap' <why>; use mode 'mesh'<otherwise>``.
    """
    if plan.mode == "pmap" and plan.num_devices > 1:
        raise ValueError(f"config.parallel.mode='pmap' {why}; use mode 'mesh'{otherwise}")


def plan_from(config: ml_collections.ConfigDict) -> parallel.Plan:
    """The plan of ``config.parallel``: data parallel, or parameters sharded by rules.

    With ``parallel.sharding_rules`` (``((regex, tactic), ...)``, tactics ``replicate``,
    ``fsdp``, ``column``, ``row``: `ftlab.core.sharding`), a `parallel.ShardedPlan` over the
    mesh ``parallel.mesh`` (``"data=2,fsdp=4"``; ``""``: all devices on ``fsdp``); without, a
    data-parallel `parallel.Plan` over ``parallel.num_devices`` (0: all) in ``parallel.mode``.
    An absent group (sweep configs may leave it out) is a mesh over all devices.

    Raises:
        ValueError: A mesh or fsdp_min_bytes without sharding rules (neither would take
            effect), or sharding rules
            with ``mode="pmap"`` or ``num_devices``; names the config key.
    """
    p = config.get("parallel") or {}
    rules, mesh = tuple(p.get("sharding_rules", ())), p.get("mesh", "")
    min_bytes = p.get("fsdp_min_bytes", sharding.DEFAULT_MIN_BYTES)
    if not rules:
        for key, value, unset in (
            ("mesh", mesh, ""),
            ("fsdp_min_bytes", min_bytes, sharding.DEFAULT_MIN_BYTES),
        ):
            if value != unset:
                raise ValueError(
                    f"config.parallel.{key}={value!r} takes effect only with "
                    "config.parallel.sharding_rules, which is empty"
                )
        return _logged(
            parallel.make_plan(p.get("mode", "mesh"), num_devices=p.get("num_devices", 0))
        )
    for key, value, plain in (
        ("mode", p.get("mode", "mesh"), "mesh"),
        ("num_devices", p.get("num_devices", 0), 0),
    ):
        if value != plain:
            raise ValueError(
                f"config.parallel.{key}={value!r}: sharded parameters (config.parallel."
                f"sharding_rules) run on the mesh of config.parallel.mesh; set {key}={plain!r}"
            )
    return _logged(
        parallel.make_sharded_plan(
            parse_mesh(mesh or "fsdp=-1", what="config.parallel.mesh"),
            [tuple(r) for r in rules],
            min_bytes=min_bytes,
            what="config.parallel.sharding_rules",
        )
    )


def _logged(plan: parallel.Plan) -> parallel.Plan:
    logging.info(
        "plan: %s over %d %s devices, %d processes",
        plan.mode, plan.num_devices, jax.devices()[0].platform, jax.process_count(),
    )  # fmt: skip
    return plan


@dataclasses.dataclass(frozen=True)
class StepPolicy:
    """How a trainer's train step is built at scale: ``config.step`` (configs/common.py).

    Attributes:
        accumulate: Micro-batches per update (`ftlab.core.train.make_train_step`): the update of
            the whole batch from ``accumulate`` smaller forward/backward passes.
        remat_policy: A name in `ftlab.core.train.REMAT_POLICIES`, or None (no remat).
        remat_modules: Regex over Flax module paths whose calls are rematerialised (per layer,
            e.g. ``encoder/layer_\\d+``); None with a policy: the whole loss.
        precision: Compute dtype and storage of frozen leaves (`ftlab.core.train.Precision`),
            or None (as the model is).
    """

    accumulate: int = 1
    remat_policy: str | None = None
    remat_modules: str | None = None
    precision: train_lib.Precision | None = None

    def train_step(self, loss_fn: Callable, tx, **kwargs) -> Callable:
        """`ftlab.core.train.make_train_step` of ``loss_fn`` under this policy."""
        if self.remat_policy:
            loss_fn = train_lib.remat(loss_fn, policy=self.remat_policy, modules=self.remat_modules)
        return train_lib.make_train_step(
            loss_fn, tx, accumulate=self.accumulate, precision=self.precision, **kwargs
        )

    def eval_step(self, eval_fn: Callable, **kwargs) -> Callable:
        """`ftlab.core.train.make_eval_step` of ``eval_fn`` in the policy's compute dtype."""
        return train_lib.make_eval_step(eval_fn, precision=self.precision, **kwargs)


def step_policy(config: ml_collections.ConfigDict) -> StepPolicy:
    """The `StepPolicy` of ``config.step`` (absent: the plain step).

    Raises:
        ValueError: ``remat_modules`` without ``remat_policy`` (it could not take effect);
            names the key.
    """
    s = config.get("step") or {}
    policy, modules = s.get("remat_policy", ""), s.get("remat_modules", "")
    if modules and not policy:
        raise ValueError(
            f"config.step.remat_modules={modules!r} takes effect only with "
            f"config.step.remat_policy (one of {', '.join(train_lib.REMAT_POLICIES)})"
        )
    compute, frozen = s.get("compute_dtype", ""), s.get("frozen_dtype", "")
    return StepPolicy(
        accumulate=s.get("accumulate", 1),
        remat_policy=policy or None,
        remat_modules=modules or None,
        precision=train_lib.Precision(compute=compute or None, frozen=frozen or None)
        if compute or frozen
        else None,
    )


def fetch(plan: parallel.Plan, tree: Any) -> Any:
    """A host (numpy) copy of a tree placed by ``plan``, on every process.

    ``jax.device_get`` cannot read an array sharded over devices of several processes (a
    `parallel.ShardedPlan` across hosts); those are gathered first. Meant for the small trees a
    trainer evaluates on the host; a model larger than a host should be evaluated in place.
    """
    from jax.experimental import multihost_utils  # noqa: PLC0415 - only multi-host needs it

    def get(x):
        if not isinstance(x, jax.Array) or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x  # keys stay typed, as jax.device_get leaves them
        if not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, plan.get_state(tree))


def parse_mesh(text: str, *, what: str = "mesh") -> dict[str, int]:
    """``"data=2,fsdp=-1"`` -> ``{"data": 2, "fsdp": -1}`` (axes of `ftlab.core.sharding`).

    >>> parse_mesh("data=2, fsdp=-1")
    {'data': 2, 'fsdp': -1}
    """
    shape = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        axis, _, size = item.partition("=")
        axis = axis.strip()
        if axis not in sharding.AXES or axis in shape or not size.strip().lstrip("-").isdigit():
            raise ValueError(
                f"{what}={text!r}: {item!r} is not 'axis=size' with a new axis among "
                f"{', '.join(sharding.AXES)} and an integer size (-1: the remaining devices)"
            )
        shape[axis] = int(size)
    return shape


def short_run_config(num_steps: int, *, log_every: int) -> ml_collections.ConfigDict:
    """What `train` reads, for one short run of a sweep: checkpointed at its end only.

    A sweep (`experiments.finished`) keeps its finished runs' results itself; the
    run's own checkpoint serves a stop by a signal, and its end.
    """
    return ml_collections.ConfigDict(
        {
            "optim": {"num_steps": num_steps},
            "log_every_steps": min(log_every, num_steps),
            "max_steps_per_run": 0,
            "checkpoint": {"every_steps": num_steps, "keep": 1},
        }
    )


def is_chief() -> bool:
    """Whether this process writes the run's files (process 0 of a multi-process job).

    One indirection, so that a test can stand in for process 1 of a multi-process job.
    """
    return jax.process_index() == 0


@dataclasses.dataclass
class Run:
    """What `train` leaves behind: the state, where it stopped, and the open writers.

    Attributes:
        state: The state as placed on the devices (`plan.get_state` gives one copy).
        plan: The data-parallel plan it was placed with.
        workdir: The run's folder.
        start_step: The step this invocation resumed from (0: fresh).
        step: The last step done.
        total: ``config.optim.num_steps``.
        finished: Whether ``step == total``; if not, the writers are closed already.
        train_seconds: Seconds spent in train steps this invocation (not evaluating, saving).
        is_chief: Whether this is process 0, the one that writes files.
        history: With ``keep_history``, every train step's metrics of this invocation, in
            order, on the host (a sweep of short runs reports its first and last losses).
        logged: ``(step, metrics)`` of every line this invocation logged (the train metrics'
            means since the previous line, and the evaluations due).
    """

    state: Any
    plan: parallel.Plan
    workdir: pathlib.Path
    start_step: int
    step: int
    total: int
    finished: bool
    train_seconds: float
    is_chief: bool
    writer: metrics_lib.MetricWriter
    checkpointer: resume.Checkpointer
    history: list = dataclasses.field(default_factory=list)
    logged: list = dataclasses.field(default_factory=list)

    def write(self, metrics: Mapping[str, Any]) -> None:
        """Writes ``metrics`` to metrics.jsonl at the last step (process 0 only)."""
        self.writer.write(self.step, metrics)

    def close(self) -> None:
        """Waits for the last checkpoint, then closes the metric files and the checkpointer."""
        self.checkpointer.wait_until_finished()
        self.writer.close()
        self.checkpointer.close()

    def measured(self) -> dict[str, float]:  # keys: MEASURED
        """This invocation's ``train_seconds_this_run``, its typical step time ``train_step_s``
        (the median over the log windows after the first, which compiles; absent with one
        window) and the process' ``peak_rss_mib``."""
        out = {"train_seconds_this_run": self.train_seconds}
        rates = [m["train/steps_per_sec"] for _, m in self.logged if "train/steps_per_sec" in m]
        if len(rates) > 1:
            out["train_step_s"] = float(1.0 / np.median(rates[1:]))
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out

    def finish(self, results: Mapping[str, Any], *, logged: str = "eval/", **publish) -> dict:
        """Ends a finished run: the final line of metrics.jsonl (the results' keys that start
        with ``logged``), `reports.publish` of ``results`` with what was `measured` (``publish``:
        its options; the curves of metrics.jsonl into the workdir by default), then `close`.
        Returns those results.
        """
        results = {**results, **self.measured()}
        try:
            self.checkpointer.wait_until_finished()
            self.write({k: v for k, v in results.items() if k.startswith(logged)})
            reports.publish(self.workdir, results, **{"curves": "", **publish})
            logging.info("results: %s", {k: v for k, v in results.items() if np.ndim(v) == 0})
        finally:  # a failed write still releases the checkpointer and the signal handlers
            self.close()
        return dict(results)


# The keys `Run.measured` adds to a run's results: they differ from run to run.
MEASURED = ("train_seconds_this_run", "train_step_s", "peak_rss_mib")


def _place(plan: parallel.Plan, batch: Mapping) -> dict:
    """Places a (possibly nested) host batch with its leading axis on the data mesh."""
    return partition.unflatten(plan.put_batch(partition.flatten(batch)))


def train(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    plan: parallel.Plan,
    state: Any,
    step_fn: Callable,
    batch_at: Callable[[int], Mapping],
    evaluators: Sequence[Evaluator] = (),
    compiler_options: dict | None = None,
    keep_history: bool = False,
) -> Run:
    """Runs ``config.optim.num_steps`` steps of ``step_fn`` from the workdir's newest checkpoint.

    Args:
        config: Reads ``optim.num_steps``, ``log_every_steps``, ``max_steps_per_run``,
            ``checkpoint.every_steps``/``keep`` and, if present, ``profile.steps``.
        workdir: The run's folder: checkpoints, metrics.jsonl, tensorboard, profile.
        plan: Where state and batches go (`parallel.make_plan`).
        state: The fresh state on the host (`ftlab.core.train.init_state`, or any pytree); a
            checkpoint replaces all of it but a `TrainState`'s frozen leaves.
        step_fn: ``step(state, batch) -> (state, metrics)``, not yet compiled; the plan
            compiles it once, donating the state.
        batch_at: ``step -> global batch`` on the host (numpy; nested dicts allowed), a pure
            function of the step so that a resumed run sees the batches it would have seen.
        evaluators: Run during training, on their own schedules (never at the last step).
        compiler_options: XLA options for the compiled step (jit modes only).
        keep_history: Keep every step's train metrics in `Run.history` (they are fetched from
            the devices at the checks anyway; the last step is always one).

    Returns:
        The `Run`. When it is not ``finished`` (stopped by ``config.max_steps_per_run`` or a
        signal, with a checkpoint at ``run.step``), its writers are closed already.

    Raises:
        ftlab.core.metrics.NonFiniteMetricError: A train metric or a checked evaluation metric
            went NaN or infinite; names the step range, and nothing from it was saved.
        ValueError: ``config.profile.steps`` names a step after the last one.
    """
    workdir = pathlib.Path(workdir)
    chief = is_chief()
    ckpt, state, start_step, stop = resume.restore(
        config, workdir, state, abstract=plan.abstract_state
    )
    try:
        state = plan.put_state(state)
        train_step = plan.compile_train_step(step_fn, compiler_options=compiler_options)
        total = config.optim.num_steps
        profile_steps = set(config.get("profile", {}).get("steps", ()))
        if beyond := sorted(s for s in profile_steps if s > total):
            raise ValueError(
                f"config.profile.steps={tuple(sorted(profile_steps))}: step(s) {beyond} are "
                f"after the last step, config.optim.num_steps={total}; they would never be traced"
            )
        writer = metrics_lib.MetricWriter(workdir, enabled=chief, resume_step=start_step)
    except BaseException:
        ckpt.close()
        raise
    # tqdm draws in place on a terminal and rate-limits itself in a log file.
    bar = tqdm.tqdm(
        total=total, initial=start_step, disable=not chief, unit="step", mininterval=1.0
    )
    pending, window, kept, lines = [], [], [], []
    last_good, train_seconds, window_seconds, window_steps = start_step, 0.0, 0.0, 0
    step = start_step
    try:
        tick = time.perf_counter()
        for step in range(start_step, stop):
            done = step + 1
            tracing = done in profile_steps
            if tracing:
                jax.profiler.start_trace(str(workdir / PROFILE_DIR))
            state, step_metrics = train_step(state, _place(plan, batch_at(step)))
            if tracing:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                logging.info("profile: traced step %d into %s", done, workdir / PROFILE_DIR)
            pending.append(step_metrics)
            log_now = itstime(done, config.log_every_steps, total_steps=total, last=True)
            due = [
                e
                for e in evaluators
                if done != total and itstime(done, e.every_steps, steps=e.steps)
            ]
            preempted = ckpt.stop_requested(done)  # SIGTERM/SIGINT: save here and stop
            save_now = ckpt.should_save(done) or done == stop or preempted
            if not (log_now or due or save_now):
                continue  # no host sync between checks: the host runs ahead of the device
            # Every step since the last check is checked before anything is logged or saved,
            # so a checkpoint never holds parameters that came from a non-finite update.
            history, pending = jax.device_get(pending), []
            for i, m in enumerate(history):
                metrics_lib.check_finite(
                    m, step=done - len(history) + i + 1, last_good_step=last_good
                )
            window += history
            if keep_history:
                kept += history
            now = time.perf_counter()
            window_seconds += now - tick
            window_steps += len(history)
            train_seconds += now - tick
            if log_now or due:
                logged = metrics_lib.checked_mean(window, last_step=done, last_good_step=last_good)
                logged["train/steps_per_sec"] = window_steps / max(window_seconds, 1e-9)
                window, window_seconds, window_steps = [], 0.0, 0
                for evaluator in due:
                    results = dict(evaluator.run(state))
                    if evaluator.check_finite:
                        metrics_lib.check_finite(results, step=done, last_good_step=last_good)
                    logged.update(results)
                writer.write(done, logged)
                lines.append((done, logged))
                if "train/loss" in logged:
                    bar.set_postfix(loss=f"{logged['train/loss']:.4g}", refresh=False)
            last_good = done
            bar.update(done - bar.n)
            if save_now:
                saved = resume.saved_part(plan.get_state(state))
                ckpt.save(done, saved, force=done == stop or preempted)
            tick = time.perf_counter()  # evaluating and saving is not training time
            if preempted and done < total:
                stop = done
                break
        step = stop
    except BaseException:
        bar.close()
        writer.close()
        try:
            ckpt.close()  # finishes the last good save; no orbax threads left behind the error
        except Exception as e:  # noqa: BLE001 - the run's own error is the one to show
            logging.error("closing the checkpointer failed too: %s: %s", type(e).__name__, e)
        raise
    bar.close()
    run = Run(
        state=state,
        plan=plan,
        workdir=pathlib.Path(workdir),
        start_step=start_step,
        step=step,
        total=total,
        finished=step == total,
        train_seconds=train_seconds,
        is_chief=chief,
        writer=writer,
        checkpointer=ckpt,
        history=kept,
        logged=lines,
    )
    if not run.finished:
        run.close()
        logging.info(
            "stopped at step %d of %d (config.max_steps_per_run or a signal); rerun to resume",
            step,
            total,
        )
    return run
