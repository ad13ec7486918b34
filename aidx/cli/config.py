"""`aidx config show` and `aidx config check`: the effective configuration, and whether it and
the TLS private keys it names may be used."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from aidx.cli.exit_codes import EXIT_OK, EXIT_USAGE
from aidx.permissions import private_key_problem

if TYPE_CHECKING:
    from aidx.config import AidxConfig


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = sub.add_parser("config", help="show or check the configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print the effective configuration, secrets masked")
    show.add_argument("--format", choices=["yaml", "json"], default="yaml")
    show.set_defaults(handler=config_show)
    check = config_sub.add_parser("check", help="validate the configuration and exit")
    check.set_defaults(handler=config_check)


def config_show(args: argparse.Namespace, config: AidxConfig) -> int:
    from aidx.config_show import dump_yaml, redacted

    data = redacted(config)
    if args.format == "json":
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(dump_yaml(data), end="")
    return EXIT_OK


def config_check(args: argparse.Namespace, config: AidxConfig) -> int:
    del args  # loading already validated the configuration; the key files are checked here
    problems = key_file_problems(config)
    for problem in problems:
        print(f"aidx: {problem}", file=sys.stderr)
    if problems:
        return EXIT_USAGE
    print("configuration is valid")
    return EXIT_OK


def key_file_problems(config: AidxConfig) -> list[str]:
    """Every configured TLS private key that must not be used (aidx.permissions), as
    ``setting: problem``."""
    from aidx.config import DestinationConfig

    keys = {
        "node.tls.private_key": config.node.tls.private_key,
        "ui.private_key": config.ui.private_key,
        "dicomweb.private_key": config.dicomweb.private_key,
    }
    for name, destination in config.destinations.items():
        if isinstance(destination, DestinationConfig):
            keys[f"destinations.{name}.tls.private_key"] = destination.tls.private_key
    problems = []
    for setting, path in keys.items():
        problem = private_key_problem(path) if path is not None else None
        if problem is not None:
            problems.append(f"{setting}: {problem}")
    return problems
