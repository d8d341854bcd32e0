"""Names shared by every stage: the 14 CheXpert observations and the SCR structures."""

from __future__ import annotations

#: The 14 CheXpert observations, in the column order of ``train.csv`` (after the 5 metadata columns).
OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NUM_OBSERVATIONS: int = len(OBSERVATIONS)
#: Index of "No Finding": never explained, never a DoLL target.
NO_FINDING: int = 0

#: Metadata columns of CheXpert's CSV files, before the observations.
CHEXPERT_META_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
CHEXPERT_COLUMNS: tuple[str, ...] = CHEXPERT_META_COLUMNS + OBSERVATIONS

#: SCR structures (JSRT). SCR convention: "right" is the patient's right, drawn on the image's left.
SCR_STRUCTURES: tuple[str, ...] = ("left lung", "right lung", "heart", "left clavicle", "right clavicle")

#: Downstream segmentation tasks and their output channels.
TASK_CHANNELS: dict[str, tuple[str, ...]] = {
    "scr": ("lungs", "heart", "clavicles"),
    "lungs": ("lungs",),
    "heart": ("heart",),
    "clavicles": ("clavicles",),
    "infection": ("infection",),
    "real_lungs": ("lungs",),
}


def slug(name: str) -> str:
    """File-name friendly form of an observation or structure name (``"Lung Opacity"`` -> ``"lung_opacity"``)."""
    return name.lower().replace(" ", "_").replace("/", "_")

#: Network input size (H, W) of every stage's CPU default; the configs' ``image_size`` reads it, so that training,
#: pre-training, DoLL and inference agree unless a run overrides ``--image_size`` (GPU preset: 512 x 512).
IMAGE_SIZE: tuple[int, int] = (128, 128)
#: Prefix of every stage's MLflow experiment name (``<prefix>_finetune``, ``<prefix>_doll``, ...).
MLFLOW_EXPERIMENT_PREFIX: str = "cxr_doll"


#: What the DoLL quality was scored against, by the ``judge`` of ``doll_quality/summary.csv``
#: (:func:`bundle.doll.quality.lesion_judge`): the phantom's true lesions or CheXlocalize's radiologist masks.
LESION_JUDGES: dict[str, str] = {
    "phantom": "true lesions of the phantom",
    "CheXlocalize": "CheXlocalize radiologists' segmentations of real CheXpert radiographs",
}


#: Where the DoLL quality was scored, by the ``scoring`` of ``doll_quality/summary.csv``
#: (:data:`bundle.doll.quality.SCORING`).
SCORING_PLACES: dict[str, str] = {"grid": "on the network's input grid", "label": "at each mask's own size"}


def judge_description(judge: str | None, split: str | None = None, scoring: str | None = None) -> str:
    """The words for a DoLL-quality judge (``None``: the phantom, the judge before the column existed) and, when
    known, the split it judged and how (the ``split`` and ``scoring`` of ``doll_quality/summary.csv``, e.g.
    ``"label, tolerance 0 px"``)."""
    judge = judge or "phantom"
    words = LESION_JUDGES.get(judge, f"lesion masks ({judge})") + (f", {split} split" if split else "")
    if scoring:
        parts = []
        for one in scoring.split("+"):
            place, _, tolerance = one.partition(", ")
            px = tolerance.removeprefix("tolerance ").removesuffix(" px")
            within = "" if not tolerance else " with no pointing-game tolerance" if px == "0" else \
                f" with a {px} px pointing-game tolerance"
            parts.append(SCORING_PLACES.get(place, place) + within)
        words += f", scored {' and '.join(parts)}"
    return words
