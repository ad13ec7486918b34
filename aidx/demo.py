"""The demo study (``aidx demo``, ``aidx serve --demo``): a synthetic phantom, torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import AidxConfig


def write_demo_study(config: AidxConfig, overwrite: bool = False) -> Any:
    """Write the demo study configured under ``demo`` (kept if already there, unless
    ``overwrite``); returns its DICOM folder, or the generator's result when it wrote one.
    Synthetic data, torch-free."""
    from training.phantom import PhantomOptions, generate  # noqa: PLC0415 - only when written

    demo = config.demo
    out = config.demo_output()
    dicom_dir = out / "dicom"
    if not overwrite and (out / "ground_truth.json").exists() and any(dicom_dir.glob("*.dcm")):
        return dicom_dir
    result = generate(
        out,
        PhantomOptions(
            slices=demo.slices,
            matrix=demo.matrix,
            nodules=demo.nodules,
            seed=demo.seed,
            patient_name=demo.patient_name,
        ),
        overwrite=True,  # the demo folder is aidx's own; regenerating it is idempotent
    )
    return result
