"""Not-true distillation (FedNTD) from the round's global head, over the class-prompt logits.

FedNTD (Lee et al., "Preservation of the Global Knowledge by Not-True Distillation in Federated
Learning", NeurIPS 2022, arXiv 2106.03097; reference code Lee-Gihun/FedNTD,
``algorithms/fedntd/criterion.py``): a site whose data holds few classes forgets, in its local
epochs, what the global model knows about the classes it does not hold. FedNTD adds to the local
loss the KL divergence from the global model's to the local model's softmax over the *not-true*
classes (the true class's logit is dropped), at temperature ``tau``:

    L = L_local + beta * tau^2 * mean_i KL( softmax(t_i[-y_i] / tau) || softmax(s_i[-y_i] / tau) )

Here the logits are the zero-shot ones the prompt term trains: a row's projection against the
class prompts projected by the same head, over the prompt term's temperature (student: the head
being trained; teacher: the global head the site received this round, frozen). Nothing beyond the
head's weights leaves a site: the teacher is what the site received. Rows without a label have no
true class and contribute nothing. With two classes the not-true distribution has one class and
the term is identically zero, so it is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import check_ntd
from common.dp_losses import PUBLIC_OBJECTIVES, PublicNegativesLoss
from common.errors import ConfigError
from common.losses import AUTO_OBJECTIVES, AutoLoss, CLIPLabelLoss

NTD_MIN_CLASSES = 3
"""With fewer classes the not-true softmax is over one class: the term is 0 whatever the heads."""


def not_true(logits: Tensor, labels: Tensor) -> Tensor:
    """``[N, C-1]``: each row's logits without its true class (label >= 0), the others in class
    order (the reference's ``refine_as_not_true``)."""
    n, classes = logits.shape
    keep = torch.ones(n, classes, dtype=torch.bool, device=logits.device)
    keep[torch.arange(n, device=logits.device), labels] = False
    return logits[keep].reshape(n, classes - 1)


class NotTrueDistillation(nn.Module):
    """``beta * tau^2 * KL(teacher || student)`` over the not-true classes; no parameters."""

    def __init__(self, *, beta: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        check_ntd(beta, tau, source="NotTrueDistillation")
        self.beta = float(beta)
        self.tau = float(tau)

    def per_row(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """``[N]`` unweighted ``tau^2 * KL`` per row (0 for a row without a label); the teacher's
        logits are detached."""
        if student.shape != teacher.shape or student.ndim != 2:
            raise ValueError(
                f"NotTrueDistillation: student and teacher logits must be [N, C] alike, got "
                f"{list(student.shape)} and {list(teacher.shape)}"
            )
        check_classes(student.shape[1])
        known = labels >= 0
        safe = torch.where(known, labels, torch.zeros_like(labels))
        log_q = F.log_softmax(not_true(student, safe) / self.tau, dim=1)
        with torch.no_grad():
            p = F.softmax(not_true(teacher.detach(), safe) / self.tau, dim=1)
        kl = (p * (torch.log(p.clamp_min(1e-30)) - log_q)).sum(dim=1)
        return torch.where(known, self.tau**2 * kl, torch.zeros_like(kl))

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """``beta`` times the mean of ``per_row`` over the labelled rows (0 without any)."""
        rows = self.per_row(student, teacher, labels)
        known = labels >= 0
        if not bool(known.any()):
            return rows.sum() * 0.0
        return self.beta * rows[known].mean()


def check_classes(classes: int) -> None:
    """ConfigError naming ``ntd-beta`` when the task has fewer than ``NTD_MIN_CLASSES`` classes
    with class prompts (``classes``: 0 without labels or prompts)."""
    if classes < NTD_MIN_CLASSES:
        raise ConfigError(
            f"ntd-beta: not-true distillation needs labels and class prompts of >= "
            f"{NTD_MIN_CLASSES} classes; the data has {classes}"
        )


def prompt_temperature(loss: nn.Module, *, name: str) -> float:
    """The fixed temperature of ``loss``'s class-prompt term (the logits NTD distils), or a
    ConfigError naming ``ntd-beta`` when the objective ``name`` trains no such term."""
    if isinstance(loss, AutoLoss) and loss.per_example_objective:
        loss = loss.public
    if isinstance(loss, PublicNegativesLoss) and loss.prompt_weight > 0:
        return float(loss.prompt_temperature)
    if isinstance(loss, CLIPLabelLoss) and loss.prompt_weight > 0:
        return float(loss.prompt.temperature)
    tables = {**AUTO_OBJECTIVES, **PUBLIC_OBJECTIVES}
    with_term = ", ".join(k for k, weights in tables.items() if weights["prompt_weight"] > 0)
    raise ConfigError(
        f"ntd-beta: not-true distillation needs an objective with a class-prompt term ({with_term}, "
        f"or auto on labelled data with class prompts); the site trains {name!r}"
    )


def class_logits(rows: Tensor, prompts: Tensor, temperature: float) -> Tensor:
    """Zero-shot logits ``rows @ prompts.T / temperature`` (both projected by one head)."""
    return rows @ prompts.T / temperature
