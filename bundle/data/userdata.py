"""The user's datasets in one file (``bash scripts/main.sh --data data.yaml``): validation, phantoms drawn only where
no real dataset replaces them, and the data stage's entry point :func:`prepare_data`.

The data file is YAML; every key is optional, each one given replaces that phantom (the others stay phantom)::

    chexpert: /data/CheXpert-v1.0-small         # or its parent, or the full-size CheXpert-v1.0; or, to score the
    # DoLL against radiologists: {root: /data/CheXpert-v1.0, localize: /data/chexlocalize}  (the CheXlocalize release)
    jsrt_scr: /data/jsrt-scr                    # one root holding the JSRT images and the SCR masks, or:
    # jsrt_scr: {images: /data/All247images, masks: /data/scratch}
    qata: /data/QaTa-COV19-v2                   # the infection task; or, instead of qata:
    # covid_qu_ex: {root: /data/COVID-QU-Ex, classes: [COVID-19, Non-COVID, Normal]}
    folder: /data/my-lungs                      # images/ + masks/ + cases.csv (the real_lungs task)

Relative paths are taken from the data file's folder. Which datalist each key feeds: ``chexpert`` ->
``chexpert.json`` (classifiers, DoLL, pre-training), ``jsrt_scr`` -> ``scr.json`` (tasks scr, lungs, heart,
clavicles), ``qata`` / ``covid_qu_ex`` -> ``qata.json`` (task infection; not both: COVID-QU-Ex's infection set
holds QaTa's images), ``folder`` -> ``real_lungs.json`` (task real_lungs; replaces ``../shared/data/real-cxr-lungs``).
``chexpert.localize`` (CheXlocalize's release folder, its ``CheXlocalize/`` folder, or one ground-truth JSON) gives the
CheXpert radiographs it covers radiologists' lesion masks (:mod:`bundle.data.chexlocalize`): the DoLL quality stage
then scores the DoLL on real radiographs, where without it it is skipped (real CheXpert has no lesion masks of its
own). ``chexpert.test`` (``test_labels.csv`` or its folder; found by itself in the release folder) adds CheXpert's test
set: the datalist then takes CheXpert's own splits (``valid.csv`` as validation, the test set as test), so the DoLL
recipe can be tuned on the validation masks and judged on the test masks
(:func:`bundle.data.chexpert.chexpert_datalist`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..utils import BundleInputError, PathLike

__all__ = ["DATA_KEYS", "load_data_spec", "phantom_params", "prepare_data", "data_sources", "describe_sources"]

logger = logging.getLogger(__name__)

#: Keys of the data file: key -> (the datalist it feeds, the keys its mapping form accepts, what it is).
DATA_KEYS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "chexpert": ("chexpert", ("root", "localize", "test"), "CheXpert (CheXpert-v1.0-small or CheXpert-v1.0), "
                 "optionally with CheXlocalize's segmentations and CheXpert's test set"),
    "jsrt_scr": ("scr", ("root", "images", "masks"), "JSRT images (.IMG or converted) with SCR masks"),
    "qata": ("qata", ("root",), "QaTa-COV19(-v2) infection masks"),
    "covid_qu_ex": ("qata", ("root", "classes"), "COVID-QU-Ex Infection Segmentation Data"),
    "folder": ("real_lungs", ("root", "images_subdir", "masks_subdir", "cases_csv"),
               "a plain images/ + masks/ + cases.csv folder"),
}
_PATH_FIELDS = ("root", "images", "masks")
#: Fields that name a file, or a folder holding it (checked to exist here, read by their adapter).
_FILE_FIELDS = ("localize", "test")


def _read_yaml(path: Path) -> Any:
    import yaml

    if not path.is_file():
        raise BundleInputError(path, "data file not found" if not path.exists() else "data file is not a file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BundleInputError(path, f"not valid YAML ({e})".replace("\n", " ")) from None


def _resolve_path(value: Any, name: str, where: Path | None, base: Path, folder: bool) -> str:
    """The absolute path of a data-file field (relative to ``base``), checked to exist: a folder, or (``folder``
    false) a file or a folder."""
    what = "folder" if folder else "file or folder"
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise BundleInputError(where, f"{name}: expected a {what} path, got {value!r}")
    p = Path(os.path.expanduser(str(value)))
    p = p if p.is_absolute() else base / p
    if not (p.is_dir() if folder else p.exists()):
        raise BundleInputError(p, f"{what} not found (given as {name} in {where if where else 'the data spec'})")
    return str(p.resolve())


def load_data_spec(source: PathLike | Mapping[str, Any] | None, base_dir: PathLike | None = None) -> dict[str, Any]:
    """Read and check the user's data file (see the module docstring); returns ``{key: {"root"|"images"|...:
    absolute path, ...}}`` with only the keys given (``{}`` for ``None`` or an empty string).

    Checks done here (cheap; the files themselves are checked by the adapters in the data stage): the file is YAML
    holding a mapping, every key is known, every value is a path or a mapping of the allowed fields, ``qata`` and
    ``covid_qu_ex`` are not both given, and every folder named exists.

    Raises:
        BundleInputError: naming the data file (or the missing folder) and the problem.
    """
    if source is None or (isinstance(source, str) and not source.strip()):
        return {}
    if isinstance(source, Mapping):
        where: Path | None = None
        raw: Any = dict(source)
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        where = Path(os.path.expanduser(str(source))).absolute()
        raw = _read_yaml(where)
        base = Path(base_dir) if base_dir is not None else where.parent
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise BundleInputError(where, f"the data file must hold a mapping of datasets ({', '.join(DATA_KEYS)}), "
                                      f"got {type(raw).__name__}")
    unknown = [k for k in raw if k not in DATA_KEYS]
    if unknown:
        raise BundleInputError(where, f"unknown dataset key(s) {unknown}; known: {', '.join(DATA_KEYS)}")
    if "qata" in raw and "covid_qu_ex" in raw:
        raise BundleInputError(where, "give one infection dataset, qata or covid_qu_ex, not both (COVID-QU-Ex's "
                                      "infection set holds QaTa-COV19 images: the two would share patients)")
    spec: dict[str, Any] = {}
    for key, value in raw.items():
        _, fields, what = DATA_KEYS[key]
        if isinstance(value, (str, os.PathLike)):
            value = {"root": value}
        if not isinstance(value, Mapping) or not value:
            raise BundleInputError(where, f"{key}: expected a folder path or a mapping with {list(fields)} ({what}), "
                                          f"got {value!r}")
        bad = [f for f in value if f not in fields]
        if bad:
            raise BundleInputError(where, f"{key}: unknown field(s) {bad}; allowed: {list(fields)}")
        entry: dict[str, Any] = {}
        for field, v in value.items():
            if field in _PATH_FIELDS or field in _FILE_FIELDS:
                entry[field] = _resolve_path(v, f"{key}.{field}", where, base, folder=field in _PATH_FIELDS)
            elif field == "classes":
                if isinstance(v, str):
                    v = [v]
                if not isinstance(v, list) or not v or not all(isinstance(c, str) for c in v):
                    raise BundleInputError(where, f"{key}.classes: expected a list of class folder names, got {v!r}")
                entry[field] = list(v)
            else:
                entry[field] = str(v)
        if key == "jsrt_scr" and "root" not in entry and not ("images" in entry and "masks" in entry):
            raise BundleInputError(where, "jsrt_scr: give `root`, or both `images` and `masks`")
        if key != "jsrt_scr" and "root" not in entry:
            raise BundleInputError(where, f"{key}: `root` is required")
        spec[key] = entry
    return spec


def phantom_params(phantom: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The phantom generator's parameters with the replaced datasets not drawn (their counts set to 0); ``None``
    when every phantom dataset is replaced (nothing to draw)."""
    params = dict(phantom)
    replaced = {DATA_KEYS[k][0] for k in spec}
    if "chexpert" in replaced:
        params.update(chexpert_train_patients=0, chexpert_valid_patients=0)
    if "scr" in replaced:
        params["scr_cases"] = 0
    if "qata" in replaced:
        params.update(qata_train=0, qata_test=0)
    return None if {"chexpert", "scr", "qata"} <= replaced else params


def data_sources(summary: Mapping[str, Any]) -> dict[str, str]:
    """``{datalist: "phantom" | "real: <dataset> (<root>)" | "absent"}`` from the data stage's ``summary.json``."""
    out: dict[str, str] = {}
    for name, info in summary.items():
        if not isinstance(info, Mapping):
            continue
        if info.get("status") != "written":
            out[name] = "absent"
        elif info.get("source") == "real":
            out[name] = f"real: {info.get('dataset', name)} ({info.get('root')})"
        else:
            out[name] = "phantom"
    return out


def describe_sources(summary: Mapping[str, Any]) -> str:
    """One sentence for logs and reports: which datalists hold real data and which phantom data."""
    src = data_sources(summary)
    real = [f"{k} = {v[len('real: '):]}" for k, v in src.items() if v.startswith("real")]
    phantom = [k for k, v in src.items() if v == "phantom"]
    parts = []
    parts.append("real data: " + ("; ".join(real) if real else "none"))
    parts.append("phantom data: " + (", ".join(phantom) if phantom else "none"))
    return ". ".join(parts) + "."


def prepare_data(
    phantom_dir: PathLike,
    datalist_dir: PathLike,
    phantom: Mapping[str, Any],
    datalists: Mapping[str, Any],
    data_spec: PathLike | Mapping[str, Any] | None = None,
    real_lungs_dir: PathLike | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    experiment: str = "cxr_doll_data",
) -> dict[str, Any]:
    """The data stage: check the user's data file, draw the phantoms still needed, build and write every datalist.

    Order: the data file is checked first (:func:`load_data_spec`), then the user's datasets are read and every
    file checked (in memory); phantoms are drawn only for the datasets the file does not give
    (:func:`phantom_params`; nothing when it gives all three); then the phantom datalists are built, and all are
    written only when all are good
    (:func:`bundle.data.datalists.build_all_datalists`): a missing or malformed file stops the stage with the file
    named and no datalist written half. The sources (real or phantom, per datalist) are in ``summary.json``, the
    printed summary and, with ``tracking_uri``, an MLflow run (params ``source_<datalist>``).

    Returns:
        ``{"spec": ..., "phantom": generator summary or None, "datalists": build_all_datalists summary}``.
    """
    from .datalists import build_all_datalists
    from .phantom import generate_phantom_datasets

    spec = load_data_spec(data_spec)
    if spec:
        logger.info("data file: %s", {k: v for k, v in spec.items()})
    if "folder" in spec:
        real_lungs_dir = None  # replaced by the user's folder
    elif real_lungs_dir is not None and not os.path.isdir(real_lungs_dir):
        real_lungs_dir = None
    kwargs = dict(real_lungs_dir=real_lungs_dir, seed=seed, real=spec, **dict(datalists))
    given = sorted({DATA_KEYS[k][0] for k in spec})
    checked = None
    if given:  # the user's datasets first: a bad file stops the stage before any phantom is drawn
        checked = build_all_datalists(phantom_dir, datalist_dir, only=given, write=False,
                                      **{**kwargs, "required": ()})
    params = phantom_params(phantom, spec)
    phantom_summary = None
    if params is not None:
        phantom_summary = generate_phantom_datasets(phantom_dir, seed=seed, **params)
    summary = build_all_datalists(phantom_dir, datalist_dir, prebuilt=checked, **kwargs)
    if tracking_uri:
        from ..tracking import log_run

        params_log = {f"source_{k}": v[:240] for k, v in data_sources(summary).items()}
        metrics = {f"{k}_{sec}": float(v[sec]) for k, v in summary.items() if isinstance(v, Mapping)
                   for sec in ("training", "validation", "test") if sec in v}
        log_run(tracking_uri, experiment, "data", params=params_log, metrics=metrics,
                artifacts=[os.path.join(os.fspath(datalist_dir), "summary.json")],
                tags={"stage": "data", "real_data": str(any(v.get("source") == "real" and k != "real_lungs"
                                                            for k, v in summary.items() if isinstance(v, Mapping)))})
    return {"spec": spec, "phantom": phantom_summary, "datalists": summary}
