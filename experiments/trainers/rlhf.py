"""Sentiment-controlled generation (Ziegler et al. 2019): PPO, GRPO or DPO against a reward model.

A decoder with LoRA (SmolLM2-135M-Instruct, or a tiny random Llama for tests) continues the first
``config.data.prompt_tokens`` tokens of Rotten Tomatoes training snippets
(`ftlab.data.rotten_tomatoes`), and a reward model trained on human sentiment ratings by
`experiments/trainers/reward.py` scores prompt and continuation. The reward model is read from
that run's workdir (``config.reward.workdir``: its ``config.json``, its newest checkpoint, and its
``results.json``, which only a finished run has).

The reward model's tokenizer is not the policy's (MiniLM's WordPiece against SmolLM2's BPE), so
rewards are computed on the host: the completions are decoded to text, encoded with the reward
model's tokenizer and scored by its jitted forward pass. `experiments.loop` compiles one
``step(state, batch)``, so inside PPO's and GRPO's compiled step (`ftlab.posttrain.rl.make_ppo_step`
/ `make_grpo_step`) that host scoring is a `jax.pure_callback` between the rollout and the update.

``config.algorithm``:

    ppo   one completion per prompt; value head on the policy's last hidden state, GAE, clipped
          policy and value losses, Ziegler et al.'s adaptive KL coefficient (``config.ppo``),
          which lives in the train state's collections and so in every checkpoint.
    grpo  ``config.grpo.num_samples`` completions per prompt, advantages relative to the group,
          the KL to the reference in the loss (``config.grpo.kl_coef``), no value model.
    dpo   pairs ranked by the reward model: two completions per prompt sampled from the
          reference policy (LoRA off) in the step's batch, the higher-scored one chosen; the
          sigmoid DPO loss with the reference being the same weights with LoRA switched off.

The reference policy is the base model with LoRA switched off in all three (no second copy).

Evaluation: every ``config.evals.every_steps`` steps, before training and after it, the policy
continues ``config.evals.num_prompts`` held-out prompts (test-split snippets) with one fixed
rng, the same sampling as in training; the evaluation logs the mean reward, the KL to the
reference (per completion, the sum over its tokens of ``log pi - log ref`` at the sampled
tokens, averaged over completions) and the completion length (``eval/...``). PPO and GRPO also
log those of each step's own rollout (``train/reward``, ``train/kl``,
``train/completion_length``).

**Reward at a given KL**: every evaluation is a point (KL, reward) of the run; the reward
reached within a KL budget is the best evaluated reward among the points whose KL is at most the
budget (``config.evals.kl_budgets``, in nats per completion; missing when no point is within it).
``results.json`` holds the points and those rewards, ``results.md`` the table, and
``python -m experiments.trainers.rlhf runs/ppo runs/grpo runs/dpo`` prints one table of several
runs (`compare`), and with ``--out=DIR`` writes it with the (KL, reward) points of every run
(``kl_frontier.png``).

Writes into the workdir: ``results.json``, ``results.md``, ``rewards.png`` (mean reward and KL
against the step), ``samples.md`` (the held-out continuations before and after training, same
prompts and rng), ``before.json`` (the evaluation of the starting policy, kept for a resumed run),
with ``config.plot_metrics`` ``train.png``/``eval.png``, checkpoints and metrics.jsonl.

References:
    Ziegler et al., "Fine-Tuning Language Models from Human Preferences",
    https://arxiv.org/abs/1909.08593
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from experiments import data as data_lib
from experiments import loop, models, reports, resume, scorers
from ftlab.core import checkpoint, partition, report, train
from ftlab.core import metrics as metrics_lib
from ftlab.data import batching, rotten_tomatoes
from ftlab.models import llama
from ftlab.posttrain import dpo, rl

__all__ = [
    "ALGORITHMS",
    "Policy",
    "RewardModel",
    "compare",
    "load_prompts",
    "load_reward_model",
    "optimizer",
    "reward_at_kl",
    "train_and_evaluate",
    "updates_per_step",
]

ALGORITHMS = ("ppo", "grpo", "dpo")
# completions per prompt of the algorithms whose count is not a config key
_SAMPLES = {"ppo": 1, "dpo": 2}


# -- the reward model ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A trained reward model: ``score(texts) -> float32 [n]`` on the host.

    Attributes:
        score: Rewards of a list of texts (encoded with the reward model's own tokenizer).
        backbone: The reward run's ``config.model.backbone``.
        step: The checkpoint's step.
        results: The reward run's ``results.json``.
    """

    score: Callable[[Sequence[str]], np.ndarray]
    backbone: str
    step: int
    results: dict


def load_reward_model(workdir: str) -> RewardModel:
    """The reward model of a finished `experiments/trainers/reward.py` run in ``workdir``.

    Rebuilds the run's scorer from its ``config.json`` and restores its newest checkpoint (read
    only: nothing in ``workdir`` is written). Loaded once per process and finished run (a sweep
    or a test trains several policies against one reward model).

    Raises:
        ValueError: ``workdir`` holds no finished reward run (no ``results.json``), or no
            checkpoint; the message names ``config.reward.workdir``.
    """
    results = pathlib.Path(workdir) / "results.json" if workdir else None
    stamp = results.stat().st_mtime_ns if results is not None and results.is_file() else None
    return _load_reward_model(workdir, stamp)


@functools.lru_cache(maxsize=2)
def _load_reward_model(workdir: str, stamp: int | None) -> RewardModel:
    del stamp  # the cache key: a rerun reward run is loaded again
    key = f"config.reward.workdir={workdir!r}"
    path = pathlib.Path(workdir) if workdir else None
    hint = (
        "train one first, e.g. python -m experiments.main --config=configs/reward_minilm.py "
        "--workdir=runs/reward_minilm"
    )
    if path is None or not (path / "results.json").is_file():
        raise ValueError(f"{key}: no finished reward run there (no results.json); {hint}")
    saved_config = json.loads((path / "config.json").read_text())
    if saved_config.get("experiment") != "reward":
        raise ValueError(
            f"{key}: the run there is a {saved_config.get('experiment')!r} run, not a reward "
            "model (configs/reward_*.py)"
        )
    rcfg = ml_collections.ConfigDict(saved_config)
    texts = []
    if rcfg.model.backbone in scorers.DECODERS:  # the stand-in tokenizer reads them
        snippets, splits = data_lib.rated_movies(rcfg)
        texts = [snippets.text[i] for i in splits["train"]]
    scorer = scorers.build_scorer(rcfg, texts)
    label_tree = partition.labels(scorer.params, [tuple(r) for r in rcfg.partition.rules])
    state = train.init_state(
        scorer.params, label_tree, models.adamw(rcfg, label_tree), seed=rcfg.seed
    )
    if not (path / "checkpoints").is_dir():
        raise ValueError(f"{key}: the run there has no checkpoints folder; {hint}")
    # a large max_to_keep: restoring never deletes a step of the reward run
    ckpt = checkpoint.Checkpointer(path / "checkpoints", max_to_keep=2**30, save_every_steps=1)
    try:
        restored = ckpt.restore_latest(resume.saved_part(state))
    finally:
        ckpt.close()
    if restored is None:
        raise ValueError(f"{key}: the run there has no checkpoint to restore; {hint}")
    saved, step = restored
    params = partition.merge(saved.trainable, state.frozen)
    forward = jax.jit(lambda p, batch: scorer.apply(p, batch, None))

    def score(texts: Sequence[str]) -> np.ndarray:
        batch = scorer.encode(list(texts))
        return np.asarray(forward(params, batch), np.float32)

    results = json.loads((path / "results.json").read_text())
    return RewardModel(score, rcfg.model.backbone, int(step), results)


# -- prompts --------------------------------------------------------------------------------------


def load_prompts(config: ml_collections.ConfigDict, tokenizer) -> dict[str, np.ndarray]:
    """``{"train", "eval"}`` int32 ``[n, prompt_tokens]`` token ids: the first
    ``config.data.prompt_tokens`` tokens of each training snippet with more tokens than that,
    and of the first ``config.evals.num_prompts`` such test snippets."""
    d = config.data
    splits = rotten_tomatoes.load(task="sentiment", seed=d.split_seed)
    out = {}
    for name, split, limit in (
        ("train", "train", d.num_train),
        ("eval", "test", config.evals.num_prompts),
    ):
        rows = []
        for enc in tokenizer.encode_batch(splits[split].text, add_special_tokens=False):
            if len(enc.ids) > d.prompt_tokens:
                rows.append(enc.ids[: d.prompt_tokens])
            if limit and len(rows) == limit:
                break
        if limit and len(rows) < limit:
            raise ValueError(
                f"config.data.prompt_tokens={d.prompt_tokens}: only {len(rows)} {split} snippets "
                f"are longer, fewer than the {limit} asked for"
            )
        out[name] = np.asarray(rows, np.int32)
    return out


# -- the policy -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Policy:
    """The decoder with LoRA: its module, tree (layers stacked), rules, wrapper, tokenizer."""

    model: llama.LlamaForCausalLM
    params: dict
    rules: list
    wrap: Callable
    tokenizer: object
    eos_id: int
    pad_id: int
    name: str


def build_policy(config: ml_collections.ConfigDict, texts: Sequence[str]) -> Policy:
    """SmolLM2-135M-Instruct (or a tiny random Llama) with LoRA (and PPO's value head)."""
    sub = ml_collections.ConfigDict(
        {
            "seed": config.seed,
            "model": models.decoder_model_options(config),
        }
    )
    decoder = models.decoder(sub, list(texts))
    base = decoder.params
    if llama.LAYERS in base["decoder"]:  # LoRA targets name the layers one by one
        base = llama.unstack_layers(base)
    params, rules, wrap, _ = models.decoder_method(
        config.peft,
        "lora",
        base,
        jax.random.PRNGKey(config.seed + 1),
        model_config=decoder.config,
    )
    # Held stacked (the LoRA leaves stack with their layers), so no forward pass restacks.
    params = llama.stack_if_uniform(params)
    if config.algorithm == "ppo":
        params = rl.add_value_head(params)
        rules = [rl.VALUE_HEAD_RULE, *rules]
    if config.model.name == "smollm2":
        from third_party import smollm2  # noqa: PLC0415 - cached: models.decoder loaded it

        eos_id, name = smollm2.load().eos_id, "SmolLM2-135M-Instruct"
    else:  # the stand-in tokenizer has no end token: [UNK], rarely drawn
        eos_id, name = 0, "tiny random Llama"
    return Policy(
        llama.LlamaForCausalLM(decoder.config),
        jax.tree.map(np.asarray, params),
        rules,
        wrap,
        decoder.tokenizer,
        eos_id,
        decoder.pad_id,
        name,
    )


def decode_rows(tokenizer, ids: np.ndarray, mask: np.ndarray, *, eos_id: int) -> list[str]:
    """The text of each row's real tokens (its end token left out)."""
    rows = [
        [int(t) for t, m in zip(r, k, strict=True) if m and t != eos_id]
        for r, k in zip(ids, mask, strict=True)
    ]
    return [t.strip() for t in tokenizer.decode_batch(rows, skip_special_tokens=True)]


def host_rewards(policy: Policy, reward_model: RewardModel):
    """``rewards(input_ids, attention_mask) -> float32 [n]`` of rollout rows, on the host."""

    def rewards(ids, mask):
        texts = decode_rows(
            policy.tokenizer, np.asarray(ids), np.asarray(mask), eos_id=policy.eos_id
        )
        return reward_model.score(texts)

    return rewards


def traced_reward_fn(rewards) -> rl.RewardFn:
    """``reward_fn(rollout)`` for the compiled RL step: the host scoring as a pure callback."""

    def reward_fn(rollout: rl.Rollout) -> jax.Array:
        n = rollout.tokens.shape[0]
        return jax.pure_callback(
            rewards,
            jax.ShapeDtypeStruct((n,), jnp.float32),
            rollout.input_ids,
            rollout.attention_mask,
        )

    return reward_fn


def _sampling(config, num_samples: int, eos_id: int, pad_id: int) -> rl.Sampling:
    s = config.sampling
    return rl.Sampling(
        num_samples=num_samples,
        max_new_tokens=s.max_new_tokens,
        eos_id=eos_id,
        pad_id=pad_id,
        temperature=s.temperature,
        top_p=s.top_p,
    )


def _check_groups(config: ml_collections.ConfigDict) -> None:
    """The algorithm's own option group must be there, and no other's (it could not act)."""
    if config.algorithm not in ALGORITHMS:
        raise ValueError(f"config.algorithm={config.algorithm!r}; expected one of {ALGORITHMS}")
    if config.get(config.algorithm) is None:
        raise ValueError(
            f"config.{config.algorithm} is missing; config.algorithm={config.algorithm!r} reads "
            "its options there"
        )
    for other in ALGORITHMS:
        if other != config.algorithm and config.get(other) is not None:
            raise ValueError(
                f"config.{other} is set but config.algorithm={config.algorithm!r}, so it could "
                "not take effect; drop it"
            )


def make_step(config, policy: Policy, tx, rewards, base_params):
    """``(step_fn, pairs_of)`` of ``config.algorithm`` for `experiments.loop.train`.

    ``pairs_of(prompt_ids, rng)`` (DPO only, else None) samples two completions per prompt from
    the reference policy (``base_params``, LoRA off), ranks them by reward and returns the pair
    batch of `ftlab.posttrain.dpo`.
    """
    a = config.algorithm
    if a == "grpo":
        g = config.grpo
        sampling = _sampling(config, g.num_samples, policy.eos_id, policy.pad_id)
        step = rl.make_grpo_step(
            policy.model,
            tx,
            traced_reward_fn(rewards),
            sampling,
            wrap=policy.wrap,
            clip_eps=g.clip_eps,
            kl_coef=g.kl_coef,
            epochs=g.epochs,
        )
        return step, None
    if a == "ppo":
        p = config.ppo
        sampling = _sampling(config, 1, policy.eos_id, policy.pad_id)
        step = rl.make_ppo_step(
            policy.model,
            tx,
            traced_reward_fn(rewards),
            sampling,
            wrap=policy.wrap,
            clip_eps=p.clip_eps,
            vf_coef=p.vf_coef,
            gamma=p.gamma,
            lam=p.lam,
            kl_target=p.kl_target or None,
            kl_horizon=p.kl_horizon,
            epochs=p.epochs,
            minibatches=p.minibatches,
        )
        return step, None
    # DPO: the pairs of a step come from the reference policy, on the host, in batch_at
    sampling = _sampling(config, 2, policy.eos_id, policy.pad_id)
    reference_rollout = rl.make_rollout(policy.model, sampling, wrap=None)
    module = policy.model

    def base_apply(params, batch):
        params = llama.stack_if_uniform(params)
        return module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])

    step = dpo.make_dpo_step(
        policy.wrap(base_apply),
        tx,
        base_apply=base_apply,
        loss="sigmoid",
        beta=config.dpo.beta,
    )

    def pairs_of(prompt_ids, rng):
        mask = np.ones_like(prompt_ids)
        out = reference_rollout(base_params, prompt_ids, mask, rng)
        ids = np.asarray(out.input_ids)
        attention = np.asarray(out.attention_mask)
        loss_mask = np.concatenate(
            [np.zeros_like(np.asarray(out.prompt_mask)), np.asarray(out.mask)], 1
        )
        scores = rewards(ids, attention).reshape(-1, 2)
        first_wins = scores[:, 0] >= scores[:, 1]
        rows = np.arange(scores.shape[0]) * 2
        chosen = np.where(first_wins, rows, rows + 1)
        rejected = np.where(first_wins, rows + 1, rows)
        batch = {}
        for side, idx in (("chosen", chosen), ("rejected", rejected)):
            batch[f"{side}_input_ids"] = ids[idx]
            batch[f"{side}_attention_mask"] = attention[idx]
            batch[f"{side}_loss_mask"] = loss_mask[idx].astype(np.int32)
        return batch

    return step, pairs_of


# -- evaluation -----------------------------------------------------------------------------------


def make_evaluate(config, policy: Policy, rewards, eval_prompts: np.ndarray):
    """``evaluate(params, frozen) -> (metrics, texts, scores, kl)`` on the held-out prompts."""
    sampling = _sampling(config, 1, policy.eos_id, policy.pad_id)
    rollout = rl.make_rollout(policy.model, sampling, wrap=policy.wrap)
    reference = jax.jit(lambda frozen, ro: rl.score_rollout(policy.model, frozen, ro)[0])
    mask = np.ones_like(eval_prompts)
    rng = jax.random.PRNGKey(config.evals.seed)

    def evaluate(params, frozen):
        frozen = {k: v for k, v in frozen.items() if k != rl.VALUE_HEAD}
        out = rollout(params, eval_prompts, mask, rng)
        ids, attention = np.asarray(out.input_ids), np.asarray(out.attention_mask)
        scores = rewards(ids, attention)
        ref = np.asarray(reference(frozen, out))
        comp = np.asarray(out.mask, np.float32)
        kl = np.sum((np.asarray(out.logprobs) - ref) * comp, axis=1)
        texts = {
            "prompt": decode_rows(
                policy.tokenizer, np.asarray(out.prompt_ids), np.asarray(out.prompt_mask),
                eos_id=policy.eos_id,
            ),
            "completion": decode_rows(
                policy.tokenizer, np.asarray(out.tokens), np.asarray(out.mask), eos_id=policy.eos_id
            ),
        }  # fmt: skip
        metrics = {
            "reward": float(np.mean(scores)),
            "reward_std": float(np.std(scores)),
            "kl": float(np.mean(kl)),
            "completion_length": float(np.mean(comp.sum(1))),
        }
        return metrics, texts, scores, kl

    return evaluate


def reward_at_kl(points: Sequence[dict], budget: float) -> float | None:
    """The best ``reward`` among ``points`` (dicts with ``kl`` and ``reward``) whose ``kl`` is at
    most ``budget``; None if none is.

    >>> reward_at_kl([{"kl": 0.0, "reward": -1.0}, {"kl": 2.0, "reward": 0.5}], 1.0)
    -1.0
    """
    within = [p["reward"] for p in points if p["kl"] <= budget]
    return max(within) if within else None


# -- main -----------------------------------------------------------------------------------------


def _same(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _as_record(metrics, texts, scores, kl) -> dict:
    return {
        **metrics,
        "samples": {
            **texts,
            "scores": [float(s) for s in scores],
            "kl": [float(k) for k in kl],
        },
    }


def updates_per_step(config: ml_collections.ConfigDict) -> int:
    """Optimizer updates in one loop step: PPO's and GRPO's epochs of minibatches, else 1."""
    group = config.get(config.algorithm) or {}
    return group.get("epochs", 1) * group.get("minibatches", 1)


def optimizer(config: ml_collections.ConfigDict, label_tree):
    """`models.adamw` with its schedule counted in optimizer updates: a loop step of PPO makes
    ``epochs * minibatches`` of them, so warmup and decay span that many times the steps (else
    the learning rate would reach 0 part way through the run)."""
    n = updates_per_step(config)
    if n == 1:
        return models.adamw(config, label_tree)
    scaled = config.copy_and_resolve_references()
    scaled.optim.num_steps = config.optim.num_steps * n
    scaled.optim.warmup_steps = config.optim.warmup_steps * n
    return models.adamw(scaled, label_tree)


@dataclasses.dataclass(frozen=True)
class _Setup:
    policy: Policy
    prompts: dict
    label_tree: dict
    tx: object
    step_fn: Callable
    pairs_of: Callable | None
    evaluate: Callable


# the last few configs' setups: a run resumed in the same process (a test, a sweep) compiles
# nothing again (PPO's and GRPO's steps hold a host callback, which the persistent compilation
# cache never keeps)
_SETUPS: dict[str, _Setup] = {}
_KEEP = 3


def _setup(config: ml_collections.ConfigDict) -> _Setup:
    """The prompts, policy, optimizer, step and evaluation of ``config``, built once."""
    reward_model = load_reward_model(config.reward.workdir)
    saved = json.loads(config.to_json_best_effort())
    saved.pop("max_steps_per_run", None)  # how far this invocation goes changes nothing here
    key = json.dumps([saved, id(reward_model)], sort_keys=True)
    if key in _SETUPS:
        return _SETUPS[key]
    texts = rotten_tomatoes.load(task="sentiment", seed=config.data.split_seed)["train"].text
    policy = build_policy(config, texts[:2000])
    prompts = load_prompts(config, policy.tokenizer)
    logging.info("prompts: train %s, eval %s", prompts["train"].shape, prompts["eval"].shape)
    label_tree = partition.labels(policy.params, policy.rules, what="the LoRA rules")
    tx = optimizer(config, label_tree)
    base_params = jax.device_put(partition.split(policy.params, label_tree)[1])
    rewards = host_rewards(policy, reward_model)
    step_fn, pairs_of = make_step(config, policy, tx, rewards, base_params)
    evaluate = make_evaluate(config, policy, rewards, prompts["eval"])
    while len(_SETUPS) >= _KEEP:
        del _SETUPS[next(iter(_SETUPS))]  # the oldest
    _SETUPS[key] = _Setup(policy, prompts, label_tree, tx, step_fn, pairs_of, evaluate)
    return _SETUPS[key]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Tunes the policy with ``config.algorithm`` against the reward model; writes ``workdir``.

    Resumes from the workdir's newest checkpoint. Returns the results (also results.json).
    """
    _check_groups(config)
    workdir = pathlib.Path(workdir)
    reward_model = load_reward_model(config.reward.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plan = loop.plan_from(config)
    if plan.num_devices > 1:
        raise ValueError(
            f"config.parallel: the RL step scores its rollout on one host and runs on one "
            f"device; set config.parallel.num_devices=1 (this run has {plan.num_devices})"
        )

    # -- data, model, steps (built once per process and config: a rerun reuses the compiles) --
    setup = _setup(config)
    policy, prompts, label_tree, tx = setup.policy, setup.prompts, setup.label_tree, setup.tx
    if jax.process_index() == 0:
        print(partition.summary(policy.params, label_tree), flush=True)
    collections = rl.kl_collections(config.ppo.kl_coef) if config.algorithm == "ppo" else None
    state = train.init_state(
        policy.params, label_tree, tx, seed=config.seed, collections=collections
    )
    base_host = jax.tree.map(np.array, state.frozen)
    start_trainable = jax.tree.map(np.array, state.trainable)
    n_trainable = partition.count(start_trainable)
    step_fn, pairs_of, evaluate = setup.step_fn, setup.pairs_of, setup.evaluate

    # the held-out evaluation of the starting policy, kept for a resumed run
    before_file = workdir / "before.json"
    if before_file.exists():
        before = json.loads(before_file.read_text())
    else:
        before = _as_record(*evaluate(state.params, state.frozen))
        if jax.process_index() == 0:
            report.save_json(before_file, before)
    logging.info("before: reward %.4f, kl %.4f", before["reward"], before["kl"])

    def run_eval(s):
        metrics = evaluate(s.params, s.frozen)[0]
        return {f"eval/{k}": v for k, v in metrics.items()}

    evaluators = [loop.Evaluator("eval", run_eval, every_steps=config.evals.every_steps)]
    bs, seed = config.optim.batch_size, config.data.seed

    def batch_at(step):
        rows = batching.train_batch({"ids": prompts["train"]}, step, batch_size=bs, seed=seed)
        if pairs_of is None:
            return {"prompt_ids": rows["ids"], "prompt_mask": np.ones_like(rows["ids"])}
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), step)
        return pairs_of(rows["ids"], rng)

    # -- loop -------------------------------------------------------------------------------
    run = loop.train(
        config,
        workdir,
        plan=plan,
        state=state,
        step_fn=step_fn,
        batch_at=batch_at,
        evaluators=evaluators,
    )
    if not run.finished:
        return {"step": run.step}

    final = loop.fetch(run.plan, run.state)
    after = _as_record(*evaluate(final.params, final.frozen))
    # what the checkpoint cannot show: the frozen base left bit-identical, the LoRA moved
    base_unchanged = _same(base_host, final.frozen)
    trainable_changed = not _same(start_trainable, final.trainable)
    records = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    points = [{"step": 0, "reward": before["reward"], "kl": before["kl"]}]
    points += [
        {"step": r["step"], "reward": r["eval/reward"], "kl": r["eval/kl"]}
        for r in records
        if "eval/reward" in r and r["step"] < run.step
    ]
    points.append({"step": run.step, "reward": after["reward"], "kl": after["kl"]})
    budgets = tuple(config.evals.kl_budgets)
    row = {
        "algorithm": config.algorithm,
        "steps": run.step,
        "reward_before": before["reward"],
        "reward_after": after["reward"],
        "kl_after": after["kl"],
        "length_after": after["completion_length"],
        "reward_at_kl": {f"{b:g}": reward_at_kl(points, b) for b in budgets},
    }
    results = {
        "step": run.step,
        "algorithm": config.algorithm,
        "model": policy.name,
        "reward_model": {
            "workdir": str(config.reward.workdir),
            "backbone": reward_model.backbone,
            "step": reward_model.step,
            "test_pearson": reward_model.results.get("eval/test/pearson"),
        },
        "eval/reward_before": before["reward"],
        "eval/kl_before": before["kl"],
        "eval/reward": after["reward"],
        "eval/reward_std": after["reward_std"],
        "eval/kl": after["kl"],
        "eval/completion_length": after["completion_length"],
        "points": points,
        "row": row,
        "base_unchanged": base_unchanged,
        "trainable_changed": trainable_changed,
        "trainable_params": n_trainable,
        "total_params": partition.count(policy.params),
    }
    s = config.sampling
    notes = [
        f"{policy.name} with LoRA (rank {config.peft.rank}), {run.step} steps of "
        f"{config.optim.batch_size} prompts of {config.data.prompt_tokens} tokens, "
        f"{s.max_new_tokens} new tokens at temperature {s.temperature:g}. Reward: the "
        f"{reward_model.backbone} reward model of {config.reward.workdir} (step "
        f"{reward_model.step}). Evaluated on {len(prompts['eval'])} held-out prompts, one "
        "fixed rng; KL: the sum over a completion's tokens of log pi - log ref, averaged; "
        "reward at KL ≤ b: the best evaluated reward among the evaluations within b.",
    ]
    table = reports.rlhf_table([row], budgets, notes=notes)
    title = f"{config.algorithm.upper()}, {policy.name} + LoRA"
    plot = lambda: reports.rlhf_rewards_plot(records, points, title)  # noqa: E731
    curves = "" if config.plot_metrics else None
    results = run.finish(results, table=table, figures={"rewards.png": plot}, curves=curves)
    if run.is_chief:
        report.save_json(workdir / "after.json", after)
        samples = reports.rlhf_samples_table(
            before, after, steps=run.step, limit=config.evals.samples_shown
        )
        report.save_text(workdir / "samples.md", samples)
    return results


# -- comparing runs -------------------------------------------------------------------------------


def compare(workdirs: Sequence[str], budgets: Sequence[float] | None = None) -> tuple[str, object]:
    """``(markdown, figure)``: the table of several finished runs and their (KL, reward) points.

    ``budgets``: the KL budgets of the table (None: those of the first run's config).
    """
    rows, runs = [], []
    for w in workdirs:
        path = pathlib.Path(w) / "results.json"
        if not path.is_file():
            raise ValueError(f"{w}: no results.json (not a finished rlhf run)")
        results = json.loads(path.read_text())
        # the launcher saves the run's config beside it (a run started from Python has none)
        saved = pathlib.Path(w) / "config.json"
        config = json.loads(saved.read_text()) if saved.is_file() else None
        if budgets is None:
            if config is None:
                raise ValueError(f"{w}: no config.json to read its KL budgets from; pass budgets")
            budgets = tuple(config["evals"]["kl_budgets"])
        points = results["points"]
        row = dict(results["row"])
        row["reward_at_kl"] = {f"{b:g}": reward_at_kl(points, b) for b in budgets}
        rows.append(row)
        # two runs of one algorithm (another lr or length) keep apart in the legend
        label = ", ".join(
            [row["algorithm"]]
            + ([f"lr {config['optim']['lr']:g}"] if config else [])
            + [f"{results['step']} steps"]
        )
        runs.append((label, points))
    markdown = reports.rlhf_table(
        rows,
        budgets,
        notes=["Reward at KL ≤ b: the best held-out reward among a run's evaluations within b."],
    )
    fig = reports.rlhf_kl_frontier_plot(runs)
    return markdown, fig


def main(argv: Sequence[str]) -> None:
    """``python -m experiments.trainers.rlhf RUN... [--kl B ...] [--out DIR]``."""
    parser = argparse.ArgumentParser(description=compare.__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--kl", type=float, nargs="*", default=None, help="KL budgets (nats)")
    parser.add_argument("--out", default="", help="write compare.md and kl_frontier.png here")
    args = parser.parse_args(argv)
    markdown, fig = compare(args.workdirs, args.kl)
    print(markdown)
    if args.out:
        report.save_text(pathlib.Path(args.out) / "compare.md", markdown)
        report.save_figure(fig, pathlib.Path(args.out) / "kl_frontier.png")


if __name__ == "__main__":
    main(sys.argv[1:])
