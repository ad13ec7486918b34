"""`aidx dicomweb token NAME`: a new bearer token for a DICOMweb peer system, and the lines that
allow it (dicomweb.peers keeps only the token's SHA-256)."""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
import sys
from typing import TYPE_CHECKING

from aidx.cli.exit_codes import EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from aidx.config import AidxConfig


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dicomweb = sub.add_parser("dicomweb", help="DICOMweb service: tokens for peer systems")
    dicomweb_sub = dicomweb.add_subparsers(dest="dicomweb_command", metavar="ACTION", required=True)
    token = dicomweb_sub.add_parser(
        "token", help="make a bearer token for a peer system and print its dicomweb.peers entry"
    )
    token.add_argument("name", help="the peer's name (recorded as the source of what it stores)")
    token.add_argument("--read-only", action="store_true", help="no STOW-RS: search and read")
    token.set_defaults(handler=make_token)


def make_token(args: argparse.Namespace, config: AidxConfig) -> int:
    from aidx.config_dicomweb import PEER_NAME_PATTERN

    name = str(args.name)
    if not re.match(PEER_NAME_PATTERN, name):
        print(
            f"aidx dicomweb token: {name!r} is not a peer name: 1 to 16 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if any(p.name == name for p in config.dicomweb.peers):
        print(
            f"aidx dicomweb token: dicomweb.peers has a peer {name!r} already; to replace its "
            "token, put the new token_sha256 in its entry",
            file=sys.stderr,
        )
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
    print(f"bearer token for {name} (give it to that system; aidx keeps only its hash):")
    print(f"  {token}")
    print("add to the configuration, under dicomweb: peers:")
    print(f"  - name: {name}")
    print(f"    token_sha256: {digest}")
    if args.read_only:
        print("    store: false")
    return EXIT_OK
