"""Subcommands of `fedembed` beyond the single-site ones: the demo (and later federation commands)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from simulations.cache_command import register_cache
from simulations.compare_command import register_compare
from simulations.paths import dataset_option, run_config_paths, user_encoder, user_path


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the default job on built-in data and print the results table."""
    from simulations.demo import run_demo

    run_demo(out_dir=args.out, n=args.n, rounds=args.rounds, sites=args.sites)
    return 0


def register_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="4 simulated hospitals: frozen vs alone vs pooled vs federated (built-in data)"
    )
    p.add_argument(
        "--out", default="runs/demo", type=user_path, help="output directory (default: %(default)s)"
    )
    p.add_argument(
        "--n", type=int, default=1200, help="examples to generate (default: %(default)s)"
    )
    p.add_argument("--rounds", type=int, default=20, help="federated rounds (default: %(default)s)")
    p.add_argument(
        "--sites", type=int, default=4, help="simulated hospitals (default: %(default)s)"
    )
    p.set_defaults(func=cmd_demo)


def parse_run_config(text: str | None, *, option: str = "--run-config") -> dict[str, Any]:
    """``key=value ...`` text -> dict, parsed exactly as ``flwr run --run-config`` parses it.

    Values are TOML: numbers and booleans as they are, strings in quotes (``loss="supcon"``).
    Every fedembed command that takes run-config overrides parses them here.
    """
    from click import ClickException
    from flwr.common.config import parse_config_args

    from common.errors import ConfigError

    try:
        values = dict(parse_config_args([text] if text else None))
    except (ClickException, ValueError) as exc:
        message = exc.message if isinstance(exc, ClickException) else str(exc)
        raise ConfigError(f"{option} {text!r}: {message}") from None
    if text and not values:
        raise ConfigError(f"{option} {text!r}: expected key=value pairs")
    return values


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

    from simulations.federate import simulate, summarize

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

    from simulations.federate import deploy_local, summarize

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


def _add_federation_args(p: argparse.ArgumentParser, *, default_out: str) -> None:
    from common.config import LOSSES

    p.add_argument("--sites", type=int, default=3, help="number of sites (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default: %(default)s)")
    p.add_argument(
        "--data",
        default="synthetic-radiology",
        type=dataset_option("--data"),
        help="built-in dataset or CSV/JSONL manifest, split across the sites (default: %(default)s)",
    )
    p.add_argument("--n", type=int, default=None, help="examples in the pooled dataset")
    p.add_argument("--task", default=None, help="label task (iu-xray-reports)")
    p.add_argument(
        "--partition",
        default="iid",
        choices=["iid", "dirichlet", "quantity", "site"],
        help="how the pooled data is split across sites",
    )
    p.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration for --partition dirichlet"
    )
    p.add_argument(
        "--strategy",
        default="fedavg",
        help="fedavg, fedprox, fedadam, fedyogi, fedmedian, fedtrimmedavg, krum",
    )
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument(
        "--loss",
        default="infonce",
        choices=list(LOSSES),
    )
    p.add_argument("--head", default="default", help="head preset: default, paper, small")
    p.add_argument("--image-encoder", default="mobilenetv2", type=user_encoder)
    p.add_argument("--text-encoder", default="minilm", type=user_encoder)
    p.add_argument("--encoder-image-size", type=int, default=128)
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


def cmd_audit(args: argparse.Namespace) -> int:
    """Summarise a site's egress audit log and verify that only head arrays and scalars left."""
    from pathlib import Path

    from client.audit import AUDIT_FILE, verify_audit_log
    from common.errors import FedEmbedError

    path = Path(args.site_dir)
    path = path / AUDIT_FILE if path.is_dir() else path
    if not path.exists():
        raise FedEmbedError(f"no audit log at {path} (a site's state-dir holds {AUDIT_FILE})")
    summary = verify_audit_log(path)
    plain = summary.total_bytes - summary.secagg_bytes
    print(
        f"{path}: {summary.entries} replies left this site in {len(summary.runs)} run(s): "
        f"{plain:,} bytes of head weights and metrics"
        + (
            f", {summary.secagg_bytes:,} bytes in {summary.secagg_replies} SecAgg+ protocol replies"
            if summary.secagg_replies
            else ""
        )
    )
    spent = summary.epsilon_spent
    print(
        f"declined rounds: {summary.declined}; epsilon spent: "
        f"{spent if spent is not None else 'n/a (no sample-level DP)'}"
    )
    if summary.ok:
        print(
            "verified: every reply carried only float32 head arrays and scalar metrics"
            + (
                ", or SecAgg+ protocol payloads (masked head updates, public keys, key shares)"
                if summary.secagg_replies
                else ""
            )
        )
        return 0
    print(f"{len(summary.violations)} violation(s):")
    for violation in summary.violations:
        print(f"  {violation}")
    return 1


def register_audit(sub: Any) -> None:
    p = sub.add_parser("audit", help="summarise and verify a site's egress audit log")
    p.add_argument("site_dir", type=user_path, help="the site's state-dir (or its audit.jsonl)")
    p.set_defaults(func=cmd_audit)


REGISTRATIONS: list[Callable[[Any], None]] = [
    register_demo,
    register_federation,
    register_audit,
    register_compare,
    register_cache,
]
