"""Federation settings shared by the ServerApp and ClientApp: run-config (consortium) and node-config (site)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from common import registries
from common.data.manifest import ON_ERROR_CHOICES
from common.data.partition import PARTITION_SCHEMES
from common.data.registry import IMAGE_SIZE_DATASETS
from common.errors import ConfigError

HEAD_INITS = ("keep", "closed-form", "lstsq", "cca")
"""Where training starts a head's linear path (``TrainConfig.init``)."""


def check_ntd(beta: float, tau: float, *, source: str) -> None:
    """FedNTD's weight ``ntd-beta`` (finite, >= 0; 0 is off) and temperature ``ntd-tau`` (> 0)."""
    if not (math.isfinite(beta) and beta >= 0):
        raise ConfigError(f"{source}: ntd-beta must be a finite number >= 0, got {beta}")
    if not (math.isfinite(tau) and tau > 0):
        raise ConfigError(f"{source}: ntd-tau must be a finite number > 0, got {tau}")


@dataclass
class TrainConfig:
    """How a head is trained locally (one round of federated training uses the same settings).

    ``proximal_mu`` > 0 adds FedProx's term mu/2 * ||w - w_global||^2 against the round's global head.
    ``ntd_beta`` > 0 adds FedNTD's not-true distillation from the round's global head over the
    class-prompt logits, at temperature ``ntd_tau`` (``common.distillation``).
    ``init``: what a head with a linear path (the ``aligned`` preset) starts from: "keep" (as it
    is), "closed-form" (the tuned closed-form map: ridge least squares or CCA, whichever scores
    better on the validation rows; least squares without them), "lstsq" or "cca".
    ``validation_fraction`` > 0 holds that share of the training rows out as validation: the head
    is scored on it at the start and after every epoch, and the best-scoring state is kept, the
    start included; ``patience`` epochs
    without a new best stop training (0: never stop early). With validation rows, an ``auto``
    loss also trains the objectives ``registries.AUTO_ALTERNATIVES`` lists for its choice, from
    the same start, and keeps the best state of all. ``objective``: the objective an ``auto``
    loss trains, instead of choosing it from the data ("": choose).
    """

    loss: str = registries.AUTO_LOSS
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    proximal_mu: float = 0.0
    ntd_beta: float = 0.0
    ntd_tau: float = 1.0
    seed: int = 0
    init: str = "closed-form"
    validation_fraction: float = 0.2
    patience: int = 5
    objective: str = ""

    def __post_init__(self) -> None:
        if self.objective and self.objective not in registries.LOSSES:
            raise ConfigError(
                f"training config: objective must be a registered loss, got {self.objective!r}"
            )
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.proximal_mu < 0:
            raise ConfigError(f"invalid training config: {self}")
        check_ntd(self.ntd_beta, self.ntd_tau, source="training config")
        if self.init not in HEAD_INITS:
            raise ConfigError(
                f"training config: init must be one of {', '.join(HEAD_INITS)}, got {self.init!r}"
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(
                f"training config: validation-fraction must be in [0, 1), "
                f"got {self.validation_fraction}"
            )
        if self.patience < 0:
            raise ConfigError(f"training config: patience must be >= 0, got {self.patience}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines a site's embedded data and its held-out split.

    ``dataset`` is a built-in name or a manifest path; encoders are packaged names, Hugging Face ids
    or local directories ("" or "none" disables a modality).
    """

    dataset: str = "synthetic-radiology"
    n: int | None = None
    seed: int = 0
    site: int = 0
    task: str | None = None
    image_size: int | None = None
    image_encoder: str = "mobilenetv2"
    text_encoder: str = "minilm"
    encoder_image_size: int | None = None
    # How the encoders run (common.encoders.runtime): precision auto/fp32/bf16, device auto/cpu/cuda.
    encoder_precision: str = "auto"
    encoder_device: str = "auto"
    max_length: int = 128
    test_fraction: float = 0.2
    split_seed: int = 0
    # Rows a manifest marks ``split = test``: the held-out split (holdout) or left out (exclude).
    test_rows: str = "holdout"
    partition: str = "none"
    num_partitions: int = 1
    partition_id: int = 0
    alpha: float = 0.5
    # Bad manifest rows / unreadable images: "raise" (stop, naming file, line, field) or "skip"
    # (leave them out and report them; see common.embedding.embed_dataset).
    on_bad_row: str = "raise"

    def __post_init__(self) -> None:
        _check_on_bad_row(self.on_bad_row, source="data spec")
        _check_encoder_runtime(self.encoder_precision, self.encoder_device, source="data spec")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test-fraction must be in [0, 1), got {self.test_fraction}")
        _check_test_rows(self.test_rows, source="data spec")
        if self.partition != "none" and self.partition not in PARTITION_SCHEMES:
            raise ConfigError(
                f"unknown partition {self.partition!r}; choose none or {sorted(PARTITION_SCHEMES)}"
            )
        if self.num_partitions < 1 or not 0 <= self.partition_id < self.num_partitions:
            raise ConfigError(
                f"partition-id {self.partition_id} is outside 0..{self.num_partitions - 1}"
            )

    @property
    def partitioned(self) -> bool:
        return self.partition != "none" and self.num_partitions > 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataSpec:
        return _coerce(cls, values, source="data spec")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_encoder_runtime(precision: str, device: str, *, source: str) -> None:
    if precision not in registries.ENCODER_PRECISIONS:
        raise ConfigError(
            f"{source}: encoder-precision must be one of "
            f"{', '.join(registries.ENCODER_PRECISIONS)}, not {precision!r}"
        )
    if device not in registries.ENCODER_DEVICES:
        raise ConfigError(
            f"{source}: encoder-device must be one of {', '.join(registries.ENCODER_DEVICES)}, "
            f"not {device!r}"
        )


def _check_on_bad_row(value: str, *, source: str) -> None:
    if value not in ON_ERROR_CHOICES:
        raise ConfigError(
            f"{source}: on-bad-row must be {' or '.join(ON_ERROR_CHOICES)}, not {value!r}"
        )


TEST_ROWS: dict[str, str] = {
    "holdout": "rows marked split=test are the site's held-out split; every other row trains",
    "exclude": "rows marked split=test are left out of the site's data (a comparison scores them "
    "itself); the rest is split by test-fraction",
}
"""What a site does with the rows its manifest marks ``split = test`` (none marked: a random split)."""


def _check_test_rows(value: str, *, source: str) -> None:
    if value not in TEST_ROWS:
        raise ConfigError(f"{source}: test-rows must be {' or '.join(TEST_ROWS)}, not {value!r}")


HOME_ENV = "FEDEMBED_HOME"
PRIVACY_PREFIX = "dp-"


def fedembed_home() -> Path:
    """Where fedembed keeps site state, caches and run directories by default (``$FEDEMBED_HOME``).

    Flower runs the ServerApp and ClientApps in processes whose working directory is not the
    user's, so relative paths in run-config and node-config are resolved under this directory.
    """
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".fedembed").expanduser().resolve()


def resolve_path(value: str, default: str) -> Path:
    """``value`` (or ``default`` when empty) as an absolute path; relative ones live under the home."""
    path = Path(value or default).expanduser()
    return path if path.is_absolute() else fedembed_home() / path


# Names a run-config may choose (common/registries.py says what each needs).
LOSSES: dict[str, str] = {name: info.description for name, info in registries.LOSSES.items()}
HEAD_PRESET_NAMES = tuple(registries.HEADS)
STRATEGIES = tuple(registries.STRATEGIES)
CLIENT_DP_MODES = ("off", "client-side", "server-side")
# Strategies that aggregate with FedAvg's mean, the only aggregation Flower's DP accountant covers.
CLIENT_DP_STRATEGIES = tuple(name for name, info in registries.STRATEGIES.items() if info.mean)

T = TypeVar("T")


def _coerce(cls: type[T], values: Mapping[str, Any], *, source: str) -> T:
    """Build dataclass ``cls`` from kebab- or snake-case keys, converting simple types."""
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        if raw_key.startswith(PRIVACY_PREFIX):
            continue  # differential-privacy keys belong to common.privacy.PrivacySettings
        key = raw_key.replace("-", "_")
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key '{raw_key}'; valid keys: {', '.join(sorted(k.replace('_', '-') for k in known))}"
            )
        default = known[key].default
        kwargs[key] = _convert(value, default, key=raw_key, source=source)
    return cls(**kwargs)


def _convert(value: Any, default: Any, *, key: str, source: str) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(value)
                return value.lower() in {"true", "1", "yes"}
            return bool(value)
        if isinstance(default, int) and not isinstance(default, bool):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{source}: '{key}' = {value!r} is not a valid {type(default).__name__}"
        ) from exc
    return value


@dataclass(frozen=True)
class RunSettings:
    """The consortium's run-config (``[tool.flwr.app.config]``, overridable with ``--run-config``).

    Encoders, head and loss must be identical at every site (they fix the head's shapes); data
    defaults here apply to simulated sites, while a real site's ``--node-config`` names its own data.
    """

    num_server_rounds: int = 3
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    # FedNTD (common/distillation.py): not-true distillation from the round's global head.
    ntd_beta: float = 0.0
    ntd_tau: float = 1.0
    trim_beta: float = 0.2
    server_lr: float = 0.05
    server_momentum: float = 0.5  # FedAvgM only (its server learning rate stays 1)
    min_sites: int = 2
    fraction_train: float = 1.0
    local_epochs: int = 5
    batch_size: int = 128
    lr: float = 0.002
    loss: str = registries.AUTO_LOSS
    head: str = "aligned"
    # The aligned head's federated closed-form start (server/closed_form.py): conjugate-gradient
    # rounds on the pooled ridge least-squares equations before round 1 (0: each site's own map).
    start_steps: int = 20
    start_ridge: float = 1.0
    layout: str = "two-tower"
    dataset: str = "synthetic-radiology"
    dataset_n: int = 2000
    # A generated built-in dataset's image side (synthetic-radiology 64, digits 8); 0: its own.
    dataset_image_size: int = 0
    task: str = ""
    partition: str = "iid"
    alpha: float = 0.5
    test_rows: str = "holdout"  # common.config.TEST_ROWS
    image_encoder: str = "mobilenetv2"
    text_encoder: str = "minilm"
    encoder_image_size: int = 128
    max_length: int = 128
    eval_every: int = 0
    report_eval: bool = True
    server_eval: str = ""
    server_eval_n: int = 400
    run_dir: str = "runs/federated"  # relative: under $FEDEMBED_HOME
    resume: bool = False
    max_update_norm: float = 100.0
    round_timeout: float = 600.0
    first_round_timeout: float = 3600.0  # the first round also embeds each site's data; 0: as above
    reply_poll_interval: float = 0.2
    # Consecutive rounds that may aggregate no site's update before the run fails (0: the first).
    max_empty_rounds: int = 0
    seed: int = 0
    # Client-level DP of the global head (server/privacy.py), valid for any loss; "off" by default.
    client_dp: str = "off"
    client_dp_noise_multiplier: float = 1.0
    client_dp_clipping_norm: float = 1.0
    client_dp_delta: float = 1e-5
    # Secure aggregation (SecAgg+, server/secagg.py): the server learns only the sum of the sites' heads.
    secure_aggregation: bool = False
    secagg_num_shares: int = 0  # 0: every site of the round holds a share of every key
    secagg_reconstruction_threshold: int = 0  # 0: a majority of the shares
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    secagg_max_weight: float = 10000.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"run-config: loss '{self.loss}' is not one of {', '.join(LOSSES)}")
        if self.start_steps < 0:
            raise ConfigError("run-config: start-steps must be >= 0")
        self._check_dataset_image_size()
        check_ntd(self.ntd_beta, self.ntd_tau, source="run-config")
        if self.ntd_beta > 0 and (
            self.layout != "two-tower"
            or not (registries.LOSSES[self.loss].auto or registries.LOSSES[self.loss].prompts)
        ):
            raise ConfigError(
                f"run-config: ntd-beta > 0 distils class-prompt logits: it needs the two-tower "
                f"layout and loss auto or one with class prompts, got layout {self.layout!r}, "
                f"loss {self.loss!r}"
            )
        if not self.start_ridge > 0:
            raise ConfigError("run-config: start-ridge must be > 0")
        if self.head not in HEAD_PRESET_NAMES:
            raise ConfigError(
                f"run-config: head '{self.head}' is not one of {', '.join(HEAD_PRESET_NAMES)}"
            )
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"run-config: strategy '{self.strategy}' is not one of {', '.join(STRATEGIES)}"
            )
        if self.num_server_rounds < 1 or self.min_sites < 1:
            raise ConfigError("run-config: num-server-rounds and min-sites must be >= 1")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(
                f"run-config: server-momentum must be in [0, 1), got {self.server_momentum}"
            )
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError("run-config: fraction-train must be in (0, 1]")
        if self.reply_poll_interval <= 0 or self.round_timeout <= 0:
            raise ConfigError("run-config: reply-poll-interval and round-timeout must be > 0")
        if self.first_round_timeout < 0:
            raise ConfigError("run-config: first-round-timeout must be >= 0 (0: round-timeout)")
        if self.max_empty_rounds < 0:
            raise ConfigError("run-config: max-empty-rounds must be >= 0")
        _check_test_rows(self.test_rows, source="run-config")
        self._check_client_dp()
        self._check_secure_aggregation()

    def _check_dataset_image_size(self) -> None:
        if not self.dataset_image_size:
            return
        if self.dataset not in IMAGE_SIZE_DATASETS:
            raise ConfigError(
                f"run-config: dataset-image-size applies to {', '.join(IMAGE_SIZE_DATASETS)} "
                f"only, got {self.dataset_image_size} for dataset {self.dataset!r}"
            )
        smallest = IMAGE_SIZE_DATASETS[self.dataset][1]
        if self.dataset_image_size < smallest:
            raise ConfigError(
                f"run-config: dataset-image-size must be 0 (the dataset's own) or >= {smallest} "
                f"for {self.dataset}, got {self.dataset_image_size}"
            )

    def _check_client_dp(self) -> None:
        if self.client_dp not in CLIENT_DP_MODES:
            raise ConfigError(
                f"run-config: client-dp '{self.client_dp}' is not one of {', '.join(CLIENT_DP_MODES)}"
            )
        sigma, clip, delta = (
            self.client_dp_noise_multiplier,
            self.client_dp_clipping_norm,
            self.client_dp_delta,
        )
        if not (math.isfinite(sigma) and sigma >= 0.0):
            raise ConfigError(f"run-config: client-dp-noise-multiplier must be >= 0, got {sigma}")
        if not (math.isfinite(clip) and clip > 0.0):
            raise ConfigError(f"run-config: client-dp-clipping-norm must be > 0, got {clip}")
        if not 0.0 < delta < 1.0:
            raise ConfigError(f"run-config: client-dp-delta must be in (0, 1), got {delta}")
        if self.client_dp == "off":
            return
        if sigma == 0.0:
            raise ConfigError(
                "run-config: client-dp-noise-multiplier must be > 0 when client-dp is on "
                "(without noise there is no privacy)"
            )
        if self.strategy not in CLIENT_DP_STRATEGIES:
            raise ConfigError(
                f"run-config: client-dp needs strategy {' or '.join(CLIENT_DP_STRATEGIES)} "
                f"(the guarantee covers FedAvg's mean of clipped updates), not '{self.strategy}'"
            )
        if self.fraction_train != 1.0:
            raise ConfigError(
                "run-config: client-dp samples exactly min-sites sites per round; "
                "leave fraction-train = 1.0"
            )

    @property
    def secagg_shares(self) -> int:
        """Shares of each site's keys in a SecAgg+ round (a round trains exactly ``min-sites`` sites)."""
        return self.secagg_num_shares or self.min_sites

    @property
    def secagg_threshold(self) -> int:
        """Shares needed to rebuild a key: the configured value, else a majority (at least 2)."""
        return self.secagg_reconstruction_threshold or max(2, self.secagg_shares // 2 + 1)

    def _check_secure_aggregation(self) -> None:
        if not self.secure_aggregation:
            return
        sites, shares, threshold = self.min_sites, self.secagg_shares, self.secagg_threshold
        if sites < 2:
            raise ConfigError(
                "run-config: secure-aggregation needs min-sites >= 2 (SecAgg+ sums sites)"
            )
        if self.strategy not in CLIENT_DP_STRATEGIES:
            raise ConfigError(
                f"run-config: secure-aggregation computes only the weighted mean of the sites' heads: "
                f"strategy must be {' or '.join(CLIENT_DP_STRATEGIES)}, not '{self.strategy}'"
            )
        if self.client_dp == "server-side":
            raise ConfigError(
                "run-config: client-dp = server-side cannot be combined with secure-aggregation "
                "(the server never sees an update to clip); use client-dp = client-side"
            )
        if self.resume:
            raise ConfigError("run-config: resume is not supported with secure-aggregation")
        if self.secagg_num_shares and not 3 <= shares <= sites:
            raise ConfigError(
                f"run-config: secagg-num-shares = {shares} must be 0 (every site of the round) "
                f"or between 3 and min-sites = {sites} (each round trains exactly min-sites sites)"
            )
        if shares < sites and shares % 2 == 0:
            raise ConfigError(
                f"run-config: secagg-num-shares = {shares} must be odd when below min-sites = {sites} "
                "(each site shares its keys with the same number of neighbours on either side)"
            )
        if self.secagg_reconstruction_threshold and not 2 <= threshold <= shares:
            raise ConfigError(
                f"run-config: secagg-reconstruction-threshold = {threshold} must be between 2 and "
                f"the {shares} shares of each key (secagg-num-shares, else min-sites = {sites}); "
                "with more, no key could ever be rebuilt and no round could finish"
            )
        if not (math.isfinite(self.secagg_clipping_range) and self.secagg_clipping_range > 0):
            raise ConfigError("run-config: secagg-clipping-range must be > 0")
        if not 0 < self.secagg_quantization_range * sites < 2**32:
            raise ConfigError(
                "run-config: secagg-quantization-range must be > 0 and "
                "min-sites x secagg-quantization-range < 2**32 (the masks' modulus)"
            )
        if not self.secagg_max_weight >= 1:
            raise ConfigError("run-config: secagg-max-weight must be >= 1")

    @classmethod
    def from_run_config(cls, values: Mapping[str, Any]) -> RunSettings:
        return _coerce(cls, values, source="run-config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def run_path(self) -> Path:
        return resolve_path(self.run_dir, "runs/federated")

    def data_spec(
        self, dataset: str | None = None, *, n: int | None = None, seed: int | None = None
    ) -> DataSpec:
        """``dataset`` (default: the run's) read whole with the run's encoders, where a site's own
        split does not apply (the coordinator's validation set, ``fedembed evaluate``'s default):
        ``n`` rows of a built-in dataset (default ``dataset-n``; a manifest is read whole), the
        run's ``task`` for a built-in dataset or the run's own, its ``dataset-image-size`` for the
        run's own dataset (the same generator setting the sites use), ``seed`` (default the
        run's)."""
        from common.data.registry import BUILTIN_DATASETS

        dataset = dataset or self.dataset
        builtin, own = dataset in BUILTIN_DATASETS, dataset == self.dataset
        return DataSpec(
            dataset=dataset,
            n=((self.dataset_n if n is None else n) or None) if builtin else None,
            image_size=(self.dataset_image_size or None) if own else None,
            seed=self.seed if seed is None else seed,
            task=(self.task or None) if builtin or own else None,
            image_encoder=self.image_encoder,
            text_encoder=self.text_encoder,
            encoder_image_size=self.encoder_image_size or None,
            max_length=self.max_length,
        )

    def train_config(
        self,
        *,
        proximal_mu: float = 0.0,
        seed: int | None = None,
        first_round: bool = False,
        start_only: bool = False,
        started: bool = False,
        objective: str = "",
    ) -> TrainConfig:
        """Local training settings for one round: every local epoch trains (no validation
        hold-out). A head with a linear path starts round 1 (``first_round``) at the site's own
        tuned least-squares map, fitted on its training rows; with ``start_only`` (the client
        sets it for such a head in round 1 without DP-SGD) that is all round 1 does: the site
        returns its map untrained, so the server's mean of the sites' maps is round 1's global
        head, a checkpoint the run can end at when no trained round beats it on validation.
        ``started``: the coordinator already set the head to the federation's closed-form start
        (server/closed_form.py), so round 1 keeps it as it arrives (and, with ``start_only``,
        returns it untrained). Later rounds keep the global head as it arrives and train it.
        ``objective``: what an ``auto`` loss trains ("": chosen from the data)."""
        return TrainConfig(
            loss=self.loss,
            epochs=0 if first_round and start_only else self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            proximal_mu=proximal_mu,
            ntd_beta=self.ntd_beta,
            ntd_tau=self.ntd_tau,
            seed=self.seed if seed is None else seed,
            init="lstsq" if first_round and not started else "keep",
            validation_fraction=0.0,
            objective=objective,
        )


@dataclass(frozen=True)
class SiteSettings:
    """A site's own ``--node-config``: where its data, cache and state live, and who it is.

    ``data`` is a manifest path (or a built-in name for demos). Simulated sites get
    ``partition-id`` / ``num-partitions`` from Flower and take that share of the run's dataset.
    """

    data: str = ""
    n: int = 0
    seed: int = -1
    site: int = -1
    task: str = ""
    partition: str = ""
    partition_id: int = -1
    num_partitions: int = 0
    alpha: float = -1.0
    cache_dir: str = ""
    state_dir: str = ""
    site_name: str = ""
    worker: str = "auto"
    on_bad_row: str = "raise"  # "skip": leave unusable manifest rows out and report them
    # Share of the site's rows held out (never trained on; its evaluation reports score them).
    test_fraction: float = 0.2
    # How this site's encoders run (its own hardware): see common.encoders.runtime.
    encoder_precision: str = "auto"
    encoder_device: str = "auto"

    def __post_init__(self) -> None:
        _check_on_bad_row(self.on_bad_row, source="node-config")
        _check_encoder_runtime(self.encoder_precision, self.encoder_device, source="node-config")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(
                f"node-config: test-fraction must be in (0, 1), got {self.test_fraction}"
            )
        if self.worker not in ("auto", "on", "off"):
            raise ConfigError(f"node-config: worker must be auto, on or off, not '{self.worker}'")

    @classmethod
    def from_node_config(cls, values: Mapping[str, Any]) -> SiteSettings:
        return _coerce(cls, values, source="node-config")

    @property
    def cache_path(self) -> Path:
        """The embedding cache (default ``$FEDEMBED_HOME/cache``, shareable between simulated sites)."""
        return resolve_path(self.cache_dir, "cache")

    @property
    def state_path(self) -> Path:
        """The site's own state: bundle, audit log, privacy ledger (default ``$FEDEMBED_HOME/sites/<name>``)."""
        return resolve_path(self.state_dir, f"sites/{self.name}")

    @property
    def name(self) -> str:
        if self.site_name:
            return self.site_name
        if self.partition_id >= 0:
            return f"site-{self.partition_id}"
        return "site"

    def data_spec(self, run: RunSettings) -> DataSpec:
        """The site's DataSpec: the node's own settings win over the run's defaults."""
        dataset = self.data or run.dataset
        partitioned = self.num_partitions > 1 and self.partition_id >= 0
        partition = (self.partition or run.partition) if partitioned else "none"
        builtin_synthetic = dataset == "synthetic-radiology"
        site = self.site if self.site >= 0 else 0
        return DataSpec(
            dataset=dataset,
            n=(self.n or (run.dataset_n if not _is_manifest(dataset) else 0)) or None,
            image_size=(run.dataset_image_size or None) if dataset == run.dataset else None,
            seed=self.seed if self.seed >= 0 else run.seed,
            site=site if builtin_synthetic else 0,
            task=(self.task or run.task) or None,
            image_encoder=run.image_encoder,
            text_encoder=run.text_encoder,
            encoder_image_size=run.encoder_image_size or None,
            encoder_precision=self.encoder_precision,
            encoder_device=self.encoder_device,
            max_length=run.max_length,
            partition=partition,
            num_partitions=self.num_partitions if partitioned else 1,
            partition_id=self.partition_id if partitioned else 0,
            alpha=self.alpha if self.alpha > 0 else run.alpha,
            on_bad_row=self.on_bad_row,
            test_fraction=self.test_fraction,
            test_rows=run.test_rows,
        )


def _is_manifest(dataset: str) -> bool:
    return dataset.lower().endswith((".csv", ".jsonl"))
