"""DP-SGD that moves a head's affine paths only along public directions of its output space.

Under DP-SGD the noise added at each step has the same scale in every trained coordinate, while the
clipped signal of a zero-shot objective lives in few directions. The ``aligned`` head's affine paths
are ``out x in`` maps (384 x 1280 for an image tower into MiniLM's space); training
``W = W_start + U^T A`` instead, with ``U`` a ``k x out`` orthonormal basis fixed before any data is
seen and ``A`` the ``k x in`` trained coefficients, leaves ``k / out`` of the coordinates to the
noise (5 / 384 for five class prompts) at the same clipping norm and noise multiplier.

The basis is public: the span of the task's class prompts embedded by the frozen text encoder
(``prompt_basis``), task metadata every site holds, not a function of any example. Zero-shot
scores see a projection through its components along the projected prompts, which stay in that
span while the text tower starts at the identity. The start ``W_start`` (the round's global map) is
kept whole, so what it carries outside the span (a linear probe reads all of it) is not lost.

The head's state dict never changes: ``public_subspace`` swaps each tower's ``linear`` for a
``SubspaceLinear`` during training and folds ``W_start + U^T A`` back into it afterwards, so what
leaves the site has the same names, shapes and dtypes either way. Measured in
docs/results/privacy/ (``dp-update-space``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.heads import MultimodalHead

BASIS_TOL = 1e-6
"""Singular values below this share of the largest drop a prompt direction from the basis."""


def prompt_basis(prompts: np.ndarray, out_dim: int) -> Tensor | None:
    """Orthonormal rows [k, out_dim] spanning the frozen prompt embeddings [C, out_dim] (the output
    space of an ``aligned`` head is the text encoder's); None when the widths differ (the head's
    output space is then not the prompts'), or there are no prompts or they span nothing."""
    array = np.asarray(prompts, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != out_dim:
        return None
    _, singular, vt = np.linalg.svd(array, full_matrices=False)
    keep = singular > BASIS_TOL * max(float(singular[0]), np.finfo(np.float64).tiny)
    if not keep.any():  # all-zero prompts span nothing
        return None
    return torch.from_numpy(vt[keep].astype(np.float32))


class SubspaceLinear(nn.Module):
    """``x -> x @ W.T + b + (x @ A.T + a) @ U``: the fixed affine map ``(W, b)`` of ``linear`` plus
    a trained one, ``coef`` ``(A, a)``, starting at zero, whose outputs lie in the row span of
    ``basis`` (``U``, [k, out], orthonormal rows)."""

    base_weight: Tensor
    base_bias: Tensor
    basis: Tensor

    def __init__(self, linear: nn.Linear, basis: Tensor) -> None:
        super().__init__()
        weight = linear.weight.detach().clone()
        bias = (
            linear.bias.detach().clone()
            if linear.bias is not None
            else weight.new_zeros(weight.shape[0])
        )
        if basis.dim() != 2 or basis.shape[1] != weight.shape[0]:
            raise ValueError(
                f"SubspaceLinear: basis must be [k, {weight.shape[0]}], got {list(basis.shape)}"
            )
        self.register_buffer("base_weight", weight)
        self.register_buffer("base_bias", bias)
        self.register_buffer("basis", basis.to(dtype=weight.dtype, device=weight.device))
        self.coef = nn.Linear(
            weight.shape[1], basis.shape[0], dtype=weight.dtype, device=weight.device
        )
        with torch.no_grad():
            self.coef.weight.zero_()
            self.coef.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base_weight, self.base_bias) + self.coef(x) @ self.basis

    def anchor(self, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """The coefficients ``(A, a)`` nearest the affine map ``(weight, bias)`` (its projection
        onto the span, relative to the fixed map): FedProx's anchor in coefficient space."""
        with torch.no_grad():
            return (
                self.basis @ (weight.to(self.basis.dtype) - self.base_weight),
                self.basis @ (bias.to(self.basis.dtype) - self.base_bias),
            )

    def folded(self) -> tuple[Tensor, Tensor]:
        """The map as one affine ``(weight [out, in], bias [out])``."""
        with torch.no_grad():
            weight = self.base_weight + self.basis.T @ self.coef.weight
            bias = self.base_bias + self.basis.T @ self.coef.bias
        return weight, bias


@contextlib.contextmanager
def public_subspace(
    head: MultimodalHead, basis: Tensor, towers: tuple[str, ...]
) -> Iterator[dict[str, SubspaceLinear]]:
    """Within the block each named tower's affine path is a ``SubspaceLinear`` (yielded by tower
    name; its coefficients are parameters ``<tower>.linear.coef.*`` of the head). On a normal exit
    each path is set, in place, to its folded map (the head's parameters keep their identity, names
    and shapes); on an exception it is left as it was."""
    swapped: dict[str, tuple[nn.Linear, SubspaceLinear]] = {}
    all_towers = head.towers()
    try:
        for name in towers:
            tower = all_towers[name]
            if tower.linear is None:
                raise ValueError(f"public_subspace: the {name} tower has no affine path")
            original = tower.linear
            swapped[name] = (original, SubspaceLinear(original, basis))
            tower.linear = swapped[name][1]  # type: ignore[assignment]
        yield {name: sub for name, (_, sub) in swapped.items()}
        for original, sub in swapped.values():
            weight, bias = sub.folded()
            with torch.no_grad():
                original.weight.copy_(weight)
                if original.bias is not None:
                    original.bias.copy_(bias)
    finally:
        for name, (original, _) in swapped.items():
            all_towers[name].linear = original
