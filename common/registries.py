"""The names a run-config may choose, and what each needs: losses, head presets, strategies.

Torch-free, so config checks and the CLI read it cheaply. common/losses.py builds the losses,
common/heads.py HEAD_PRESETS holds the heads' shapes and server/strategy/factory.py the
strategies' Flower classes, each keyed by these names.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError, DataError


@dataclass(frozen=True)
class LossInfo:
    """A loss: what data it needs, and whether it is valid under DP-SGD."""

    description: str
    labels: bool = False  # needs class labels (rows without one are skipped)
    prompts: bool = False  # needs the task's class prompts (frozen text embeddings) each step
    pairs: bool = False  # needs paired image and text rows (two-tower layout)
    per_example: bool = False  # each example's loss depends on that example alone (DP-SGD safe)
    min_classes: int = 1  # labelled data must have at least this many classes
    auto: bool = False  # chosen from what the training data has (``choose_loss``)


AUTO_LOSS = "auto"
"""The loss that is chosen from the data (``choose_loss``): the run-config and train default."""

LOSSES: dict[str, LossInfo] = {
    "infonce": LossInfo(
        "CLIP symmetric InfoNCE over image-text pairs, learnable temperature (no labels)",
        pairs=True,
    ),
    "infonce+supcon": LossInfo(
        "InfoNCE + 2 x SupCon (T 0.2): retrieval from the pairs, classes from labels",
        labels=True,
        pairs=True,
    ),
    "infonce+supcon+prompts": LossInfo(
        "infonce+supcon + 1 x cross-entropy over the class prompts (T 0.1): "
        "classes tied to their prompt's text, negatives at single-class sites",
        labels=True,
        prompts=True,
        pairs=True,
    ),
    "infonce+prompts": LossInfo(
        "InfoNCE + 1 x cross-entropy over the class prompts (T 0.1), no SupCon: classes tied to "
        "their prompt's text while each image stays nearest its own report",
        labels=True,
        prompts=True,
        pairs=True,
    ),
    "pairwise": LossInfo(
        "label-aware pairwise BCE on in-batch similarities (arXiv 2502.02048)", labels=True
    ),
    "supcon": LossInfo(
        "supervised contrastive (Khosla et al.), image and text rows of a class are positives",
        labels=True,
    ),
    "proxy": LossInfo(
        "cross-entropy to learnable class proxies; per-example decomposable (DP-SGD safe)",
        labels=True,
        per_example=True,
        min_classes=2,  # a softmax over the class proxies
    ),
    "prompts": LossInfo(
        "cross-entropy of each image and report against the class prompts (public task "
        "metadata, projected by the head as a per-step constant, T 0.1): per-example (DP-SGD safe)",
        labels=True,
        prompts=True,
        per_example=True,
        min_classes=2,
    ),
    "infonce-public": LossInfo(
        "InfoNCE of each image-text pair against the class prompts as its only negatives (public, "
        "never other examples; T 0.07): per-example (DP-SGD safe), no labels needed",
        prompts=True,
        pairs=True,
        per_example=True,
    ),
    "infonce-public+prompts": LossInfo(
        "infonce-public + prompts (a labelled example's own class prompt is not its negative): "
        "per-example (DP-SGD safe)",
        labels=True,
        prompts=True,
        pairs=True,
        per_example=True,
        min_classes=2,
    ),
    AUTO_LOSS: LossInfo(
        "chosen from what the data has: infonce for image-text pairs; infonce+supcon with labels; "
        "infonce+supcon+prompts with labels and class prompts (or infonce+prompts, where it scores "
        "higher on held-out validation rows); supcon for labelled single-modality "
        "data; under sample-level DP the per-example infonce-public+prompts, prompts or "
        "infonce-public (one module whatever is chosen, so every site's head has the same "
        "parameters)",
        auto=True,
    ),
}


AUTO_ALTERNATIVES: dict[str, tuple[str, ...]] = {
    "infonce+prompts": ("infonce+supcon+prompts",),
}
"""Objectives ``auto`` also trains where validation rows are held out (a single site's or a pooled
run's own training, never a federated round: every site of a round trains the same objective),
keeping the one whose kept state scores higher on those rows. SupCon groups a class tightly,
which helps the probe and zero-shot on some data (digits) and costs retrieval on other data
(synthetic radiology); which one wins is the data's call, made on validation rows only
(docs/results.md, "Which objective auto trains"). A federation trains the first: without SupCon,
a federation of 4 synthetic-radiology sites reached 1.13x of pooling's R@5 on IID sites and 0.95x
under Dirichlet(0.3) label skew, against 0.84x and 0.88x with it (3 seeds each; docs/results.md,
"The federation's objective")."""


def choose_loss(
    *, paired: bool, labelled: bool, prompts: bool, private: bool = False
) -> tuple[str, str]:
    """The objective ``auto`` trains with, and why, from what the training data has.

    ``paired``: image and text rows (two-tower layout); ``labelled``: class labels of at least two
    classes; ``prompts``: the task's class prompts embedded by the text encoder. ``private``: the
    site trains with sample-level DP (DP-SGD), so only a per-example objective will do. Data with
    neither pairs nor labels has nothing to train on: DataError; under DP, data without class
    prompts has no public negatives: DataError naming the alternative.
    """
    if private:
        return _choose_private(paired=paired, labelled=labelled, prompts=prompts)
    if paired and labelled and prompts:
        # with validation rows, infonce+supcon+prompts is tried too (AUTO_ALTERNATIVES)
        return "infonce+prompts", "image-text pairs with labels and class prompts"
    if paired and labelled:
        return "infonce+supcon", "image-text pairs with labels (no class prompts)"
    if paired:
        return "infonce", "image-text pairs without labels"
    if labelled:
        return "supcon", "labelled rows of one modality"
    raise DataError(
        "loss 'auto': the data has neither image-text pairs nor labels of two classes: "
        "nothing to train a head on"
    )


def _choose_private(*, paired: bool, labelled: bool, prompts: bool) -> tuple[str, str]:
    why = "sample-level DP: a per-example objective"
    if prompts and labelled and paired:
        return "infonce-public+prompts", f"{why}; image-text pairs with labels and class prompts"
    if prompts and labelled:
        return "prompts", f"{why}; labels and class prompts, no image-text pairs"
    if prompts and paired:
        return "infonce-public", f"{why}; image-text pairs and class prompts, no labels"
    if not prompts:
        proxy = ", or name loss 'proxy' (learnable class proxies)" if labelled else ""
        raise DataError(
            "loss 'auto' under sample-level DP: the data has no class prompts (embedded by a text "
            "tower), the public negatives every per-example objective of 'auto' needs: give the "
            f"task's class prompts{proxy}"
        )
    raise DataError(
        "loss 'auto' under sample-level DP: the data has neither labels of two classes nor "
        "image-text pairs to train on"
    )


@dataclass(frozen=True)
class HeadInfo:
    """A head preset (its shapes: common/heads.py HEAD_PRESETS, same names, same order)."""

    description: str


HEADS: dict[str, HeadInfo] = {
    "default": HeadInfo("Linear(in, 512) -> LayerNorm -> GELU -> Linear(512, 128), L2-normalised"),
    "paper": HeadInfo("arXiv 2502.02048: Linear(in, min(in//2, 16)) -> ReLU -> Linear(., 128)"),
    "small": HeadInfo("out 64, hidden 128: cheap to send each round and to train under DP-SGD"),
    "aligned": HeadInfo(
        "affine path (out = the text embedding's width) + residual MLP Linear(in, 512) -> "
        "LayerNorm -> GELU -> Linear(512, out) whose last layer starts at zero; training starts "
        "the affine path at the tuned closed-form map (ridge or CCA), so the head starts equal to "
        "frozen + that map, L2-normalised"
    ),
}


@dataclass(frozen=True)
class StrategyInfo:
    """A Flower aggregation strategy (its class: server/strategy/factory.py BASES)."""

    description: str
    mean: bool = False  # aggregates with FedAvg's weighted mean (client-level DP, SecAgg+ need it)


STRATEGIES: dict[str, StrategyInfo] = {
    "fedavg": StrategyInfo("example-weighted mean of the sites' heads", mean=True),
    "fedavgm": StrategyInfo("FedAvg with server momentum (server-momentum)"),
    "fedprox": StrategyInfo("FedAvg with a proximal term at the sites (proximal-mu)", mean=True),
    "fedadam": StrategyInfo("server-side Adam on the mean update (server-lr)"),
    "fedyogi": StrategyInfo("server-side Yogi on the mean update (server-lr)"),
    "fedmedian": StrategyInfo("coordinate-wise median of the sites' heads"),
    "fedtrimmedavg": StrategyInfo("coordinate-wise trimmed mean (trim-beta)"),
    "krum": StrategyInfo("Krum: the site head closest to its neighbours"),
}


def sample_dp_losses() -> tuple[str, ...]:
    """The losses valid under sample-level DP (DP-SGD): per-example decomposable ones."""
    return tuple(name for name, info in LOSSES.items() if info.per_example)


def loss_info(name: str) -> LossInfo:
    """The loss named ``name``; ConfigError naming the valid ones otherwise."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r} (valid: {', '.join(LOSSES)})")
    return LOSSES[name]


ENCODER_PRECISIONS = ("auto", "fp32", "bf16")
"""How a frozen encoder computes (common.encoders.runtime): auto = bf16 where the device has it
natively and a fidelity probe passes, else fp32 (an encoder measured faster on ONNX Runtime, the
packaged MobileNetV2, runs there in fp32 on a CPU under auto and fp32)."""

ENCODER_DEVICES = ("auto", "cpu", "cuda")
"""Where a frozen encoder runs: auto = CUDA when torch sees a device, else the CPU."""
