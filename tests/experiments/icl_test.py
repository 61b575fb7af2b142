"""End to end: the ICL experiment's quick config writes its results, table, plot and metrics,
resumes from its finished tasks, writes nothing on process 1, and gives the same numbers on 8
simulated devices (mesh and pmap) as on 1."""

import json
import os
import pathlib

import numpy as np

from configs import icl_smollm2
from experiments import loop
from experiments.trainers import icl as trainer
from ftlab import testing
from ftlab.core import metrics as metrics_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# conftest.py's persistent compilation cache, shared with the subprocess
CACHE = os.environ.get("FTLAB_TEST_CACHE", ROOT / ".jax_cache")


def test_quick_run_writes_results(tmp_path):
    config = icl_smollm2.get_config("quick,tasks=sentiment")
    results = trainer.train_and_evaluate(config, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tasks"].keys() == {"sentiment"}
    shots = saved["tasks"]["sentiment"]["shots"]
    assert list(shots) == ["0", "1", "2"]
    assert len(shots["0"]["accuracy_per_draw"]) == 1 and len(shots["2"]["accuracy_per_draw"]) == 2
    for s in shots.values():
        assert 0.0 <= s["mean"] <= 1.0 and s["std"] >= 0.0
    assert saved["tasks"] == results["tasks"]
    table = (tmp_path / "results.md").read_text()
    assert table.splitlines()[0] == "| task | majority | k=0 | k=1 | k=2 |"
    assert (tmp_path / "icl.png").stat().st_size > 1000
    steps = [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == [0, 1, 2]
    # A rerun reads the finished task instead of evaluating it again, and writes the same files.
    record = tmp_path / "finished" / "sentiment.json"
    mtime = record.stat().st_mtime_ns
    again = trainer.train_and_evaluate(config, str(tmp_path))
    assert again["tasks"] == results["tasks"] and record.stat().st_mtime_ns == mtime
    assert [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2]


def test_process_1_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "_process_index", lambda: 1)
    config = icl_smollm2.get_config("quick,tasks=sentiment")
    config.icl.shots, config.data.num_test = (0,), 4
    results = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert list(results["tasks"]["sentiment"]["shots"]) == ["0"]
    assert not (tmp_path / "run").exists()


_EIGHT_VS_ONE = """
import json, sys
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
from configs import icl_smollm2
from experiments.trainers import icl
assert jax.device_count() == 8
out = {}
for mode, devices in (("mesh", 1), ("mesh", 8)):
    c = icl_smollm2.get_config("quick,tasks=sentiment,draws=1")
    c.icl.shots, c.icl.batch_size, c.data.num_test = (0, 2), 8, 13
    c.parallel = {"mode": mode, "num_devices": devices}
    r = icl.train_and_evaluate(c, f"{sys.argv[1]}/{mode}{devices}")
    out[f"{mode}{devices}"] = r["tasks"]["sentiment"]["shots"]
print("RESULT" + json.dumps(out))
"""


def test_8_simulated_devices_equal_1(tmp_path):
    # 13 queries in batches of 8 (the last padded), each split over 8 devices: same numbers
    proc = testing.run_on_simulated_devices(_EIGHT_VS_ONE, str(tmp_path), str(CACHE), root=ROOT)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    one, *others = json.loads(line[len("RESULT") :]).values()
    assert list(one) == ["0", "2"]
    for other in others:
        for k, s in one.items():
            assert other[k]["accuracy_per_draw"] == s["accuracy_per_draw"], k
            np.testing.assert_allclose(
                other[k]["label_logprob_per_draw"], s["label_logprob_per_draw"], rtol=1e-5
            )
