"""A data folder with one reviewed and signed study, its images under the storage root as the
node stores them, for the relocation and backup tests: built once per test session (a reviewed
study costs several seconds) and copied for each module that needs one."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aidx.config import AidxConfig, load_config
from aidx.store.store import Store
from tests.ui.reviewed_study import reviewed_study
from ui.accounts import Accounts, User
from ui.review import Reviews
from ui.signoff import sign

_BUILT: list[Path] = []


@dataclass
class Site:
    config: AidxConfig
    store: Store
    reviews: Reviews
    radiologist: User
    study_uid: str
    review_id: int


def signed_site(out: Path) -> Path:
    """A copy of the session's signed site at ``out`` (its ``data/`` and ``models/``)."""
    if not _BUILT:
        cache = Path(tempfile.mkdtemp(prefix="aidx-test-site-"))
        atexit.register(shutil.rmtree, cache, True)
        study = reviewed_study(cache / "site", in_spool=True)
        rid = study.review_id()
        study.reviews.open(rid, study.radiologist)
        for finding in study.reviews.findings(rid):
            study.reviews.decide(rid, finding.key, "accept", study.radiologist)
        signed = study.config.storage_root() / "signed"
        sign(study.reviews, study.store, rid, study.radiologist, signed, client="10.0.0.7")
        study.store.close()
        _BUILT.append(cache / "site")
    shutil.copytree(_BUILT[0], out, symlinks=True)
    return out


def site_config(root: Path) -> AidxConfig:
    """The configuration of the site at ``root`` (as tests.ui.reviewed_study.make_config, the
    model already registered)."""
    config = load_config(
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "models.dir": str(root / "models"),
            "models.default": "soft-tissue",
            "inference.min_volume_mm3": 50,
        },
    )
    config.destinations = {"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}}  # type: ignore[dict-item]
    return config


def open_site(root: Path) -> Site:
    config = site_config(root)
    store = Store.for_config(config)
    accounts = Accounts(store)
    reviews = Reviews(store, accounts.audit)
    radiologist = accounts.get_user("rad")
    assert radiologist is not None
    (row,) = reviews.worklist()
    return Site(config, store, reviews, radiologist, row.study_uid, row.review_id)
