"""End to end: the online trainer's quick config writes consistent results, metrics and plots;
on the experiment loop it resumes bit for bit, stops on a NaN naming the chunk, writes nothing on
process 1, and gives the same numbers on 8 simulated devices as on 1."""

import json
import os
import pathlib

import numpy as np
import pytest

from configs import online_river
from experiments import loop
from experiments.trainers import online as trainer
from ftlab import testing
from ftlab.core import metrics as metrics_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# conftest.py's persistent compilation cache, shared with the subprocess
CACHE = os.environ.get("FTLAB_TEST_CACHE", ROOT / ".jax_cache")
# what differs between two runs with the same numbers
TIMES = ("sweep_s", "best_fixed_s", "river/same_features", "river/pipeline")


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
    # The sweep's row for the configured step size is the main run; one line per chunk of 64.
    lines = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    assert lines[-1]["online/accuracy"] == results["progressive/accuracy"]
    assert lines[-1]["online/cumulative_loss"] == results["cumulative_loss"]
    assert results["sweep"][str(0.5)]["accuracy"] == results["progressive/accuracy"]


def _quick(**loop_options):
    config = online_river.get_config("stream=phishing,quick")
    config.evals.river = False
    config.update(loop_options)
    return config


def _same(a, b):
    assert {k: v for k, v in a.items() if k not in TIMES} == {
        k: v for k, v in b.items() if k not in TIMES
    }


def test_nan_stops_naming_the_chunk_and_stopped_runs_resume_bit_for_bit(
    results, tmp_path, monkeypatch
):
    _, uninterrupted = results
    chunked = trainer.online.chunked

    def poisoned(stream, size):
        host = chunked(stream, size)
        host["x"][100, 0] = np.nan  # in the second chunk of 64
        return host

    monkeypatch.setattr(trainer.online, "chunked", poisoned)
    config = _quick(checkpoint={"every_steps": 1, "keep": 5})
    with pytest.raises(metrics_lib.NonFiniteMetricError, match=r"train/loss=nan at step 2\b"):
        trainer.train_and_evaluate(config, str(tmp_path))
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1] and not (tmp_path / "results.json").exists()
    monkeypatch.undo()
    # the last good checkpoint restores: two more chunks, stop, then the rest
    config.max_steps_per_run = 2
    assert trainer.train_and_evaluate(config, str(tmp_path)) == {"step": 3}
    _same(trainer.train_and_evaluate(config, str(tmp_path)), uninterrupted)
    assert [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")] == [
        1,
        2,
        3,
        4,
        5,
    ]


def test_process_1_writes_nothing_but_its_share_of_the_checkpoints(results, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "is_chief", lambda: False)
    _same(trainer.train_and_evaluate(_quick(), str(tmp_path)), results[1])
    # orbax saves collectively (every process its shards); everything else is process 0's
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoints"}


_EIGHT_VS_ONE = """
import json, sys
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
import numpy as np
from configs import online_river
from experiments.trainers import online
assert jax.device_count() == 8
# a stream of its own: river (and the sklearn it imports) would take seconds to load
x = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
y = (x[:, 0] + x[:, 1] > 0).astype(np.float32)
online.data_lib.stream = lambda config, workdir: (x, y, tuple("abcd"))
out = {}
for mode, devices in (("mesh", 1), ("mesh", 8), ("pmap", 8)):
    c = online_river.get_config("stream=phishing,quick")
    c.evals.river = False
    c.parallel = {"mode": mode, "num_devices": devices}
    r = online.train_and_evaluate(c, f"{sys.argv[1]}/{mode}{devices}")
    out[f"{mode}{devices}"] = {k: v for k, v in r.items() if not k.endswith("_s")}
print("RESULT" + json.dumps(out))
"""


def test_8_simulated_devices_equal_1(tmp_path):
    # the sweep's 3 step sizes, padded to 8, one per device: the same numbers as on one device
    proc = testing.run_on_simulated_devices(_EIGHT_VS_ONE, str(tmp_path), str(CACHE), root=ROOT)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    one, eight, pmap = json.loads(line[len("RESULT") :]).values()
    assert one == eight == pmap


def test_minilm_stream_embeds_each_snippet_as_an_unpadded_batch_would(minilm, tmp_path):
    # 5 snippets in batches of 2: the last batch is padded with a dummy row that must not leak.
    from configs import online_minilm
    from experiments import features
    from ftlab.data import rotten_tomatoes, text
    from ftlab.models import bert

    config = online_minilm.get_config("quick")
    config.data.limit, config.data.embed_batch_size, config.data.max_length = 5, 2, 16
    x, y = features.sentence_embeddings(config, tmp_path)
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
