"""Render a preview picture of a phantom study (docs/images/phantom.png).

Usage: python scripts/phantom_preview.py STUDY_DIR OUT.png
Rows: three axial slices in the lung window and one in the mediastinal window; a crop around
each ground-truth nodule on its key slice, enlarged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image


def window(hu: NDArray[np.floating], centre: float, width: float) -> NDArray[np.uint8]:
    lo = centre - width / 2
    return (np.clip((hu - lo) / width, 0, 1) * 255).astype(np.uint8)


def main(study: Path, out: Path) -> None:
    truth = json.loads((study / "ground_truth.json").read_text(encoding="utf-8"))
    files = sorted((study / "dicom").glob("*.dcm"))
    slices = {int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber): f for f in files}

    def hu(instance: int) -> NDArray[np.floating]:
        ds = pydicom.dcmread(slices[instance])
        return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)

    n = len(files)
    top = [window(hu(k), -600, 1500) for k in (n // 4, n // 2, 3 * n // 4)]
    top.append(window(hu(int(0.7 * n)), 40, 400))
    row1 = np.concatenate(top, axis=1)

    geometry = truth["geometry"]
    x0, y0, _ = geometry["first_image_position_mm"]
    spacing = geometry["pixel_spacing_mm"][0]
    crops = []
    for nodule in truth["nodules"]:
        image = hu(nodule["key_slice_instance_number"])
        c = round((nodule["center_mm"][0] - x0) / spacing)
        r = round((nodule["center_mm"][1] - y0) / spacing)
        half = 48
        crop = np.full((2 * half, 2 * half), -1000.0)
        sub = image[max(r - half, 0) : r + half, max(c - half, 0) : c + half]
        crop[: sub.shape[0], : sub.shape[1]] = sub
        crops.append(np.kron(window(crop, -600, 1500), np.ones((2, 2), np.uint8)))
    if crops:
        row2 = np.concatenate(crops, axis=1)
        pad = np.zeros((row2.shape[0], max(row1.shape[1] - row2.shape[1], 0)), np.uint8)
        row2 = np.concatenate([row2, pad], axis=1)[:, : row1.shape[1]]
        picture = np.concatenate([row1, row2], axis=0)
    else:
        picture = row1
    Image.fromarray(picture).resize((picture.shape[1] // 2, picture.shape[0] // 2)).save(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
