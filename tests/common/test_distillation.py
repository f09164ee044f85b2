"""FedNTD's not-true distillation (common/distillation.py) against the reference's formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.distillation import NotTrueDistillation, not_true, prompt_temperature
from common.errors import ConfigError
from common.losses import AUTO_OBJECTIVES, AutoLoss, InfoNCELoss, build_loss


def _reference_ntd(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, tau: float
) -> torch.Tensor:
    """Lee-Gihun/FedNTD criterion.py ``_ntd_loss`` and utils.py ``refine_as_not_true``, longhand."""
    classes = student.shape[1]
    nt_positions = torch.arange(0, classes).view(1, -1).repeat(student.size(0), 1)
    nt_positions = nt_positions[nt_positions[:, :classes] != labels.view(-1, 1)]
    nt_positions = nt_positions.view(-1, classes - 1)
    s = torch.gather(student, 1, nt_positions)
    t = torch.gather(teacher, 1, nt_positions)
    pred_probs = F.log_softmax(s / tau, dim=1)
    dg_probs = torch.softmax(t / tau, dim=1)
    return (tau**2) * torch.nn.KLDivLoss(reduction="batchmean")(pred_probs, dg_probs)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_ntd_equals_the_reference_implementation(tau: float) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(32, 5, generator=gen) * 3
    teacher = torch.randn(32, 5, generator=gen) * 3
    labels = torch.randint(0, 5, (32,), generator=gen)
    ours = NotTrueDistillation(beta=1.0, tau=tau)(student, teacher, labels)
    torch.testing.assert_close(
        ours, _reference_ntd(student, teacher, labels, tau), rtol=1e-6, atol=1e-7
    )
    doubled = NotTrueDistillation(beta=2.0, tau=tau)(student, teacher, labels)
    torch.testing.assert_close(doubled, 2 * ours)


def test_not_true_drops_the_true_class_and_keeps_the_others_in_order() -> None:
    logits = torch.arange(12.0).reshape(3, 4)
    out = not_true(logits, torch.tensor([0, 2, 3]))
    assert out.tolist() == [[1, 2, 3], [4, 5, 7], [8, 9, 10]]


def test_the_true_class_logit_neither_changes_the_term_nor_gets_a_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(8, 5, generator=gen, requires_grad=True)
    teacher = torch.randn(8, 5, generator=gen)
    labels = torch.randint(0, 5, (8,), generator=gen)
    ntd = NotTrueDistillation(tau=2.0)
    value = ntd(student, teacher, labels)
    value.backward()
    assert student.grad is not None
    true = student.grad[torch.arange(8), labels]
    assert torch.equal(true, torch.zeros(8))
    assert student.grad.abs().sum() > 0
    bump = torch.zeros(8, 5)
    bump[torch.arange(8), labels] = 7.0
    torch.testing.assert_close(ntd(student + bump, teacher - bump, labels), value)
    other = torch.zeros(8, 5)
    other[torch.arange(8), (labels + 1) % 5] = 2.0
    assert not torch.allclose(ntd(student + other, teacher, labels), value)


def test_ntd_is_zero_only_where_the_student_matches_the_teacher_and_is_kl_teacher_to_student() -> (
    None
):
    gen = torch.Generator().manual_seed(2)
    teacher = torch.randn(6, 4, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, -1, 1])
    ntd = NotTrueDistillation()
    shifted = teacher + torch.randn(6, 1, generator=gen)  # a per-row shift: the same softmax
    assert float(ntd(shifted, teacher, labels)) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(6, 4, generator=gen)
    rows = ntd.per_row(student, teacher, labels)
    assert rows[4] == 0 and bool((rows[[0, 1, 2, 3, 5]] > 0).all())  # the unlabelled row: nothing
    p = torch.softmax(not_true(teacher[:1], labels[:1]), dim=1)
    q = torch.softmax(not_true(student[:1], labels[:1]), dim=1)
    forward_kl = float((p * (p.log() - q.log())).sum())
    backward_kl = float((q * (q.log() - p.log())).sum())
    assert float(rows[0]) == pytest.approx(forward_kl, rel=1e-5)
    assert forward_kl != pytest.approx(backward_kl, rel=1e-3)
    assert float(ntd(student, teacher, torch.full((6,), -1))) == 0.0


def test_ntd_refuses_two_classes_and_bad_settings() -> None:
    with pytest.raises(ConfigError, match=r"ntd-beta.*>= 3 classes"):
        NotTrueDistillation().per_row(
            torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
        )
    with pytest.raises(ConfigError, match="ntd-beta"):
        NotTrueDistillation(beta=-1.0)
    with pytest.raises(ConfigError, match="ntd-tau"):
        NotTrueDistillation(tau=0.0)


@pytest.mark.parametrize(
    "objective", [k for k, w in AUTO_OBJECTIVES.items() if w["prompt_weight"] > 0]
)
def test_the_distilled_logits_are_at_the_prompt_terms_temperature(objective: str) -> None:
    loss = build_loss(objective, num_classes=5, dim=8)
    assert prompt_temperature(loss, name=objective) == loss.prompt.temperature
    assert (
        prompt_temperature(AutoLoss(objective=objective), name=objective) == loss.prompt.temperature
    )


@pytest.mark.parametrize(
    "objective", [k for k, w in AUTO_OBJECTIVES.items() if w["prompt_weight"] == 0]
)
def test_objectives_without_a_prompt_term_have_nothing_to_distil(objective: str) -> None:
    with pytest.raises(ConfigError, match=r"ntd-beta.*class-prompt term"):
        prompt_temperature(AutoLoss(objective=objective), name=objective)
    with pytest.raises(ConfigError, match="ntd-beta"):
        prompt_temperature(InfoNCELoss(), name="infonce")
