"""Secure aggregation (SecAgg+) mode: run-config validation, Flower's workflow parameters, the site's
protocol replies and their audit, and the server's update aggregation with client-level DP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Scalar,
    Status,
    ndarray_to_bytes,
    parameters_to_ndarrays,
)
from flwr.common.config import get_fused_config_from_dir
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from client.audit import SECAGG_PAYLOADS, audit_path, record_egress, verify_audit_log
from client.egress import secagg_stage
from client.secagg import LocalRound, _fit, noise_share_std, site_update
from common.config import RunSettings, SiteSettings
from common.errors import ConfigError
from server.privacy import client_dp
from server.secagg import (
    HeadCodec,
    ProtocolGrid,
    SecAggFedAvg,
    StrictClientSideDp,
    content_nbytes,
    secagg_workflow,
)
from tests.flower_messages import message_metadata

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"head.w": (4, 3), "head.b": (4,), "loss.logit_scale": ()}


@pytest.fixture(autouse=True)
def _flower_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime sets the identity of a ServerApp/ClientApp process; a Message needs it."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


# ---------------------------------------------------------------- configuration


def test_flower_accepts_the_secagg_keys_and_secure_aggregation_is_off_by_default() -> None:
    defaults = RunSettings.from_run_config(get_fused_config_from_dir(REPO, {}))
    assert defaults.secure_aggregation is False
    overrides: dict[str, bool | float | int | str] = {
        "secure-aggregation": True,
        "min-sites": 5,
        "secagg-num-shares": 3,
    }
    run = RunSettings.from_run_config(get_fused_config_from_dir(REPO, overrides))
    assert (run.secagg_shares, run.secagg_threshold) == (3, 2)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"min-sites": 3, "secagg-reconstruction-threshold": 4}, "secagg-reconstruction-threshold"),
        ({"min-sites": 3, "secagg-reconstruction-threshold": 1}, "secagg-reconstruction-threshold"),
        (
            {"min-sites": 5, "secagg-num-shares": 3, "secagg-reconstruction-threshold": 4},
            "3 shares",
        ),
        ({"min-sites": 3, "secagg-num-shares": 4}, "secagg-num-shares"),
        ({"min-sites": 3, "secagg-num-shares": 2}, "secagg-num-shares"),
        ({"min-sites": 5, "secagg-num-shares": 4}, "must be odd"),
        ({"min-sites": 1}, "min-sites >= 2"),
        ({"strategy": "krum"}, "strategy must be fedavg or fedprox"),
        ({"client-dp": "server-side"}, "client-dp = client-side"),
        ({"resume": True}, "resume"),
        ({"secagg-quantization-range": 2**31}, "secagg-quantization-range"),
        ({"secagg-clipping-range": 0.0}, "secagg-clipping-range"),
    ],
)
def test_invalid_secagg_config_is_refused_naming_the_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        RunSettings.from_run_config({"secure-aggregation": True, "min-sites": 3, **values})
    RunSettings.from_run_config(values)  # harmless while secure aggregation is off


@pytest.mark.parametrize(
    ("sites", "shares", "threshold", "flower_shares", "flower_threshold"),
    [(2, 0, 0, 2, 2), (3, 0, 0, 3, 2), (4, 0, 0, 4, 3), (5, 0, 5, 5, 5), (7, 3, 3, 3, 3)],
)
def test_flowers_workflow_gets_the_configured_shares_and_threshold(
    sites: int, shares: int, threshold: int, flower_shares: int, flower_threshold: int
) -> None:
    run = RunSettings(
        secure_aggregation=True,
        min_sites=sites,
        secagg_num_shares=shares,
        secagg_reconstruction_threshold=threshold,
    )
    workflow = secagg_workflow(run)
    # What SecAggPlusWorkflow.setup_stage computes for `sites` sampled sites (Flower 1.41 source).
    num_shares = workflow.num_shares
    got_shares = round(num_shares * sites) if isinstance(num_shares, float) else num_shares
    got_shares = sites if got_shares <= 2 else got_shares
    got_threshold = max(2, round(float(workflow.reconstruction_threshold) * got_shares))
    assert (got_shares, got_threshold) == (flower_shares, flower_threshold)
    assert workflow.timeout == run.round_timeout


# ---------------------------------------------------------------- the site's protocol replies


def _message(content: RecordDict, *, node: int = 7, group: str = "1") -> Message:
    metadata = message_metadata(dst_node_id=node, message_id="m1", group_id=group)
    return Message(metadata=metadata, content=content)  # type: ignore[call-overload]


def _setup_message() -> Message:
    config = ConfigRecord(
        {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: 3,
            Key.SHARE_NUMBER: 3,
            Key.THRESHOLD: 2,
            Key.CLIPPING_RANGE: 8.0,
            Key.TARGET_RANGE: 4194304,
            Key.MOD_RANGE: 2**32,
            Key.MAX_WEIGHT: 64.0,
        }
    )
    return _message(RecordDict({RECORD_KEY_CONFIGS: config}))


def test_client_app_answers_a_secagg_stage_and_audits_exactly_its_payload(tmp_path: Path) -> None:
    node_config: dict[str, bool | float | int | str] = {
        "site-name": "site-a",
        "state-dir": str(tmp_path / "site-a"),
        "worker": "off",
    }
    run_config: dict[str, bool | float | int | str] = {"secure-aggregation": True, "min-sites": 3}
    context = Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config
    )
    msg = _setup_message()
    assert secagg_stage(msg) == "setup"
    assert secagg_stage(_message(RecordDict({"config": ConfigRecord({"lr": 0.1})}))) is None
    reply = client_app(msg, context)
    assert not reply.has_error()
    sent = reply.content.config_records[RECORD_KEY_CONFIGS]
    assert sorted(sent) == ["pk1", "pk2"] and sent["pk1"] != sent["pk2"]
    # The protocol state (the site's secret keys) stays in the SuperNode's context, not the reply.
    assert "secaggplus_state" in context.state.config_records

    site = SiteSettings.from_node_config(node_config)
    (entry,) = [json.loads(line) for line in audit_path(site.state_path).read_text().splitlines()]
    assert entry["secagg"]["stage"] == "setup" and entry["round"] == 1 and not entry["arrays"]
    fields = {f["name"]: f for f in entry["secagg"]["fields"]}
    assert {k: f["bytes"] for k, f in fields.items()} == {
        "pk1": len(cast(bytes, sent["pk1"])),
        "pk2": len(cast(bytes, sent["pk2"])),
    }
    assert entry["total_bytes"] == len(cast(bytes, sent["pk1"])) + len(cast(bytes, sent["pk2"]))
    assert verify_audit_log(audit_path(site.state_path)).ok


def _masked(shapes: list[tuple[int, ...]], dtype: type = np.int64) -> list[bytes]:
    return [ndarray_to_bytes(np.zeros(s, dtype=dtype)) for s in shapes]


HEAD_MASKED = [(1,), (4, 3), (4,), (1,)]  # the weight factor, then the head (0-d as (1,))
GOOD: dict[str, dict[str, Any]] = {
    "setup": {"pk1": b"k" * 32, "pk2": b"l" * 32},
    "share_keys": {"dsts": [2**63 + 5, 3], "ctxts": [b"c" * 80, b"d" * 80]},
    "collect_masked_vectors": {
        "masked_params": _masked(HEAD_MASKED),
        "status.code": 0,
        "status.message": "Success",
    },
    "unmask": {"nids": [2**64 - 1, 3, 7], "shares": [b"s" * 40] * 3},
}


@pytest.mark.parametrize(
    ("stage", "fields", "arrays", "problem"),
    [
        ("setup", {**GOOD["setup"], "params": [b"x"]}, {}, "field params"),
        ("setup", GOOD["setup"], {"head.w": np.zeros((4, 3), np.float32)}, "unmasked arrays"),
        ("unmask", GOOD["share_keys"], {}, "field dsts"),
        ("share_keys", {"dsts": [2, 3], "ctxts": "plain text"}, {}, "field ctxts"),
        (
            "collect_masked_vectors",
            {**GOOD["collect_masked_vectors"], "masked_params": _masked(HEAD_MASKED, np.float32)},
            {},
            "dtype float32",
        ),
        (
            "collect_masked_vectors",
            {**GOOD["collect_masked_vectors"], "masked_params": _masked(HEAD_MASKED[1:])},
            {},
            "the head gives",
        ),
        ("collect_masked_vectors", {"status.code": 3}, {}, "status code 3"),
        ("handshake", {"pk1": b"k"}, {}, "unknown secure-aggregation stage"),
    ],
)
def test_audit_accepts_secagg_payloads_and_flags_anything_else(
    tmp_path: Path,
    stage: str,
    fields: dict[str, Any],
    arrays: dict[str, np.ndarray],
    problem: str,
) -> None:
    def record(stage: str, fields: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        record_egress(
            tmp_path,
            run_id=1,
            server_round=1,
            message_type="train",
            site="s",
            arrays=arrays,
            metrics={"num_examples": 30},
            protocol=(stage, fields),
        )

    for good_stage in SECAGG_PAYLOADS:
        record(good_stage, GOOD[good_stage], {})
    clean = verify_audit_log(audit_path(tmp_path), allowed_arrays=SHAPES)
    assert clean.ok, clean.violations
    assert clean.secagg_replies == 4 and clean.secagg_bytes == clean.total_bytes
    masked_bytes = sum(len(b) for b in GOOD["collect_masked_vectors"]["masked_params"])
    assert clean.total_bytes == 64 + 2 * 8 + 160 + masked_bytes + 8 + 7 + 3 * 8 + 120
    record(stage, fields, arrays)
    summary = verify_audit_log(audit_path(tmp_path), allowed_arrays=SHAPES)
    assert len(summary.violations) >= 1 and all("line 5" in v for v in summary.violations)
    assert any(problem in v for v in summary.violations), summary.violations


# ---------------------------------------------------------------- the server's aggregation


def _head(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


def test_head_codec_lifts_scalars_and_restores_the_head() -> None:
    head = {k: np.arange(np.prod(s), dtype=np.float32).reshape(s) for k, s in SHAPES.items()}
    codec = HeadCodec(head)
    parameters = codec.encode(head)
    sent = parameters_to_ndarrays(parameters)
    assert [a.shape for a in sent] == [(4, 3), (4,), (1,)]
    back = codec.decode(sent)
    assert list(back) == list(SHAPES) and all(np.array_equal(back[k], head[k]) for k in head)
    assert json.loads(str(codec.fit_config()["head-shapes"]))["loss.logit_scale"] == []
    content = RecordDict({"c": ConfigRecord({"a": b"xyz", "b": [b"12", b"3"], "n": [1, 2]})})
    assert content_nbytes(content) == 3 + 3 + 16


def _results(updates: list[float], codec: HeadCodec) -> list[tuple[ClientProxy, FitRes]]:
    """What SecAggPlusWorkflow hands the strategy: every FitRes carries the unmasked mean update."""
    mean = codec.encode(_head(float(np.mean(updates))))
    return [
        (
            GridClientProxy(node, None, 1),  # type: ignore[arg-type]
            FitRes(Status(Code.OK, "Success"), mean, 1, {"num-examples": 30}),
        )
        for node, _ in enumerate(updates, start=2)
    ]


def test_server_adds_the_mean_update_and_releases_only_with_all_sites_noise_shares() -> None:
    run = RunSettings(
        secure_aggregation=True,
        min_sites=3,
        client_dp="client-side",
        client_dp_noise_multiplier=1.0,
        client_dp_clipping_norm=0.1,
    )
    codec = HeadCodec(_head(0.0))
    fedavg = SecAggFedAvg(run, codec, initial_parameters=codec.encode(_head(0.0)))
    dp = client_dp(run)
    assert dp is not None
    strategy = StrictClientSideDp(fedavg, dp)
    fedavg.current = [np.full(s or (1,), 2.0, np.float32) for s in SHAPES.values()]
    assert fedavg.num_fit_clients(10) == (3, 3)  # exactly min-sites sites per round

    short, _ = strategy.aggregate_fit(1, _results([0.1, 0.2], codec), [RuntimeError("gone")])
    assert short is None and dp.round_record()["released"] is False
    assert sorted(fedavg.summed[1]) == [2, 3] and fedavg.released[1] is False  # an empty round

    released, _ = strategy.aggregate_fit(2, _results([0.1, 0.2, 0.3], codec), [])
    assert released is not None
    head = codec.decode(parameters_to_ndarrays(released))
    # the sites added the noise before masking: the server releases the unmasked mean as it is
    for k in head:
        assert np.allclose(head[k], 2.0 + 0.2, atol=1e-6)
    record = dp.round_record()
    assert record["released"] and record["releases"] == 1 and record["epsilon"] > 0
    assert fedavg.released[2] is True
    assert fedavg._fit_config(2)["server-round"] == 2


def test_protocol_grid_names_each_site_that_failed_declined_or_gave_no_reply() -> None:
    from flwr.app import Error, MetricRecord

    from common.wire import DECLINED_ERROR_CODE
    from tests.server.test_grid import DelayedGrid

    class Answers(DelayedGrid):
        """Node 1 answers, 2 declines, 3 fails, 4 never replies."""

        def pull_messages(self, message_ids: Any) -> list[Message]:
            replies = []
            for message_id in message_ids:
                message = self.pushed[message_id]
                node = message.metadata.dst_node_id
                if node == 1:
                    replies.append(
                        Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=message)
                    )
                elif node == 2:
                    error = Error(DECLINED_ERROR_CODE, "[site beta] site declined: budget spent")
                    replies.append(Message(error, reply_to=message))
                elif node == 3:
                    replies.append(
                        Message(Error(0, "[site gamma] ValueError: boom"), reply_to=message)
                    )
            return replies

    grid = ProtocolGrid(Answers(dict.fromkeys((1, 2, 3, 4), 0.0)), poll_interval=0.01)
    stage = ConfigRecord({Key.STAGE: Stage.SHARE_KEYS})
    messages = [
        grid.create_message(RecordDict({RECORD_KEY_CONFIGS: stage}), "train", node, "7")
        for node in (1, 2, 3, 4)
    ]
    assert len(list(grid.send_and_receive(messages, timeout=0.3))) == 3
    traffic = grid.round_log(7)
    assert traffic.declined == {2: f"{Stage.SHARE_KEYS}: site declined: budget spent"}
    assert traffic.failed == {3: f"{Stage.SHARE_KEYS}: ValueError: boom"}
    assert traffic.dropped == {4: f"{Stage.SHARE_KEYS}: no reply within the round timeout"}
    assert traffic.shortfalls() == [
        f"beta (node 2) declined: {Stage.SHARE_KEYS}: site declined: budget spent",
        f"gamma (node 3) failed: {Stage.SHARE_KEYS}: ValueError: boom",
        f"node 4 dropped: {Stage.SHARE_KEYS}: no reply within the round timeout",
    ]


# ---------------------------------------------------------------- the site's masked-vector stage


def _fit_message(codec: HeadCodec, head: dict[str, np.ndarray], **config: Scalar) -> Message:
    fitins = FitIns(codec.encode(head), {"server-round": 1, **codec.fit_config(), **config})
    return _message(compat.fitins_to_recorddict(fitins, keep_input=True))


def _local_round(step: float) -> LocalRound:
    def train(incoming: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, Any]:
        assert incoming["loss.logit_scale"].shape == ()  # the site trains its own head shapes
        assert config["server-round"] == 1
        trained = {k: (v + step).astype(np.float32) for k, v in incoming.items()}
        return {"arrays": trained, "metrics": {"num-examples": 30, "train-loss": 0.5}}

    return train


def _send(msg: Message, run: RunSettings, local_round: LocalRound, clip: bool) -> FitRes:
    """The inner part of the masked-vector stage, as client/secagg.py chains it under secaggplus_mod."""
    site = SiteSettings(site_name="site-a")
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})

    def fit(message: Message, ctx: Context) -> Message:
        return _fit(message, run=run, site=site, local_round=local_round)

    clipping_norm = (
        float(compat.recorddict_to_fitins(msg.content, keep_input=True).config[KEY_CLIPPING_NORM])
        if clip
        else None
    )
    reply = site_update(msg, context, fit, run=run, site=site, clipping_norm=clipping_norm)
    return compat.recorddict_to_fitres(reply.content, keep_input=True)


def test_masked_stage_sends_the_clipped_update_with_scalars_lifted_and_weight_one() -> None:
    run = RunSettings(
        secure_aggregation=True,
        min_sites=3,
        client_dp="client-side",
        client_dp_clipping_norm=0.1,
        client_dp_noise_multiplier=1e-7,  # a negligible noise share: the clipped update itself
    )
    codec = HeadCodec(_head(1.0))
    msg = _fit_message(codec, _head(1.0), **{KEY_CLIPPING_NORM: 0.1})
    fitres = _send(msg, run, _local_round(0.5), clip=True)
    update = parameters_to_ndarrays(fitres.parameters)
    assert [a.shape for a in update] == [(4, 3), (4,), (1,)]
    values = np.concatenate([a.ravel() for a in update])
    # Every coordinate moved by 0.5, the scalar included; clipped to norm 0.1 as a whole.
    assert np.sqrt((values.astype(np.float64) ** 2).sum()) == pytest.approx(0.1, rel=1e-5)
    assert np.allclose(values, 0.1 / np.sqrt(values.size), rtol=1e-5)
    assert fitres.num_examples == 1 and fitres.metrics["num-examples"] == 30


def test_each_site_adds_a_noise_share_so_the_server_only_unmasks_a_noisy_sum() -> None:
    sigma, clip, sites = 2.0, 0.1, 3
    run = RunSettings(
        secure_aggregation=True,
        min_sites=sites,
        client_dp="client-side",
        client_dp_clipping_norm=clip,
        client_dp_noise_multiplier=sigma,
    )
    codec = HeadCodec(_head(1.0))
    msg = _fit_message(codec, _head(1.0), **{KEY_CLIPPING_NORM: clip})
    clipped = None
    noise = []
    for _ in range(150):
        values = np.concatenate(
            [
                a.ravel()
                for a in parameters_to_ndarrays(
                    _send(msg, run, _local_round(0.5), clip=True).parameters
                )
            ]
        ).astype(np.float64)
        clipped = np.full(values.size, clip / np.sqrt(values.size))
        noise.append(values - clipped)
    samples = np.concatenate(noise)
    # sigma * C / sqrt(m) per site: m shares sum to the central mechanism's sigma * C on the sum
    assert noise_share_std(run, clip) == pytest.approx(sigma * clip / np.sqrt(sites))
    assert samples.std() == pytest.approx(sigma * clip / np.sqrt(sites), rel=0.05)
    assert abs(samples.mean()) < 5 * samples.std() / np.sqrt(samples.size)
    assert not np.array_equal(noise[0], noise[1])  # fresh noise every round, never the run's seed


def test_masked_stage_weighs_by_examples_up_to_max_weight_and_refuses_out_of_range() -> None:
    run = RunSettings(secure_aggregation=True, min_sites=3, secagg_max_weight=20.0)
    codec = HeadCodec(_head(1.0))
    fitres = _send(_fit_message(codec, _head(1.0)), run, _local_round(0.25), clip=False)
    assert fitres.num_examples == 20  # min(30 examples, secagg-max-weight)
    assert all(np.allclose(a, 0.25) for a in parameters_to_ndarrays(fitres.parameters))
    with pytest.raises(ConfigError, match=r"site-a.*secagg-clipping-range"):
        _send(_fit_message(codec, _head(1.0)), run, _local_round(9.0), clip=False)
