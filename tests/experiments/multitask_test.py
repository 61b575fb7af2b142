"""End to end: the multi-task trainer's quick configs write their table, plot and metrics, and
soft sharing at lambda = 0 is exactly independent training."""

import json
import shutil

import jax
import numpy as np
import pytest

from configs import multitask_nlschools, multitask_yeast
from experiments.trainers import multitask as trainer
from ftlab import multitask
from ftlab.core import metrics as metrics_lib
from ftlab.data import multitask as multitask_data


def _yeast_config():
    config = multitask_yeast.get_config("quick")
    config.methods = ("independent", "soft")
    config.multitask.lambdas = (0.0,)
    return config


@pytest.fixture(scope="module")
def yeast_run(tmp_path_factory):
    config = _yeast_config()
    workdir = tmp_path_factory.mktemp("yeast")
    return workdir, trainer.train_and_evaluate(config, str(workdir))


def test_quick_run_writes_table_plot_metrics_and_results(yeast_run):
    workdir, out = yeast_run
    assert json.loads((workdir / "results.json").read_text()) == out
    assert out["task_names"] == ["Class1", "Class2", "Class3"]
    assert list(out["methods"]) == ["independent", "soft_lam0", "constant"]
    table = (workdir / "results.md").read_text()
    assert "| method | Class1 | Class2 | Class3 | mean accuracy | mean f1 |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and rows[2].startswith("| soft_lam0 |")  # header + 2 methods + constant
    assert (workdir / "per_task.png").stat().st_size > 1000
    assert (workdir / "train.png").stat().st_size > 1000
    lines = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    assert [x["step"] for x in lines if "train/independent/loss" in x] == [2, 4]
    assert [x["train/soft_lam0/penalty"] for x in lines if "train/soft_lam0/loss" in x] == [0, 0]
    for r in out["methods"].values():
        assert all(0 <= a <= 1 for a in r["per_task"]["accuracy"] + r["per_task"]["f1"])
    # The reference row predicts each task's train majority class: here always "negative".
    test_y = multitask_data.load_yeast().test.y[:3]
    np.testing.assert_allclose(
        out["methods"]["constant"]["per_task"]["accuracy"], 1 - test_y.mean(axis=1), rtol=1e-6
    )
    assert out["methods"]["constant"]["per_task"]["f1"] == [0.0, 0.0, 0.0]


def test_rerun_after_an_interruption_trains_only_the_unfinished_method(yeast_run, tmp_path):
    workdir, out = yeast_run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    # As if the run died while training soft_lam0: no record of it, a partial metric line.
    (tmp_path / "finished" / "soft_lam0.json").unlink()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "train/soft_lam0/loss": 9.0}) + "\n")
    kept = (tmp_path / "finished" / "independent.json").stat().st_mtime_ns
    again = trainer.train_and_evaluate(_yeast_config(), str(tmp_path))

    def untimed(o):
        return {k: {m: v for m, v in r.items() if m != "train_s"} for k, r in o["methods"].items()}

    assert untimed(again) == untimed(out)
    assert (tmp_path / "finished" / "independent.json").stat().st_mtime_ns == kept
    lines = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert [x["step"] for x in lines if "train/soft_lam0/loss" in x] == [2, 4]
    assert [x["step"] for x in lines if "train/independent/loss" in x] == [2, 4]
    # Another config in the same workdir is refused, naming the record.
    other = _yeast_config()
    other.optim.lr *= 2
    with pytest.raises(ValueError, match="independent.json was run with a different config"):
        trainer.train_and_evaluate(other, str(tmp_path))


def test_soft_sharing_at_lambda_zero_equals_independent_models(yeast_run):
    # Same initialisation, same minibatches, and a penalty whose gradient is exactly zero.
    _, out = yeast_run
    soft, independent = out["methods"]["soft_lam0"], out["methods"]["independent"]
    assert soft["per_task"] == independent["per_task"] and soft["mean"] == independent["mean"]


def test_nlschools_quick_run_counts_every_pupil_of_every_class_once(tmp_path):
    config = multitask_nlschools.get_config("quick")
    config.methods = ("hard_uncertainty",)
    out = trainer.train_and_evaluate(config, str(tmp_path))
    counts = np.asarray(out["test_counts"])
    assert len(counts) == 5 and counts.min() >= 1 and len(set(counts.tolist())) > 1
    r = out["methods"]["hard_uncertainty"]
    mse = np.asarray(r["per_task"]["mse"])
    np.testing.assert_allclose(r["mean"]["mse"], mse.mean(), rtol=1e-6)
    np.testing.assert_allclose(r["mean"]["pooled_mse"], (mse * counts).sum() / counts.sum())
    # trunk (4 -> 4) shared; a head (4 -> 1) and a log-variance per class
    assert r["trainable_params"] == (4 * 4 + 4) + 5 * (4 + 1) + 5
    assert len(r["log_var"]) == 5 and any(v != 0 for v in r["log_var"])


def test_classification_metrics_against_hand_counts():
    y = np.array([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.float32)
    pred = np.array([[2.0, -1.0, 3.0, -2.0, 5.0], [-1.0, -1.0, -1.0, 9.0, 9.0]])
    r = multitask.task_metrics("classification", pred, y, mask)
    # task 0: TP 1, FN 1, FP 1, TN 1 (row 4 is padding); task 1: 3 true negatives, no positives.
    assert r["per_task"] == {"accuracy": [0.5, 1.0], "f1": [0.5, 0.0]}


def test_unknown_method_is_named():
    config = multitask_yeast.get_config("quick")
    config.methods = ("hard", "soft")
    with pytest.raises(ValueError, match=r"config.methods: unknown method 'hard'"):
        trainer.method_runs(config)


def test_minibatches_draw_only_real_rows_of_each_task():
    counts = [3, 1, 5]
    x = np.full((3, 5, 1), -1.0, np.float32)  # -1 marks padding
    mask = np.zeros((3, 5), np.float32)
    for t, n in enumerate(counts):
        x[t, :n, 0] = 10 * t + np.arange(n)
        mask[t, :n] = 1
    sample = jax.jit(multitask.sampler({"x": x, "y": x[..., 0], "mask": mask}, 64))
    batch = jax.device_get(sample(jax.random.PRNGKey(0)))
    assert batch["x"].shape == (3, 64, 1) and np.all(batch["mask"] == 1)
    np.testing.assert_array_equal(batch["x"][..., 0], batch["y"])  # rows stay whole
    for t, n in enumerate(counts):
        assert set(batch["y"][t].tolist()) == {10.0 * t + i for i in range(n)}


def test_one_lora_per_task_on_text_keeps_the_encoder_and_counts_its_leaves(tmp_path):
    # The Rotten Tomatoes path on a random 2-layer BERT: LoRA + head per task vs one shared LoRA.
    from configs import multitask_rotten_tomatoes

    config = multitask_rotten_tomatoes.get_config("tiny")
    out = trainer.train_and_evaluate(config, str(tmp_path))
    assert out["task_names"] == ["sentiment", "subjectivity"]
    assert out["test_counts"] == [24, 24]
    per_task, shared = out["methods"]["lora_per_task"], out["methods"]["lora_shared"]
    assert per_task["frozen_bit_identical"] and shared["frozen_bit_identical"]
    # per task: T x (LoRA + head); shared: LoRA + T x head, with T = 2 tasks. The tiny BERT has
    # width 16 and 2 layers: LoRA on query and value is 2 x 2 x rank x (16 + 16), a head 16 x 2 + 2.
    lora_params, head_params = 2 * 2 * config.peft.rank * (16 + 16), 16 * 2 + 2
    assert per_task["trainable_params"] == 2 * (lora_params + head_params)
    assert shared["trainable_params"] == lora_params + 2 * head_params
    for r in (per_task, shared):
        assert all(0 <= a <= 1 for a in r["per_task"]["accuracy"])
    table = (tmp_path / "results.md").read_text()
    assert "| lora_per_task |" in table and "| lora_shared |" in table
    assert (tmp_path / "per_task.png").stat().st_size > 1000


def test_nan_loss_stops_naming_the_step(tmp_path, monkeypatch):
    import jax.numpy as jnp

    per_example = multitask.per_example_loss

    def poisoned(kind, pred, y):
        return per_example(kind, pred, y) * jnp.nan

    monkeypatch.setattr(multitask, "per_example_loss", poisoned)
    config = _yeast_config()
    config.methods = ("independent",)
    with pytest.raises(metrics_lib.NonFiniteMetricError, match=r"loss=nan.* at step 1\b"):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert not list((tmp_path / "finished").glob("*.json"))
    assert not (tmp_path / "results.json").exists()
