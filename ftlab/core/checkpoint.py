"""Save and resume training state with orbax, skipping broken checkpoints.

A thin layer over `orbax.checkpoint.CheckpointManager` for a trainer:

    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every_steps=500)
    restored = ckpt.restore_latest(abstract_state)  # None on a fresh workdir
    state, step = restored if restored else (init_state, 0)
    for step in range(step + 1, total_steps + 1):
        state, metrics = train_step(state, batch)
        ckpt.save(step, state)
    ckpt.save(total_steps, state, force=True)
    ckpt.close()

The state is any pytree; for `ftlab.core.train.TrainState`, save ``state.checkpointable()``
(everything but the frozen parameters, which come from the pretrained source on resume): its
``collections`` (BatchNorm's ``batch_stats``, updated or frozen) are saved and restored with the
trainable leaves and the optimizer state.

Orbax writes each step into a temporary folder and renames it when complete, so an interrupted
save never replaces a good step. What orbax does not do is step over a step folder that is
broken for other reasons (emptied, half-copied, bit-rotted): an empty folder counts as the
latest step and its restore fails with an unrelated error. `Checkpointer.restore_latest` checks
each step newest-first, moves broken ones to `<directory>/quarantine/` (nothing broken is ever
deleted) and restores the newest one that works.

Orbax and TensorStore notice some corruption themselves: missing or unreadable metadata and
damaged OCDBT index nodes (which are checksummed, and hold small arrays inline) raise on
restore. The bulk chunks of larger arrays carry no checksum, so a flipped bit inside one would
restore without error as a wrong value. `save` therefore records a sha256 of every array
leaf's bytes (`ftlab.core.tensorfile.digest`) and its dtype in the step's orbax metadata
(``custom_metadata``, keys ``sha256`` and ``dtypes``), and `restore_latest` verifies each
restored leaf against it: a mismatch is one more kind of broken step (quarantined, the previous
step tried, the leaf named in the warning). Leaves sharded across processes (neither fully
addressable nor fully replicated), and leaves restored as another dtype than saved, are not
compared. Checkpoints written before digests existed restore unverified.

Sharded states: orbax writes each array from the shards its devices hold, and restores each
leaf straight into the sharding of the restore target, so a state saved on one mesh restores
onto any other mesh shape (fsdp=8 to fsdp=4 x tensor=2, or one device) without a replicated
copy on device: pass `ftlab.core.parallel.ShardedPlan.abstract_state` of the state (or any tree
of `jax.ShapeDtypeStruct` with ``sharding`` set) to `Checkpointer.restore_latest`. The digests
are of the logical arrays, so they verify across mesh shapes too.
"""

import contextlib
import inspect
import itertools
import os
import re
import sys
from collections.abc import Sequence
from typing import Self

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ftlab.core import tensorfile
from ftlab.types import PyTree

__all__ = [
    "QUARANTINE",
    "CheckpointMismatchError",
    "CheckpointRestoreError",
    "CheckpointSaveError",
    "Checkpointer",
]

# Orbax's item folder for a single unnamed item, and the tree metadata file inside it.
_ITEM = "default"
_ITEM_METADATA = "_METADATA"
# Orbax names the folder of a save in progress `<step>.orbax-checkpoint-tmp[-<timestamp>]`.
_TMP_MARKER = ".orbax-checkpoint-tmp"
# Key of the per-leaf digests in a step's custom metadata: {leaf path: hex sha256}.
_DIGESTS = "sha256"
# ... and their dtypes, {leaf path: dtype name}: a leaf restored as another dtype (the config
# changed it; orbax casts) has other bytes without being corrupt, and is not compared.
_DTYPES = "dtypes"
QUARANTINE = "quarantine"

# Orbax barriers need names that are unique within the job; every process makes the same calls
# in the same order, so a process-wide counter gives the same names everywhere.
_barrier_ids = itertools.count()


class CheckpointRestoreError(RuntimeError):
    """Every saved step failed to restore; the message lists each folder and its problem."""


class CheckpointSaveError(OSError):
    """A save failed (a full disk, a lost connection); the message names the step and the
    steps still on disk."""


class CheckpointMismatchError(ValueError):
    """A checkpoint is readable but holds a different tree than the restore target."""


class Checkpointer:
    """Saves a training state every few steps and restores the newest good one.

    Every process of a multi-process JAX job must construct it and call `save`,
    `restore_latest`, `wait_until_finished` and `close` at the same points; orbax synchronises
    the processes and writes the shards each one owns. Saves are asynchronous: `save` returns
    once the arrays are copied off the accelerator, and the files are finished in the
    background (`wait_until_finished` blocks until they are). Not safe for two jobs writing
    to the same directory.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        save_every_steps: int,
    ):
        """Opens (and creates if needed) a checkpoint directory.

        Args:
            directory: Folder holding one sub-folder per saved step (local path or any path
                `etils.epath` understands, e.g. `gs://`).
            max_to_keep: How many of the newest steps to keep; older ones are deleted by orbax
                after each successful save.
            save_every_steps: `save` writes when the step is a multiple of this.

        Raises:
            ValueError: `max_to_keep` or `save_every_steps` is not a positive integer.
        """
        if not isinstance(save_every_steps, int) or save_every_steps < 1:
            raise ValueError(
                f"Checkpointer: save_every_steps must be a positive integer, got "
                f"{save_every_steps!r}, e.g. 1000."
            )
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(
                f"Checkpointer: max_to_keep must be a positive integer, got {max_to_keep!r}."
            )
        # orbax insists on absolute paths (a relative one fails inside its background save).
        self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
        self.save_every_steps = save_every_steps
        self.max_to_keep = max_to_keep
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps),
                preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
                create=True,
            ),
        )
        self._metadata_handler = ocp.StandardCheckpointHandler()
        self._last_save: int | None = None
        self._save_failed_reported = False

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write without `force`.

        True when `step` is a multiple of `save_every_steps`, or when the job received a
        preemption notice and every process has reached the step JAX picked to save at. For
        the preemption part to work, call this (or `save`) at every step on every process.
        """
        return step % self.save_every_steps == 0 or ocp.multihost.reached_preemption(step)

    def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
        """Saves `state` as step `step` when `should_save(step)` or `force`.

        Args:
            step: The training step `state` is at (after that many updates).
            state: A pytree of arrays (dicts, flax.struct dataclasses, optax NamedTuple states).
                Buffers may be donated to the next step once this returns.
            force: Save even when `step` is not a multiple of `save_every_steps`.

        Returns:
            Whether a save was started. A step already on disk is not saved again.
        """
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            logging.info("Checkpointer: step %d is already saved in %s.", step, self.directory)
            return False
        # The digests are taken before the save starts, from the same host bytes it writes;
        # this syncs with the device (the save would copy the arrays off it anyway).
        # Orbax waits for the previous save before it starts one: a failure reported now may
        # be that save's, and names its step.
        self.wait_until_finished()
        with self._reporting_save_errors(step):
            started = self._manager.save(
                step,
                args=ocp.args.StandardSave(state),
                force=True,
                custom_metadata=_leaf_digests(state),
            )
        self._last_save = step
        return started

    def latest_step(self) -> int | None:
        """The newest step folder orbax sees, or None (broken ones count until restore_latest)."""
        return self._manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        """All step numbers orbax sees in the directory, oldest first."""
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: PyTree) -> tuple[PyTree, int] | None:
        """Restores the newest step that is intact, moving broken steps aside.

        Steps are tried newest first. One that is empty, half-written (no item metadata),
        unreadable, or raises while restoring is logged as a warning and moved to
        `<directory>/quarantine/<name>`; then the next older one is tried. Folders of saves
        that never finished (orbax temporary folders) are moved there too. A restored leaf
        whose bytes differ from the digest recorded at save makes its step broken as well.
        Steps older than the newest `max_to_keep` (left by a process killed between a save
        and orbax's clean-up) are deleted once a step is restored.

        Args:
            abstract_state: The restore target: a pytree of `jax.ShapeDtypeStruct` (with
                `.sharding` set) or of concrete arrays, e.g. `jax.eval_shape(init_fn, rng)`.
                The restored state has its tree types (optax NamedTuples, dataclasses),
                dtypes and shardings.

        Returns:
            `(state, step)`, or None when the directory holds no step to restore.

        Raises:
            CheckpointMismatchError: A readable checkpoint holds different leaf paths or
                shapes than `abstract_state` (nothing is moved; the model or optimizer changed).
            CheckpointRestoreError: Steps exist but none restores; each was quarantined.
        """
        self.wait_until_finished()
        _silence_orbax_stragglers()  # before any read: callbacks may beat the except
        self._manager.reload()
        self._quarantine_unfinished_saves()
        target = jax.tree.map(_abstract, abstract_state)
        problems = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            step_dir = self.directory / str(step)
            restored, problem = None, self._check_step_folder(step_dir, target)
            if problem is None:
                try:
                    restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
                    self._verify(step, restored)
                except tensorfile.CorruptFileError as e:
                    problem = f"corrupt: {_first_line(e)}"
                except Exception as e:  # noqa: BLE001 - any failure means "try an older step"
                    problem = f"corrupt: restore raised {_describe(e)}"
            problem = _agree_across_processes(problem)
            if problem is None:
                if problems:
                    self._manager.reload()
                self._drop_beyond_max_to_keep()
                logging.info("Checkpointer: restored step %d from %s.", step, step_dir)
                return restored, step
            self._quarantine(step_dir, problem)
            problems.append((step_dir, problem))
        self._manager.reload()
        if problems:
            listing = "\n".join(f"  {path}: {problem}" for path, problem in problems)
            raise CheckpointRestoreError(
                f"No checkpoint in {self.directory} could be restored; each was moved to "
                f"{self.directory / QUARANTINE}:\n{listing}\nTo start from scratch, run "
                f"again; to retry one, move it back from the quarantine folder."
            )
        quarantined = self.directory / QUARANTINE
        if quarantined.exists() and any(quarantined.iterdir()):
            logging.warning(
                "Checkpointer: nothing to restore in %s, but %s holds folders set aside "
                "earlier; starting from scratch.",
                self.directory,
                quarantined,
            )
        return None

    def wait_until_finished(self) -> None:
        """Blocks until the files of the last save are complete.

        Raises:
            CheckpointSaveError: The last save failed in the background.
        """
        with self._reporting_save_errors(self._last_save):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases orbax's resources.

        Raises:
            CheckpointSaveError: The last save failed in the background (not raised again
                when `save` or `wait_until_finished` already reported it).
        """
        try:
            with self._reporting_save_errors(self._last_save):
                self._manager.close()
        except CheckpointSaveError:
            if not self._save_failed_reported:
                raise
        finally:
            self._metadata_handler.close()

    @contextlib.contextmanager
    def _reporting_save_errors(self, step: int | None):
        """Turns orbax's save failures into one CheckpointSaveError naming what was kept."""
        _silence_orbax_stragglers()  # before the save: its abandoned writes complain at exit
        try:
            yield
        except CheckpointSaveError:
            raise
        except Exception as e:
            if self._save_failed_reported:
                raise CheckpointSaveError(f"{self.directory}: an earlier save failed") from e
            self._save_failed_reported = True
            try:
                kept = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
            except OSError:
                kept = "unknown (the folder cannot be listed)"
            raise CheckpointSaveError(
                f"saving checkpoint step {step if step is not None else '?'} to {self.directory} "
                f"failed: {_describe(e)}; steps kept on disk: {kept}"
            ) from e

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_step_folder(self, step_dir: epath.Path, target: PyTree) -> str | None:
        """Returns why `step_dir` cannot be restored, or None if it looks complete."""
        if not any(step_dir.iterdir()):
            return "empty step folder (a save or copy that never wrote anything)"
        item_dir = step_dir / _ITEM
        if not (item_dir / _ITEM_METADATA).exists():
            return f"half-written: no {_ITEM}/{_ITEM_METADATA} (the tree metadata)"
        try:
            saved = self._metadata_handler.metadata(item_dir).tree
        except Exception as e:  # noqa: BLE001 - unreadable metadata means a broken step
            return f"corrupt: reading its tree metadata raised {type(e).__name__}: {_first_line(e)}"
        _check_matches(saved, target, step_dir)
        return None

    def _drop_beyond_max_to_keep(self) -> None:
        """Deletes the oldest steps beyond `max_to_keep`, as the save that left them would have.

        A process killed after a save finished but before orbax deleted the oldest step (or a
        run resumed with a smaller `max_to_keep`) leaves too many steps; no save of this run may
        follow (the run had finished), so they are removed here.
        """
        steps = sorted(self._manager.all_steps())
        for step in steps[: max(len(steps) - self.max_to_keep, 0)]:
            logging.info("Checkpointer: deleting step %d (beyond max_to_keep).", step)
            self._manager.delete(step)

    def _verify(self, step: int, restored: PyTree) -> None:
        """Raises CorruptFileError if a restored leaf's bytes differ from those saved."""
        try:
            custom = self._manager.metadata(step).custom_metadata or {}
        except Exception as e:  # noqa: BLE001 - unreadable step metadata is a broken step
            raise tensorfile.CorruptFileError(
                f"reading the step metadata raised {type(e).__name__}: {_first_line(e)}"
            ) from e
        expected = custom.get(_DIGESTS)
        if expected is None:
            logging.info("Checkpointer: step %d has no leaf digests; restored unverified.", step)
            return
        saved_dtypes = custom.get(_DTYPES, {})
        # Leaves without a digest at save (sharded across processes, python scalars) or
        # restored as another dtype cannot be compared; the others must all match.
        actual = {
            name: leaf
            for name, leaf in _host_leaves(restored).items()
            if name in expected and saved_dtypes.get(name) == str(leaf.dtype)
        }
        tensorfile.verify(actual, {name: expected[name] for name in actual}, where=f"step {step}")

    def _quarantine_unfinished_saves(self) -> None:
        """Moves folders of saves that never finished (orbax temporary folders) aside."""
        # Only the primary process looks and moves, so all processes pass one barrier.
        if jax.process_index() == 0 and self.directory.exists():
            for path in sorted(self.directory.iterdir()):
                if _TMP_MARKER in path.name:
                    self._move_aside(path, "unfinished save (orbax temporary folder)")
        ocp.multihost.sync_global_processes(f"ftlab_checkpoint_tmp_{next(_barrier_ids)}")

    def _quarantine(self, path: epath.Path, problem: str) -> None:
        """Moves a broken step folder aside; every process calls it for the same steps."""
        if jax.process_index() == 0:
            self._move_aside(path, problem)
        else:
            logging.warning("Checkpointer: skipping %s: %s.", path, problem)
        ocp.multihost.sync_global_processes(f"ftlab_checkpoint_step_{next(_barrier_ids)}")

    def _move_aside(self, path: epath.Path, problem: str) -> None:
        destination = _free_name(self.directory / QUARANTINE, path.name)
        logging.warning(
            "Checkpointer: skipping %s: %s. Moving it to %s.",
            path,
            problem.rstrip("."),
            destination,
        )
        destination.parent.mkdir(parents=True, exist_ok=True)
        path.rename(destination)


def _silence_orbax_stragglers() -> None:
    """Drops the notices of orbax's work left behind by a failed restore or save.

    Orbax runs a restore in its own asyncio loop and closes it at the first failed read; the
    TensorStore reads of the other arrays still finish and call back into the closed loop from
    their threads. Each such callback raised `RuntimeError('Event loop is closed')` into
    `sys.unraisablehook`, which printed one traceback per array (hundreds per broken step)
    after the restore had already fallen back correctly. Likewise a failed save leaves write
    coroutines that are collected while the interpreter shuts down, each printing an unrelated
    `ImportError`. The error itself is reported once (a warning, or CheckpointSaveError). This
    hook drops exactly those two kinds and passes every other unraisable exception on.
    """
    global _unraisable_filter_installed
    if _unraisable_filter_installed:
        return
    _unraisable_filter_installed = True
    previous = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        if (
            isinstance(error, ImportError)
            and "Python is likely shutting down" in str(error)
            and inspect.iscoroutine(unraisable.object)
        ):
            return
        previous(unraisable)

    sys.unraisablehook = hook


_unraisable_filter_installed = False


def _abstract(leaf):
    """Concrete jax arrays become ShapeDtypeStructs that keep their sharding."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


def _path_name(path) -> str:
    """`(GetAttrKey('opt'), SequenceKey(0), DictKey('mu'))` -> `opt/0/mu`."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _leaf_shape(leaf) -> tuple | None:
    if not hasattr(leaf, "shape"):
        return None
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
        # Orbax stores typed PRNG keys as their raw key data, e.g. shape () -> (2,).
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)


def _shapes_by_path(tree) -> dict[str, tuple | None]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(path): _leaf_shape(leaf) for path, leaf in leaves}


def _check_matches(saved: PyTree, target: PyTree, step_dir: epath.Path) -> None:
    """Raises CheckpointMismatchError if leaf paths or shapes differ."""
    # Orbax raises the same ValueError for a changed model as for a corrupt file; telling them
    # apart here keeps a config change from quarantining every good checkpoint.
    on_disk, wanted = _shapes_by_path(saved), _shapes_by_path(target)
    only_disk = sorted(set(on_disk) - set(wanted))
    only_target = sorted(set(wanted) - set(on_disk))
    shapes = [
        f"{name}: checkpoint {on_disk[name]} vs target {wanted[name]}"
        for name in sorted(set(on_disk) & set(wanted))
        if None not in (on_disk[name], wanted[name]) and on_disk[name] != wanted[name]
    ]
    if not (only_disk or only_target or shapes):
        return
    lines = []
    if only_disk:
        lines.append(f"only in the checkpoint: {', '.join(only_disk[:10])}")
    if only_target:
        lines.append(f"only in the restore target: {', '.join(only_target[:10])}")
    if shapes:
        lines.append("shape differs: " + "; ".join(shapes[:10]))
    raise CheckpointMismatchError(
        f"Checkpoint {step_dir} does not match the state to restore into:\n  "
        + "\n  ".join(lines)
        + "\nThe model or optimizer config changed since it was saved: restore with the "
        "config it was saved with, or use a fresh workdir."
    )


def _agree_across_processes(problem: str | None) -> str | None:
    """In a multi-process job a step counts as broken if it is broken for any process."""
    # A checkpoint damaged only in the shards one process reads must not leave the processes
    # restoring different steps. (Orbax's own post-restore barrier may time out first.)
    if jax.process_count() == 1:
        return problem
    failed = multihost_utils.process_allgather(np.array([problem is not None], np.int32))
    if problem is None and np.any(failed):
        return "restore failed on another process (see its log)"
    return problem


def _free_name(folder: epath.Path, name: str) -> epath.Path:
    """`folder/name`, or `folder/name.1`, `.2`, ... if that is taken (nothing is overwritten)."""
    candidate, i = folder / name, 0
    while candidate.exists():
        i += 1
        candidate = folder / f"{name}.{i}"
    return candidate


def _host_leaves(tree: PyTree) -> dict[str, np.ndarray]:
    """``{leaf path: host array}`` of the leaves this process holds whole."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat = {}
    for path, leaf in leaves:
        if isinstance(leaf, jax.Array):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            if not leaf.is_fully_addressable:
                if not leaf.is_fully_replicated:
                    continue
                leaf = leaf.addressable_data(0)
        if isinstance(leaf, (jax.Array, np.ndarray)):
            flat[_path_name(path)] = np.asarray(leaf)
    return flat


def _leaf_digests(tree: PyTree) -> dict[str, dict[str, str]]:
    """The step's custom metadata: each array leaf's sha256 and dtype."""
    flat = _host_leaves(tree)
    return {
        _DIGESTS: tensorfile.digests(flat),
        _DTYPES: {name: str(array.dtype) for name, array in flat.items()},
    }


def _describe(error: BaseException) -> str:
    """``Type: first line`` of the innermost cause, which names the damaged file.

    Orbax wraps TensorStore's error ('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database at
    local file "...") in one whose first line ends inside a dump of the TensorStore spec.
    """
    while (error.__cause__ or error.__context__) is not None and str(
        error.__cause__ or error.__context__
    ).strip():
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    # Not cut at a length: the first line names the damaged file. TensorStore's spec dump (a
    # line of JSON that repeats the folder) is left out.
    text = str(error).strip()
    line = text.splitlines()[0] if text else repr(error)
    return re.sub(r" ?\[tensorstore_spec='.*?'\]", "", line)
