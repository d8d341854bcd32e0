"""The dataset layouts the phantom generator writes (see :mod:`bundle.data.phantom`): folder names, the plan of
every image (patients, studies, views, labels, lesions) and the CSV text."""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ...constants import CHEXPERT_COLUMNS, NUM_OBSERVATIONS, OBSERVATIONS, SCR_STRUCTURES

from .drawing import _OBS_INDEX, _PLAN, DEFAULT_PREVALENCE, phantom_rng

logger = logging.getLogger(__name__)


CHEXPERT_DIR = "CheXpert-v1.0-small"


LESIONS_DIR = "CheXpert-v1.0-small-lesions"


JSRT_DIR = "JSRT"


SCR_DIR = "SCR"


QATA_DIR = "QaTa-COV19"


#: Parameters of the last generation, in the output folder (marks the folder as the generator's).
MANIFEST = "phantom.json"


_OWNED_DIRS = (CHEXPERT_DIR, LESIONS_DIR, JSRT_DIR, SCR_DIR, QATA_DIR)


_FORMAT_VERSION = 1  # bump when the drawing changes: a re-run then asks for overwrite=True instead of mixing


#: Fraction of JSRT cases with a nodule (154 of 247 in the real set).
_JSRT_NODULE_FRACTION = 154 / 247


#: Probability that a QaTa-COV19 phantom also shows support devices (no mask for them in QaTa).
_QATA_DEVICE_RATE = 0.25


_LABEL_TEXT = {1.0: "1.0", 0.0: "0.0", -1.0: "-1.0", None: ""}


@dataclass(frozen=True)
class _Task:
    """One image to draw and the files it produces (paths relative to the output folder)."""

    kind: str  # "frontal", "lateral", "scr", "qata"
    dataset: str
    index: tuple[int, ...]
    patient: int  # anatomy seed index
    findings: tuple[int, ...]
    outputs: tuple[str, ...]


def lesion_mask_path(image_path: str) -> str:
    """Path of the true lesion bit mask of a phantom CheXpert image path (relative or absolute).

    ``.../CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` ->
    ``.../CheXpert-v1.0-small-lesions/train/patient00001/study1/view1_frontal.png``.
    """
    p = image_path.replace("\\", "/")
    marker = CHEXPERT_DIR + "/"
    pos = p.rfind(marker)
    if pos < 0 or (pos > 0 and p[pos - 1] != "/"):
        raise ValueError(f"not a CheXpert image path (no {marker!r} folder): {image_path}")
    p = p[:pos] + LESIONS_DIR + "/" + p[pos + len(marker):]
    return os.path.splitext(p)[0] + ".png"


def _resolve_prevalence(prevalence: Mapping[str, float] | None) -> dict[str, float]:
    out = dict(DEFAULT_PREVALENCE)
    for name, p in (prevalence or {}).items():
        if name not in DEFAULT_PREVALENCE:
            raise ValueError(f"prevalence: unknown observation {name!r} (No Finding is derived); expected one of "
                             f"{list(DEFAULT_PREVALENCE)}")
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"prevalence of {name!r} must be in [0, 1], got {p}")
        out[name] = float(p)
    return out


def _check_rate(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _plan_chexpert(seed: int, split: str, n_patients: int, first_patient: int, max_studies: int, lateral_rate: float,
                   prevalence: Mapping[str, float], uncertain_rate: float, blank_rate: float,
                   false_uncertain_rate: float) -> tuple[list[list[str]], list[_Task], dict[str, Any]]:
    """CSV rows and drawing tasks of one CheXpert split (``train`` or ``valid``), from the plan generator."""
    dataset = f"chexpert_{split}"
    valid = split == "valid"
    rng = phantom_rng(seed, dataset, purpose=_PLAN)
    prev = np.array([prevalence[name] for name in OBSERVATIONS[1:]])
    n_studies_p = 0.45 ** np.arange(max_studies)
    n_studies_p /= n_studies_p.sum()
    sd_index = _OBS_INDEX["Support Devices"]
    rows: list[list[str]] = []
    tasks: list[_Task] = []
    counts = {"patients": n_patients, "studies": 0, "frontal": 0, "lateral": 0,
              "positives": dict.fromkeys(OBSERVATIONS[1:], 0)}
    for p in range(n_patients):
        pid = first_patient + p
        n_st = 1 if valid else int(rng.choice(max_studies, p=n_studies_p)) + 1
        sex = "Female" if rng.random() < 0.46 else "Male"
        age = int(rng.integers(18, 88))
        for st in range(1, n_st + 1):
            age = min(90, age + int(st > 1) * int(rng.integers(0, 2)))
            truth = rng.random(NUM_OBSERVATIONS - 1) < prev
            draws = rng.random((3, NUM_OBSERVATIONS - 1))
            labels: list[float | None] = [None] * NUM_OBSERVATIONS
            for k in range(1, NUM_OBSERVATIONS):
                t, (d_unc, d_blank, d_false) = truth[k - 1], draws[:, k - 1]
                if valid:
                    labels[k] = 1.0 if t else 0.0
                elif t:
                    labels[k] = -1.0 if d_unc < uncertain_rate else 1.0
                elif d_false < false_uncertain_rate:
                    labels[k] = -1.0
                else:
                    labels[k] = None if d_blank < blank_rate else 0.0
            findings = tuple(k for k in range(1, NUM_OBSERVATIONS) if truth[k - 1])
            if valid:
                labels[0] = 0.0 if any(k != sd_index for k in findings) else 1.0
            else:
                mentioned = any(labels[k] in (1.0, -1.0) for k in range(1, NUM_OBSERVATIONS) if k != sd_index)
                labels[0] = None if mentioned else 1.0
            ap = "AP" if rng.random() < (0.85 if truth[sd_index - 1] else 0.55) else "PA"
            lateral = bool(rng.random() < lateral_rate)
            folder = f"{CHEXPERT_DIR}/{split}/patient{pid:05d}/study{st}"
            text = [_LABEL_TEXT[x] for x in labels]
            frontal = f"{folder}/view1_frontal.jpg"
            rows.append([frontal, sex, str(age), "Frontal", ap, *text])
            tasks.append(_Task("frontal", dataset, (p, st, 1), p, findings, (frontal, lesion_mask_path(frontal))))
            counts["studies"] += 1
            counts["frontal"] += 1
            for k in findings:
                counts["positives"][OBSERVATIONS[k]] += 1
            if lateral:
                path = f"{folder}/view2_lateral.jpg"
                rows.append([path, sex, str(age), "Lateral", "", *text])
                tasks.append(_Task("lateral", dataset, (p, st, 2), p, (), (path,)))
                counts["lateral"] += 1
    return rows, tasks, counts


def _plan_scr(seed: int, n_cases: int) -> tuple[list[_Task], dict[str, Any]]:
    n_nodule = int(round(n_cases * _JSRT_NODULE_FRACTION))
    cases = [f"JPCLN{i + 1:03d}" for i in range(n_nodule)] + [f"JPCNN{i + 1:03d}" for i in range(n_cases - n_nodule)]
    tasks = []
    for i, case in enumerate(cases):
        outputs = (f"{JSRT_DIR}/images/{case}.png",
                   *(f"{SCR_DIR}/masks/{structure}/{case}.gif" for structure in SCR_STRUCTURES))
        findings = (_OBS_INDEX["Lung Lesion"],) if case.startswith("JPCLN") else ()
        tasks.append(_Task("scr", "scr", (i,), i, findings, outputs))
    return tasks, {"cases": n_cases, "nodule_cases": n_nodule}


def _plan_qata(seed: int, subset: str, n_images: int, first: int) -> list[_Task]:
    dataset = "qata_train" if subset == "Train Set" else "qata_test"
    rng = phantom_rng(seed, dataset, purpose=_PLAN)
    tasks = []
    for i in range(n_images):
        name = f"covid_{first + i}"
        devices = (_OBS_INDEX["Support Devices"],) if rng.random() < _QATA_DEVICE_RATE else ()
        outputs = (f"{QATA_DIR}/{subset}/Images/{name}.png", f"{QATA_DIR}/{subset}/Ground-truths/mask_{name}.png")
        tasks.append(_Task("qata", dataset, (i,), i, devices, outputs))
    return tasks


def _csv_text(rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CHEXPERT_COLUMNS)
    writer.writerows(rows)
    return buf.getvalue()

