"""The training stages as objects: what each of SFT, teacher RL and MOPD needs from the run,
and the loss it trains with.

The stage is the one place that knows the difference between the three stages of
algorithms.md; the run, the trainer, config validation and the pipeline ask it
(``stage.generates``, ``stage.uses_teacher``, ``stage.loss(inputs, **kwargs)``, ...) instead of
testing ``algorithm.loss``. ``STAGES`` is the registry: a config string becomes a stage here
and nowhere else (``mopd.algo.registry.LOSSES`` is read from it).

=========  =========  ============  ===================================================
stage      generates  uses_teacher  what a sample is
=========  =========  ============  ===================================================
sft        no         no            the reference answer (+ EOS); cross-entropy
rl         yes        no            G on-policy samples; ORM group advantage
mopd       yes        yes           G on-policy samples; the teacher of the prompt's
                                    domain scores every token (dense reverse-KL signal)
=========  =========  ============  ===================================================

Shape suffixes: B sequences, T response positions, K top-k entries per position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mopd.algo.losses import Metrics, mopd_loss, policy_gradient_loss, sft_loss

if TYPE_CHECKING:  # mopd.config imports the registry, which imports this module
    from mopd.config.schema import AlgorithmConfig

__all__ = ["STAGES", "LossInputs", "Stage", "stage_for"]

LossResult = tuple[torch.Tensor, Metrics]


@dataclass(frozen=True)
class LossInputs:
    """What a stage's loss reads from one micro-batch, built once by the trainer
    (``trainer.common.loss_inputs``) from its packed batch. All [B, T] tensors share the
    layout of ``mask_BT``; values at mask-off positions are never read."""

    logp_train_BT: torch.Tensor
    """[B, T] trainer log-probs of the response tokens (the only input with a gradient)."""
    logp_rollout_BT: torch.Tensor
    """[B, T] rollout-engine log-probs of the same tokens (mu_theta; unused by SFT)."""
    adv_orm_B: torch.Tensor
    """[B] the scheduler's outcome-reward (group) advantage per sample."""
    mask_BT: torch.Tensor
    """[B, T] bool: response tokens that carry loss."""
    logp_teacher_BT: torch.Tensor | None = None
    """[B, T] teacher log-probs of the sampled tokens (stages that use a teacher)."""
    teacher_topk_logp_BTK: torch.Tensor | None = None
    """[B, T, K] the teacher's top-k log-probs (``teacher_kl=topk``)."""
    student_topk_logp_BTK: torch.Tensor | None = None
    """[B, T, K] the student's log-probs at the teacher's top-k ids (differentiable)."""


@dataclass(frozen=True)
class Stage:
    """One training stage: what it needs from the run and the loss it trains with. Each stage
    is a subclass that says how its pure loss (``loss_fn``) reads a ``LossInputs`` record
    (``loss``) and which of the algorithm config's fields it takes (``loss_kwargs``)."""

    name: str
    generates: bool
    """Samples responses from the policy. False for SFT: the reference answer is the response,
    so nothing is generated, nothing needs rewards, and no group can lack a learning signal."""
    uses_teacher: bool
    """Every sample is scored by the teacher of its prompt's domain (the dense token signal of
    MOPD); teacher services are started and each group is scored before it is published."""
    needs_group_signal: bool
    """The group advantage is the only learning signal (RL): a group of one teaches nothing."""

    loss_fn: ClassVar[Callable[..., LossResult]]
    """The pure loss of ``mopd.algo.losses`` (its equations are in its docstring)."""
    config_fields: ClassVar[tuple[str, ...]]
    """The ``AlgorithmConfig`` fields ``loss_fn`` takes, as keyword arguments of the same name."""

    @property
    def syncs_weights_every_step(self) -> bool:
        """New weights go to the rollout servers after every optimizer step (on-policy).
        SFT samples nothing between evaluations, which sync when they need to."""
        return self.generates

    @property
    def needs_reference_answers(self) -> bool:
        """Every prompt must carry its reference answer (it is the training target)."""
        return not self.generates

    @property
    def measures_train_rollout_mismatch(self) -> bool:
        """Micro-batches carry the rollout engine's log-probs of sampled tokens, so the trainer
        reports how far its own log-probs are from them (``train_rollout_k3``). SFT targets
        were not sampled: there is no rollout policy to compare with."""
        return self.generates

    def wants_topk(self, cfg: AlgorithmConfig) -> bool:
        """Whether the loss reads the teacher's and the student's top-k log-probs."""
        return self.uses_teacher and cfg.teacher_kl == "topk"

    def loss_kwargs(self, cfg: AlgorithmConfig) -> dict[str, Any]:
        """The loss's keyword arguments from the algorithm config (a ValueError naming the
        field for a setting this stage cannot honour)."""
        return {name: getattr(cfg, name) for name in self.config_fields}

    def loss(self, inputs: LossInputs, **kwargs: Any) -> LossResult:
        """``(loss, metrics)`` of one micro-batch; ``kwargs`` from ``loss_kwargs``."""
        raise NotImplementedError


class _SftStage(Stage):
    """Stage 1: cross-entropy on the reference answers."""

    loss_fn = staticmethod(sft_loss)
    config_fields = ("aggregation",)

    def loss(self, inputs: LossInputs, **kwargs: Any) -> LossResult:
        return sft_loss(inputs.logp_train_BT, inputs.mask_BT, **kwargs)


class _RlStage(Stage):
    """Stage 2: teacher RL, the policy gradient on the ORM group advantage."""

    loss_fn = staticmethod(policy_gradient_loss)
    config_fields = ("is_correction", "eps_low", "eps_high", "clip_low", "clip_high", "aggregation")

    def loss_kwargs(self, cfg: AlgorithmConfig) -> dict[str, Any]:
        if cfg.kl_coef > 0:
            raise ValueError(
                f"algorithm.kl_coef={cfg.kl_coef}: the KL penalty needs reference-policy "
                "log-probs, which micro-batches do not carry yet; set algorithm.kl_coef=0"
            )
        return super().loss_kwargs(cfg)

    def loss(self, inputs: LossInputs, **kwargs: Any) -> LossResult:
        x = inputs
        return policy_gradient_loss(
            x.logp_train_BT, x.logp_rollout_BT, x.adv_orm_B, x.mask_BT, **kwargs
        )


class _MopdStage(Stage):
    """Stage 3: multi-teacher on-policy distillation (the teacher term plus the ORM term)."""

    loss_fn = staticmethod(mopd_loss)
    config_fields = (
        "alpha",
        "eps_low",
        "eps_high",
        "aggregation",
        "student_logprob_source",
        "teacher_kl",
    )

    def loss(self, inputs: LossInputs, **kwargs: Any) -> LossResult:
        x = inputs
        if x.logp_teacher_BT is None:
            raise ValueError(
                "algorithm.loss=mopd needs teacher log-probs, but a micro-batch has none; "
                "score every sample with its domain teacher before training"
            )
        if kwargs["teacher_kl"] == "topk":
            return mopd_loss(
                x.logp_train_BT, x.logp_rollout_BT, None, x.adv_orm_B, x.mask_BT, **kwargs,
                teacher_topk_logp_BTK=x.teacher_topk_logp_BTK,
                student_topk_logp_BTK=x.student_topk_logp_BTK,
            )  # fmt: skip
        return mopd_loss(
            x.logp_train_BT, x.logp_rollout_BT, x.logp_teacher_BT, x.adv_orm_B, x.mask_BT,
            **kwargs,
        )  # fmt: skip


STAGES: dict[str, Stage] = {
    "sft": _SftStage("sft", generates=False, uses_teacher=False, needs_group_signal=False),
    "rl": _RlStage("rl", generates=True, uses_teacher=False, needs_group_signal=True),
    "mopd": _MopdStage("mopd", generates=True, uses_teacher=True, needs_group_signal=False),
}


def stage_for(loss: str) -> Stage:
    """The stage of ``algorithm.loss``; a ValueError naming the accepted stages otherwise."""
    try:
        return STAGES[loss]
    except KeyError:
        raise ValueError(
            f"algorithm.loss: unknown key {loss!r}; accepted: {', '.join(STAGES)}"
        ) from None
