"""DICOM Structured Report (TID 1500 Measurement Report, Comprehensive 3D SR) through highdicom: the
run's findings per lesion, referencing the DICOM SEG, and its diagnostic scores.

Content, as a PACS or viewer reads it:

- one *Volumetric ROI* group (TID 1411) per lesion (measure/lesions.py, the one lesion definition),
  largest core first, tracked as "lesion N". It references the SEG's tumour-core segment (the SEG
  has one segment per class, and PS3.3 forbids narrowing a segment reference to frames, so the
  tracking identifier and the measurements say which lesion the group is about), and carries: the core's volume (SCT Volume, mL), the lesion's
  total and its oedema/calcification volumes (medfusion's own codes, mL), the longest core diameter
  (SCT Diameter, derivation Maximum, mm), the RANO-style axial pair (SCT Long axis / Short axis, mm),
  the core's mean CT density (DCM Attenuation Coefficient, derivation Mean, HU) and the MR
  enhancement ratio (medfusion's code, no units) where measured; the finding site is the brain with
  its laterality (left/right; none on the midline);
- one *Measurements* group (TID 1501) per diagnostic score: its calibrated probability (DCM
  Probability, no units) and, when the case is in the model's domain, the decision (SCT Positive /
  Negative / Indeterminate) as a qualitative evaluation; out of domain there is no call, as in
  scores.json.

Concepts no public terminology names are coded in the private scheme ``99MEDFUSION`` (declared in
the object's CodingSchemeIdentificationSequence), never as free text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

import medfusion
from medfusion.io.atomic import atomic_path
from medfusion.io.volume import Volume
from medfusion.measure.lesions import Lesion, class_roles

SCHEME = "99MEDFUSION"
_SCHEME_ITEM = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=SCHEME, name="medfusion findings", responsible_organization="medfusion"
)
TOTAL_VOLUME = hd.sr.CodedConcept("MF001", SCHEME, "Total lesion volume")
OEDEMA_VOLUME = hd.sr.CodedConcept("MF002", SCHEME, "Perilesional oedema volume")
CALCIFICATION_VOLUME = hd.sr.CodedConcept("MF003", SCHEME, "Calcification volume")
ENHANCEMENT_RATIO = hd.sr.CodedConcept("MF004", SCHEME, "MR enhancement ratio, core over 3 mm shell")
_CLASS_VOLUME = {"oedema": OEDEMA_VOLUME, "calcification": CALCIFICATION_VOLUME}
CT_HEAD = hd.sr.CodedConcept("24725-4", "LN", "CT Head")
MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_LATERALITY = {"left": codes.SCT.Left, "right": codes.SCT.Right}
# a score's decision (scores.json "decision") as its qualitative evaluation; "not assessed": none
_CALLS = {
    "positive": codes.SCT.Positive,
    "negative": codes.SCT.Negative,
    "indeterminate": codes.SCT.Indeterminate,
}


def score_concept(name: str) -> hd.sr.CodedConcept:
    """The coded name of one diagnostic score (the model's score name, in medfusion's scheme)."""
    return hd.sr.CodedConcept(f"SCORE-{name}"[:16], SCHEME, f"{name} (medfusion score)")


def write_dicom_sr(
    seg_path: str | Path,
    ct: Volume,
    class_names: list[str],
    path: str | Path,
    *,
    lesions: Sequence[Lesion],
    probabilities: Mapping[str, float],
    decisions: Mapping[str, str],
    model_name: str,
    model_version: str,
    assessed: bool = True,
) -> Path:
    """Write the TID 1500 measurement report of one run as a Comprehensive 3D SR.

    Args:
        seg_path: the DICOM SEG written for the label map (io/seg.py); its segments are class indices.
        ct: the DICOM CT (``meta["files"]``: its source instances, which the SR lists as evidence).
        class_names: class names, index 0 background.
        path: where to write the SR (atomically).
        lesions: the lesions' findings (`measure.lesions.Lesion`), largest core first.
        probabilities: calibrated probability in [0, 1] per score name.
        decisions: per score, "positive", "negative", "indeterminate" (SCT Positive / Negative /
            Indeterminate as the score's qualitative evaluation) or "not assessed" (no call, as out of
            the model's domain); a score without an entry gets no call.
        model_name, model_version: the algorithm identification.
        assessed: False for a case outside the model's training domain: the series description says
            so ("… NOT ASSESSED, outside training domain"), since the lesions and probabilities it
            carries are kept for research, not as findings, and the report is marked partial.

    Returns:
        `path`.

    Raises:
        ValueError: the CT was not read from DICOM.
    """
    files = ct.meta.get("files")
    if not files:
        msg = "the CT was not read from DICOM; a DICOM SR needs the source series"
        raise ValueError(msg)
    seg = pydicom.dcmread(str(seg_path))
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    algo = hd.sr.AlgorithmIdentification(name=model_name, version=model_version)
    core_k, _ = class_roles(class_names)
    groups: list[Any] = []
    for lesion in lesions:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"lesion {lesion.number}"
                ),
                referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, core_k),
                finding_type=codes.SCT.Lesion,
                algorithm_id=algo,
                finding_sites=[_finding_site(lesion)],
                measurements=_lesion_measurements(lesion, class_names[core_k], algo),
            )
        )
    for name, p in probabilities.items():
        evaluations = []
        call = _CALLS.get(str(decisions.get(name, "")))
        if call is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(score_concept(name), call))
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"score {name}"),
                algorithm_id=algo,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.DCM.Probability,
                        value=float(p),
                        unit=codes.UCUM.NoUnits,
                        derivation=None,
                        algorithm_id=algo,
                    )
                ],
                qualitative_evaluations=evaluations or None,
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=model_name, manufacturer_name="medfusion", model_name=model_name
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CT_HEAD,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=301,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medfusion",
        is_complete=assessed,
        series_description="medfusion measurements"
        if assessed
        else "medfusion: NOT ASSESSED, outside training domain",
    )
    sr.CodingSchemeIdentificationSequence = [_SCHEME_ITEM]
    sr.SoftwareVersions = medfusion.__version__
    with atomic_path(path) as tmp:
        sr.save_as(tmp)
    return Path(path)


def _finding_site(lesion: Lesion) -> hd.sr.FindingSite:
    side = _LATERALITY.get(lesion.side)
    return hd.sr.FindingSite(anatomic_location=codes.SCT.Brain, laterality=side)


def _lesion_measurements(
    lesion: Lesion, core_name: str, algo: hd.sr.AlgorithmIdentification
) -> list[hd.sr.Measurement]:
    def m(name: Any, value: float, unit: Any, derivation: Any = None) -> hd.sr.Measurement:
        return hd.sr.Measurement(
            name=name, value=float(value), unit=unit, derivation=derivation, algorithm_id=algo
        )

    volumes = lesion.volumes_ml
    out = [m(codes.SCT.Volume, volumes.get(core_name, 0.0), MILLILITRE)]
    out.append(m(TOTAL_VOLUME, lesion.total_ml, MILLILITRE))
    out += [
        m(concept, volumes[name], MILLILITRE) for name, concept in _CLASS_VOLUME.items() if name in volumes
    ]
    out.append(m(codes.SCT.Diameter, lesion.core_diameter_mm, codes.UCUM.Millimeter, codes.SCT.Maximum))
    long_mm, short_mm = lesion.axial_diameters_mm
    out.append(m(codes.SCT.LongAxis, long_mm, codes.UCUM.Millimeter))
    out.append(m(codes.SCT.ShortAxis, short_mm, codes.UCUM.Millimeter))
    if lesion.ct_core_hu is not None:
        out.append(
            m(
                codes.DCM.AttenuationCoefficient,
                lesion.ct_core_hu,
                codes.UCUM.HounsfieldUnit,
                codes.SCT.Mean,
            )
        )
    if lesion.mr_enhancement_ratio is not None:
        out.append(m(ENHANCEMENT_RATIO, lesion.mr_enhancement_ratio, codes.UCUM.NoUnits))
    return out
