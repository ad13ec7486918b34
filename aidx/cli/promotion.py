"""`aidx models shadow`, `report`, `gate-evaluate` and `promote`: a challenger read live studies
in shadow, the evidence for it, and the gate that a promotion passes (docs/models/promoting.md).

The gate (``models.gate``; off while ``models.gate.dataset`` is unset) lets a version become the
active one when (1) its card records a gate evaluation (``aidx models gate-evaluate``) against
the current champion on the configured dataset whose CPM difference's lower bound is at least
``-margin``, and (2) with ``min_shadow_studies`` above 0, it read at least that many signed
studies in shadow mode, its sensitivity against the signed reads is non-inferior (lower bound of
the difference at least ``-margin``) and its false positives per study are not worse by more
than ``fp_margin`` (upper bound). ``--force --reason`` promotes anyway and is audited, like
every promotion, shadow change and rollback.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aidx.cli.common import NoStoreError, cli_actor, open_existing_store
from aidx.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from aidx.cli.models import _models_command, _registry

if TYPE_CHECKING:
    from aidx.config import AidxConfig
    from aidx.store.store import Store
    from training.practice import PracticeReport


def add_commands(models_sub: Any) -> None:
    """The subcommands of `aidx models` that this module owns."""
    shadow = models_sub.add_parser(
        "shadow", help="run a challenger on live studies beside the champion, showing nothing"
    )
    shadow.add_argument("ref", nargs="?", metavar="NAME@VERSION", help="none: list the shadows")
    shadow.add_argument("--route", metavar="ROUTE", help="only this route (default: every route)")
    shadow.add_argument("--off", action="store_true", help="end shadow mode of NAME")
    shadow.set_defaults(handler=models_shadow)
    report = models_sub.add_parser(
        "report", help="a challenger against the champion on the signed reads (shadow mode)"
    )
    report.add_argument("ref", metavar="NAME@VERSION")
    report.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON")
    report.set_defaults(handler=models_report)
    gate = models_sub.add_parser(
        "gate-evaluate",
        help="compare a version with the champion on models.gate.dataset; record it in its card",
    )
    gate.add_argument("ref", metavar="NAME@VERSION")
    gate.add_argument("--out", type=Path, metavar="DIR", help="default: <data_dir>/gate/REF")
    gate.set_defaults(handler=models_gate_evaluate)
    promote = models_sub.add_parser("promote", help="make a version the active one (gated)")
    promote.add_argument("ref", metavar="NAME@VERSION")
    promote.add_argument("--force", action="store_true", help="promote although the gate fails")
    promote.add_argument("--reason", help="why (required with --force; audited)")
    promote.set_defaults(handler=models_promote)


# ------------------------------------------------------------------------------------ shadow
def models_shadow(args: argparse.Namespace, config: AidxConfig) -> int:
    from aidx.pipeline.routing import routes

    def run() -> int:
        registry = _registry(config)
        if args.ref is None:
            shadows = registry.shadows()
            for s in shadows:
                print(
                    f"{s.ref} in shadow of {s.name} on {s.route or 'every route'} since {s.since}"
                )
            if not shadows:
                print("no model is in shadow mode")
            return EXIT_OK
        name, _, version = args.ref.partition("@")
        if args.off:
            before = registry.clear_shadow(name)
            print(f"shadow mode of {name} ended ({before.ref})" if before else f"{name}: no shadow")
            if before:
                _audit(config, "model_shadow_off", {"model": before.ref})
            return EXIT_OK
        if not version:
            print("aidx models shadow: give NAME@VERSION (or NAME --off)", file=sys.stderr)
            return EXIT_USAGE
        names = [r.name for r in routes(config)]
        if args.route is not None and args.route not in names:
            print(
                f"aidx models shadow: no route {args.route!r} (pipeline.routes: "
                f"{', '.join(names)})",
                file=sys.stderr,
            )
            return EXIT_USAGE
        shadow = registry.set_shadow(name, version, args.route, _now())
        champion = registry.active(name)
        print(
            f"{shadow.ref} runs in shadow of {champion.ref if champion else name} on "
            f"{args.route or 'every route of ' + name}: after each live job, when no live job "
            "waits; its results are stored, never sent or shown on the worklist"
        )
        _audit(config, "model_shadow", {"model": shadow.ref, "route": args.route})
        return EXIT_OK

    return _models_command(run)


# ------------------------------------------------------------------------------------ report
def models_report(args: argparse.Namespace, config: AidxConfig) -> int:
    def run() -> int:
        entry = _registry(config).get(*_split(args.ref))
        store = _store(config)
        if store is None:
            print(f"aidx models report: no store at {_db(config)}", file=sys.stderr)
            return EXIT_FAILED
        try:
            report = _practice(store, entry.ref, config.models.gate.bootstrap)
        finally:
            store.close()
        for line in describe(report):
            print(line)
        if args.json is not None:
            args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
            print(f"written: {args.json}")
        return EXIT_OK

    return _models_command(run)


def describe(report: PracticeReport) -> list[str]:
    """The report as text: per band, both models' figures and the differences."""
    champions = ", ".join(report.champions) or "none"
    lines = [
        f"{report.challenger} in shadow: {report.studies} signed studies (champion: {champions})",
        f"  matched to the signed reads: centre within the final finding's radius; "
        f"{report.confidence:.0%} paired bootstrap over studies, {report.bootstrap_samples} "
        "resamples",
    ]
    for b in report.bands:
        lines.append(f"  {b.band}: {b.champion.positives} positives")
        for label, f in (("champion", b.champion), ("challenger", b.challenger)):
            sens = "-" if f.sensitivity is None else f"{f.sensitivity:.3f}"
            fps = "-" if f.fp_per_study is None else f"{f.fp_per_study:.2f}"
            lines.append(
                f"    {label:<10} sensitivity {sens} ({f.detected}/{f.positives}); "
                f"FP/study {fps} ({f.false_positives}, {f.at_negatives} at rejected findings)"
            )
        lines.append(
            f"    difference sensitivity {_diff(b.sensitivity_difference)}; "
            f"FP/study {_diff(b.fp_difference)}"
        )
    return lines


def _diff(d: Any) -> str:
    if d.value is None:
        return "-"
    ci = f" [{d.ci[0]:+.3f}, {d.ci[1]:+.3f}]" if d.ci else ""
    return f"{d.value:+.3f}{ci}"


# ------------------------------------------------------------------------------ gate-evaluate
def models_gate_evaluate(args: argparse.Namespace, config: AidxConfig) -> int:
    from inference.pipeline import runner_options
    from models.registry import GateEvaluation
    from training.dataset import DatasetError
    from training.evaluate import compare_evaluations, evaluate_model
    from training.froc import FrocError

    gate = config.models.gate

    def run() -> int:
        if gate.dataset is None:
            print(
                "aidx models gate-evaluate: the gate is off: set models.gate.dataset to the "
                "frozen evaluation set (a folder with dataset.json)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        registry = _registry(config)
        name, version = _split(args.ref)
        challenger = registry.resolve(args.ref, config.models.default)
        champion = registry.active(name)
        if champion is None or champion.ref == challenger.ref:
            print(
                f"aidx models gate-evaluate: {args.ref} has no other active version to be "
                "compared with",
                file=sys.stderr,
            )
            return EXIT_USAGE
        out = args.out or config.data_dir / "gate" / challenger.ref
        folders = {}
        try:
            for entry in (champion, challenger):
                folders[entry.ref] = out / entry.ref
                evaluate_model(
                    registry.resolve(entry.ref, config.models.default),
                    gate.dataset,
                    folders[entry.ref],
                    runner_options(config),
                    min_volume_mm3=config.inference.min_volume_mm3,
                    merge_distance_mm=config.inference.merge_distance_mm,
                    bootstrap=0,
                )
            result = compare_evaluations(
                gate.dataset,
                folders[champion.ref],
                folders[challenger.ref],
                bootstrap=gate.bootstrap,
            )
        except (DatasetError, FrocError) as exc:
            print(f"aidx models gate-evaluate: {exc}", file=sys.stderr)
            return EXIT_FAILED
        lo, hi = result.difference_ci
        record = GateEvaluation(
            champion=champion.ref,
            dataset=str(gate.dataset.resolve()),
            at=_now(),
            cpm_champion=result.cpm_a,
            cpm_challenger=result.cpm_b,
            difference=result.difference,
            ci_low=lo,
            ci_high=hi,
            confidence=result.confidence,
            bootstrap_samples=result.bootstrap_samples,
            margin=gate.margin,
            passed=lo >= -gate.margin,
        )
        registry.record_gate(name, version, record)
        print(_gate_line(record))
        print(f"recorded in the card of {challenger.ref}; evaluations in {out}")
        return EXIT_OK

    return _models_command(run)


# ------------------------------------------------------------------------------------ promote
def models_promote(args: argparse.Namespace, config: AidxConfig) -> int:
    def run() -> int:
        name, version = _split(args.ref)
        if not version:
            print("aidx models promote: give NAME@VERSION", file=sys.stderr)
            return EXIT_USAGE
        if args.force and not (args.reason or "").strip():
            print(
                'aidx models promote: --force needs --reason "why" (it is audited)',
                file=sys.stderr,
            )
            return EXIT_USAGE
        registry = _registry(config)
        entry = registry.get(name, version)
        passed, evidence = gate_verdict(config, entry)
        for line in evidence:
            print(line)
        if not passed and not args.force:
            print(
                f"aidx models promote: {entry.ref} is not promoted: the gate fails (above: what "
                'is missing). Promote anyway with --force --reason "..." (audited)',
                file=sys.stderr,
            )
            return EXIT_FAILED
        previous = registry.active(name)
        registry.promote(name, version)
        forced = args.force and not passed
        _audit(
            config,
            "model_promote_forced" if forced else "model_promote",
            {
                "model": entry.ref,
                "previous": previous.ref if previous else None,
                "gate": "passed" if passed else "failed",
                "reason": (args.reason or "").strip() or None,
                "evidence": evidence,
            },
            create=forced,
        )
        note = " (forced past the gate; audited)" if forced else ""
        print(f"{entry.ref} is now the active version of {name}{note}")
        return EXIT_OK

    return _models_command(run)


def gate_verdict(config: AidxConfig, entry: Any) -> tuple[bool, list[str]]:
    """Whether ``entry`` passes the promotion gate, and the evidence and what is missing."""
    gate = config.models.gate
    if gate.dataset is None:
        return True, [
            "gate: off (models.gate.dataset is not set): any registered version may be promoted"
        ]
    registry = _registry(config)
    champion = registry.active(entry.card.name)
    if champion is None or champion.ref == entry.ref:
        return True, [f"gate: {entry.card.name} has no other active version to compare with"]
    lines = [f"gate: {entry.ref} against the champion {champion.ref}"]
    dataset = str(gate.dataset.resolve())
    records = [g for g in entry.card.gate if g.champion == champion.ref and g.dataset == dataset]
    frozen = False
    if records:
        latest = records[-1]
        frozen = latest.ci_low >= -gate.margin  # the margin configured now
        lines.append(f"  frozen dataset: {_gate_line(latest)}")
        if not frozen:
            lines.append(f"  missing: a CPM difference whose lower bound is >= {-gate.margin:+g}")
    else:
        lines.append(
            f"  missing: a gate evaluation against {champion.ref} on {dataset}: run "
            f"`aidx models gate-evaluate {entry.ref}`"
        )
    practice = True
    if gate.min_shadow_studies > 0:
        practice = False
        store = _store(config)
        if store is None:
            lines.append(f"  missing: shadow studies (no store at {_db(config)})")
        else:
            try:
                report = _practice(store, entry.ref, gate.bootstrap)
            finally:
                store.close()
            practice, found = _practice_verdict(report, gate.min_shadow_studies, gate)
            lines.extend(found)
    return frozen and practice, lines


def _practice_verdict(report: PracticeReport, minimum: int, gate: Any) -> tuple[bool, list[str]]:
    overall = report.band()
    lines = [
        f"  shadow mode: {report.studies} signed studies (at least {minimum} needed); "
        f"sensitivity {_diff(overall.sensitivity_difference)}, "
        f"FP/study {_diff(overall.fp_difference)} (challenger - champion)"
    ]
    ok = True
    if report.studies < minimum:
        ok = False
        lines.append(
            f"  missing: {minimum - report.studies} more signed studies read in shadow "
            f"(`aidx models shadow {report.challenger}`)"
        )
    sens, fps = overall.sensitivity_difference, overall.fp_difference
    if sens.ci is None or sens.ci[0] < -gate.margin:
        ok = False
        lines.append(
            f"  missing: a sensitivity difference whose lower bound is >= {-gate.margin:+g}"
        )
    if fps.ci is None or fps.ci[1] > gate.fp_margin:
        ok = False
        lines.append(
            f"  missing: an FP/study difference whose upper bound is <= {gate.fp_margin:+g}"
        )
    return ok, lines


def _gate_line(g: Any) -> str:
    verdict = "passes" if g.ci_low >= -g.margin else "fails"
    return (
        f"CPM {g.cpm_challenger:.3f} vs {g.cpm_champion:.3f} ({g.champion}) on {g.dataset}: "
        f"difference {g.difference:+.3f}, {g.confidence:.0%} paired bootstrap "
        f"[{g.ci_low:+.3f}, {g.ci_high:+.3f}]; {verdict} the margin {-g.margin:+g} ({g.at})"
    )


# ---------------------------------------------------------------------------------- helpers
def _practice(store: Store, challenger: str, bootstrap: int) -> PracticeReport:
    from training.practice import gather, report

    return report(gather(store, challenger), challenger, bootstrap=bootstrap)


def _split(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition("@")
    return name, version


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _db(config: AidxConfig) -> Path:
    return (config.data_dir / "aidx.db").resolve()


def _store(config: AidxConfig) -> Store | None:
    """The node's store, or None when the default SQLite one was never made."""
    try:
        return open_existing_store(config)
    except NoStoreError:
        return None


def _audit(config: AidxConfig, action: str, detail: dict[str, Any], create: bool = False) -> None:
    """An entry in the audit log (``aidx audit list``): the operating-system account
    (``cli:<user>``), from the command line of this host. Without a store (a fresh install)
    there is no log to write, unless ``create`` (a forced promotion is always audited)."""
    from aidx.store.store import Store
    from ui.audit import Audit

    store = _store(config)
    if store is None:
        if not create:
            return
        config.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(config.store_url())
    try:
        Audit(store).record(cli_actor(), None, action, None, detail, f"cli@{socket.gethostname()}")
    finally:
        store.close()
