"""Watching the production DP-SGD loop without changing it (tests of client/privacy/dp_sgd.py)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from common.dp_losses import ClassProxyLoss
from common.embedding import EmbeddedDataset
from common.training import HeadModel


class StepObserver:
    """Records, for every step of the production loop: which rows the head saw, the trainable
    parameters the step's gradient was computed at, and the flat gradient AdamW receives (every
    trainable parameter, in order, each with a gradient)."""

    def __init__(self, model: HeadModel, data: EmbeddedDataset) -> None:
        assert data.image is not None
        self.model = model
        image = np.ascontiguousarray(data.image, dtype=np.float32)
        self.row_of = {row.tobytes(): i for i, row in enumerate(image)}
        assert len(self.row_of) == len(image)
        self.batches: list[list[int]] = []
        self.params: list[dict[str, torch.Tensor]] = []
        self.grads: list[torch.Tensor] = []
        self._seen: list[int] = []
        self._handles: list[Any] = []

    def __enter__(self) -> StepObserver:
        self._handles = [
            self.model.head.register_forward_pre_hook(self._forward, with_kwargs=True),
            register_optimizer_step_pre_hook(self._step),
        ]
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()

    def _forward(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs.get("image") is None:  # the class prompts, projected without gradient
            return
        image = kwargs["image"].detach().numpy()
        self._seen.extend(self.row_of[row.tobytes()] for row in image)

    def _step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        names = {id(p): name for name, p in self.model.named_parameters()}
        stepped = {names[id(p)]: p for group in optimizer.param_groups for p in group["params"]}
        assert list(stepped) == trainable(self.model)
        grads = [p.grad for p in stepped.values()]
        assert all(g is not None for g in grads), "a parameter reached AdamW without a gradient"
        self.params.append({name: p.detach().clone() for name, p in stepped.items()})
        self.grads.append(torch.cat([g.detach().reshape(-1) for g in grads if g is not None]))
        self.batches.append(self._seen)
        self._seen = []


def trainable(model: HeadModel) -> list[str]:
    """The parameters DP-SGD trains, in order: the head's, and the class proxies of ``proxy`` (the
    prompt losses' only parameter, ``auto``'s CLIP temperature, is not used under DP)."""
    proxy = isinstance(model.loss, ClassProxyLoss)
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (proxy or not name.startswith("loss."))
    ]
