"""Routing and priority from the configuration: which model reads which series of a study,
where each route's results go, and which studies jump the queue."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from aidx.config import AidxConfig, OutputKind, PriorityRuleConfig, RouteConfig
from aidx.deflate import read_header
from aidx.store.store import Store
from inference.series import SeriesRules, series_rules

log = logging.getLogger("aidx.routing")

DEFAULT_OUTPUTS: tuple[OutputKind, ...] = ("sr", "seg")


@dataclass(frozen=True)
class Route:
    name: str
    model: str | None  # None: models.default
    calling_ae_titles: tuple[str, ...]
    rules: SeriesRules
    outputs: dict[str, tuple[OutputKind, ...]]  # destination -> kinds

    def accepts_caller(self, calling_ae: str) -> bool:
        return not self.calling_ae_titles or calling_ae in self.calling_ae_titles

    @property
    def key_images(self) -> bool:
        return any("key_images" in kinds for kinds in self.outputs.values())

    @property
    def kos(self) -> bool:
        return any("kos" in kinds for kinds in self.outputs.values())

    @property
    def cornerstone_sr(self) -> bool:
        return any("sr_cornerstone" in kinds for kinds in self.outputs.values())


def routes(config: AidxConfig) -> list[Route]:
    """The configured routes; without any, one route: the default model on the series that
    ``inference.series`` picks, SR and SEG to every destination."""
    configured = config.pipeline.routes or [RouteConfig(name="default")]
    return [_route(r, config) for r in configured]


def _route(r: RouteConfig, config: AidxConfig) -> Route:
    unknown = sorted(set(r.outputs) - set(config.destinations))
    if unknown:
        known = ", ".join(sorted(config.destinations)) or "none configured"
        raise ValueError(
            f"pipeline.routes[{r.name}].outputs names unknown destinations {unknown}; "
            f"destinations: {known} (add them under destinations:)"
        )
    outputs = (
        {d: tuple(kinds) for d, kinds in r.outputs.items()}
        if r.outputs
        else dict.fromkeys(config.destinations, DEFAULT_OUTPUTS)
    )
    rules = replace(
        series_rules(config),
        body_parts=tuple(r.body_parts),
        description_pattern=r.series_description,
    )
    return Route(r.name, r.model or None, tuple(r.calling_ae_titles), rules, outputs)


def queue_function(config: AidxConfig, store: Store) -> Callable[[str], str]:
    """``study_uid -> broker queue`` (pipeline.queue celery): the ``queue`` of the first route
    with one whose conditions (calling AE, body part, series description) a series of the study
    meets, read from the store's series rows; else pipeline.celery.queue. A job runs every route
    that applies, on the host that takes it: a route with its own queue comes first."""
    default = config.pipeline.celery.queue
    queued = [r for r in config.pipeline.routes if r.queue]

    def queue_of(study_uid: str) -> str:
        if not queued:
            return default
        study = store.study(study_uid) or {}
        all_series = store.study_series(study_uid)
        for route in queued:
            if route.calling_ae_titles and study.get("calling_ae") not in route.calling_ae_titles:
                continue
            for s in all_series:
                part = str(s.get("body_part") or "").upper()
                if route.body_parts and part not in {p.upper() for p in route.body_parts}:
                    continue
                description = str(s.get("description") or "")
                if route.series_description and not re.search(
                    route.series_description, description, re.IGNORECASE
                ):
                    continue
                return route.queue
        return default

    return queue_of


def priority_function(config: AidxConfig, store: Store) -> Callable[[str], int]:
    """``study_uid -> priority`` by ``pipeline.priority_rules`` (0 when none match)."""
    rules = config.pipeline.priority_rules

    def priority_of(study_uid: str) -> int:
        if not rules:
            return 0
        study = store.study(study_uid) or {}
        header: dict[str, str] | None = None
        best = 0
        for rule in rules:
            if rule.attributes and header is None:
                header = _first_header(store, study_uid, rules, config.node.max_dataset_bytes)
            if _matches(rule, study, header or {}):
                best = max(best, rule.priority)
        return best

    return priority_of


def _matches(rule: PriorityRuleConfig, study: dict[str, object], header: dict[str, str]) -> bool:
    if rule.calling_ae_titles and study.get("calling_ae") not in rule.calling_ae_titles:
        return False
    description = str(study.get("description") or "")
    if rule.study_description and not re.search(rule.study_description, description, re.I):
        return False
    for keyword, pattern in rule.attributes.items():
        if not re.search(pattern, header.get(keyword, ""), re.IGNORECASE):
            return False
    return True


def _first_header(
    store: Store, study_uid: str, rules: list[PriorityRuleConfig], max_inflated: int
) -> dict[str, str]:
    """The priority attributes of the study's first instance (all of them share study-level
    attributes such as RequestedProcedurePriority); a deflated one is inflated only up to
    ``max_inflated`` bytes."""
    keywords = sorted({k for r in rules for k in r.attributes})
    for row in store.study_instances(study_uid)[:1]:
        try:
            ds = read_header(Path(row["path"]), max_inflated, specific_tags=keywords)
        except Exception as exc:  # noqa: BLE001 - a damaged header only loses the priority
            log.warning("priority: cannot read %s: %s", row["sop_uid"], exc)
            return {}
        return {k: str(ds.get(k, "")) for k in keywords}
    return {}
