"""`fedembed simulate` and `fedembed deploy-local`: N sites federated on this machine over Flower."""

from __future__ import annotations

import argparse
from typing import Any

from common.config import RunSettings
from simulations.cli.paths import dataset_option, run_config_paths, user_encoder, user_path
from simulations.flower.run_config import parse_run_config


def _federation_run_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {
        "num-server-rounds": args.rounds,
        "dataset": args.data,
        "partition": args.partition,
        "alpha": args.alpha,
        "strategy": args.strategy,
        "local-epochs": args.local_epochs,
        "loss": args.loss,
        "head": args.head,
        "image-encoder": args.image_encoder,
        "text-encoder": args.text_encoder,
        "encoder-image-size": args.encoder_image_size,
        "min-sites": args.sites,
    }
    if args.n is not None:
        config["dataset-n"] = args.n
    if args.task:
        config["task"] = args.task
    config.update(run_config_paths(parse_run_config(args.run_config), option="--run-config"))
    return config


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run N simulated sites with Flower's simulation engine."""
    from pathlib import Path

    from simulations.flower.federate import simulate, summarize

    fed = simulate(
        out_dir=Path(args.out),
        sites=args.sites,
        run_config=_federation_run_config(args),
        echo=args.verbose_flower,
    )
    print(summarize(fed))
    return 0 if fed.ok else 1


def cmd_deploy_local(args: argparse.Namespace) -> int:
    """Run a real SuperLink and N real SuperNodes on 127.0.0.1, then stop them."""
    from pathlib import Path

    from simulations.flower.federate import deploy_local, summarize

    fed = deploy_local(
        out_dir=Path(args.out),
        sites=args.sites,
        run_config=_federation_run_config(args),
        echo=args.verbose_flower,
        secure=args.secure,
        database=args.database,
    )
    print(summarize(fed))
    return 0 if fed.ok else 1


SITES = 3
"""`fedembed simulate/deploy-local --sites` default (RunSettings' min-sites is the least a run accepts)."""


def _add_federation_args(p: argparse.ArgumentParser, *, default_out: str) -> None:
    from common.config import LOSSES

    run = RunSettings()
    p.add_argument(
        "--sites", type=int, default=SITES, help="number of sites (default: %(default)s)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=run.num_server_rounds,
        help="federated rounds (default: %(default)s)",
    )
    p.add_argument(
        "--data",
        default=run.dataset,
        type=dataset_option("--data"),
        help="built-in dataset or CSV/JSONL manifest, split across the sites (default: %(default)s)",
    )
    p.add_argument("--n", type=int, default=None, help="examples in the pooled dataset")
    p.add_argument("--task", default=None, help="label task (iu-xray-reports)")
    p.add_argument(
        "--partition",
        default=run.partition,
        choices=["iid", "dirichlet", "quantity", "site"],
        help="how the pooled data is split across sites",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=run.alpha,
        help="Dirichlet concentration for --partition dirichlet",
    )
    p.add_argument(
        "--strategy",
        default=run.strategy,
        help="fedavg, fedprox, fedadam, fedyogi, fedmedian, fedtrimmedavg, krum",
    )
    p.add_argument("--local-epochs", type=int, default=run.local_epochs)
    p.add_argument("--loss", default=run.loss, choices=list(LOSSES))
    p.add_argument("--head", default=run.head, help="head preset: default, paper, small")
    p.add_argument("--image-encoder", default=run.image_encoder, type=user_encoder)
    p.add_argument("--text-encoder", default=run.text_encoder, type=user_encoder)
    p.add_argument("--encoder-image-size", type=int, default=run.encoder_image_size)
    p.add_argument(
        "--run-config",
        default=None,
        help="extra run-config overrides, as flwr run takes them: 'rounds=5 strategy=\"fedprox\"'",
    )
    p.add_argument(
        "--out",
        default=default_out,
        type=user_path,
        help="directory for caches, site state, logs and the run (default: %(default)s)",
    )
    p.add_argument(
        "--verbose-flower", action="store_true", help="stream Flower's run log to the terminal"
    )


def register_federation(sub: Any) -> None:
    """Add `simulate` and `deploy-local` to the `fedembed` subparsers."""
    p = sub.add_parser(
        "simulate", help="simulate N hospitals on this machine (Flower simulation engine)"
    )
    _add_federation_args(p, default_out="runs/simulate")
    p.set_defaults(func=cmd_simulate)
    p = sub.add_parser(
        "deploy-local",
        help="real SuperLink + N SuperNode processes on 127.0.0.1, stopped at the end",
    )
    _add_federation_args(p, default_out="runs/deploy-local")
    p.add_argument(
        "--secure",
        action="store_true",
        help="TLS and SuperNode authentication: deploy/pki.sh makes a CA, the SuperLink certificate "
        "and one key per site in OUT/pki, each key is registered with `flwr supernode register`",
    )
    p.add_argument(
        "--database",
        action="store_true",
        help="the SuperLink keeps its state in OUT/flower/state.db (survives a SuperLink restart; "
        "slower rounds) instead of in memory (Flower's default)",
    )
    p.set_defaults(func=cmd_deploy_local)
