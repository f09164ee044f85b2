"""DP-SGD training of a site's head with Opacus (per-example decomposable loss only), charged to the ledger."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from client.privacy.budget import RoundPlan, plan_round
from client.privacy.ledger import LedgerEntry, PrivacyLedger, pld_epsilon
from common.dp_losses import ClassProxyLoss, PublicNegativesLoss
from common.embedding import EmbeddedDataset
from common.errors import ConfigError, DataError, PrivacyError
from common.losses import AutoLoss
from common.privacy import PrivacySettings, require_sample_level_dp
from common.training import (
    HeadModel,
    TrainConfig,
    TrainResult,
    choose_objective,
    is_linear_path,
    training_rows,
)

# Per-sample gradient modes that are valid for our head + proxy loss, fastest first (measured by
# simulations/bench_dp.py). "ew" (ExpandedWeights) is not valid: it cannot handle F.normalize.
GRAD_SAMPLE_MODES: tuple[str, ...] = ("ghost", "functorch", "hooks")


@dataclass
class PrivateRoundResult:
    """One private round: the training summary, its privacy cost, or why the site declined.

    ``loss`` (and ``samples_seen``) are computed from the private rows without noise: keep them
    local. Only the weights and ``metrics()`` are covered by (or independent of) the guarantee.
    """

    loss: float
    num_examples: int
    steps: int
    samples_seen: int
    seconds: float
    epsilon_round: float
    epsilon_total: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    declined: bool = False
    reason: str = ""
    grad_sample_mode: str = "ghost"
    epsilon_total_pld: float | None = None  # ``epsilon_total`` by PLD (None: not computed)
    objective: str = ""  # the loss trained with (what ``auto`` chose: a per-example objective)
    objective_reason: str = ""  # why ``auto`` chose it ("" for a named loss)

    @property
    def samples_per_second(self) -> float:
        return 0.0 if self.seconds <= 0 else self.samples_seen / self.seconds

    def train_result(self) -> TrainResult:
        """The training summary in the non-private ``TrainResult`` form."""
        return TrainResult(
            loss=self.loss,
            num_examples=self.num_examples,
            steps=self.steps,
            samples_seen=self.samples_seen,
            seconds=self.seconds,
        )

    def metrics(self) -> dict[str, float | int]:
        """Privacy metrics to send with the update (data-independent except the spend itself)."""
        return {
            "dp-epsilon": self.epsilon_total,
            "dp-epsilon-round": self.epsilon_round,
            "dp-delta": self.delta,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-sample-rate": self.sample_rate,
            "dp-steps": self.steps,
        }

    def audit_record(self) -> dict[str, float | int]:
        """What the site records about the round's privacy (its audit log): ``metrics()`` and the
        total by the tighter PLD accountant, ``dp-epsilon-pld`` (``dp-epsilon`` is RDP's)."""
        record = self.metrics()
        if self.epsilon_total_pld is not None:
            record["dp-epsilon-pld"] = self.epsilon_total_pld
        return record


class PrivateObjective(nn.Module):
    """Head + loss as one module returning the per-example loss [B] (what Opacus wraps).

    It holds the HeadModel's own ``head`` (the same parameters, not copies), so the HeadModel is
    trained in place and its state_dict keys never change. The loss is a submodule (its
    parameters trained by DP-SGD too) only for ``proxy``, whose class proxies are data; the
    prompt losses (``common.dp_losses.PublicNegativesLoss``, ``auto``'s per-example objectives)
    have no trained parameters and get the class prompts, projected by the current head without
    gradient at every step: a per-step constant of the parameters, public, never an example.
    """

    _public: PublicNegativesLoss | AutoLoss | None

    def __init__(self, model: HeadModel, prompts: Tensor | None = None) -> None:
        super().__init__()
        loss = model.loss
        per_example = isinstance(loss, (ClassProxyLoss, PublicNegativesLoss)) or (
            isinstance(loss, AutoLoss) and loss.per_example_objective
        )
        if not per_example:
            require_sample_level_dp(str(model.loss_spec["name"]))
            raise PrivacyError(
                f"DP-SGD needs a per-example loss, got {type(loss).__name__} "
                f"(objective {model.objective!r})"
            )
        self.head = model.head
        self.proxy = loss if isinstance(loss, ClassProxyLoss) else None
        # not a submodule (its parameters, e.g. auto's unused CLIP temperature, are not trained)
        object.__setattr__(self, "_public", None if self.proxy is not None else loss)
        if self._public is not None and prompts is None:
            raise DataError(
                f"loss '{model.objective}' needs the task's class prompts; the data has none"
            )
        self._prompts = prompts

    def forward(self, image: Tensor | None, text: Tensor | None, labels: Tensor) -> Tensor:
        out = self.head(image=image, text=text)
        if self.proxy is not None:
            if "joint" in out:  # the concat layout's output is one view
                return self.proxy.per_example(image=out["joint"], labels=labels)
            return self.proxy.per_example(
                image=out.get("image"), text=out.get("text"), labels=labels
            )
        assert self._public is not None and self._prompts is not None
        with torch.no_grad():  # Opacus records no activations without grad
            prompts = self.head(text=self._prompts)["text"]
        return self._public.per_example(
            image=out.get("image"), text=out.get("text"), labels=labels, prompts=prompts
        )


class _PerExampleCriterion:
    """Opacus ghost clipping's criterion: the model already returns the per-example loss."""

    reduction = "mean"

    def __call__(self, per_example: Tensor) -> Tensor:
        return per_example


def train_head_private(
    model: HeadModel,
    data: EmbeddedDataset,
    config: TrainConfig,
    privacy: PrivacySettings,
    *,
    ledger_path: Path,
    planned_rounds: int,
    run_id: int,
    server_round: int,
    reference: Mapping[str, Tensor] | None = None,
    grad_sample_mode: str = "ghost",
) -> PrivateRoundResult:
    """Train ``model`` in place with DP-SGD (Opacus) for one round, within the site's budget.

    Poisson sampling at rate ``B / n`` over the labelled rows, per-example clipping to
    ``max_grad_norm``, Gaussian noise ``sigma * max_grad_norm``, AdamW on the noisy mean
    gradient. The spend is checked against the ledger and recorded in it before training; a
    declined round leaves the model and the ledger untouched. FedProx (``config.proximal_mu``)
    adds its gradient ``mu * (w - w_global)`` after the noise: it depends only on the weights, so
    it is post-processing and costs no privacy. Sampling and noise use fresh OS entropy, never
    ``config.seed`` (which the server knows).
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"privacy: grad_sample_mode must be one of {list(GRAD_SAMPLE_MODES)}, "
            f"got {grad_sample_mode!r}"
        )
    require_sample_level_dp(str(model.loss_spec["name"]))
    data.validate()
    chosen, why = choose_objective(model, data, private=True)
    rows = training_rows(model, data)
    if model.uses_prompts and data.prompts is None:  # refused before the ledger is charged
        raise DataError(f"loss '{chosen}' needs the task's class prompts; the data has none")
    ledger = PrivacyLedger(ledger_path)
    with ledger.locked():
        plan = plan_round(
            privacy,
            ledger=ledger,
            num_examples=len(rows),
            config=config,
            planned_rounds=planned_rounds,
            run_id=run_id,
        )
        if plan.declined or plan.steps == 0:
            result = _result(plan, len(rows), grad_sample_mode, epsilon_total=plan.epsilon_before)
            result.objective, result.objective_reason = chosen, why
            result.epsilon_total_pld = pld_epsilon(
                plan.history, privacy.delta, rdp=plan.epsilon_before
            )
            return result
        epsilon_total_pld = pld_epsilon(plan.history_after, privacy.delta, rdp=plan.epsilon_after)
        ledger.record(
            LedgerEntry(
                run_id=int(run_id),
                server_round=int(server_round),
                noise_multiplier=plan.noise_multiplier,
                sample_rate=plan.sample_rate,
                steps=plan.steps,
                max_grad_norm=privacy.max_grad_norm,
                poisson=privacy.poisson,
                num_examples=len(rows),
                delta=privacy.delta,
                epsilon_total=plan.epsilon_after,
                utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                epsilon_total_pld=epsilon_total_pld,
            )
        )
    started = time.perf_counter()
    losses, samples = _dp_sgd(
        model, data, rows, config, privacy, plan, reference=reference, mode=grad_sample_mode
    )
    result = _result(plan, len(rows), grad_sample_mode, epsilon_total=plan.epsilon_after)
    result.objective, result.objective_reason = chosen, why
    result.epsilon_total_pld = epsilon_total_pld
    result.seconds = time.perf_counter() - started
    result.steps = plan.steps
    result.samples_seen = samples
    per_epoch = max(1, plan.steps // max(1, config.epochs))
    result.loss = float(np.mean(losses[-per_epoch:])) if losses else math.nan
    if losses and not math.isfinite(result.loss):
        raise DataError("private training diverged: the loss became NaN/inf (lower the lr?)")
    return result


def _result(
    plan: RoundPlan, num_examples: int, mode: str, *, epsilon_total: float
) -> PrivateRoundResult:
    trained = not plan.declined and plan.steps > 0
    return PrivateRoundResult(
        loss=math.nan,
        num_examples=num_examples,
        steps=0,
        samples_seen=0,
        seconds=0.0,
        epsilon_round=plan.epsilon_round if trained else 0.0,
        epsilon_total=epsilon_total,
        delta=plan.delta,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        declined=plan.declined,
        reason=plan.reason,
        grad_sample_mode=mode,
    )


def _dp_sgd(
    model: HeadModel,
    data: EmbeddedDataset,
    rows: np.ndarray,
    config: TrainConfig,
    privacy: PrivacySettings,
    plan: RoundPlan,
    *,
    reference: Mapping[str, Tensor] | None,
    mode: str,
) -> tuple[list[float], int]:
    """The DP-SGD loop; returns the per-step mean losses and the number of samples used."""
    from opacus.grad_sample import prepare_module
    from opacus.optimizers import get_optimizer_class
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    inputs = _training_tensors(data, rows)
    prompts = (
        None if data.prompts is None else torch.from_numpy(np.asarray(data.prompts, np.float32))
    )
    objective = PrivateObjective(model, prompts)
    in_objective = {id(p) for p in objective.parameters()}
    present = {m for m in ("image", "text") if getattr(data, m) is not None}
    trainable = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in in_objective
    ]
    named = [(n, p) for n, p in trainable if _private(n, model, present)]
    params = [p for _, p in named]
    kept = [p for n, p in trainable if not _private(n, model, present)]
    anchor = _anchor(model, named, reference) if config.proximal_mu > 0 else None
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    extra = {"max_grad_norm": privacy.max_grad_norm} if mode == "ghost" else {}
    gsm: Any = None
    for p in kept:  # not trained: Opacus neither clips nor noises them
        p.requires_grad_(False)
    try:
        gsm = prepare_module(
            objective, grad_sample_mode=mode, batch_first=True, loss_reduction="mean", **extra
        )
        optimizer = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=mode)(
            torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay),
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            expected_batch_size=plan.expected_batch_size,
            loss_reduction="mean",
            generator=generator,
        )
        criterion = (
            DPLossFastGradientClipping(gsm, optimizer, _PerExampleCriterion(), "mean")
            if mode == "ghost"
            else None
        )
        gsm.train()
        with warnings.catch_warnings():
            # Opacus' hooks fire on module outputs because the frozen inputs need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return _steps(
                gsm,
                optimizer,
                criterion,
                inputs,
                _batches(len(rows), plan, config, poisson=privacy.poisson, rng=generator),
                params=params,
                anchor=anchor,
                mu=config.proximal_mu,
                mode=mode,
            )
    finally:
        if gsm is not None:
            gsm.cleanup()
        _strip_opacus_state(model)
        for p in kept:
            p.requires_grad_(True)
        model.eval()


def _steps(
    gsm: nn.Module,
    optimizer: Any,
    criterion: Any,
    inputs: tuple[Tensor | None, Tensor | None, Tensor],
    batches: Iterator[Tensor],
    *,
    params: list[nn.Parameter],
    anchor: list[Tensor] | None,
    mu: float,
    mode: str,
) -> tuple[list[float], int]:
    """One DP-SGD step per batch; returns the per-step mean losses and the samples used."""
    losses: list[float] = []
    samples = 0
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        if batch.numel() == 0:
            _empty_batch(params, mode)
        else:
            per_example = gsm(*(None if x is None else x[batch] for x in inputs))
            loss = criterion(per_example) if criterion is not None else per_example.mean()
            loss.backward()
            losses.append(float(per_example.detach().mean()))
            samples += int(batch.numel())
        optimizer.pre_step()  # clip, sum, add noise, divide by the expected batch size
        if anchor is not None:  # FedProx: data-independent, added after the noise
            with torch.no_grad():
                for p, a in zip(params, anchor, strict=True):
                    assert p.grad is not None
                    p.grad.add_(p.detach() - a, alpha=mu)
        optimizer.original_optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses, samples


def _private(name: str, model: HeadModel, present: set[str]) -> bool:
    """Whether DP-SGD trains parameter ``name``: every trainable one, except the tower of a
    modality the site's data lacks (``present``: it gets no gradient, so Opacus has no
    per-example gradient of it), and except that a head with a linear path (``aligned``) trains
    its affine paths only and keeps its residual MLPs at their zero start. Under DP most
    coordinates' gradients are noise, and AdamW moves each trained weight by about its learning
    rate per step whatever the gradient: a residual trained on noise adds a random vector to every
    output, while the affine paths start at a public map (the identity for a tower whose widths
    agree) and carry what the data says. Measured in
    docs/results/privacy/privacy.md (both variants)."""
    parts = name.split(".")
    if parts[0] != "head":
        return True
    if parts[1] in ("image", "text") and parts[1] not in present:
        return False
    return not model.head.has_linear_path or is_linear_path(name)


def _strip_opacus_state(model: nn.Module) -> None:
    """Remove what Opacus leaves beyond ``cleanup()`` (captured-activation lists, summed grads)."""
    for module in model.modules():
        for attr in ("activations", "max_batch_len"):
            if attr in vars(module):
                delattr(module, attr)
    for p in model.parameters():
        if hasattr(p, "summed_grad"):
            del p.summed_grad


def _training_tensors(
    data: EmbeddedDataset, rows: np.ndarray
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    def take(array: np.ndarray | None) -> Tensor | None:
        if array is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(array[rows], dtype=np.float32))

    labels = np.full(len(data), -1) if data.labels is None else data.labels
    return take(data.image), take(data.text), torch.from_numpy(labels[rows].astype(np.int64))


def _batches(
    n: int, plan: RoundPlan, config: TrainConfig, *, poisson: bool, rng: torch.Generator
) -> Iterator[Tensor]:
    """Row indices per step: Poisson(q) subsets, or shuffled fixed-size batches per epoch."""
    if poisson:
        for _ in range(plan.steps):
            yield torch.nonzero(torch.rand(n, generator=rng) < plan.sample_rate).squeeze(1)
        return
    per_epoch = plan.steps // max(1, config.epochs)
    size = plan.expected_batch_size
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=rng)
        for step in range(per_epoch):
            yield order[step * size : (step + 1) * size]


def _empty_batch(params: list[nn.Parameter], mode: str) -> None:
    """An empty Poisson batch still takes a (noise-only) step: the accountant counted it."""
    for p in params:
        if mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]


def _anchor(
    model: HeadModel,
    named: list[tuple[str, nn.Parameter]],
    reference: Mapping[str, Tensor] | None,
) -> list[Tensor]:
    """FedProx anchor per trained parameter (the round's global weights; default: current)."""
    source = reference if reference is not None else model.state_dict()
    return [source[name].detach().clone().to(p.dtype) for name, p in named]
