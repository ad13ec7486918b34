"""``aidx verify [--deep]``: every file the store lists is there.

Every indexed instance has its file, of the size recorded when it was received; every result
its findings, SR and SEG; every signed review its report; every outbox item not yet delivered
its files. With ``deep``, each file's content too: against the SHA-256 a backup recorded (the
manifest a restore keeps as ``backup-manifest.json``, or one given), and a file no backup
recorded is read as DICOM (an instance's SOP Instance UID must match its row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from aidx.store.paths import root_prefix
from aidx.store.protect.inventory import Listed, inventory
from aidx.store.protect.manifest import Manifest, sha256_of
from aidx.store.store import Store


@dataclass
class VerifyReport:
    checked: int = 0
    hashed: int = 0  # deep: checked against a recorded SHA-256
    parsed: int = 0  # deep: no hash recorded, read as DICOM
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def manifest_key(path: str, prefix: str) -> str:
    """The key of a file at ``path`` (absolute) in a backup's manifest: a file of the storage
    root under ``storage/``, one a restore put in ``external/`` as itself, any other under
    ``external/`` with its absolute path."""
    if prefix and path.startswith(prefix):
        rest = path[len(prefix) :]
        return rest if rest.startswith("external/") else "storage/" + rest
    return "external" + path


def verify(store: Store, deep: bool = False, manifest: Manifest | None = None) -> VerifyReport:
    """Check the files ``store`` lists (its paths absolute, under its root)."""
    report = VerifyReport()
    prefix = root_prefix(store.root)
    with store.engine.connect() as conn:
        listed = inventory(conn, sent_outbox=False)
    seen: set[str] = set()
    for item in listed.files:
        report.checked += 1
        problem = _check(item)
        if problem is None and deep and item.path not in seen:
            problem = _check_content(item, manifest, prefix, report)
        if problem is not None:
            report.problems.append(f"{item.what}: {problem}")
        seen.add(item.path)
    return report


def _check(item: Listed) -> str | None:
    path = Path(item.path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    if not path.is_file():
        return f"{path} is not a file"
    if item.size is not None and size != item.size:
        return f"{path} has {size} bytes; {item.size} were received"
    return None


def _check_content(
    item: Listed, manifest: Manifest | None, prefix: str, report: VerifyReport
) -> str | None:
    path = Path(item.path)
    entry = manifest.files.get(manifest_key(item.path, prefix)) if manifest else None
    if entry is not None:
        report.hashed += 1
        try:
            digest = sha256_of(path)
        except OSError as exc:
            return f"{path} cannot be read ({exc.strerror})"
        if digest != entry.sha256:
            return f"{path} differs from the backup's copy (SHA-256): damaged, or changed since"
        return None
    if path.suffix != ".dcm":
        return None  # findings.json: its presence is what is checked
    report.parsed += 1
    try:
        ds = dcmread(path)
        ds.get("PixelData")  # read to the end: a truncated file fails here
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        return f"{path} is not a readable DICOM file ({exc})"
    if item.what.startswith("instance "):
        expected = item.what.removeprefix("instance ")
        if str(ds.get("SOPInstanceUID", "")) != expected:
            return f"{path} holds another instance ({ds.get('SOPInstanceUID', '?')})"
    return None
