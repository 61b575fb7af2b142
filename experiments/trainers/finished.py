"""Resuming a trainer made of several independent runs (methods, seeds) done one after another.

A finished run's result is kept as ``<workdir>/finished/<name>.json`` and the rerun of the same
command reads it instead of training again. Metric lines of runs that did not finish (the one
that was interrupted) are dropped, so that its rerun writes them once:

    past = finished.Runs(workdir, metric_prefix=lambda name: f"train/{name}/", config=config)
    writer = past.open_writer()
    for name in names:
        result = past.get(name)
        if result is None:
            result = train(name, writer)   # writes "train/<name>/..." lines
            past.put(name, result)
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable

import ml_collections

from ftlab.core import metrics as metrics_lib
from ftlab.core import report

FOLDER = "finished"


class Runs:
    """The finished runs of one workdir."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        metric_prefix: Callable[[str], str | None],
        config: ml_collections.ConfigDict,
    ):
        """Args:
        workdir: The trainer's folder.
        metric_prefix: ``name -> prefix`` of every metric a run writes (e.g. ``train/<name>/``),
            or None for a run that writes none.
        config: The trainer's config; a finished run recorded under another config is an error,
            not a result to reuse.
        """
        self.workdir = pathlib.Path(workdir)
        self.folder = self.workdir / FOLDER
        self.metric_prefix = metric_prefix
        self.config = json.loads(config.to_json_best_effort())

    def _path(self, name: str) -> pathlib.Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"finished.Runs: run name {name!r} cannot name a file")
        return self.folder / f"{name}.json"

    def names(self) -> list[str]:
        """Names of the finished runs, sorted."""
        return sorted(p.stem for p in self.folder.glob("*.json"))

    def get(self, name: str) -> dict | None:
        """The result of a finished run, or None.

        Raises:
            ValueError: The run was recorded under a different config (names the file).
        """
        path = self._path(name)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record.get("config") != self.config:
            raise ValueError(
                f"{path} was run with a different config; use a new --workdir, or move that "
                "file away to run it again."
            )
        return record["result"]

    def put(self, name: str, result: dict) -> None:
        """Records a finished run (written to a temporary file, then renamed)."""
        report.save_json(self._path(name), {"config": self.config, "result": result})

    def open_writer(self) -> metrics_lib.MetricWriter:
        """A metric writer that keeps the lines of finished runs only, and appends."""
        prefixes = tuple(p for n in self.names() if (p := self.metric_prefix(n)) is not None)

        def keep(record: dict) -> bool:
            return bool(prefixes) and all(k == "step" or k.startswith(prefixes) for k in record)

        return metrics_lib.MetricWriter(self.workdir, resume_step=None, keep=keep)
