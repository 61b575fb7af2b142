"""Shared test setup: strict numerics, a persistent compile cache, shared real weights."""

import os
import pathlib

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
