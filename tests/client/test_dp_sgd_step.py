"""The production DP-SGD step, observed while a site trains (``train_head_private``, as
client/training.py calls it), checked against an autograd reference built here.

Each step Opacus should hand AdamW ``(sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / B`` where ``g_i``
is example i's gradient, ``clip_C`` scales it to norm <= C (``dp-max-grad-norm``), the sum runs over
the step's Poisson batch and ``B`` is the *expected* batch size (``q n``). The tests watch the rows
the head sees (a forward pre-hook) and the gradient AdamW receives (a global optimizer step
pre-hook) without changing the code under test, then recompute the clipped sum one example at a time
with ``torch.autograd.grad``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.privacy import PrivacySettings, PrivateObjective, train_head_private
from common.embedding import EmbeddedDataset
from common.heads import HeadConfig
from common.privacy import sample_dp_loss_choices
from common.training import HeadModel, TrainConfig, build_head_model, choose_objective
from tests.client.dp_step_observer import StepObserver
from tests.embedded_data import clustered

OPACUS_EPS = 1e-6  # Opacus' clipping factor is min(1, C / (||g|| + 1e-6))


def _model(head: HeadConfig, *, seed: int = 0, loss: str = "proxy") -> HeadModel:
    return build_head_model(
        dims={"image": 12, "text": 8},
        head_config=head,
        layout="two-tower",
        loss=loss,
        num_classes=4,
        seed=seed,
    )


def _per_example_grads(
    template: HeadModel, params: dict[str, torch.Tensor], data: EmbeddedDataset, rows: list[int]
) -> torch.Tensor:
    """Autograd gradient of each single example's loss at ``params``, [len(rows), P]."""
    assert data.image is not None and data.text is not None and data.labels is not None
    model = copy.deepcopy(template)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in params:
                p.copy_(params[name])
    choose_objective(model, data, private=True)
    prompts = None if data.prompts is None else torch.from_numpy(data.prompts)
    objective = PrivateObjective(model, prompts)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    image, text = torch.from_numpy(data.image), torch.from_numpy(data.text)
    labels = torch.from_numpy(data.labels.astype(np.int64))
    grads = []
    for i in rows:
        loss = objective(image[i : i + 1], text[i : i + 1], labels[i : i + 1]).sum()
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trainable)]))
    return torch.stack(grads)


def _clipped_sum(grads: torch.Tensor, clip: float) -> torch.Tensor:
    factor = (clip / (grads.norm(dim=1, keepdim=True) + OPACUS_EPS)).clamp(max=1.0)
    return (grads * factor).sum(dim=0)


def _train(
    model: HeadModel,
    data: EmbeddedDataset,
    privacy: PrivacySettings,
    ledger: Path,
    *,
    batch_size: int,
    epochs: int,
    mode: str | None = None,
) -> StepObserver:
    """One private round through the site's entry point, observed."""
    # mode None: the function's default, i.e. what client/training.py runs
    extra: dict[str, Any] = {} if mode is None else {"grad_sample_mode": mode}
    with StepObserver(model, data) as observer:
        result = train_head_private(
            model,
            data,
            TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-2),
            privacy,
            ledger_path=ledger,
            planned_rounds=1,
            run_id=1,
            server_round=1,
            **extra,
        )
    assert not result.declined and result.steps == len(observer.grads) > 0
    assert result.samples_seen == sum(len(b) for b in observer.batches)
    return observer


def _references(
    template: HeadModel, observer: StepObserver, data: EmbeddedDataset, clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each step's noiseless clipped sum (autograd), and every batch example's gradient norm."""
    sums, norms = [], []
    for params, rows in zip(observer.params, observer.batches, strict=True):
        grads = _per_example_grads(template, params, data, rows)
        sums.append(_clipped_sum(grads, clip))
        norms.append(grads.norm(dim=1))
    return sums, torch.cat(norms)


# 1. noise ~ 0: the step's gradient is the clipped per-example gradients' sum over the expected
#    batch size (the mean, for a fixed-size batch)

SMALL_HEAD = HeadConfig(out_dim=8, hidden_dim=16)
CLIP = 30.0  # for SMALL_HEAD on _data: per-example gradient norms span ~10..70 (median ~30)


@pytest.mark.parametrize(
    ("mode", "poisson"),
    [(None, True), (None, False), ("hooks", True)],
    ids=["ghost", "fixed", "hooks"],
)
def test_noiseless_step_is_mean_of_clipped_per_example_gradients(
    mode: str | None, poisson: bool, tmp_path: Path
) -> None:
    data, model = clustered(64), _model(SMALL_HEAD)
    template = copy.deepcopy(model)
    privacy = PrivacySettings(noise_multiplier=1e-9, max_grad_norm=CLIP, poisson=poisson)
    observer = _train(model, data, privacy, tmp_path / "l.json", batch_size=16, epochs=1, mode=mode)
    assert len(observer.grads) == 4  # epochs * n // B
    sums, norms = _references(template, observer, data, CLIP)
    clipped = float((norms > CLIP).float().mean())
    assert 0.2 < clipped < 0.8, f"{clipped:.0%} of examples clipped: the test would not tell"
    assert float(norms.max()) < 10 * CLIP  # so clipping at 10 C would clip none of them
    for k, (grad, clipped_sum) in enumerate(zip(observer.grads, sums, strict=True)):
        if not poisson:
            assert len(observer.batches[k]) == 16
        torch.testing.assert_close(grad, clipped_sum / 16, rtol=1e-4, atol=1e-6, msg=f"step {k}")
    if not poisson:  # a fixed-size batch: the plain mean of the clipped gradients
        grads = _per_example_grads(template, observer.params[0], data, observer.batches[0])
        clip_factor = (CLIP / (grads.norm(dim=1, keepdim=True) + OPACUS_EPS)).clamp(max=1.0)
        mean = (grads * clip_factor).mean(dim=0)
        torch.testing.assert_close(observer.grads[0], mean, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", [n for n in sample_dp_loss_choices() if n != "proxy"])
def test_every_dp_loss_steps_with_the_clipped_sum_of_single_example_gradients(
    loss: str, tmp_path: Path
) -> None:
    """The prompt losses (and auto under DP) through the production loop: each step's gradient is
    the sum of every batch example's gradient computed alone, each clipped to C, over B; so one
    example moves it by at most C / B, whatever the other examples are."""
    data, model = clustered(64, prompts=True), _model(SMALL_HEAD, loss=loss)
    template = copy.deepcopy(model)
    choose_objective(template, data, private=True)
    every = _per_example_grads(template, dict(template.named_parameters()), data, list(range(64)))
    clip = float(every.norm(dim=1).median())
    privacy = PrivacySettings(noise_multiplier=1e-9, max_grad_norm=clip)
    observer = _train(model, data, privacy, tmp_path / "l.json", batch_size=16, epochs=1)
    assert model.objective != "auto" and model.objective == template.objective
    sums, norms = _references(template, observer, data, clip)
    assert 0.1 < float((norms > clip).float().mean()) < 0.9  # clipping is exercised
    for k, (grad, clipped_sum) in enumerate(zip(observer.grads, sums, strict=True)):
        torch.testing.assert_close(grad, clipped_sum / 16, rtol=1e-4, atol=1e-6, msg=f"step {k}")


# 2. noise multiplier sigma: the residual is N(0, (sigma C / B)^2) per coordinate, fresh each step

WIDE_HEAD = HeadConfig(out_dim=32, hidden_dim=64)  # a few thousand parameters per step


def test_noise_residual_has_std_sigma_c_over_expected_batch(tmp_path: Path) -> None:
    data, sigma, clip, batch = clustered(64), 1.3, CLIP, 16
    residuals = []
    for attempt in range(2):  # two rounds from the same weights and seed: independent noise
        model = _model(WIDE_HEAD)
        template = copy.deepcopy(model)
        privacy = PrivacySettings(noise_multiplier=sigma, max_grad_norm=clip)
        observer = _train(
            model, data, privacy, tmp_path / f"{attempt}.json", batch_size=batch, epochs=2
        )
        sums, _ = _references(template, observer, data, clip)
        residuals.append(
            torch.stack([g - s / batch for g, s in zip(observer.grads, sums, strict=True)])
        )
    expected = sigma * clip / batch
    steps, params = residuals[0].shape
    assert steps == 8 and params > 2000
    everything = torch.cat(residuals).reshape(-1).double()
    # 16 steps x ~6,000 coordinates: the sample std's standard error is ~0.25%, so 3% is far out;
    # B is the expected batch size (Opacus divides by it, not by the Poisson batch's actual size)
    assert float(everything.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(everything.mean())) < 5 * expected / everything.numel() ** 0.5
    for step in torch.cat(residuals):  # every step is noised, none twice as much
        assert float(step.std()) == pytest.approx(expected, rel=0.12)
    # fresh noise each step and each round (OS entropy, not the config seed)
    flat = torch.cat(residuals).double()
    correlation = torch.corrcoef(flat)
    off_diagonal = correlation[~torch.eye(len(flat), dtype=torch.bool)]
    assert float(off_diagonal.abs().max()) < 0.1


# 3. Poisson sampling at the configured rate q = B / n: variable-size batches of mean q n


def test_poisson_batches_have_the_configured_rate(tmp_path: Path) -> None:
    n, batch, epochs = 500, 10, 3
    data, model = clustered(n), _model(SMALL_HEAD)
    privacy = PrivacySettings(noise_multiplier=1.0)
    observer = _train(model, data, privacy, tmp_path / "l.json", batch_size=batch, epochs=epochs)
    sizes = np.array([len(rows) for rows in observer.batches])
    steps, q = epochs * n // batch, batch / n
    assert len(sizes) == steps == 150
    # Binomial(n, q) sizes: mean q n = 10 (standard error 0.26), variance n q (1 - q) = 9.8
    # (standard error 1.1); bounds at about 5 standard errors. Fixed-size batches have variance 0.
    assert abs(sizes.mean() - q * n) < 1.3
    assert 4.1 < sizes.var(ddof=1) < 15.5
    assert len(set(sizes.tolist())) >= 5
    # each row enters each step independently with probability q: no repeats within a step, and
    # per-row counts are Binomial(steps, q) (mean 3, variance 2.94), over all the rows
    assert all(len(set(rows)) == len(rows) for rows in observer.batches)
    counts = np.bincount(np.concatenate([np.asarray(r, dtype=int) for r in observer.batches]))
    assert len(counts) <= n and abs(counts.sum() / n - steps * q) < 0.4  # 5 standard errors
    assert 1.95 < np.var(np.pad(counts, (0, n - len(counts))), ddof=1) < 3.95
    assert (counts > 0).sum() > 450  # expected 476 rows used at least once
