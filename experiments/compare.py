"""Run several fine-tuning methods on one task and write a comparison table and plot.

python -m experiments.compare --config=configs/compare_rotten_tomatoes.py --workdir=runs/compare

With --finished_only it trains nothing and reports the runs already finished (e.g. while a sweep
is still running, or after it stopped part-way); the table says which learning rates were tried.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ftlab.core import report

_CONFIG = config_flags.DEFINE_config_file("config", None, "A compare config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every run and the report go.")
_FINISHED_ONLY = flags.DEFINE_bool(
    "finished_only", False, "Report the finished runs only; start no training."
)
flags.mark_flags_as_required(["config", "workdir"])

COLUMNS = (
    report.Column("method"),
    report.Column("lr", fmt="{:g}"),
    report.Column("val acc", "eval/validation/accuracy", "{:.2%}"),
    report.Column("test acc", "eval/test/accuracy", "{:.2%}"),
    report.Column("trainable", "trainable_params", "{:,}"),
    report.Column("% of base", "trainable_percent", "{:.3f}%"),
    report.Column("step (s)", "train_step_s", "{:.3f}"),
    report.Column("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
    report.Column("saved (bytes)", "adapter_bytes", "{:,}"),
    report.Column("val acc per lr tried", "sweep"),
)


def run_one(
    config, method: str, lr: float, workdir: pathlib.Path, *, finished_only: bool = False
) -> dict | None:
    """Runs (or, if finished, reads) one method at one learning rate.

    With ``finished_only``, an unfinished run is not started and None is returned.
    """
    results_path = workdir / "results.json"
    if not results_path.exists() and finished_only:
        logging.info("not finished, left out: %s", workdir)
        return None
    if not results_path.exists():
        options = ",".join(filter(None, [f"method={method}", config.base_options]))
        cmd = [
            sys.executable,
            "-m",
            "experiments.main",
            f"--config={config.base}:{options}",
            f"--workdir={workdir}",
            f"--config.optim.lr={lr}",
            *config.overrides,
        ]
        logging.info("running %s", " ".join(cmd))
        workdir.mkdir(parents=True, exist_ok=True)
        with open(workdir / "log.txt", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        if proc.returncode:
            raise RuntimeError(f"{method} at lr={lr} failed; see {workdir / 'log.txt'}")
    return {"method": method, "lr": lr, **json.loads(results_path.read_text())}


def best_per_method(runs: list[dict]) -> list[dict]:
    """For each method, the run with the best validation accuracy (ties: lower lr)."""
    best: dict[str, dict] = {}
    for r in runs:
        key = (r["eval/validation/accuracy"], -r["lr"])
        current = best.get(r["method"])
        if current is None or key > (current["eval/validation/accuracy"], -current["lr"]):
            best[r["method"]] = r
    return list(best.values())


def markdown(rows: list[dict]) -> str:
    """One row per method (its best run), the columns of `COLUMNS`; a missing value is blank."""
    return report.table(rows, COLUMNS)


def plot(rows: list[dict]):
    """Test accuracy against trainable parameters (log x), one named point per method."""
    points = [(r["trainable_params"], 100 * r["eval/test/accuracy"], r["method"]) for r in rows]
    return report.scatter_plot(
        points, xscale="log", xlabel="trainable parameters (log scale)", ylabel="test accuracy (%)"
    )


def compare(config, workdir: str, *, finished_only: bool = False) -> list[dict]:
    """Runs every (method, lr), keeps each method's best by validation, writes the report.

    ``finished_only``: start nothing; report the (method, lr) runs already finished.
    """
    workdir = pathlib.Path(workdir)
    unknown = [m for m in config.methods if m not in config.lrs]
    if unknown:
        raise ValueError(f"config.methods: no learning rates in config.lrs for {unknown}")
    runs = [
        run_one(config, m, lr, workdir / m / f"lr_{lr:g}", finished_only=finished_only)
        for m in config.methods
        for lr in config.lrs[m]
    ]
    runs = [r for r in runs if r is not None]
    if not runs:
        raise FileNotFoundError(f"{workdir}: no finished run of {list(config.methods)} yet")
    rows = best_per_method(runs)
    for r in rows:
        r["trainable_percent"] = 100.0 * r["trainable_params"] / r["base_params"]
        r["sweep"] = ", ".join(
            f"{x['lr']:g}: {x['eval/validation/accuracy']:.2%}"
            for x in sorted(runs, key=lambda x: x["lr"])
            if x["method"] == r["method"]
        )
    report.save_table(
        workdir / "compare", markdown=markdown(rows), data={"best": rows, "runs": runs}
    )
    report.save_figure(plot(rows), workdir / "compare.png", dpi=120)
    logging.info("wrote %s", workdir / "compare.md")
    return rows


def main(argv):
    del argv
    print(markdown(compare(_CONFIG.value, _WORKDIR.value, finished_only=_FINISHED_ONLY.value)))


if __name__ == "__main__":
    app.run(main)
