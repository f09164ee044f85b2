"""`fedembed cache prune`: delete cached embeddings and site bundles that no kept manifest references."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from simulations.cli.paths import dataset_option, user_encoder, user_path

PRUNE_DESCRIPTION = """\
Delete every cached embedding and site bundle that the manifests you keep do not reference:
after a patient withdraws (their row is removed from the manifest), this removes their
embeddings too. Name EVERY manifest that uses this cache with --keep-data: anything else in it
(other manifests, built-in datasets) is deleted and would be embedded again when next used.

  --keep-data   the manifests to keep, as they are now: each row's image (by content) and text,
                and the class prompts, are kept under every encoder (or only under --keep-encoder)
  --cache-dir   the embedding cache (node-config cache-dir; default $FEDEMBED_HOME/cache)
  --state-dir   a site's state-dir (node-config state-dir): its bundles are kept only if built
                from a kept manifest as it is now, with the encoders' current weights

Relative paths are resolved against the current directory. Run it while the site is idle
(no run embedding into this cache): unfinished files are removed whatever their age.
"""


def cmd_cache_prune(args: argparse.Namespace) -> int:
    """Remove what no kept manifest references; print what was (or, with --dry-run, would be) removed."""
    from client.site import prune_bundles
    from common.cache import EmbeddingCache
    from common.config import DataSpec, resolve_path
    from common.data.manifest import MANIFEST_SUFFIXES, read_manifest
    from common.embedding import cache_keys
    from common.encoders import ENCODER_CODE_VERSION, fingerprint_files, weight_files
    from common.errors import ConfigError

    cache_dir = Path(args.cache_dir) if args.cache_dir else resolve_path("", "cache")
    if not cache_dir.is_dir():
        raise ConfigError(f"--cache-dir {cache_dir}: no such directory")
    state_dirs = [Path(d) for d in args.state_dir]
    for state_dir in state_dirs:
        if not state_dir.is_dir():
            raise ConfigError(f"--state-dir {state_dir}: no such directory")
    keep: set[str] = set()
    manifests: set[Path] = set()
    for manifest in args.keep_data:  # everything is read before anything is removed
        if Path(manifest).suffix.lower() not in MANIFEST_SUFFIXES:
            raise ConfigError(
                f"--keep-data {manifest}: not a manifest ({' or '.join(MANIFEST_SUFFIXES)})"
            )
        report = read_manifest(manifest, on_error="skip")
        keep |= cache_keys(report.dataset)
        manifests.add(Path(manifest).resolve())
        unusable = f", {len(report.skipped)} unusable rows not kept" if report.skipped else ""
        print(f"keeping {manifest}: {len(report.dataset)} rows{unusable}")
    weights = {fingerprint_files(weight_files(spec)) for spec in args.keep_encoder or ()}

    def keep_encoder(identity: dict[str, Any]) -> bool:
        current = identity.get("code_version") == ENCODER_CODE_VERSION
        return current and identity.get("weights") in weights

    def keep_bundle(spec: DataSpec, encoders: dict[str, Any]) -> bool:
        if Path(spec.dataset).expanduser().resolve() not in manifests:
            return False
        return not weights or all(keep_encoder(identity) for identity in encoders.values())

    verb = "would remove" if args.dry_run else "removed"
    for state_dir in state_dirs:
        pruned = prune_bundles(state_dir, keep_bundle, dry_run=args.dry_run)
        print(
            f"site bundles in {state_dir}: {verb} {len(pruned.removed)} "
            f"({pruned.bytes_removed:,} bytes), kept {len(pruned.kept)}"
        )
    if not state_dirs:
        print("site bundles: none checked (give each site's --state-dir)")
    cache = EmbeddingCache(cache_dir).prune(
        keep, keep_encoder=keep_encoder if weights else None, dry_run=args.dry_run
    )
    about = "about " if args.dry_run and cache.shards_rewritten else ""
    print(
        f"embedding cache {cache_dir}: {verb} {cache.entries_removed} entries "
        f"({cache.shards_rewritten} shards rewritten, {cache.shards_removed} shards and "
        f"{cache.encoders_removed} encoder directories deleted, {cache.leftovers_removed} "
        f"leftover files), {about}{cache.bytes_freed:,} bytes; kept {cache.entries_kept} entries"
    )
    if args.dry_run:
        print("dry run: nothing was changed")
    return 0


def register_cache(sub: Any) -> None:
    p = sub.add_parser("cache", help="manage a site's embedding cache (prune after a withdrawal)")
    commands = p.add_subparsers(dest="cache_command", metavar="COMMAND", required=True)
    prune = commands.add_parser(
        "prune",
        help="delete cached embeddings and site bundles that no kept manifest references",
        description=PRUNE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prune.add_argument(
        "--keep-data",
        action="append",
        required=True,
        metavar="MANIFEST",
        type=dataset_option("--keep-data"),
        help="a manifest (.csv/.jsonl) whose rows stay cached; repeat for every manifest",
    )
    prune.add_argument(
        "--cache-dir",
        type=user_path,
        default=None,
        help="the embedding cache (default: $FEDEMBED_HOME/cache)",
    )
    prune.add_argument(
        "--state-dir",
        action="append",
        type=user_path,
        default=[],
        metavar="DIR",
        help="a site's state-dir whose bundles are pruned too; repeatable",
    )
    prune.add_argument(
        "--keep-encoder",
        action="append",
        type=user_encoder,
        default=None,
        metavar="ENCODER",
        help="keep entries of this encoder only (packaged name, model directory or Hugging Face "
        "id; repeatable); default: keep the kept rows under every encoder",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="print what would be removed; change nothing"
    )
    prune.set_defaults(func=cmd_cache_prune)
