"""Contrastive and label-aware losses on projection-head outputs (image and/or text rows)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.dp_losses import PUBLIC_OBJECTIVES, ClassProxyLoss, PublicNegativesLoss
from common.errors import ConfigError
from common.loss_rows import (
    check_prompts,
    check_temperature,
    positive_mask,
    stack_rows,
    zero_loss,
)
from common.registries import AUTO_LOSS, LOSSES, loss_info


class InfoNCELoss(nn.Module):
    """CLIP's symmetric InfoNCE over paired rows: mean of image->text and text->image CE.

    ``logits = exp(logit_scale) * image @ text.T`` with target the diagonal; the parameter
    ``logit_scale = log(1 / T)`` is clamped to at most ``log(max_logit_scale)`` in ``forward``.
    ``labels`` are ignored. In-batch negatives: NOT per-example decomposable (no DP-SGD).
    """

    def __init__(
        self,
        *,
        init_temperature: float = 0.07,
        learnable: bool = True,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if init_temperature <= 0:
            raise ValueError(f"InfoNCELoss: init_temperature must be > 0, got {init_temperature}")
        if max_logit_scale <= 0:
            raise ValueError(f"InfoNCELoss: max_logit_scale must be > 0, got {max_logit_scale}")
        self.max_log_scale = math.log(max_logit_scale)
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learnable
        )

    def scale(self) -> Tensor:
        """The clamped multiplier ``1 / T`` applied to the similarities."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    @property
    def temperature(self) -> float:
        """Current effective temperature (after clamping)."""
        return float(1.0 / self.scale().item())

    def forward(
        self, image: Tensor | None = None, text: Tensor | None = None, labels: Tensor | None = None
    ) -> Tensor:
        if image is None or text is None:
            missing = "image" if image is None else "text"
            raise ValueError(
                f"InfoNCELoss: needs paired image and text embeddings; {missing} is missing"
            )
        stack_rows("InfoNCELoss", image, text, None)
        logits = self.scale() * image @ text.T
        target = torch.arange(image.shape[0], device=image.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class PairwiseLabelLoss(nn.Module):
    """The paper's label-aware pairwise loss (arXiv 2502.02048) on stacked rows.

    With ``z`` the stacked rows (``[image; text]`` when both are given, labels repeated):
    ``s_ij = z_i . z_j / T``, ``y_ij = 1`` if the labels are equal else 0, and the loss is
    ``BCEWithLogits(s_ij, y_ij)`` averaged over all pairs ``i < j``. Unlabelled rows (label < 0) only
    enter through the pair (image_k, text_k) of their own example, with ``y = 1``; every other pair
    that involves an unlabelled row is left out. No usable pair gives a zero loss. ``labels`` are
    required. In-batch pairs: NOT per-example decomposable (no DP-SGD).
    """

    def __init__(self, *, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = check_temperature("PairwiseLabelLoss", temperature)

    def forward(
        self, image: Tensor | None = None, text: Tensor | None = None, labels: Tensor | None = None
    ) -> Tensor:
        if labels is None:
            raise ValueError("PairwiseLabelLoss: needs labels")
        rows = stack_rows("PairwiseLabelLoss", image, text, labels)
        assert rows.labels is not None
        known = rows.labels >= 0
        same_example = rows.example[:, None] == rows.example[None, :]
        usable = (known[:, None] & known[None, :]) | same_example
        n = rows.z.shape[0]
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=rows.z.device), diagonal=1)
        pairs = usable & upper
        if not bool(pairs.any()):
            return zero_loss(rows.z)
        logits = (rows.z @ rows.z.T / self.temperature)[pairs]
        targets = positive_mask(rows)[pairs].to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020, L_out) on stacked rows.

    ``L_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{a != i} exp(s_ia) )`` with
    ``s = z z^T / T``; the loss is the mean of ``L_i`` over anchors with ``|P(i)| > 0``. Positives
    ``P(i)``: rows ``j != i`` with the same (non-negative) label, plus the other-modality row of the
    same example. Without labels, positives are the paired rows only (SimCLR/NT-Xent-like), which
    needs both modalities. Unlabelled rows still act as negatives. No anchor with a positive gives a
    zero loss. In-batch negatives: NOT per-example decomposable (no DP-SGD).
    """

    def __init__(self, *, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = check_temperature("SupConLoss", temperature)

    def forward(
        self, image: Tensor | None = None, text: Tensor | None = None, labels: Tensor | None = None
    ) -> Tensor:
        if labels is None and (image is None or text is None):
            raise ValueError("SupConLoss: needs labels, or both image and text (paired positives)")
        rows = stack_rows("SupConLoss", image, text, labels)
        positives = positive_mask(rows)
        counts = positives.sum(dim=1)
        anchors = counts > 0
        if not bool(anchors.any()):
            return zero_loss(rows.z)
        eye = torch.eye(rows.z.shape[0], dtype=torch.bool, device=rows.z.device)
        logits = (rows.z @ rows.z.T / self.temperature).masked_fill(eye, float("-inf"))
        log_prob = F.log_softmax(logits, dim=1)
        pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
        per_anchor = -pos_log_prob[anchors] / counts[anchors].to(log_prob.dtype)
        return per_anchor.mean()


class PromptLoss(nn.Module):
    """Zero-shot classification as a training signal: each row's cross-entropy over the task's
    class prompts, ``CE(z @ prompts.T / T, label)`` with the prompts projected by the same head.

    Every site has every class's prompt, so a site that holds one class still has negatives: under
    label skew a label-contrastive loss has none (its in-batch rows all share the label). Rows
    without a label (< 0) are left out; no labelled row gives a zero loss. Per-row, but the prompts
    pass through the shared text tower in the same forward: not set up for DP-SGD (Opacus).
    """

    def __init__(self, *, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = check_temperature("PromptLoss", temperature)

    def forward(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        prompts: Tensor | None = None,
    ) -> Tensor:
        if labels is None or prompts is None:
            raise ValueError("PromptLoss: needs labels and the projected class prompts")
        rows = stack_rows("PromptLoss", image, text, labels)
        assert rows.labels is not None
        check_prompts("PromptLoss", rows, prompts)
        known = rows.labels >= 0
        if not bool(known.any()):
            return zero_loss(rows.z)
        logits = rows.z[known] @ prompts.T / self.temperature
        return F.cross_entropy(logits, rows.labels[known])


class CLIPLabelLoss(nn.Module):
    """CLIP's InfoNCE plus label terms: ``supcon_weight`` x SupCon and ``prompt_weight`` x PromptLoss.

    InfoNCE alone aligns each image with its own report (retrieval) but leaves classes spread out;
    the label-aware losses group classes (zero-shot AUROC) but lose the pairing. The sum keeps
    both, as UniCL (Yang et al. 2022) does for image-text-label data. The prompt term ties each
    class to its prompt's text (what zero-shot scores) and keeps negatives at a site that holds
    few classes. On ``synthetic-radiology`` the weights and temperatures were chosen on the
    validation split (docs/results/federated/defaults_on_validation.md). Not per-example
    decomposable (no DP-SGD).
    """

    def __init__(
        self,
        *,
        init_temperature: float = 0.07,
        supcon_weight: float = 2.0,
        supcon_temperature: float = 0.2,
        prompt_weight: float = 0.0,
        prompt_temperature: float = 0.1,
        clip_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if supcon_weight < 0 or prompt_weight < 0 or clip_weight < 0:
            raise ValueError(
                f"CLIPLabelLoss: weights must be >= 0, got {clip_weight}, {supcon_weight}, "
                f"{prompt_weight}"
            )
        self.clip = InfoNCELoss(init_temperature=init_temperature)
        self.supcon = SupConLoss(temperature=supcon_temperature)
        self.prompt = PromptLoss(temperature=prompt_temperature)
        self.clip_weight = float(clip_weight)
        self.supcon_weight = float(supcon_weight)
        self.prompt_weight = float(prompt_weight)

    @property
    def uses_prompts(self) -> bool:
        """Whether ``forward`` needs the projected class prompts."""
        return self.prompt_weight > 0

    @property
    def temperature(self) -> float:
        """The InfoNCE term's current temperature (the label terms' are fixed)."""
        return self.clip.temperature

    def forward(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        prompts: Tensor | None = None,
    ) -> Tensor:
        terms: list[Tensor] = []
        if self.clip_weight > 0:
            terms.append(self.clip_weight * self.clip(image, text))
        if self.supcon_weight > 0:
            terms.append(self.supcon_weight * self.supcon(image, text, labels))
        if self.prompt_weight > 0:
            terms.append(self.prompt_weight * self.prompt(image, text, labels, prompts=prompts))
        if not terms:
            raise ValueError("CLIPLabelLoss: every weight is 0")
        return torch.stack(terms).sum()


AUTO_OBJECTIVES: dict[str, dict[str, float]] = {
    "infonce": {"clip_weight": 1.0, "supcon_weight": 0.0, "prompt_weight": 0.0},
    "infonce+supcon": {"clip_weight": 1.0, "supcon_weight": 2.0, "prompt_weight": 0.0},
    "infonce+supcon+prompts": {"clip_weight": 1.0, "supcon_weight": 2.0, "prompt_weight": 1.0},
    "infonce+prompts": {"clip_weight": 1.0, "supcon_weight": 0.0, "prompt_weight": 1.0},
    "supcon": {"clip_weight": 0.0, "supcon_weight": 1.0, "prompt_weight": 0.0},
}
"""The weights ``AutoLoss`` gives each objective ``registries.choose_loss`` can choose: the same
terms as the registered loss of that name (``supcon``: SupCon alone, at its temperature 0.1)."""


class AutoLoss(CLIPLabelLoss):
    """The ``auto`` loss: ``CLIPLabelLoss`` whose terms are chosen from the training data.

    One module (parameter ``clip.logit_scale``) whatever is chosen, so a coordinator that has not
    seen the sites' data builds the same state dict as every site. ``choose(objective)`` sets the
    weights of ``AUTO_OBJECTIVES[objective]``, or, for a site that trains under sample-level DP,
    of the per-example ``PUBLIC_OBJECTIVES[objective]`` (``self.public``, no parameters);
    ``common.training.choose_objective`` calls it from the data. ``forward`` before a choice is
    an error.
    """

    def __init__(self, *, init_temperature: float = 0.07, objective: str | None = None) -> None:
        super().__init__(init_temperature=init_temperature, supcon_weight=0.0)
        self.public = PublicNegativesLoss(pair_weight=1.0, prompt_weight=1.0)
        self.objective: str | None = None
        if objective is not None:
            self.choose(objective)

    def choose(self, objective: str) -> None:
        """Train with the terms of the registered loss ``objective`` (a key of AUTO_OBJECTIVES or
        PUBLIC_OBJECTIVES)."""
        if objective in PUBLIC_OBJECTIVES:
            weights = PUBLIC_OBJECTIVES[objective]
            self.public.pair_weight = weights["pair_weight"]
            self.public.prompt_weight = weights["prompt_weight"]
            self.objective = objective
            return
        if objective not in AUTO_OBJECTIVES:
            raise ConfigError(
                f"loss 'auto': objective must be one of "
                f"{', '.join([*AUTO_OBJECTIVES, *PUBLIC_OBJECTIVES])}, got {objective!r}"
            )
        weights = AUTO_OBJECTIVES[objective]
        self.clip_weight = weights["clip_weight"]
        self.supcon_weight = weights["supcon_weight"]
        self.prompt_weight = weights["prompt_weight"]
        self.supcon.temperature = 0.1 if objective == "supcon" else 0.2
        self.objective = objective

    @property
    def per_example_objective(self) -> bool:
        """Whether the chosen objective is per-example (valid under DP-SGD: ``per_example``)."""
        return self.objective in PUBLIC_OBJECTIVES

    @property
    def uses_prompts(self) -> bool:
        return self.per_example_objective or super().uses_prompts

    def per_example(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        prompts: Tensor | None = None,
    ) -> Tensor:
        """Unreduced loss [B] of a per-example objective (``PublicNegativesLoss``)."""
        if not self.per_example_objective:
            raise ValueError(f"AutoLoss: objective {self.objective!r} is not per-example")
        return self.public.per_example(image, text, labels, prompts=prompts)

    def forward(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        prompts: Tensor | None = None,
    ) -> Tensor:
        if self.objective is None:
            raise ValueError("AutoLoss: no objective chosen yet (choose one from the data first)")
        if self.per_example_objective:
            return self.public(image, text, labels, prompts=prompts)
        return super().forward(image, text, labels, prompts=prompts)


# Loss names by need (common/registries.py LOSSES is the one list).
NEEDS_LABELS = tuple(name for name, info in LOSSES.items() if info.labels)
NEEDS_PROMPTS = tuple(name for name, info in LOSSES.items() if info.prompts)


def loss_is_per_example_decomposable(name: str) -> bool:
    """True when each example's loss depends on that example alone (required for DP-SGD)."""
    return loss_info(name).per_example


def _clip_label(name: str, temperature: float | None) -> nn.Module:
    weights = AUTO_OBJECTIVES[name]
    if temperature is None:
        return CLIPLabelLoss(**weights)
    return CLIPLabelLoss(init_temperature=temperature, **weights)


def _proxy(num_classes: int | None, dim: int, kwargs: dict[str, float]) -> nn.Module:
    assert num_classes is not None
    if dim < 1:
        raise ConfigError(f"loss 'proxy': dim must be >= 1, got {dim}")
    return ClassProxyLoss(num_classes=num_classes, dim=dim, **kwargs)


def _public(name: str, temperature: float | None) -> nn.Module:
    extra = {} if temperature is None else {"pair_temperature": temperature}
    return PublicNegativesLoss(**PUBLIC_OBJECTIVES[name], **extra)


# name -> (temperature or None, num_classes, dim) -> the loss module; one per registered loss.
_BUILDERS: dict[str, Callable[[float | None, int | None, int], nn.Module]] = {
    "infonce": lambda t, n, d: InfoNCELoss() if t is None else InfoNCELoss(init_temperature=t),
    "infonce+supcon": lambda t, n, d: _clip_label("infonce+supcon", t),
    "infonce+supcon+prompts": lambda t, n, d: _clip_label("infonce+supcon+prompts", t),
    "infonce+prompts": lambda t, n, d: _clip_label("infonce+prompts", t),
    "pairwise": lambda t, n, d: PairwiseLabelLoss(**({} if t is None else {"temperature": t})),
    "supcon": lambda t, n, d: SupConLoss(**({} if t is None else {"temperature": t})),
    "proxy": lambda t, n, d: _proxy(n, d, {} if t is None else {"temperature": t}),
    "prompts": lambda t, n, d: _public("prompts", t),
    "infonce-public": lambda t, n, d: _public("infonce-public", t),
    "infonce-public+prompts": lambda t, n, d: _public("infonce-public+prompts", t),
    AUTO_LOSS: lambda t, n, d: AutoLoss() if t is None else AutoLoss(init_temperature=t),
}
assert set(_BUILDERS) == set(LOSSES), "common/losses.py: a registered loss has no builder"


def build_loss(
    name: str,
    *,
    num_classes: int | None,
    dim: int,
    temperature: float | None = None,
    objective: str | None = None,
) -> nn.Module:
    """Build a loss by name; ``temperature=None`` keeps the loss's default (initial) value.

    ``num_classes`` is None for unlabelled data, which only losses without labels accept; ``dim``
    is the head's output dimension (used by "proxy"). ``objective``: for ``auto``, the objective
    already chosen from the data (None: chosen later, before training).
    """
    info = loss_info(name)
    if temperature is not None and temperature <= 0:
        raise ConfigError(f"loss temperature must be > 0, got {temperature}")
    if info.auto:
        auto = AutoLoss() if temperature is None else AutoLoss(init_temperature=temperature)
        if objective is not None:
            auto.choose(objective)
        return auto
    if info.labels and num_classes is None:
        raise ConfigError(
            f"loss {name!r} needs labelled data (num_classes); use 'infonce' without labels"
        )
    if num_classes is not None and num_classes < info.min_classes:
        raise ConfigError(
            f"loss {name!r}: num_classes must be >= {info.min_classes}, got {num_classes}"
        )
    return _BUILDERS[name](temperature, num_classes, dim)
