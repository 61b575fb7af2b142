"""XLA options kept only for CPU and only where this XLA knows them."""

import jax

from ftlab.core import xla

KNOWN = {"xla_cpu_use_fusion_emitters": False}


def test_known_options_on_cpu_and_none_elsewhere():
    assert xla.cpu_options(KNOWN, "cpu") == KNOWN
    assert xla.cpu_options(KNOWN, "gpu") == {}
    assert xla.cpu_options({}, "cpu") == {}
    if jax.default_backend() == "cpu":
        assert xla.cpu_options(KNOWN) == KNOWN


def test_an_option_this_xla_lacks_gives_the_defaults():
    assert xla.cpu_options({**KNOWN, "xla_cpu_no_such_option": True}, "cpu") == {}
