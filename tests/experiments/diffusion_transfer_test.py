"""End to end: the diffusion transfer experiment's quick config writes its table and sample
grids, each method trains what it says, and a rerun skips the finished methods with the same
numbers."""

import json
import shutil

import pytest

from configs import diffusion_transfer
from experiments import schema
from experiments.trainers import diffusion_transfer as trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("diffusion")
    config = diffusion_transfer.get_config("quick")
    schema.validate(config)
    return workdir, trainer.train_and_evaluate(config, str(workdir))


def test_quick_run_writes_table_and_sample_grids(run):
    workdir, results = run
    assert json.loads((workdir / "results.json").read_text()) == results
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["real images", "pretrained", *trainer.METHODS]
    for name in trainer.METHODS:
        r = rows[name]
        assert r["shots"] == 2 and 0.0 <= r["judge_accuracy"] <= 1.0
        assert r["frechet"] >= 0.0 and 0.0 < r["test_loss"] < 10.0 and r["nearest"] > 0.0
    assert rows["scratch"]["trainable"] == rows["full"]["trainable"]
    # the class embedding: a Dense from 10 one-hot classes to embed_dim 8, no bias
    assert rows["embed"]["trainable"] == 10 * 8
    # rank 2 on every Conv and Dense but the output conv, which trains in full (3x3x8 -> 1)
    assert 0 < rows["lora"]["trainable"] < rows["full"]["trainable"]
    # the embedding alone changes the held-out loss, so it trained
    assert rows["embed"]["test_loss"] != rows["pretrained"]["test_loss"]
    table = (workdir / "results.md").read_text().splitlines()
    assert table[0] == (
        "| method | shots/class | trainable | judge accuracy % | Frechet distance | nearest shot "
        "| test FM loss | train s |"
    )
    assert len(table) == 2 + 2 + len(trainer.METHODS) + 2  # a blank line, then the note
    assert table[-1].startswith("nearest shot: mean pixel L2 distance")
    for png in ("samples_2.png", "pretrain.png", "transfer.png"):
        assert (workdir / png).stat().st_size > 5_000, png


def test_rerun_skips_the_finished_methods(run, tmp_path):
    workdir, results = run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "finished" / "lora_2.json").unlink()  # as if it died while adapting with LoRA
    kept = (tmp_path / "finished" / "embed_2.json").stat().st_mtime_ns
    again = trainer.train_and_evaluate(diffusion_transfer.get_config("quick"), str(tmp_path))
    assert (tmp_path / "finished" / "embed_2.json").stat().st_mtime_ns == kept
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    # the judge and the pretrained model come back from their checkpoints: the same numbers
    assert drop(again["rows"]) == drop(results["rows"])


def test_a_method_without_learning_rate_is_named(tmp_path):
    config = diffusion_transfer.get_config("quick")
    del config.optim.lr["embed"]
    with pytest.raises(ValueError, match="config.optim.lr has no learning rate for method 'embed'"):
        trainer.train_and_evaluate(config, str(tmp_path))
