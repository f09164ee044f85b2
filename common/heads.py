"""Trainable projection heads on frozen embeddings: one MLP per modality or one on their concat."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
NORMS: tuple[str, ...] = ("layernorm",)
MODALITIES: tuple[str, ...] = ("image", "text")
LAYOUTS: tuple[str, ...] = ("two-tower", "concat")
PAPER_MAX_HIDDEN = 16
NORMALIZE_EPS = 1e-8


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class HeadConfig:
    """Architecture of one projection head (an MLP of ``depth`` Linear layers).

    Layer ``k < depth`` is ``Linear -> [LayerNorm] -> activation -> [Dropout]``; the last layer is a
    bare ``Linear`` to ``out_dim``. Hidden widths are all ``hidden_dim``; ``hidden_dim=None`` is the
    paper's bottleneck rule ``min(in_dim // 2, 16)`` (arXiv 2502.02048). ``depth=1`` is a single
    Linear and ignores ``hidden_dim``, ``norm``, ``activation`` and ``dropout``.
    ``residual=True`` adds ``x + layer(x)`` around every layer (including the last) whose input and
    output widths are equal; layers that change width get no skip. ``normalize=True`` L2-normalises
    the output. ``linear_path=True`` adds an affine map ``Linear(in_dim, out_dim)`` beside the MLP
    (output ``affine(x) + mlp(x)``) and starts the MLP's last layer at zero, so the head starts as
    its affine path: identity where the widths agree, else PyTorch's default init, until
    ``ProjectionHead.set_linear_path`` sets it (training sets it to the closed-form map). ``out_dim=None``: the
    width is taken from the inputs (a two-tower head on image-text pairs: the text embedding's
    width, the space the ridge map targets; otherwise each head's input width).
    Invalid values raise ``ConfigError`` naming the field.
    """

    out_dim: int | None = 128
    hidden_dim: int | None = 512
    depth: int = 2
    activation: str = "gelu"
    dropout: float = 0.0
    residual: bool = False
    norm: str | None = "layernorm"
    normalize: bool = True
    linear_path: bool = False

    def __post_init__(self) -> None:
        if self.out_dim is not None and (not _is_int(self.out_dim) or self.out_dim < 1):
            raise ConfigError(
                f"head config: out_dim must be an integer >= 1 or null, got {self.out_dim!r}"
            )
        if self.hidden_dim is not None and (not _is_int(self.hidden_dim) or self.hidden_dim < 1):
            raise ConfigError(
                f"head config: hidden_dim must be an integer >= 1 or null, got {self.hidden_dim!r}"
            )
        if not _is_int(self.depth) or self.depth < 1:
            raise ConfigError(f"head config: depth must be an integer >= 1, got {self.depth!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"head config: activation must be one of {sorted(ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if (
            not isinstance(self.dropout, (int, float))
            or isinstance(self.dropout, bool)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(
                f"head config: dropout must be a number in [0, 1), got {self.dropout!r}"
            )
        object.__setattr__(self, "dropout", float(self.dropout))
        if not isinstance(self.residual, bool):
            raise ConfigError(f"head config: residual must be true/false, got {self.residual!r}")
        if self.norm is not None and self.norm not in NORMS:
            raise ConfigError(
                f"head config: norm must be null or one of {list(NORMS)}, got {self.norm!r}"
            )
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"head config: normalize must be true/false, got {self.normalize!r}")
        if not isinstance(self.linear_path, bool):
            raise ConfigError(
                f"head config: linear_path must be true/false, got {self.linear_path!r}"
            )

    @classmethod
    def paper(cls) -> HeadConfig:
        """The head of arXiv 2502.02048: Linear(in, min(in//2, 16)) -> ReLU -> Linear(., 128)."""
        return cls(
            out_dim=128,
            hidden_dim=None,
            depth=2,
            activation="relu",
            dropout=0.0,
            residual=False,
            norm=None,
            normalize=True,
        )

    def widths(self, in_dim: int) -> list[int]:
        """Layer widths ``[in_dim, hidden, ..., out_dim]`` (``depth + 1`` entries) for an input
        (``out_dim=None``: ``in_dim``)."""
        if not _is_int(in_dim) or in_dim < 1:
            raise ConfigError(f"head input dimension must be an integer >= 1, got {in_dim!r}")
        out_dim = in_dim if self.out_dim is None else self.out_dim
        hidden = self.hidden_dim
        if hidden is None:
            hidden = min(in_dim // 2, PAPER_MAX_HIDDEN)
            if hidden < 1 and self.depth > 1:
                raise ConfigError(
                    f"head config: hidden_dim=null (min(in_dim // 2, {PAPER_MAX_HIDDEN})) "
                    f"needs in_dim >= 2, got {in_dim}"
                )
        return [in_dim, *([hidden] * (self.depth - 1)), out_dim]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; ``from_dict(to_dict())`` gives an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadConfig:
        """Build from a (possibly partial) mapping; missing keys take the defaults.

        Raises ``ConfigError`` naming the key for unknown keys or invalid values.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"head config must be a mapping, got {type(data).__name__}")
        valid = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(str(key) for key in data if key not in valid)
        if unknown:
            raise ConfigError(
                f"head config: unknown key {unknown[0]!r} (valid keys: {', '.join(valid)})"
            )
        return cls(**data)


HEAD_PRESETS: dict[str, HeadConfig] = {
    "default": HeadConfig(),
    "paper": HeadConfig.paper(),
    # Few parameters: cheap to send each round and to train under DP-SGD (per-sample gradients).
    "small": HeadConfig(out_dim=64, hidden_dim=128),
    # Starts equal to frozen + the tuned closed-form map (common.training sets the affine path).
    "aligned": HeadConfig(out_dim=None, linear_path=True),
}


class _HiddenLayer(nn.Module):
    """``Linear -> [LayerNorm] -> activation -> [Dropout]``, plus ``x +`` when residual applies."""

    def __init__(self, in_dim: int, out_dim: int, config: HeadConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm: nn.Module | None = nn.LayerNorm(out_dim) if config.norm == "layernorm" else None
        self.act = ACTIVATIONS[config.activation]()
        self.dropout: nn.Module | None = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.residual = config.residual and in_dim == out_dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear(x)
        if self.norm is not None:
            h = self.norm(h)
        h = self.act(h)
        if self.dropout is not None:
            h = self.dropout(h)
        return x + h if self.residual else h


class ProjectionHead(nn.Module):
    """An MLP head on one embedding (see ``HeadConfig``); ``[B, in_dim] -> [B, out_dim]``.

    Parameters are named ``hidden.{k}.linear.*``, ``hidden.{k}.norm.*`` (k < depth - 1),
    ``out.*`` and, with ``linear_path``, ``linear.*``. Only ``nn.Linear``, ``nn.LayerNorm``, activations and dropout are used, no
    in-place ops and no BatchNorm, so Opacus can compute per-sample gradients.
    """

    def __init__(self, in_dim: int, config: HeadConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else HeadConfig()
        widths = self.config.widths(in_dim)
        self.in_dim = in_dim
        self.hidden = nn.ModuleList(
            _HiddenLayer(widths[k], widths[k + 1], self.config) for k in range(len(widths) - 2)
        )
        self.out = nn.Linear(widths[-2], widths[-1])
        self.out_residual = self.config.residual and widths[-2] == widths[-1]
        self.out_dim = widths[-1]
        self.linear: nn.Linear | None = None
        if self.config.linear_path:
            self.linear = nn.Linear(in_dim, self.out_dim)
            if in_dim == self.out_dim:
                with torch.no_grad():
                    self.linear.weight.copy_(torch.eye(in_dim))
                    self.linear.bias.zero_()
            with torch.no_grad():  # the MLP is a residual that starts at zero output
                self.out.weight.zero_()
                self.out.bias.zero_()

    def set_linear_path(self, weight: Tensor, bias: Tensor) -> None:
        """Set the affine path to ``x @ weight.T + bias`` (weight ``[out_dim, in_dim]``) and the
        MLP's last layer to zero: the head's output becomes ``normalize(x @ weight.T + bias)``."""
        if self.linear is None:
            raise ConfigError("this head has no linear path (head config linear_path = false)")
        if tuple(weight.shape) != tuple(self.linear.weight.shape) or tuple(bias.shape) != (
            self.out_dim,
        ):
            raise ValueError(
                f"linear path: expected weight {list(self.linear.weight.shape)} and bias "
                f"[{self.out_dim}], got {list(weight.shape)} and {list(bias.shape)}"
            )
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        skip = self.linear(x) if self.linear is not None else None
        for layer in self.hidden:
            x = layer(x)
        y = self.out(x)
        if self.out_residual:
            y = x + y
        if skip is not None:
            y = skip + y
        if self.config.normalize:
            y = F.normalize(y, p=2.0, dim=-1, eps=NORMALIZE_EPS)
        return y


class MultimodalHead(nn.Module):
    """Projection heads for paired image/text embeddings; its state dict is the federated model.

    ``layout="two-tower"``: one ``ProjectionHead`` per modality in ``dims``, as submodules ``image``
    and ``text`` (parameter names ``image.*`` / ``text.*``); ``forward`` returns ``{"image": ...,
    "text": ...}`` for the inputs given. ``layout="concat"``: one head ``joint`` on
    ``torch.cat([image, text], -1)`` (needs both modalities); ``forward`` returns ``{"joint": ...}``.
    """

    def __init__(
        self, *, dims: Mapping[str, int], config: HeadConfig, layout: str = "two-tower"
    ) -> None:
        super().__init__()
        self.dims = _check_dims(dims)
        if layout not in LAYOUTS:
            raise ConfigError(f"head layout must be one of {list(LAYOUTS)}, got {layout!r}")
        if layout == "concat" and len(self.dims) != len(MODALITIES):
            raise ConfigError(
                f"head layout 'concat' needs both image and text dims, got {sorted(self.dims)}"
            )
        if not isinstance(config, HeadConfig):
            raise ConfigError(f"head config must be a HeadConfig, got {type(config).__name__}")
        two_tower = layout == "two-tower"
        if config.out_dim is None and two_tower and len(self.dims) == len(MODALITIES):
            config = dataclasses.replace(config, out_dim=self.dims["text"])  # the ridge map's space
        self.config = config
        self.layout = layout
        self.image = (
            ProjectionHead(self.dims["image"], config)
            if two_tower and "image" in self.dims
            else None
        )
        self.text = (
            ProjectionHead(self.dims["text"], config) if two_tower and "text" in self.dims else None
        )
        self.joint = ProjectionHead(sum(self.dims.values()), config) if not two_tower else None
        towers = [t for t in (self.image, self.text, self.joint) if t is not None]
        self.out_dim = towers[0].out_dim

    def towers(self) -> dict[str, ProjectionHead]:
        """The head's projection heads by name ("image", "text" or "joint")."""
        named = {"image": self.image, "text": self.text, "joint": self.joint}
        return {name: tower for name, tower in named.items() if tower is not None}

    @property
    def has_linear_path(self) -> bool:
        """Whether every tower has an affine path (the ``aligned`` preset): a closed-form start."""
        return all(tower.linear is not None for tower in self.towers().values())

    def forward(self, image: Tensor | None = None, text: Tensor | None = None) -> dict[str, Tensor]:
        if image is None and text is None:
            raise ValueError("MultimodalHead.forward needs an image and/or a text embedding batch")
        if self.joint is not None:
            if image is None or text is None:
                missing = "image" if image is None else "text"
                raise ValueError(f"the concat head needs both modalities; {missing} is missing")
            self._check_input("image", image)
            self._check_input("text", text)
            if image.shape[0] != text.shape[0]:
                raise ValueError(
                    f"the concat head needs paired rows: image batch {image.shape[0]} != "
                    f"text batch {text.shape[0]}"
                )
            return {"joint": self.joint(torch.cat([image, text], dim=-1))}
        out: dict[str, Tensor] = {}
        for name, x, tower in (("image", image, self.image), ("text", text, self.text)):
            if x is None:
                continue
            if tower is None:
                raise ValueError(
                    f"this head has no {name} tower (configured modalities: {sorted(self.dims)})"
                )
            self._check_input(name, x)
            out[name] = tower(x)
        return out

    def _check_input(self, name: str, x: Tensor) -> None:
        expected = self.dims[name]
        if x.dim() != 2 or x.shape[1] != expected:
            raise ValueError(
                f"{name} embeddings must have shape [batch, {expected}], got {list(x.shape)}"
            )

    def describe(self) -> dict[str, Any]:
        """JSON-able description (dims, layout, config) that ``from_description`` rebuilds."""
        return {"dims": dict(self.dims), "layout": self.layout, "config": self.config.to_dict()}

    @classmethod
    def from_description(cls, description: Mapping[str, Any]) -> MultimodalHead:
        """Rebuild an (untrained) head with the same architecture and parameter names."""
        if not isinstance(description, Mapping):
            raise ConfigError(
                f"head description must be a mapping, got {type(description).__name__}"
            )
        keys = {"dims", "layout", "config"}
        unknown = sorted(str(key) for key in description if key not in keys)
        if unknown:
            raise ConfigError(
                f"head description: unknown key {unknown[0]!r} (valid: {sorted(keys)})"
            )
        missing = sorted(keys - set(description))
        if missing:
            raise ConfigError(f"head description: missing key {missing[0]!r}")
        return cls(
            dims=description["dims"],
            config=HeadConfig.from_dict(description["config"]),
            layout=description["layout"],
        )


def _check_dims(dims: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(dims, Mapping) or not dims:
        raise ConfigError(f"head dims must be a non-empty mapping of modality -> dim, got {dims!r}")
    for name, dim in dims.items():
        if name not in MODALITIES:
            raise ConfigError(f"head dims: unknown modality {name!r} (valid: {list(MODALITIES)})")
        if not _is_int(dim) or dim < 1:
            raise ConfigError(f"head dims: {name} must be an integer >= 1, got {dim!r}")
    return {name: dims[name] for name in MODALITIES if name in dims}
