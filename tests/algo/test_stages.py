"""The stage registry: what each stage needs from the run, its loss through ``LossInputs``
(the same numbers as the pure loss called directly), its loss arguments from the config, and
the shared max_staleness check."""

from __future__ import annotations

import pytest
import torch

from mopd.algo import registry
from mopd.algo.losses import mopd_loss, policy_gradient_loss, sft_loss
from mopd.algo.stages import STAGES, LossInputs, stage_for
from mopd.algo.staleness import max_staleness_problem
from mopd.config.schema import AlgorithmConfig, SchedulerConfig


def _inputs(seed: int = 0, *, teacher: bool = True, topk: bool = False) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    B, T, K = 3, 5, 4
    logp = -torch.rand(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    top = torch.log_softmax(torch.randn(B, T, K, generator=g), dim=-1)
    return LossInputs(
        logp_train_BT=logp.requires_grad_(),
        logp_rollout_BT=logp.detach() + 0.05 * torch.randn(B, T, generator=g),
        adv_orm_B=torch.randn(B, generator=g),
        mask_BT=mask,
        logp_teacher_BT=-torch.rand(B, T, generator=g) if teacher else None,
        teacher_topk_logp_BTK=top if topk else None,
        student_topk_logp_BTK=torch.log_softmax(torch.randn(B, T, K, generator=g), -1)
        if topk
        else None,
    )


def test_what_each_stage_needs():
    sft, rl, mopd = STAGES["sft"], STAGES["rl"], STAGES["mopd"]
    assert (sft.generates, sft.uses_teacher, sft.needs_reference_answers) == (False, False, True)
    assert (rl.generates, rl.uses_teacher, rl.needs_group_signal) == (True, False, True)
    assert (mopd.generates, mopd.uses_teacher, mopd.needs_group_signal) == (True, True, False)
    assert [s.syncs_weights_every_step for s in (sft, rl, mopd)] == [False, True, True]
    assert [s.measures_train_rollout_mismatch for s in (sft, rl, mopd)] == [False, True, True]
    cfg = AlgorithmConfig(loss="mopd", teacher_kl="topk")
    assert mopd.wants_topk(cfg) and not rl.wants_topk(cfg)
    assert {"sft": sft_loss, "rl": policy_gradient_loss, "mopd": mopd_loss} == registry.LOSSES
    with pytest.raises(ValueError, match=r"algorithm\.loss: unknown key 'dpo'; accepted: sft, rl"):
        stage_for("dpo")


@pytest.mark.parametrize("teacher_kl", ["sampled", "topk"])
def test_stage_losses_equal_the_pure_losses(teacher_kl: str):
    x = _inputs(topk=teacher_kl == "topk")
    for name, direct in [
        ("sft", lambda kw: sft_loss(x.logp_train_BT, x.mask_BT, **kw)),
        (
            "rl",
            lambda kw: policy_gradient_loss(
                x.logp_train_BT, x.logp_rollout_BT, x.adv_orm_B, x.mask_BT, **kw
            ),
        ),
    ]:
        stage = stage_for(name)
        kw = stage.loss_kwargs(AlgorithmConfig(loss=name))
        (a, ma), (b, mb) = stage.loss(x, **kw), direct(kw)
        assert torch.equal(a, b) and ma == mb
    stage = stage_for("mopd")
    kw = stage.loss_kwargs(AlgorithmConfig(loss="mopd", teacher_kl=teacher_kl, alpha=0.5))
    assert kw["alpha"] == 0.5 and kw["teacher_kl"] == teacher_kl
    loss, metrics = stage.loss(x, **kw)
    if teacher_kl == "topk":
        ref = mopd_loss(
            x.logp_train_BT, x.logp_rollout_BT, None, x.adv_orm_B, x.mask_BT, **kw,
            teacher_topk_logp_BTK=x.teacher_topk_logp_BTK,
            student_topk_logp_BTK=x.student_topk_logp_BTK,
        )  # fmt: skip
    else:
        ref = mopd_loss(
            x.logp_train_BT, x.logp_rollout_BT, x.logp_teacher_BT, x.adv_orm_B, x.mask_BT, **kw
        )
    assert torch.equal(loss, ref[0]) and metrics == ref[1]
    loss.backward()
    assert x.logp_train_BT.grad is not None and torch.isfinite(x.logp_train_BT.grad).all()


def test_stage_refusals_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match="needs teacher log-probs"):
        stage_for("mopd").loss(_inputs(teacher=False), **stage_for("mopd").loss_kwargs(
            AlgorithmConfig(loss="mopd")
        ))  # fmt: skip
    with pytest.raises(ValueError, match=r"algorithm\.kl_coef=0\.1.*set algorithm\.kl_coef=0"):
        stage_for("rl").loss_kwargs(AlgorithmConfig(loss="rl", kl_coef=0.1))


def test_one_max_staleness_check_for_config_scheduler_and_admission():
    from mopd.algo.staleness import admissible
    from mopd.config.validate import validate
    from mopd.scheduler.scheduler import SchedulerError
    from tests.scheduler.test_scheduler import make, sum_source

    assert max_staleness_problem(0) is None and max_staleness_problem(3) is None
    for bad in (-1, True, 1.5):
        assert "must be an int >= 0" in max_staleness_problem(bad)
    with pytest.raises(ValueError, match=r"max_staleness=-1: bad value -1"):
        admissible(0, torch.zeros(3, dtype=torch.long), None, -1)
    with pytest.raises(SchedulerError, match=r"scheduler\.max_staleness: bad value -2"):
        make([sum_source()], mode="async", max_staleness=-2)
    from mopd.config.schema import RunConfig

    run = RunConfig()
    run.scheduler = SchedulerConfig(mode="async", max_staleness=-1)
    problems = [str(p) for p in validate(run)]
    assert any("scheduler.max_staleness" in p and "bad value -1" in p for p in problems), problems


def test_config_fields_are_loss_keywords_and_config_fields():
    import dataclasses
    import inspect

    config = {f.name for f in dataclasses.fields(AlgorithmConfig)}
    for stage in STAGES.values():
        params = inspect.signature(stage.loss_fn).parameters
        for name in stage.config_fields:
            assert name in config, (stage.name, name)
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (stage.name, name)
        cfg = AlgorithmConfig(loss=stage.name)
        assert stage.loss_kwargs(cfg) == {n: getattr(cfg, n) for n in stage.config_fields}
