"""`Case`: one patient folder → CT, MR volume(s), clinical note and (optionally) labels.

Examples:
    >>> from medfusion.io.case import find_patient_folders
    >>> find_patient_folders([])
    []
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from medfusion.io.checks import value_warnings
from medfusion.io.dicom import DicomScan, load_series, scan_folder
from medfusion.io.errors import InputError
from medfusion.io.nifti import is_nifti, modality_from_name, read_nifti, read_sidecar
from medfusion.io.volume import Volume

NOTE_SUFFIXES = (".txt", ".md")

# --- Types ---


@dataclasses.dataclass
class Case:
    """Everything read from one patient folder.

    Attributes:
        patient_id: the folder's name unless given to `load_case`.
        folder: the patient folder.
        ct: the chosen CT (axial first, then the most voxels), or None when there is none.
        mr: every MR volume, the primary (axial first, then the most voxels) first.
        note: the clinical note's text ("" without one); `note_path` its file.
        labels: a reference label map (`labels/<patient_id>/`), integer classes on the CT's grid, or None.
        errors: unreadable files, one InputError each (never raised by `load_case`).
        skipped: (file, reason) for files that were recognised and left out (e.g. localizers).
        choices: lines saying which series were chosen among several, and why.
        candidates: every volume read, CT and MR.
    """

    patient_id: str
    folder: Path
    ct: Volume | None
    mr: list[Volume]
    note: str = ""
    note_path: Path | None = None
    labels: Volume | None = None
    errors: list[InputError] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    choices: list[str] = dataclasses.field(default_factory=list)
    candidates: list[Volume] = dataclasses.field(default_factory=list)

    @property
    def primary_mr(self) -> Volume | None:
        """The MR the model uses (the first of `mr`), or None without an MR."""
        return self.mr[0] if self.mr else None

    def verdict(self) -> str:
        """One line on usability: "unusable: no CT volume", "usable, with unreadable files",
        "usable, with warnings" (a warning on the CT or an MR) or "ok", first match wins."""
        if self.ct is None:
            return "unusable: no CT volume"
        if self.errors:
            return "usable, with unreadable files"
        if any(v.warnings for v in [self.ct, *self.mr]):
            return "usable, with warnings"
        return "ok"


# --- Discovery ---


# sub-folder names of one patient's export: modality or series folders, CD/DVD PT*/ST*/SE* levels
_SERIES_FOLDER = re.compile(
    r"^(ct|mr|mri|pet|t1\w*|t2\w*|flair\w*|dwi|adc|swi|pd\w*|dicom|dcm|nifti|nii|images?|series\w*|"
    r"scans?|anat|st\d+|se\d+|s\d+|\d+)$",
    re.IGNORECASE,
)
_NOT_NOTES = ("readme", "licen", "copying", "changes", "changelog", "protocol", "notice", "authors")


def _visible(d: Path, want_dir: bool) -> list[Path]:
    try:
        return sorted(p for p in d.iterdir() if not p.name.startswith(".") and p.is_dir() == want_dir)
    except OSError:
        return []


def _is_image_file(p: Path) -> bool:
    from medfusion.io.dicom import looks_like_dicom

    return p.name.upper() != "DICOMDIR" and (is_nifti(p) or looks_like_dicom(p))


def is_note_file(p: Path) -> bool:
    """A clinical note by name: ``*.txt`` / ``*.md`` / ``note*.json``, not a README, licence, change
    log or protocol."""
    name = p.name.lower()
    if name.startswith(_NOT_NOTES):
        return False
    return name.endswith(NOTE_SUFFIXES) or (name.startswith("note") and name.endswith(".json"))


def _first_patient_id(d: Path, budget: int = 200) -> tuple[bool, str | None]:
    """(holds an image file, PatientID of the first DICOM image found) below `d`, looking at no more
    than `budget` files."""
    import pydicom

    seen = 0
    has_image = False
    for p in sorted(d.rglob("*")):
        if seen >= budget:
            break
        if not p.is_file() or p.name.startswith("."):
            continue
        seen += 1
        if not _is_image_file(p):
            continue
        has_image = True
        if is_nifti(p):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, force=True, specific_tags=["PatientID", "Rows"])
            if "Rows" in ds:
                return True, str(ds.get("PatientID", "") or "")
        except Exception:
            continue
    return has_image, None


def is_patient_folder(folder: Path) -> bool:
    """A folder of one patient, as opposed to a folder of patients. In this order:

    1. every sub-folder with images is named like a series or modality folder (``CT``, ``MR``,
       ``T1…``, ``DICOM``, CD levels ``ST0…``/``SE0…``, numbers) → one patient (a PatientID that
       differs between them is the registration QC's to catch);
    2. its sub-folders' DICOM images carry two or more PatientIDs → a folder of patients;
    3. it holds an image file directly (NIfTI by name, DICOM by content; a DICOMDIR is an index,
       not an image) → one patient;
    4. it holds a clinical note directly and no sub-folder with images holds a note of its own →
       one patient (the synthetic layout: ``note.txt``, ``CT/``, ``MR/``);
    5. two or more sub-folders with images hold notes of their own → a folder of patients;
    6. two or more sub-folders with images, all DICOM of one PatientID → one patient;
    7. otherwise a folder of patients (each sub-folder with images is one).

    A stray README, licence, script, note or atlas in a cohort's root therefore does not make the
    root one patient, and a note-less patient exported as ``CT/`` + ``MR/`` stays one patient.
    """
    subdirs = _visible(folder, want_dir=True)
    found = {d: _first_patient_id(d) for d in subdirs}
    with_images = [d for d, (has, _) in found.items() if has]
    if with_images and all(_SERIES_FOLDER.match(d.name) for d in with_images):
        return True  # CT/, MR/, SE000001/…: one patient's series, whatever their PatientIDs say
    ids = {pid for _, pid in found.values() if pid}
    if len(ids) >= 2:
        return False
    files = _visible(folder, want_dir=False)
    if any(_is_image_file(p) for p in files):
        return True
    if not with_images:
        return False
    noted = [d for d in with_images if any(is_note_file(p) for p in d.rglob("*") if p.is_file())]
    if any(is_note_file(p) for p in files) and not any(
        is_note_file(p) for d in with_images for p in _visible(d, want_dir=False)
    ):
        return True
    if len(noted) >= 2:
        return False  # sub-folders with notes of their own are patients, even under one PatientID
    return len(with_images) >= 2 and len(ids) == 1 and all(found[d][1] for d in with_images)


def find_patient_folders(roots: list[Path] | list[str]) -> list[Path]:
    """Each root is a patient folder (see `is_patient_folder`) or a folder of patient folders.

    In a folder of patients, every visible sub-folder that holds a file other than notes, documents
    and scripts is a patient (one whose files are all unreadable still is, so that it is reported);
    a sub-folder with only a note or a README in it is not.

    Raises:
        InputError: a root is not a folder.
    """
    docs = (".txt", ".md", ".rst", ".json", ".csv", ".pdf", ".py", ".sh", ".yaml", ".yml", ".ipynb", ".log")

    def has_data(d: Path) -> bool:
        return any(
            p.is_file() and not p.name.startswith(".") and (is_nifti(p) or not p.name.lower().endswith(docs))
            for p in d.rglob("*")
        )

    out: list[Path] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise InputError(root, "not a folder")
        if is_patient_folder(root):
            out.append(root)
        else:
            out.extend(
                sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and has_data(p))
            )
    return out


def _rank(v: Volume) -> tuple[int, int]:
    """Choice rule: axial series first, then the most voxels."""
    axial = v.orientation_code()[2] in "SI"
    n = v.shape[0] * v.shape[1] * v.shape[2]
    return (int(axial), n)


def load_case(
    folder: str | Path,
    modality_map: dict[str, str] | None = None,
    labels_dir: str | Path | None = None,
    patient_id: str | None = None,
) -> Case:
    """Read one patient folder. Unreadable files are collected in `case.errors`, never raised.

    DICOM series and NIfTI files anywhere below `folder` are read as volumes (LPS geometry, arrays
    (z, y, x)); value checks add warnings to each volume; the note is found by `read_note`.

    Args:
        folder: the patient folder.
        modality_map: NIfTI file name (or stem), case-insensitive → "CT" or "MR", for files whose name
            and sidecar do not tell.
        labels_dir: a folder of reference label maps, `<labels_dir>/<patient_id>/segmentation.nii.gz`
            or `segmentation.dcm` (`load_label_map`); None: no labels.
        patient_id: the id to use; None: the folder's name.

    Returns:
        The Case. A folder with no usable CT still returns a Case whose `verdict()` says so.

    Raises:
        InputError: `folder` is not a folder; or the label map exists but cannot be read.
        ValueError: a DICOM SEG label map whose geometry is not a valid `Volume` (e.g. zero spacing).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "patient folder does not exist")
    pid = patient_id or folder.name
    scan: DicomScan = scan_folder(folder)
    errors = list(scan.errors)
    volumes: list[Volume] = []
    for series in scan.series:
        try:
            volumes.append(load_series(series))
        except InputError as exc:
            errors.append(exc)
        except Exception as exc:
            # a header combination the rules above did not foresee: lose the series, not the patient
            errors.append(InputError(series.first.path, f"series refused ({type(exc).__name__}: {exc})"))
    modality_map = {k.lower(): v.upper() for k, v in (modality_map or {}).items()}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and is_nifti(p)):
        try:
            volumes.append(_load_nifti(path, modality_map))
        except InputError as exc:
            errors.append(exc)
        except Exception as exc:
            errors.append(InputError(path, f"NIfTI refused ({type(exc).__name__}: {exc})"))
    for v in volumes:
        v.warnings.extend(value_warnings(v))
    patient_ids = sorted({str(v.meta.get("patient_id") or "") for v in volumes} - {""})
    if len(patient_ids) > 1:
        for v in volumes:
            v.warnings.append(
                f"this folder holds series of {len(patient_ids)} PatientIDs ({', '.join(patient_ids)}): "
                "one patient per folder is expected"
            )
    cts = sorted((v for v in volumes if v.modality == "CT"), key=_rank, reverse=True)
    mrs = sorted((v for v in volumes if v.modality == "MR"), key=_rank, reverse=True)
    choices: list[str] = list(scan.notes)
    if len(cts) > 1:
        choices.append(
            f"CT: chose {cts[0].meta.get('series_description') or cts[0].meta.get('source')} (axial first, then most voxels) among {len(cts)}"
        )
    if len(mrs) > 1:
        choices.append(
            f"MR: primary is {mrs[0].meta.get('series_description') or mrs[0].meta.get('source')} among {len(mrs)}"
        )
    try:
        note, note_path = read_note(folder)
    except InputError as exc:  # a broken note costs the note, not the patient
        errors.append(exc)
        note, note_path = "", None
    labels = None
    if labels_dir is not None:
        labels = load_label_map(Path(labels_dir) / pid)
    return Case(
        pid,
        folder,
        cts[0] if cts else None,
        mrs,
        note,
        note_path,
        labels,
        errors,
        scan.skipped,
        choices,
        volumes,
    )


def _load_nifti(path: Path, modality_map: dict[str, str]) -> Volume:
    sidecar = read_sidecar(path)
    name = path.name.lower()
    mapped = modality_map.get(name) or modality_map.get(name.split(".")[0])
    modality = sidecar.get("Modality") or mapped or modality_from_name(path)
    if not modality:
        raise InputError(
            path,
            'cannot tell the modality: name it ct*/mr*/t1*/t2*/flair*, add a JSON sidecar with "Modality", or pass --modality NAME=CT|MR',
        )
    return read_nifti(path, modality=str(modality))


def read_note(folder: Path) -> tuple[str, Path | None]:
    """The clinical note of a patient folder and its path; ("", None) when there is none.

    Candidates are `is_note_file` names; the shallowest wins, then names starting with "note" or
    "clinical", then alphabetical order — so a licence or README on a CD, or a note deeper in a
    series folder, never shadows the patient's ``note.txt``. Text is read as UTF-8, else as
    Windows-1252 (which Latin-1 notes also decode as). Raises InputError (naming the file) for a ``note*.json`` that is not valid JSON.
    """
    candidates = [p for p in folder.rglob("*") if p.is_file() and is_note_file(p)]

    def rank(p: Path) -> tuple[int, int, str]:
        name = p.name.lower()
        return (len(p.relative_to(folder).parts), 0 if name.startswith(("note", "clinical")) else 1, name)

    for path in sorted(candidates, key=rank):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # notes from older systems: Windows-1252 / Latin-1
            text = raw.decode("cp1252", errors="replace")
        if path.name.lower().endswith(".json"):
            try:
                data: Any = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(path, f"note JSON is not valid ({exc})") from exc
            text = str(data.get("text", "")) if isinstance(data, dict) else ""
        return text.strip(), path
    return "", None


def load_label_map(folder: Path) -> Volume | None:
    """`labels/<patient_id>/segmentation.nii.gz` (or a DICOM SEG `segmentation.dcm`), or None."""
    nii = folder / "segmentation.nii.gz"
    if nii.exists():
        vol = read_nifti(nii, modality="SEG")
        vol.array = vol.array.astype("int16")
        return vol
    dcm = folder / "segmentation.dcm"
    if dcm.exists():
        from medfusion.io.seg import read_dicom_seg

        return read_dicom_seg(dcm)
    return None
