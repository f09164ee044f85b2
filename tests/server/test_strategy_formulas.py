"""Every strategy the run-config offers aggregates known updates to its published formula.

The production path: ``build_strategy`` (the factory that maps a strategy name and its run-config
hyperparameters onto Flower's class) and the wrapper around it, fed Flower Messages as a Grid would
deliver them, for two rounds (the server-side optimisers carry state from one round to the next).
Each reference below is written from the formula, not from Flower's code; each test also checks that
its data tells the formula apart from every other strategy's and from Flower's default
hyperparameters, so a name mapped to the wrong class or a hyperparameter left out fails it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunSettings
from common.flower import arrays_from_record, metric_record, record_from_arrays
from common.wire import SITE_RECORD
from server.strategy import Accounting, UpdateCheck, build_strategy

Arrays = dict[str, np.ndarray]
SHAPES = {"head.w": (4, 3), "head.b": (4,), "loss.logit_scale": ()}
NODES = [101, 102, 103, 104, 105, 106, 107]  # 7 sites: krum tolerates (7 - 3) // 2 = 2 of them
EXAMPLES = [10, 30, 5, 50, 20, 8, 40]  # unequal, so a weighted mean differs from a plain one
ROUNDS = 2
# Flower's FedAdam/FedYogi moments and adaptivity: the run-config does not set them.
BETA_1, BETA_2, TAU = 0.9, 0.99, 1e-3
# The hyperparameters under test, all unlike both RunSettings' defaults and Flower's own.
SERVER_LR = 0.3
SERVER_MOMENTUM = 0.7
TRIM_BETA = 0.3  # cuts int(0.3 * 7) = 2 values at each end (the default 0.2 cuts 1)
PROXIMAL_MU = 0.37
CONFIGURED: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedprox": {"proximal_mu": PROXIMAL_MU},
    "fedavgm": {"server_momentum": SERVER_MOMENTUM},
    "fedadam": {"server_lr": SERVER_LR},
    "fedyogi": {"server_lr": SERVER_LR},
    "fedmedian": {},
    "fedtrimmedavg": {"trim_beta": TRIM_BETA},
    "krum": {},
}


@pytest.fixture(autouse=True)
def _serverapp_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime sets the identity of a ServerApp process; configure_train's messages need it."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class _Sites(Grid):
    """The connected sites, all a strategy's sampling reads."""

    def get_node_ids(self) -> Iterable[int]:
        return list(NODES)

    def _unused(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("not used by configure_train")

    set_run = create_message = push_messages = pull_messages = send_and_receive = _unused
    get_nodes = _unused
    run = property(_unused)


def _random_arrays(rng: np.random.Generator, scale: float) -> Arrays:
    return {k: rng.normal(0.0, scale, s).astype(np.float32) for k, s in SHAPES.items()}


def _data(seed: int = 4) -> tuple[Arrays, list[list[Arrays]]]:
    """The initial global head and each site's update in each round."""
    rng = np.random.default_rng(seed)
    initial = _random_arrays(rng, 1.0)
    rounds = [[_random_arrays(rng, 1.0) for _ in NODES] for _ in range(ROUNDS)]
    return initial, rounds


def _federate(
    run: RunSettings, initial: Arrays, rounds: list[list[Arrays]]
) -> tuple[list[Arrays], list[list[Message]]]:
    """Each round's aggregate and the train messages sent, through the factory and the wrapper."""
    strategy = build_strategy(
        run, check=UpdateCheck(shapes=SHAPES, max_update_norm=1e9), accounting=Accounting()
    )
    current, merged, sent_per_round = initial, [], []
    for server_round, updates in enumerate(rounds, start=1):
        record = record_from_arrays(current)
        sent = list(strategy.configure_train(server_round, record, ConfigRecord(), _Sites()))
        assert sorted(m.metadata.dst_node_id for m in sent) == NODES
        for message in sent:  # the Grid gives the messages it pushes their ids
            node = message.metadata.dst_node_id
            message.metadata.__dict__["_message_id"] = f"r{server_round}-{node}"
        replies = [_reply(m, updates, server_round) for m in sent]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert arrays is not None
        current = arrays_from_record(arrays)
        assert list(current) == list(SHAPES)
        assert {str(v.dtype) for v in current.values()} == {"float32"}  # the head's dtype, always
        merged.append(current)
        sent_per_round.append(sent)
    return merged, sent_per_round


def _reply(sent: Message, updates: list[Arrays], server_round: int) -> Message:
    index = NODES.index(sent.metadata.dst_node_id)
    content = RecordDict(
        {
            "arrays": record_from_arrays(updates[index]),
            "metrics": metric_record(
                {"num-examples": EXAMPLES[index], "train-loss": 1.0 / server_round}
            ),
            SITE_RECORD: ConfigRecord({"name": f"site-{index}"}),
        }
    )
    return Message(content=content, reply_to=sent)


# ---------------------------------------------------------------- the formulas, in float64


def _per_key(updates: list[Arrays], reduce: Callable[[np.ndarray], np.ndarray]) -> Arrays:
    """``reduce`` over the sites (axis 0) for each array."""
    return {k: reduce(np.stack([u[k].astype(np.float64) for u in updates])) for k in SHAPES}


def _weighted_mean(updates: list[Arrays]) -> Arrays:
    weights = np.asarray(EXAMPLES, np.float64)
    return _per_key(updates, lambda x: np.tensordot(weights, x, axes=1) / weights.sum())


def _mean_rounds(initial: Arrays, rounds: list[list[Arrays]]) -> list[Arrays]:
    """FedAvg (and FedProx, whose mu only changes the sites' local loss): the example-weighted mean."""
    return [_weighted_mean(updates) for updates in rounds]


def _momentum_rounds(
    initial: Arrays, rounds: list[list[Arrays]], *, momentum: float
) -> list[Arrays]:
    """FedAvgM (Hsu et al. 2019), server learning rate 1: v = momentum * v + (x - mean); x -= v."""
    x = {k: v.astype(np.float64) for k, v in initial.items()}
    velocity: Arrays | None = None
    out = []
    for updates in rounds:
        mean = _weighted_mean(updates)
        pseudo_gradient = {k: x[k] - mean[k] for k in SHAPES}
        velocity = (
            pseudo_gradient
            if velocity is None
            else {k: momentum * velocity[k] + pseudo_gradient[k] for k in SHAPES}
        )
        x = {k: x[k] - velocity[k] for k in SHAPES}
        out.append(x)
    return out


def _adaptive_rounds(
    initial: Arrays, rounds: list[list[Arrays]], *, eta: float, yogi: bool
) -> list[Arrays]:
    """FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2) on the pseudo-gradient delta = mean - x:

    m = b1 m + (1 - b1) delta
    Adam: v = b2 v + (1 - b2) delta^2;   Yogi: v = v - (1 - b2) delta^2 sign(v - delta^2)
    x = x + eta' m / (sqrt(v) + tau), with Yogi eta' = eta and Adam's bias-corrected
    eta' = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) (Flower counts t from 1, hence t + 1).
    """
    x = {k: v.astype(np.float64) for k, v in initial.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(val) for k, val in x.items()}
    out = []
    for t, updates in enumerate(rounds, start=1):
        mean = _weighted_mean(updates)
        delta = {k: mean[k] - x[k] for k in SHAPES}
        m = {k: BETA_1 * m[k] + (1 - BETA_1) * delta[k] for k in SHAPES}
        if yogi:
            v = {
                k: v[k] - (1 - BETA_2) * delta[k] ** 2 * np.sign(v[k] - delta[k] ** 2)
                for k in SHAPES
            }
            step = eta
        else:
            v = {k: BETA_2 * v[k] + (1 - BETA_2) * delta[k] ** 2 for k in SHAPES}
            step = eta * np.sqrt(1 - BETA_2 ** (t + 1)) / (1 - BETA_1 ** (t + 1))
        x = {k: x[k] + step * m[k] / (np.sqrt(v[k]) + TAU) for k in SHAPES}
        out.append(x)
    return out


def _median_rounds(initial: Arrays, rounds: list[list[Arrays]]) -> list[Arrays]:
    """FedMedian (Yin et al. 2018): the element-wise median, example counts ignored."""
    return [_per_key(updates, lambda x: np.median(x, axis=0)) for updates in rounds]


def _trimmed_rounds(initial: Arrays, rounds: list[list[Arrays]], *, beta: float) -> list[Arrays]:
    """FedTrimmedAvg: per element, drop the int(beta * n) lowest and highest values, average the rest."""

    def trimmed(x: np.ndarray) -> np.ndarray:
        cut = int(beta * x.shape[0])
        return np.sort(x, axis=0)[cut : x.shape[0] - cut].mean(axis=0)

    return [_per_key(updates, trimmed) for updates in rounds]


def _krum_choice(updates: list[Arrays], *, malicious: int) -> int:
    """Krum (Blanchard et al. 2017): the update with the smallest sum of squared distances to its
    n - f - 2 nearest other updates."""
    flat = [np.concatenate([u[k].astype(np.float64).ravel() for k in SHAPES]) for u in updates]
    nearest = len(flat) - malicious - 2
    scores = []
    for i, a in enumerate(flat):
        distances = sorted(float(((a - b) ** 2).sum()) for j, b in enumerate(flat) if j != i)
        scores.append(sum(distances[:nearest]))
    return int(np.argmin(scores))


def _krum_rounds(initial: Arrays, rounds: list[list[Arrays]], *, malicious: int) -> list[Arrays]:
    return [dict(updates[_krum_choice(updates, malicious=malicious)]) for updates in rounds]


Reference = Callable[[Arrays, list[list[Arrays]]], list[Arrays]]


def _references(
    server_lr: float = SERVER_LR,
    server_momentum: float = SERVER_MOMENTUM,
    trim_beta: float = TRIM_BETA,
    krum_malicious: int = (len(NODES) - 3) // 2,
) -> dict[str, Reference]:
    """Each strategy name's formula with these hyperparameters."""
    return {
        "fedavg": _mean_rounds,
        "fedprox": _mean_rounds,
        "fedavgm": lambda i, r: _momentum_rounds(i, r, momentum=server_momentum),
        "fedadam": lambda i, r: _adaptive_rounds(i, r, eta=server_lr, yogi=False),
        "fedyogi": lambda i, r: _adaptive_rounds(i, r, eta=server_lr, yogi=True),
        "fedmedian": _median_rounds,
        "fedtrimmedavg": lambda i, r: _trimmed_rounds(i, r, beta=trim_beta),
        "krum": lambda i, r: _krum_rounds(i, r, malicious=krum_malicious),
    }


# What a strategy computes when the factory leaves its hyperparameter out: Flower's defaults.
FLOWER_DEFAULTS = _references(server_lr=0.1, server_momentum=0.0, trim_beta=0.2, krum_malicious=0)
FLOWER_DEFAULTS["fedyogi"] = lambda i, r: _adaptive_rounds(i, r, eta=1e-2, yogi=True)


def _matches(got: list[Arrays], want: list[Arrays]) -> bool:
    return all(
        np.allclose(g[k], w[k], rtol=1e-5, atol=1e-6)
        for g, w in zip(got, want, strict=True)
        for k in SHAPES
    )


def _run(name: str) -> RunSettings:
    return RunSettings(strategy=name, min_sites=len(NODES), **CONFIGURED[name])


@pytest.mark.parametrize("name", list(CONFIGURED))
def test_the_aggregate_of_known_updates_is_the_strategys_formula(name: str) -> None:
    initial, rounds = _data()
    merged, _ = _federate(_run(name), initial, rounds)
    want = _references()[name](initial, rounds)
    for server_round, (got, expected) in enumerate(zip(merged, want, strict=True), start=1):
        for key in SHAPES:
            np.testing.assert_allclose(
                got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=f"round {server_round}"
            )
    # The data tell this formula apart from every other one and from Flower's defaults (an
    # unconfigured hyperparameter): a wrong class or a dropped hyperparameter could not pass.
    same_aggregate = {"fedavg", "fedprox"}  # FedProx differs at the sites (test below)
    for other, reference in _references().items():
        if other != name and not {name, other} <= same_aggregate:
            assert not _matches(merged, reference(initial, rounds)), f"{name} looks like {other}"
    if name in ("fedavgm", "fedadam", "fedyogi", "fedtrimmedavg", "krum"):
        assert not _matches(merged, FLOWER_DEFAULTS[name](initial, rounds))


def test_krum_returns_one_sites_update_unchanged() -> None:
    initial, rounds = _data()
    merged, _ = _federate(_run("krum"), initial, rounds)
    for got, updates in zip(merged, rounds, strict=True):
        chosen = updates[_krum_choice(updates, malicious=2)]
        for key in SHAPES:
            np.testing.assert_array_equal(got[key], chosen[key])


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedprox_sends_the_configured_mu_to_the_sites_and_fedavg_sends_none(name: str) -> None:
    """FedProx's mu acts in the sites' local loss (client/training.py reads it from the train
    message's config); FedAvg's train messages carry none."""
    initial, rounds = _data()
    _, sent = _federate(_run(name), initial, rounds)
    for message in (m for round_sent in sent for m in round_sent):
        config = message.content.config_records["config"]
        if name == "fedprox":
            assert config["proximal-mu"] == PROXIMAL_MU
        else:
            assert "proximal-mu" not in config


def test_the_arrays_sent_in_a_round_are_the_previous_rounds_aggregate() -> None:
    initial, rounds = _data()
    merged, sent = _federate(_run("fedadam"), initial, rounds)
    for before, round_sent in zip([initial, *merged[:-1]], sent, strict=True):
        for message in round_sent:
            received = arrays_from_record(message.content.array_records["arrays"])
            for key in SHAPES:
                assert received[key].dtype == np.float32
                np.testing.assert_array_equal(received[key], before[key])


def test_every_offered_strategy_has_a_formula_test() -> None:
    from common.registries import STRATEGIES

    assert set(_references()) == set(STRATEGIES) == set(CONFIGURED)
