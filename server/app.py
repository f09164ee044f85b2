"""The coordinator's Flower ServerApp: aggregates head weights, evaluates, checkpoints, exports the final head."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.config import RunSettings
from common.errors import FedEmbedError
from common.flower import arrays_from_record, metric_record, record_from_arrays
from common.preflight import check_run
from common.privacy import PrivacySettings
from common.wire import HEAD_STARTED, ROUND_OFFSET, absolute_round
from server.checkpoints import RunStore
from server.closed_form import federated_start
from server.history import write_round
from server.privacy import client_dp
from server.receipts import ReceiptGrid
from server.strategy import (
    Accounting,
    EmptyRoundError,
    UpdateCheck,
    build_strategy,
    require_trained,
)

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run-config.

    A run-config no site could run (common/preflight.py) is refused before round 1, and a run that
    cannot give a trained head (server/strategy/rounds.py RunFailed) stops: both raise, so Flower marks
    the run ``finished:failed``, and no final head is exported.
    """
    try:
        run = check_run(dict(context.run_config))
        if run.secure_aggregation:  # Flower's legacy SecAgg+ workflow (server/secagg.py)
            from server.secagg import run_secure_federation

            run_secure_federation(grid, context, run, data_spec=_evaluation_spec(run))
            return
        sample_dp = PrivacySettings.merge(dict(context.run_config), {}).requested
        run_federation(grid, run, run_id=context.run_id, sample_dp=sample_dp)
    except FedEmbedError as exc:
        print(f"[fedembed] run failed: {exc}", flush=True)
        raise


def run_federation(grid: Grid, run: RunSettings, *, run_id: int, sample_dp: bool = False) -> Path:
    """Train the global head for ``run.num_server_rounds`` rounds (resuming if asked); return the run dir.

    A fresh run of an ``aligned`` head first sets the head to the federation's closed-form start
    (server/closed_form.py; not with DP: ``sample_dp`` says the run-config turns on sample-level
    DP at every site), and round 1 then returns that start untrained.
    """
    from common.artifacts import load_state_arrays, state_arrays
    from server.model import ServerEvaluator, initial_model, task_config

    store = RunStore(run.run_path)
    model, task = initial_model(run)
    shapes = {k: tuple(v.shape) for k, v in state_arrays(model).items()}
    meta = {
        "model": model.describe(),
        "run": run.to_dict(),
        "task": task,
        "data": _evaluation_spec(run),
    }
    start_round, arrays = 0, state_arrays(model)
    checkpoint = store.latest_checkpoint() if run.resume else None
    receipt_grid = ReceiptGrid(  # a receipt (digest) of every reply: <run-dir>/replies.jsonl
        grid,
        run_dir=store.root,
        run_id=run_id,
        poll_interval=run.reply_poll_interval,
        first_round_timeout=run.first_round_timeout or None,
    )
    started = False
    if checkpoint is not None:
        start_round = checkpoint.round
        load_state_arrays(model, checkpoint.arrays, source=f"checkpoint of round {start_round}")
        arrays = state_arrays(model)  # the head's key order: DP clipping pairs arrays by position
        store.truncate_history(start_round)
        print(f"[fedembed] resuming run from round {start_round} ({store.root})", flush=True)
    else:
        store.start_fresh(arrays, meta)  # an earlier run in run-dir is archived first
        if run.num_server_rounds > 0:
            start = federated_start(
                receipt_grid, run, model, timeout=run.round_timeout, sample_dp=sample_dp
            )
            print(start.line(), flush=True)
            meta["start"] = start.to_dict()
            started = start.used
            arrays = state_arrays(model)
            store.save_checkpoint(0, arrays, meta)  # round 0: the head round 1 is sent
    store.write_run_info({"flower_run_id": run_id, "started_round": start_round, **meta})
    evaluator = ServerEvaluator(run) if run.server_eval else None
    accounting = Accounting()
    remaining = run.num_server_rounds - start_round
    if remaining > 0:
        dp = client_dp(run, history=store.read_history() if start_round > 0 else ())
        strategy = build_strategy(
            run,
            check=UpdateCheck(
                shapes=shapes,
                max_update_norm=dp.update_norm_bound if dp else run.max_update_norm,
            ),
            accounting=accounting,
            round_offset=start_round,
            aggregator=dp.strategy if dp else None,
        )
        if start_round > 0 and strategy.has_server_state:
            state = store.load_server_state(start_round)
            if state is None:
                print(
                    f"[fedembed] no server optimiser state saved with round {start_round}: "
                    f"{run.strategy} restarts its state from zero",
                    flush=True,
                )
            else:
                strategy.restore_server_state(state, list(shapes))

        def evaluate_fn(server_round: int, record: ArrayRecord) -> MetricRecord | None:
            absolute = absolute_round(server_round, start_round)
            current = arrays_from_record(record)
            server_metrics = evaluator.evaluate(current) if evaluator else {}
            if server_round > 0:
                # History first: a crash between the two leaves round r in the history but not
                # checkpointed, and resume trims the history back to the last checkpoint.
                entry = accounting.current(absolute)
                write_round(store, entry, server_metrics, dp.round_record() if dp else None)
                store.save_server_state(absolute, strategy.server_state())
                store.save_checkpoint(absolute, current, meta)
            return metric_record(server_metrics) if server_metrics else None

        try:
            result = strategy.start(
                grid=receipt_grid,
                initial_arrays=record_from_arrays(arrays),
                num_rounds=remaining,
                timeout=run.round_timeout,
                train_config=ConfigRecord(
                    {ROUND_OFFSET: start_round, HEAD_STARTED: started, **task_config(task)}
                ),
                evaluate_config=ConfigRecord({ROUND_OFFSET: start_round}),
                evaluate_fn=evaluate_fn,
            )
        except EmptyRoundError as stop:  # the round goes into the history, not into a checkpoint
            entry = accounting.current(stop.server_round)
            write_round(store, entry, {}, dp.round_record() if dp else None)
            raise
        if len(result.arrays) > 0:
            arrays = arrays_from_record(result.arrays)
        client_eval = {
            str(absolute_round(r, start_round)): dict(m)
            for r, m in result.evaluate_metrics_clientapp.items()
        }
    else:
        client_eval = {}
    require_trained(store.read_history())
    store.export_final(
        model,
        arrays,
        {**meta, "rounds": run.num_server_rounds, "site_evaluation": client_eval},
    )
    return store.root


def _evaluation_spec(run: RunSettings) -> dict[str, Any]:
    """The DataSpec `fedembed evaluate --head <run>/final` uses by default: the run's dataset, pooled
    (``RunSettings.data_spec``: dataset-n for a built-in dataset, a manifest whole)."""
    return run.data_spec().to_dict()
