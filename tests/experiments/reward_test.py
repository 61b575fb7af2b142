"""The reward-model trainer end to end (quick config: a random 2-layer BERT on 64 snippets per
split): it writes its table, results and plot; its agreement numbers are
`ftlab.posttrain.metrics` of the scores it saved, and VADER's and the rater's rows are those of
`ftlab.data.ratings`; a run stopped by ``max_steps_per_run`` and rerun ends as an uninterrupted
run does; the schema refuses a key the trainer does not read; the decoder head pools the last
real token."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import reward_minilm, reward_smollm2
from experiments import data as data_lib
from experiments import loop, schema, scorers
from experiments.trainers import reward as trainer
from ftlab.core import metrics as metrics_lib
from ftlab.data import ratings
from ftlab.models import llama
from ftlab.peft import lora
from ftlab.posttrain import losses, metrics
from ftlab.posttrain import reward as reward_lib

# results that measure this run's time or memory, not the computation


def _computed(results):
    return {k: v for k, v in results.items() if k not in loop.MEASURED}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reward")
    config = reward_minilm.get_config("quick")
    return workdir, config, trainer.train_and_evaluate(config, str(workdir))


def test_quick_run_writes_table_results_and_plots(run):
    workdir, config, results = run
    assert json.loads((workdir / "results.json").read_text()) == results
    assert results["step"] == config.optim.num_steps
    table = (workdir / "results.md").read_text()
    for row in ("reward model (tiny, full)", "VADER (compound score)", "one human rater"):
        assert row in table
    for png in ("reward_vs_rating.png", "training.png"):
        assert (workdir / png).stat().st_size > 0
    lines = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if "eval/validation/pearson" in r][0] == 2
    # the in-batch pairs of a step all differ by at least min_difference
    assert all(r["train/pairs"] > 0 for r in lines if "train/pairs" in r)


def test_agreement_numbers_are_posttrain_metrics_of_the_scores(run):
    workdir, config, results = run
    saved = np.load(workdir / "scores.npz")
    snippets, splits = data_lib.rated_movies(config)  # ratings.split_movies, cut to data.limit
    test = splits["test"]
    assert len(test) == config.data.limit
    np.testing.assert_array_equal(saved["index"], test)
    np.testing.assert_array_equal(saved["mean"], snippets.mean[test])
    mine = metrics.agreement(saved["reward"], snippets.mean[test], min_difference=1.0)
    assert {k: results[f"eval/test/{k}"] for k in mine} == mine
    vader = ratings.vader_scores([snippets.text[i] for i in test])
    assert results["vader"] == {
        "scorer": "VADER (compound score)",
        **metrics.agreement(vader, snippets.mean[test], min_difference=1.0),
    }
    one, others = ratings.held_out_rater(snippets, seed=config.evals.rater_seed)
    human = metrics.agreement(one[test], others[test], min_difference=1.0)
    assert {k: results["human_rater"][k] for k in human} == human


def test_rerun_after_max_steps_per_run_equals_an_uninterrupted_run(run, tmp_path):
    _, config, results = run
    config = config.copy_and_resolve_references()
    config.max_steps_per_run = 2
    assert trainer.train_and_evaluate(config, str(tmp_path)) == {"step": 2}
    resumed = trainer.train_and_evaluate(config, str(tmp_path))
    assert _computed(resumed) == _computed(results)


def test_pairs_are_a_pure_function_of_the_step():
    config = reward_minilm.get_config("quick,pairing=sampled")
    mean = np.random.default_rng(0).uniform(-4, 4, 50)
    a, b = trainer.pairs_at(config, mean, 7), trainer.pairs_at(config, mean, 7)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], trainer.pairs_at(config, mean, 8)[0])
    chosen, rejected, margin = a
    assert np.all(mean[chosen] - mean[rejected] >= config.data.min_difference)
    np.testing.assert_array_equal(margin, 0.0)  # margin_scale 0: no margin


def test_in_batch_loss_is_bradley_terry_over_the_qualifying_pairs():
    r = np.array([0.3, -1.0, 2.0, 0.1], np.float32)
    mean = np.array([1.0, -2.0, 0.2, 0.9], np.float32)

    def apply(params, batch, rng):
        return params["r"]

    loss_fn = trainer.make_in_batch_loss_fn(apply, min_difference=0.5, margin_scale=0.25)
    batch = {"input_ids": np.zeros((4, 2)), "attention_mask": np.ones((4, 2)), "mean": mean}
    loss, aux = loss_fn({"r": jnp.asarray(r)}, batch, None)
    pairs = [(i, j) for i in range(4) for j in range(4) if mean[i] - mean[j] >= 0.5]
    expected = np.mean(
        [
            losses.bradley_terry_loss(
                jnp.asarray([r[i]]), jnp.asarray([r[j]]), margin=0.25 * (mean[i] - mean[j])
            )[0]
            for i, j in pairs
        ]
    )
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert float(aux["pairs"]) == len(pairs)
    np.testing.assert_allclose(float(aux["accuracy"]), np.mean([r[i] > r[j] for i, j in pairs]))


def test_decoder_head_reads_the_last_real_token():
    hidden = jnp.arange(24.0).reshape(2, 3, 4)
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    params = reward_lib.init({"body": {}}, jax.random.key(0), dim=4, name="head")
    apply = reward_lib.wrap_apply(lambda p, b: hidden, pooling="last", name="head")
    got = apply(params, {"attention_mask": mask})
    h = params["head"]
    want = np.stack([hidden[0, 1], hidden[1, 2]]) @ h["kernel"][:, 0] + h["bias"][0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="already has a top-level 'head'"):
        reward_lib.init(params, jax.random.key(0), dim=4, name="head")


def test_schema_refuses_a_key_the_trainer_does_not_read():
    config = reward_minilm.get_config("quick")
    schema.validate(config)
    config.data.bogus = 1
    with pytest.raises(
        schema.ConfigError, match=r"config\.data\.bogus: not a key of a 'reward' config"
    ):
        schema.validate(config)
    config = reward_minilm.get_config()
    config.data.pairing = "all"
    with pytest.raises(schema.ConfigError, match=r"config\.data\.pairing='all': must be one of"):
        schema.validate(config)


def test_decoder_backbone_scores_the_last_real_token_of_each_snippet():
    config = reward_smollm2.get_config("quick")
    schema.validate(config)
    texts = ["a fine film", "dull , dull , dull and long"]
    scorer = scorers.build_scorer(config, texts)
    batch = scorer.encode(texts)
    assert batch["attention_mask"].sum(1).tolist() == [3, 7]  # right padded, no special tokens
    got = jax.jit(scorer.apply)(scorer.params, batch, None)
    # LoRA starts at B = 0, so the hidden states are the base decoder's
    body = {k: v for k, v in scorer.params.items() if k != "head"}
    body = lora.merge(body, alpha=config.peft.alpha, rank=config.peft.rank)
    cfg = llama.LlamaConfig.tiny(vocab_size=config.model.vocab_size, max_position_embeddings=1024)
    hidden = jax.jit(
        lambda p, ids, mask: llama.LlamaForCausalLM(cfg).apply(
            {"params": llama.stack_if_uniform(p)}, ids, mask, return_hidden=True
        )
    )(body, batch["input_ids"], batch["attention_mask"])
    last = np.stack([hidden[0, 2], hidden[1, 6]])
    head = scorer.params["head"]
    np.testing.assert_allclose(got, last @ head["kernel"][:, 0] + head["bias"][0], rtol=1e-5)
