"""Data parallelism: a device mesh with the batch on a ``data`` axis, or `jax.pmap` on request.

A :class:`Plan` hides the difference between the two from a trainer. A :class:`ShardedPlan`
(`make_sharded_plan`) has the same methods and places the state by sharding rules over a
``data`` x ``fsdp`` x ``tensor`` mesh (`ftlab.core.sharding`) instead of replicating it. All
compile the step once, donate the state, and average over the global batch, so 1, 8 or 2x2
(multi-host) devices give the same numbers up to float reassociation. Multi-host follows Cloud
TPU's path: every process runs the same program on the same global batch and transfers only the
rows its own devices hold (with ``fsdp`` across processes as well: the parameters' shards and
the batch's rows of a device are both read from the mesh).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ftlab.core import partition, sharding
from ftlab.types import PyTree

__all__ = [
    "DATA_AXIS",
    "MODES",
    "Plan",
    "ShardedPlan",
    "initialize_distributed",
    "make_plan",
    "make_sharded_plan",
]


DATA_AXIS = "data"
MODES = ("mesh", "pmap")


def initialize_distributed(
    *, coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> None:
    """Calls `jax.distributed.initialize`; call it first thing, before any other JAX call.

    Empty/zero/negative arguments are left for JAX to detect (as on Cloud TPU). CPU collectives
    go through gloo, so that several local processes can stand in for hosts.
    """
    kwargs = {}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes > 0:
        kwargs["num_processes"] = num_processes
    if process_id >= 0:
        kwargs["process_id"] = process_id
    # Only the CPU backend reads this; on TPU/GPU it changes nothing.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How state and batches are laid out on devices, and how steps are compiled.

    Attributes:
      mode: "mesh" (jit + NamedSharding; works multi-host) or "pmap".
      mesh: a 1-D mesh over all global devices with axis ``data``.
    """

    mode: str
    mesh: Mesh

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(DATA_AXIS))

    def check_batch_size(self, batch_size: int, *, what: str) -> None:
        """Raises if a global batch cannot be split evenly over devices and processes."""
        n = self.num_devices
        if batch_size % n:
            raise ValueError(
                f"{what}={batch_size} is not divisible by the {n} devices of the data mesh; "
                f"use a multiple of {n}."
            )

    # -- state ------------------------------------------------------------------------------
    def put_state(self, state: PyTree) -> PyTree:
        """Places a host or single-device state on all devices (replicated)."""
        if self.mode == "pmap":
            devices = list(self.mesh.devices.flat)
            return _pmap_replicate(state, devices)
        sharding = self.replicated

        def put(x):
            x = np.asarray(x)
            # Every process holds the same host value; each fills its own devices' shards.
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

        return jax.tree.map(put, state)

    def get_state(self, state: PyTree) -> PyTree:
        """One logical copy of a placed state (for saving or returning to the user)."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x[0], state)
        return state

    def abstract_state(self, state: PyTree) -> PyTree:
        """`jax.ShapeDtypeStruct`s with shardings: the restore target for a checkpoint."""
        sharding = self.replicated
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), state
        )

    # -- batches ----------------------------------------------------------------------------
    def put_batch(self, global_batch: Mapping[str, np.ndarray]) -> dict:
        """Places the global batch; each process transfers only the rows of its own devices.

        Every process passes the same global batch. Which rows a process's devices hold is read
        from the batch sharding, not assumed: with ``fsdp`` or ``data`` across processes, a
        mesh over a subset of the devices (one process's alone included) or devices in any
        order, each device gets the rows the mesh gives it.
        """
        if self.mode == "pmap":
            return {
                k: np.asarray(v).reshape((self.num_devices, -1) + np.shape(v)[1:])
                for k, v in global_batch.items()
            }
        sharding = self.batch_sharding
        if sharding.is_fully_addressable:
            # One transfer for the whole batch: half the host time of one call per array, which
            # is most of a step for small models (a sinusoid meta-step is under a millisecond).
            return jax.device_put(dict(global_batch), sharding)
        out = {}
        for k, v in global_batch.items():
            v = np.asarray(v)
            out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
        return out

    # -- compilation ------------------------------------------------------------------------
    def compile_train_step(
        self, step: Callable, *, compiler_options: dict | None = None
    ) -> Callable:
        """Compiles ``step(state, batch) -> (state, metrics)`` once, donating the state.

        ``compiler_options`` (XLA's, e.g. `ftlab.meta.compiler_options()`) apply to the jit
        modes; ``pmap`` takes none and compiles with XLA's defaults.
        """
        if self.mode == "pmap":
            pstep = jax.pmap(step, axis_name=DATA_AXIS, donate_argnums=0)

            def run(state, batch):
                state, metrics = pstep(state, batch)
                return state, jax.tree.map(lambda m: m[0], metrics)

            return run
        return jax.jit(
            step,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
            compiler_options=compiler_options,
        )

    def compile_eval_step(self, eval_step: Callable) -> Callable:
        """Compiles ``eval_step(state, batch) -> sums`` (no donation: the state lives on)."""
        if self.mode == "pmap":
            pstep = jax.pmap(eval_step, axis_name=DATA_AXIS)
            return lambda state, batch: jax.tree.map(lambda m: m[0], pstep(state, batch))
        return jax.jit(
            eval_step,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=self.replicated,
        )


def make_plan(mode: str = "mesh", *, num_devices: int = 0) -> Plan:
    """A data-parallel plan over the first ``num_devices`` global devices (0: all of them)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    if mode == "pmap" and jax.process_count() > 1:
        raise ValueError("mode='pmap' is single-host here; use 'mesh' multi-host")
    mesh = Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    return Plan(mode=mode, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class ShardedPlan(Plan):
    """A mesh plan whose state is placed by sharding rules (FSDP, tensor parallel).

    It has :class:`Plan`'s methods, so a trainer or `experiments.loop` takes either: the state's
    leaves go where ``rules`` say (`sharding.state_shardings`), batches are split on their
    leading axis over ``data`` and ``fsdp`` together, and compiled steps keep every leaf of the
    state in its sharding (input and output shardings are the placed state's own).

    Attributes:
      mode: always "mesh".
      mesh: a mesh with axes ``data``, ``fsdp``, ``tensor`` (`sharding.make_mesh`).
      rules: ``(regex, tactic)`` pairs over parameter and collection paths.
      default: the tactic of leaves no rule matches (None: such a leaf is an error).
      min_bytes: leaves under this size are not split over ``fsdp``.
      what: how errors name ``rules`` (e.g. ``"config.parallel.rules"``).
    """

    rules: tuple = ()
    default: sharding.Tactic | None = None
    min_bytes: int = sharding.DEFAULT_MIN_BYTES
    what: str = "rules"

    @property
    def batch_sharding(self) -> NamedSharding:
        return sharding.batch_sharding(self.mesh)

    def check_batch_size(self, batch_size: int, *, what: str) -> None:
        """Raises if a global batch cannot be split evenly over the ``data`` x ``fsdp`` axes."""
        n = sharding.batch_size_divisor(self.mesh)
        if batch_size % n:
            raise ValueError(
                f"{what}={batch_size} is not divisible by {n}, the data x fsdp devices of the "
                f"mesh {dict(self.mesh.shape)}; use a multiple of {n}."
            )

    def state_shardings(self, state: PyTree, *, check_unused: bool = True) -> PyTree:
        """`sharding.state_shardings` of ``state`` under this plan's rules."""
        return sharding.state_shardings(
            state,
            self.rules,
            self.mesh,
            default=self.default,
            min_bytes=self.min_bytes,
            check_unused=check_unused,
            what=self.what,
        )

    def put_state(self, state: PyTree) -> PyTree:
        """Places a host (or otherwise placed) state leaf by leaf in its sharding."""
        targets = self.state_shardings(state)

        def put(x, s):
            x = np.asarray(x)
            # Each process fills only its own devices' shards from its host copy: no device
            # ever holds more than its shard, and the same call works on several hosts.
            return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

        return jax.tree.map(put, state, targets)

    def get_state(self, state: PyTree) -> PyTree:
        """The placed state itself: global arrays are already one logical copy."""
        return state

    def abstract_state(self, state: PyTree) -> PyTree:
        """`jax.ShapeDtypeStruct`s in this plan's shardings: a checkpoint's restore target.

        ``state`` may lack its frozen leaves (``state.checkpointable()``), so a rule that
        matches no leaf is not an error here; `put_state` of the full state checks that.
        """
        targets = self.state_shardings(state, check_unused=False)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, targets
        )

    def compile_train_step(
        self, step: Callable, *, compiler_options: dict | None = None
    ) -> Callable:
        """Compiles ``step(state, batch) -> (state, metrics)`` once, donating the state.

        The state's shardings are read from the first state it is called with (placed by
        `put_state`): the output state keeps them, metrics come back replicated.
        """
        return _ShardedStep(self, step, donate=True, compiler_options=compiler_options)

    def compile_eval_step(self, eval_step: Callable) -> Callable:
        """Compiles ``eval_step(state, batch) -> sums`` (no donation; sums replicated)."""
        return _ShardedStep(self, eval_step, donate=False, compiler_options=None)


class _ShardedStep:
    """A step jitted on first call with the placed state's shardings as in and out shardings."""

    def __init__(self, plan: ShardedPlan, fn: Callable, *, donate: bool, compiler_options):
        self._plan, self._fn, self._donate = plan, fn, donate
        self._compiler_options = compiler_options
        self._jitted = None

    def __call__(self, state, batch):
        if self._jitted is None:
            self._jitted = self._jit(state)
        return self._jitted(state, batch)

    def _jit(self, state):
        leaves = jax.tree_util.tree_flatten_with_path(state)[0]
        unplaced = [
            partition.path_name(p)
            for p, x in leaves
            if not (isinstance(x, jax.Array) and x.committed)
        ]
        if unplaced:
            raise ValueError(
                f"state leaves {unplaced[:3]} are not placed on the mesh; pass the state "
                "through plan.put_state first"
            )
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        replicated = self._plan.replicated
        out = (state_shardings, replicated) if self._donate else replicated
        return jax.jit(
            self._fn,
            in_shardings=(state_shardings, self._plan.batch_sharding),
            out_shardings=out,
            donate_argnums=0 if self._donate else (),
            compiler_options=self._compiler_options,
        )


def make_sharded_plan(
    shape: Mapping[str, int],
    rules: sharding.Rules,
    *,
    default: sharding.Tactic | None = None,
    min_bytes: int = sharding.DEFAULT_MIN_BYTES,
    devices: Sequence[jax.Device] | None = None,
    what: str = "rules",
) -> ShardedPlan:
    """A :class:`ShardedPlan` over all global devices (or ``devices``).

    Args:
      shape: the mesh shape, ``{"data": 2, "fsdp": -1}`` (see `sharding.make_mesh`).
      rules: ``(regex, tactic)`` sharding rules (see `ftlab.core.sharding`).
      default: the tactic for leaves no rule matches; None: such a leaf is an error.
      min_bytes: leaves under this size are not split over ``fsdp``.
      devices: the devices of the mesh (default: every process's devices).
      what: how errors name ``rules``; a caller that read them from a config passes its key.

    Raises:
      ValueError: as `sharding.make_mesh`, or a rule or ``default`` is not a valid tactic.
    """
    mesh = sharding.make_mesh(shape, devices=devices)
    # Tactics and regexes are checked now rather than at the first put_state.
    sharding.specs({}, rules, mesh, default=default, check_unused=False, what=what)
    return ShardedPlan(
        mode="mesh",
        mesh=mesh,
        rules=tuple(tuple(r) if isinstance(r, list) else r for r in rules),
        default=default,
        min_bytes=min_bytes,
        what=what,
    )


def _pmap_replicate(tree, devices):
    # `jax.device_put_replicated` is gone; one identity pmap over broadcast views does the same.
    n = len(devices)
    views = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)
    return jax.pmap(lambda t: t, devices=devices)(views)
