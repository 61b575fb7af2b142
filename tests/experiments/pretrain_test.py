"""End to end: the pretraining transfer experiment's quick config writes its table, plot and
metrics, with every (method, mode, label fraction) cell measured for every seed."""

import json
import shutil

import numpy as np
import pytest

from configs import pretrain_digits
from experiments.trainers import pretrain as trainer
from ftlab.core import metrics as metrics_lib


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain")
    config = pretrain_digits.get_config("quick,seeds=2")
    return workdir, trainer.train_and_evaluate(config, str(workdir))


def test_quick_run_writes_table_plot_and_metrics(run):
    workdir, results = run
    assert json.loads((workdir / "results.json").read_text()) == results
    rows = results["rows"]
    cells = {(r["method"], r["mode"], r["fraction"]) for r in rows}
    assert cells == {
        (m, mode, f) for m in trainer.METHODS for mode in trainer.MODES for f in (0.01, 1.0)
    }
    # 1%: one label per class (139-146 train images each); 100%: all 1,438.
    assert {r["fraction"]: r["labels"] for r in rows} == {0.01: 10, 1.0: 1438}
    for r in rows:
        assert len(r["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for a in r["accuracy"])
        assert r["accuracy_mean"] == pytest.approx(np.mean(r["accuracy"]))
        assert r["accuracy_std"] == pytest.approx(np.std(r["accuracy"]))
    table = (workdir / "results.md").read_text().splitlines()
    assert len(table) == 2 + len(trainer.METHODS) * len(trainer.MODES)
    assert table[0] == "| method | mode | 1% labels | 100% labels |"
    assert (workdir / "transfer.png").stat().st_size > 10_000
    assert (workdir / "plots" / "pretrain.png").stat().st_size > 10_000
    names = set().union(*metrics_lib.read_jsonl(workdir / "metrics.jsonl"))
    for method in ("layerwise", "rotation", "contrastive"):
        assert f"pretrain/{method}/loss" in names
    assert results["pretext"]["none"]["final_loss_mean"] is None


def test_rerun_after_an_interruption_skips_finished_runs(run, tmp_path):
    workdir, results = run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    # As if the run died during the last (seed, method) run.
    last = tmp_path / "finished" / "seed1_contrastive.json"
    last.unlink()
    kept = (tmp_path / "finished" / "seed0_layerwise.json").stat().st_mtime_ns
    lines_before = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    again = trainer.train_and_evaluate(pretrain_digits.get_config("quick,seeds=2"), str(tmp_path))
    assert last.exists()
    assert (tmp_path / "finished" / "seed0_layerwise.json").stat().st_mtime_ns == kept
    untimed = ("wall_s", "pretext")
    assert {k: v for k, v in again.items() if k not in untimed} == {
        k: v for k, v in results.items() if k not in untimed
    }
    assert metrics_lib.read_jsonl(tmp_path / "metrics.jsonl") == lines_before


def test_unknown_method_is_named(tmp_path):
    config = pretrain_digits.get_config("quick")
    config.methods = ("none", "jigsaw")
    with pytest.raises(ValueError, match="config.methods: unknown method 'jigsaw'"):
        trainer.train_and_evaluate(config, str(tmp_path))


def test_nan_pretext_loss_stops_naming_the_step(tmp_path, monkeypatch):
    from ftlab.pretrain import ssl

    rotation_loss = ssl.rotation_loss

    def poisoned(params, batch, rng):
        loss, aux = rotation_loss(params, batch, rng)
        return loss * np.nan, aux

    monkeypatch.setattr(ssl, "rotation_loss", poisoned)
    config = pretrain_digits.get_config("quick")
    config.seeds, config.methods = (0,), ("rotation",)
    with pytest.raises(metrics_lib.NonFiniteMetricError, match=r"train/loss=nan at step 1\b"):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert not list((tmp_path / "finished").glob("*.json"))
    assert not (tmp_path / "results.json").exists()
