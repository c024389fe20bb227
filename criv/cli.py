"""The `criv` command line: serve, config, version."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from criv import __version__
from criv.config import Config, load_config
from criv.errors import CrivError
from criv.logsetup import setup_logging


def _load(path: str | None) -> Config:
    return load_config(Path(path) if path else None)


def _serve(args: argparse.Namespace) -> int:
    from criv.daemon import Daemon  # heavy imports only for the daemon

    cfg = _load(args.config)
    setup_logging(cfg.log)
    asyncio.run(Daemon(cfg).run())
    return 0


def _config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if args.action == "show":
        print(json.dumps(cfg.public_dict(), indent=2, sort_keys=True))
    else:
        print("configuration OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="criv", description="criv: a CRI runtime of VM pods")
    ap.add_argument("--version", action="version", version=f"criv {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the CRI daemon in the foreground")
    p.add_argument("--config", help="config file (default /etc/criv/config.yaml)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("config", help="check or show the effective configuration")
    p.add_argument("action", choices=["check", "show"])
    p.add_argument("--config", help="config file (default /etc/criv/config.yaml)")
    p.set_defaults(func=_config)

    args = ap.parse_args(argv)
    try:
        rc: int = args.func(args)
    except CrivError as e:
        print(f"criv: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
