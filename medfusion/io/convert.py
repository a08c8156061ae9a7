"""`medfusion convert`: what medfusion read from a patient folder, written as NIfTI with JSON sidecars.

The chosen CT becomes `ct.nii.gz`, the MR volumes `mr.nii.gz` (the primary one), `mr_2.nii.gz`, …,
each beside a sidecar (`ct.json`, …) holding the modality, series UID and description, every
warning the loader raised and the choices it made — like dcm2niix, with medfusion's rules. It is how
a user checks what the model will see. The sidecar's "Modality" is the BIDS key `load_case` reads
back, so a converted folder loads as the same volumes.

Examples:
    >>> from medfusion.io.convert import output_names
    >>> output_names(2)
    ['ct', 'mr', 'mr_2']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfusion.io.atomic import write_json
from medfusion.io.case import Case, load_case
from medfusion.io.errors import InputError
from medfusion.io.nifti import write_nifti
from medfusion.io.volume import Volume


def output_names(n_mr: int) -> list[str]:
    """File stems for the CT and `n_mr` MR volumes, in the case's order (primary MR first)."""
    return ["ct", *("mr" if i == 0 else f"mr_{i + 1}" for i in range(n_mr))]


def sidecar(volume: Volume, case: Case) -> dict[str, Any]:
    """The JSON written beside one converted volume."""
    meta = volume.meta
    return {
        "Modality": volume.modality,
        "SeriesInstanceUID": meta.get("series_uid", ""),
        "SeriesDescription": meta.get("series_description", ""),
        "StudyInstanceUID": meta.get("study_uid", ""),
        "Format": meta.get("format", ""),
        "Source": str(meta.get("source", "")),
        "Size": list(volume.size_xyz),
        "SpacingMm": [float(s) for s in volume.spacing],
        "Orientation": volume.orientation_code(),
        "Warnings": list(volume.warnings),
        "Choices": list(case.choices),
        "ConvertedBy": "medfusion",
    }


def convert_case(
    folder: str | Path, out: str | Path, modality_map: dict[str, str] | None = None
) -> tuple[Case, list[Path]]:
    """Load `folder` as `medfusion run` would and write its volumes into `out`; returns the case and
    the NIfTI files written. Raises InputError when the folder holds no CT and no MR volume."""
    case = load_case(folder, modality_map)
    volumes = ([case.ct] if case.ct is not None else []) + list(case.mr)
    if not volumes:
        detail = "; ".join(str(e) for e in case.errors[:3])
        raise InputError(Path(folder), "no CT or MR volume to convert" + (f" ({detail})" if detail else ""))
    names = output_names(len(case.mr))
    if case.ct is None:
        names = names[1:]
    out = Path(out)
    written = []
    for name, vol in zip(names, volumes, strict=True):
        written.append(write_nifti(vol, out / f"{name}.nii.gz"))
        write_json(out / f"{name}.json", sidecar(vol, case))
    return case, written
