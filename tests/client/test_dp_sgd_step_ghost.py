"""The ghost-clipping step's own parts (client/privacy/dp_sgd.py): its samplers against autograd and
Opacus, a first backward pass that skips the weight gradients it would discard, and the refusal to
clip with a per-example norm the step did not compute. The whole step against an autograd reference
is tests/client/test_dp_sgd_step.py."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.optimizers import DPOptimizerFastGradientClipping

from client.privacy.dp_sgd import (
    PrivateObjective,
    _ghost_module_class,
    _GhostClipping,
    _linear_norm_sample,
    _proxy_grad_sample,
)
from common.dp_losses import ProxyClassifier
from common.errors import PrivacyError
from common.heads import HeadConfig
from common.training import HeadModel, build_head_model
from tests.embedded_data import clustered

OPACUS_EPS = 1e-6  # Opacus' clipping factor is min(1, C / (||g|| + 1e-6))


def _model() -> HeadModel:
    return build_head_model(
        dims={"image": 12, "text": 8},
        head_config=HeadConfig(out_dim=8, hidden_dim=16),
        loss="proxy",
        num_classes=4,
    )


def test_proxy_grad_sample_is_each_examples_own_gradient() -> None:
    torch.manual_seed(0)
    layer = ProxyClassifier(num_classes=5, dim=6, temperature=0.07)
    with torch.no_grad():
        layer.proxies[1] *= 3.0
        layer.proxies[3] *= 1e-10  # a row below F.normalize's eps: divided by eps, not projected
    z, backprops = torch.randn(9, 6), torch.randn(9, 5)
    ours = _proxy_grad_sample(layer, [z], backprops)[layer.proxies]
    assert ours.shape == (9, 5, 6)
    for i in range(9):
        (expected,) = torch.autograd.grad((layer(z[i : i + 1]) * backprops[i]).sum(), layer.proxies)
        torch.testing.assert_close(ours[i], expected, rtol=1e-5, atol=1e-6)
    layer.proxies.requires_grad_(False)
    assert _proxy_grad_sample(layer, [z], backprops) == {}


@pytest.mark.parametrize("bias", [True, False])
def test_linear_norm_sample_equals_opacus(bias: bool) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(7, 3, bias=bias)
    a, g = torch.randn(11, 7), torch.randn(11, 3)
    ours, theirs = _linear_norm_sample(layer, [a], g), compute_linear_norm_sample(layer, [a], g)
    assert ours.keys() == theirs.keys() and len(ours) == 1 + bias
    for p in theirs:
        torch.testing.assert_close(ours[p], theirs[p], rtol=1e-5, atol=1e-6)
    per_example = torch.einsum("ni,nj->nij", g, a).flatten(1).norm(dim=1)  # the definition
    torch.testing.assert_close(ours[layer.weight], per_example, rtol=1e-5, atol=1e-6)
    layer.weight.requires_grad_(False)
    assert layer.weight not in _linear_norm_sample(layer, [a], g)
    # a sequence input [B, T, in] is Opacus' own case
    a3, g3 = torch.randn(4, 5, 7), torch.randn(4, 5, 3)
    layer.weight.requires_grad_(True)
    three = _linear_norm_sample(layer, [a3], g3)
    for p, value in compute_linear_norm_sample(layer, [a3], g3).items():
        torch.testing.assert_close(three[p], value)


def _ghost(model: HeadModel, clip: float) -> tuple[torch.nn.Module, _GhostClipping]:
    objective = PrivateObjective(model)
    gsm = _ghost_module_class()(
        objective, batch_first=True, loss_reduction="mean", max_grad_norm=clip
    )
    params = [p for p in objective.parameters() if p.requires_grad]
    return gsm, _GhostClipping(gsm, params)


def test_the_ghost_backward_leaves_the_clipped_sum_and_accumulates_each_weight_once() -> None:
    data, model = clustered(16), _model()
    x, t = torch.from_numpy(data.image), torch.from_numpy(data.text)
    y = torch.from_numpy(data.labels)
    reference = PrivateObjective(model)
    grads = []
    for i in range(16):
        loss = reference(x[i : i + 1], t[i : i + 1], y[i : i + 1]).sum()
        grads.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, model.parameters())])
        )
    per_example = torch.stack(grads)
    clip = float(per_example.norm(dim=1).median())
    factor = (clip / (per_example.norm(dim=1, keepdim=True) + OPACUS_EPS)).clamp(max=1.0)

    gsm, ghost = _ghost(model, clip)
    weights = [
        p for name, p in model.named_parameters() if name.endswith("weight") and p.dim() == 2
    ]
    accumulated = {id(p): 0 for p in weights}

    def count(p: torch.Tensor) -> None:
        accumulated[id(p)] += 1

    handles = [p.register_post_accumulate_grad_hook(count) for p in weights]
    gsm.train()
    ghost.backward(gsm(x, t, y))
    for handle in handles:
        handle.remove()
    gsm.cleanup()
    # the first pass asked for no weight matrix's gradient: each got exactly the second pass's
    assert set(accumulated.values()) == {1}
    summed = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    torch.testing.assert_close(summed, (per_example * factor).sum(dim=0), rtol=1e-4, atol=1e-5)


def test_a_trained_parameter_without_a_fresh_norm_is_refused() -> None:
    data, model = clustered(8), _model()
    gsm, ghost = _ghost(model, 1.0)
    gsm.train()
    x, y = torch.from_numpy(data.image), torch.from_numpy(data.labels)
    # image rows only: the text tower is trained but its layers never see an example
    with pytest.raises(PrivacyError, match="stale norms"):
        ghost.backward(gsm(x, None, y))
    gsm.cleanup()


def test_norms_of_a_previous_batch_are_never_reused() -> None:
    data, model = clustered(8), _model()
    gsm, ghost = _ghost(model, 1.0)
    gsm.train()
    x, y = torch.from_numpy(data.image), torch.from_numpy(data.labels)
    t = torch.from_numpy(data.text)
    ghost.backward(gsm(x, t, y))  # a full batch: every trained parameter gets its norms
    gsm.zero_grad()
    # then image rows only: the text tower's norms are the previous batch's, and must not count
    with pytest.raises(PrivacyError, match="stale norms"):
        ghost.backward(gsm(x, None, y))
    gsm.cleanup()


def test_the_ghost_optimizer_adds_noise_once_without_copying_the_sum() -> None:
    from client.privacy.dp_sgd import _ghost_optimizer_class

    weight = torch.nn.Parameter(torch.zeros(50_000))
    optimizer_class = _ghost_optimizer_class()
    assert issubclass(optimizer_class, DPOptimizerFastGradientClipping)
    optimizer = optimizer_class(
        torch.optim.SGD([weight], lr=1.0),
        noise_multiplier=2.0,
        max_grad_norm=0.5,
        expected_batch_size=4,
        generator=torch.Generator().manual_seed(0),
    )
    clipped_sum = torch.full((50_000,), 3.0)
    weight.grad = clipped_sum.clone()
    optimizer.pre_step()
    assert weight.grad is not None
    residual = weight.grad * 4 - clipped_sum  # noise N(0, (sigma C)^2) before / B
    assert float(residual.std()) == pytest.approx(2.0 * 0.5, rel=0.03)
    assert abs(float(residual.mean())) < 0.05
    with pytest.raises(ValueError, match="cleared since the last optimizer step"):  # noised once
        optimizer.add_noise()
