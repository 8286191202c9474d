"""Pure math of the platform (docs: algorithms.md): tensors in, tensors out.

Every formula of the algorithms contract lives here as a pure torch function, reused unchanged
by every backend. Nothing in this package imports Ray, SGLang, Megatron, Redis, MLflow or a
role package (rollout, trainer, teachers, envs); import-linter enforces it.

Modules:
    advantages  group-relative ORM advantages (GRPO, Dr. GRPO, RLOO)
    losses      MOPD (eq. 7-9), teacher-RL policy gradient, SFT; aggregation rules
    loss_args   the losses' option strings and argument checks
    stages      SFT, RL, MOPD as objects: what each needs, its loss from ``LossInputs``
    kl          k1/k2/k3 estimators, masked mean, train/rollout mismatch
    logprobs    chunked selective log-softmax, entropy, top-k log-probs
    routing     Rollout Routing Replay gate weights, route agreement, route dtype
    staleness   partial-rollout staleness and admission
    registry    the one map from config strings to these functions (stages: ``STAGES``)

Shape-suffix legend (tensor names end in their dims):
    B  sequences in a batch          T  response tokens (positions) of a sequence
    G  samples per prompt (a group)  N  groups (prompts), or any flattened rows
    K  teachers, or top-k entries per position (said where used)
    L  MoE layers                    E  experts per MoE layer
    k  experts chosen per token      V  vocabulary
e.g. ``logp_train_BT`` is [B, T], ``rewards_NG`` is [N, G], ``routes_TLk`` is [T, L, k].

Dtypes: math runs in fp32 whatever the input dtype (bf16/fp16 inputs are upcast); losses and
metrics come back in fp32 / python floats.
"""

from mopd.algo.advantages import broadcast_to_tokens, group_advantages
from mopd.algo.kl import kl_k1, kl_k2, kl_k3, masked_mean, train_rollout_mismatch
from mopd.algo.logprobs import (
    entropy_from_logits,
    gather_log_softmax,
    selective_log_softmax,
    topk_log_softmax,
)
from mopd.algo.losses import (
    aggregate,
    mopd_loss,
    policy_gradient_loss,
    sft_loss,
    topk_reverse_kl,
)
from mopd.algo.routing import replay_gate_weights, route_agreement, routes_dtype
from mopd.algo.staleness import admissible, sample_staleness

__all__ = [
    "admissible",
    "aggregate",
    "broadcast_to_tokens",
    "entropy_from_logits",
    "gather_log_softmax",
    "group_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_mean",
    "mopd_loss",
    "policy_gradient_loss",
    "replay_gate_weights",
    "route_agreement",
    "routes_dtype",
    "sample_staleness",
    "selective_log_softmax",
    "sft_loss",
    "topk_log_softmax",
    "topk_reverse_kl",
    "train_rollout_mismatch",
]
