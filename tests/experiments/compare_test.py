"""The comparison report: every method runs, the best lr per method is kept, files are written."""

import json

import jax
import pytest

from configs import compare_rotten_tomatoes
from experiments import compare


def test_compare_writes_table_json_and_plot(tmp_path, monkeypatch):
    config = compare_rotten_tomatoes.get_config("tiny")
    config.methods = ("lora",)
    config.lrs.lora = (1e-3, 3e-2)
    # The run at 3e-2 has finished already (its results.json is there): it is read, not run,
    # and its validation accuracy makes it the choice. The run at 1e-3 is a real subprocess.
    finished = tmp_path / "lora" / "lr_0.03"
    finished.mkdir(parents=True)
    trained = dict(trainable_params=1, base_params=2, **{"eval/test/accuracy": 0.5})
    (finished / "results.json").write_text(json.dumps({**trained, "eval/validation/accuracy": 1.0}))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    rows = compare.compare(config, str(tmp_path))
    assert [r["method"] for r in rows] == ["lora"]
    report = json.loads((tmp_path / "compare.json").read_text())
    assert len(report["runs"]) == 2
    assert rows[0]["lr"] == 3e-2
    ran = next(r for r in report["runs"] if r["lr"] == 1e-3)
    # the tiny model (2 layers, width 16): rank-8 LoRA on query and value, and the head
    assert ran["trainable_params"] == 2 * 2 * 8 * (16 + 16) + (2 * 16 + 2)
    assert 0 < ran["eval/validation/accuracy"] < 1
    table = (tmp_path / "compare.md").read_text()
    assert "| lora |" in table and "test acc" in table
    # every learning rate tried is in the table, with its validation accuracy
    assert rows[0]["sweep"].startswith("0.001: ") and ", 0.03: 100.00%" in rows[0]["sweep"]
    assert (tmp_path / "compare.png").stat().st_size > 1000
    # A second call reads the finished runs instead of training again.
    before = (tmp_path / "lora" / "lr_0.001" / "results.json").stat().st_mtime
    compare.compare(config, str(tmp_path))
    assert (tmp_path / "lora" / "lr_0.001" / "results.json").stat().st_mtime == before

    # finished_only: an unfinished lr is left out, nothing trains, the table has what finished
    config.lrs.lora = (1e-3, 3e-2, 1e-1)
    rows = compare.compare(config, str(tmp_path), finished_only=True)
    assert not (tmp_path / "lora" / "lr_0.1").exists()
    assert rows[0]["sweep"].count(":") == 2


def test_finished_only_with_nothing_finished_names_the_workdir(tmp_path):
    config = compare_rotten_tomatoes.get_config("tiny")
    with pytest.raises(FileNotFoundError, match="no finished run"):
        compare.compare(config, str(tmp_path), finished_only=True)
    assert not any(tmp_path.iterdir())  # nothing was started
