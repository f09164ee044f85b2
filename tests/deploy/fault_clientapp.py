"""Test-only ClientApp for tests/deploy/test_faults_*.py: the real fedembed ClientApp plus injected faults.

Used only by a temporary app dir whose pyproject names it (``clientapp = "fault_clientapp:app"``);
the fedembed app never does. Clean sites run client/app.py unchanged, named by client/identity.py;
a site whose node-config says ``fault = "poison" | "malformed"`` misbehaves, and ``fault-dump-dir``
saves each honest update for comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import client.app as real
from client.identity import site_identity_mod
from common.flower import arrays_from_record, record_from_arrays

POISON_OFFSET = 5.0
HUGE_FLOATS = 4_000_000  # a 16 MB array beside the head

app = ClientApp()


def _clean(context: Context) -> Context:
    """The context the real ClientApp sees: the node-config without the test's fault-* keys."""
    node_config = {k: v for k, v in context.node_config.items() if not k.startswith("fault")}
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=node_config,
        state=context.state,
        run_config=context.run_config,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    fault = str(context.node_config.get("fault", ""))
    reply = site_identity_mod(msg, _clean(context), real.train)
    if reply.has_error():
        return reply
    config = msg.content.config_records["config"]
    server_round = int(str(config["server-round"])) + int(str(config.get("round-offset", 0)))
    arrays = arrays_from_record(reply.content.array_records["arrays"])
    dump = str(context.node_config.get("fault-dump-dir", ""))
    if dump:
        name = str(context.node_config["site-name"])
        np.savez(Path(dump) / f"{name}-round{server_round}.npz", **arrays)  # type: ignore[arg-type]
    if fault == "poison":  # a valid-looking update pushed far off in one direction
        poisoned = {k: (v + POISON_OFFSET).astype(np.float32) for k, v in arrays.items()}
        reply.content["arrays"] = record_from_arrays(poisoned)
    elif fault == "malformed":
        if server_round == 1:  # a huge extra array
            reply.content.array_records["arrays"]["payload"] = Array(
                np.ones(HUGE_FLOATS, dtype=np.float32)
            )
        elif server_round == 2:  # wrong shape for one array, NaN in another
            first, second = list(arrays)[:2]
            broken = dict(arrays)
            broken[first] = np.zeros((3, 3, 3), dtype=np.float32)
            broken[second] = np.full_like(arrays[second], np.nan)
            reply.content["arrays"] = record_from_arrays(broken)
        else:  # a valid head with a metric nobody else sends (Flower's FedAvg raises on that)
            metrics = dict(reply.content.metric_records["metrics"])
            reply.content["metrics"] = MetricRecord({**metrics, "surprise": 1.0})
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if str(context.node_config.get("fault", "")) == "malformed":  # list-valued, no num-examples
        content = RecordDict({"metrics": MetricRecord({"recall": [1.0, 2.0]})})
        return Message(content=content, reply_to=msg)
    return real.evaluate(msg, _clean(context))
