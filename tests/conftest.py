"""Shared test setup: strict numerics, a persistent compile cache, shared real weights."""

import os
import pathlib
import sys

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# Compiles dominate a 2-core test run; a persistent cache makes the second run cheap.
_CACHE = pathlib.Path(
    os.environ.get("FTLAB_TEST_CACHE", pathlib.Path(__file__).parent.parent / ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 weights, config and tokenizer, loaded once per session."""
    from third_party import minilm as minilm_lib

    return minilm_lib.load()


@pytest.fixture(autouse=True)
def _close_leftover_checkpointers():
    """After each test, what the launcher does on every way out of a run
    (`experiments.resume.close_all`): a trainer called in-process that raised before its own
    ``close`` would otherwise leave its checkpointer, and its SIGINT/SIGTERM handlers, to the
    next test of the worker."""
    yield
    resume = sys.modules.get("experiments.resume")
    if resume is not None:
        resume.close_all()
