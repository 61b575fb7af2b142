"""End to end: few-shot decoder tuning (prompt, prefix, LoRA, QLoRA) on the quick config."""

import json

import ml_collections
import numpy as np
import pytest
from absl.testing import flagsaver  # noqa: F401  (absl is a dependency; keeps flags untouched)

from configs import tune_smollm2
from experiments import models
from experiments.trainers import decoder_tuning
from ftlab import icl
from ftlab.core import metrics as metrics_lib


def test_quick_run_trains_every_method_and_resumes(tmp_path):
    config = tune_smollm2.get_config("quick,num_examples=4,methods=prompt+qlora")
    # evaluators chosen by name, at step 1 of 2: label scoring, label loss, greedy generation
    config.evals = ml_collections.ConfigDict()
    config.evals.plugins = {
        name: {"type": name, "every_steps": 1, "num_test": 4} for name in decoder_tuning.PLUGINS
    }
    rows = decoder_tuning.train_and_evaluate(config, str(tmp_path))
    assert [r["method"] for r in rows] == ["prompt", "qlora"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"prompt", "qlora"}
    for r in results["runs"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 2 and r["num_test"] == 8
    by = {r["method"]: r for r in results["runs"]}
    # QLoRA holds part of the base as 4-bit blocks: fewer bytes than the float32 base prompt
    # tuning keeps frozen (the prompt itself is trainable, not part of the base)
    assert by["qlora"]["base_mib_during_training"] < by["prompt"]["base_mib_during_training"]
    assert (tmp_path / "tuning_vs_icl.png").stat().st_size > 0
    for method in ("prompt", "qlora"):
        lines = metrics_lib.read_jsonl(tmp_path / "runs" / f"{method}_n4_s0" / "metrics.jsonl")
        (line,) = [r for r in lines if "eval/accuracy" in r]
        assert line["step"] == 1 and np.isfinite(line["eval/label_loss"])
        # the label scoring and the training loss's argmax read the same prompt
        assert line["eval/label_accuracy"] == pytest.approx(line["eval/accuracy"])
        # a greedy generation that is the true label word is also the best-scored label word
        match = line["eval/generation/exact_match"]
        assert match <= line["eval/accuracy"] and match <= line["eval/generation/label_word"] <= 1
    # a second invocation finds every run finished and only rewrites the report
    before = (tmp_path / "finished" / "qlora_n4_s0.json").read_text()
    decoder_tuning.train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "finished" / "qlora_n4_s0.json").read_text() == before
    # refused before any run, though every run here is finished
    config.evals.plugins = {"g": {"type": "generation", "beams": 2}}
    with pytest.raises(
        ValueError, match=r"^config.evals.plugins.g: .*unexpected keyword argument 'beams'$"
    ):
        decoder_tuning.train_and_evaluate(config, str(tmp_path))


def test_prefix_tuning_trains_on_the_stacked_decoder_tree():
    # The trainer holds SmolLM2 with its layers stacked for nn.scan; prefix.init needs them one
    # by one, and the loss stacks them again. The loss must equal the unstacked model's.
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from ftlab.models import llama

    cfg = llama.LlamaConfig.tiny()
    plain = llama.init(cfg, jax.random.key(0))
    config = ml_collections.ConfigDict({"peft": {"length": 3, "prefix_hidden_mlp": 8}})
    params, _, wrap, to_plain = models.decoder_method(
        config.peft, "prefix", llama.stack_layers(plain), jax.random.key(1), model_config=cfg
    )
    same, _, _, _ = models.decoder_method(
        config.peft, "prefix", plain, jax.random.key(1), model_config=cfg
    )
    batch = {
        "input_ids": jnp.array([[1, 2, 3, 4], [5, 6, 7, 0]]),
        "attention_mask": jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "target": jnp.array([3, 4]),
        "label_ids": jnp.array([3, 4]),
        "label": jnp.array([0, 1]),
    }
    loss_fn = icl.label_word_loss(cfg, wrap)
    # jitted: op by op, the tiny decoder's forward and backward take seconds of dispatch
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, _), grads = value_and_grad(params, batch, None)
    np.testing.assert_allclose(loss, jax.jit(loss_fn)(same, batch, None)[0], rtol=1e-6)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["prefix_mlp"]))
    final = to_plain(params)
    assert "prefix_mlp" not in final
    assert final["decoder"]["layer_1"]["attention"]["prefix_key"].shape == (3, cfg.kv_dim)


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    import jax.numpy as jnp
    import pytest

    from ftlab.core import metrics as metrics_lib

    make = icl.label_word_loss

    def nan_loss_fn(model_config, wrap):
        loss_fn = make(model_config, wrap)

        def poisoned(params, batch, rng):
            loss, aux = loss_fn(params, batch, rng)
            return loss * jnp.nan, aux

        return poisoned

    monkeypatch.setattr(icl, "label_word_loss", nan_loss_fn)
    config = tune_smollm2.get_config("quick,num_examples=4,methods=prompt")
    with pytest.raises(metrics_lib.NonFiniteMetricError, match=r"train/loss=nan at step 1\b"):
        decoder_tuning.train_and_evaluate(config, str(tmp_path))
    # nothing recorded as finished, nothing reported
    assert not (tmp_path / "finished").exists() and not (tmp_path / "results.json").exists()
