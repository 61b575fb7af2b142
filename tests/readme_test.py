"""The README's Python snippets run top to bottom, in one namespace, as a reader would run them.

Each fenced ```` ```python ```` block of README.md is executed in order in one shared namespace, so
a snippet that breaks what an earlier one left behind (a donated step that deleted the caller's
``params``, say) fails here. A failing block is reported with its first line number in README.md.

Names that the README's prose introduces but no snippet defines come from :func:`_prose_names`:

- ``params``: the parameters of a tiny classifier with BERT's paths (``encoder/layer_i/
  attention/{query,value}/{kernel,bias}``, ``head/...``; two layers of width 8, so the steps
  compile in a fraction of a second), as device arrays, as ``model.init`` returns them;
- ``apply(params, batch, rng)``: that classifier's logits (dropout when ``rng`` is given);
- ``loss_fn(params, batch, rng) -> (loss, aux)``: its cross-entropy
  (`ftlab.tasks.classification.make_loss_fn`);
- ``batch``: a fixed classification batch; ``rng``: a PRNG key;
- the modules a reader has imported: ``jax``, ``jnp``, ``np``, ``optax``.

A snippet that needs more (a new name in the prose) fails with a NameError naming the block's
line; add the name here. Blocks whose first line is ``# readme-test: skip`` are not run.
Blocks that load the SmolLM2 weights run only when ``FTLAB_README_SLOW=1``: loading and
dequantising the 135M GGUF and compiling generation add about 7 s on a 2-core CPU, and
``tests/generation_test.py`` already checks that snippet's answer ("Paris").
"""

from __future__ import annotations

import os
import pathlib
import re
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_SKIP = "# readme-test: skip"
# Snippets that load a real model (slow); they run with FTLAB_README_SLOW=1.
_SLOW = ("smollm2.load(",)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``[(first line number of the code, code)]`` of every ```` ```python ```` block, in order."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _FENCE.finditer(text)]


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="query")(x) * nn.tanh(nn.Dense(8, name="value")(x))


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + _Attention(name="attention")(x)


class _Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = _Layer(name=f"layer_{i}")(x)
        return x


class _Classifier(nn.Module):
    """A BERT-shaped stand-in: the README's rules and LoRA targets find the same paths."""

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        h = _Encoder(name="encoder")(x)
        h = nn.Dropout(0.1, deterministic=deterministic)(h)
        return nn.Dense(2, name="head")(h)


def _prose_names() -> dict:
    from ftlab.tasks import classification

    model = _Classifier()
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(4, 8)).astype(np.float32),
        "label": np.array([0, 1, 1, 0], np.int32),
    }

    def apply(params, batch, rng):
        if rng is None:
            return model.apply({"params": params}, batch["x"])
        return model.apply(
            {"params": params}, batch["x"], deterministic=False, rngs={"dropout": rng}
        )

    # Device arrays, as model.init returns them (a donated step could delete these).
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["x"])["params"]
    return {
        "jax": jax,
        "jnp": jnp,
        "np": np,
        "optax": optax,
        "params": params,
        "apply": apply,
        "loss_fn": classification.make_loss_fn(apply),
        "batch": batch,
        "rng": jax.random.PRNGKey(1),
    }


def test_python_blocks_are_found():
    blocks = python_blocks("a\n```python\nx = 1\n```\nb\n```python\ny = x\n```\n")
    assert blocks == [(3, "x = 1\n"), (7, "y = x\n")]


def test_readme_snippets_run_top_to_bottom():
    blocks = python_blocks(README.read_text())
    assert blocks, f"no ```python blocks in {README}"
    slow = os.environ.get("FTLAB_README_SLOW") == "1"
    namespace = _prose_names()
    ran = 0
    for line, code in blocks:
        if code.startswith(_SKIP) or (not slow and any(s in code for s in _SLOW)):
            continue
        failure = None
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - report which block, then fail
            tb = "".join(traceback.format_exception(e)[-6:])
            failure = f"README.md python block at line {line} raised {type(e).__name__}: {e}\n"
            failure += f"(blocks run in order in one namespace; earlier blocks ran)\n{tb}"
        if failure:
            pytest.fail(failure, pytrace=False)
        ran += 1
    assert ran >= 2, f"only {ran} README blocks ran"
