"""DP-SGD training of a site's head with Opacus (per-example decomposable loss only), charged to the ledger."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from client.privacy.budget import RoundPlan, plan_round
from client.privacy.ledger import LedgerEntry, PrivacyLedger, Spend
from client.privacy.subspace import SubspaceLinear, prompt_basis, public_subspace
from common.dp_losses import ClassProxyLoss, ProxyClassifier, PublicNegativesLoss
from common.embedding import EmbeddedDataset
from common.errors import ConfigError, DataError, PrivacyError
from common.losses import AutoLoss
from common.privacy import PrivacySettings, require_sample_level_dp
from common.registries import loss_info
from common.training import (
    HeadModel,
    TrainConfig,
    TrainResult,
    choose_objective,
    is_linear_path,
    training_rows,
)

# Per-sample gradient modes that are valid for our heads and per-example losses, fastest first
# (measured by simulations/benchmarks/dp.py). "ew" (ExpandedWeights) is not valid: it cannot handle
# F.normalize. "ghost" runs Opacus' ghost clipping with this module's leaner first backward pass,
# samplers and optimizer (_GhostClipping, _ghost_module_class, _ghost_optimizer_class).
GRAD_SAMPLE_MODES: tuple[str, ...] = ("ghost", "functorch", "hooks")
PROXY_NORMALIZE_EPS = 1e-8  # ProxyClassifier's F.normalize eps (common/dp_losses.py)


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
    epsilon_total_rdp: float | None = None  # ``epsilon_total`` by RDP
    accountant: str = "rdp"  # whose number ``epsilon_total`` / ``epsilon_round`` are (it governs)
    accountant_note: str = ""  # why the site's dp-accountant does not govern ("" when it does)
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
        """Privacy metrics to send with the update (data-independent except the spend itself):
        ``dp-epsilon`` is the governing accountant's total, ``dp-epsilon-rdp`` and
        ``dp-epsilon-pld`` each accountant's (PLD's only where computed)."""
        metrics: dict[str, float | int] = {
            "dp-epsilon": self.epsilon_total,
            "dp-epsilon-round": self.epsilon_round,
            "dp-delta": self.delta,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-sample-rate": self.sample_rate,
            "dp-steps": self.steps,
        }
        if self.epsilon_total_rdp is not None:
            metrics["dp-epsilon-rdp"] = self.epsilon_total_rdp
        if self.epsilon_total_pld is not None:
            metrics["dp-epsilon-pld"] = self.epsilon_total_pld
        return metrics

    def audit_record(self) -> dict[str, float | int | str]:
        """What the site records about the round's privacy (its audit log): ``metrics()``, the
        governing accountant (``dp-accountant``) and why it is not the site's setting, if not."""
        record: dict[str, float | int | str] = {**self.metrics(), "dp-accountant": self.accountant}
        if self.accountant_note:
            record["dp-accountant-note"] = self.accountant_note
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


class _GhostClipping:
    """Opacus' ghost clipping backward (``DPTensorFastGradientClipping.backward``) with a first
    pass that computes no parameter gradient it would throw away.

    Ghost clipping takes two backward passes: the first only feeds Opacus' hooks, which compute
    each example's gradient norm from the layer's activations and output gradients; the second
    backpropagates ``sum_i c_i loss_i`` with ``c_i = min(1, C / (||g_i|| + 1e-6))``, which leaves
    the clipped sum ``sum_i c_i g_i`` in ``p.grad`` (Opacus' optimizer then adds the noise and
    divides by the expected batch size). Opacus runs the first pass as a full ``backward()``,
    whose parameter gradients (the weight matrices' products, most of a backward's cost) are
    zeroed straight after. Here it asks autograd for the gradient of one small parameter of each
    hooked layer only (``inputs``): every hook still sees its layer's output gradient, the weight
    products are skipped. Every trained parameter must get a fresh per-example norm from the first
    pass, or the step is refused (a stale norm would clip by another batch's gradients).
    """

    def __init__(self, gsm: Any, params: list[nn.Parameter]) -> None:
        self.gsm = gsm
        self.params = params
        self.first_pass = _first_pass_inputs(gsm)

    def backward(self, per_example: Tensor) -> None:
        for p in self.params:
            p._norm_sample = None  # type: ignore[attr-defined]
        torch.autograd.backward(per_example.mean(), inputs=self.first_pass, retain_graph=True)
        for p in self.first_pass:
            p.grad = None
        missing = [i for i, p in enumerate(self.params) if getattr(p, "_norm_sample", None) is None]
        if missing:
            raise PrivacyError(
                f"ghost clipping: {len(missing)} trained parameter(s) got no per-example gradient "
                "norm in the first backward pass; refusing to clip with stale norms"
            )
        coefficients = self.gsm.get_clipping_coef()
        self.gsm.disable_hooks()
        try:
            (coefficients.to(per_example.device) * per_example).sum().backward()
        finally:
            self.gsm.enable_hooks()


@functools.cache
def _ghost_module_class() -> type:
    """Opacus' ghost-clipping module (what ``prepare_module(..., "ghost")`` builds) with two
    samplers of its own, registered on this class only (Opacus' registries stay as they are):

    - ``nn.Linear`` on [B, in] inputs: the same per-example norms as Opacus
      (``||g_i|| ||a_i||`` for the weight, ``||g_i||`` for the bias), from row sums of squares
      instead of ``einsum`` (which runs them as batched matrix products, ~10x slower on CPU);
    - ``ProxyClassifier`` (the ``proxy`` loss's class proxies): per-example gradients in closed
      form (``_proxy_grad_sample``) instead of Opacus' functorch fallback.
    """
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as Base

    class GhostClippingModule(Base):
        GRAD_SAMPLERS: ClassVar[dict[type, Any]] = {
            **Base.GRAD_SAMPLERS,
            ProxyClassifier: _proxy_grad_sample,
        }
        NORM_SAMPLERS: ClassVar[dict[type, Any]] = {
            **Base.NORM_SAMPLERS,
            nn.Linear: _linear_norm_sample,
        }

    return GhostClippingModule


@functools.cache
def _ghost_optimizer_class() -> type:
    """Opacus' ghost-clipping optimizer (what ``get_optimizer_class`` returns for "ghost") without
    two copies of every gradient per step. After the ghost backward ``p.grad`` already holds the
    step's clipped sum; Opacus deep-copies it into ``summed_grad`` and then adds the noise into a
    third tensor. Here ``summed_grad`` is that gradient itself and the noise (Opacus'
    ``_generate_noise``, std ``sigma * C``) is added in place into the freshly drawn noise tensor:
    the same sum, the same draws from the same generator, no extra copies. The scaling by the
    expected batch size and AdamW's step are Opacus' and PyTorch's, unchanged."""
    from opacus.optimizers import DPOptimizerFastGradientClipping as Base
    from opacus.optimizers.optimizer import (
        _check_processed_flag,
        _generate_noise,
        _mark_as_processed,
    )

    class GhostClippingOptimizer(Base):
        def accumulate(self) -> None:
            for p in self.params:
                if p.summed_grad is not None:
                    p.summed_grad.add_(p.grad)
                else:
                    p.summed_grad = p.grad.detach()

        def add_noise(self) -> None:
            multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = _generate_noise(
                    std=multiplier * self.max_grad_norm,
                    reference=p.summed_grad,
                    generator=self.generator,
                    secure_mode=self.secure_mode,
                )
                p.grad = noise.add_(p.summed_grad).view_as(p)
                _mark_as_processed(p.summed_grad)

    return GhostClippingOptimizer


def _linear_norm_sample(
    layer: nn.Linear, activations: list[Tensor], backprops: Tensor
) -> dict[Tensor, Tensor]:
    """Per-example gradient norms of a Linear layer (Opacus' ``compute_linear_norm_sample``): for
    [B, in] inputs example i's weight gradient is the outer product ``g_i a_i^T``, whose norm is
    ``||g_i|| ||a_i||``; its bias gradient is ``g_i``. Other shapes: Opacus' own function."""
    if backprops.dim() != 2:
        from opacus.grad_sample.linear import compute_linear_norm_sample

        return compute_linear_norm_sample(layer, activations, backprops)
    a = activations[0].to(backprops.dtype)
    g_sq = backprops.square().sum(dim=1)
    norms: dict[Tensor, Tensor] = {}
    if layer.weight.requires_grad:
        norms[layer.weight] = torch.sqrt(g_sq * a.square().sum(dim=1))
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = torch.sqrt(g_sq)
    return norms


def _proxy_grad_sample(
    layer: ProxyClassifier, activations: list[Tensor], backprops: Tensor
) -> dict[Tensor, Tensor]:
    """Per-example gradients [B, C, d] of ``ProxyClassifier``'s proxies P.

    The logits are ``z @ Pn^T / T`` with ``Pn = P / max(||P_c||, eps)`` row by row
    (``F.normalize``), so example i's gradient with respect to ``Pn`` is ``g_i z_i^T / T``
    (``g_i`` its logits' gradient [C]) and, through the normalisation, row c's is
    ``(G_c - Pn_c (Pn_c . G_c)) / ||P_c||`` (``G_c / eps`` for a row of norm below eps).
    """
    if not layer.proxies.requires_grad:
        return {}
    z = activations[0].to(backprops.dtype)
    proxies = layer.proxies.detach()
    norm = proxies.norm(p=2, dim=-1, keepdim=True)  # [C, 1]
    unit = proxies / norm.clamp_min(PROXY_NORMALIZE_EPS)
    per_pn = backprops[:, :, None] * z[:, None, :] / layer.temperature  # [B, C, d]
    projected = per_pn - unit * (per_pn * unit).sum(dim=-1, keepdim=True)
    scaled = torch.where(
        norm >= PROXY_NORMALIZE_EPS, projected / norm, per_pn / PROXY_NORMALIZE_EPS
    )
    return {layer.proxies: scaled}


def _first_pass_inputs(gsm: Any) -> list[nn.Parameter]:
    """The smallest trainable parameter of each layer Opacus hooks: asking autograd for their
    gradients runs every hooked layer's backward hook but not the large weights' products."""
    from opacus.utils.module_utils import trainable_modules

    chosen: list[nn.Parameter] = []
    for _, module in trainable_modules(gsm._module):
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        chosen.append(min(own, key=lambda p: p.numel()))
    return chosen


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
    require_public_classes(chosen, data, privacy)
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
            result = _result(plan, len(rows), grad_sample_mode, spent=plan.before)
            result.objective, result.objective_reason = chosen, why
            return result
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
                epsilon_total=plan.after.rdp,
                utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                epsilon_total_pld=plan.after.pld,
                accountant=plan.after.accountant,
                accountant_note=plan.after.note,
            )
        )
    started = time.perf_counter()
    losses, samples = _dp_sgd(
        model, data, rows, config, privacy, plan, reference=reference, mode=grad_sample_mode
    )
    result = _result(plan, len(rows), grad_sample_mode, spent=plan.after)
    result.objective, result.objective_reason = chosen, why
    result.seconds = time.perf_counter() - started
    result.steps = plan.steps
    result.samples_seen = samples
    per_epoch = max(1, plan.steps // max(1, config.epochs))
    result.loss = float(np.mean(losses[-per_epoch:])) if losses else math.nan
    if losses and not math.isfinite(result.loss):
        raise DataError("private training diverged: the loss became NaN/inf (lower dp-lr?)")
    return result


def _result(plan: RoundPlan, num_examples: int, mode: str, *, spent: Spend) -> PrivateRoundResult:
    """The round's result before training: the scope's total ``spent`` (before or after it)."""
    trained = not plan.declined and plan.steps > 0
    return PrivateRoundResult(
        loss=math.nan,
        num_examples=num_examples,
        steps=0,
        samples_seen=0,
        seconds=0.0,
        epsilon_round=plan.epsilon_round if trained else 0.0,
        epsilon_total=spent.epsilon,
        delta=plan.delta,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        declined=plan.declined,
        reason=plan.reason,
        grad_sample_mode=mode,
        epsilon_total_pld=spent.pld,
        epsilon_total_rdp=spent.rdp,
        accountant=spent.accountant,
        accountant_note=spent.note,
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
    """The DP-SGD loop; returns the per-step mean losses and the number of samples used. With a
    public basis (``_update_basis``) the towers' affine paths are swapped for their subspace
    coefficients (``public_subspace``), which train instead of those paths."""
    from opacus.grad_sample import prepare_module
    from opacus.optimizers import get_optimizer_class

    present = {m for m in ("image", "text") if getattr(data, m) is not None}
    basis = _update_basis(model, data, privacy, present)
    with contextlib.ExitStack() as stack:
        towers = tuple(m for m in ("image", "text") if m in present)
        subspaces = (
            None
            if basis is None
            else stack.enter_context(public_subspace(model.head, basis, towers))
        )
        inputs = _training_tensors(data, rows)
        prompts = (
            None if data.prompts is None else torch.from_numpy(np.asarray(data.prompts, np.float32))
        )
        objective = PrivateObjective(model, prompts)
        in_objective = {id(p) for p in objective.parameters()}
        trainable = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in in_objective
        ]
        if subspaces is None:
            named = [(n, p) for n, p in trainable if trained_under_dp(n, model, present)]
        else:  # the coefficients, and what the loss trains (proxy's class proxies)
            chosen = {id(p) for sub in subspaces.values() for p in sub.coef.parameters()}
            named = [(n, p) for n, p in trainable if id(p) in chosen or n.split(".")[0] != "head"]
        params = [p for _, p in named]
        trained = {id(p) for p in params}
        kept = [p for _, p in trainable if id(p) not in trained]
        anchor = _anchor(model, named, reference, subspaces) if config.proximal_mu > 0 else None
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        extra = {"max_grad_norm": privacy.max_grad_norm} if mode == "ghost" else {}
        gsm: Any = None
        for p in kept:  # not trained: Opacus neither clips nor noises them
            p.requires_grad_(False)
        try:
            gsm = (
                _ghost_module_class()(objective, batch_first=True, loss_reduction="mean", **extra)
                if mode == "ghost"
                else prepare_module(
                    objective,
                    grad_sample_mode=mode,
                    batch_first=True,
                    loss_reduction="mean",
                    **extra,
                )
            )
            optimizer_class = (
                _ghost_optimizer_class()
                if mode == "ghost"
                else get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=mode)
            )
            optimizer = optimizer_class(
                torch.optim.AdamW(params, lr=privacy.lr, weight_decay=config.weight_decay),
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=privacy.max_grad_norm,
                expected_batch_size=plan.expected_batch_size,
                loss_reduction="mean",
                generator=generator,
            )
            ghost = _GhostClipping(gsm, params) if mode == "ghost" else None
            gsm.train()
            with warnings.catch_warnings():
                # Opacus' hooks fire on module outputs because the frozen inputs need no gradient.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                return _steps(
                    gsm,
                    optimizer,
                    ghost,
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


def require_public_classes(objective: str, data: EmbeddedDataset, privacy: PrivacySettings) -> None:
    """DataError unless the classes DP-SGD uses are public task metadata (declared).

    Without a declaration (a manifest's ``.classes.json`` sidecar) the class list is the sorted
    set of the site's own labels: which classes a site holds would shape the class proxies, the
    prompts and the prompts' span, none of which DP-SGD's noise covers. An objective that uses
    no class (and no prompts' span) is allowed either way.
    """
    if data.classes_declared or not data.class_names:
        return
    info = loss_info(objective)
    spans_prompts = privacy.update_space == "prompts" and data.prompts is not None
    if info.labels or info.prompts or spans_prompts:
        raise DataError(  # without the names: an error's text leaves the site
            f"sample-level DP with loss '{objective}' uses the classes, but this site's "
            f"{len(data.class_names)} were read from its labels (not covered by DP): declare "
            "them in <manifest>.classes.json at every site"
        )


def _update_basis(
    model: HeadModel, data: EmbeddedDataset, privacy: PrivacySettings, present: set[str]
) -> Tensor | None:
    """The public basis DP-SGD moves the affine paths along (``dp-update-space = "prompts"``:
    the class prompts' span, client/privacy/subspace.py), or None: every trained coordinate."""
    head = model.head
    if (
        privacy.update_space != "prompts"
        or data.prompts is None
        or not head.has_linear_path
        or head.joint is not None
    ):
        return None
    return prompt_basis(np.asarray(data.prompts), head.out_dim)


def _steps(
    gsm: nn.Module,
    optimizer: Any,
    ghost: _GhostClipping | None,
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
            if ghost is not None:
                ghost.backward(per_example)
            else:
                per_example.mean().backward()
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


def trained_under_dp(name: str, model: HeadModel, present: set[str]) -> bool:
    """Whether DP-SGD trains parameter ``name``: every trainable one, except the tower of a
    modality the site's data lacks (``present``: it gets no gradient, so Opacus has no
    per-example gradient of it), and except that a head with a linear path (``aligned``) trains
    its affine paths only and keeps its residual MLPs at their zero start. Under DP most
    coordinates' gradients are noise, and AdamW moves each trained weight by about its learning
    rate per step whatever the gradient: a residual trained on noise adds a random vector to every
    output, while the affine paths start at a public map (the identity for a tower whose widths
    agree) and carry what the data says (docs/results.md, "Utility vs epsilon", has both variants).
    With ``dp-update-space = "prompts"`` those affine paths train as coefficients along the class
    prompts' span instead (``_dp_sgd``, client/privacy/subspace.py)."""
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
    subspaces: Mapping[str, SubspaceLinear] | None = None,
) -> list[Tensor]:
    """FedProx anchor per trained parameter (the round's global weights; default: current). A
    subspace coefficient (``SubspaceLinear.coef`` of a tower) is anchored at the projection of
    the tower's global affine path onto the span (``SubspaceLinear.anchor``): ``mu (w - w_global)``
    is then exactly the proximal term's gradient in coefficient space."""
    source = reference if reference is not None else model.state_dict()
    subspaces = subspaces or {}
    coefficients = {  # id of a coefficient -> (its tower, "weight" or "bias")
        id(p): (tower, part)
        for tower, sub in subspaces.items()
        for part, p in sub.coef.named_parameters()
    }
    anchors: list[Tensor] = []
    for name, p in named:
        if id(p) in coefficients and reference is not None:  # else: its current value
            tower, part = coefficients[id(p)]
            path = f"head.{tower}.linear"  # the affine path the subspace stands in for
            weight, bias = subspaces[tower].anchor(source[f"{path}.weight"], source[f"{path}.bias"])
            anchors.append((weight if part == "weight" else bias).to(p.dtype))
        else:
            anchors.append(source[name].detach().clone().to(p.dtype))
    return anchors
