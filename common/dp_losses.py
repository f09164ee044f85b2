"""Losses valid under DP-SGD: each example's term depends on that example and on public,
data-independent inputs only (parameters, the task's class prompts), never on other examples.

Removing one example from a batch then removes exactly its own term, so Opacus' per-example clipping
bounds the summed gradient's sensitivity by the clipping norm (tests/client/test_dp_losses.py checks
this through the production DP-SGD step). In-batch losses (common/losses.py) do not have this
property and are refused under sample-level DP (common/privacy.py ``require_sample_level_dp``).

- ``ClassProxyLoss`` ("proxy"): cross-entropy against learnable class proxies (trained by DP-SGD).
- ``PublicNegativesLoss`` ("prompts", "infonce-public", "infonce-public+prompts"): the class prompts
  (public task metadata, projected by the head and treated as a per-step constant) as the
  classes of a zero-shot cross-entropy and as the negatives of an image-text InfoNCE whose only
  positive is the example's own pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.loss_rows import check_prompts, check_temperature, stack_rows


class ProxyClassifier(nn.Module):
    """Cosine-style class logits ``z @ normalize(proxies).T / T``: [N, dim] -> [N, C].

    A module of its own so that Opacus can hook it: put it in the private model beside the head
    (its per-sample gradients come from Opacus' functorch fallback) to train the proxies with DP-SGD.
    """

    def __init__(self, *, num_classes: int, dim: int, temperature: float = 0.1) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ProxyClassifier: num_classes must be >= 2, got {num_classes}")
        if dim < 1:
            raise ValueError(f"ProxyClassifier: dim must be >= 1, got {dim}")
        self.num_classes = num_classes
        self.temperature = check_temperature("ProxyClassifier", temperature)
        self.proxies = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, z: Tensor) -> Tensor:
        proxies = F.normalize(self.proxies, p=2.0, dim=-1, eps=1e-8)
        return z @ proxies.T / self.temperature


class ClassProxyLoss(nn.Module):
    """Cross-entropy against learnable class proxies: per-example decomposable (DP-SGD safe).

    The proxies [C, dim] live in ``self.classifier`` (parameter name ``classifier.proxies``) and are
    normalised in the forward pass; for example i and each modality m present,
    ``logits_c = z_i^m . p_c / T`` (p_c unit norm) and the term is ``CE(logits, y_i)``; the image and
    text terms are summed. Example i's term depends only on example i and the proxies. Labels are
    required and must be in ``[0, C)``.
    """

    def __init__(self, *, num_classes: int, dim: int, temperature: float = 0.1) -> None:
        super().__init__()
        self.classifier = ProxyClassifier(num_classes=num_classes, dim=dim, temperature=temperature)

    @property
    def proxies(self) -> nn.Parameter:
        """The raw (unnormalised) class proxies [C, dim]."""
        return self.classifier.proxies

    def per_example(
        self, image: Tensor | None = None, text: Tensor | None = None, labels: Tensor | None = None
    ) -> Tensor:
        """Unreduced loss [B]: image term + text term of each example (for DP / Opacus)."""
        if labels is None:
            raise ValueError("ClassProxyLoss: needs labels")
        stack_rows("ClassProxyLoss", image, text, labels)
        num_classes = self.classifier.num_classes
        if bool((labels < 0).any()) or bool((labels >= num_classes).any()):
            raise ValueError(
                f"ClassProxyLoss: labels must be in [0, {num_classes}), "
                f"got min {int(labels.min())} max {int(labels.max())}"
            )
        # One classifier call per modality (not on the stacked rows): under Opacus each call's
        # batch dimension must be the example dimension for per-sample gradients.
        terms = [
            F.cross_entropy(self.classifier(x), labels, reduction="none")
            for x in (image, text)
            if x is not None
        ]
        return torch.stack(terms).sum(dim=0)

    def forward(
        self, image: Tensor | None = None, text: Tensor | None = None, labels: Tensor | None = None
    ) -> Tensor:
        return self.per_example(image, text, labels).mean()


class PublicNegativesLoss(nn.Module):
    """Per-example losses whose only other inputs are the task's class prompts (public).

    For example i with outputs ``v_i`` (image) and/or ``t_i`` (text), label ``y_i`` (< 0: none) and
    the projected prompts ``P`` [C, d] (detached: a per-step constant of the parameters, so the
    gradient of example i's term depends on example i alone):

    - prompt term (``prompt_weight``): ``CE(z_i P^T / T_p, y_i)`` for each modality present, summed
      (zero for an unlabelled example): zero-shot classification as the objective;
    - pair term (``pair_weight``, needs both modalities): InfoNCE of the example's own pair against
      the prompts as negatives, ``CE([v_i.t_i, v_i.P_c for c != y_i] / T, 0)`` and the same from
      ``t_i``, averaged; a labelled example's own class prompt is not a negative.

    The loss is the weighted sum, per example (``per_example``) or its mean (``forward``). No
    parameters: a head trained with it has the same state as one trained with ``auto``.
    """

    uses_prompts = True

    def __init__(
        self,
        *,
        pair_weight: float,
        prompt_weight: float,
        pair_temperature: float = 0.07,
        prompt_temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if pair_weight < 0 or prompt_weight < 0 or pair_weight + prompt_weight == 0:
            raise ValueError(
                f"PublicNegativesLoss: weights must be >= 0 and not both 0, got {pair_weight}, "
                f"{prompt_weight}"
            )
        self.pair_weight = float(pair_weight)
        self.prompt_weight = float(prompt_weight)
        self.pair_temperature = check_temperature("PublicNegativesLoss", pair_temperature)
        self.prompt_temperature = check_temperature("PublicNegativesLoss", prompt_temperature)

    def per_example(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        prompts: Tensor | None = None,
    ) -> Tensor:
        """Unreduced loss [B]: each example's weighted pair and prompt terms."""
        name = "PublicNegativesLoss"
        if prompts is None:
            raise ValueError(f"{name}: needs the projected class prompts (its public negatives)")
        rows = stack_rows(name, image, text, labels)
        check_prompts(name, rows, prompts)
        batch = rows.z.shape[0] // (int(image is not None) + int(text is not None))
        y = torch.full((batch,), -1, dtype=torch.long, device=rows.z.device)
        if labels is not None:
            y = labels.long()
        bank = prompts.detach()
        known = y >= 0
        total = rows.z.new_zeros(batch)
        if self.prompt_weight > 0:
            if labels is None:
                raise ValueError(f"{name}: the prompt term needs labels")
            target = y.clamp(min=0)
            for z in (image, text):
                if z is None:
                    continue
                ce = F.cross_entropy(z @ bank.T / self.prompt_temperature, target, reduction="none")
                total = total + self.prompt_weight * torch.where(known, ce, torch.zeros_like(ce))
        if self.pair_weight > 0:
            if image is None or text is None:
                raise ValueError(f"{name}: the pair term needs paired image and text embeddings")
            own = known[:, None] & (
                torch.arange(bank.shape[0], device=bank.device)[None, :] == y[:, None]
            )
            pair = (image * text).sum(dim=1, keepdim=True)
            terms = []
            for z in (image, text):
                negatives = (z @ bank.T).masked_fill(own, float("-inf"))
                logits = torch.cat([pair, negatives], dim=1) / self.pair_temperature
                terms.append(-F.log_softmax(logits, dim=1)[:, 0])
            total = total + self.pair_weight * 0.5 * (terms[0] + terms[1])
        return total

    def forward(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        prompts: Tensor | None = None,
    ) -> Tensor:
        return self.per_example(image, text, labels, prompts=prompts).mean()


PUBLIC_OBJECTIVES: dict[str, dict[str, float]] = {
    "prompts": {"pair_weight": 0.0, "prompt_weight": 1.0},
    "infonce-public": {"pair_weight": 1.0, "prompt_weight": 0.0},
    "infonce-public+prompts": {"pair_weight": 1.0, "prompt_weight": 1.0},
}
"""The weights of each registered ``PublicNegativesLoss`` (common/registries.py LOSSES)."""
