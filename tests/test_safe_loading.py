"""Safe loading of checkpoints a user can supply: tensors and plain values only (``weights_only=True``).

A classifier checkpoint whose pickle would create a marker file on load is refused with an error that names the
file, and the marker never appears; truncated, empty and foreign files are refused with the file named.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle.utils import BundleInputError, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


class MakesMarker:
    """Unpickling this object calls ``open(marker, "w")``: code that runs on load (what an unsafe load allows)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _small_classifier(folder: Path) -> dict[str, torch.Tensor]:
    from bundle.networks.classifiers import build_classifier, save_spec

    kwargs = {"init_features": 8, "growth_rate": 4, "block_config": (1, 1)}
    net = build_classifier("densenet_small", **kwargs)
    save_spec(str(folder), "densenet_small", 14, **{**kwargs, "block_config": [1, 1]})
    return net.state_dict()


def test_pickle_with_code_as_classifier_checkpoint_is_refused(tmp_path):
    from bundle.doll.generator import load_classifiers

    marker = tmp_path / "code_ran.txt"
    folder = tmp_path / "classifiers" / "evil"
    sd = _small_classifier(folder)
    weights = folder / "model.pt"
    torch.save({"network": sd, "payload": MakesMarker(marker)}, weights)
    with pytest.raises(BundleInputError) as err:
        load_classifiers(str(tmp_path / "classifiers"), ["evil"])
    assert str(err.value).startswith(str(weights)) and "refused" in str(err.value)
    assert not marker.exists(), "the checkpoint's code ran"
    # control, in another process: the same file does run its code under an unsafe load (the payload is live)
    code = f"import torch, sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_safe_loading import MakesMarker; " \
           f"torch.load({str(weights)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    assert marker.exists()


def test_resume_refuses_a_last_checkpoint_with_code(tmp_path):
    from ignite.engine import Engine

    from bundle.handlers.checkpoint import ResumableCheckpoint

    marker = tmp_path / "code_ran.txt"
    net = torch.nn.Linear(2, 2)
    torch.save({"network": net.state_dict(), "trainer": MakesMarker(marker)}, tmp_path / "last.pt")
    handler = ResumableCheckpoint(str(tmp_path), net)
    with pytest.raises(BundleInputError, match="last.pt: refused"):
        handler.attach(Engine(lambda e, b: None))
    assert not marker.exists()


def test_bundle_checkpoints_load_safely(tmp_path):
    """What the bundle writes (network, optimizer, scheduler, ignite state, best metric) passes weights_only."""
    from ignite.engine import Engine

    from bundle.handlers.checkpoint import ResumableCheckpoint
    from bundle.networks.transfer import read_state_dict

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 4)
    engine = Engine(lambda e, b: None)
    engine.run([0, 1], max_epochs=1)
    ResumableCheckpoint(str(tmp_path), net, opt, sched).save(engine)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert set(ckpt) == {"network", "trainer", "optimizer", "lr_scheduler", "stopped"}
    assert torch.equal(read_state_dict(str(tmp_path / "last.pt"))[0]["weight"], net.weight)


@pytest.mark.parametrize("kind", ["truncated", "empty", "foreign", "missing"])
def test_bad_checkpoint_files_name_the_file(tmp_path, kind):
    from bundle.networks.transfer import read_state_dict

    good = tmp_path / "good.pt"
    torch.save(torch.nn.Linear(64, 64).state_dict(), good)
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        path.write_bytes((ROOT / "docs" / "images" / "phantom_montage.png").read_bytes())
    problem = {"truncated": "cannot read checkpoint", "empty": "empty", "foreign": "cannot read checkpoint",
               "missing": "not found"}[kind]
    with pytest.raises(BundleInputError, match=problem) as err:
        read_state_dict(str(path))
    assert str(err.value).startswith(str(path))


def test_no_unsafe_torch_load_in_the_package():
    hits = []
    for py in (ROOT / "bundle").rglob("*.py"):
        for i, line in enumerate(py.read_text().splitlines(), 1):
            if "weights_only=False" in line.replace(" ", ""):
                hits.append(f"{py}:{i}")
    assert not hits, hits
    assert os.path.isfile(ROOT / "bundle" / "utils.py")
