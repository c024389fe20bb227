"""The operator's subcommands (`criv pods`, `containers`, `inspect`, `console`, `debug`),
registered on `criv`'s parser by :func:`register`. Each reads criv's state through its
CRI socket (and the records that names), and takes ``--config`` as `criv serve` does."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from criv.config import Config, load_config

CONFIG_HELP = "config file (default /etc/criv/config.yaml)"


def _cfg(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if args.config else None)


def _pods(args: argparse.Namespace) -> int:
    from criv.ops.tables import pods_command

    print(pods_command(_cfg(args), args.json))
    return 0


def _containers(args: argparse.Namespace) -> int:
    from criv.ops.tables import containers_command

    print(containers_command(_cfg(args), args.json))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from criv.ops.inspect import inspect_command

    print(inspect_command(_cfg(args), args.id))
    return 0


def _console(args: argparse.Namespace) -> int:
    from criv.ops.console import console_command

    return console_command(
        _cfg(args), args.pod, rw=args.rw, lines=args.lines, no_follow=args.no_follow, raw=args.raw
    )


def _debug(args: argparse.Namespace) -> int:
    from criv.ops.debug import debug_command

    command = ["/bin/sh", "-c", args.command] if args.command is not None else []
    return debug_command(_cfg(args), args.pod, command)


def register(sub: Any) -> None:
    """Add the operator subcommands to ``sub`` (argparse's subparsers action)."""
    p = sub.add_parser("pods", help="list pod sandboxes: mode, state, IP, VM pid, memory")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=_pods)

    p = sub.add_parser("containers", help="list containers with their pod, state and memory")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=_containers)

    p = sub.add_parser(
        "inspect", help="a pod's or container's records, paths, processes, domain XML (JSON)"
    )
    p.add_argument("id", help="pod sandbox or container id (a unique prefix will do)")
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(func=_inspect)

    p = sub.add_parser("console", help="follow a vm pod's serial console (read-only)")
    p.add_argument("pod", help="pod sandbox id (a unique prefix will do)")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--lines", "-n", type=int, default=50, help="lines of history first")
    p.add_argument("--no-follow", action="store_true", help="print the history and exit")
    p.add_argument("--raw", action="store_true", help="pass control characters through")
    p.add_argument("--rw", action="store_true", help="attach interactively (refused: see docs)")
    p.set_defaults(func=_console)

    p = sub.add_parser(
        "debug", help="a shell in a host-mode pod's namespaces, outside containers (audited)"
    )
    p.add_argument("pod", help="pod sandbox id (a unique prefix will do)")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument(
        "-c", "--command", help="run this with /bin/sh -c instead of an interactive $SHELL"
    )
    p.set_defaults(func=_debug)
