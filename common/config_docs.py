"""The meaning of every run-config, node-config and ``dp-*`` key; renders docs/configuration.md.

Regenerate the document with ``python -m common.config_docs > docs/configuration.md``
(tests/common/test_config_docs.py checks that it is current and that every key has a meaning).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, fields
from typing import Any

from common.config import (
    CLIENT_DP_MODES,
    HEAD_PRESET_NAMES,
    LOSSES,
    STRATEGIES,
    TEST_ROWS,
    RunSettings,
    SiteSettings,
)
from common.data.partition import PARTITION_SCHEMES
from common.data.registry import IMAGE_SIZE_DATASETS
from common.privacy import _KEYS as PRIVACY_KEYS
from common.privacy import ACCOUNTANTS, LEDGER_SCOPES, UPDATE_SPACES, PrivacySettings
from common.registries import sample_dp_losses


def _names(choices: Iterable[str]) -> str:
    """``a, b or c``: the valid values of a key, from the one place that defines them."""
    names = list(choices)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def _described(choices: Mapping[str, str]) -> str:
    """``a: what a does; b: what b does``: the valid values of a key with their meanings."""
    return "; ".join(f"{name}: {text}" for name, text in choices.items())


RUN_MEANINGS: dict[str, str] = {
    "num_server_rounds": "rounds of federated training",
    "strategy": f"aggregation, one of Flower's own strategies: {_names(STRATEGIES)}",
    "proximal_mu": "FedProx's mu: sites add mu/2 times the squared distance to the global head "
    "(strategy fedprox only)",
    "ntd_beta": "FedNTD's weight: sites add beta times the not-true distillation from the round's "
    "global head over the class-prompt logits (any strategy; needs a class-prompt objective, "
    ">= 3 classes, no DP-SGD; common/distillation.py); 0: off",
    "ntd_tau": "FedNTD's softmax temperature of that distillation",
    "trim_beta": "share of the values cut at each end before averaging (strategy fedtrimmedavg only)",
    "server_lr": "the server's learning rate eta (strategies fedadam and fedyogi only)",
    "server_momentum": "server momentum in [0, 1) (strategy fedavgm only)",
    "min_sites": "sites that must be connected and are trained / evaluated per round at least; "
    "with client-dp or secure-aggregation, exactly the sites trained per round",
    "fraction_train": "share of the connected sites sampled for training each round (0, 1]",
    "local_epochs": "epochs each site trains per round",
    "batch_size": "local training batch size",
    "lr": "local learning rate (AdamW)",
    "loss": f"training loss: {_names(LOSSES)} (sample-level DP needs auto or a per-example loss: "
    f"{_names(sample_dp_losses())}; docs/architecture.md describes each)",
    "head": f"head preset: {_names(HEAD_PRESET_NAMES)}",
    "start_steps": "aligned head, no DP, no secure aggregation: conjugate-gradient rounds that "
    "fit the pooled ridge least-squares map (frozen + lstsq) from per-site sums before round 1 "
    "(docs/architecture.md); 0: round 1 averages each site's own map",
    "start_ridge": "ridge of that start, relative to the image embeddings' mean variance",
    "layout": "two-tower (one head per modality) or concat (one head on the concatenation)",
    "dataset": "data of simulated sites (built-in name or manifest); the coordinator reads a "
    "sample of it for the task's classes. A real site's node-config data wins",
    "dataset_n": "examples of a built-in dataset (0: its default size; synthetic-radiology 2,000)",
    "dataset_image_size": "image side in pixels a generated built-in dataset is drawn at (0: its "
    "own; "
    + "; ".join(f"{k}: {d}, at least {m}" for k, (d, m) in IMAGE_SIZE_DATASETS.items())
    + ")",
    "task": "the built-in dataset's task, e.g. cardiomegaly or abnormal for iu-xray-reports",
    "partition": f"how simulated sites split the dataset: {_described(PARTITION_SCHEMES)}",
    "alpha": "Dirichlet concentration of partition dirichlet (smaller: more label skew)",
    "test_rows": f"rows a manifest marks split=test: {_described(TEST_ROWS)}",
    "image_encoder": "frozen image encoder: packaged name (mobilenetv2), Hugging Face id, local "
    "directory or none",
    "text_encoder": "frozen text encoder: packaged name (minilm), Hugging Face id, local "
    "directory or none",
    "encoder_image_size": "image side in pixels fed to the image encoder (0: the encoder's own)",
    "max_length": "text encoder's maximum tokens per text",
    "eval_every": "send federated evaluation messages every N rounds (0: only after the last "
    "round); sites also report held-out metrics in their train replies",
    "report_eval": "sites score the received head on their held-out split and report it with "
    "their train reply",
    "server_eval": "dataset (built-in name or manifest) the coordinator scores the global head "
    "on each round (empty: none)",
    "server_eval_n": "examples of a built-in server-eval dataset (0: its default size)",
    "run_dir": "the run directory: run.json, checkpoints, history.jsonl, final/ (relative: "
    "under $FEDEMBED_HOME)",
    "resume": "continue from the newest readable checkpoint in run-dir",
    "max_update_norm": "an update whose L2 distance from the global head exceeds this is rejected",
    "round_timeout": "seconds to wait for a round's replies before the missing sites are dropped",
    "first_round_timeout": "timeout of a round that includes a site for the first time (it also "
    "embeds its data); 0: round-timeout",
    "reply_poll_interval": "seconds between the coordinator's checks for replies",
    "max_empty_rounds": "consecutive rounds that may aggregate no site's update before the run "
    "fails (0: the first such round fails it)",
    "seed": "seeds the head's initialisation, simulated data and local shuffling",
    "client_dp": f"client-level DP of the global head: {_names(CLIENT_DP_MODES)} (client-side: sites "
    "clip; server-side: the coordinator clips)",
    "client_dp_noise_multiplier": "client-level DP noise multiplier sigma (noise std "
    "sigma * C / min-sites on the mean)",
    "client_dp_clipping_norm": "client-level DP clipping norm C of each site's update",
    "client_dp_delta": "client-level DP delta of the reported (epsilon, delta)",
    "secure_aggregation": "SecAgg+: the coordinator learns only the sum of the sites' updates",
    "secagg_num_shares": "shares of each site's secrets: 0 = every site of the round, else an "
    "odd number from 3 to min-sites",
    "secagg_reconstruction_threshold": "shares that rebuild a secret (0: a majority, at least "
    "2); higher: more privacy, lower: more dropouts tolerated",
    "secagg_clipping_range": "each value of a head update must lie in [-r, r]",
    "secagg_quantization_range": "quantization levels; min-sites times this must stay below 2**32",
    "secagg_max_weight": "a site weighs min(its training examples, this value); 1 each under "
    "client-dp. Keep it close to the largest site: precision falls as max-weight / examples grows",
}

SITE_MEANINGS: dict[str, str] = {
    "data": "the site's manifest path (.csv / .jsonl) or a built-in dataset name "
    "(empty: the run's dataset)",
    "n": "examples: a seeded subset of the site's manifest, or of a built-in dataset (0: the whole "
    "manifest; the run's dataset-n for a built-in)",
    "seed": "seed of the site's generated data and split (-1: the run's seed)",
    "site": "acquisition profile of synthetic-radiology (-1: profile 0)",
    "task": "the built-in dataset's task (empty: the run's task)",
    "partition": "partition scheme of a simulated site (empty: the run's partition)",
    "partition_id": "this simulated site's partition (set by Flower's simulation; -1: none)",
    "num_partitions": "number of simulated sites sharing the dataset (set by Flower's simulation)",
    "alpha": "Dirichlet concentration for this site (-1: the run's alpha)",
    "cache_dir": "embedding cache (relative: under $FEDEMBED_HOME; default cache)",
    "state_dir": "the site's bundle, audit log and privacy ledger (relative: under "
    "$FEDEMBED_HOME; default sites/<site-name>)",
    "site_name": "the name the site reports with every reply (default site-<partition-id> or site)",
    "worker": "keep torch and the embeddings loaded in a long-lived site worker: auto (on unless "
    "under Flower's simulation engine), on or off",
    "on_bad_row": "unusable manifest rows: raise (stop, naming file, line and field) or skip "
    "(leave them out and report them)",
    "test_fraction": "share of the site's rows held out, never trained on (0, 1)",
    "encoder_precision": "how this site's encoders compute: auto (bf16 where the hardware has it "
    "and a fidelity probe keeps every probe embedding within cosine 0.999 of fp32, else fp32; "
    "MobileNetV2 on a CPU: fp32 on ONNX Runtime, faster than torch's bf16), fp32 or bf16; part of "
    "the embedding cache key",
    "encoder_device": "where this site's encoders run: auto (CUDA when present), cpu or cuda",
}

PRIVACY_MEANINGS: dict[str, str] = {
    "noise_multiplier": "DP-SGD noise multiplier sigma (unset or 0: off); give this or "
    "dp-target-epsilon",
    "target_epsilon": "derive sigma so that the run's planned rounds cost at most this epsilon "
    "(unset or 0: off); give this or dp-noise-multiplier",
    "delta": "delta of every epsilon (target, budget, reported)",
    "max_grad_norm": "per-example gradient clipping norm C",
    "max_epsilon": "the site's budget: a round that would take its ledger above it is declined "
    "(best set in the node-config)",
    "poisson": "Poisson sampling of batches (false: shuffled fixed-size batches, epsilon then "
    "only approximate)",
    "ledger_scope": f"node-config only: {_names(LEDGER_SCOPES)} (site: count everything this state dir "
    "spent; run: each federation run starts a fresh budget)",
    "accountant": f"the accountant that calibrates sigma for dp-target-epsilon, decides the budget "
    f"and gives the reported dp-epsilon: {_names(ACCOUNTANTS)} (pld: dp-accounting's privacy loss "
    "distributions, a tighter valid bound; RDP's where PLD is not computed, said in the record). "
    "The other's total is reported too (dp-epsilon-rdp, dp-epsilon-pld)",
    "update_space": f"what DP-SGD moves in a head with affine paths: {_names(UPDATE_SPACES)} "
    "(prompts: only along the span of the class prompts' frozen embeddings, public task metadata, "
    "when the data has prompts; full: every coordinate)",
    "lr": "DP-SGD's learning rate (AdamW); the run's lr is the non-private training's",
}

_SECTIONS: tuple[tuple[str, str, type, dict[str, str]], ...] = (
    (
        "Run-config (the consortium's settings)",
        "`[tool.flwr.app.config]` in `pyproject.toml`, overridden with `flwr run --run-config` or "
        "`fedembed simulate / deploy-local --run-config`. `common/config.py` `RunSettings`.",
        RunSettings,
        RUN_MEANINGS,
    ),
    (
        "Node-config (a site's own settings)",
        "`flower-supernode --node-config`. Relative paths resolve under `$FEDEMBED_HOME` "
        "(default `~/.fedembed`). `common/config.py` `SiteSettings`.",
        SiteSettings,
        SITE_MEANINGS,
    ),
    (
        "Sample-level DP (`dp-*`, run-config or node-config)",
        "A site's node-config values win over the run-config's; `dp-ledger-scope` is refused in "
        'the run-config. With `loss = "auto"` (it then trains the best per-example objective the data '
        "supports) or a per-example loss (`proxy`, `prompts`, `infonce-public`, "
        "`infonce-public+prompts`); any other loss is refused at run start. "
        "`common/privacy.py` `PrivacySettings`.",
        PrivacySettings,
        PRIVACY_MEANINGS,
    ),
)


def _key(cls: type, name: str) -> str:
    if cls is PrivacySettings:
        return {v: k for k, v in PRIVACY_KEYS.items()}[name]
    return name.replace("_", "-")


def _default(field: Field[Any]) -> str:
    value = field.default
    if value is MISSING:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def render() -> str:
    """docs/configuration.md: one table per settings class, key, default and meaning."""
    lines = [
        "# Configuration",
        "",
        "Generated by `python -m common.config_docs > docs/configuration.md` from the settings "
        "classes; do not edit by hand.",
    ]
    for title, intro, cls, meanings in _SECTIONS:
        lines += ["", f"## {title}", "", intro, "", "| key | default | meaning |"]
        lines.append("| --- | --- | --- |")
        for field in fields(cls):
            key, meaning = _key(cls, field.name), meanings[field.name]
            lines.append(f"| `{key}` | `{_default(field)}` | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
