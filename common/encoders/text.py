"""Hugging Face text encoders: tokenisation and token pooling."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.encoders.base import Encoder, _forward_params, _freeze
from common.encoders.runtime import check_choice
from common.errors import ConfigError, DataError

TEXT_POOLINGS = ("mean", "cls", "last-token")

_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

_COUNT_CHUNK = 4096  # texts tokenised at once to count their tokens

PROBE_TEXTS = (
    "probe",
    "The heart size is normal and the lungs are clear.",
    "No pneumothorax, pleural effusion or focal airspace consolidation.",
    "Mild cardiomegaly with small bilateral pleural effusions; compared with the prior study of "
    "last year, the patchy right lower lobe opacity has resolved. Degenerative changes of the spine.",
    "Patient presents with chest pain radiating to the left arm; troponin pending, ECG shows sinus rhythm.",
    "Impression: no acute cardiopulmonary abnormality.",
    "12 mm nodule in the left upper lobe, follow-up CT in 3 months recommended.",
    "Sternotomy wires intact.",
)
"""Fixed texts for the test forward pass and the auto precision fidelity probe."""


class HFTextEncoder(Encoder):
    """A Hugging Face text model (AutoTokenizer + AutoModel) with token pooling.

    Poolings: "mean" (average of the hidden states of non-padding tokens), "cls" (the first
    non-padding token, i.e. [CLS] for BERT-style models) and "last-token" (the last non-padding
    token, for decoder LLMs; works with left or right padding). Default rule: "last-token" for
    decoder-only models (``is_decoder_only``), "mean" for everything else. Texts are truncated to
    ``max_length`` tokens (capped by the tokenizer's and the model's maximum). Decoders without a
    pad token get eos (else unk, else bos) as pad token; with left padding they also get
    position ids counted from the first real token, so padding never shifts positions.
    Embeddings are not L2-normalised.
    """

    modality = "text"
    inputs_in_background = True  # the tokenizer uses no torch threads

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        source: str,
        weight_files: Sequence[Path],
        pooling: str | None = None,
        max_length: int = 256,
        batch_size: int | None = None,
        precision: str = "auto",
        device: str = "auto",
    ) -> None:
        super().__init__(
            source=source,
            weight_files=weight_files,
            batch_size=batch_size,
            precision=precision,
            device=device,
        )
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        config: Any = model.config
        self.decoder_only = is_decoder_only(config)
        self.pooling = check_choice(
            pooling or ("last-token" if self.decoder_only else "mean"),
            TEXT_POOLINGS,
            "pooling",
            source,
        )
        self.max_length = _effective_max_length(max_length, tokenizer, config, source)
        if tokenizer.pad_token is None:
            _set_pad_token(tokenizer, source)
        params = _forward_params(self.model)
        if "attention_mask" not in params:
            raise ConfigError(
                f"encoder {source!r}: the model takes no attention_mask; cannot pool padded batches"
            )
        self._input_names = tuple(name for name in _TEXT_INPUTS if name in params)
        self._positions_from_mask = (
            self.decoder_only and tokenizer.padding_side == "left" and "position_ids" in params
        )
        if getattr(config, "use_cache", False):
            config.use_cache = False
        self.dim = self._setup(self.model)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model inputs for one batch (padded to its longest text, truncated to max_length)."""
        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        inputs = {name: encoded[name] for name in self._input_names if name in encoded}
        if self._positions_from_mask:
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return inputs

    def _inputs(self, items: list[Any]) -> dict[str, torch.Tensor]:
        inputs = self.tokenize(items)
        empty = (inputs["attention_mask"].sum(dim=1) == 0).nonzero().flatten()
        if len(empty):
            raise DataError(f"text {items[int(empty[0])]!r} has no tokens after tokenisation")
        return inputs

    def _forward(self, inputs: Any) -> torch.Tensor:
        inputs = {name: tensor.to(self.runtime.device) for name, tensor in inputs.items()}
        hidden = self.model(**inputs).last_hidden_state.float()  # pooled in float32
        return pool_tokens(hidden, inputs["attention_mask"], self.pooling)

    def _order(self, items: Sequence[Any]) -> np.ndarray:
        # Most tokens first, so each batch holds texts of (nearly) one token count: the least
        # padding. Ordered by characters instead, 15% of the batches' tokens were padding on
        # 20-40-word reports (docs/results.md, "Site compute"). Stable: equal counts keep order.
        counts = np.zeros(len(items), dtype=np.int64)
        for start in range(0, len(items), _COUNT_CHUNK):  # ids of one chunk held at a time
            texts = [  # other items fail in _load, with their index
                text if isinstance(text, str) else ""
                for text in items[start : start + _COUNT_CHUNK]
            ]
            encoded = self.tokenizer(
                texts,
                truncation=True,
                max_length=self.max_length,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            counts[start : start + len(texts)] = [len(ids) for ids in encoded["input_ids"]]
        return np.argsort(-counts, kind="stable")

    def _load(self, item: Any, index: int) -> str:
        if not isinstance(item, str):
            raise DataError(f"text item {index}: expected str, got {type(item).__name__}")
        return item

    def _probe_items(self) -> list[str]:
        return list(PROBE_TEXTS)

    def _settings(self) -> dict[str, Any]:
        return {
            "model_type": getattr(self.model.config, "model_type", None),
            "pooling": self.pooling,
            "max_length": self.max_length,
            "padding_side": self.tokenizer.padding_side,
            "position_ids_from_mask": self._positions_from_mask,
        }


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states [B, T, D] with attention mask [B, T] (1 = real token) to [B, D]."""
    keep = mask.bool()
    if pooling == "mean":
        summed = hidden.masked_fill(~keep[..., None], 0.0).sum(dim=1)
        return summed / keep.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
    positions = torch.arange(1, keep.shape[1] + 1, device=keep.device)
    if pooling == "cls":
        index = keep.long().argmax(dim=1)  # first real token
    elif pooling == "last-token":
        index = (keep.long() * positions).argmax(dim=1)  # last real token, either padding side
    else:
        raise ConfigError(
            f"unknown text pooling {pooling!r}; expected one of {', '.join(TEXT_POOLINGS)}"
        )
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def is_decoder_only(config: Any) -> bool:
    """True for decoder-only (causal LM) text models.

    Rule: not encoder-decoder, and either ``config.is_decoder`` is set, or an architecture name
    ends in "ForCausalLM" / "LMHeadModel", or the model type has a causal-LM class but no
    masked-LM class (BERT-like types have both and count as encoders).
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return True
    model_type = getattr(config, "model_type", "")
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def _effective_max_length(max_length: int, tokenizer: Any, config: Any, source: str) -> int:
    if not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(
            f"encoder {source!r}: max_length must be a positive integer, got {max_length!r}"
        )
    limits = [
        max_length,
        getattr(tokenizer, "model_max_length", None),
        getattr(config, "max_position_embeddings", None),
    ]
    return min(int(v) for v in limits if isinstance(v, int) and v > 0)


def _set_pad_token(tokenizer: Any, source: str) -> None:
    for name in ("eos_token", "unk_token", "bos_token"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            tokenizer.pad_token = token
            return
    raise ConfigError(
        f"encoder {source!r}: the tokenizer has no pad, eos, unk or bos token to pad batches with"
    )
