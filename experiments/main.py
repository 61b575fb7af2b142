"""Launch an experiment from an ml_collections config.

  python -m experiments.main --config=configs/linear_probe_minilm.py --workdir=runs/probe \
      --config.optim.lr=3e-3

Every config value is checked against its experiment kind's schema (`experiments/schema.py`)
before anything runs. A bad value, a config file that cannot be loaded, or an error of the
library that names a config key exits with status 2 and one line on stderr, with no traceback;
tracebacks are kept for bugs.

Running the same command again resumes from the latest good checkpoint (or the finished runs) in
the workdir. The config is compared with the one saved there (config.json): a change of a field
that alters the saved state (model size, method, rank, num_classes, partition rules, ...) is
refused; other changes (learning rate, num_steps, max_steps_per_run, ...) are logged in one line.
"""

from __future__ import annotations

import importlib
import logging as std_logging
import pathlib
import sys
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import schema
from experiments import workdir as workdirs

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
    try:
        run(load_config(), pathlib.Path(_WORKDIR.value))
    except ValueError as e:
        # The user's input, named by its config key: one line. Anything else is a bug and
        # keeps its traceback.
        if not is_user_error(e):
            raise
        fail(f"error: {e}")


def load_config() -> ml_collections.ConfigDict:
    """The parsed --config; a file that cannot be loaded exits with one line naming it."""
    config = _CONFIG.value
    try:
        config.get("experiment")  # config_flags defers a load failure to the first access
    except OSError as e:
        cause = e.__cause__ or e
        lines = [x.strip() for x in str(cause).splitlines() if x.strip()]
        fail(f"error in --config={flags.FLAGS['config'].config_filename}: {lines[-1]}")
    return config


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Validates ``config``, locks ``workdir``, checks the config against its run, then trains."""
    schema.validate(config)
    multihost = config.get("parallel") is not None and config.parallel.get("multihost", False)
    # One writer per workdir (process 0 of a multi-host run, once JAX says which that is); the
    # resume check runs under the lock, so no other writer changes the run in between.
    held = None if multihost else _lock(workdir)
    other = schema.check_resume(config, workdir)
    if other:
        logging.warning("resuming %s with a changed config: %s", workdir, schema.show(other))
    if multihost:
        from ftlab.core import parallel  # noqa: PLC0415 - must precede any other JAX use

        parallel.initialize_distributed(
            coordinator_address=config.parallel.coordinator_address,
            num_processes=config.parallel.num_processes,
            process_id=config.parallel.process_id,
        )
    import jax  # noqa: PLC0415

    if multihost and jax.process_index() == 0:
        held = _lock(workdir)
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
    # The one range check that needs the machine (schema.validate runs before JAX starts).
    wanted = config.parallel.num_devices if config.get("parallel") is not None else 0
    if wanted > jax.device_count():
        raise schema.ConfigError(
            "parallel.num_devices",
            f"must be <= the {jax.device_count()} devices of this run (0: all of them)",
            wanted,
        )
    logging.info("config:\n%s", config)
    trainer = importlib.import_module(f"experiments.trainers.{config.experiment}")
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        # Written whole, then renamed: another process of a multi-host run may be reading it.
        tmp = workdir / f"{schema.CONFIG_FILE}.tmp"
        tmp.write_text(config.to_json_best_effort(indent=2) + "\n")
        tmp.replace(workdir / schema.CONFIG_FILE)
    from experiments import resume  # noqa: PLC0415 - imports jax
    from ftlab.core import checkpoint  # noqa: PLC0415

    try:
        trainer.train_and_evaluate(config, str(workdir))
    except checkpoint.CheckpointSaveError as e:  # a full disk is no bug: one line
        fail(f"error: {e}")
    finally:  # orbax's background saves end before the interpreter does, on every path
        resume.close_all()
        del held


def _lock(workdir: pathlib.Path):
    """The workdir's lock, held while the returned file stays open; a busy workdir exits."""
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return workdirs.lock(workdir)
    except workdirs.WorkdirBusyError as e:
        fail(f"error: {e}")


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is about the user's input: a ConfigError or a message naming a key."""
    return isinstance(error, schema.ConfigError) or str(error).startswith("config.")


def fail(message: str) -> NoReturn:
    """Exits with status 2 and ``message`` on one line of stderr (no traceback)."""
    print(" ".join(message.split()), file=sys.stderr, flush=True)
    sys.exit(2)


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
        fail(f"error in {where}: {what}{messages[0] if messages else type(e).__name__}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
