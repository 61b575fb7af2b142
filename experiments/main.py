"""Launch an experiment from an ml_collections config.

  python -m experiments.main --config=configs/linear_probe_minilm.py --workdir=runs/probe \
      --config.optim.lr=3e-3

Running the same command again resumes from the latest good checkpoint in the workdir.
"""

from __future__ import annotations

import importlib
import logging as std_logging
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import workdir

# experiment kind `k` -> module experiments/trainers/k.py with train_and_evaluate(config, workdir)
TRAINERS = sorted(
    p.stem
    for p in pathlib.Path(__file__).with_name("trainers").glob("*.py")
    if not p.stem.startswith("_")
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
    """Drops orbax's INFO chatter (a dozen lines per save); its warnings still show."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    config = _CONFIG.value
    if config.get("parallel") is not None and config.parallel.get("multihost", False):
        from ftlab.core import parallel  # noqa: PLC0415 - must precede any other JAX use

        parallel.initialize_distributed(
            coordinator_address=config.parallel.coordinator_address,
            num_processes=config.parallel.num_processes,
            process_id=config.parallel.process_id,
        )
    import jax  # noqa: PLC0415

    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
    if config.experiment not in TRAINERS:
        raise app.UsageError(
            f"config.experiment={config.experiment!r}; known kinds: {', '.join(TRAINERS)}"
        )
    logging.info("config:\n%s", config)
    trainer = importlib.import_module(f"experiments.trainers.{config.experiment}")
    os.makedirs(_WORKDIR.value, exist_ok=True)
    if jax.process_index() == 0:
        try:  # one writer per workdir; the lock lasts until this process ends, however it ends
            held = workdir.lock(_WORKDIR.value)  # noqa: F841 - kept open while the run lasts
        except workdir.WorkdirBusyError as e:
            sys.exit(f"error: {e}")
        with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2) + "\n")
    from experiments.trainers import resume  # noqa: PLC0415 - imports jax
    from ftlab.core import checkpoint  # noqa: PLC0415

    try:
        trainer.train_and_evaluate(config, _WORKDIR.value)
    except checkpoint.CheckpointSaveError as e:  # a full disk is no bug: one line
        sys.exit(f"error: {e}")
    finally:  # orbax's background saves end before the interpreter does, on every path
        resume.close_all()


def parse_flags(argv):
    """Parses flags; a bad config file, option, key or value exits with one line naming it."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        messages, cause = [], e
        while cause is not None:  # config_flags wraps the config file's own error
            lines = [x for x in str(cause).replace("\\n", "\n").splitlines() if x.strip()]
            keep = 2 if isinstance(cause, (AttributeError, KeyError)) else 1
            text = " ".join(x.strip(" '\"\\") for x in lines[-keep:]) if lines else ""
            if text and not any(text in m for m in messages):
                messages.append(text)
            cause = cause.__cause__ or cause.__context__
        where = [
            a
            for a in argv[1:]
            if a.startswith("--config")
            and any(
                a.split("=", 1)[0].split(".")[-1] in m or a.split(":")[-1] in m for m in messages
            )
        ]
        where = where[-1] if where else "--config"
        what = "unknown config key " if isinstance(e, (AttributeError, KeyError)) else ""
        sys.exit(f"error in {where}: {what}{messages[0] if messages else type(e).__name__}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
