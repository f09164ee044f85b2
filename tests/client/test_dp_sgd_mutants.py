"""The production DP-SGD round (``train_head_private``), checked where mutation testing of
client/privacy/dp_sgd.py found the other tests silent (simulations/benchmarks/mutation.py).

Real Opacus, tiny heads, one thread. A round is observed without changing the code under test: a
forward pre-hook on the head records the rows each step sees, a global optimizer step pre-hook the
parameters and the gradient AdamW receives. What the round should do is recomputed here: each
step's gradient from single-example autograd gradients (clipped to C, summed, over the expected
batch size, plus FedProx's ``mu (w - w_global)``), the weights by replaying AdamW on those
gradients, the reported loss from the steps' per-example losses.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.privacy import (
    PrivacyLedger,
    PrivacySettings,
    PrivateObjective,
    PrivateRoundResult,
    pld_epsilon,
    rdp_epsilon,
    train_head_private,
)
from common.embedding import EmbeddedDataset
from common.errors import ConfigError, DataError, PrivacyError
from common.heads import HeadConfig
from common.training import HeadModel, TrainConfig, TrainResult, build_head_model
from tests.client.dp_step_observer import StepObserver
from tests.embedded_data import clustered

HEAD = HeadConfig(out_dim=8, hidden_dim=16)
CLIP = 30.0  # per-example gradient norms of HEAD on clustered(): ~10..70, so about half clip
OPACUS_EPS = 1e-6  # Opacus' clipping factor is min(1, C / (||g|| + 1e-6))
DELTA = 1e-5


def _model(dims: dict[str, int] | None = None) -> HeadModel:
    return build_head_model(
        dims=dims or {"image": 12, "text": 8},
        head_config=HEAD,
        layout="two-tower",
        loss="proxy",
        num_classes=4,
        seed=0,
    )


def _round(
    model: HeadModel,
    data: EmbeddedDataset,
    privacy: PrivacySettings,
    ledger: Path,
    *,
    mode: str | None = None,
    reference: dict[str, torch.Tensor] | None = None,
    run_id: int = 3,
    **config: Any,
) -> tuple[PrivateRoundResult, StepObserver]:
    """One private round through the site's entry point, observed."""
    extra: dict[str, Any] = {} if mode is None else {"grad_sample_mode": mode}
    settings: dict[str, Any] = {"loss": "proxy", "epochs": 1, "batch_size": 16, "lr": 1e-2}
    with StepObserver(model, data) as observer:
        result = train_head_private(
            model,
            data,
            TrainConfig(**{**settings, **config}),
            privacy,
            ledger_path=ledger,
            planned_rounds=1,
            run_id=run_id,
            server_round=2,
            reference=reference,
            **extra,
        )
    return result, observer


def _inputs(data: EmbeddedDataset) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    def tensor(array: np.ndarray | None) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(array.astype(np.float32))

    assert data.labels is not None
    return tensor(data.image), tensor(data.text), torch.from_numpy(data.labels.astype(np.int64))


def _at(template: HeadModel, params: dict[str, torch.Tensor]) -> PrivateObjective:
    """The private objective of a copy of ``template`` with its trainable parameters ``params``."""
    model = copy.deepcopy(template)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return PrivateObjective(model)


def _per_example(
    template: HeadModel, params: dict[str, torch.Tensor], data: EmbeddedDataset, rows: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's loss [len(rows)] and autograd gradient [len(rows), P] at ``params``."""
    objective = _at(template, params)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    image, text, labels = _inputs(data)
    losses, grads = [], []
    for i in rows:
        pick = slice(i, i + 1)
        loss = objective(
            None if image is None else image[pick],
            None if text is None else text[pick],
            labels[pick],
        ).sum()
        losses.append(loss.detach())
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trainable)]))
    return torch.stack(losses), torch.stack(grads)


def _clipped_sum(grads: torch.Tensor, clip: float) -> torch.Tensor:
    factor = (clip / (grads.norm(dim=1, keepdim=True) + OPACUS_EPS)).clamp(max=1.0)
    return (grads * factor).sum(dim=0)


def _flat(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[name].reshape(-1) for name in names])


# 1. the result object: what goes to the server, to the audit log, and to the training summary


def test_the_round_result_names_every_metric_and_summary_field() -> None:
    result = PrivateRoundResult(
        loss=0.5,
        num_examples=10,
        steps=3,
        samples_seen=12,
        seconds=4.0,
        epsilon_round=0.1,
        epsilon_total=0.3,
        delta=1e-5,
        noise_multiplier=1.1,
        sample_rate=0.25,
        epsilon_total_pld=0.2,
    )
    metrics = {
        "dp-epsilon": 0.3,
        "dp-epsilon-round": 0.1,
        "dp-delta": 1e-5,
        "dp-noise-multiplier": 1.1,
        "dp-sample-rate": 0.25,
        "dp-steps": 3,
    }
    assert result.metrics() == {**metrics, "dp-epsilon-pld": 0.2}  # both totals, where computed
    assert result.audit_record() == {**metrics, "dp-epsilon-pld": 0.2, "dp-accountant": "rdp"}
    result.epsilon_total_pld, result.epsilon_total_rdp = None, 0.3
    result.accountant_note = "PLD not computed"
    assert result.metrics() == {**metrics, "dp-epsilon-rdp": 0.3}
    assert result.audit_record() == {
        **metrics,
        "dp-epsilon-rdp": 0.3,
        "dp-accountant": "rdp",
        "dp-accountant-note": "PLD not computed",
    }
    assert result.train_result() == TrainResult(
        loss=0.5, num_examples=10, steps=3, samples_seen=12, seconds=4.0
    )
    assert result.samples_per_second == 3.0
    for seconds in (0.0, -1.0):
        result.seconds = seconds
        assert result.samples_per_second == 0.0


def test_an_unknown_grad_sample_mode_is_refused_naming_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        _round(
            _model(),
            clustered(32),
            PrivacySettings(noise_multiplier=1.0),
            tmp_path / "l",
            mode="ew",
        )
    assert str(error.value) == (
        "privacy: grad_sample_mode must be one of ['ghost', 'functorch', 'hooks'], got 'ew'"
    )
    assert not (tmp_path / "l").exists()


# 2. a noiseless round, replayed: gradients, FedProx pull, AdamW, loss, ledger, leftovers


def test_a_noiseless_fedprox_round_is_replayed_exactly(tmp_path: Path) -> None:
    data = clustered(40)
    assert data.image is not None and data.text is not None and data.labels is not None
    # float64 embeddings (the loop hands the head float32) and two unlabelled rows (never used)
    data.image, data.text = data.image.astype(np.float64), data.text.astype(np.float64)
    data.labels[[3, 17]] = -1
    model = _model()
    template = copy.deepcopy(model)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(1)
    reference = {
        name: p.detach() + 0.05 * torch.randn(p.shape, generator=generator)
        for name, p in model.named_parameters()
    }
    mu, lr, decay, batch = 0.3, 2e-2, 0.05, 8
    privacy = PrivacySettings(noise_multiplier=1e-9, max_grad_norm=CLIP, poisson=False, lr=lr)
    ledger = tmp_path / "ledger.json"
    started = time.perf_counter()
    result, seen = _round(
        model,
        data,
        privacy,
        ledger,
        reference=reference,
        epochs=2,
        batch_size=batch,
        lr=lr,
        weight_decay=decay,
        proximal_mu=mu,
    )
    elapsed = time.perf_counter() - started

    labelled = 38
    per_epoch = labelled // batch  # 4 fixed-size batches an epoch
    assert len(seen.grads) == result.steps == 2 * per_epoch
    assert all(len(rows) == batch for rows in seen.batches)
    for epoch in range(2):  # each epoch: distinct labelled rows, no row twice
        rows = [r for b in seen.batches[epoch * per_epoch : (epoch + 1) * per_epoch] for r in b]
        assert len(set(rows)) == len(rows) == per_epoch * batch
        assert not {3, 17} & set(rows)

    anchor = _flat(reference, names)
    step_losses, clipped = [], 0
    for k, (params, rows, grad) in enumerate(
        zip(seen.params, seen.batches, seen.grads, strict=True)
    ):
        losses, grads = _per_example(template, params, data, rows)
        step_losses.append(float(losses.mean()))
        clipped += int((grads.norm(dim=1) > CLIP).sum())
        expected = _clipped_sum(grads, CLIP) / batch + mu * (_flat(params, names) - anchor)
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=f"step {k}")
    assert 0 < clipped < len(seen.grads) * batch  # some examples clipped, some not

    # AdamW with the configured lr and weight decay, fed these gradients, gives the trained head
    replay = copy.deepcopy(template)
    trainable = [p for p in replay.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=decay)
    for grad in seen.grads:
        offset = 0
        for p in trainable:
            p.grad = grad[offset : offset + p.numel()].reshape(p.shape).clone()
            offset += p.numel()
        optimizer.step()
    trained = model.state_dict()
    for name, value in replay.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)

    # the reported loss: the mean of the last epoch's steps' mean per-example loss
    assert result.loss == pytest.approx(float(np.mean(step_losses[-per_epoch:])), rel=1e-5)
    assert result.loss != pytest.approx(float(np.mean(step_losses)), rel=1e-3)
    assert (result.num_examples, result.samples_seen) == (labelled, len(seen.grads) * batch)
    assert (result.declined, result.reason, result.grad_sample_mode) == (False, "", "ghost")
    assert 0.0 < result.seconds <= elapsed
    assert result.sample_rate == batch / labelled and result.noise_multiplier == 1e-9
    assert result.delta == DELTA

    # nothing of Opacus is left on the model, which is back in eval mode
    assert not model.training
    for p in model.parameters():
        assert p.grad is None
        assert not any(hasattr(p, a) for a in ("grad_sample", "summed_grad"))
    for module in model.modules():
        assert not {"activations", "max_batch_len"} & set(vars(module))

    # the ledger records what ran, with a UTC timestamp to the second
    (entry,) = json.loads(ledger.read_text())["entries"]
    utc = entry.pop("utc")
    assert utc.endswith("+00:00") and len(utc) == len("2026-01-01T00:00:00+00:00")
    assert entry == {
        "run_id": 3,
        "server_round": 2,
        "noise_multiplier": 1e-9,
        "sample_rate": batch / labelled,
        "steps": 2 * per_epoch,
        "max_grad_norm": CLIP,
        "poisson": False,
        "num_examples": labelled,
        "delta": DELTA,
        "epsilon_total": result.epsilon_total,
        "epsilon_total_pld": None,  # sigma 1e-9: no guarantee, no PLD; RDP's total governs
        "accountant": "rdp",
        "accountant_note": result.accountant_note,
    }
    assert result.accountant_note.startswith("PLD not computed (RDP epsilon ")


# 3. batches and noise come from fresh OS entropy, not from the global torch seed


@pytest.mark.parametrize("poisson", [True, False], ids=["poisson", "fixed"])
def test_batches_and_noise_ignore_the_global_torch_seed(poisson: bool, tmp_path: Path) -> None:
    data, runs = clustered(32), []
    for attempt in range(2):
        model = _model()  # build_head_model seeds torch's global generator: the same state twice
        privacy = PrivacySettings(noise_multiplier=1.0, max_grad_norm=1.0, poisson=poisson)
        runs.append(_round(model, data, privacy, tmp_path / f"{attempt}.json", batch_size=8)[1])
    first, second = runs
    assert first.batches != second.batches
    assert not torch.allclose(first.grads[0], second.grads[0])


# 4. an empty Poisson batch is a noise-only step of every parameter; a one-row batch trains


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_empty_batches_are_pure_noise_and_single_rows_train(mode: str, tmp_path: Path) -> None:
    data, sigma, clip = clustered(40), 1.0, 1.0
    privacy = PrivacySettings(noise_multiplier=sigma, max_grad_norm=clip)
    model = _model()
    template = copy.deepcopy(model)
    result, seen = _round(model, data, privacy, tmp_path / "l.json", mode=mode, batch_size=1)
    assert result.steps == len(seen.grads) == 40 and result.grad_sample_mode == mode
    sizes = [len(rows) for rows in seen.batches]
    assert result.samples_seen == sum(sizes)
    # Binomial(40, 1/40) sizes: P(no empty step) and P(no one-row step) are ~1e-8 each
    assert 0 in sizes and 1 in sizes
    empty = torch.stack([g for g, n in zip(seen.grads, sizes, strict=True) if n == 0])
    # noise N(0, (sigma C / B)^2) on every coordinate of every parameter, B = 1
    assert float(empty.std()) == pytest.approx(sigma * clip, rel=0.15)
    offset = 0
    for name, value in seen.params[0].items():  # each parameter's own slice is noised too
        part = empty[:, offset : offset + value.numel()]
        assert float(part.std()) == pytest.approx(sigma * clip, rel=0.5), name
        offset += value.numel()
    # one epoch: the reported loss is the mean over every step that had rows
    losses = [
        float(_per_example(template, params, data, rows)[0].mean())
        for params, rows in zip(seen.params, seen.batches, strict=True)
        if rows
    ]
    assert result.loss == pytest.approx(float(np.mean(losses)), rel=1e-5)


# 5. rounds that decline, take no step or one step; the ledger scope


def test_declined_stepless_and_one_step_rounds_report_and_charge_what_ran(tmp_path: Path) -> None:
    data, ledger = clustered(32), tmp_path / "ledger.json"
    first, _ = _round(
        _model(),
        data,
        PrivacySettings(noise_multiplier=1.0, accountant="rdp"),
        ledger,
        mode="hooks",
    )
    spent = PrivacyLedger(ledger).epsilon(DELTA)
    mechanism = [(1.0, 16 / 32, 2)]  # (sigma, q, steps) of a 32-row round at batch size 16
    assert first.epsilon_round == pytest.approx(rdp_epsilon(mechanism, DELTA), rel=1e-12)
    assert first.epsilon_total == pytest.approx(spent, rel=1e-12) and spent == first.epsilon_round
    assert first.epsilon_total_pld == PrivacyLedger(ledger).entries()[0].epsilon_total_pld
    pld = pld_epsilon(mechanism, DELTA, rdp=spent)
    assert pld is not None and first.epsilon_total_pld == pld < spent
    privacy = PrivacySettings(noise_multiplier=1.0, accountant="rdp", max_epsilon=1.01 * spent)
    declined, seen = _round(_model(), data, privacy, ledger, mode="hooks")
    assert declined.declined and not seen.grads
    assert (declined.steps, declined.samples_seen, declined.seconds) == (0, 0, 0.0)
    assert math.isnan(declined.loss) and declined.grad_sample_mode == "hooks"
    assert declined.num_examples == 32
    assert (declined.epsilon_round, declined.epsilon_total) == (0.0, first.epsilon_total)
    assert declined.epsilon_total_pld == first.epsilon_total_pld

    stepless, seen = _round(
        _model(), data, PrivacySettings(noise_multiplier=1.0, accountant="rdp"), ledger, epochs=0
    )
    assert not stepless.declined and not seen.grads and stepless.steps == 0
    assert (stepless.epsilon_round, stepless.epsilon_total) == (0.0, first.epsilon_total)
    assert len(PrivacyLedger(ledger).entries()) == 1

    # a round of a single step trains, and costs that step
    single, seen = _round(
        _model(),
        data,
        PrivacySettings(noise_multiplier=1.0, accountant="rdp"),
        ledger,
        batch_size=20,
    )
    assert single.steps == len(seen.grads) == 1
    assert single.epsilon_round == pytest.approx(rdp_epsilon([(1.0, 20 / 32, 1)], DELTA), rel=1e-12)

    # the "run" ledger scope counts this run's earlier rounds (run 3: two so far), not others'
    scoped = PrivacySettings(noise_multiplier=1.0, accountant="rdp", ledger_scope="run")
    again, _ = _round(_model(), data, scoped, ledger, mode="hooks")
    assert again.epsilon_total == pytest.approx(
        rdp_epsilon([*mechanism, (1.0, 20 / 32, 1), *mechanism], DELTA), rel=1e-12
    )
    other, _ = _round(_model(), data, scoped, ledger, mode="hooks", run_id=4)
    assert other.epsilon_total == other.epsilon_round == first.epsilon_round


# 6. one modality only: the missing input stays None


def test_an_image_only_head_trains_privately(tmp_path: Path) -> None:
    data = clustered(32)
    data.text = None
    model = _model({"image": 12})
    template = copy.deepcopy(model)
    privacy = PrivacySettings(noise_multiplier=0.5)
    # two epochs of one step each (32 rows, batch size 20)
    result, seen = _round(model, data, privacy, tmp_path / "l.json", batch_size=20, epochs=2)
    assert result.steps == len(seen.grads) == 2
    assert all(not torch.equal(template.state_dict()[k], v) for k, v in model.state_dict().items())
    # the reported loss is the last epoch's: its one step's mean per-example loss
    last, _ = _per_example(template, seen.params[-1], data, seen.batches[-1])
    first, _ = _per_example(template, seen.params[0], data, seen.batches[0])
    assert result.loss == pytest.approx(float(last.mean()), rel=1e-5)
    assert result.loss != pytest.approx(float(torch.cat([first, last]).mean()), rel=1e-3)


# 7. the private objective takes a per-example loss only


def test_the_private_objective_refuses_a_loss_that_is_not_per_example() -> None:
    infonce = build_head_model(
        dims={"image": 12, "text": 8}, head_config=HEAD, loss="infonce", seed=0
    )
    with pytest.raises(PrivacyError, match="refused for loss 'infonce': it uses in-batch"):
        PrivateObjective(infonce)
    # a head whose spec says "proxy" but whose loss module is another: refused by its type
    mislabelled = HeadModel(infonce.head, infonce.loss, loss_spec={**_model().loss_spec})
    with pytest.raises(PrivacyError) as error:
        PrivateObjective(mislabelled)
    assert str(error.value) == (
        "DP-SGD needs a per-example loss, got InfoNCELoss (objective 'proxy')"
    )


# 8. a round whose loss becomes NaN fails with a named error, not a NaN head


def test_a_diverging_round_fails_naming_the_cause(tmp_path: Path) -> None:
    privacy = PrivacySettings(noise_multiplier=1.0, lr=1e30)
    with pytest.raises(DataError) as error:  # dp-lr 1e30: the second step's forward overflows
        _round(_model(), clustered(32), privacy, tmp_path / "l.json")
    assert str(error.value) == ("private training diverged: the loss became NaN/inf (lower dp-lr?)")
