"""What every loss checks and builds from its inputs: stacked rows, label masks, temperatures.

Conventions shared by all losses (common/losses.py, common/dp_losses.py):
- inputs are the head's outputs, [B, d] each, expected L2-normalised (similarities are plain dot
  products, not re-normalised); when both image and text are given, row i of each is one example.
- labels: integer tensor [B]; a negative label (-1) means "no label".
- "stacked rows": z = [image; text] (2B rows) with labels repeated, so the image and text rows of
  one example, and cross-modal pairs in general, take part; with one modality z is that modality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rows:
    """Stacked embedding rows with their labels (or None) and the example each row belongs to."""

    z: Tensor
    labels: Tensor | None
    example: Tensor


def check_embeddings(loss: str, name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{loss}: {name} embeddings must be [batch, dim], got {list(x.shape)}")


def check_labels(loss: str, labels: Tensor, batch: int) -> None:
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{loss}: labels must have shape [{batch}], got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{loss}: labels must be an integer tensor, got {labels.dtype}")


def stack_rows(loss: str, image: Tensor | None, text: Tensor | None, labels: Tensor | None) -> Rows:
    """Validate the inputs and stack the available modalities as rows [image; text]."""
    parts = [(name, x) for name, x in (("image", image), ("text", text)) if x is not None]
    if not parts:
        raise ValueError(f"{loss}: needs image and/or text embeddings, got neither")
    for name, x in parts:
        check_embeddings(loss, name, x)
    if image is not None and text is not None and image.shape != text.shape:
        raise ValueError(
            f"{loss}: image and text must be paired rows of equal shape, "
            f"got {list(image.shape)} and {list(text.shape)}"
        )
    batch = parts[0][1].shape[0]
    if batch < 1:
        raise ValueError(f"{loss}: needs a non-empty batch")
    if labels is not None:
        check_labels(loss, labels, batch)
    repeat = len(parts)
    example = torch.arange(batch, device=parts[0][1].device).repeat(repeat)
    return Rows(
        z=torch.cat([x for _, x in parts], dim=0),
        labels=None if labels is None else labels.repeat(repeat),
        example=example,
    )


def positive_mask(rows: Rows) -> Tensor:
    """[N, N] bool: j != i and (same example, or both labelled with the same label)."""
    same = rows.example[:, None] == rows.example[None, :]
    if rows.labels is not None:
        known = rows.labels >= 0
        same = same | (
            (rows.labels[:, None] == rows.labels[None, :]) & known[:, None] & known[None, :]
        )
    eye = torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
    return same & ~eye


def zero_loss(z: Tensor) -> Tensor:
    """A zero loss that still belongs to the graph (so ``backward()`` works and gives zeros)."""
    return z.sum() * 0.0


def check_temperature(loss: str, temperature: float) -> float:
    if temperature <= 0:
        raise ValueError(f"{loss}: temperature must be > 0, got {temperature}")
    return float(temperature)


def check_prompts(loss: str, rows: Rows, prompts: Tensor) -> None:
    """The projected class prompts [C, d] of a prompt loss: as wide as the rows, one per label."""
    check_embeddings(loss, "prompt", prompts)
    if prompts.shape[1] != rows.z.shape[1]:
        raise ValueError(
            f"{loss}: prompts have dim {prompts.shape[1]}, embeddings {rows.z.shape[1]}"
        )
    if rows.labels is not None and bool((rows.labels >= prompts.shape[0]).any()):
        raise ValueError(f"{loss}: a label is >= the number of class prompts ({prompts.shape[0]})")
