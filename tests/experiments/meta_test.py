"""End to end: the meta-learning trainer's quick config writes its results, plot and metrics,
fine-tuning lowers the held-out error, and a rerun resumes from the final checkpoint."""

import json

import numpy as np
import pytest

from configs import maml_sinusoid
from experiments.trainers import meta as trainer
from ftlab.core import metrics as metrics_lib


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("maml")
    config = maml_sinusoid.get_config("quick")
    # an evaluator chosen by name: held-out MSE after 1 fine-tuning step, at step 1
    config.evals.plugins = {
        "mid": dict(type="finetune_mse", num_steps=(1,), metric="mid", every_steps=1)
    }
    return workdir, config, trainer.train_and_evaluate(config, str(workdir))


def test_quick_maml_writes_results_plot_and_metrics(run):
    workdir, config, results = run
    assert json.loads((workdir / "results.json").read_text()) == results
    assert results["step"] == config.optim.num_steps
    assert (workdir / "adapted_curves.png").stat().st_size > 0
    lines = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3, 4]
    for k in (0, 1, 5, 10):
        assert np.isfinite(results[f"eval/mse_step_{k}"])
        assert results[f"eval/mse_step_{k}_ci95"] > 0
    # Fine-tuning on the support points lowers the held-out query error.
    assert results["eval/mse_step_1"] < results["eval/mse_step_0"]


def test_rerun_resumes_from_the_final_checkpoint(run):
    workdir, config, results = run
    again = trainer.train_and_evaluate(config, str(workdir))
    timing = ("train_seconds_this_run",)
    assert {k: v for k, v in again.items() if k not in timing} == {
        k: v for k, v in results.items() if k not in timing
    }


def test_held_out_evaluator_chosen_by_name_in_the_config(run, tmp_path):
    import pytest

    workdir, config, _ = run
    lines = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    mid = [r for r in lines if "eval/mid_step_1" in r]
    assert [r["step"] for r in mid] == [1, 2, 3]  # never the last step: the final evaluation
    assert all(r["eval/mid_step_1"] < r["eval/mid_step_0"] for r in mid)
    # the built-in evaluator's keys stay its own
    assert "eval/mid_step_5" not in mid[1] and "eval/mse_step_5" in mid[1]
    config = config.copy_and_resolve_references()
    config.evals.plugins = {"x": {"type": "finetune_mse", "shots": 3}}
    with pytest.raises(
        ValueError, match=r"^config.evals.plugins.x: .*unexpected keyword argument 'shots'$"
    ):
        trainer.train_and_evaluate(config, str(tmp_path))
    config.evals.plugins = {"x": {"type": "finetune_mse", "num_steps": ()}}
    with pytest.raises(ValueError, match=r"^config.evals.plugins.x: num_steps=\(\): expected"):
        trainer.train_and_evaluate(config, str(tmp_path))
