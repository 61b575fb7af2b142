"""End to end, one quick config of each task family: the sinusoid run writes its results, plot
and metrics, fine-tuning lowers the held-out error, and a rerun resumes from the final
checkpoint; the image run writes results, table, plot and metrics, its fine-tune baseline starts
from a fresh zero head (chance exactly) and fine-tuning beats chance; batch statistics are
transductive only with norm="batch"."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import maml_fewshot, maml_sinusoid
from experiments import loop, models
from experiments.trainers import meta as trainer
from ftlab.core import metrics as metrics_lib


# -- sinusoid regression -------------------------------------------------------------------------
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
    assert {k: v for k, v in again.items() if k not in loop.MEASURED} == {
        k: v for k, v in results.items() if k not in loop.MEASURED
    }


def test_held_out_evaluator_chosen_by_name_in_the_config(run, tmp_path):
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


# -- few-shot image classification --------------------------------------------------------------
@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fewshot_ft")
    config = maml_fewshot.get_config("quick,dataset=digits,shots=5,method=finetune")
    # an evaluator chosen by name: 10 held-out episodes at step 2, fine-tuned for 1 step
    early = dict(type="finetune_accuracy", num_tasks=10, num_steps=(1,), metric="early")
    config.evals.plugins = {"early": dict(early, every_steps=2)}
    return workdir, config, trainer.train_and_evaluate(config, str(workdir))


def test_quick_finetune_writes_results_table_plot_and_metrics(finetune_run):
    workdir, config, results = finetune_run
    assert json.loads((workdir / "results.json").read_text()) == results
    assert (workdir / "accuracy.png").stat().st_size > 0
    assert "| digits | 5-way 5-shot | finetune | 3 |" in (workdir / "results.md").read_text()
    lines = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3]
    (early,) = [r for r in lines if "eval/early_step_1" in r]
    assert early["step"] == 2 and early["eval/early_step_0"] == pytest.approx(0.2, abs=1e-6)
    assert 0.2 < early["eval/early_step_1"] <= 1 and "eval/acc_step_1" not in early
    assert results["eval/num_tasks"] == config.evals.num_tasks
    assert results["transductive"] and results["test_classes"] == 5
    # A zero 5-way head predicts class 0 for every query: exactly chance on balanced queries.
    assert results["eval/acc_step_0"] == pytest.approx(0.2, abs=1e-6)
    assert results["eval/acc_step_0_ci95"] == pytest.approx(0.0, abs=1e-6)
    # One SGD step on the support set of held-out digits is well above chance.
    assert results["eval/acc_step_1"] > 0.3
    assert results["eval/acc_step_3"] > 0.3


def test_interrupted_and_resumed_run_equals_uninterrupted(finetune_run, tmp_path):
    _, config, uninterrupted = finetune_run
    config = config.copy_and_resolve_references()
    config.max_steps_per_run = 2
    assert trainer.train_and_evaluate(config, str(tmp_path)) == {"step": 2}
    assert not (tmp_path / "results.json").exists()
    resumed = trainer.train_and_evaluate(config, str(tmp_path))
    assert {k: v for k, v in resumed.items() if k not in loop.MEASURED} == {
        k: v for k, v in uninterrupted.items() if k not in loop.MEASURED
    }
    lines = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3]


def test_summary_table_and_plot_over_runs(finetune_run, tmp_path):
    other = tmp_path / "glyphs_maml"
    other.mkdir()
    fake = {"method": "maml", "dataset": "glyphs", "synthetic": True, "shots": 1}
    fake |= {"meta_iterations": 7, "eval/acc_step_0": 0.2, "eval/acc_step_0_ci95": 0.01}
    (other / "results.json").write_text(json.dumps(fake))
    trainer.main([f"--out={tmp_path / 'all'}", str(other), str(finetune_run[0])])
    table = (tmp_path / "all" / "table.md").read_text().splitlines()
    assert table[0].startswith("| dataset | shots | method | iters | 0 steps | 1 steps | 3 steps")
    ft = finetune_run[2]
    acc1 = f"{100 * ft['eval/acc_step_1']:.1f} +- {100 * ft['eval/acc_step_1_ci95']:.1f}"
    assert table[2].startswith("| digits | 5-way 5-shot | finetune | 3 | 20.0 +- 0.0 | " + acc1)
    # A run without a step count gets "-" there.
    assert table[3] == "| glyphs (synthetic) | 5-way 1-shot | maml | 7 | 20.0 +- 1.0 | - | - |"
    assert (tmp_path / "all" / "accuracy.png").stat().st_size > 0


@pytest.mark.parametrize("kind,transductive", [("batch", True), ("instance", False)])
def test_batch_statistics_are_transductive_only_for_batch_norm(kind, transductive):
    model = models.ConvNet(ways=3, filters=4, blocks=1, norm=kind)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6))
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)["params"]
    apply = jax.jit(model.apply)
    out = apply({"params": params}, x)
    # Change the other examples of the batch; does example 0's output move?
    other = x.at[1:].multiply(3.0).at[1:].add(1.0)
    moved = not np.allclose(out[0], apply({"params": params}, other)[0], atol=1e-5)
    assert moved == transductive
    # Each example on its own equals itself in the batch iff not transductive.
    alone = apply({"params": params}, x[:1])[0]
    assert np.allclose(alone, out[0], atol=1e-5) == (not transductive)
    assert jnp.all(jnp.isfinite(out))


def test_fresh_head_replaces_only_the_head():
    model = models.ConvNet(ways=7, filters=4, blocks=1)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, 6, 6)))["params"]
    new = trainer.fresh_head(params, 5)
    assert new["head"]["kernel"].shape == (params["head"]["kernel"].shape[0], 5)
    assert not np.any(new["head"]["kernel"]) and not np.any(new["head"]["bias"])
    assert new["conv_0"] is params["conv_0"] and new["norm_0"] is params["norm_0"]


def test_unknown_evaluator_type_or_option_is_one_error_naming_the_key(tmp_path):
    config = maml_fewshot.get_config("quick,dataset=digits,method=maml")
    config.evals.plugins = {"x": {"type": "accuracy"}}
    with pytest.raises(
        ValueError,
        match=r"^config.evals.plugins.x.type='accuracy'; expected one of finetune_accuracy$",
    ):
        trainer.train_and_evaluate(config, str(tmp_path))
    config.evals.plugins = {"x": {"type": "finetune_accuracy", "ways": 3}}
    with pytest.raises(
        ValueError, match=r"^config.evals.plugins.x: .*unexpected keyword argument 'ways'$"
    ):
        trainer.train_and_evaluate(config, str(tmp_path))
    config.evals.plugins = {"x": {"type": "finetune_accuracy", "num_tasks": 0}}
    with pytest.raises(ValueError, match=r"^config.evals.plugins.x: num_tasks=0: expected >= 1$"):
        trainer.train_and_evaluate(config, str(tmp_path))
