"""End to end: the GCN transfer experiment's quick config writes its table and plot, and a
rerun skips the finished seeds."""

import json
import shutil

import pytest

from configs import gcn_transfer
from experiments import schema
from experiments.trainers import gcn_transfer as trainer


def _config():
    config = gcn_transfer.get_config("quick,seeds=2,sparse")
    config.data.labels_per_class = (3,)
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gcn")
    schema.validate(_config())
    return workdir, trainer.train_and_evaluate(_config(), str(workdir))


def test_quick_run_writes_table_and_plot(run):
    workdir, results = run
    assert json.loads((workdir / "results.json").read_text()) == results
    assert (results["nodes"], results["edges"]) == (209, 5559)
    cells = {(r["method"], r["labels_per_class"], r["labels"]) for r in results["rows"]}
    # 3 labels of each of the 4 cell types
    assert cells == {(m, 3, 12) for m in trainer.METHODS}
    for r in results["rows"]:
        assert len(r["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for a in r["accuracy"])
    table = (workdir / "results.md").read_text().splitlines()
    assert table[0] == "| method | 3/class |" and len(table) == 2 + len(trainer.METHODS)
    assert (workdir / "transfer.png").stat().st_size > 10_000


def test_rerun_skips_finished_seeds(run, tmp_path):
    workdir, results = run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "finished" / "seed1.json").unlink()
    kept = (tmp_path / "finished" / "seed0.json").stat().st_mtime_ns
    again = trainer.train_and_evaluate(_config(), str(tmp_path))
    assert (tmp_path / "finished" / "seed0.json").stat().st_mtime_ns == kept
    assert again["rows"] == results["rows"]


def test_unknown_method_is_named(tmp_path):
    config = _config()
    config.methods = ("scratch", "node2vec")
    with pytest.raises(ValueError, match="config.methods: unknown method 'node2vec'"):
        trainer.train_and_evaluate(config, str(tmp_path))
