"""End to end: the recurrent transfer experiment's quick config writes its table, plot and
samples, each method trains what it says, and a rerun skips the finished methods."""

import json
import shutil

import pytest

from configs import rnn_transfer
from experiments import schema
from experiments.trainers import rnn_transfer as trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rnn")
    config = rnn_transfer.get_config("quick")
    schema.validate(config)
    return workdir, trainer.train_and_evaluate(config, str(workdir))


def test_quick_run_writes_table_plot_and_samples(run):
    workdir, results = run
    assert json.loads((workdir / "results.json").read_text()) == results
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["pretrained", *trainer.METHODS]
    for r in rows.values():
        assert 0.0 < r["target_bpc"] < 9.0 and 0.0 < r["source_bpc"] < 9.0
    # embed 256x8, GRU 3x(8x16 + 16 + 16x16) + bias of hn 16, head 16x256 + 256
    full = 256 * 8 + 3 * (8 * 16 + 16 + 16 * 16) + 16 + 16 * 256 + 256
    assert rows["scratch"]["trainable"] == rows["full"]["trainable"] == full
    assert rows["head"]["trainable"] == 16 * 256 + 256
    # rank 2 on hr, hz, hn [16, 16] and the head [16, 256]
    assert rows["lora"]["trainable"] == 3 * 2 * (16 + 16) + 2 * (16 + 256)
    table = (workdir / "results.md").read_text().splitlines()
    assert (
        table[0]
        == "| method | trainable | rt_reviews test bits/byte | rt_plot test bits/byte | train s |"
    )
    assert len(table) == 2 + 1 + len(trainer.METHODS)
    assert (workdir / "transfer.png").stat().st_size > 10_000
    samples = (workdir / "samples.md").read_text()
    assert samples.startswith(f"prompt: {results['prompt']!r}") and "lora: " in samples
    assert all(len(s) > 0 for s in results["samples"].values())


def test_rerun_skips_the_finished_methods(run, tmp_path):
    workdir, results = run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "finished" / "head.json").unlink()  # as if it died while adapting the head
    kept = (tmp_path / "finished" / "lora.json").stat().st_mtime_ns
    again = trainer.train_and_evaluate(rnn_transfer.get_config("quick"), str(tmp_path))
    assert (tmp_path / "finished" / "lora.json").stat().st_mtime_ns == kept
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    # the pretrained model comes back from its checkpoint, so the head's rerun is the same
    assert drop(again["rows"]) == drop(results["rows"])


def test_a_method_without_learning_rate_is_named(tmp_path):
    config = rnn_transfer.get_config("quick")
    del config.optim.lr["head"]
    with pytest.raises(ValueError, match="config.optim.lr has no learning rate for method 'head'"):
        trainer.train_and_evaluate(config, str(tmp_path))
