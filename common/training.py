"""Local training of a projection head on frozen embeddings with a contrastive loss (one site)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import RunSettings, TrainConfig
from common.embedding import EmbeddedDataset
from common.errors import ConfigError, DataError
from common.heads import HEAD_PRESETS, HeadConfig, MultimodalHead
from common.losses import build_loss
from common.registries import loss_info


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
        )
        return cls(head, loss, loss_spec=spec)

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
    ) -> torch.Tensor:
        """Project the frozen inputs and apply the loss (the concat layout's output is one view).

        ``prompts``: the class prompts' frozen text embeddings, projected here by the text tower
        for a loss that ``uses_prompts``.
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
        return self.loss(image=out.get("image"), text=out.get("text"), labels=labels, **extra)

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
    """A freshly initialised head + loss for inputs of the given per-modality dimensions."""
    info = loss_info(loss)
    if info.pairs and (layout != "two-tower" or set(dims) != {"image", "text"}):
        raise ConfigError(f"loss '{loss}' needs paired images and texts with the two-tower layout")
    if info.labels and not num_classes:
        raise ConfigError(f"loss '{loss}' needs class labels, but the dataset has none")
    torch.manual_seed(seed)
    head = MultimodalHead(dims=dict(dims), config=head_config, layout=layout)
    spec = {
        "name": loss,
        "num_classes": num_classes,
        "dim": head_config.out_dim,
        "temperature": temperature,
    }
    module = build_loss(
        loss, num_classes=num_classes, dim=head_config.out_dim, temperature=temperature
    )
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
    """Summary of one local training call."""

    loss: float
    num_examples: int
    steps: int
    samples_seen: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return 0.0 if self.seconds <= 0 else self.samples_seen / self.seconds


def training_rows(model: HeadModel, data: EmbeddedDataset) -> np.ndarray:
    """Indices of the rows the model's loss can use (label losses skip unlabelled rows)."""
    rows = np.arange(len(data))
    if loss_info(model.loss_spec["name"]).labels:
        if data.labels is None:
            raise DataError(f"loss '{model.loss_spec['name']}' needs labels, but the data has none")
        rows = rows[data.labels >= 0]
    if rows.size == 0:
        raise DataError("no usable training examples (all rows unlabelled?)")
    return rows


def train_head(
    model: HeadModel,
    data: EmbeddedDataset,
    config: TrainConfig,
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``config.epochs`` epochs (AdamW, shuffled batches).

    ``reference`` is the round's global state (FedProx anchor when ``config.proximal_mu`` > 0).
    """
    data.validate()
    rows = training_rows(model, data)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    anchor = _proximal_anchor(model, reference) if config.proximal_mu > 0 else None
    image = None if data.image is None else torch.from_numpy(np.ascontiguousarray(data.image[rows]))
    text = None if data.text is None else torch.from_numpy(np.ascontiguousarray(data.text[rows]))
    labels = None if data.labels is None else torch.from_numpy(data.labels[rows])
    prompts = _tensor(data.prompts, slice(None)) if model.uses_prompts else None
    batch_size = min(config.batch_size, len(rows))
    steps_per_epoch = max(1, len(rows) // batch_size)  # drop the ragged last batch: in-batch losses
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    epochs = range(config.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="training", unit="epoch", leave=False)
    for _ in epochs:
        order = torch.randperm(len(rows), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            loss = model.compute_loss(
                None if image is None else image[batch],
                None if text is None else text[batch],
                None if labels is None else labels[batch],
                prompts=prompts,
            )
            if anchor is not None:
                loss = loss + 0.5 * config.proximal_mu * _proximal_term(model, anchor)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    model.eval()
    final = float(np.mean(losses[-steps_per_epoch:])) if losses else math.nan
    if not math.isfinite(final) and losses:
        raise DataError("training diverged: the loss became NaN/inf (lower the learning rate?)")
    return TrainResult(
        loss=final,
        num_examples=len(rows),
        steps=len(losses),
        samples_seen=len(losses) * batch_size,
        seconds=seconds,
    )


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
