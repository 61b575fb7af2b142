"""experiments/finished.py: records of finished runs, and the metric lines kept."""

import json

import ml_collections
import pytest

from experiments import finished
from ftlab.core import metrics as metrics_lib


def _runs(tmp_path, lr=0.1):
    config = ml_collections.ConfigDict({"lr": lr})
    return finished.Runs(tmp_path, metric_prefix=lambda n: f"train/{n}/", config=config)


def test_put_get_and_the_lines_kept(tmp_path):
    runs = _runs(tmp_path)
    assert runs.get("a") is None and runs.names() == []
    with runs.open_writer() as w:
        w.write(1, {"train/a/loss": 1.0})
        w.write(1, {"train/b/loss": 2.0})
    runs.put("a", {"acc": 0.5})
    assert runs.get("a") == {"acc": 0.5} and runs.names() == ["a"]
    # b did not finish: its line goes, a's stays; new lines append
    with runs.open_writer() as w:
        w.write(2, {"train/b/loss": 3.0})
    lines = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert lines == [{"step": 1, "train/a/loss": 1.0}, {"step": 2, "train/b/loss": 3.0}]
    assert json.loads((tmp_path / "finished" / "a.json").read_text())["config"] == {"lr": 0.1}


def test_nothing_finished_starts_the_metrics_afresh(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/a/loss": 1.0}\n')
    _runs(tmp_path).open_writer().close()
    assert metrics_lib.read_jsonl(tmp_path / "metrics.jsonl") == []


def test_errors_name_the_run_or_the_file(tmp_path):
    _runs(tmp_path).put("a", {})
    with pytest.raises(ValueError, match=r"a\.json was run with a different config"):
        _runs(tmp_path, lr=0.2).get("a")
    with pytest.raises(ValueError, match="cannot name a file"):
        _runs(tmp_path).put("x/y", {})


def test_a_line_cut_off_by_a_crash_does_not_stop_the_rerun(tmp_path):
    runs = _runs(tmp_path)
    runs.put("a", {})
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/a/loss": 1.0}\n{"step": 2, "tr')
    runs.open_writer().close()
    assert metrics_lib.read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "train/a/loss": 1.0}]


def test_fits_of_one_key_share_one_compiled_step(tmp_path):
    """Runs of one key trace the loss once (one compilation for every seed); the trained state
    is the same as a run of its own, and another key gets its own step."""
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415

    from ftlab.core import parallel, partition, train  # noqa: PLC0415

    traced = []

    def loss_fn(params, batch, rng):
        del rng
        traced.append(1)
        return jnp.mean((params["w"] * batch["x"] - 1.0) ** 2), {}

    tx = optax.sgd(0.1)
    fits = finished.Fits(parallel.make_plan("mesh", num_devices=1), log_every=2)
    batch = {"x": jnp.arange(4.0)}

    def fit(folder, w, key):
        params = {"w": jnp.float32(w)}
        state = train.init_state(params, partition.labels(params, [(".*", "train")]), tx, seed=0)
        run = fits(tmp_path / folder, state, loss_fn, tx, lambda step: batch, num_steps=3, key=key)
        return float(run.state.params["w"]), len(run.history)

    first = fit("a", 0.5, "k")
    assert fit("b", 0.5, "k") == first and first[1] == 3
    assert len(traced) == 1
    fit("c", 0.5, "other")
    assert len(traced) == 2


def test_a_fit_hands_back_one_host_copy_of_the_state_under_pmap_as_under_a_mesh(tmp_path):
    """The trainers take ``run.state`` as it comes (no second ``plan.get_state``, which would
    cut every leaf of an unreplicated tree to its first row under pmap)."""
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415

    from ftlab.core import parallel, partition, train  # noqa: PLC0415

    def loss_fn(params, batch, rng):
        del rng
        return jnp.mean((batch["x"] @ params["w"] - 1.0) ** 2), {}

    tx, params = optax.sgd(0.1), {"w": jnp.ones((2, 3))}
    got = {}
    for mode in ("mesh", "pmap"):
        fits = finished.Fits(parallel.make_plan(mode, num_devices=1), log_every=2)
        state = train.init_state(params, partition.labels(params, [(".*", "train")]), tx, seed=0)
        run = fits(tmp_path / mode, state, loss_fn, tx, lambda step: {"x": np.ones((4, 2))},
                   num_steps=2)  # fmt: skip
        got[mode] = run.state.params["w"]
        assert isinstance(got[mode], np.ndarray) and got[mode].shape == (2, 3)
    np.testing.assert_array_equal(got["mesh"], got["pmap"])
