"""The launcher: config flags with overrides, and one-line errors that name the bad key."""

import pathlib
import re
import subprocess
import sys

import pytest

from configs import linear_probe_minilm

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "experiments.main", f"--workdir={tmp_path}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--config=configs/full_ft_minilm.py:tiny", "--config.optim.lrr=1"],
            r"--config.optim.lrr=1: unknown config key lrr Did you mean \"lr\"",
        ),
        (
            ["--config=configs/full_ft_minilm.py:tiny", "--config.optim.batch_size=abc"],
            r"--config.optim.batch_size=abc.*invalid literal for int",
        ),
        (["--config=configs/full_ft_minilm.py:tiyn"], r"unknown config option 'tiyn'"),
        (
            [
                "--config=configs/full_ft_minilm.py:tiny",
                "--config.partition.rules=(('encodr/.*','train'),('.*','frozen'))",
            ],
            r"config.partition.rules: pattern 'encodr/\.\*' matched no leaf; "
            r"top-level names are: encoder, head",
        ),
    ],
    ids=["unknown-key", "wrong-type", "unknown-option", "rule-matches-nothing"],
)
def test_bad_config_is_a_clear_error(args, expected, tmp_path):
    proc = _run(*args, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert re.search(expected, proc.stderr), proc.stderr[-2000:]


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["--config=configs/linear_probe_minilm.py:tiny", "--config.optim.lr=-0.1"],
            "error: config.optim.lr=-0.1: must be a number > 0 (e.g. 1e-3)",
        ),
        (
            ["--config=configs/online_river.py:quick", "--config.data.limit=-1"],
            "error: config.data.limit=-1: must be an integer >= 0 (0: the whole stream)",
        ),
        (
            ["--config=configs/no_such_config.py"],
            "error in --config=configs/no_such_config.py: [Errno 2] No such file or directory: "
            "'configs/no_such_config.py'",
        ),
    ],
    ids=["negative-lr", "empty-stream", "missing-file"],
)
def test_user_error_is_one_line_without_traceback(args, line, tmp_path):
    proc = _run(*args, tmp_path=tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_resume_refuses_a_structural_change(tmp_path):
    # the workdir of a run that saved a checkpoint with 2 classes
    config = "configs/linear_probe_minilm.py:tiny"
    saved = linear_probe_minilm.get_config("tiny")
    (tmp_path / "config.json").write_text(saved.to_json_best_effort())
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    proc = _run(f"--config={config}", "--config.model.num_classes=3", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: config.model.num_classes: changed since the run in {tmp_path} started, and its "
        "saved checkpoints hold the old shapes: config.model.num_classes: 2 -> 3; use a new "
        "--workdir, or the old values"
    ]


def test_override_reaches_the_run(tmp_path):
    proc = _run(
        "--config=configs/linear_probe_minilm.py:tiny",
        "--config.optim.num_steps=2",
        "--config.checkpoint.every_steps=1",
        tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert '"num_steps": 2' in (tmp_path / "config.json").read_text()

    # Resumed with a new learning rate and one more step: allowed, and said in one line.
    proc = _run(
        "--config=configs/linear_probe_minilm.py:tiny",
        "--config.optim.num_steps=3",
        "--config.optim.lr=0.01",
        "--config.checkpoint.every_steps=1",
        tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"resuming {tmp_path} with a changed config: config.optim.lr: 0.003 -> 0.01; "
        "config.optim.num_steps: 2 -> 3"
    ) in proc.stderr
    assert (tmp_path / "checkpoints" / "3").is_dir()
