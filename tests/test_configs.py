"""The configs follow the Model Zoo's layout: each workflow config runs alone, overlays only add to their workflow's
config, shared values agree everywhere, and no overlay addresses a handler by its list position."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
#: workflow configs a user runs alone (``python -m monai.bundle run --config_file configs/<name>``)
STANDALONE = ("train.yaml", "pretrain.yaml", "train_classifier.yaml", "generate_doll.yaml", "prepare_data.yaml",
              "analysis.yaml", "report.yaml", "export_doll.yaml")
#: overlays and the workflow config each is read after
OVERLAYS = {"evaluate.yaml": "train.yaml", "multi_gpu_train.yaml": "train.yaml",
            "evaluate_classifier.yaml": "train_classifier.yaml",
            "multi_gpu_train_classifier.yaml": "train_classifier.yaml", "multi_gpu_pretrain.yaml": "pretrain.yaml", "evaluate_doll.yaml": "generate_doll.yaml",
            "doll_consensus.yaml": "generate_doll.yaml"}
BEGIN, END = "# ---- shared settings", "# ---- end of the shared settings"
REF = re.compile(r"@([A-Za-z_][\w#]*)")


def shared_block(name: str) -> str:
    text = (CONFIGS / name).read_text()
    assert BEGIN in text and END in text, f"{name}: no shared-settings block"
    return text[text.index(BEGIN):text.index(END)]


def references(config: object) -> set[str]:
    """Every ``@id`` named in a config's strings (expressions and plain references)."""
    found: set[str] = set()
    if isinstance(config, dict):
        for v in config.values():
            found |= references(v)
    elif isinstance(config, list):
        for v in config:
            found |= references(v)
    elif isinstance(config, str):
        found |= set(REF.findall(config))
    return found


def test_every_config_is_standalone_or_an_overlay() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert not (CONFIGS / "common.yaml").exists()
    expected = set(STANDALONE) | set(OVERLAYS) | {"inference.yaml", "pipeline.yaml", "sweep.yaml"}
    assert names == expected, f"unexpected or missing configs: {names ^ expected}"


@pytest.mark.parametrize("name", STANDALONE)
def test_standalone_config_resolves_every_reference_alone(name: str) -> None:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / name))
    missing = sorted(r for r in references(parser.get()) if r not in parser)
    assert not missing, f"{name} names ids it does not define: {missing}"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_resolves_on_its_workflow_config(overlay: str) -> None:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / OVERLAYS[overlay]), str(CONFIGS / overlay)])
    missing = sorted(r for r in references(parser.get()) if r not in parser)
    assert not missing, f"{overlay} over {OVERLAYS[overlay]}: undefined ids {missing}"


def test_shared_settings_agree_across_standalone_configs() -> None:
    blocks = {name: shared_block(name) for name in STANDALONE}
    reference = blocks["train.yaml"]
    differ = [name for name, block in blocks.items() if block != reference]
    assert not differ, f"shared settings differ from train.yaml's in {differ}"
    # the values that must agree between stages are read from one place
    assert "bundle.constants.IMAGE_SIZE" in reference and "bundle.constants.MLFLOW_EXPERIMENT_PREFIX" in reference


def test_no_config_addresses_a_handler_by_position() -> None:
    offenders = [f"{p.name}: {line.strip()}" for p in sorted(CONFIGS.glob("*.yaml"))
                 for line in p.read_text().splitlines() if re.search(r"handlers#\d", line)]
    assert not offenders, offenders


def test_handlers_are_component_dicts() -> None:
    """MONAI's property checks and MONAI Label read every handler as a dict with ``_target_``."""
    for name, keys in (("train.yaml", ("train#handlers", "validate#handlers")),
                       ("pretrain.yaml", ("train#handlers", "validate#handlers")),
                       ("train_classifier.yaml", ("train#handlers", "validate#handlers"))):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / name))
        for key in keys:
            bad = [h for h in parser.get(key) if not (isinstance(h, dict) and "_target_" in h)]
            assert not bad, f"{name} {key}: {bad}"


def test_every_sweep_grid_is_defined_once_in_sweep_yaml() -> None:
    """configs/sweep.yaml holds every grid; configs/pipeline.yaml only names them; each one builds its runs."""
    import sys

    import yaml

    sys.path.insert(0, str(CONFIGS.parent))
    from scripts.sweep import SweepGrid

    grids = yaml.safe_load((CONFIGS / "sweep.yaml").read_text())
    for name in grids:
        runs = SweepGrid.from_settings(name).runs()
        assert runs and len({r.name for r in runs}) == len(runs), name
    pipeline = yaml.safe_load((CONFIGS / "pipeline.yaml").read_text())
    named = [section["sweep"] for section in pipeline.values() if "sweep" in section]
    assert named and all(isinstance(n, str) and n in grids for n in named), named
    full = SweepGrid.from_settings("full")
    assert len(full.seeds) >= 5 and full.sizes == ["2", "4", "8", "16", "all"]
    with pytest.raises(ValueError, match="unknown sweep grid fields"):
        SweepGrid.from_mapping({"tasks": ["scr"], "inits": ["doll"], "sizes": [4], "seeds": [0], "size": 2})


def test_sweep_grids_join_into_one_sweep() -> None:
    """``--settings full,controls`` is the union of both grids: every run of each once, each with its own
    architecture (the controls stay SegResNet beside the full protocol's UNet part); grids whose shared overrides
    differ are refused."""
    import sys

    sys.path.insert(0, str(CONFIGS.parent))
    from scripts.sweep import SweepGrid

    full, controls = (SweepGrid.from_settings(n).runs() for n in ("full", "controls"))
    joined = SweepGrid.from_settings("full,controls")
    runs = joined.runs()
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    assert set(names) == {r.name for r in full} | {r.name for r in controls}
    overlap = {r.name for r in full} & {r.name for r in controls}
    assert len(runs) == len(full) + len(controls) - len(overlap) and overlap  # doll/scratch SegResNet cells
    by_name = {r.name: r for r in runs}
    assert all(by_name[r.name].arch == r.arch and by_name[r.name].overrides.get("image_size") ==
               r.overrides.get("image_size") for r in full + controls)
    assert SweepGrid.from_settings(["full", "controls"]).runs() == runs
    with pytest.raises(ValueError, match="share their overrides"):
        SweepGrid.from_settings("full,pipeline_quick")
    with pytest.raises(ValueError, match="unknown sweep settings 'nope'"):
        SweepGrid.from_settings("full,nope")


@pytest.mark.parametrize("labels", ["doll", "shuffled"])
def test_pretrain_tracking_tags_name_the_pretraining_labels(labels: str) -> None:
    """The MLflow run of a pre-training control is tagged with its labels (not always ``doll``), so a tracking query
    tells the DoLL pre-training from its controls."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "pretrain.yaml"))
    parser["pretrain_labels"] = labels
    tracking = [i for i, h in enumerate(parser.get("train#handlers")) if h["_target_"].endswith("TrackingHandler")]
    assert len(tracking) == 1
    tags = parser.get_parsed_content(f"train#handlers#{tracking[0]}#tags")
    assert tags["labels"] == labels and tags["stage"] == "pretrain"
    assert parser.get_parsed_content("pretrain_name") == f"segresnet_{labels}"


def test_every_presets_doll_recipe_builds_its_settings() -> None:
    """Each preset of configs/pipeline.yaml that changes the DoLL recipe gives valid settings groups once its ids are
    applied to configs/generate_doll.yaml's ``doll`` block (as the runner passes them): known observation names,
    known explainers, per-observation values with the explainer they need. The doll_data preset tunes every
    observation's map, smoothing and percentile."""
    from bundle.constants import OBSERVATIONS
    from bundle.doll.generator import IGSettings, PostprocessSettings

    settings = ConfigParser.load_config_file(str(CONFIGS / "pipeline.yaml"))
    presets = {name: s for name, s in settings.items()
               if isinstance(s, dict) and (s.get("overrides") or {}).get("doll")}
    assert "doll_data" in presets
    for name, preset in presets.items():
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "generate_doll.yaml"))
        for key, value in preset["overrides"]["doll"].items():
            parser[key.replace("doll#n_steps", "doll#ig#n_steps")] = value
        ig = dict(parser["doll"]["ig"])
        if str(ig["explainer"]).startswith("$"):
            ig["explainer"] = "ig"
        ig["gradcam_layer"] = "features.norm5"          # resolved from the classifiers' files at run time
        IGSettings(**ig)
        PostprocessSettings(**parser["doll"]["post"])
    ig = ConfigParser.load_config_file(str(CONFIGS / "pipeline.yaml"))["doll_data"]["overrides"]["doll"]
    for key in ("doll#post#class_threshold_values", "doll#post#class_smooth_sigma", "doll#ig#class_explainers"):
        assert list(ig[key]) == list(OBSERVATIONS[1:]), key
