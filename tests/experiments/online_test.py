"""End to end: the online trainer's quick config writes consistent results, metrics and plots."""

import json

import numpy as np
import pytest

from configs import online_river
from experiments.trainers import online as trainer
from ftlab.core import metrics as metrics_lib


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("online")
    config = online_river.get_config("stream=phishing,quick")
    return workdir, trainer.train_and_evaluate(config, str(workdir))


def test_quick_run_writes_consistent_results(results):
    workdir, results = results
    assert json.loads((workdir / "results.json").read_text())["examples"] == 300
    for name in ("table.md", "plots/regret.png", "plots/online.png", "metrics.jsonl"):
        assert (workdir / name).stat().st_size > 0, name
    # R(T) on the grid is the online cumulative loss minus the hindsight optimum's.
    assert results["regret/steps"][-1] == 300
    np.testing.assert_allclose(
        results["regret/values"][-1],
        results["cumulative_loss"] - results["best_fixed/total_loss"],
        rtol=1e-5,
    )
    assert results["best_fixed/grad_norm"] < results["best_fixed/tol"]
    assert results["regret/prefix_max_grad_norm"] < results["best_fixed/tol"]
    assert all(r > 0 for r in results["regret/values"])
    assert 0 < results["regret/slope"] < 1
    # river's LogisticRegression with the same SGD schedule on the same features agrees.
    river = results["river/same_features"]
    np.testing.assert_allclose(river["accuracy"], results["progressive/accuracy"], atol=1e-6)
    np.testing.assert_allclose(river["log_loss"], results["progressive/log_loss"], rtol=1e-4)
    # The sweep's row for the configured step size is the main run.
    lines = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    assert lines[-1]["step"] == 300
    np.testing.assert_allclose(lines[-1]["online/accuracy"], results["progressive/accuracy"])


def test_minilm_stream_embeds_each_snippet_as_an_unpadded_batch_would(minilm):
    # 5 snippets in batches of 2: the last batch is padded with a dummy row that must not leak.
    from configs import online_minilm
    from ftlab.data import rotten_tomatoes, text
    from ftlab.models import bert

    config = online_minilm.get_config("quick")
    config.data.limit, config.data.embed_batch_size, config.data.max_length = 5, 2, 16
    x, y = trainer.embed_rotten_tomatoes(config)
    split = rotten_tomatoes.load(task="sentiment", seed=0, limit=5)["train"]
    np.testing.assert_array_equal(y, split.label)
    tokens = text.encode(minilm.tokenizer(16), split.text, max_length=16)
    want = bert.encode_sentences(
        minilm.config, minilm.params, tokens["input_ids"], tokens["attention_mask"]
    )
    assert x.shape == (5, 384) and x.dtype == np.float32
    np.testing.assert_allclose(x, want, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-6)


def test_minilm_quick_run_matches_river_on_the_same_embeddings(tmp_path):
    from configs import online_minilm

    results = trainer.train_and_evaluate(online_minilm.get_config("quick"), str(tmp_path))
    assert results["examples"] == 64
    river = results["river/same_features"]
    np.testing.assert_allclose(river["accuracy"], results["progressive/accuracy"], atol=1e-6)
    np.testing.assert_allclose(river["log_loss"], results["progressive/log_loss"], rtol=1e-4)
    np.testing.assert_allclose(
        results["regret/values"][-1],
        results["cumulative_loss"] - results["best_fixed/total_loss"],
        rtol=1e-5,
    )
    assert results["best_fixed/grad_norm"] < results["best_fixed/tol"]
