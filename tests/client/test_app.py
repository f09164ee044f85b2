"""The site's ClientApp called in-process: replies carry only the head's arrays and scalar metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client import site as site_module
from client.app import app
from client.audit import audit_path, payload_digest, verify_audit_log
from client.privacy import ledger_path
from common.config import RunSettings, SiteSettings
from common.flower import arrays_from_record, record_from_arrays
from tests.client_site import in_process_node_config, load_client
from tests.flower_messages import message_metadata
from tests.tiny_config import tiny_run_config


def _run_config(tiny: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    config = {k.replace("_", "-"): v for k, v in RunSettings().to_dict().items()}
    config.update(tiny_run_config(tiny, **{"dataset-n": 80}))
    config.update(overrides)
    return config


def _message(content: RecordDict, message_type: str) -> Message:
    metadata = message_metadata(dst_node_id=0, message_type=message_type)
    return Message(metadata=metadata, content=content)  # type: ignore[call-overload]


@pytest.fixture()
def setup(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> tuple[Context, dict[str, np.ndarray]]:
    context, _, initial = load_client(
        _run_config(tiny_model_dirs), in_process_node_config(tmp_path)
    )
    return context, initial


def _train_message(arrays: dict[str, np.ndarray], server_round: int = 1) -> Message:
    content = RecordDict(
        {
            "arrays": record_from_arrays(arrays),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    return _message(content, "train")


def test_train_reply_holds_only_the_head_arrays_and_scalar_metrics(
    setup: tuple[Context, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    context, initial = setup
    reply = app(_train_message(initial), context)
    assert not reply.has_error(), reply.error if reply.has_error() else None
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "site"}
    # beside the head and scalars, only the site's configured name (node ids change on restart)
    site_name = SiteSettings.from_node_config(dict(context.node_config)).name
    assert dict(content.config_records["site"]) == {"name": site_name}
    sent = arrays_from_record(content.array_records["arrays"])
    assert list(sent) == list(initial)  # exactly the head's state-dict keys, in order
    for name, value in sent.items():
        assert value.shape == initial[name].shape and value.dtype == np.float32
    assert any(not np.array_equal(sent[k], initial[k]) for k in sent)  # it trained
    metrics = dict(content.metric_records["metrics"])
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["num-examples"] > 0 and np.isfinite(metrics["train-loss"])
    assert {"eval-R@5", "eval-zs_auroc"} <= set(metrics)
    total_sent = sum(v.nbytes for v in sent.values())
    # the audit log recorded exactly this payload
    entries = [json.loads(line) for line in audit_path(tmp_path / "state").read_text().splitlines()]
    assert len(entries) == 1
    assert entries[0]["sha256"] == payload_digest(sent)
    assert entries[0]["site"] == site_name  # the name that was sent is in the audit line
    assert entries[0]["total_bytes"] == total_sent
    summary = verify_audit_log(
        audit_path(tmp_path / "state"), allowed_arrays={k: v.shape for k, v in initial.items()}
    )
    assert summary.ok and summary.entries == 1


def test_evaluate_reply_holds_only_metrics(setup: tuple[Context, dict[str, np.ndarray]]) -> None:
    context, initial = setup
    reply = app(_message(RecordDict({"arrays": record_from_arrays(initial)}), "evaluate"), context)
    assert set(reply.content.keys()) == {"metrics"}
    assert reply.content.metric_records["metrics"]["num-examples"] > 0


def test_later_rounds_read_the_bundle_without_any_encoder(
    setup: tuple[Context, dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    context, initial = setup
    site_module._LOADED.clear()  # as in a fresh per-message ClientApp process

    def no_encoder(*args: object, **kwargs: object) -> None:
        raise AssertionError("an encoder was loaded although the site bundle exists")

    monkeypatch.setattr("common.pipeline.get_encoder", no_encoder)
    reply = app(_train_message(initial, server_round=2), context)
    assert not reply.has_error(), reply.error if reply.has_error() else None


def test_a_head_with_other_shapes_is_refused_by_the_site(
    setup: tuple[Context, dict[str, np.ndarray]],
) -> None:
    context, initial = setup
    wrong = dict(initial)
    name = next(iter(wrong))
    wrong[name] = np.zeros((3, 3), dtype=np.float32)
    reply = app(_train_message(wrong), context)  # an error reply that names the site, no crash
    assert reply.has_error()
    assert reply.error.reason.startswith("[site site-0] ConfigError")
    assert f"site-0: '{name}' has shape" in reply.error.reason


def test_the_prompt_loss_trains_from_the_bundle_and_sends_only_the_head(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    """A later round in a fresh process reads the class prompts from the site bundle, not an encoder."""
    run_config = _run_config(tiny_model_dirs, loss="infonce+supcon+prompts")
    # load_client embeds the site and writes the bundle
    context, site, initial = load_client(run_config, in_process_node_config(tmp_path, partition=1))
    assert site.train.prompts is not None
    site_module._LOADED.clear()  # as in a fresh per-message ClientApp process
    reply = app(_train_message(initial, server_round=2), context)
    assert not reply.has_error(), reply.error if reply.has_error() else None
    sent = arrays_from_record(reply.content.array_records["arrays"])
    assert list(sent) == list(initial)  # the prompt term adds no state: still the head alone
    assert any(not np.array_equal(sent[k], initial[k]) for k in sent)
    assert np.isfinite(reply.content.metric_records["metrics"]["train-loss"])


def test_fedntd_distils_from_the_received_head_and_sends_nothing_more(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    """With ntd-beta the round trains differently, yet the reply has the same keys, shapes and
    metric names as without it; with sample-level DP the site refuses it in one line."""
    replies = {}
    for beta in (0.0, 1.0):
        run_config = _run_config(tiny_model_dirs, loss="infonce+prompts", **{"ntd-beta": beta})
        context, _, initial = load_client(
            run_config, in_process_node_config(tmp_path / str(beta), partition=1)
        )
        reply = app(_train_message(initial, server_round=2), context)
        assert not reply.has_error(), reply.error if reply.has_error() else None
        replies[beta] = reply.content
    plain, ntd = (arrays_from_record(replies[b].array_records["arrays"]) for b in (0.0, 1.0))
    assert list(ntd) == list(plain) == list(initial)
    assert all(ntd[k].shape == plain[k].shape for k in plain)
    assert any(not np.array_equal(ntd[k], plain[k]) for k in plain)  # the term changed training
    assert set(replies[1.0].metric_records["metrics"]) == set(
        replies[0.0].metric_records["metrics"]
    )
    assert set(replies[1.0].keys()) == set(replies[0.0].keys())
    private = _run_config(tiny_model_dirs, **{"ntd-beta": 1.0, "dp-noise-multiplier": 1.1})
    context, _, initial = load_client(private, in_process_node_config(tmp_path / "dp", partition=1))
    reply = app(_train_message(initial, server_round=2), context)
    assert reply.has_error() and "ntd-beta > 0 (FedNTD) is not available with" in reply.error.reason
    assert not ledger_path(tmp_path / "dp" / "state").exists()  # nothing was charged
