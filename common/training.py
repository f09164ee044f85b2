"""Local training of a projection head on frozen embeddings with a contrastive loss (one site).

A head with a linear path (the ``aligned`` preset) starts at the tuned closed-form map of
``common.metrics.alignment`` (the frozen baselines' own fit), so at step 0 it scores exactly what
frozen + that map scores; with validation rows held out of the training split, training keeps the
best state by a score covering retrieval and classification, the start included.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import RunSettings, TrainConfig
from common.distillation import (
    NotTrueDistillation,
    check_classes,
    class_logits,
    prompt_temperature,
)
from common.embedding import EmbeddedDataset
from common.errors import ConfigError, DataError
from common.head_start import (
    ValidationScores,
    init_closed_form,
    validation_scores,
    validation_split,
)
from common.heads import HEAD_PRESETS, HeadConfig, MultimodalHead
from common.loss_rows import stack_rows
from common.losses import AutoLoss, build_loss
from common.registries import AUTO_ALTERNATIVES, choose_loss, loss_info


@dataclass
class Distillation:
    """FedNTD's term with its teacher's class logits of every training row, ``logits``
    [modality, example, class] (modalities in ``stack_rows``' order), at the prompt term's
    ``temperature``."""

    term: NotTrueDistillation
    logits: torch.Tensor
    temperature: float

    def loss(
        self, rows: torch.Tensor, prompts: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """The term for the student's stacked ``rows`` (and their ``labels``) of the examples
        ``index``, against ``prompts`` projected by the student."""
        teacher = self.logits[:, index].reshape(-1, self.logits.shape[-1])
        return self.term(class_logits(rows, prompts, self.temperature), teacher, labels)


class HeadModel(nn.Module):
    """The trainable (and federated) state: the projection head plus the loss's own parameters."""

    def __init__(self, head: MultimodalHead, loss: nn.Module, *, loss_spec: dict[str, Any]) -> None:
        super().__init__()
        self.head = head
        self.loss = loss
        self.loss_spec = dict(loss_spec)

    def describe(self) -> dict[str, Any]:
        """JSON-able description from which ``from_description`` rebuilds an identical module."""
        return {"head": self.head.describe(), "loss": dict(self.loss_spec)}

    @classmethod
    def from_description(cls, description: Mapping[str, Any]) -> HeadModel:
        head = MultimodalHead.from_description(description["head"])
        spec = dict(description["loss"])
        loss = build_loss(
            spec["name"],
            num_classes=spec.get("num_classes"),
            dim=int(spec["dim"]),
            temperature=spec.get("temperature"),
            objective=spec.get("objective"),
        )
        return cls(head, loss, loss_spec=spec)

    @property
    def objective(self) -> str:
        """The loss training uses: the registered name, or what ``auto`` chose (``auto`` before
        a choice)."""
        return str(self.loss_spec.get("objective") or self.loss_spec["name"])

    @property
    def uses_prompts(self) -> bool:
        """Whether the loss needs the task's class prompts (frozen text embeddings) each step."""
        return bool(getattr(self.loss, "uses_prompts", False))

    def compute_loss(
        self,
        image: torch.Tensor | None,
        text: torch.Tensor | None,
        labels: torch.Tensor | None,
        *,
        prompts: torch.Tensor | None = None,
        distill: Distillation | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Project the frozen inputs and apply the loss (the concat layout's output is one view).

        ``prompts``: the class prompts' frozen text embeddings, projected here by the text tower
        for a loss that ``uses_prompts``. ``distill``: FedNTD's term, added for the batch's
        examples, which are rows ``index`` of the data its teacher's logits cover.
        """
        out = self.head(image=image, text=text)
        if "joint" in out:
            return self.loss(image=out["joint"], labels=labels)
        extra: dict[str, torch.Tensor] = {}
        if self.uses_prompts:
            if prompts is None:
                raise DataError(
                    f"loss '{self.loss_spec['name']}' needs the task's class prompts; the data has none"
                )
            extra["prompts"] = self.head(text=prompts)["text"]
        loss = self.loss(image=out.get("image"), text=out.get("text"), labels=labels, **extra)
        if distill is None:
            return loss
        assert labels is not None and index is not None
        rows = stack_rows("not-true distillation", out.get("image"), out.get("text"), labels)
        assert rows.labels is not None
        return loss + distill.loss(rows.z, extra["prompts"], rows.labels, index)

    @torch.inference_mode()
    def project(self, data: EmbeddedDataset, *, batch_size: int = 4096) -> dict[str, np.ndarray]:
        """Projected embeddings of ``data`` per output ("image"/"text"/"joint"), plus "prompts"."""
        self.eval()
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(data), batch_size):
            sl = slice(start, start + batch_size)
            out = self.head(image=_tensor(data.image, sl), text=_tensor(data.text, sl))
            for key, value in out.items():
                parts.setdefault(key, []).append(value.numpy())
        result = {k: np.concatenate(v) for k, v in parts.items()}
        if data.prompts is not None and "text" in self.head.describe()["dims"]:
            prompts = self.head(text=torch.from_numpy(np.asarray(data.prompts, dtype=np.float32)))
            if "text" in prompts:
                result["prompts"] = prompts["text"].numpy()
        return result


def build_head_model(
    *,
    dims: Mapping[str, int],
    head_config: HeadConfig,
    layout: str = "two-tower",
    loss: str = "infonce",
    num_classes: int | None = None,
    temperature: float | None = None,
    seed: int = 0,
) -> HeadModel:
    """A freshly initialised head + loss for inputs of the given per-modality dimensions.

    ``loss="auto"`` chooses its objective from the training data when training starts
    (``choose_objective``); its parameters are the same whatever it chooses.
    """
    info = loss_info(loss)
    if info.pairs and (layout != "two-tower" or set(dims) != {"image", "text"}):
        raise ConfigError(f"loss '{loss}' needs paired images and texts with the two-tower layout")
    if info.labels and not num_classes:
        raise ConfigError(f"loss '{loss}' needs class labels, but the dataset has none")
    if info.prompts and (layout != "two-tower" or "text" not in dims):
        raise ConfigError(
            f"loss '{loss}' needs the two-tower layout with a text tower (it projects the class "
            "prompts with it)"
        )
    torch.manual_seed(seed)
    head = MultimodalHead(dims=dict(dims), config=head_config, layout=layout)
    spec = {
        "name": loss,
        "num_classes": num_classes,
        "dim": head.out_dim,
        "temperature": temperature,
    }
    module = build_loss(loss, num_classes=num_classes, dim=head.out_dim, temperature=temperature)
    return HeadModel(head, module, loss_spec=spec)


def build_run_model(
    run: RunSettings, *, dims: Mapping[str, int], num_classes: int | None
) -> HeadModel:
    """The run's head, identical at every site and at the server: seeded, its shapes fixed by the
    encoders' ``dims``, the head preset, the layout, the loss and the task's ``num_classes``."""
    return build_head_model(
        dims=dims,
        head_config=HEAD_PRESETS[run.head],
        layout=run.layout,
        loss=run.loss,
        num_classes=num_classes or None,
        seed=run.seed,
    )


@dataclass
class TrainResult:
    """Summary of one local training call.

    ``num_examples``: the usable rows given (those trained on plus ``num_validation`` held out to
    choose the kept state; the FedAvg weight of a round, which holds none out).
    ``objective``: the loss trained with (what ``auto`` chose, and ``objective_reason`` why);
    ``init``: where the linear path started ("" when kept as it was); ``best_epoch``: the epoch
    whose state was kept (0: the start), -1 without validation; ``validation``: the kept state's
    validation scores and ``validation_start`` the start's; ``objectives_tried``: with several
    objectives trained (an ``auto`` loss with validation rows), each one's best validation score.
    """

    loss: float
    num_examples: int
    steps: int
    samples_seen: int
    seconds: float
    objective: str = ""
    objective_reason: str = ""
    init: str = ""
    best_epoch: int = -1
    epochs_run: int = 0
    num_validation: int = 0
    validation: Mapping[str, float] = field(default_factory=dict)
    validation_start: Mapping[str, float] = field(default_factory=dict)
    objectives_tried: Mapping[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: the objective, the start and the kept state with their validation scores."""
        parts = [
            f"objective {self.objective}"
            + (f" ({self.objective_reason})" * bool(self.objective_reason))
        ]
        if self.init:
            parts.append(f"linear path started at {self.init}")
        if self.best_epoch >= 0:
            kept = "the start" if self.best_epoch == 0 else f"epoch {self.best_epoch}"
            parts.append(
                f"kept {kept} of {self.epochs_run} epochs by the score on "
                f"{self.num_validation} validation rows "
                f"{self.validation.get('score', math.nan):.4f} "
                f"(start {self.validation_start.get('score', math.nan):.4f})"
            )
        return "; ".join(parts)

    @property
    def samples_per_second(self) -> float:
        return 0.0 if self.seconds <= 0 else self.samples_seen / self.seconds


def training_rows(model: HeadModel, data: EmbeddedDataset) -> np.ndarray:
    """Indices of the rows the model's loss can use (label losses skip unlabelled rows)."""
    rows = np.arange(len(data))
    if loss_info(model.objective).labels:
        if data.labels is None:
            raise DataError(f"loss '{model.objective}' needs labels, but the data has none")
        rows = rows[data.labels >= 0]
    if rows.size == 0:
        raise DataError("no usable training examples (all rows unlabelled?)")
    return rows


def choose_objective(
    model: HeadModel,
    data: EmbeddedDataset,
    *,
    private: bool = False,
    objective: str = "",
    distilling: bool = False,
) -> tuple[str, str]:
    """For an ``auto`` loss, choose the objective from what ``data`` has (``choose_loss``; a
    per-example one when ``private``, i.e. under DP-SGD), or take ``objective`` when given, and
    record it in the model's loss spec; other losses are returned as they are. ``distilling``
    (FedNTD on): labels of one class count as labels when the data has class prompts (the other
    classes' prompts are the prompt term's negatives), so a site that holds one class trains the
    class-prompt objective NTD distils through."""
    if not isinstance(model.loss, AutoLoss):
        return model.objective, ""
    if objective:
        _set_objective(model, objective)
        return objective, "named by the training config"
    chosen, reason = objective_for(
        data,
        layout=model.head.layout,
        towers=model.head.describe()["dims"],
        private=private,
        distilling=distilling,
    )
    _set_objective(model, chosen)
    return chosen, reason


def objectives_to_try(model: HeadModel, objective: str) -> list[str]:
    """``objective`` and, for an ``auto`` loss, the ``AUTO_ALTERNATIVES`` it also trains where
    validation rows choose between them (``train_head``, ``arms.train_selected``)."""
    if not isinstance(model.loss, AutoLoss):
        return [objective]
    return [objective, *AUTO_ALTERNATIVES.get(objective, ())]


def _set_objective(model: HeadModel, objective: str) -> None:
    assert isinstance(model.loss, AutoLoss)
    model.loss.choose(objective)
    model.loss_spec["objective"] = objective


def objective_for(
    data: EmbeddedDataset,
    *,
    layout: str,
    towers: Iterable[str],
    private: bool = False,
    distilling: bool = False,
) -> tuple[str, str]:
    """What ``auto`` trains a head of ``layout`` with ``towers`` on ``data`` with, and why
    (``registries.choose_loss`` from the pairs, labels and class prompts the head can use;
    ``distilling``: see ``choose_objective``)."""
    towers = set(towers)
    two_tower = layout == "two-tower"
    paired = (
        two_tower
        and towers == {"image", "text"}
        and data.image is not None
        and data.text is not None
    )
    prompts = data.prompts is not None and "text" in towers and two_tower
    present = 1 if distilling and prompts else 2
    labelled = (
        data.labels is not None
        and data.num_classes >= 2
        and np.unique(data.labels[data.labels >= 0]).size >= present
    )
    return choose_loss(paired=paired, labelled=labelled, prompts=prompts, private=private)


def train_head(
    model: HeadModel,
    data: EmbeddedDataset,
    config: TrainConfig,
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` in place on ``data`` (AdamW, shuffled batches) for up to ``config.epochs``.

    ``auto`` chooses its objective from ``data`` first (or trains ``config.objective``). A head
    with a linear path starts as ``config.init`` says (see TrainConfig). With
    ``config.validation_fraction`` > 0 (and at least 10 usable rows) that share of ``data`` is
    validation: the head trains on the rest, is scored (``validation_scores``) at the start and
    after each epoch, and ends at the best state; a start is a candidate like every trained
    state, so the kept head's validation score is never below the start's. An ``auto`` loss then
    also trains the objectives ``AUTO_ALTERNATIVES`` lists for its choice, each from the same
    start, and keeps the best state of all. When the start wins and it was a closed-form map,
    the map is refitted on all of ``data`` (the frozen baseline exactly).
    ``reference`` is the round's global state (FedProx anchor when ``config.proximal_mu`` > 0;
    after a closed-form start the anchor is that start), and FedNTD's teacher when
    ``config.ntd_beta`` > 0 (none after a closed-form start: the start is the site's own); with
    a teacher only the chosen objective trains.
    """
    data.validate()
    objective, reason = choose_objective(
        model, data, objective=config.objective, distilling=config.ntd_beta > 0
    )
    rows = training_rows(model, data)
    fit_pos, val_pos = validation_split(
        len(rows),
        None if data.labels is None else data.labels[rows],
        fraction=config.validation_fraction,
        seed=config.seed,
    )
    fit_data = data.subset(rows[fit_pos])
    val_data = data.subset(rows[val_pos]) if val_pos.size else None
    init = ""
    start_scores: Mapping[str, float] | None = None  # known when the start was chosen by them
    if model.head.has_linear_path and config.init != "keep":
        init, start_scores = _start(model, fit_data, val_data, config.init)
        reference = None  # the proximal anchor is the start
    anchor = _proximal_anchor(model, reference) if config.proximal_mu > 0 else None
    distill = _distillation(model, reference, fit_data, config)
    candidates = [objective]
    if val_data is not None and not config.objective and distill is None:
        candidates = objectives_to_try(model, objective)
    start_state = copy.deepcopy(model.state_dict()) if len(candidates) > 1 else None
    if start_scores is None:
        start_scores = validation_scores(model, fit_data, val_data) if val_data is not None else {}
    started = time.perf_counter()
    kept: _Trajectory | None = None
    kept_objective = objective
    tried: dict[str, float] = {}
    steps = samples = 0
    for candidate in candidates:
        if start_state is not None and candidate != objective:
            model.load_state_dict(start_state)
            _set_objective(model, candidate)
        trajectory = _train_kept(
            model, fit_data, val_data, config, anchor, distill, start_scores, progress
        )
        steps += len(trajectory.losses)
        samples += len(trajectory.losses) * trajectory.batch_size
        tried[candidate] = trajectory.scores.get("score", math.nan)
        if kept is None or trajectory.scores["score"] > kept.scores["score"]:
            kept, kept_objective = trajectory, candidate
    assert kept is not None
    if kept.state is not None:
        model.load_state_dict(kept.state)
        if kept.epoch == 0 and init in ("lstsq", "cca"):
            init_closed_form(model, data.subset(rows), init)  # the frozen baseline, all rows
    if kept_objective != model.objective:
        _set_objective(model, kept_objective)
    if len(tried) > 1:
        shown = ", ".join(f"{name} {score:.4f}" for name, score in tried.items())
        reason += f"; kept {kept_objective} by the validation score ({shown})"
    seconds = time.perf_counter() - started
    model.eval()
    steps_per_epoch = max(1, len(fit_data) // kept.batch_size)
    final = float(np.mean(kept.losses[-steps_per_epoch:])) if kept.losses else math.nan
    if not math.isfinite(final) and kept.losses:
        raise DataError("training diverged: the loss became NaN/inf (lower the learning rate?)")
    result = TrainResult(
        loss=final,
        num_examples=len(rows),
        steps=steps,
        samples_seen=samples,
        seconds=seconds,
        objective=kept_objective,
        objective_reason=reason,
        init=init,
        best_epoch=kept.epoch if val_data is not None else -1,
        epochs_run=kept.epochs_run,
        num_validation=0 if val_data is None else len(val_data),
        validation=kept.scores,
        validation_start=start_scores,
        objectives_tried=tried if len(tried) > 1 else {},
    )
    if progress:
        print(result.summary())
    return result


@dataclass
class _Trajectory:
    """One objective's training from the start: its best validation state (``state`` None
    without validation rows: the last state is the model's), that state's epoch and scores."""

    losses: list[float]
    batch_size: int
    epochs_run: int
    epoch: int
    scores: Mapping[str, float]
    state: dict[str, torch.Tensor] | None


def _train_kept(
    model: HeadModel,
    fit_data: EmbeddedDataset,
    val_data: EmbeddedDataset | None,
    config: TrainConfig,
    anchor: Mapping[str, torch.Tensor] | None,
    distill: Distillation | None,
    start_scores: Mapping[str, float],
    progress: bool,
) -> _Trajectory:
    """Train from the model's current state (scored ``start_scores``), keeping the best state on
    ``val_data`` (the start a candidate); ``config.patience`` epochs without a new best stop."""
    best_scores: Mapping[str, float] = start_scores
    best_epoch = 0
    best_state = copy.deepcopy(model.state_dict()) if val_data is not None else None
    since_best = 0

    def after_epoch(epoch: int) -> bool:
        nonlocal best_scores, best_epoch, best_state, since_best
        if val_data is None:
            return True
        scores = validation_scores(model, fit_data, val_data)
        if scores["score"] > best_scores["score"]:
            best_scores, best_epoch, since_best = scores, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
        return not (config.patience and since_best >= config.patience)

    losses, batch_size, epochs_run = _train_epochs(
        model,
        fit_data,
        config,
        anchor=anchor,
        distill=distill,
        after_epoch=after_epoch,
        progress=progress,
    )
    return _Trajectory(losses, batch_size, epochs_run, best_epoch, best_scores, best_state)


def _start(
    model: HeadModel, fit: EmbeddedDataset, validation: EmbeddedDataset | None, init: str
) -> tuple[str, ValidationScores | None]:
    """Set the linear paths as ``init`` says; "closed-form" tries least squares and CCA on
    image-text pairs and keeps the one that scores better on ``validation`` (least squares
    without validation rows). Returns the method set and, when the choice scored them, the
    kept start's validation scores (None otherwise)."""
    paired = set(model.head.towers()) == {"image", "text"}
    if not paired:
        return init_closed_form(model, fit, "lstsq"), None
    if init != "closed-form":
        return init_closed_form(model, fit, init), None
    if validation is None:
        return init_closed_form(model, fit, "lstsq"), None
    best: tuple[ValidationScores, str, dict[str, torch.Tensor]] | None = None
    for method in ("lstsq", "cca"):
        init_closed_form(model, fit, method)
        scores = validation_scores(model, fit, validation)
        if best is None or scores["score"] > best[0]["score"]:
            best = (scores, method, copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[2])
    return best[1], best[0]


def _train_epochs(
    model: HeadModel,
    data: EmbeddedDataset,
    config: TrainConfig,
    *,
    anchor: Mapping[str, torch.Tensor] | None,
    distill: Distillation | None,
    after_epoch: Callable[[int], bool],
    progress: bool,
) -> tuple[list[float], int, int]:
    """Up to ``config.epochs`` epochs on every row of ``data``; ``after_epoch(epoch)`` (1-based)
    returns False to stop. Returns the step losses, the batch size and the epochs run."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        _param_groups(model, config.lr), lr=config.lr, weight_decay=config.weight_decay
    )
    image = None if data.image is None else torch.from_numpy(np.ascontiguousarray(data.image))
    text = None if data.text is None else torch.from_numpy(np.ascontiguousarray(data.text))
    labels = None if data.labels is None else torch.from_numpy(data.labels)
    prompts = _tensor(data.prompts, slice(None)) if model.uses_prompts else None
    n = len(data)
    batch_size = min(config.batch_size, n)
    steps_per_epoch = max(1, n // batch_size)  # drop the ragged last batch: in-batch losses
    losses: list[float] = []
    epochs: Any = range(1, config.epochs + 1)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="training", unit="epoch", leave=False)
    done = 0
    for epoch in epochs:
        model.train()
        order = torch.randperm(n, generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            loss = model.compute_loss(
                None if image is None else image[batch],
                None if text is None else text[batch],
                None if labels is None else labels[batch],
                prompts=prompts,
                distill=distill,
                index=batch,
            )
            if anchor is not None:
                loss = loss + 0.5 * config.proximal_mu * _proximal_term(model, anchor)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        done = epoch
        model.eval()
        if not math.isfinite(losses[-1]):
            break
        if not after_epoch(epoch):
            break
    return losses, batch_size, done


RESIDUAL_LR_SCALE = 0.1
"""With a linear path, the head's learning rate relative to ``TrainConfig.lr`` (the loss's own
parameters keep ``lr``): the residual MLP starts at zero output, and at the full rate its first
Adam steps outweigh the closed-form map (measured on synthetic-radiology's validation rows: at
2e-3 retrieval fell from 0.18 to 0.05 in one epoch; at 2e-4 every validation metric rose)."""

LINEAR_PATH_LR_SCALE = 0.1
"""The linear paths' learning rate relative to the residual's: a closed-form map's weights are
small (mean |w| about 6e-4 for MobileNetV2 -> MiniLM), and Adam moves every weight by about its
learning rate per step whatever the weight's scale."""


def _distillation(
    model: HeadModel,
    reference: Mapping[str, torch.Tensor] | None,
    data: EmbeddedDataset,
    config: TrainConfig,
) -> Distillation | None:
    """FedNTD's term with its teacher, the round's global head ``reference``; None when
    ``config.ntd_beta`` is 0, or nothing trains, or there is no teacher (a pooled or single-site
    run; a round that starts at the site's own closed-form map). What NTD cannot use is refused
    first, whether or not this round has a teacher. The teacher is frozen, so its class logits of
    every row of ``data`` are computed once."""
    if config.ntd_beta == 0:
        return None
    temperature = prompt_temperature(model.loss, name=model.objective)
    classes = 0 if data.labels is None or data.prompts is None else len(data.prompts)
    check_classes(classes)
    if reference is None or config.epochs == 0:
        return None
    teacher = copy.deepcopy(model)
    teacher.load_state_dict(reference)
    projected = teacher.project(data)
    every = slice(None)
    image, text = (_tensor(projected.get(k), every) for k in ("image", "text"))
    rows = stack_rows("not-true distillation", image, text, None)
    logits = class_logits(rows.z, torch.from_numpy(projected["prompts"]), temperature)
    term = NotTrueDistillation(beta=config.ntd_beta, tau=config.ntd_tau)
    return Distillation(term, logits.reshape(-1, len(data), classes), temperature)


def _param_groups(model: HeadModel, lr: float) -> list[dict[str, Any]]:
    if not model.head.has_linear_path:
        return [{"params": list(model.parameters())}]
    linear = [p for name, p in model.named_parameters() if is_linear_path(name)]
    head = [p for name, p in model.named_parameters() if name.startswith("head.")]
    ids = {id(p) for p in linear}
    residual = [p for p in head if id(p) not in ids]
    head_ids = {id(p) for p in head}
    rest = [p for p in model.parameters() if id(p) not in head_ids]
    groups: list[dict[str, Any]] = [
        {"params": residual, "lr": lr * RESIDUAL_LR_SCALE},
        {"params": linear, "lr": lr * RESIDUAL_LR_SCALE * LINEAR_PATH_LR_SCALE},
    ]
    if rest:
        groups.append({"params": rest})
    return groups


def is_linear_path(name: str) -> bool:
    """Whether parameter ``name`` belongs to a tower's linear path (``head.<tower>.linear.*``)."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "head" and parts[2] == "linear"


def _proximal_anchor(
    model: HeadModel, reference: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    source = reference if reference is not None else model.state_dict()
    return {name: source[name].detach().clone() for name, _ in model.named_parameters()}


def _proximal_term(model: HeadModel, anchor: Mapping[str, torch.Tensor]) -> torch.Tensor:
    terms = [((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters()]
    return torch.stack(terms).sum()


def _tensor(array: np.ndarray | None, sl: slice) -> torch.Tensor | None:
    if array is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(array[sl], dtype=np.float32))
