"""Client-level DP through Flower's fixed-clipping wrappers: clipping, noise, validation order, accounting."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common.config import get_fused_config_from_dir
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from client.audit import audit_path, payload_digest
from client.clipping import clip_update_mod
from common.config import RunSettings
from common.errors import ConfigError
from common.flower import arrays_from_record, metric_record, record_from_arrays
from server.privacy import ClientDp, client_dp
from server.strategy import Accounting, EmptyRoundError, UpdateCheck, build_strategy
from tests.client_site import in_process_node_config, load_client
from tests.flower_messages import message_metadata
from tests.tiny_config import tiny_run_config

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"head.w": (4, 3), "head.b": (4,), "loss.logit_scale": ()}
DELTA = 1e-5


@pytest.fixture(autouse=True)
def _serverapp_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime sets the identity of a ServerApp process; building a Message needs it."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _metadata(node: int, message_type: str = "train") -> Metadata:
    return message_metadata(dst_node_id=node, message_id=f"m{node}", message_type=message_type)


def _reply(node: int, arrays: dict[str, np.ndarray], *, examples: float = 10) -> Message:
    incoming = Message(metadata=_metadata(node), content=RecordDict())  # type: ignore[call-overload]
    content = RecordDict(
        {
            "arrays": record_from_arrays(arrays),
            "metrics": metric_record({"num-examples": examples, "train-loss": 1.0}),
        }
    )
    return Message(content=content, reply_to=incoming)


def _zeros(shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, np.ndarray]:
    return {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}


def _update(direction: int, norm: float) -> dict[str, np.ndarray]:
    """Arrays whose distance to the zero global head is ``norm``, along coordinate ``direction``."""
    arrays = _zeros()
    arrays["head.w"].flat[direction] = norm
    return arrays


def _scalar_update(value: float) -> dict[str, np.ndarray]:
    """An update of the 0-d parameter alone (InfoNCE's learnable temperature)."""
    return {**_zeros(), "loss.logit_scale": np.array(value, dtype=np.float32)}


def _norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(((arrays[k] - reference[k]) ** 2).sum()) for k in arrays)))


def _run(mode: str, **overrides: Any) -> RunSettings:
    return RunSettings(
        client_dp=mode,
        client_dp_noise_multiplier=overrides.pop("sigma", 1.0),
        client_dp_clipping_norm=overrides.pop("clip", 1.0),
        client_dp_delta=DELTA,
        min_sites=overrides.pop("min_sites", 3),
        **overrides,
    )


def _federation(
    run: RunSettings, shapes: dict[str, tuple[int, ...]] = SHAPES
) -> tuple[Any, ClientDp, Accounting]:
    """What server/app.py builds: validation (FedEmbedStrategy) outside Flower's DP wrapper."""
    dp = client_dp(run)
    assert dp is not None
    accounting = Accounting()
    accounting.global_arrays = _zeros(shapes)
    strategy = build_strategy(
        run,
        check=UpdateCheck(shapes=shapes, max_update_norm=dp.update_norm_bound),
        accounting=accounting,
        aggregator=dp.strategy,
    )
    return strategy, dp, accounting


def _round(
    strategy: Any,
    server_round: int,
    replies: list[Message],
    global_arrays: dict[str, np.ndarray] | None = None,
) -> ArrayRecord | None:
    """One round as Flower's Strategy.start runs it: configure (3 connected sites), then aggregate."""
    head = record_from_arrays(_zeros() if global_arrays is None else global_arrays)
    strategy.configure_train(server_round, head, ConfigRecord(), _Connected([1, 2, 3]))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays


class _Connected(Grid):
    """Just enough of a Grid for ``configure_train``: the ids of the connected nodes."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> Iterable[int]:
        return self.node_ids

    def _unused(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("configure_train only lists the connected nodes")

    set_run = create_message = push_messages = pull_messages = send_and_receive = _unused
    run = property(_unused)


def independent_epsilon(
    noise_multiplier: float, sampled: int, total: int, rounds: int, delta: float
) -> float:
    """Epsilon at ``delta`` of ``rounds`` Gaussian releases (sensitivity 1, noise ``noise_multiplier``)
    with ``sampled`` of ``total`` sites per round, computed here from the formulas: RDP of the Gaussian
    mechanism alpha / (2 sigma^2) (Mironov 2017), added over rounds, converted with Canonne, Kamath and
    Steinke (2020): eps = rdp + log(1 - 1/alpha) - log(delta * alpha) / (alpha - 1), minimised over
    dp-accounting's default orders. Flower takes no credit for sampling: with every site sampled
    (rate 1) there is none to take, and this is exactly the guarantee."""
    assert sampled == total, "sampling rate 1 only: amplification is not accounted"
    orders = np.asarray(DEFAULT_RDP_ORDERS, dtype=np.float64)
    rdp = rounds * orders / (2 * noise_multiplier**2)
    eps = rdp + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1)
    return float(max(0.0, eps.min()))


# ---------------------------------------------------------------- configuration


def test_flower_accepts_the_client_dp_keys_and_their_defaults_are_off() -> None:
    overrides = {
        "client-dp": "client-side",
        "client-dp-noise-multiplier": 0.8,
        "client-dp-clipping-norm": 0.5,
        "client-dp-delta": 1e-6,
    }
    fused = get_fused_config_from_dir(REPO, overrides)  # what `flwr run --run-config` does
    assert RunSettings.from_run_config(fused).client_dp_clipping_norm == 0.5
    defaults = RunSettings.from_run_config(get_fused_config_from_dir(REPO, {}))
    assert defaults.client_dp == "off" and client_dp(defaults) is None


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"client-dp": "on"}, "client-dp"),
        ({"client-dp-noise-multiplier": -1.0}, "client-dp-noise-multiplier"),
        ({"client-dp": "client-side", "client-dp-noise-multiplier": 0.0}, "noise-multiplier"),
        ({"client-dp-clipping-norm": 0.0}, "client-dp-clipping-norm"),
        ({"client-dp-clipping-norm": "nan"}, "client-dp-clipping-norm"),
        ({"client-dp-delta": 1.0}, "client-dp-delta"),
        ({"client-dp": "server-side", "strategy": "fedmedian"}, "client-dp"),
        ({"client-dp": "server-side", "fraction-train": 0.5}, "fraction-train"),
    ],
)
def test_invalid_client_dp_config_names_the_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        RunSettings.from_run_config(values)


# ---------------------------------------------------------------- server side


@pytest.mark.parametrize("mode", ["client-side", "server-side"])
def test_noise_has_the_calibrated_std(mode: str) -> None:
    shapes = {"w": (400_000,)}
    strategy, dp, _ = _federation(_run(mode, sigma=1.5, clip=2.0), shapes)
    update = {"w": np.full(shapes["w"], 1e-3, dtype=np.float32)}
    released = _round(strategy, 1, [_reply(i, update) for i in (1, 2, 3)], _zeros(shapes))
    assert released is not None
    noise = arrays_from_record(released)["w"] - 1e-3
    assert dp.noise_std == pytest.approx(1.5 * 2.0 / 3)  # sigma * C / m per coordinate
    assert float(noise.std()) == pytest.approx(dp.noise_std, rel=0.01)
    assert abs(float(noise.mean())) < 5 * dp.noise_std / np.sqrt(noise.size)


def test_server_side_clipping_bounds_every_update_and_sites_weigh_equally() -> None:
    strategy, dp, _ = _federation(_run("server-side", sigma=1e-9, clip=1.0))  # ~no noise
    replies = [
        _reply(1, _update(0, 10.0), examples=10),
        _reply(2, _update(1, 0.5), examples=1000),
        _reply(3, _scalar_update(-3.0), examples=10),  # Flower alone leaves a 0-d update unclipped
    ]
    released = _round(strategy, 1, replies)
    assert released is not None
    expected = _zeros()  # the plain mean of the three updates clipped to norm 1
    expected["head.w"].flat[:2] = [1.0 / 3, 0.5 / 3]
    expected["loss.logit_scale"] = np.array(-1.0 / 3, dtype=np.float32)
    for name, value in arrays_from_record(released).items():
        np.testing.assert_allclose(value, expected[name], atol=1e-6)
    assert dp.round_record()["released"]


def test_client_side_rejects_an_update_that_was_not_clipped_and_releases_nothing() -> None:
    strategy, dp, accounting = _federation(_run("client-side", clip=1.0, max_empty_rounds=1))
    replies = [_reply(1, _update(0, 1.0)), _reply(2, _update(1, 0.3)), _reply(3, _update(2, 1.5))]
    assert _round(strategy, 1, replies) is None  # 2 valid of 3: Flower's strict mode skips it
    assert "exceeds the bound" in accounting.rounds[1].rejected[3]
    assert not accounting.rounds[1].head_updated
    record = dp.round_record()
    assert not record["released"] and record["releases"] == 0 and record["epsilon"] == 0.0


def test_a_round_that_releases_nothing_is_an_empty_round_and_stops_the_run() -> None:
    strategy, dp, _ = _federation(_run("client-side", clip=1.0))  # max-empty-rounds = 0
    replies = [_reply(1, _update(0, 1.0)), _reply(2, _update(1, 0.3)), _reply(3, _update(2, 1.5))]
    with pytest.raises(EmptyRoundError) as stopped:
        _round(strategy, 1, replies)
    assert "node 3 rejected: update norm" in str(stopped.value)
    assert "2 valid update(s), but ClientSideDp released no aggregate" in str(stopped.value)
    assert not dp.round_record()["released"]


def test_flowers_wrapper_alone_would_clip_a_malformed_update_and_crash() -> None:
    """Why validation must wrap Flower's DP wrapper, not the other way round."""
    wrapper = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 1.0, 1)
    wrapper.current_arrays = record_from_arrays(_zeros())
    wrong_shape = {**_update(0, 5.0), "head.w": np.ones((3, 4), np.float32)}
    with pytest.raises(ValueError):
        wrapper.aggregate_train(1, [_reply(1, wrong_shape)])


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda a: {**a, "head.w": np.ones((3, 4), np.float32)}, "shape"),
        (lambda a: {**a, "head.b": np.array([np.nan, 0, 0, 0], np.float32)}, "NaN"),
        (lambda a: dict(reversed(list(a.items()))), "order"),  # clipping pairs arrays by position
    ],
)
def test_invalid_updates_are_rejected_before_flowers_clipping(mutate: Any, reason: str) -> None:
    strategy, dp, accounting = _federation(_run("server-side", max_empty_rounds=1))
    replies = [
        _reply(1, _update(0, 1.0)),
        _reply(2, _update(1, 2.0)),
        _reply(3, mutate(_update(2, 5.0))),
    ]
    assert _round(strategy, 1, replies) is None
    assert reason in accounting.rounds[1].rejected[3] and sorted(accounting.rounds[1].sites) == [
        1,
        2,
    ]
    assert not dp.round_record()["released"]


def test_each_round_trains_exactly_min_sites_sites_and_asks_them_to_clip() -> None:
    strategy, _, _ = _federation(_run("client-side", clip=0.7))
    for server_round in (1, 2):
        messages = list(
            strategy.configure_train(
                server_round, record_from_arrays(_zeros()), ConfigRecord(), _Connected([5, 6, 7, 8])
            )
        )
        assert len({m.metadata.dst_node_id for m in messages}) == len(messages) == 3
        assert messages[0].content.config_records["config"]["clipping_norm"] == 0.7


# ---------------------------------------------------------------- accounting


def test_epsilon_composes_over_rounds_and_survives_a_resume() -> None:
    run = _run("server-side", sigma=0.9)
    strategy, dp, _ = _federation(run)
    history = []
    for server_round in (1, 2, 3):
        assert _round(strategy, server_round, [_reply(i, _update(i, 0.2)) for i in (1, 2, 3)])
        record = dp.round_record()
        assert record["released"] and record["releases"] == server_round
        assert record["epsilon"] == pytest.approx(
            independent_epsilon(0.9, 3, 3, server_round, DELTA), rel=1e-9
        )
        history.append({"round": server_round, "client_dp": json.loads(json.dumps(record))})
    resumed = ClientDp(run, history=history)  # a restarted coordinator charges rounds 1-3 again
    assert resumed.round_record()["epsilon"] == pytest.approx(record["epsilon"], rel=1e-12)
    with pytest.raises(ConfigError, match="without it"):
        ClientDp(run, history=[{"round": 1, "sites": [1, 2, 3]}])


# ---------------------------------------------------------------- site side


def _incoming(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Message:
    content = RecordDict(
        {
            "arrays": record_from_arrays(arrays),
            "config": ConfigRecord({"server-round": 1, **config}),
        }
    )
    return Message(metadata=_metadata(0), content=content)  # type: ignore[call-overload]


def test_clip_mod_clips_when_asked_and_passes_through_otherwise() -> None:
    initial = _zeros()
    big = _update(4, 6.0)
    big["loss.logit_scale"] = np.array(8.0, dtype=np.float32)  # Flower alone would not clip it

    def local_round(msg: Message, context: Context) -> Message:
        content = RecordDict({"arrays": record_from_arrays(big), "metrics": metric_record({})})
        return Message(content=content, reply_to=msg)

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    asked = clip_update_mod(_incoming(initial, {"clipping_norm": 2.0}), context, local_round)
    sent = arrays_from_record(asked.content.array_records["arrays"])
    assert _norm(sent, initial) == pytest.approx(2.0, rel=1e-6)
    assert sent["loss.logit_scale"].shape == () and float(
        sent["loss.logit_scale"]
    ) == pytest.approx(1.6)
    plain = clip_update_mod(_incoming(initial, {}), context, local_round)
    assert _norm(arrays_from_record(plain.content.array_records["arrays"]), initial) == 10.0


def test_site_clips_its_trained_update_and_audits_exactly_what_it_sends(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    """The real ClientApp: InfoNCE training, then Flower's fixedclipping_mod, then the audit."""
    run_config = tiny_run_config(tiny_model_dirs, **{"dataset-n": 60, "loss": "infonce"})
    context, _, initial = load_client(run_config, in_process_node_config(tmp_path))
    clip = 1e-3  # far below a trained update's norm: the reply must have been clipped to it
    reply = client_app(_incoming(initial, {"clipping_norm": clip}), context)
    assert not reply.has_error(), reply.error if reply.has_error() else None
    sent = arrays_from_record(reply.content.array_records["arrays"])
    assert list(sent) == list(initial)
    assert _norm(sent, initial) == pytest.approx(clip, rel=1e-3)
    (entry,) = [
        json.loads(line) for line in audit_path(tmp_path / "state").read_text().splitlines()
    ]
    assert entry["sha256"] == payload_digest(sent)
    assert entry["privacy"]["client-dp-clipping-norm"] == clip


# ---------------------------------------------------------------- end to end
# A real simulation with client-side clipping (3 sites, 2 rounds, then resumed for a third) and its
# RDP epsilon per round: tests/simulations/flower/test_federation_e2e.py, which shares that one
# federation with the end-to-end and resume checks.
