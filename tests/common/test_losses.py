"""Tests for common.losses: each loss against a longhand formula, edge cases, DP decomposability."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from common.dp_losses import PUBLIC_OBJECTIVES, ClassProxyLoss, PublicNegativesLoss
from common.errors import ConfigError, DataError
from common.heads import HeadConfig, MultimodalHead
from common.losses import (
    AUTO_OBJECTIVES,
    LOSSES,
    AutoLoss,
    CLIPLabelLoss,
    InfoNCELoss,
    PairwiseLabelLoss,
    PromptLoss,
    SupConLoss,
    build_loss,
    loss_is_per_example_decomposable,
)
from common.registries import choose_loss

B, D = 5, 4
LABEL_CASES = {
    "mixed": [0, 1, 0, 2, 1],
    "all_same": [3, 3, 3, 3, 3],
    "all_different": [0, 1, 2, 3, 4],
    "with_unlabelled": [0, -1, 0, -1, 1],
}
MODALITY_CASES = ["image", "text", "both"]


def unit(*shape: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def inputs(modalities: str, seed: int = 0) -> dict[str, Tensor]:
    image, text = unit(B, D, seed=seed), unit(B, D, seed=seed + 100)
    if modalities == "image":
        return {"image": image}
    if modalities == "text":
        return {"text": text}
    return {"image": image, "text": text}


def stacked_rows(batch: dict[str, Tensor], labels: list[int]) -> tuple[list[list[float]], list]:
    """Rows [image; text] as Python lists, each with (label, example index)."""
    rows: list[list[float]] = []
    meta: list[tuple[int, int]] = []
    for name in ("image", "text"):
        if name in batch:
            for i in range(B):
                rows.append(batch[name][i].tolist())
                meta.append((labels[i], i))
    return rows, meta


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def is_positive(mi: tuple[int, int], mj: tuple[int, int]) -> bool:
    (li, ei), (lj, ej) = mi, mj
    return ei == ej or (li >= 0 and lj >= 0 and li == lj)


# ------------------------------------------------------------------------------------ InfoNCE


def infonce_longhand(image: Tensor, text: Tensor, temperature: float) -> float:
    n = image.shape[0]
    logits = [
        [dot(image[i].tolist(), text[j].tolist()) / temperature for j in range(n)] for i in range(n)
    ]
    i2t = sum(-logits[i][i] + math.log(sum(math.exp(v) for v in logits[i])) for i in range(n)) / n
    t2i = 0.0
    for j in range(n):
        column = [logits[i][j] for i in range(n)]
        t2i += -logits[j][j] + math.log(sum(math.exp(v) for v in column))
    return 0.5 * (i2t + t2i / n)


def test_infonce_matches_longhand_and_is_symmetric() -> None:
    batch = inputs("both")
    loss = InfoNCELoss(init_temperature=0.2).double()
    value = loss(**batch)
    assert value.item() == pytest.approx(infonce_longhand(batch["image"], batch["text"], 0.2))
    swapped = loss(image=batch["text"], text=batch["image"])
    assert swapped.item() == pytest.approx(value.item())
    assert loss.temperature == pytest.approx(0.2)


def test_infonce_ignores_labels_and_needs_both_modalities() -> None:
    batch = inputs("both")
    loss = InfoNCELoss().double()
    with_labels = loss(**batch, labels=torch.tensor(LABEL_CASES["mixed"]))
    assert with_labels.item() == pytest.approx(loss(**batch).item())
    with pytest.raises(ValueError, match="text is missing"):
        loss(image=batch["image"])
    with pytest.raises(ValueError, match="image is missing"):
        loss(text=batch["text"])
    with pytest.raises(ValueError, match="paired rows"):
        loss(image=batch["image"], text=batch["text"][:3])


def test_infonce_temperature_gets_a_gradient_and_is_clamped() -> None:
    batch = inputs("both")
    loss = InfoNCELoss().double()
    loss(**batch).backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.abs().item() > 0
    fixed = InfoNCELoss(learnable=False)
    assert not fixed.logit_scale.requires_grad
    clamped = InfoNCELoss(init_temperature=1e-4, max_logit_scale=100).double()
    assert clamped.temperature == pytest.approx(0.01)
    expected = infonce_longhand(batch["image"], batch["text"], 0.01)
    assert clamped(**batch).item() == pytest.approx(expected)


# ----------------------------------------------------------------------------------- Pairwise


def pairwise_longhand(batch: dict[str, Tensor], labels: list[int], temperature: float) -> float:
    rows, meta = stacked_rows(batch, labels)
    total, count = 0.0, 0
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            both_known = meta[i][0] >= 0 and meta[j][0] >= 0
            if not both_known and meta[i][1] != meta[j][1]:
                continue
            s = dot(rows[i], rows[j]) / temperature
            y = 1.0 if is_positive(meta[i], meta[j]) else 0.0
            p = 1.0 / (1.0 + math.exp(-s))
            total += -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))
            count += 1
    return total / count if count else 0.0


@pytest.mark.parametrize("modalities", MODALITY_CASES)
@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_pairwise_matches_longhand(modalities: str, case: str) -> None:
    batch, labels = inputs(modalities, seed=1), LABEL_CASES[case]
    value = PairwiseLabelLoss(temperature=0.1)(**batch, labels=torch.tensor(labels))
    assert value.item() == pytest.approx(pairwise_longhand(batch, labels, 0.1), rel=1e-9)


def test_pairwise_no_usable_pair_gives_a_differentiable_zero() -> None:
    image = unit(B, D, seed=2).requires_grad_(True)
    value = PairwiseLabelLoss()(image=image, labels=torch.full((B,), -1))
    assert value.item() == 0.0
    value.backward()
    assert image.grad is not None and torch.all(image.grad == 0)


def test_pairwise_needs_labels() -> None:
    with pytest.raises(ValueError, match="needs labels"):
        PairwiseLabelLoss()(**inputs("both"))


# ------------------------------------------------------------------------------------- SupCon


def supcon_longhand(batch: dict[str, Tensor], labels: list[int], temperature: float) -> float:
    rows, meta = stacked_rows(batch, labels)
    n = len(rows)
    losses = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and is_positive(meta[i], meta[p])]
        if not positives:
            continue
        denominator = sum(math.exp(dot(rows[i], rows[a]) / temperature) for a in range(n) if a != i)
        terms = [
            math.log(math.exp(dot(rows[i], rows[p]) / temperature) / denominator) for p in positives
        ]
        losses.append(-sum(terms) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("modalities", MODALITY_CASES)
@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_supcon_matches_longhand(modalities: str, case: str) -> None:
    batch, labels = inputs(modalities, seed=3), LABEL_CASES[case]
    value = SupConLoss(temperature=0.1)(**batch, labels=torch.tensor(labels))
    assert value.item() == pytest.approx(supcon_longhand(batch, labels, 0.1), rel=1e-9)


def test_supcon_without_labels_uses_paired_rows_only() -> None:
    batch = inputs("both", seed=4)
    value = SupConLoss(temperature=0.5)(**batch)
    no_labels = [-1] * B  # "unlabelled" positives are exactly the paired rows
    assert value.item() == pytest.approx(supcon_longhand(batch, no_labels, 0.5), rel=1e-9)
    with pytest.raises(ValueError, match="needs labels, or both image and text"):
        SupConLoss()(image=batch["image"])


def test_supcon_all_different_single_modality_is_a_zero_with_gradient() -> None:
    image = unit(B, D, seed=5).requires_grad_(True)
    value = SupConLoss()(image=image, labels=torch.tensor(LABEL_CASES["all_different"]))
    assert value.item() == 0.0
    value.backward()
    assert image.grad is not None and not torch.isnan(image.grad).any()


def test_supcon_gradients_are_finite_with_excluded_anchors() -> None:
    image = unit(B, D, seed=6).requires_grad_(True)
    value = SupConLoss()(image=image, labels=torch.tensor([0, 0, 1, 2, -1]))
    value.backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()
    assert image.grad[:2].abs().sum() > 0


# -------------------------------------------------------------------------------- Class proxy


def proxy_longhand(
    batch: dict[str, Tensor], labels: list[int], proxies: Tensor, temperature: float
) -> list[float]:
    unit_proxies = [[v / math.sqrt(dot(p, p)) for v in p] for p in proxies.tolist()]
    terms = [0.0] * B
    for name in ("image", "text"):
        if name not in batch:
            continue
        for i in range(B):
            z = batch[name][i].tolist()
            logits = [dot(z, p) / temperature for p in unit_proxies]
            terms[i] += -logits[labels[i]] + math.log(sum(math.exp(v) for v in logits))
    return terms


@pytest.mark.parametrize("modalities", MODALITY_CASES)
@pytest.mark.parametrize("case", ["mixed", "all_same", "all_different"])
def test_proxy_matches_longhand(modalities: str, case: str) -> None:
    torch.manual_seed(0)
    loss = ClassProxyLoss(num_classes=5, dim=D, temperature=0.1).double()
    batch, labels = inputs(modalities, seed=7), LABEL_CASES[case]
    expected = proxy_longhand(batch, labels, loss.proxies.detach(), 0.1)
    per_example = loss.per_example(**batch, labels=torch.tensor(labels))
    assert per_example.shape == (B,)
    assert per_example.tolist() == pytest.approx(expected, rel=1e-9)
    assert loss(**batch, labels=torch.tensor(labels)).item() == pytest.approx(sum(expected) / B)


def test_proxy_terms_are_per_example_decomposable() -> None:
    torch.manual_seed(0)
    loss = ClassProxyLoss(num_classes=3, dim=D).double()
    batch, labels = inputs("both", seed=8), torch.tensor([0, 1, 2, 0, 1])
    before = loss.per_example(**batch, labels=labels)
    for j in range(B):
        changed = {name: x.clone() for name, x in batch.items()}
        changed["image"][j] = unit(1, D, seed=50 + j)[0]
        changed["text"][j] = unit(1, D, seed=60 + j)[0]
        changed_labels = labels.clone()
        changed_labels[j] = (labels[j] + 1) % 3
        after = loss.per_example(**changed, labels=changed_labels)
        others = [i for i in range(B) if i != j]
        assert torch.equal(after[others], before[others])
        assert not torch.isclose(after[j], before[j])


def test_proxy_label_validation_and_gradients() -> None:
    loss = ClassProxyLoss(num_classes=3, dim=D).double()
    batch = inputs("text", seed=9)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        loss(**batch, labels=torch.tensor([0, -1, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        loss(**batch, labels=torch.tensor([0, 3, 1, 2, 0]))
    with pytest.raises(ValueError, match="needs labels"):
        loss(**batch)
    with pytest.raises(ValueError, match="integer tensor"):
        loss(**batch, labels=torch.zeros(B))
    with pytest.raises(ValueError, match=r"labels must have shape \[5\]"):
        loss(**batch, labels=torch.zeros(3, dtype=torch.long))
    loss(**batch, labels=torch.tensor([0, 1, 2, 0, 1])).backward()
    assert loss.proxies.grad is not None and loss.proxies.grad.abs().sum() > 0
    assert [name for name, _ in loss.named_parameters()] == ["classifier.proxies"]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_opacus_per_sample_gradients_of_head_and_proxies_are_exact() -> None:
    """Head + ClassProxyLoss in one GradSampleModule: per-sample grads equal single-example grads."""
    import copy

    from opacus import GradSampleModule

    torch.manual_seed(0)
    config = HeadConfig(out_dim=6, hidden_dim=8, depth=3, residual=True)
    head = MultimodalHead(dims={"image": 12, "text": 10}, config=config)
    loss = ClassProxyLoss(num_classes=3, dim=6)
    model = torch.nn.ModuleDict({"head": head, "loss": loss})
    reference = copy.deepcopy(model)
    image, text, labels = torch.randn(B, 12), torch.randn(B, 10), torch.tensor([0, 1, 2, 0, 1])

    private = GradSampleModule(model, loss_reduction="sum")
    assert private._module is model  # the hooks live on the layers of head and loss
    loss.per_example(**head(image=image, text=text), labels=labels).sum().backward()
    for i in (0, 3):
        reference.zero_grad()
        out = reference["head"](image=image[i : i + 1], text=text[i : i + 1])
        reference["loss"](**out, labels=labels[i : i + 1]).backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            grad_sample = getattr(p, "grad_sample", None)
            assert grad_sample is not None, name
            torch.testing.assert_close(grad_sample[i], q.grad, msg=name)


# ------------------------------------------------------------------------------- build & misc


@pytest.mark.parametrize("loss", [InfoNCELoss(), PairwiseLabelLoss(), SupConLoss()])
def test_missing_embeddings_raise(loss: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="needs"):
        loss(labels=torch.zeros(B, dtype=torch.long))


def test_build_loss_builds_each_and_passes_temperature() -> None:
    expected = {
        "infonce": InfoNCELoss,
        "infonce+supcon": CLIPLabelLoss,
        "infonce+supcon+prompts": CLIPLabelLoss,
        "infonce+prompts": CLIPLabelLoss,
        "pairwise": PairwiseLabelLoss,
        "supcon": SupConLoss,
        "proxy": ClassProxyLoss,
        "prompts": PublicNegativesLoss,
        "infonce-public": PublicNegativesLoss,
        "infonce-public+prompts": PublicNegativesLoss,
        "auto": AutoLoss,
    }
    assert set(LOSSES) == set(expected)
    for name, cls in expected.items():
        loss = build_loss(name, num_classes=4, dim=8, temperature=0.3)
        assert type(loss) is cls
        if isinstance(loss, ClassProxyLoss):
            assert loss.proxies.shape == (4, 8)
            assert loss.classifier.temperature == pytest.approx(0.3)
        elif isinstance(loss, PublicNegativesLoss):
            assert loss.pair_temperature == pytest.approx(0.3)
            assert loss.prompt_temperature == pytest.approx(0.1)
            assert not list(loss.parameters())
        else:
            assert loss.temperature == pytest.approx(0.3)
    assert build_loss("infonce", num_classes=None, dim=8).temperature == pytest.approx(0.07)
    assert build_loss("pairwise", num_classes=2, dim=8).temperature == pytest.approx(0.1)
    with_prompts = build_loss("infonce+supcon+prompts", num_classes=2, dim=8)
    assert isinstance(with_prompts, CLIPLabelLoss) and with_prompts.uses_prompts
    without_prompts = build_loss("infonce+supcon", num_classes=2, dim=8)
    assert isinstance(without_prompts, CLIPLabelLoss) and not without_prompts.uses_prompts


@pytest.mark.parametrize("objective", sorted([*AUTO_OBJECTIVES, *PUBLIC_OBJECTIVES]))
def test_auto_loss_equals_the_registered_loss_it_chose(objective: str) -> None:
    """`auto` is one module whatever it chooses (same parameters at every site), and once it has
    chosen it computes exactly the registered loss of that name."""
    image, text = unit(B, D, seed=1).float(), unit(B, D, seed=2).float()
    labels = torch.tensor([0, 1, 0, 2, 1])
    prompts = unit(3, D, seed=3).float()
    auto = build_loss("auto", num_classes=3, dim=D)
    assert isinstance(auto, AutoLoss) and list(auto.state_dict()) == ["clip.logit_scale"]
    with pytest.raises(ValueError, match="no objective chosen"):
        auto(image, text, labels)
    auto.choose(objective)
    reference = build_loss(objective, num_classes=3, dim=D)
    kwargs = {"prompts": prompts} if getattr(reference, "uses_prompts", False) else {}
    assert auto.uses_prompts == bool(kwargs)
    torch.testing.assert_close(
        auto(image, text, labels, **kwargs), reference(image, text, labels, **kwargs)
    )
    rebuilt = build_loss("auto", num_classes=3, dim=D, objective=objective)
    assert isinstance(rebuilt, AutoLoss) and rebuilt.objective == objective
    with pytest.raises(ConfigError, match="objective must be one of"):
        auto.choose("pairwise")


def test_choose_loss_follows_what_the_data_has() -> None:
    assert choose_loss(paired=True, labelled=False, prompts=True)[0] == "infonce"
    assert choose_loss(paired=True, labelled=True, prompts=False)[0] == "infonce+supcon"
    assert choose_loss(paired=True, labelled=True, prompts=True)[0] == "infonce+prompts"
    assert choose_loss(paired=False, labelled=True, prompts=False)[0] == "supcon"
    with pytest.raises(DataError, match="neither image-text pairs nor labels"):
        choose_loss(paired=False, labelled=False, prompts=False)


def test_choose_loss_under_dp_takes_a_per_example_objective() -> None:
    def private(**has: bool) -> str:
        return choose_loss(private=True, **has)[0]

    assert private(paired=True, labelled=True, prompts=True) == "infonce-public+prompts"
    assert private(paired=False, labelled=True, prompts=True) == "prompts"
    assert private(paired=True, labelled=False, prompts=True) == "infonce-public"
    for name in ("infonce-public+prompts", "prompts", "infonce-public"):
        assert LOSSES[name].per_example
    with pytest.raises(DataError, match=r"no class prompts.*prompts, or name loss 'proxy'"):
        private(paired=True, labelled=True, prompts=False)
    with pytest.raises(DataError, match=r"no class prompts.*give the task's class prompts$"):
        private(paired=True, labelled=False, prompts=False)
    with pytest.raises(DataError, match="neither labels of two classes nor image-text pairs"):
        private(paired=False, labelled=False, prompts=True)


def test_build_loss_errors() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown loss 'clip'.*infonce, infonce\+supcon, infonce\+supcon\+prompts, infonce\+prompts, pairwise",
    ):
        build_loss("clip", num_classes=3, dim=8)
    labelled = ("pairwise", "supcon", "proxy", "infonce+supcon", "infonce+supcon+prompts")
    for name in (*labelled, "infonce+prompts"):
        with pytest.raises(ConfigError, match=f"loss '{re.escape(name)}' needs labelled data"):
            build_loss(name, num_classes=None, dim=8)
    with pytest.raises(ConfigError, match="num_classes must be >= 2"):
        build_loss("proxy", num_classes=1, dim=8)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        build_loss("supcon", num_classes=3, dim=8, temperature=0.0)


def test_the_per_example_losses_are_the_registered_ones() -> None:
    assert {name: loss_is_per_example_decomposable(name) for name in LOSSES} == {
        "infonce": False,
        "infonce+supcon": False,
        "infonce+supcon+prompts": False,
        "infonce+prompts": False,
        "pairwise": False,
        "supcon": False,
        "proxy": True,
        "prompts": True,
        "infonce-public": True,
        "infonce-public+prompts": True,
        "auto": False,  # chooses a per-example objective under DP (choose_loss private=True)
    }
    with pytest.raises(ConfigError, match="unknown loss"):
        loss_is_per_example_decomposable("nope")


def test_clip_label_loss_is_infonce_plus_weighted_label_terms() -> None:
    torch.manual_seed(0)
    image = F.normalize(torch.randn(B, 8), dim=1)
    text = F.normalize(torch.randn(B, 8), dim=1)
    prompts = F.normalize(torch.randn(3, 8), dim=1)
    labels = torch.randint(0, 3, (B,))
    combined = CLIPLabelLoss(supcon_weight=2.0, supcon_temperature=0.2)
    expected = InfoNCELoss()(image, text) + 2.0 * SupConLoss(temperature=0.2)(image, text, labels)
    value = combined(image, text, labels)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert combined.clip.logit_scale.grad is not None  # the CLIP temperature is still learned
    without_labels_term = CLIPLabelLoss(supcon_weight=0.0)(image, text, labels)
    torch.testing.assert_close(without_labels_term, InfoNCELoss()(image, text))
    all_three = CLIPLabelLoss(supcon_weight=2.0, prompt_weight=0.5, prompt_temperature=0.3)
    torch.testing.assert_close(
        all_three(image, text, labels, prompts=prompts),
        expected + 0.5 * PromptLoss(temperature=0.3)(image, text, labels, prompts=prompts),
    )
    with pytest.raises(ValueError, match="needs labels and the projected class prompts"):
        all_three(image, text, labels)
    registered = build_loss("infonce+prompts", num_classes=3, dim=8)  # no SupCon term
    torch.testing.assert_close(
        registered(image, text, labels, prompts=prompts),
        InfoNCELoss()(image, text) + PromptLoss()(image, text, labels, prompts=prompts),
    )


def test_prompt_loss_is_cross_entropy_over_the_class_prompts_per_row() -> None:
    image, text, prompts = unit(B, D, seed=1), unit(B, D, seed=2), unit(3, D, seed=3)
    labels = torch.tensor([0, -1, 2, 2, 1])
    loss = PromptLoss(temperature=0.5)
    value = loss(image, text, labels, prompts=prompts)
    terms = [
        -F.log_softmax(z[i] @ prompts.T / 0.5, dim=0)[labels[i]]
        for z in (image, text)
        for i in range(B)
        if labels[i] >= 0
    ]
    torch.testing.assert_close(value, torch.stack(terms).mean())
    # one modality alone, and a batch of one class: the other prompts are still negatives
    one_class = torch.full((B,), 2)
    single = loss(image, None, one_class, prompts=prompts)
    assert float(single) > 0
    torch.testing.assert_close(
        single, F.cross_entropy(image @ prompts.T / 0.5, one_class), rtol=1e-9, atol=1e-12
    )
    # no labelled row: a zero loss that still backpropagates
    zero = loss(image.requires_grad_(), None, torch.full((B,), -1), prompts=prompts)
    zero.backward()
    assert float(zero.detach()) == 0.0 and image.grad is not None
    with pytest.raises(ValueError, match="a label is >= the number of class prompts"):
        loss(image, text, torch.full((B,), 3), prompts=prompts)
    with pytest.raises(ValueError, match="prompts have dim 2"):
        loss(image, text, labels, prompts=unit(3, 2, seed=4))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny ops on a busy 2-core machine: 2 intra-op threads made 100 steps take 5-11 s, 1 takes <0.5 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_infonce_training_on_toy_pairs_lowers_the_loss() -> None:
    torch.manual_seed(0)
    n, image_dim, text_dim = 64, 16, 12
    image = torch.randn(n, image_dim)
    text = image @ torch.randn(image_dim, text_dim) + 0.1 * torch.randn(n, text_dim)
    head = MultimodalHead(
        dims={"image": image_dim, "text": text_dim}, config=HeadConfig(out_dim=16, hidden_dim=32)
    )
    loss_fn = InfoNCELoss()
    optimizer = torch.optim.Adam([*head.parameters(), *loss_fn.parameters()], lr=1e-2)
    losses = []
    for _ in range(100):
        out = head(image=image, text=text)
        loss = loss_fn(out["image"], out["text"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    assert losses[0] > math.log(n) * 0.8  # chance level at init


# Per-example losses with public negatives (the class prompts): valid under DP-SGD


def _public_longhand(
    image: Tensor, text: Tensor, labels: list[int], prompts: Tensor, pair_w: float, prompt_w: float
) -> list[float]:
    """Each example's term written out with Python loops (T pair 0.07, T prompt 0.1)."""
    out = []
    for i, y in enumerate(labels):
        total = 0.0
        if prompt_w and y >= 0:
            for z in (image[i], text[i]):
                logits = [float(z @ p) / 0.1 for p in prompts]
                total += prompt_w * (math.log(sum(math.exp(v) for v in logits)) - logits[y])
        if pair_w:
            pair = float(image[i] @ text[i]) / 0.07
            ce = []
            for z in (image[i], text[i]):
                logits = [pair] + [float(z @ p) / 0.07 for c, p in enumerate(prompts) if c != y]
                ce.append(math.log(sum(math.exp(v) for v in logits)) - pair)
            total += pair_w * 0.5 * (ce[0] + ce[1])
        out.append(total)
    return out


@pytest.mark.parametrize("name", sorted(PUBLIC_OBJECTIVES))
@pytest.mark.parametrize("labels", ["mixed", "with_unlabelled"])
def test_public_negative_losses_match_longhand(name: str, labels: str) -> None:
    batch = inputs("both")
    prompts = unit(5, D, seed=7)
    y = LABEL_CASES[labels]
    loss = build_loss(name, num_classes=5, dim=D).double()
    weights = PUBLIC_OBJECTIVES[name]
    expected = _public_longhand(
        batch["image"], batch["text"], y, prompts, weights["pair_weight"], weights["prompt_weight"]
    )
    per_example = loss.per_example(**batch, labels=torch.tensor(y), prompts=prompts)
    assert per_example.tolist() == pytest.approx(expected, rel=1e-9)
    assert float(loss(**batch, labels=torch.tensor(y), prompts=prompts)) == pytest.approx(
        sum(expected) / len(expected), rel=1e-9
    )


@pytest.mark.parametrize("name", sorted(PUBLIC_OBJECTIVES))
def test_public_negative_losses_are_per_example_and_treat_prompts_as_constants(name: str) -> None:
    """Example i's term is the same alone as in any batch; the prompts get no gradient."""
    batch = {k: v.requires_grad_(True) for k, v in inputs("both", seed=3).items()}
    y = torch.tensor([0, 1, 2, 1, 0])
    prompts = unit(3, D, seed=9).requires_grad_(True)
    loss = build_loss(name, num_classes=3, dim=D).double()
    together = loss.per_example(**batch, labels=y, prompts=prompts)
    for i in range(B):
        alone = loss.per_example(
            image=batch["image"][i : i + 1],
            text=batch["text"][i : i + 1],
            labels=y[i : i + 1],
            prompts=prompts,
        )
        assert float(alone[0].detach()) == pytest.approx(float(together[i].detach()), rel=1e-12)
    together.sum().backward()
    assert prompts.grad is None and batch["image"].grad is not None


def test_public_negative_losses_refuse_what_they_cannot_use() -> None:
    batch = inputs("both")
    prompts = unit(3, D, seed=1)
    y = torch.tensor([0, 1, 2, 1, 0])
    with pytest.raises(ValueError, match="needs the projected class prompts"):
        build_loss("prompts", num_classes=3, dim=D)(**batch, labels=y)
    with pytest.raises(ValueError, match="pair term needs paired image and text"):
        build_loss("infonce-public", num_classes=None, dim=D)(image=batch["image"], prompts=prompts)
    with pytest.raises(ValueError, match="prompt term needs labels"):
        build_loss("prompts", num_classes=3, dim=D)(**batch, prompts=prompts)
    with pytest.raises(ValueError, match="a label is >= the number of class prompts"):
        build_loss("prompts", num_classes=3, dim=D)(**batch, labels=y + 1, prompts=prompts)
