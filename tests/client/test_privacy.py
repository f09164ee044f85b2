"""Sample-level DP-SGD at a site: per-example gradients, sensitivity, refusals, ledger and budgets."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

from client.privacy import (
    PrivacyLedger,
    PrivacySettings,
    PrivateObjective,
    PrivateRoundResult,
    pld_epsilon,
    train_head_private,
)
from common.embedding import EmbeddedDataset
from common.errors import ConfigError, DataError, PrivacyError
from common.heads import HEAD_PRESETS, HeadConfig
from common.privacy import sample_dp_loss_choices
from common.registries import sample_dp_losses
from common.training import HeadModel, TrainConfig, build_head_model, choose_objective
from tests.embedded_data import clustered

HEAD = HeadConfig(out_dim=8, hidden_dim=16)
DELTA = 1e-5


def _model(loss: str = "proxy", *, layout: str = "two-tower", seed: int = 0) -> HeadModel:
    return build_head_model(
        dims={"image": 12, "text": 8},
        head_config=HEAD,
        layout=layout,
        loss=loss,
        num_classes=4,
        seed=seed,
    )


def _batch(data: EmbeddedDataset, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    assert data.image is not None and data.text is not None and data.labels is not None
    return (
        torch.from_numpy(data.image[:size]),
        torch.from_numpy(data.text[:size]),
        torch.from_numpy(data.labels[:size]),
    )


def _objective(model: HeadModel, data: EmbeddedDataset) -> PrivateObjective:
    """The production private objective of ``model`` on ``data`` (``auto`` chooses under DP)."""
    choose_objective(model, data, private=True)
    prompts = None if data.prompts is None else torch.from_numpy(data.prompts)
    return PrivateObjective(model, prompts)


def _trained(objective: PrivateObjective) -> list[torch.nn.Parameter]:
    return [p for p in objective.parameters() if p.requires_grad]


def _opacus_grad_samples(
    objective: PrivateObjective,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    *,
    mode: str = "hooks",
) -> torch.Tensor:
    """Opacus' per-example gradients [B, P] of the private objective."""
    gsm = prepare_module(objective, grad_sample_mode=mode, loss_reduction="mean")
    gsm.train()
    gsm(x, t, y).mean().backward()
    grads = _stacked_grad_samples(iter(_trained(objective)), len(y))
    gsm.cleanup()
    objective.zero_grad(set_to_none=True)
    return grads


def _stacked_grad_samples(params: Iterator[torch.nn.Parameter], batch: int) -> torch.Tensor:
    """The per-example gradients Opacus stored on ``params``, flattened to [B, P]."""
    return torch.cat([p.grad_sample.reshape(batch, -1) for p in params], dim=1)  # type: ignore[attr-defined]


def _autograd_grads(
    objective: PrivateObjective, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Plain autograd gradient of each single example's loss, [B, P]."""
    rows = []
    for i in range(len(y)):
        loss = objective(x[i : i + 1], t[i : i + 1], y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, _trained(objective))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _clipped_sum(grads: torch.Tensor, clip: float) -> torch.Tensor:
    norms = grads.norm(dim=1, keepdim=True)
    return (grads * (clip / (norms + 1e-6)).clamp(max=1.0)).sum(dim=0)


def _state(model: HeadModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _full_loss(model: HeadModel, data: EmbeddedDataset) -> float:
    with torch.no_grad():
        return float(model.compute_loss(*_batch(data, len(data))))


def _rdp(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta=delta))


def _round(
    model: HeadModel,
    data: EmbeddedDataset,
    privacy: PrivacySettings,
    ledger: Path,
    *,
    server_round: int = 1,
    run_id: int = 7,
    planned_rounds: int = 3,
    **config: Any,
) -> PrivateRoundResult:
    settings: dict[str, Any] = {"loss": "proxy", "epochs": 1, "batch_size": 32, "lr": 5e-3}
    return train_head_private(
        model,
        data,
        TrainConfig(**{**settings, **config}),
        privacy,
        ledger_path=ledger,
        planned_rounds=planned_rounds,
        run_id=run_id,
        server_round=server_round,
    )


# 1. the decomposable loss: Opacus' per-example gradients are right and one example moves <= C


@pytest.mark.parametrize(("mode", "layout"), [("hooks", "two-tower"), ("functorch", "concat")])
def test_opacus_per_example_gradients_equal_autograd(mode: str, layout: str) -> None:
    model = _model(layout=layout)
    assert "loss.classifier.proxies" in dict(model.named_parameters())
    data = clustered()
    objective = _objective(model, data)
    x, t, y = _batch(data, 16)
    opacus = _opacus_grad_samples(objective, x, t, y, mode=mode)
    torch.testing.assert_close(opacus, _autograd_grads(objective, x, t, y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", sample_dp_loss_choices())
def test_ghost_clipping_sums_clipped_gradients_and_one_example_moves_at_most_c(loss: str) -> None:
    """Every loss a run may train with under sample-level DP: the production objective's
    per-example gradients (Opacus) equal each example's own gradient computed alone, ghost
    clipping sums them clipped to C, and removing any one example moves that sum by <= C."""
    model, data = _model(loss), clustered(prompts=True)
    objective = _objective(model, data)
    assert model.objective in sample_dp_losses()  # auto chose a per-example objective
    x, t, y = _batch(data, 16)
    grads = _autograd_grads(objective, x, t, y)
    torch.testing.assert_close(
        _opacus_grad_samples(objective, x, t, y), grads, rtol=1e-4, atol=1e-5
    )
    clip = float(grads.norm(dim=1).median())  # about half the examples get clipped

    gsm = prepare_module(objective, grad_sample_mode="ghost", max_grad_norm=clip)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(_trained(objective), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=16,
    )
    criterion = DPLossFastGradientClipping(gsm, optimizer, _Identity(), "mean")
    gsm.train()
    criterion(gsm(x, t, y)).backward()
    ghost = torch.cat([p.grad.reshape(-1) for p in _trained(objective)])  # type: ignore[union-attr]
    gsm.cleanup()
    objective.zero_grad(set_to_none=True)
    torch.testing.assert_close(ghost, _clipped_sum(grads, clip), rtol=1e-4, atol=1e-5)

    full = _clipped_sum(_opacus_grad_samples(objective, x, t, y), clip)
    for j in range(16):
        keep = torch.arange(16) != j
        without = _clipped_sum(_opacus_grad_samples(objective, x[keep], t[keep], y[keep]), clip)
        assert float((full - without).norm()) <= clip * (1 + 1e-5)


def test_auto_under_dp_trains_the_best_per_example_objective_and_says_so(tmp_path: Path) -> None:
    privacy = PrivacySettings(noise_multiplier=1.0)
    paired = _round(_model("auto"), clustered(64, prompts=True), privacy, tmp_path / "a.json")
    assert paired.objective == "infonce-public+prompts" and paired.steps > 0
    assert "sample-level DP" in paired.objective_reason
    with pytest.raises(DataError, match=r"no class prompts.*name loss 'proxy'"):
        _round(_model("auto"), clustered(64), privacy, tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()  # refused before anything was charged


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
@pytest.mark.parametrize("missing", ["image", "text"])
def test_a_site_with_one_modality_trains_the_run_s_two_tower_head(
    missing: str, mode: str, tmp_path: Path
) -> None:
    """The run's head has both towers; a site holding only reports (or only images) trains the
    tower its data reaches, under auto (prompts) and proxy alike, and the other stays as sent."""
    privacy = PrivacySettings(noise_multiplier=1.0)
    for loss in ("auto", "proxy"):
        data = clustered(64, prompts=True)
        setattr(data, missing, None)
        model = _model(loss)
        before = _state(model)
        result = train_head_private(
            model,
            data,
            TrainConfig(epochs=1, batch_size=32, lr=5e-3),
            privacy,
            ledger_path=tmp_path / f"{loss}-{missing}-{mode}.json",
            planned_rounds=3,
            run_id=7,
            server_round=1,
            grad_sample_mode=mode,
        )
        assert result.steps > 0
        assert loss == "proxy" or result.objective == "prompts"
        after = _state(model)
        moved = {n.split(".")[1] for n in before if not torch.equal(before[n], after[n])}
        assert missing not in moved and (moved - {"classifier"}) >= {
            "text" if missing == "image" else "image"
        }


def test_a_named_prompt_loss_without_prompts_is_refused_before_the_ledger_is_charged(
    tmp_path: Path,
) -> None:
    for loss in ("prompts", "infonce-public", "infonce-public+prompts"):
        with pytest.raises(DataError, match=f"loss '{re.escape(loss)}' needs the task's class"):
            _round(
                _model(loss),
                clustered(64),
                PrivacySettings(noise_multiplier=1.0),
                tmp_path / "l.json",
            )
        assert not (tmp_path / "l.json").exists()


def test_classes_read_from_the_rows_are_refused_before_the_ledger_is_charged(
    tmp_path: Path,
) -> None:
    """Undeclared classes are the site's own label set: every objective that uses a class (its
    proxies, prompts or the prompts' span) is refused under DP, naming the sidecar to write."""
    derived = clustered(64, prompts=True)
    derived.classes_declared = False  # as a manifest without a .classes.json sidecar gives
    for loss in ("proxy", "prompts", "auto"):
        with pytest.raises(DataError, match=r"this site's 4 were read from its labels"):
            _round(
                _model(loss), derived, PrivacySettings(noise_multiplier=1.0), tmp_path / "l.json"
            )
        assert not (tmp_path / "l.json").exists()
    # the same rows with the classes declared train, and are charged for it
    declared = clustered(64, prompts=True)
    result = _round(
        _model("proxy"), declared, PrivacySettings(noise_multiplier=1.0), tmp_path / "l.json"
    )
    assert result.steps > 0 and len(PrivacyLedger(tmp_path / "l.json").entries()) == 1


def test_dp_sgd_trains_only_the_affine_paths_of_an_aligned_head(tmp_path: Path) -> None:
    """Under DP the residual MLPs keep their zero start (noise would be all they learn); the
    affine paths train, and every parameter is trainable again afterwards."""
    model = build_head_model(
        dims={"image": 12, "text": 8}, head_config=HEAD_PRESETS["aligned"], loss="auto", seed=0
    )
    before = _state(model)
    result = _round(
        model,
        clustered(64, prompts=True),
        PrivacySettings(noise_multiplier=1.0),
        tmp_path / "l.json",
    )
    assert result.steps > 0
    after = _state(model)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == {
        "head.image.linear.weight",
        "head.image.linear.bias",
        "head.text.linear.weight",
        "head.text.linear.bias",
    }
    assert all(p.requires_grad for p in model.parameters())


class _Identity:
    reduction = "mean"

    def __call__(self, per_example: torch.Tensor) -> torch.Tensor:
        return per_example


# 2. in-batch losses: one example moves the clipped sum by more than C, so DP-SGD is refused


@pytest.mark.parametrize("loss", ["infonce", "supcon", "pairwise"])
def test_in_batch_losses_break_the_sensitivity_bound_and_are_refused(
    loss: str, tmp_path: Path
) -> None:
    model = _model(loss)
    for p in model.loss.parameters():
        p.requires_grad_(False)  # only the head goes through Opacus, as a naive user would do
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(16, 12, generator=generator), torch.randn(16, 8, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)

    def clipped_sum(keep: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        gsm = prepare_module(model.head, grad_sample_mode="hooks", loss_reduction="mean")
        gsm.train()
        out = gsm(image=x[keep], text=t[keep])
        model.loss(image=out["image"], text=out["text"], labels=y[keep]).backward()
        grads = _stacked_grad_samples(model.head.parameters(), int(keep.sum()))
        gsm.cleanup()
        model.zero_grad(set_to_none=True)
        return _clipped_sum(grads, clip), grads.norm(dim=1)

    everyone = torch.ones(16, dtype=torch.bool)
    clip = float(clipped_sum(everyone, 1.0)[1].min()) / 2  # every example is clipped
    full = clipped_sum(everyone, clip)[0]
    worst = max(
        float((full - clipped_sum(torch.arange(16) != j, clip)[0]).norm()) for j in range(16)
    )
    assert worst > 1.1 * clip

    with pytest.raises(PrivacyError) as error:
        _round(
            _model(loss), clustered(), PrivacySettings(noise_multiplier=1.0), tmp_path / "l.json"
        )
    message = str(error.value)
    valid = ", ".join(sample_dp_loss_choices())
    for phrase in ("in-batch negatives", "not a valid guarantee", valid, "client-level DP"):
        assert phrase in message
    assert not (tmp_path / "l.json").exists()


# 3. with dp-accountant = "rdp", the reported epsilon is Opacus' RDP of (sigma, q, total steps,
# delta), across restarts (the default, PLD: tests/client/test_privacy_accountant.py)


def test_epsilon_accumulates_across_process_restarts(tmp_path: Path) -> None:
    data, model, ledger = clustered(256), _model(), tmp_path / "state" / "privacy-ledger.json"
    q, steps = 32 / 256, 256 // 32
    for k in (1, 2, 3):
        privacy = PrivacySettings.from_config(
            {"dp-noise-multiplier": 1.1, "dp-delta": DELTA, "dp-accountant": "rdp"}
        )
        result = _round(model, data, privacy, ledger, server_round=k)
        expected = _rdp([(1.1, q, k * steps)])
        assert result.epsilon_total == pytest.approx(expected, rel=1e-9)
        assert result.epsilon_round == pytest.approx(_rdp([(1.1, q, steps)]), rel=1e-9)
        assert PrivacyLedger(ledger).epsilon(DELTA) == pytest.approx(expected, rel=1e-9)
        assert (result.noise_multiplier, result.sample_rate, result.steps) == (1.1, q, steps)
    entries = json.loads(ledger.read_text())["entries"]
    assert [e["server_round"] for e in entries] == [1, 2, 3]
    # a new federation run: the default "site" scope keeps counting, "run" starts afresh
    by_rdp = PrivacySettings(noise_multiplier=1.1, accountant="rdp")
    site_scope = _round(model, data, by_rdp, ledger, run_id=8)
    assert site_scope.epsilon_total == pytest.approx(_rdp([(1.1, q, 4 * steps)]), rel=1e-9)
    run_scope = PrivacySettings(noise_multiplier=1.1, ledger_scope="run", accountant="rdp")
    fresh = _round(model, data, run_scope, ledger, run_id=9)
    assert fresh.epsilon_total == pytest.approx(_rdp([(1.1, q, steps)]), rel=1e-9)


# 4. a site over its budget declines: no training, no spend


def test_site_over_budget_declines_without_training_or_spending(tmp_path: Path) -> None:
    data, model, ledger = clustered(256), _model(), tmp_path / "privacy-ledger.json"
    q, steps = 32 / 256, 256 // 32
    one, two = _rdp([(1.0, q, steps)]), _rdp([(1.0, q, 2 * steps)])
    privacy = PrivacySettings.from_config(
        {"dp-noise-multiplier": 1.0, "dp-max-epsilon": (one + two) / 2, "dp-accountant": "rdp"}
    )
    first = _round(model, data, privacy, ledger)
    assert not first.declined and first.epsilon_total == pytest.approx(one, rel=1e-9)

    before, ledger_bytes = _state(model), ledger.read_bytes()
    second = _round(model, data, privacy, ledger, server_round=2)
    assert second.declined and "dp-max-epsilon" in second.reason
    assert second.epsilon_total == pytest.approx(one, rel=1e-9)
    assert (second.steps, second.samples_seen, second.epsilon_round) == (0, 0, 0.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ledger.read_bytes() == ledger_bytes


# 5. target epsilon: the planned rounds together cost (just under) the target, by the accountant


def test_target_epsilon_is_reached_after_the_planned_rounds(tmp_path: Path) -> None:
    data, model, ledger = clustered(256), _model(), tmp_path / "privacy-ledger.json"
    privacy = PrivacySettings.from_config({"dp-target-epsilon": 4.0, "dp-noise-multiplier": 0})
    results = [_round(model, data, privacy, ledger, server_round=k) for k in (1, 2, 3)]
    sigmas = {r.noise_multiplier for r in results}
    assert len(sigmas) == 1
    sigma = sigmas.pop()
    total = results[-1].epsilon_total
    assert 4.0 - 0.01 <= total <= 4.0
    assert total == pld_epsilon([(sigma, 32 / 256, 3 * 8)], DELTA)  # the default accountant
    assert results[-1].epsilon_total_rdp == pytest.approx(_rdp([(sigma, 32 / 256, 24)]), rel=1e-9)
    extra = _round(model, data, privacy, ledger, server_round=4)
    assert extra.declined and "dp-target-epsilon" in extra.reason


# 6. the HeadModel is trained in place, keeps its keys, and learns under moderate noise


def test_private_training_keeps_state_keys_and_learns(tmp_path: Path) -> None:
    data, model, ledger = clustered(512), _model(), tmp_path / "privacy-ledger.json"
    keys, before = list(model.state_dict()), _full_loss(model, data)
    privacy = PrivacySettings(noise_multiplier=0.8, max_grad_norm=1.0)
    for k in (1, 2, 3):
        result = _round(model, data, privacy, ledger, server_round=k, epochs=2, batch_size=64)
        assert result.samples_seen > 0 and np.isfinite(result.loss)
    assert list(model.state_dict()) == keys
    assert not any(
        hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters()
    )
    assert not any("activations" in vars(m) for m in model.modules())
    assert _full_loss(model, data) < 0.5 * before
    assert HeadModel.from_description(model.describe()).load_state_dict(model.state_dict())


def test_fedprox_pull_is_added_after_the_noise(tmp_path: Path) -> None:
    data = clustered(256)
    drift = {}
    for mu in (0.0, 50.0):
        model = _model()
        anchor = _state(model)
        privacy = PrivacySettings(noise_multiplier=1.0)
        _round(model, data, privacy, tmp_path / f"{mu}.json", epochs=4, proximal_mu=mu)
        drift[mu] = sum(float((model.state_dict()[k] - anchor[k]).norm()) for k in anchor)
    assert drift[50.0] < 0.5 * drift[0.0]


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_empty_poisson_batches_still_take_noisy_steps(mode: str, tmp_path: Path) -> None:
    data, model = clustered(40), _model()
    result = train_head_private(
        model,
        data,
        TrainConfig(loss="proxy", epochs=1, batch_size=1),
        PrivacySettings(noise_multiplier=1.0),
        ledger_path=tmp_path / "l.json",
        planned_rounds=1,
        run_id=1,
        server_round=1,
        grad_sample_mode=mode,
    )
    assert result.steps == 40 and result.sample_rate == 1 / 40
    assert result.epsilon_total_rdp == pytest.approx(_rdp([(1.0, 1 / 40, 40)]), rel=1e-9)


# settings, merging and the ledger's failure modes


def test_settings_from_config_and_node_config_wins() -> None:
    settings = PrivacySettings.from_config(
        {"dp-noise-multiplier": "1.5", "dp-max-grad-norm": 2, "dp-poisson": "false", "lr": 1}
    )
    assert (settings.noise_multiplier, settings.max_grad_norm, settings.poisson) == (
        1.5,
        2.0,
        False,
    )
    assert not PrivacySettings.from_config(
        {"dp-noise-multiplier": 0, "dp-max-epsilon": ""}
    ).requested
    assert PrivacySettings.from_config({"dp-max-epsilon": 0}).max_epsilon == 0.0
    with pytest.raises(ConfigError, match="dp-noise-multipler"):
        PrivacySettings.from_config({"dp-noise-multipler": 1.0})
    with pytest.raises(ConfigError, match="not both"):
        PrivacySettings.from_config({"dp-noise-multiplier": 1.0, "dp-target-epsilon": 3.0})

    run = {"dp-noise-multiplier": 1.0, "dp-max-epsilon": 10.0, "dp-delta": 1e-6}
    node = {"dp-target-epsilon": 2.0, "dp-max-epsilon": 3.0, "dp-delta": "", "data": "x.csv"}
    merged = PrivacySettings.merge(run, node)
    assert merged == PrivacySettings(target_epsilon=2.0, max_epsilon=3.0, delta=1e-6)
    assert PrivacySettings.merge(run, {"dp-noise-multiplier": 0}).noise_multiplier == 1.0
    with pytest.raises(ConfigError, match="node-config"):
        PrivacySettings.merge({"dp-ledger-scope": "run"}, {})
    assert PrivacySettings.merge({}, {"dp-ledger-scope": "run"}).ledger_scope == "run"
    assert merged.accountant == "pld"  # the default; tests/client/test_privacy_accountant.py
    assert PrivacySettings.from_config(merged.to_config()) == merged


def test_budget_without_mechanism_and_corrupt_ledger_refuse_to_train(tmp_path: Path) -> None:
    data = clustered(64)
    with pytest.raises(PrivacyError, match="without noise"):
        _round(_model(), data, PrivacySettings(max_epsilon=5.0), tmp_path / "a.json")
    corrupt = tmp_path / "b.json"
    corrupt.write_text("{not json")
    with pytest.raises(PrivacyError, match="unreadable"):
        _round(_model(), data, PrivacySettings(noise_multiplier=1.0), corrupt)
    valid = PrivacyLedger(tmp_path / "d.json")
    _round(_model(), data, PrivacySettings(noise_multiplier=1.0), valid.path)
    document = json.loads(valid.path.read_text())
    document["entries"][0]["noise_multiplier"] = 0.0
    valid.path.write_text(json.dumps(document))
    with pytest.raises(PrivacyError, match="invalid entry"):
        valid.epsilon(DELTA)
    with pytest.raises(PrivacyError, match="1/n"):
        _round(_model(), data, PrivacySettings(noise_multiplier=1.0, delta=0.05), tmp_path / "c")
