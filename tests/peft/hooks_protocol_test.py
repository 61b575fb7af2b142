"""The hook protocol (issue 17): structural methods on ftlab's Llama and on a model ftlab never saw.

The test-only model is a small ViT built from Flax's own layers (`nn.Conv` patches, `nn.Dense`,
`nn.LayerNorm`, and `nn.MultiHeadDotProductAttention` or, for prefix tuning, a small attention
of its own: `nn.MultiHeadDotProductAttention` computes its keys and values internally and cannot
call `hooks.key_value`). It calls the hooks; nothing in ftlab knows its module names. ftlab's
BERT runs the same checks in tests/peft/{adapters,prefix,prompt,reft}_test.py.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import testing
from ftlab.core import partition, sites
from ftlab.models import bert, hooks, llama
from ftlab.peft import adapters, dense, dora, ia3, lora, prefix, prompt, reft

# --- a model ftlab has never seen --------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head attention of `nn.Dense` projections that calls the key/value hook."""

    heads: int

    @nn.compact
    def __call__(self, x, mask):
        batch, seq, width = x.shape
        hd = width // self.heads
        q, k, v = (
            nn.Dense(width, name=n)(x).reshape(batch, seq, self.heads, hd)
            for n in ("query", "key", "value")
        )
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e9)
        k, v, bias = hooks.key_value(self, k, v, bias)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + bias
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return nn.Dense(width, name="out")(y.reshape(batch, seq, width))


class Block(nn.Module):
    heads: int
    own_attention: bool
    call_hooks: bool
    attention_name: str

    @nn.compact
    def __call__(self, x, mask, token_mask):
        y = nn.LayerNorm(name="norm_1")(x)
        if self.own_attention:
            a = SelfAttention(self.heads, name=self.attention_name)(y, mask)
        else:
            a = nn.MultiHeadDotProductAttention(self.heads, name=self.attention_name)(
                y, mask=mask[:, None, None, :] > 0
            )
        if self.call_hooks:
            a = hooks.sublayer_output(self, "attention", a)
        x = x + a
        width = x.shape[-1]
        m = nn.Dense(width, name="fc_2")(
            nn.gelu(nn.Dense(2 * width, name="fc_1")(nn.LayerNorm()(x)))
        )
        if self.call_hooks:
            m = hooks.sublayer_output(self, "output", m)
        x = x + m
        return hooks.hidden(self, x, token_mask) if self.call_hooks else x


class TinyViT(nn.Module):
    """Patches (`nn.Conv`) + positions, blocks, mean pool over the patches, linear head."""

    width: int = 16
    depth: int = 1
    heads: int = 2
    patch: int = 4
    classes: int = 3
    own_attention: bool = False
    call_hooks: bool = True
    block_name: str = "block"
    attention_name: str = "attn"

    @nn.compact
    def __call__(self, images):
        batch = images.shape[0]
        x = nn.Conv(self.width, (self.patch,) * 2, strides=self.patch, name="patches")(images)
        x = x.reshape(batch, -1, self.width)
        n = x.shape[1]
        x = x + self.param("position", nn.initializers.normal(0.02), (1, n, self.width))
        if self.call_hooks:
            x = hooks.embeddings(self, x)  # the root module: a prompt sits at the top level
        n_prompt = x.shape[1] - n
        mask = jnp.ones(x.shape[:2], jnp.int32)
        token_mask = mask.at[:, :n_prompt].set(0)
        for i in range(self.depth):
            x = Block(
                self.heads,
                self.own_attention,
                self.call_hooks,
                self.attention_name,
                name=f"{self.block_name}_{i}",
            )(x, mask, token_mask)
        pooled = jnp.mean(nn.LayerNorm(name="norm")(x[:, n_prompt:]), axis=1)
        return nn.Dense(self.classes, name="head")(pooled)


def _vit_batch():
    rng = np.random.default_rng(0)
    return {
        "images": rng.normal(size=(4, 8, 8, 3)).astype(np.float32),
        "label": np.array([0, 1, 2, 1], np.int32),
    }


def _vit(**fields):
    model = TinyViT(**fields)

    def apply(params, batch, rng):
        del rng
        return model.apply({"params": params}, batch["images"])

    params = jax.tree.map(np.asarray, model.init(jax.random.key(0), _vit_batch()["images"]))
    return apply, params["params"], _vit_batch()


# --- ftlab's Llama as a 3-way classifier of the last position ------------------------------

LLAMA = llama.LlamaForCausalLM(llama.LlamaConfig.tiny(num_layers=1))


def _llama():
    def apply(params, batch, rng):
        del rng
        logits = LLAMA.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        return logits[:, -1, :3]

    ids = np.random.default_rng(1).integers(1, 64, size=(4, 6)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "label": np.array([0, 1, 2, 1])}
    params = jax.tree.map(np.asarray, llama.init(LLAMA.config, jax.random.key(0)))
    return apply, params, batch


MODELS = {"llama": _llama, "vit": _vit}

# method -> (init(params, rng, sites) -> tree, wrap(apply, sites) -> apply, rules, identity)
METHODS = {
    "adapters": (
        lambda p, k, s: adapters.init(p, k, sites=s, bottleneck=4),
        lambda f, s: adapters.wrap_apply(f),
        adapters.rules(),
        True,
    ),
    "prompt": (
        lambda p, k, s: prompt.init(p, k, sites=s, length=2, init="random"),
        lambda f, s: prompt.wrap_apply(f),
        prompt.rules(),
        False,
    ),
    "prefix": (
        lambda p, k, s: prefix.init(p, k, sites=s, length=2, hidden_mlp=8),
        lambda f, s: prefix.wrap_apply(f, s),
        prefix.rules(),
        False,
    ),
    "reft": (
        lambda p, k, s: reft.init(p, k, sites=s, layers=[0], rank=2),
        lambda f, s: reft.wrap_apply(f, first_n=1, last_n=1),
        reft.rules(),
        True,
    ),
}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_on_llama_and_a_test_only_vit(method, model):
    """Identity at init (adapters, ReFT), trains only its leaves, output moves after training."""
    fields = {"own_attention": True} if model == "vit" and method == "prefix" else {}
    apply, base, batch = MODELS[model](**fields)
    init, wrap, rules, identity = METHODS[method]
    found = hooks.discover(apply, base, batch, None)
    params = init(base, jax.random.key(1), found)
    wrapped = wrap(apply, found)
    # One compile for both: the adapted model and the base model.
    both = jax.jit(lambda p, q: (wrapped(p, batch, None), apply(q, batch, None)))
    start, plain = both(params, base)
    if identity:  # to one float32 ulp: the hook changes how XLA fuses the neighbouring ops
        np.testing.assert_allclose(start, plain, atol=1e-6, rtol=0)
    else:
        assert float(jnp.max(jnp.abs(start - plain))) > 1e-4
    label_tree = partition.labels(params, rules)
    tx = partition.optimizer({"train": optax.adam(3e-2)}, label_tree)
    # Frozen leaves bit-identical, no optimizer state for them, every trainable leaf moves.
    state = testing.assert_trains_only(params, label_tree, tx, wrapped, batch, steps=2)
    assert float(jnp.max(jnp.abs(both(state.params, base)[0] - start))) > 1e-4


def _bert():
    model = bert.BertClassifier(bert.BertConfig.tiny(dropout_rate=0.0), num_classes=3)
    batch = testing.classifier_batch(model.config, seed=0, n=2, seq=5)

    def apply(params, batch, rng):
        del rng
        return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])

    return apply, testing.random_params(model, batch), batch


def test_discover_finds_the_sites_of_every_model_by_their_calls_alone():
    apply, params, batch = _vit(block_name="layer", attention_name="attention")
    got = [(s.kind, s.path, s.name, s.width) for s in hooks.discover(apply, params, batch, None)]
    assert got == [
        (hooks.EMBEDDINGS, "", "", 16),
        *[
            (kind, f"layer_{i}", name, 16)
            for i in range(1)
            for kind, name in [
                (hooks.SUBLAYER, "attention"),
                (hooks.SUBLAYER, "output"),
                (hooks.HIDDEN, ""),
            ]
        ],
    ]
    apply, params, batch = _bert()
    kinds = [s.kind for s in hooks.discover(apply, params, batch, None)]
    assert kinds == [hooks.EMBEDDINGS] + 2 * [
        hooks.KEY_VALUE,
        hooks.SUBLAYER,
        hooks.SUBLAYER,
        hooks.HIDDEN,
    ]
    encoder = bert.BertEncoder(bert.BertConfig.tiny())
    with pytest.raises(ValueError, match="hook at 'embeddings' is not under params"):
        hooks.discover(
            lambda p, ids: encoder.apply({"params": p["encoder"]}, ids, ids),
            params,
            batch["input_ids"],
        )


def test_renamed_model_gets_gradients_and_an_unhooked_one_is_refused():
    """The issue's user model: modules named `layer_i/attention/{key,out}`."""
    names = {"block_name": "layer", "attention_name": "attention", "own_attention": True}
    apply, base, batch = _vit(**names)
    found = hooks.discover(apply, base, batch, None)
    params = prefix.init(
        adapters.init(base, jax.random.key(1), sites=found, bottleneck=2),
        jax.random.key(2),
        sites=found,
        length=2,
        hidden_mlp=4,
    )
    # One step's worth of gradient: up-projections and the prefix MLP both get nonzero gradients.
    loss = lambda p: jnp.sum(prefix.wrap_apply(apply, found)(p, batch, None) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(grads["layer_0"]["output_adapter"]["up"]["kernel"]).sum()) > 0
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["prefix_mlp"]))

    # The same names (Flax's attention: `layer_i/attention/{query,key,value,out}`), but a model
    # that calls no hook: nothing to attach to, and a tree made for its hooked twin is refused,
    # naming the leaves, instead of running the base model.
    names["own_attention"] = False
    unhooked, base, _ = _vit(**names, call_hooks=False)
    with pytest.raises(ValueError, match="hooks.discover: apply_fn called no hook"):
        hooks.discover(unhooked, base, batch, None)
    twin, _, _ = _vit(**names)
    found = hooks.discover(twin, base, batch, None)
    with pytest.raises(ValueError, match="adapters.init: the model calls no 'sublayer' hook"):
        adapters.init(base, jax.random.key(0), sites=found[:1], bottleneck=2)
    tree = adapters.init(base, jax.random.key(1), sites=found, bottleneck=2)
    with pytest.raises(
        sites.UnconsumedLeavesError, match=r"adapters leaves .*layer_0/attention_adapter/down/bias"
    ):
        jax.eval_shape(adapters.wrap_apply(unhooked), tree, batch, None)


def test_a_method_whose_hook_the_model_does_not_call_is_refused():
    apply, base, batch = _vit()  # nn.MultiHeadDotProductAttention: no key/value site
    found = hooks.discover(apply, base, batch, None)
    with pytest.raises(ValueError, match=r"prefix.init: the model calls no 'key_value' hook"):
        prefix.init(base, jax.random.key(0), sites=found, length=2, hidden_mlp=4)
    with pytest.raises(ValueError, match="names no table"):
        prompt.init(base, jax.random.key(0), sites=found, length=2)  # a ViT has no vocabulary
    # Prefixes made for the twin with its own attention are named when applied here.
    twin, twin_base, _ = _vit(own_attention=True)
    twin_sites = hooks.discover(twin, twin_base, batch, None)
    tree = prefix.finalize(
        prefix.init(base, jax.random.key(0), sites=twin_sites, length=2, hidden_mlp=4), twin_sites
    )
    with pytest.raises(sites.UnconsumedLeavesError, match=r"block_0/attn/prefix_key"):
        jax.eval_shape(hooks.wrap_apply(apply), tree, batch, None)


def test_a_lora_tree_without_its_wrapper_raises_whatever_compiled_first():
    """Root tracking: ftlab's models refuse method leaves nothing read, in every compile order."""
    apply, base, batch = _bert()
    params = lora.init(
        base, jax.random.key(1), targets=[r"encoder/layer_\d+/attention/value"], rank=2, alpha=4
    )
    params["encoder"]["layer_0"]["attention"]["value"]["lora_b"] += 0.5  # a LoRA that acts
    with pytest.raises(sites.UnconsumedLeavesError, match=r"params/layer_0/attention/value/lora_a"):
        bert.encode_sentences(
            bert.BertConfig.tiny(dropout_rate=0.0),
            params["encoder"],
            batch["input_ids"],
            batch["attention_mask"],
        )
    f = jax.jit(lambda p: apply(p, batch, None))
    base_out = f(base)  # compiled first without the method ...
    with pytest.raises(sites.UnconsumedLeavesError, match="BertClassifier.apply: 4 LoRA leaves"):
        f(params)  # ... then with it: an error, never the base output
    wrapped = jax.jit(lora.wrap_apply(lambda p: apply(p, batch, None), alpha=4, rank=2))
    lora_out = wrapped(params)
    assert float(jnp.max(jnp.abs(lora_out - base_out))) > 1e-4
    np.testing.assert_allclose(lora_out, f(lora.merge(params, alpha=4, rank=2)), atol=1e-5)
    with pytest.raises(sites.UnconsumedLeavesError, match="LlamaForCausalLM.apply"):
        jax.eval_shape(
            lambda p: LLAMA.apply({"params": p}, jnp.ones((1, 3), jnp.int32)),
            lora.init(
                llama.init(LLAMA.config, jax.random.key(0)),
                jax.random.key(1),
                targets=[r".*/query"],
                rank=2,
                alpha=4,
            ),
        )


def test_every_leaf_a_hook_reads_is_a_registered_method_name():
    """Otherwise `ftlab.core.sites` would not check it, and an unused leaf could pass silently."""
    names = [hooks.PROMPT, hooks.PREFIX_KEY, hooks.PREFIX_VALUE, hooks.REFT, prefix.MLP]
    names += [hooks.adapter_name(n) for n in hooks.SUBLAYERS]
    assert all(n in sites.METHOD_NAMES for n in names), names
    with pytest.raises(ValueError, match=r"name='ffn' is not one of \('attention', 'output'\)"):
        _Bad().init(jax.random.key(0), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="only 'hidden' sites take handlers"):
        with hooks.handling(hooks.EMBEDDINGS, lambda m, h, t: h):
            pass


class _Bad(nn.Module):
    @nn.compact
    def __call__(self, x):
        return hooks.sublayer_output(self, "ffn", x)


@pytest.mark.parametrize("module", [adapters, prefix, prompt, reft])
def test_no_structural_method_imports_a_model(module):
    """They find their sites through the protocol only (no `layer_\\d+/attention/...` regexes)."""
    import ast
    import inspect
    import re

    tree = ast.parse(inspect.getsource(module))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "ftlab.models"
        for alias in node.names
    }
    assert imported == {"hooks"}, imported
    patterns = [v.pattern for v in vars(module).values() if isinstance(v, re.Pattern)]
    patterns += [pattern for pattern, _ in module.rules()]
    assert not any("layer" in p or "attention/" in p for p in patterns), patterns


# --- the dense-layer methods on the same three models ------------------------------------------

DENSE_MODELS = {"bert": _bert, "llama": _llama, "vit": _vit}
# Every model's attention projections, by path or (the ViT's Flax attention) by layer type.
DENSE_TARGETS = {
    "bert": dict(targets=[r".*/attention/(query|value)"]),
    "llama": dict(targets=[r".*/attention/(query|value)"]),
    "vit": dict(layer_types=("DenseGeneral", "Conv")),
}
DENSE_METHODS = {
    "lora": (
        lambda p, k, t, layers: lora.init(p, k, rank=2, alpha=4, layers=layers, **t),
        lambda f: lora.wrap_apply(f, alpha=4, rank=2),
        lora.rules(),
    ),
    "dora": (
        lambda p, k, t, layers: dora.init(p, k, rank=2, alpha=4, layers=layers, **t),
        lambda f: dora.wrap_apply(f, alpha=4, rank=2),
        dora.rules(),
    ),
    "ia3": (
        lambda p, k, t, layers: ia3.init(
            p,
            targets_out=t.get("targets", ()),
            targets_in=(),
            layer_types_out=t.get("layer_types", ()),
            layers=layers,
        ),
        ia3.wrap_apply,
        ia3.rules(),
    ),
}


@pytest.mark.parametrize("model", sorted(DENSE_MODELS))
@pytest.mark.parametrize("method", sorted(DENSE_METHODS))
def test_dense_layer_method_on_bert_llama_and_a_test_only_vit(method, model):
    """Identity at init, trains only its leaves (frozen bit-identical, no optimizer state for
    them), and the output moves after training: LoRA, DoRA and IA3 on each of the three models."""
    apply, base, batch = DENSE_MODELS[model]()
    init, wrap, rules = DENSE_METHODS[method]
    layers = dense.layers(apply, base, batch, None)
    params = init(base, jax.random.key(1), DENSE_TARGETS[model], layers)
    wrapped = wrap(apply)
    both = jax.jit(lambda p, q: (wrapped(p, batch, None), apply(q, batch, None)))
    start, plain = both(params, base)
    np.testing.assert_allclose(start, plain, atol=1e-6, rtol=0)
    label_tree = partition.labels(params, rules)
    tx = partition.optimizer({"train": optax.adam(3e-2)}, label_tree)
    # Three steps: LoRA's lora_a only moves once lora_b has left zero.
    state = testing.assert_trains_only(params, label_tree, tx, wrapped, batch, steps=3)
    assert float(jnp.max(jnp.abs(both(state.params, base)[0] - start))) > 1e-4
