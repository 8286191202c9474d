"""The training stages as objects: what each of SFT, teacher RL and MOPD needs from the run.

The stage is the one place that knows the difference between the three stages of
algorithms.md; the driver, the trainer, config validation and the pipeline ask it
(``stage.generates``, ``stage.uses_teacher``, ...) instead of testing ``algorithm.loss``.
``stage_for`` is the registry: a config string becomes a stage here and nowhere else.

=========  =========  ============  ===================================================
stage      generates  uses_teacher  what a sample is
=========  =========  ============  ===================================================
sft        no         no            the reference answer (+ EOS); cross-entropy
rl         yes        no            G on-policy samples; ORM group advantage
mopd       yes        yes           G on-policy samples; the teacher of the prompt's
                                    domain scores every token (dense reverse-KL signal)
=========  =========  ============  ===================================================
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["STAGES", "Stage", "stage_for"]


@dataclass(frozen=True)
class Stage:
    """What one training stage needs from the run (not how its loss is computed)."""

    name: str
    generates: bool
    """Samples responses from the policy. False for SFT: the reference answer is the response,
    so nothing is generated, nothing needs rewards, and no group can lack a learning signal."""
    uses_teacher: bool
    """Every sample is scored by the teacher of its prompt's domain (the dense token signal of
    MOPD); teacher services are started and each group is scored before it is published."""

    @property
    def syncs_weights_every_step(self) -> bool:
        """New weights go to the rollout servers after every optimizer step (on-policy).
        SFT samples nothing between evaluations, which sync when they need to."""
        return self.generates

    @property
    def needs_reference_answers(self) -> bool:
        """Every prompt must carry its reference answer (it is the training target)."""
        return not self.generates


STAGES: dict[str, Stage] = {
    "sft": Stage("sft", generates=False, uses_teacher=False),
    "rl": Stage("rl", generates=True, uses_teacher=False),
    "mopd": Stage("mopd", generates=True, uses_teacher=True),
}


def stage_for(loss: str) -> Stage:
    """The stage of ``algorithm.loss``; a ValueError naming the accepted stages otherwise."""
    try:
        return STAGES[loss]
    except KeyError:
        raise ValueError(
            f"algorithm.loss: unknown stage {loss!r}; accepted: {', '.join(STAGES)}"
        ) from None
