"""DP-SGD inside the public span of the class prompts (client/privacy/subspace.py), alone and
through the site's private round (``train_head_private``, real Opacus)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from client.privacy import PrivacySettings, train_head_private
from client.privacy.subspace import SubspaceLinear, prompt_basis, public_subspace
from common.errors import ConfigError
from common.heads import HEAD_PRESETS
from common.training import HeadModel, TrainConfig, build_head_model
from tests.embedded_data import clustered

AFFINE = ("head.image.linear", "head.text.linear")


def _aligned() -> HeadModel:
    return build_head_model(
        dims={"image": 12, "text": 8}, head_config=HEAD_PRESETS["aligned"], loss="auto", seed=0
    )


def _round(
    model: HeadModel,
    config: TrainConfig,
    privacy: PrivacySettings,
    tmp_path: Path,
    reference: dict[str, torch.Tensor] | None = None,
    mode: str = "ghost",
) -> int:
    """One private round on ``clustered(64, prompts=True)``; returns its steps."""
    result = train_head_private(
        model,
        clustered(64, prompts=True),
        config,
        privacy,
        ledger_path=tmp_path / "ledger.json",
        planned_rounds=1,
        run_id=1,
        server_round=1,
        reference=reference,
        grad_sample_mode=mode,
    )
    return result.steps


def _outside(move: torch.Tensor, basis: torch.Tensor) -> float:
    """The share of ``move`` ([out] or [out, in]) outside the row span of ``basis`` [k, out]."""
    rest = move - basis.T @ (basis @ move)
    return float(rest.norm() / move.norm())


def test_the_prompt_basis_is_orthonormal_and_spans_the_prompts() -> None:
    prompts = np.random.default_rng(0).normal(size=(3, 8))
    basis = prompt_basis(np.vstack([prompts, prompts[0] + prompts[1]]), 8)  # a dependent row
    assert basis is not None and basis.shape == (3, 8)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    for row in torch.from_numpy(prompts.astype(np.float32)):
        assert _outside(row, basis) < 1e-5
    assert prompt_basis(prompts, 12) is None  # the head's output space is not the prompts'
    assert prompt_basis(np.zeros((0, 8)), 8) is None


def test_a_subspace_linear_starts_as_its_map_and_folds_to_what_it_computes() -> None:
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(6, 4)
    basis = prompt_basis(np.random.default_rng(1).normal(size=(2, 4)), 4)
    assert basis is not None
    sub = SubspaceLinear(linear, basis)
    x = torch.randn(5, 6, generator=generator)
    torch.testing.assert_close(sub(x), linear(x))
    assert [p.shape for p in sub.parameters()] == [(2, 6), (2,)]  # only the coefficients train
    with torch.no_grad():
        for p in sub.coef.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    weight, bias = sub.folded()
    torch.testing.assert_close(x @ weight.T + bias, sub(x))
    assert _outside(weight - linear.weight.detach(), basis) < 1e-5
    for got, want in zip(sub.anchor(weight, bias), sub.coef.parameters(), strict=True):
        torch.testing.assert_close(got, want.detach())  # FedProx's anchor at a folded map
    with pytest.raises(ValueError, match=r"basis must be \[k, 4\]"):
        SubspaceLinear(linear, torch.eye(6))


def test_the_swap_keeps_the_heads_parameters_and_an_error_leaves_them_as_they_were() -> None:
    model = _aligned()
    prompts = clustered(8, prompts=True).prompts
    assert prompts is not None
    basis = prompt_basis(prompts, 8)
    assert basis is not None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    identities = {name: id(p) for name, p in model.named_parameters()}
    with (
        pytest.raises(RuntimeError, match="boom"),
        public_subspace(model.head, basis, ("image", "text")) as subspaces,
    ):
        with torch.no_grad():
            for sub in subspaces.values():
                for p in sub.coef.parameters():
                    p.add_(1.0)
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with public_subspace(model.head, basis, ("image",)) as subspaces, torch.no_grad():
        assert list(subspaces) == ["image"]
        for p in subspaces["image"].coef.parameters():
            p.add_(1.0)
    assert {name: id(p) for name, p in model.named_parameters()} == identities
    after = model.state_dict()
    assert set(after) == set(before)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"head.image.linear.weight", "head.image.linear.bias"}


@pytest.mark.parametrize(
    ("space", "mu", "mode"),
    [
        ("prompts", 0.0, "ghost"),
        ("prompts", 0.0, "hooks"),
        ("prompts", 0.0, "functorch"),
        ("prompts", 0.5, "ghost"),
        ("full", 0.0, "ghost"),
    ],
)
def test_dp_sgd_moves_the_affine_paths_only_along_the_prompts_unless_full(
    space: str, mu: float, mode: str, tmp_path: Path
) -> None:
    """The production private round with ``dp-update-space``: "prompts" moves both towers'
    affine paths within the prompts' span (and nothing else), also with FedProx pulling towards
    a global head off the span; "full" everywhere."""
    data = clustered(64, prompts=True)
    model = _aligned()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    reference = {k: v + torch.randn(v.shape, generator=generator) for k, v in before.items()}
    config = TrainConfig(loss="auto", epochs=2, batch_size=16, proximal_mu=mu)
    privacy = PrivacySettings(noise_multiplier=1.0, update_space=space)
    assert _round(model, config, privacy, tmp_path, reference if mu else None, mode) > 0
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {f"{path}.{part}" for path in AFFINE for part in ("weight", "bias")}
    assert data.prompts is not None
    basis = prompt_basis(data.prompts, 8)
    assert basis is not None and basis.shape[0] == 4  # 4 prompts span 4 of the 8 output dims
    # per tower, its weight and bias moves side by side: [out, in + 1] (a bias alone has only
    # 8 entries, whose share outside a 4-d span is below 0.2 by chance now and then)
    shares = [
        _outside(
            torch.cat(
                [
                    after[f"{p}.weight"] - before[f"{p}.weight"],
                    (after[f"{p}.bias"] - before[f"{p}.bias"])[:, None],
                ],
                dim=1,
            ),
            basis,
        )
        for p in AFFINE
    ]
    if space == "prompts":
        assert max(shares) < 1e-4
    else:
        assert min(shares) > 0.2
    assert all(p.requires_grad for p in model.parameters())


def test_an_unknown_update_space_or_a_bad_dp_lr_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="dp-update-space must be one of"):
        PrivacySettings.from_config({"dp-update-space": "everything"})
    with pytest.raises(ConfigError, match="dp-lr must be a finite number > 0"):
        PrivacySettings.from_config({"dp-lr": -1})
    settings = PrivacySettings.from_config({"dp-update-space": "full", "dp-lr": 0.05})
    assert (settings.update_space, settings.lr) == ("full", 0.05)


def test_a_proxy_loss_still_trains_its_class_proxies_in_the_subspace(tmp_path: Path) -> None:
    model = build_head_model(
        dims={"image": 12, "text": 8},
        head_config=HEAD_PRESETS["aligned"],
        loss="proxy",
        num_classes=4,
        seed=0,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(loss="proxy", epochs=1, batch_size=16)
    _round(model, config, PrivacySettings(noise_multiplier=1.0), tmp_path)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert (
        {k for k in moved if not k.startswith("head.")}
        == {k for k, p in model.named_parameters() if not k.startswith("head.")}
        != set()
    )


def test_fedprox_anchors_the_coefficients_at_the_global_maps_projection() -> None:
    """``mu (A - anchor)`` is the proximal term's gradient in coefficient space only if the anchor
    of each coefficient is the projection of the global map's own part (weight or bias) of the
    right tower onto the span, relative to the start."""
    from client.privacy.dp_sgd import _anchor

    model = _aligned()
    prompts = clustered(8, prompts=True).prompts
    assert prompts is not None
    basis = prompt_basis(prompts, 8)
    assert basis is not None
    k = basis.shape[0]
    start = {name: v.clone() for name, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    wanted = {
        f"{tower}.{part}": torch.randn(
            (k, width) if part == "weight" else (k,), generator=generator
        )
        for tower, width in (("image", 12), ("text", 8))
        for part in ("weight", "bias")
    }
    off_span = torch.eye(8) - basis.T @ basis
    reference = dict(start)
    for key, coefficients in wanted.items():
        tower, part = key.split(".")
        name = f"head.{tower}.linear.{part}"
        noise = torch.randn(start[name].shape, generator=generator)
        reference[name] = start[name] + basis.T @ coefficients + off_span @ noise
    with public_subspace(model.head, basis, ("image", "text")) as subspaces:
        named = [(n, p) for n, p in model.named_parameters() if ".coef." in n]
        assert len(named) == 4
        for (name, _), anchor in zip(
            named, _anchor(model, named, reference, subspaces), strict=True
        ):
            parts = name.split(".")
            torch.testing.assert_close(anchor, wanted[f"{parts[1]}.{parts[4]}"])
        # without a global head the anchor is the current point: every coefficient at zero
        for (name, p), anchor in zip(named, _anchor(model, named, None, subspaces), strict=True):
            assert torch.equal(anchor, torch.zeros_like(p)), name
