"""Tests for common.heads: config validation, presets, layouts, shapes, parameter names, round trips."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from common.errors import ConfigError
from common.heads import HEAD_PRESETS, HeadConfig, MultimodalHead, ProjectionHead

DIMS = {"image": 40, "text": 24}


def leaf_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if not list(m.children())]


# -------------------------------------------------------------------------------- HeadConfig


def test_paper_preset_structure_and_parameter_count() -> None:
    head = ProjectionHead(384, HeadConfig.paper())
    leaves = leaf_modules(head)
    assert [type(m) for m in leaves] == [nn.Linear, nn.ReLU, nn.Linear]
    first, _, last = leaves
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    assert (first.in_features, first.out_features) == (384, 16)
    assert (last.in_features, last.out_features) == (16, 128)
    assert sum(p.numel() for p in head.parameters()) == 384 * 16 + 16 + 16 * 128 + 128
    assert list(head.state_dict()) == [
        "hidden.0.linear.weight",
        "hidden.0.linear.bias",
        "out.weight",
        "out.bias",
    ]


@pytest.mark.parametrize(("in_dim", "hidden"), [(384, 16), (20, 10), (3, 1)])
def test_paper_bottleneck_rule(in_dim: int, hidden: int) -> None:
    assert HeadConfig.paper().widths(in_dim) == [in_dim, hidden, 128]
    with pytest.raises(ConfigError, match="needs in_dim >= 2"):
        HeadConfig.paper().widths(1)


def test_default_structure_and_widths() -> None:
    config = HeadConfig()
    assert config.widths(384) == [384, 512, 128]
    assert HeadConfig(depth=1).widths(384) == [384, 128]
    assert HeadConfig(depth=4, hidden_dim=64, out_dim=32).widths(10) == [10, 64, 64, 64, 32]
    leaves = leaf_modules(ProjectionHead(384, config))
    assert [type(m) for m in leaves] == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear]
    with_dropout = leaf_modules(ProjectionHead(8, HeadConfig(dropout=0.2, activation="silu")))
    assert [type(m) for m in with_dropout] == [
        nn.Linear,
        nn.LayerNorm,
        nn.SiLU,
        nn.Dropout,
        nn.Linear,
    ]


def test_presets_and_dict_round_trip() -> None:
    assert set(HEAD_PRESETS) >= {"default", "paper", "small"}
    assert HEAD_PRESETS["default"] == HeadConfig()
    assert HEAD_PRESETS["paper"] == HeadConfig.paper()
    for config in HEAD_PRESETS.values():
        data = json.loads(json.dumps(config.to_dict()))
        assert HeadConfig.from_dict(data) == config
    assert HeadConfig.from_dict({"depth": 3}) == HeadConfig(depth=3)
    assert HeadConfig.from_dict({"dropout": 0}).dropout == 0.0
    assert isinstance(HeadConfig.from_dict({"dropout": 0}).dropout, float)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"hidden": 3}, "unknown key 'hidden'"),
        ({"out_dim": 0}, "out_dim"),
        ({"out_dim": 1.5}, "out_dim"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"hidden_dim": "512"}, "hidden_dim"),
        ({"depth": 0}, "depth"),
        ({"depth": True}, "depth"),
        ({"activation": "swish"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": "0.1"}, "dropout"),
        ({"residual": 1}, "residual"),
        ({"norm": "batchnorm"}, "norm"),
        ({"normalize": "yes"}, "normalize"),
    ],
)
def test_from_dict_rejects_bad_config_naming_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        HeadConfig.from_dict(data)


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        HeadConfig.from_dict([("depth", 2)])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- ProjectionHead


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("preset", sorted(HEAD_PRESETS))
def test_projection_head_shapes_and_unit_norm(preset: str, depth: int) -> None:
    config = HeadConfig.from_dict({**HEAD_PRESETS[preset].to_dict(), "depth": depth})
    head = ProjectionHead(40, config)
    out = head(torch.randn(7, 40))
    assert out.shape == (7, config.out_dim or 40)  # out_dim None: the input's width
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(7))
    linear_path = 1 if config.linear_path else 0
    assert sum(isinstance(m, nn.Linear) for m in head.modules()) == depth + linear_path


def test_unnormalised_head_is_not_unit_norm() -> None:
    out = ProjectionHead(40, HeadConfig(normalize=False))(torch.randn(7, 40))
    assert not torch.allclose(out.norm(dim=-1), torch.ones(7))


def test_zero_output_is_finite() -> None:
    head = ProjectionHead(4, HeadConfig(depth=1, out_dim=3))
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.zero_()
    assert torch.isfinite(head(torch.randn(2, 4))).all()


def test_residual_only_where_widths_match() -> None:
    torch.manual_seed(0)
    config = HeadConfig(out_dim=16, hidden_dim=16, depth=3, residual=True, normalize=False)
    head = ProjectionHead(10, config)
    plain = ProjectionHead(10, HeadConfig.from_dict({**config.to_dict(), "residual": False}))
    plain.load_state_dict(head.state_dict())
    assert [layer.residual for layer in head.hidden] == [False, True]
    assert head.out_residual
    x = torch.randn(3, 10)
    h0 = plain.hidden[0](x)
    h1 = h0 + plain.hidden[1](h0)
    torch.testing.assert_close(head(x), h1 + plain.out(h1))


def test_dropout_is_active_only_in_training() -> None:
    head = ProjectionHead(8, HeadConfig(dropout=0.5))
    x = torch.randn(4, 8)
    head.eval()
    torch.testing.assert_close(head(x), head(x))
    head.train()
    torch.manual_seed(1)
    first = head(x)
    assert not torch.allclose(first, head(x))


# ---------------------------------------------------------------------------- MultimodalHead


@pytest.mark.parametrize("preset", sorted(HEAD_PRESETS))
@pytest.mark.parametrize("layout", ["two-tower", "concat"])
def test_multimodal_shapes_for_all_layouts(preset: str, layout: str) -> None:
    config = HEAD_PRESETS[preset]
    head = MultimodalHead(dims=DIMS, config=config, layout=layout)
    image, text = torch.randn(6, 40), torch.randn(6, 24)
    out = head(image=image, text=text)
    expected_keys = ["image", "text"] if layout == "two-tower" else ["joint"]
    assert sorted(out) == expected_keys
    # out_dim None (aligned): the text width for image-text towers, the input's for concat
    width = config.out_dim or (24 if layout == "two-tower" else 64)
    for value in out.values():
        assert value.shape == (6, width)
        torch.testing.assert_close(value.norm(dim=-1), torch.ones(6))
    assert head.out_dim == width


def test_two_tower_accepts_one_modality_and_single_tower_heads() -> None:
    head = MultimodalHead(dims=DIMS, config=HeadConfig())
    assert list(head(text=torch.randn(3, 24))) == ["text"]
    text_only = MultimodalHead(dims={"text": 24}, config=HeadConfig())
    assert list(text_only(text=torch.randn(3, 24))) == ["text"]
    assert all(name.startswith("text.") for name in text_only.state_dict())
    with pytest.raises(ValueError, match=r"no image tower \(configured modalities: \['text'\]\)"):
        text_only(image=torch.randn(3, 40))


def test_parameter_names_are_stable() -> None:
    two_tower = MultimodalHead(dims={"text": 24, "image": 40}, config=HeadConfig())
    tower_keys = [
        "hidden.0.linear.weight",
        "hidden.0.linear.bias",
        "hidden.0.norm.weight",
        "hidden.0.norm.bias",
        "out.weight",
        "out.bias",
    ]
    expected = [f"image.{k}" for k in tower_keys] + [f"text.{k}" for k in tower_keys]
    assert list(two_tower.state_dict()) == expected
    concat = MultimodalHead(dims=DIMS, config=HeadConfig.paper(), layout="concat")
    assert list(concat.state_dict()) == [
        "joint.hidden.0.linear.weight",
        "joint.hidden.0.linear.bias",
        "joint.out.weight",
        "joint.out.bias",
    ]
    assert concat.joint is not None and concat.joint.in_dim == 64


def test_concat_joins_image_then_text() -> None:
    torch.manual_seed(0)
    head = MultimodalHead(dims=DIMS, config=HeadConfig(), layout="concat")
    image, text = torch.randn(2, 40), torch.randn(2, 24)
    assert head.joint is not None
    expected = head.joint(torch.cat([image, text], dim=-1))
    torch.testing.assert_close(head(image=image, text=text)["joint"], expected)


@pytest.mark.parametrize(
    ("layout", "kwargs", "message"),
    [
        (
            "two-tower",
            {"image": torch.randn(3, 24)},
            r"image embeddings must have shape \[batch, 40\]",
        ),
        ("two-tower", {"text": torch.randn(24)}, r"text embeddings must have shape \[batch, 24\]"),
        ("two-tower", {}, "needs an image and/or a text"),
        ("concat", {"image": torch.randn(3, 40)}, "text is missing"),
        ("concat", {"text": torch.randn(3, 24)}, "image is missing"),
        ("concat", {"image": torch.randn(3, 40), "text": torch.randn(2, 24)}, "paired rows"),
        ("concat", {"image": torch.randn(3, 41), "text": torch.randn(3, 24)}, r"\[batch, 40\]"),
    ],
)
def test_forward_validates_inputs(
    layout: str, kwargs: dict[str, torch.Tensor], message: str
) -> None:
    head = MultimodalHead(dims=DIMS, config=HeadConfig(), layout=layout)
    with pytest.raises(ValueError, match=message):
        head(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dims": {}}, "non-empty mapping"),
        ({"dims": {"audio": 3}}, "unknown modality 'audio'"),
        ({"dims": {"image": 0}}, "image must be an integer >= 1"),
        ({"dims": {"text": 24}, "layout": "concat"}, "'concat' needs both"),
        ({"dims": DIMS, "layout": "three-tower"}, "layout must be one of"),
    ],
)
def test_constructor_validates_config(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MultimodalHead(config=HeadConfig(), **kwargs)


@pytest.mark.parametrize("layout", ["two-tower", "concat"])
def test_describe_round_trip_gives_same_keys_and_outputs(layout: str) -> None:
    config = HeadConfig(depth=3, hidden_dim=32, residual=True, dropout=0.1, activation="tanh")
    head = MultimodalHead(dims=DIMS, config=config, layout=layout).eval()
    description = json.loads(json.dumps(head.describe()))
    assert description == {"dims": DIMS, "layout": layout, "config": config.to_dict()}
    rebuilt = MultimodalHead.from_description(description).eval()
    assert list(rebuilt.state_dict()) == list(head.state_dict())
    rebuilt.load_state_dict(head.state_dict())
    image, text = torch.randn(4, 40), torch.randn(4, 24)
    expected, actual = head(image=image, text=text), rebuilt(image=image, text=text)
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ({"dims": DIMS, "layout": "concat"}, "missing key 'config'"),
        ({"dims": DIMS, "layout": "concat", "config": {}, "extra": 1}, "unknown key 'extra'"),
        ({"dims": DIMS, "layout": "concat", "config": {"depth": -1}}, "depth"),
    ],
)
def test_from_description_errors(description: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MultimodalHead.from_description(description)


@pytest.mark.parametrize("layout", ["two-tower", "concat"])
def test_gradients_reach_every_parameter(layout: str) -> None:
    head = MultimodalHead(dims=DIMS, config=HeadConfig(depth=3, residual=True), layout=layout)
    out = head(image=torch.randn(5, 40), text=torch.randn(5, 24))
    sum((value[:, 0] ** 2).sum() for value in out.values()).backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_opacus_validator_accepts_all_presets() -> None:
    from opacus.validators import ModuleValidator

    for config in [*HEAD_PRESETS.values(), HeadConfig(dropout=0.1, residual=True, depth=3)]:
        for layout in ("two-tower", "concat"):
            head = MultimodalHead(dims=DIMS, config=config, layout=layout)
            assert ModuleValidator.validate(head, strict=False) == []
