"""Tests for ftlab.core.checkpoint: round trips, retention, and resuming past broken steps."""

import logging
import shutil

import chex
import flax
import jax
import jax.numpy as jnp
import optax
import pytest

from ftlab.core import checkpoint


@flax.struct.dataclass
class TrainState:
    params: dict
    opt_state: optax.OptState
    step: jax.Array


_TX = optax.adam(1e-2)


def _state(value: float, rows: int = 2) -> TrainState:
    params = {"dense": {"kernel": jnp.full((rows, 3), value), "bias": jnp.zeros((3,))}}
    opt_state = _TX.init(params)
    # One real update, so mu/nu/count hold values a broken restore would not reproduce.
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = _TX.update(grads, opt_state, params)
    return TrainState(params, opt_state, jnp.array(int(value * 10), jnp.int32))


def _abstract(state: TrainState) -> TrainState:
    return jax.eval_shape(lambda: state)


def _data_files(step_dir):
    """The OCDBT data files of a saved step (small arrays are stored inline in them)."""
    files = sorted(p for p in (step_dir / "default" / "d").iterdir() if p.is_file())
    assert files, f"no data files under {step_dir}"
    return files


def _truncate(step_dir):
    for path in _data_files(step_dir):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def _flip(step_dir):
    for path in _data_files(step_dir):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


def _drop_metadata(step_dir):
    (step_dir / "default" / "_METADATA").unlink()


# When TensorStore fails one read of a damaged checkpoint, orbax's event loop closes while
# sibling reads still complete; their callbacks raised "Event loop is closed" in a thread, one
# traceback each, at times during a later test. The Checkpointer drops exactly those: any that
# gets through, in any test of this module, fails it.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def _save_all(directory, states: dict[int, TrainState], **kwargs) -> None:
    with checkpoint.Checkpointer(directory, save_every_steps=1, **kwargs) as ckpt:
        for step, state in states.items():
            assert ckpt.save(step, state)


def test_round_trip_keeps_types_and_values(tmp_path):
    state = _state(0.5)
    _save_all(tmp_path, {3: state})

    with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        restored, step = ckpt.restore_latest(_abstract(state))
        assert step == 3
        chex.assert_trees_all_equal(restored, state)
        assert type(restored) is TrainState
        assert jax.tree.structure(restored) == jax.tree.structure(state)
        assert type(restored.opt_state[0]) is optax.ScaleByAdamState
        # Concrete arrays work as the target too, and keep their sharding.
        restored, _ = ckpt.restore_latest(_state(0.0))
        chex.assert_trees_all_equal(restored, state)
        assert restored.step.sharding == state.step.sharding


def test_round_trip_of_typed_prng_key(tmp_path):
    state = {"rng": jax.random.key(7), "w": jnp.ones((2,))}
    _save_all(tmp_path, {1: state})
    with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        restored, _ = ckpt.restore_latest(jax.eval_shape(lambda: state))
    assert restored["rng"].dtype == state["rng"].dtype
    chex.assert_trees_all_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"])
    )


def test_keeps_the_newest_max_to_keep_steps(tmp_path):
    _save_all(tmp_path, {s: _state(s / 10) for s in range(1, 6)}, max_to_keep=2)
    with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        assert ckpt.all_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]


def test_saves_only_every_n_steps_unless_forced(tmp_path):
    state = _state(0.1)
    with checkpoint.Checkpointer(tmp_path, save_every_steps=5, max_to_keep=10) as ckpt:
        saved = [step for step in range(1, 13) if ckpt.save(step, state)]
        assert saved == [5, 10]
        assert ckpt.should_save(15) and not ckpt.should_save(16)
        assert ckpt.save(12, state, force=True)
        assert not ckpt.save(12, state, force=True)  # already on disk: not saved twice
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [5, 10, 12]
        assert ckpt.latest_step() == 12


def test_nothing_saved_returns_none(tmp_path):
    with checkpoint.Checkpointer(tmp_path / "new", save_every_steps=1) as ckpt:
        assert ckpt.restore_latest(_abstract(_state(0.0))) is None
        assert ckpt.latest_step() is None


@pytest.mark.parametrize(
    "breakage, reason",
    [
        (_empty, "empty step folder"),
        (_drop_metadata, "half-written"),
        (_truncate, "corrupt"),
        (_flip, "corrupt"),
    ],
)
def test_broken_newest_step_is_quarantined_and_older_restored(tmp_path, caplog, breakage, reason):
    good, newer = _state(0.1), _state(0.2)
    _save_all(tmp_path, {1: good, 7: newer})
    breakage(tmp_path / "7")

    with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        with caplog.at_level(logging.WARNING):
            restored, step = ckpt.restore_latest(_abstract(good))
        assert step == 1
        chex.assert_trees_all_equal(restored, good)
        assert (tmp_path / "quarantine" / "7").is_dir()
        assert not (tmp_path / "7").exists()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(str(tmp_path / "7") in w and reason in w for w in warnings), warnings

        # Training goes on: the same step number can be written again, and later ones.
        assert ckpt.save(7, newer)
        assert ckpt.save(8, newer)
        ckpt.wait_until_finished()
        restored, step = ckpt.restore_latest(_abstract(good))
        assert step == 8
        chex.assert_trees_all_equal(restored, newer)


def test_truncated_array_data_falls_back(tmp_path, caplog):
    # Big enough that the array is stored in its own data file, not inline in the index.
    state = {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64)}
    _save_all(tmp_path, {1: state, 2: state})
    bulk = max((tmp_path / "2").rglob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
    bulk.write_bytes(bulk.read_bytes()[:1000])

    with (
        checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt,
        caplog.at_level(logging.WARNING),
    ):
        restored, step = ckpt.restore_latest(jax.eval_shape(lambda: state))
    assert step == 1
    chex.assert_trees_all_equal(restored, state)
    assert any("restore raised" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "quarantine" / "2").is_dir()


def test_unfinished_save_folder_is_moved_aside(tmp_path):
    good = _state(0.1)
    _save_all(tmp_path, {2: good})
    unfinished = tmp_path / "9.orbax-checkpoint-tmp-1234"
    unfinished.mkdir()
    (unfinished / "partial").write_bytes(b"\0" * 8)

    with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        _, step = ckpt.restore_latest(_abstract(good))
    assert step == 2
    assert (tmp_path / "quarantine" / unfinished.name / "partial").exists()
    assert not unfinished.exists()


def test_all_broken_raises_naming_every_folder(tmp_path):
    _save_all(tmp_path, {1: _state(0.1), 2: _state(0.2)})
    _flip(tmp_path / "1")
    _empty(tmp_path / "2")

    with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        with pytest.raises(checkpoint.CheckpointRestoreError) as error:
            ckpt.restore_latest(_abstract(_state(0.0)))
        message = str(error.value)
        assert str(tmp_path / "1") in message and str(tmp_path / "2") in message
        assert "empty step folder" in message and "corrupt" in message
        assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == ["1", "2"]
        # A second attempt finds nothing left and starts from scratch; quarantine is kept.
        assert ckpt.restore_latest(_abstract(_state(0.0))) is None
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == ["1", "2"]


def test_changed_model_raises_mismatch_and_moves_nothing(tmp_path):
    _save_all(tmp_path, {4: _state(0.1, rows=2)})
    mismatch = pytest.raises(checkpoint.CheckpointMismatchError, match=r"params/dense/kernel")
    with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt, mismatch:
        ckpt.restore_latest(_abstract(_state(0.1, rows=5)))
    assert (tmp_path / "4").is_dir()
    assert not (tmp_path / "quarantine").exists()


def test_rejects_bad_save_interval(tmp_path):
    with pytest.raises(ValueError, match="save_every_steps"):
        checkpoint.Checkpointer(tmp_path, save_every_steps=0)


def test_train_state_collections_survive_save_and_restore(tmp_path):
    """ftlab's TrainState: batch_stats (updated and frozen ones) round-trip with the parameters."""
    from ftlab.core import train

    params = {"dense": {"kernel": jnp.full((2, 3), 0.5), "bias": jnp.zeros((3,))}}
    stats = {"batch_stats": {"bn": {"mean": jnp.arange(3.0), "var": jnp.full((3,), 2.0)}}}
    labels = {"dense": {"kernel": "train", "bias": "frozen"}}
    stat_labels = {"batch_stats": {"bn": {"mean": "train", "var": "frozen"}}}
    state = train.init_state(
        params, labels, _TX, seed=0, collections=stats, collection_labels=stat_labels
    )
    state = state.replace(
        collections={
            "batch_stats": {"bn": {"mean": jnp.ones(3), "var": stats["batch_stats"]["bn"]["var"]}}
        }
    )
    fresh = train.init_state(
        params, labels, _TX, seed=1, collections=stats, collection_labels=stat_labels
    )
    _save_all(tmp_path, {7: state.checkpointable()})
    with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        restored, step = ckpt.restore_latest(fresh.checkpointable())
    assert step == 7 and restored.fixed == ("batch_stats/bn/var",)
    chex.assert_trees_all_equal(restored.collections, state.collections)
    chex.assert_trees_all_equal(restored.replace(frozen=state.frozen), state)


def test_flipped_byte_inside_a_large_array_falls_back_naming_the_leaf(tmp_path, caplog):
    # A chunk of raw array bytes carries no checksum of its own in orbax/TensorStore: without
    # the per-leaf digests this restored step 2 with one wrong value and no warning.
    good = {"emb": jax.random.normal(jax.random.key(0), (64, 64)), "b": jnp.ones(3)}
    newer = {"emb": good["emb"] + 1, "b": good["b"]}
    _save_all(tmp_path, {1: good, 2: newer})
    # The array's one chunk is the biggest data file (blosc-shuffled, so its raw bytes do not
    # appear as such); a byte in its middle is array data, not framing.
    bulk = max((tmp_path / "2").rglob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
    assert bulk.stat().st_size > 8000
    data = bytearray(bulk.read_bytes())
    data[len(data) // 2] ^= 0x01
    bulk.write_bytes(bytes(data))

    with (
        checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt,
        caplog.at_level(logging.WARNING),
    ):
        restored, step = ckpt.restore_latest(jax.eval_shape(lambda: good))
    assert step == 1
    chex.assert_trees_all_equal(restored, good)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'emb'" in w and "corrupt" in w and str(tmp_path / "2") in w for w in warnings)
    assert all("\n" not in w for w in warnings)
    assert (tmp_path / "quarantine" / "2").is_dir()


def test_steps_beyond_max_to_keep_left_by_a_crash_are_removed_on_restore(tmp_path):
    # A process killed after a save finished but before orbax removed the oldest step
    # leaves one step too many; the next restore applies max_to_keep.
    _save_all(tmp_path, {s: _state(s / 10) for s in (1, 2, 3)}, max_to_keep=3)
    with checkpoint.Checkpointer(tmp_path, save_every_steps=1, max_to_keep=2) as ckpt:
        _, step = ckpt.restore_latest(_abstract(_state(0.0)))
        assert step == 3 and ckpt.all_steps() == [2, 3]


def test_a_failed_save_is_one_error_naming_the_step_and_what_was_kept(tmp_path, monkeypatch):
    ckpt = checkpoint.Checkpointer(tmp_path, save_every_steps=1)
    assert ckpt.save(1, _state(0.1))

    def full_disk(*args, **kwargs):
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": No space left on device')

    monkeypatch.setattr(ckpt._manager, "save", full_disk)
    with pytest.raises(
        checkpoint.CheckpointSaveError,
        match=r"saving checkpoint step 2 to .* failed: ValueError: RESOURCE_EXHAUSTED: .*"
        r"No space left on device; steps kept on disk: \[1\]$",
    ):
        ckpt.save(2, _state(0.2))
    ckpt.close()  # reported once: closing does not raise it again


def test_a_leaf_restored_as_another_dtype_is_not_taken_for_corruption(tmp_path):
    state = {"w": jnp.linspace(0.0, 1.0, 6, dtype=jnp.float32), "n": jnp.array(3, jnp.int32)}
    _save_all(tmp_path, {1: state})
    target = {"w": jax.ShapeDtypeStruct((6,), jnp.bfloat16), "n": state["n"]}
    with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        restored, step = ckpt.restore_latest(target)
    assert step == 1 and restored["w"].dtype == jnp.bfloat16
    assert not (tmp_path / "quarantine").exists()
