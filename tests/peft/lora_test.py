"""LoRA: exact at init, merged equals factored, frozen base untouched, no dense gradient, files."""

import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import testing
from ftlab.core import partition, train
from ftlab.data import text
from ftlab.models import bert
from ftlab.peft import dense, lora
from ftlab.tasks import classification

# Distinctive widths, so that a kernel's [in, out] shape names that kernel alone in a jaxpr:
# query/key/value/out are [12, 12], intermediate [12, 20], output [20, 12].
TINY = bert.BertConfig.tiny(hidden_size=12, num_heads=2, intermediate_size=20, dropout_rate=0.0)
MODEL = bert.BertClassifier(TINY, num_classes=3)
TARGETS = [r"encoder/layer_\d+/attention/(query|value)", r"encoder/layer_\d+/mlp/intermediate"]
RANK, ALPHA = 2, 4.0
SENTENCES = ["A man is eating food.", "The stock market fell sharply today."]


def _apply(params, batch, rng):
    kwargs = {} if rng is None else dict(deterministic=False, rngs={"dropout": rng})
    return MODEL.apply({"params": params}, batch["input_ids"], batch["attention_mask"], **kwargs)


APPLY = lora.wrap_apply(_apply, alpha=ALPHA, rank=RANK)


def _batch(seed=0, n=4, seq=7):
    return testing.classifier_batch(TINY, seed=seed, n=n, seq=seq)


@pytest.fixture(scope="module")
def base():
    return testing.random_params(MODEL, _batch())


def _randomized(params, seed=1, std=0.3):
    """The LoRA tree with non-zero lora_b (and so a model that differs from the base)."""
    flat = partition.flatten(params)
    rng = np.random.default_rng(seed)
    for k in flat:
        if k.endswith("/lora_b"):
            flat[k] = rng.normal(scale=std, size=np.shape(flat[k])).astype(np.float32)
    return partition.unflatten(flat)


def _lora_tree(base):
    return lora.init(base, jax.random.key(1), targets=TARGETS, rank=RANK, alpha=ALPHA)


def test_init_adds_factors_next_to_targeted_kernels(base):
    params = _lora_tree(base)
    added = sorted(set(partition.flatten(params)) - set(partition.flatten(base)))
    assert len(added) == 2 * 3 * TINY.num_layers
    assert "encoder/layer_1/attention/query/lora_a" in added
    q = params["encoder"]["layer_0"]["attention"]["query"]
    chex.assert_shape([q["lora_a"], q["lora_b"]], [(12, RANK), (RANK, 12)])
    assert np.all(np.asarray(q["lora_b"]) == 0) and np.std(q["lora_a"]) > 0
    # PEFT's kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in)).
    assert np.max(np.abs(q["lora_a"])) <= 1 / np.sqrt(12)
    inter = params["encoder"]["layer_0"]["mlp"]["intermediate"]
    chex.assert_shape([inter["lora_a"], inter["lora_b"]], [(12, RANK), (RANK, 20)])


def test_lora_model_equals_base_at_init_on_minilm(minilm):
    params = lora.init(
        minilm.params,
        jax.random.key(0),
        targets=[r"layer_\d+/attention/(query|value)"],
        rank=8,
        alpha=16,
    )
    b = text.encode(minilm.tokenizer(16), SENTENCES, max_length=16)
    encoder = bert.BertEncoder(minilm.config)

    def encode(p):
        return encoder.apply({"params": p}, b["input_ids"], b["attention_mask"])

    adapted = lora.wrap_apply(encode, alpha=16, rank=8)
    base_out, lora_out = jax.jit(lambda p0, p1: (encode(p0), adapted(p1)))(minilm.params, params)
    np.testing.assert_array_equal(lora_out, base_out)


def test_merged_equals_factored_and_unmerge_restores(base):
    params = _randomized(_lora_tree(base))
    batch = _batch(1)
    factored = jax.jit(APPLY)(params, batch, None)
    merged = lora.merge(params, alpha=ALPHA, rank=RANK)
    assert jax.tree.structure(merged) == jax.tree.structure(base)  # a plain base-model tree
    plain = jax.jit(_apply)(merged, batch, None)  # no interceptor
    np.testing.assert_allclose(plain, factored, atol=1e-5, rtol=1e-5)
    # The adapter matters, so the comparison above can fail.
    assert np.max(np.abs(factored - jax.jit(_apply)(base, batch, None))) > 1e-3

    back = lora.unmerge(merged, lora.adapter(params), alpha=ALPHA, rank=RANK)
    chex.assert_trees_all_close(back, params, atol=1e-6, rtol=0)
    chex.assert_trees_all_equal(lora.adapter(back), lora.adapter(params))


def test_training_moves_only_lora_and_head(base):
    params = jax.tree.map(jnp.array, _lora_tree(base))
    label_tree = partition.labels(params, lora.rules(extra=[("head/.*", "train")]))
    tx = partition.optimizer({"train": optax.adam(1e-2)}, label_tree)
    trainable0, frozen0 = partition.split(jax.tree.map(np.array, params), label_tree)
    names = partition.flatten(trainable0)
    assert all(k.startswith("head/") or k.endswith(("/lora_a", "/lora_b")) for k in names)
    state = train.init_state(params, label_tree, tx, seed=0)
    # adam keeps mu and nu per trainable leaf (LoRA factors and head) plus a count: nothing else.
    opt_size = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
    assert opt_size == 2 * partition.count(trainable0) + 1
    step = jax.jit(train.make_train_step(classification.make_loss_fn(APPLY), tx), donate_argnums=0)
    for i in range(3):
        state, metrics = step(state, _batch(i))
    assert np.isfinite(metrics["train/loss"])
    chex.assert_trees_all_equal(state.frozen, frozen0)
    for name, leaf in partition.flatten(state.trainable).items():
        assert not np.array_equal(leaf, partition.flatten(trainable0)[name]), name


@pytest.mark.parametrize("kernel_trainable", [False, True], ids=["frozen", "trainable"])
def test_no_dense_gradient_of_a_frozen_lora_kernel(base, kernel_trainable):
    params = _randomized(_lora_tree(base))
    extra = [("head/.*", "train")]
    if kernel_trainable:
        extra.append((r".*/mlp/intermediate/kernel", "train"))
    label_tree = partition.labels(params, lora.rules(extra=extra))
    tx = optax.sgd(0.1)
    state = train.init_state(params, label_tree, tx, seed=0)
    step = train.make_train_step(classification.make_loss_fn(APPLY), tx)
    shapes = testing.jaxpr_output_shapes(jax.make_jaxpr(step)(state, _batch()).jaxpr)
    # The [12, 20] intermediate kernel is an input of the step; an equation producing that shape
    # is its gradient (or its update). Its LoRA factors do get gradients.
    assert ((12, 20) in shapes) == kernel_trainable
    assert (12, RANK) in shapes and (RANK, 20) in shapes


def test_vmap_over_a_stack_of_adapters(base):
    params = _lora_tree(base)
    adapters = [lora.adapter(_randomized(params, seed=s)) for s in range(3)]
    frozen = partition.split(params, partition.labels(params, lora.rules()))[1]
    batch = _batch(3)

    def logits(ad):
        return APPLY(partition.merge(ad, frozen), batch, None)

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)
    together = jax.jit(jax.vmap(logits))(stacked)
    for i, ad in enumerate(adapters):
        np.testing.assert_allclose(together[i], jax.jit(logits)(ad), atol=1e-5, rtol=1e-5)


def test_lora_leaves_without_a_scale_are_an_error(base):
    params = _lora_tree(base)
    with pytest.raises(ValueError, match="lora_scale"):
        dense.wrap_apply(_apply)(params, _batch(), None)


def test_save_load_round_trip_and_size_on_minilm(minilm, tmp_path):
    targets = [r"layer_\d+/attention/(query|value)"]
    params = lora.init(minilm.params, jax.random.key(0), targets=targets, rank=8, alpha=16)
    params = _randomized(params)
    ad = lora.adapter(params)
    lora.save(tmp_path / "adapter", ad, config_dict=dict(rank=8, alpha=16, targets=targets))
    loaded, cfg = lora.load(tmp_path / "adapter")
    chex.assert_trees_all_equal(loaded, jax.tree.map(np.asarray, ad))
    assert cfg == dict(rank=8, alpha=16, targets=targets)
    size = os.path.getsize(tmp_path / "adapter" / lora.WEIGHTS_FILE)
    # 6 layers x 2 modules x (384*8 + 8*384) float32 = 295 kB (the base is 90 MB).
    assert 290_000 < size < 1_000_000


def test_rules_claim_lora_leaves_and_head(base):
    params = _lora_tree(base)
    labels = partition.flatten(partition.labels(params, lora.rules(extra=[("head/.*", "train")])))
    train_leaves = sorted(k for k, v in labels.items() if v == "train")
    assert len(train_leaves) == 2 * 3 * TINY.num_layers + 2
    assert "head/kernel" in train_leaves
    assert "encoder/layer_0/attention/query/kernel" not in train_leaves


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(targets=[r"encoder/layer_\d+/attention/qury"]),
            r"lora\.init: targets\[0\].*available: .*attention/query",
        ),
        (dict(targets=["encoder/layer_0/attention_layer_norm"]), r"lora\.init: targets\[0\]"),
        (dict(rank=0), r"lora\.init: rank"),
        (dict(rank=13), r"lora\.init: rank=13 exceeds min\(in, out\)=12"),
        (dict(alpha=0.0), r"lora\.init: alpha"),
    ],
    ids=["typo", "not-dense", "rank0", "rank-too-big", "alpha0"],
)
def test_init_errors_name_the_argument(base, kwargs, match):
    args = dict(targets=TARGETS, rank=RANK, alpha=ALPHA) | kwargs
    with pytest.raises(ValueError, match=match):
        lora.init(base, jax.random.key(0), **args)


def test_init_refuses_existing_lora_leaves_and_merge_checks_rank(base):
    params = _lora_tree(base)
    with pytest.raises(ValueError, match=r"lora_a already exists"):
        lora.init(params, jax.random.key(0), targets=TARGETS, rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"rank=4 but .*lora_a has rank 2"):
        lora.merge(params, alpha=ALPHA, rank=4)


def test_lora_dropout_acts_only_on_the_low_rank_branch_and_only_in_training():
    """Eval (no dropout rng) is unchanged; training drops inputs of x @ a @ b, never of x @ W."""
    model = nn.Dense(3)
    x = jnp.arange(1.0, 9.0).reshape(2, 4)
    params = {
        "kernel": jnp.ones((4, 3)),
        "bias": jnp.zeros(3),
        "lora_a": jnp.ones((4, 1)),
        "lora_b": jnp.ones((1, 3)),
    }
    apply = lora.wrap_apply(
        lambda p, x, rngs=None: model.apply({"params": p}, x, rngs=rngs),
        alpha=1.0,
        rank=1,
        dropout=0.5,
    )
    plain = lora.wrap_apply(lambda p, x: model.apply({"params": p}, x), alpha=1.0, rank=1)
    chex.assert_trees_all_equal(apply(params, x), plain(params, x))
    y = apply(params, x, rngs={"dropout": jax.random.key(0)})
    base = x @ params["kernel"]
    # the branch is sum(kept x) / keep, so y - base is a sum of a subset of 2 * x per row
    delta = np.asarray(y - base)[:, 0]
    subsets = [
        {sum(2.0 * v for v, k in zip(row, ks, strict=True) if k) for ks in np.ndindex(*(2,) * 4)}
        for row in np.asarray(x)
    ]
    assert all(d in s for d, s in zip(delta.tolist(), subsets, strict=True))
    assert not np.allclose(delta, 2 * np.asarray(x).sum(axis=1))  # something was dropped
    with pytest.raises(ValueError, match="lora_dropout"):
        lora.wrap_apply(lambda p, x: x, alpha=1.0, rank=1, dropout=1.0)
