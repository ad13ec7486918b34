"""A serving variant of a two-stage detector: the same networks, other candidate settings.

Some design steps change only what the serving path does around the networks (which candidates
the classifier sees, how many); they need a model version of their own, with its own figures,
but no training run. ``derive`` makes that version from a registered one: its ``model.onnx``
and classifier copied byte for byte, its card's ``detector.candidates`` updated, and, with an
``aidx evaluate`` froc.json, the card's figures and the operating threshold (chosen on another
set's curve with ``--threshold-from``, so that held-out figures stay held out)::

    python -m training.derive lung-nodule@0.6.1 --version 0.7.0 \\
        --set background_mm=13 --set max_candidates=300 [--root aidx-data/models]
    aidx evaluate --model lung-nodule@0.7.0 --dataset SELECTION --out SELECTION-EVAL
    python -m training.derive lung-nodule@0.6.1 --version 0.7.0 --set ... \\
        --evaluation HELD-OUT-EVAL/froc.json --threshold-from SELECTION-EVAL/froc.json

Running it again with the same settings rewrites the card only (the figures are added once
they exist); a version that holds other networks is refused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from models.registry import (
    ONNX_FILE,
    CandidateSettings,
    ModelCard,
    ModelEntry,
    ModelError,
    Registry,
    sha256_of,
)
from training.froc_io import evaluation_figures, operating_point


class DeriveError(ValueError):
    """The variant cannot be made; the message says why and what to do."""


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs of ``detector.candidates`` (VALUE as JSON, e.g. 13, null, true)."""
    fields = CandidateSettings.model_fields
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            known = ", ".join(sorted(fields))
            raise DeriveError(f"--set {pair!r}: expected KEY=VALUE with KEY one of: {known}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            raise DeriveError(
                f"--set {pair!r}: the value is not a number, true/false or null"
            ) from None
    return out


def derive(
    base: ModelEntry,
    root: Path,
    version: str,
    settings: dict[str, Any],
    command: str,
    evaluation: dict[str, Any] | None = None,
    threshold_from: dict[str, Any] | None = None,
    operating_fp_rate: float = 1.0,
    description: str | None = None,
    limitations: list[str] | None = None,
    network: str | None = None,
) -> Path:
    """The folder ``root/<name>/<version>``: ``base``'s networks and a card with ``settings``
    in its ``detector.candidates`` (see the module); ``description``, ``limitations`` and
    ``network`` replace the base card's (its limitations name its own figures)."""
    card = base.card
    if card.detector is None:
        raise DeriveError(f"{base.ref} is not a two-stage detector: nothing to derive")
    if version == card.version:
        raise DeriveError(f"--version {version} is the base's own version; choose a new one")
    try:
        candidates = CandidateSettings.model_validate(
            card.detector.candidates.model_dump() | settings
        )
    except ValidationError as err:
        problem = err.errors()[0]
        raise DeriveError(
            f"--set {'.'.join(str(p) for p in problem['loc'])}: {problem['msg']}"
        ) from None
    folder = root / card.name / version
    files = (ONNX_FILE, card.detector.classifier.file)
    for name in files:
        target = folder / name
        if target.exists() and sha256_of(target) != sha256_of(base.folder / name):
            raise DeriveError(
                f"{target} holds another network than {base.ref}'s; "
                f"choose another --version or remove {folder}"
            )
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        if not (folder / name).exists():
            shutil.copyfile(base.folder / name, folder / name)
    threshold = card.output.operating_threshold
    figures: dict[str, float] = {}
    if evaluation is not None:
        figures = evaluation_figures(evaluation)
        threshold, fp = operating_point(threshold_from or evaluation, operating_fp_rate)
        figures["operating_fp_per_scan"] = fp
    changed = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(settings.items()))
    derived = card.model_copy(
        update={
            "version": version,
            "date": datetime.date.today(),
            "description": (description or card.description)
            + f" Derived from {base.ref}: {changed or 'as is'}.",
            "limitations": limitations if limitations is not None else card.limitations,
            "network": network or card.network,
            "output": card.output.model_copy(update={"operating_threshold": threshold}),
            "training": card.training.model_copy(
                update={"command": f"{card.training.command}; then: {command}"}
            ),
            "evaluation": figures,
            "detector": card.detector.model_copy(update={"candidates": candidates}),
        }
    )
    ModelCard.model_validate(derived.model_dump())  # the card a registry will read
    (folder / "card.json").write_text(derived.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.derive", description=__doc__.splitlines()[0]
    )
    parser.add_argument("base", help="the model version to start from, e.g. lung-nodule@0.6.1")
    parser.add_argument("--version", required=True)
    parser.add_argument("--root", type=Path, default=Path("aidx-data/models"))
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a detector.candidates setting of the new version (repeatable)",
    )
    parser.add_argument("--evaluation", type=Path, help="froc.json of the new version")
    parser.add_argument("--threshold-from", type=Path, help="froc.json to choose the threshold on")
    parser.add_argument("--operating-fp-rate", type=float, default=1.0)
    parser.add_argument("--description", help="the card's description (default: the base's)")
    parser.add_argument("--network", help="the card's network line (default: the base's)")
    parser.add_argument(
        "--limitation",
        dest="limitations",
        action="append",
        help="a limitation of the new version (repeatable; replaces the base's list)",
    )
    args = parser.parse_args(argv)
    if args.threshold_from is not None and args.evaluation is None:
        parser.error("--threshold-from chooses the threshold for --evaluation's figures: give both")
    import models  # noqa: PLC0415

    shipped = Path(models.__file__).resolve().parent / "shipped"
    try:
        base = Registry(args.root, (shipped,)).resolve(args.base, "lung-nodule")
        evaluation, chooser = (
            json.loads(p.read_text(encoding="utf-8")) if p is not None else None
            for p in (args.evaluation, args.threshold_from)
        )
        words = argv if argv is not None else sys.argv[1:]
        command = "python -m training.derive " + " ".join(words)
        folder = derive(
            base,
            args.root,
            args.version,
            parse_settings(args.settings),
            command,
            evaluation,
            chooser,
            args.operating_fp_rate,
            args.description,
            args.limitations,
            args.network,
        )
    except (DeriveError, ModelError, OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model folder: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
