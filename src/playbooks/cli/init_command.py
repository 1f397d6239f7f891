"""``playbooks init``: write a commented ``playbooks.toml`` holding every default."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playbooks.config import CONFIG_FILENAME, ConfigError, write_default_config

__all__ = ("configure_init",)


def configure_init(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``playbooks init``."""
    parser.add_argument(
        "--path", type=Path, default=Path(CONFIG_FILENAME), help=f"where to write it (default: ./{CONFIG_FILENAME})"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.path.exists() and not args.force:
        print(f"playbooks init: {args.path} already exists; use --force to replace it", file=sys.stderr)
        return 1
    try:
        write_default_config(args.path, overwrite=args.force)
    except ConfigError as exc:
        print(f"playbooks init: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.path}")
    return 0
