"""A study with a real AI result in a store, ready to review (for the review-app tests): a small
phantom indexed as the node would, run by a worker with the stand-in ONNX model (which flags
soft tissue, so it reports a few findings), results and outbox items written."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from aidx.config import AidxConfig, load_config
from aidx.pipeline.worker import Worker
from aidx.store.store import Store
from dicom_node.parse import read_file
from tests.standin_model import install
from training.phantom import NoduleRequest, PhantomOptions, generate
from ui.accounts import Accounts, User
from ui.review import Reviews

PASSWORD = "correct horse battery"


@dataclass
class ReviewedStudy:
    config: AidxConfig
    store: Store
    study_uid: str
    files: list[Path]
    reviews: Reviews
    accounts: Accounts
    radiologist: User
    admin: User
    engineer: User

    def review_id(self) -> int:
        (row,) = [w for w in self.reviews.worklist() if w.study_uid == self.study_uid]
        return row.review_id


# The phantoms already generated in this test session, by (seed, patient name, character set):
# each study gets its own copy of the files (the generator gives the same bytes for the same
# options; generating took ~3 s of the ~7 s a reviewed study costs).
_PHANTOMS: dict[tuple[int, str, str | None], Path] = {}


def _phantom(out: Path, seed: int, patient_name: str, charset: str | None) -> Path:
    """The small phantom's DICOM folder, copied to ``out``."""
    key = (seed, patient_name, charset)
    if key not in _PHANTOMS:
        cache = Path(tempfile.mkdtemp(prefix="aidx-test-phantom-"))
        atexit.register(shutil.rmtree, cache, True)
        generate(
            cache / "study",
            PhantomOptions(
                seed=seed,
                slices=30,
                matrix=96,
                slice_thickness=2.5,
                nodule_requests=(NoduleRequest(14.0, "solid", "isolated", "smooth"),),
                workers=1,
                patient_name=patient_name,
                charset=charset,
            ),
        )
        _PHANTOMS[key] = cache / "study"
    shutil.copytree(_PHANTOMS[key], out)
    return out / "dicom"


def make_config(root: Path) -> AidxConfig:
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    install(models, root)
    config = load_config(
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "models.dir": str(models),
            "models.default": "soft-tissue",
            "inference.min_volume_mm3": 50,
        },
    )
    config.destinations = {"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}}  # type: ignore[dict-item]
    return config


def reviewed_study(
    root: Path,
    seed: int = 5,
    store_url: str | None = None,
    patient_name: str = "PHANTOM^CHEST",
    charset: str | None = None,
    prepare: Callable[[list[Path]], None] | None = None,
    in_spool: bool = False,
    configure: Callable[[AidxConfig], None] | None = None,
) -> ReviewedStudy:
    """Generate, index and run one phantom study under ``root``; users radiologist ``rad``
    (display name ``Smith^Anna``), ``admin`` and ``eng``, all with password PASSWORD. The store
    is ``store_url`` (default: SQLite in the data folder). ``prepare`` may change the phantom's
    files before they are indexed (e.g. add attributes a hospital's images carry); ``in_spool``:
    the images lie under the storage root (as the node stores them), not beside it;
    ``configure`` may change the configuration before the worker runs (e.g. set ``fhir``)."""
    config = make_config(root)
    config.store.url = store_url
    if configure is not None:
        configure(config)
    folder = config.storage_root() / "spool" / "study" if in_spool else root / "study"
    files = sorted(_phantom(folder, seed, patient_name, charset).glob("*.dcm"))
    if prepare is not None:
        prepare(files)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store.for_config(config)
    study_uid = ""
    for path in files:
        record = replace(read_file(path.read_bytes(), "PACS"), path=str(path))
        store.index_instance(record, time.time() - 10.0, 1.0)
        study_uid = record.study_uid
    store.complete_study(study_uid, time.time())
    if not Worker(config, store).run_once():
        raise RuntimeError("the worker found no job")
    accounts = Accounts(store)
    rad = accounts.add_user(
        "rad",
        PASSWORD,
        role="radiologist",
        display_name="Smith^Anna",
        organisation="General Hospital",
    )
    admin = accounts.add_user("admin", PASSWORD, role="admin", display_name="Admin")
    eng = accounts.add_user("eng", PASSWORD, role="engineer", display_name="Engineer")
    return ReviewedStudy(
        config, store, study_uid, files, Reviews(store, accounts.audit), accounts, rad, admin, eng
    )
