"""Post-training: instruction tuning, reward models, preference optimisation and RLHF.

Submodules load on first use::

    from ftlab.posttrain import dpo, losses, logprobs, rl, sft

- ``losses``: Bradley-Terry, DPO / IPO / SimPO, PPO (clipped policy and value), GAE, GRPO
  advantages, KL estimators and the adaptive KL controller, as pure JAX functions.
- ``logprobs``: per-token and per-sequence log-probabilities of a decoder's completions, and the
  reference policy as the same weights with the method switched off.
- ``metrics``: Pearson, Spearman and pairwise accuracy of scores against human ratings.
- ``dpo``: the DPO / IPO / SimPO train step, the reference being the base with the method off.
- ``rl``: compiled rollouts (KV-cache sampling with per-token log-probs), GRPO and PPO steps.
- ``sft``: chat conversations to tokens with an assistant-only loss mask, packed several per row.
"""

from ftlab import _lazy

_SUBMODULES = ("dpo", "logprobs", "losses", "metrics", "reward", "rl", "sft")

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES)
