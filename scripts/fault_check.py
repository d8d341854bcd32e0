#!/usr/bin/env python
"""Fault injection at a small size: what survives a kill -9, a full disk, a bad checkpoint, an unreachable MLflow
server and two runs on one output folder. Writes the fault table and the bad-input table into docs/reliability.md
(between the ``<!-- fault-table -->`` and ``<!-- bad-input-table -->`` markers) and the raw rows to
``<work>/fault_check.json``.

    python scripts/fault_check.py                      # everything (about 10 minutes on 2 cores)
    python scripts/fault_check.py --parts kill --stages data,classifier --points 0.5
    python scripts/fault_check.py --no-docs            # measure only

Kill -9: each stage (data, classifier, DoLL, pretrain, fine-tune, export) first runs uninterrupted from the outputs
of the stages before it (the reference); then, for each kill point (a fraction of the reference's wall time), the
state before the stage is restored, the stage is started, killed with SIGKILL at that moment, and re-run to the
end; its outputs must equal the reference's (files byte for byte, checkpoints tensor for tensor). Stages run as
``python -m monai.bundle run`` would, in fresh processes forked from a server that imported MONAI once
(``scripts/processes.py``), so a kill hits the stage's own process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.processes import PRELOAD, run_workflows_in_child, say  # noqa: E402

STAGES = ("data", "classifier", "doll", "pretrain", "finetune", "export")
CLASSIFIER = "densenet_small_seed0"

# small sizes: the whole chain runs in about a minute on 2 cores
DATA = {"phantom#image_size": 128, "phantom#chexpert_train_patients": 16, "phantom#chexpert_valid_patients": 4,
        "phantom#scr_cases": 10, "phantom#qata_train": 4, "phantom#qata_test": 2, "phantom#num_workers": 1,
        "phantom#progress": False}
COMMON = {"image_size": [64, 64], "device": "$torch.device('cpu')"}
STEPS: dict[str, list[dict[str, Any]]] = {
    "data": [{"name": "data", "configs": ["prepare_data.yaml"], "args": DATA}],
    "classifier": [{"name": "classifier", "configs": ["train_classifier.yaml"],
                    "args": {"classifier_arch": "densenet_small", "seed": 0, "max_epochs": 12, "batch_size": 8,
                             "show_progress": False}}],
    "doll": [{"name": "doll", "configs": ["generate_doll.yaml"],
              "args": {"classifier_names": [CLASSIFIER], "doll#n_steps": 4, "batch_size": 2}}],
    "pretrain": [{"name": "pretrain", "configs": ["pretrain.yaml"],
                  "args": {"max_epochs": 10, "batch_size": 4, "show_progress": False}}],
    "finetune": [{"name": "finetune", "configs": ["train.yaml"],
                  "args": {"task": "scr", "init": "doll", "train_size": "all", "seed": 0, "num_iterations": 60,
                           "epoch_length": 6, "batch_size": 2, "show_progress": False}}],
}
# what each stage writes (relative to the run root) and is compared with the reference
OUTPUTS = {
    "data": ["data"],
    "classifier": [f"models/classifiers/{CLASSIFIER}"],
    "doll": ["data/doll", "data/datalists/doll.json"],
    "pretrain": ["models/pretrain"],
    "finetune": ["models/segmentation"],
    "export": ["models/model.pt", "models/model.ts"],
}
IGNORED_NAMES = (".lock",)


# ---- running stages in forked processes --------------------------------------------------------------------------
def _context() -> Any:
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD) + ["bundle.doll.generator", "bundle.handlers.checkpoint"])
    return ctx


def _child(steps: list[dict[str, Any]], log: str, fsize: int | None) -> None:
    if fsize is not None:  # "disk full": writes past fsize bytes fail with EFBIG (SIGXFSZ ignored, so no core dump)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    sys.exit(run_workflows_in_child(steps, log, threads=1))


def _noop() -> None:
    sys.exit(0)


def _resume_evidence(log: str) -> str:
    """What the re-run says it found done (its resume line), if anything."""
    for key in ("resumed from", "already done", "written, "):
        for line in log.splitlines():
            if key in line:
                text = line.strip()
                i = text.find(key)
                return text[max(0, i - 60):i + 60].split(" - INFO - ")[-1]
    return "nothing found done"


def _final_epoch(root: Path, stage: str) -> int:
    """The last epoch of a finished training stage (its ``last.pt``; early stopping may end it before max_epochs)."""
    from bundle.utils import load_checkpoint

    lasts = [f for rel in OUTPUTS[stage] for f in _files(root, rel) if f.name == "last.pt"]
    if not lasts:
        return 0
    t = load_checkpoint(lasts[0])["trainer"]
    return int(t["iteration"] // max(1, t["epoch_length"]))


EPOCHS = {"classifier": STEPS["classifier"][0]["args"]["max_epochs"], "pretrain": STEPS["pretrain"][0]["args"]["max_epochs"],
          "finetune": STEPS["finetune"][0]["args"]["num_iterations"] // STEPS["finetune"][0]["args"]["epoch_length"]}


def _epoch_reached(root: Path, stage: str, k: int) -> Callable[[], bool]:
    """A predicate: the stage's ``last.pt`` holds epoch ``k`` or later (polled; reloaded when it changes)."""
    seen: dict[str, Any] = {"mtime": None, "epoch": 0}

    def check() -> bool:
        from bundle.utils import load_checkpoint

        lasts = [f for rel in OUTPUTS[stage] for f in _files(root, rel) if f.name == "last.pt"]
        if not lasts:
            return False
        mtime = lasts[0].stat().st_mtime_ns
        if mtime != seen["mtime"]:
            seen["mtime"] = mtime
            try:
                t = load_checkpoint(lasts[0])["trainer"]
                seen["epoch"] = t["iteration"] // max(1, t["epoch_length"])
            except Exception:  # noqa: BLE001 - replaced while read: try again at the next poll
                seen["mtime"] = None
        return seen["epoch"] >= k

    return check


def _progress(root: Path, stage: str) -> str:
    """How far a killed stage had got: its checkpoint's epoch, DoLL records, phantom images, or export files."""
    from bundle.utils import load_checkpoint

    if stage in ("classifier", "pretrain", "finetune"):
        lasts = [f for rel in OUTPUTS[stage] for f in _files(root, rel) if f.name == "last.pt"]
        if not lasts:
            return "no checkpoint yet"
        t = load_checkpoint(lasts[0])["trainer"]
        return f"last.pt at epoch {t['iteration'] // max(1, t['epoch_length'])}"
    if stage == "doll":
        return f"{sum(1 for f in _files(root, 'data/doll') if f.suffix == '.json' and '.part' not in f.name)} DoLL records"
    if stage == "data":
        return f"{sum(1 for f in _files(root, 'data/phantom') if f.suffix in ('.png', '.jpg', '.gif'))} image files"
    return ", ".join(f for f in ("model.pt", "model.ts") if (root / "models" / f).exists()) or "no output yet"


def _export_child(root: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from scripts.run_pipeline import Pipeline

    try:
        Pipeline(quick=True, device="cpu", root=Path(root)).export()
    except SystemExit as e:
        print(e)
        sys.exit(1)
    sys.exit(0)


class Runner:
    def __init__(self, work: Path):
        self.work = work
        self.root = work / "run"          # every run of every stage uses this path (datalists hold absolute paths)
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ctx = _context()
        self.count = 0
        warm = self.ctx.Process(target=_noop)   # start the fork server now: its import is not a stage's time
        warm.start()
        warm.join()

    def paths(self, root: Path | None = None) -> dict[str, str]:
        root = root or self.root
        return {"data_root": str(root / "data"), "output_root": str(root / "eval"), "models_dir": str(root / "models"),
                "datalist_dir": str(root / "data" / "datalists")}

    def steps(self, stage: str, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        out = []
        for step in STEPS[stage]:
            out.append({**step, "args": {**COMMON, **self.paths(), **step["args"], **(extra or {})}})
        return out

    def start(self, stage: str, extra: dict[str, Any] | None = None, fsize: int | None = None) -> tuple[Any, Path]:
        self.count += 1
        log = self.logs / f"{self.count:03d}_{stage}.log"
        if stage == "export":
            proc = self.ctx.Process(target=_export_child, args=(str(self.root), str(log)))
        else:
            proc = self.ctx.Process(target=_child, args=(self.steps(stage, extra), str(log), fsize))
        proc.start()
        return proc, log

    def run(self, stage: str, extra: dict[str, Any] | None = None, fsize: int | None = None,
            timeout: float = 900) -> tuple[int, float, str]:
        t = time.time()
        proc, log = self.start(stage, extra, fsize)
        proc.join(timeout)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
        return proc.exitcode, time.time() - t, log.read_text(errors="replace")

    def run_killed(self, stage: str, after: float, until: Callable[[], bool] | None = None) -> tuple[int, str]:
        """Start ``stage``; SIGKILL it after ``after`` seconds, or as soon as ``until()`` is true when given."""
        proc, log = self.start(stage)
        if until is None:
            proc.join(after)
        else:
            deadline = time.time() + after
            while proc.is_alive() and time.time() < deadline and not until():
                time.sleep(0.02)
        killed = proc.is_alive()
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        return (-9 if killed else proc.exitcode), log.read_text(errors="replace")


# ---- snapshots and comparison ------------------------------------------------------------------------------------
def snapshot(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)


def restore(snap: Path, root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(snap, root, symlinks=True)


def _files(base: Path, rel: str) -> list[Path]:
    p = base / rel
    if p.is_file():
        return [p]
    return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(IGNORED_NAMES)) if p.is_dir() else []


def _tensors_equal(a: Path, b: Path) -> bool:
    import torch

    from bundle.utils import load_checkpoint

    def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(obj, dict):
            out: dict[str, Any] = {}
            for k, v in obj.items():
                out.update(flat(v, f"{prefix}{k}/"))
            return out
        return {prefix: obj}

    fa, fb = flat(load_checkpoint(a)), flat(load_checkpoint(b))
    if fa.keys() != fb.keys():
        return False
    for k in fa:
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _ts_equal(a: Path, b: Path) -> bool:
    import torch

    ma, mb = torch.jit.load(str(a), map_location="cpu"), torch.jit.load(str(b), map_location="cpu")
    sa, sb = ma.state_dict(), mb.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def compare(stage: str, ref: Path, got: Path) -> tuple[bool, str]:
    """Outputs of ``stage`` under ``got`` against the reference under ``ref`` (paths relative to the roots)."""
    n, bad = 0, []
    for rel in OUTPUTS[stage]:
        ref_files = {f.relative_to(ref).as_posix(): f for f in _files(ref, rel)}
        got_files = {f.relative_to(got).as_posix(): f for f in _files(got, rel)}
        extra = sorted(set(got_files) - set(ref_files))
        missing = sorted(set(ref_files) - set(got_files))
        bad += [f"extra {x}" for x in extra] + [f"missing {x}" for x in missing]
        for name in sorted(set(ref_files) & set(got_files)):
            n += 1
            a, b = ref_files[name], got_files[name]
            if a.read_bytes() == b.read_bytes():
                continue
            if name.endswith((".pt", ".pth")) and _tensors_equal(a, b):
                continue   # same tensors (a zip's member names may differ)
            if name.endswith(".ts") and _ts_equal(a, b):
                continue
            bad.append(f"differs {name}")
    return (not bad and n > 0), (f"{n} files equal" if not bad else "; ".join(bad[:4]) + f" ({len(bad)} issues)")


def leftovers(root: Path) -> list[str]:
    """Temporary files of interrupted atomic writes (``.<name>.<random>.part<suffix>``)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".part" in p.name and p.name.startswith("."))


# ---- the fault parts ---------------------------------------------------------------------------------------------
class Check:
    def __init__(self, work: Path, stages: list[str], points: list[float]):
        self.work = work
        self.runner = Runner(work)
        self.stages = stages
        self.points = points
        self.rows: list[dict[str, Any]] = []
        self.ref_time: dict[str, float] = {}

    def row(self, stage: str, fault: str, survived: bool, equal: bool | None, detail: str) -> None:
        r = {"stage": stage, "fault": fault, "survived": survived, "outputs_equal": equal, "detail": detail}
        self.rows.append(r)
        say(f"[fault] {stage:10s} {fault:38s} survived={survived} equal={equal} {detail}")

    def snap(self, name: str) -> Path:
        return self.work / "snap" / name

    def reference(self) -> None:
        """The uninterrupted chain, with a snapshot of the run folder before and after every stage."""
        root = self.runner.root
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        snapshot(root, self.snap("before_data"))
        for i, stage in enumerate(STAGES):
            code, dt, log = self.runner.run(stage)
            if code != 0:
                raise SystemExit(f"[fault] reference run of {stage} failed (exit {code}):\n{log[-3000:]}")
            self.ref_time[stage] = dt
            say(f"[fault] reference {stage}: {dt:.1f} s")
            snapshot(root, self.snap(f"after_{stage}"))
            if i + 1 < len(STAGES):
                snapshot(root, self.snap(f"before_{STAGES[i + 1]}"))

    def kills(self) -> None:
        root = self.runner.root
        for stage in self.stages:
            points: list[tuple[str, float, Any]] = [(f"kill -9 at {int(f * 100)}% of the run", f, None)
                                                    for f in self.points]
            final = _final_epoch(self.snap(f"after_{stage}"), stage) if stage in EPOCHS else 0
            if final >= 2:  # and at checkpoints: right after the first, and past half of the reference's epochs
                for k in sorted({1, max(2, final // 2 + 1)} - {final}):
                    points.append((f"kill -9 once last.pt holds epoch {k}", 3.0, _epoch_reached(root, stage, k)))
            for name, frac, until in points:
                restore(self.snap(f"before_{stage}"), root)
                after = max(0.5, frac * self.ref_time[stage])
                code, _ = self.runner.run_killed(stage, after, until)
                hit = code == -9
                left = leftovers(root)
                at_kill = _progress(root, stage)
                code2, dt, log = self.runner.run(stage)
                ok_run = code2 == 0
                equal, detail = compare(stage, self.snap(f"after_{stage}"), root) if ok_run else (False, log[-300:])
                when = f"at {after:.1f} s of {self.ref_time[stage]:.1f} s" if until is None else "then"
                detail = (f"killed {when} ({at_kill})" if hit else
                          f"finished before the kill ({after:.1f} s)") + \
                    f"; {len(left)} temp files left by the kill; re-run {dt:.1f} s ({_resume_evidence(log)}): {detail}"
                self.row(stage, name, ok_run, equal if hit else None, detail)

    def disk_full(self) -> None:
        """RLIMIT_FSIZE in the child: writes past the limit fail with EFBIG, as on a full disk."""
        root = self.runner.root
        cases = [("data", "before_data", 8_000), ("classifier", "before_classifier", 2_000_000),
                 ("doll", "before_doll", 4_000)]
        for stage, snap, limit in cases:
            restore(self.snap(snap), root)
            code, dt, log = self.runner.run(stage, fsize=limit)
            failed_clearly = code != 0 and "could not be written" in log
            named = [ln.strip() for ln in log.splitlines() if "could not be written" in ln][-1:] or \
                [ln.strip() for ln in log.splitlines() if "File too large" in ln][-1:] or [log.strip()[-200:]]
            left = leftovers(root)
            broken = self._unreadable_outputs(root, stage)
            # after the disk is freed, a re-run finishes and equals the reference
            code2, dt2, log2 = self.runner.run(stage)
            equal, detail = compare(stage, self.snap(f"after_{stage}"), root) if code2 == 0 else (False, log2[-300:])
            self.row(stage, f"disk full (RLIMIT_FSIZE {limit // 1000} kB)",
                     failed_clearly and not left and not broken and code2 == 0, equal,
                     f"exit {code} after {dt:.1f} s: {named[0][:160]}; {len(left)} temp files, {len(broken)} "
                     f"unreadable outputs left; re-run with space: {detail}")

    @staticmethod
    def _unreadable_outputs(root: Path, stage: str) -> list[str]:
        """Output files that exist but do not load (a half-written file left as if whole)."""
        from bundle.data.io import read_array
        from bundle.utils import load_checkpoint, load_json

        bad = []
        for rel in OUTPUTS[stage]:
            for f in _files(root, rel):
                if ".part" in f.name:
                    continue
                try:
                    if f.suffix in (".png", ".jpg", ".gif"):
                        read_array(f)
                    elif f.suffix == ".json":
                        load_json(f)
                    elif f.suffix in (".pt", ".pth"):
                        load_checkpoint(f)
                except Exception:  # noqa: BLE001 - any failure to load is what is counted
                    bad.append(str(f))
        return bad

    def bad_checkpoints(self) -> None:
        root = self.runner.root
        clf = root / "models" / "classifiers" / CLASSIFIER

        def truncate(p: Path) -> None:
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 2])

        def foreign(p: Path) -> None:
            p.write_bytes((ROOT / "docs" / "images" / "phantom_montage.png").read_bytes())

        def code_pickle(p: Path) -> None:
            p.write_bytes(_code_pickle(self.work / "code_ran.txt"))

        cases = [("doll", "before_doll", clf / "model.pt", truncate, "truncated classifier checkpoint"),
                 ("doll", "before_doll", clf / "model.pt", foreign, "foreign file as classifier checkpoint"),
                 ("doll", "before_doll", clf / "model.pt", code_pickle, "pickle with code as classifier ckpt"),
                 ("classifier", "after_classifier", clf / "last.pt", truncate, "truncated last.pt on resume"),
                 ("finetune", "before_finetune", None, truncate, "truncated pre-trained checkpoint")]
        for stage, snap, target, damage, name in cases:
            restore(self.snap(snap), root)
            if target is None:
                target = next((root / "models" / "pretrain").rglob("model.pt"))
            damage(target)
            code, dt, log = self.runner.run(stage, {"max_epochs": 6} if stage == "classifier" else None)
            named = str(target) in log
            ran = (self.work / "code_ran.txt").exists()
            line = next((ln.strip() for ln in reversed(log.splitlines()) if str(target) in ln), log.strip()[-160:])
            self.row(stage, name, code != 0 and named and not ran, None,
                     f"exit {code} after {dt:.1f} s; file named: {named}; code ran: {ran}; "
                     f"{line[line.find(str(target)):][:170]}")
        # inference with a damaged model (MONAI's CheckpointLoader)
        restore(self.snap("after_export"), root)
        model = root / "models" / "model.pt"
        truncate(model)
        res = _inference(ROOT / "docs" / "images", root / "inf", {"checkpointloader#load_path": str(model)})
        said = next((ln.strip() for ln in (res.stdout + res.stderr).splitlines()
                     if str(model) + ": " in ln and "load_path" not in ln), "")
        self.row("inference", "truncated model checkpoint", res.returncode != 0 and bool(said), None,
                 f"exit {res.returncode}; file named: {bool(said)}; {said[said.find(str(model)):][:170]}")

    def mlflow_down(self) -> None:
        root = self.runner.root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]       # closed again when the block ends: nothing listens on it
        uri = f"http://127.0.0.1:{port}"
        for stage, snap in (("classifier", "before_classifier"), ("pretrain", "before_pretrain")):
            restore(self.snap(snap), root)
            code, dt, log = self.runner.run(stage, {"tracking_uri": uri})
            msg = next((ln.strip() for ln in reversed(log.splitlines()) if "unreachable" in ln), "")
            no_work = not list((root / "models").rglob("last.pt")) if stage == "classifier" else \
                not list((root / "models" / "pretrain").rglob("last.pt"))
            self.row(stage, "MLflow server unreachable (closed port)", code != 0 and bool(msg) and no_work, None,
                     f"exit {code} after {dt:.1f} s, no epoch run: {no_work}; {msg[msg.find('MLflow'):][:170]}")

    def two_runs(self) -> None:
        root = self.runner.root
        for stage, snap, expect in (("classifier", "before_classifier", "refuses"), ("doll", "before_doll", "refuses"),
                                    ("pretrain", "before_pretrain", "refuses"), ("data", "before_data", "waits")):
            restore(self.snap(snap), root)
            first, log1 = self.runner.start(stage)
            lock = {"classifier": root / "models" / "classifiers" / CLASSIFIER / ".lock",
                    "doll": root / "data" / "doll" / ".lock.rank0", "pretrain": None,
                    "data": root / "data" / ".lock"}[stage]
            deadline = time.time() + 300
            while time.time() < deadline and first.is_alive():
                cand = lock if lock is not None else next(iter((root / "models" / "pretrain").rglob(".lock")), None)
                if cand is not None and cand.exists() and cand.read_text().strip():
                    break
                time.sleep(0.1)
            code2, dt2, log2 = self.runner.run(stage)
            first.join()
            code1 = first.exitcode
            equal, detail = compare(stage, self.snap(f"after_{stage}"), root) if code1 == 0 else (False, "first failed")
            if expect == "refuses":
                msg = next((ln.strip() for ln in reversed(log2.splitlines()) if "another run" in ln), "")
                ok = code2 != 0 and bool(msg) and code1 == 0
                note = f"second: exit {code2} in {dt2:.1f} s, {msg[msg.find('another run'):][:90]}"
            else:
                ok = code2 == 0 and code1 == 0
                note = f"second waited and finished (exit {code2}, {dt2:.1f} s)"
            self.row(stage, f"two runs on one output folder ({expect})", ok, equal, f"{note}; first: {detail}")
        # inference: two batches started together on one output folder (400 inputs each, so they overlap): the one
        # that takes the lock writes every mask, the other refuses at start
        out, inputs = root / "inf2", root / "inf2_inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        for i in range(400):
            os.symlink(ROOT / "docs" / "images" / "phantom_montage.png", inputs / f"case{i:03d}.png")
        procs = [subprocess.Popen(_inference_cmd(inputs, out, {}), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [p.communicate()[0] for p in procs]
        codes = [p.returncode for p in procs]
        refused = [o for o, c in zip(outs, codes) if c != 0 and "another run is writing this folder" in o]
        masks = len(list(out.glob("*_seg.png")))
        ok = sorted(codes)[0] == 0 and len(refused) == 1 and masks == 400
        msg = next((ln.strip() for ln in reversed(refused[0].splitlines()) if "FolderBusyError:" in ln), "") \
            if refused else ""
        self.row("inference", "two runs on one output folder (refuses)", ok, None,
                 f"exits {codes}; {masks} of 400 masks written by the first; second: "
                 f"{msg[msg.find('another run'):][:120]}")


def _code_pickle(marker: Path) -> bytes:
    """A torch checkpoint whose unpickling would create ``marker`` (what a weights_only=False load would do)."""
    import io

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    import torch

    torch.save({"network": {}, "payload": Payload()}, buf)
    return buf.getvalue()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _inference_cmd(inputs: Path, out: Path, extra: dict[str, str]) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(ROOT / "configs" / "inference.yaml"),
           "--dataset_dir", str(inputs), "--output_dir", str(out), "--device", "$torch.device('cpu')"]
    for k, v in extra.items():
        cmd += [f"--{k}", v]
    return cmd


def _inference(inputs: Path, out: Path, extra: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(_inference_cmd(inputs, out, extra), cwd=ROOT, env=_env(), capture_output=True, text=True)


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ---- the tables --------------------------------------------------------------------------------------------------
def fault_table(rows: list[dict[str, Any]]) -> str:
    yes = lambda v: "—" if v is None else ("yes" if v else "**NO**")  # noqa: E731
    out = ["| stage | fault injected | survived | outputs equal to an uninterrupted run | measured |",
           "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['stage']} | {r['fault']} | {yes(r['survived'])} | {yes(r['outputs_equal'])} | "
                   f"{r['detail'].replace('|', '/')} |")
    n = len(rows)
    survived = sum(bool(r["survived"]) for r in rows)
    compared = [r for r in rows if r["outputs_equal"] is not None]
    equal = sum(bool(r["outputs_equal"]) for r in compared)
    out.append("")
    out.append(f"**{n} faults injected: {survived} survived (clear error or complete re-run), {n - survived} not; "
               f"outputs compared after {len(compared)} of them: {equal} equal to the uninterrupted run, "
               f"{len(compared) - equal} different.** (— : no output to compare: the run is refused on purpose, or the "
               f"kill came after the stage had finished.)")
    return "\n".join(out)


def bad_input_table(rows: list[dict[str, str]]) -> str:
    out = ["| input | kind | expected | result | what the bundle said / did |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['group']} | {r['expected']} | {r['result']} | {r['detail'][:110]} |")
    tried = len(rows)
    ok = sum(r["result"] != "FAILED" for r in rows)
    refused = sum(r["result"].startswith("refused") for r in rows)
    out.append("")
    out.append(f"**{tried} bad inputs tried: {ok} handled as expected ({ok - refused} loaded right, {refused} refused "
               f"with the file named), {tried - ok} not.**")
    return "\n".join(out)


def write_docs(doc: Path, marker: str, table: str) -> None:
    from bundle.utils import atomic_write_text

    text = doc.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{doc}: markers {start} / {end} not found")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(doc, f"{head}{start}\n{table}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new one under /tmp)")
    parser.add_argument("--parts", default="kill,disk,checkpoint,mlflow,two_runs,bad_inputs")
    parser.add_argument("--stages", default=",".join(STAGES), help="stages for the kill part")
    parser.add_argument("--points", default="0.25,0.5,0.75", help="kill points, fractions of the reference wall time")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/reliability.md")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cxr_doll_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    parts = [p for p in args.parts.split(",") if p]
    t0 = time.time()
    check = Check(work, [s for s in args.stages.split(",") if s], [float(x) for x in args.points.split(",")])
    timings: dict[str, float] = {}
    if set(parts) - {"bad_inputs"}:
        t = time.time()
        check.reference()
        timings["reference chain"] = time.time() - t
    for part, fn in (("kill", check.kills), ("disk", check.disk_full), ("checkpoint", check.bad_checkpoints),
                     ("mlflow", check.mlflow_down), ("two_runs", check.two_runs)):
        if part in parts:
            t = time.time()
            fn()
            timings[part] = time.time() - t
    bad_rows: list[dict[str, str]] = []
    if "bad_inputs" in parts:
        from tests.bad_inputs import run_corpus

        t = time.time()
        bad_rows = run_corpus(work / "bad_inputs")
        timings["bad_inputs"] = time.time() - t
    total = time.time() - t0
    summary = {"rows": check.rows, "bad_inputs": bad_rows, "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "total_s": round(total, 1), "reference_s": {k: round(v, 1) for k, v in check.ref_time.items()}}
    (work / "fault_check.json").write_text(json.dumps(summary, indent=2))
    if not args.no_docs:
        doc = ROOT / "docs" / "reliability.md"
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if check.rows:
            write_docs(doc, "fault-table", fault_table(check.rows) + f"\n\nMeasured by `python scripts/fault_check.py` on "
                       f"{stamp} in {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).")
        if bad_rows:
            write_docs(doc, "bad-input-table", bad_input_table(bad_rows) + f"\n\nMeasured by `python "
                       f"scripts/fault_check.py` (cases: `tests/bad_inputs.py`, also run by `tests/test_bad_inputs.py`) "
                       f"on {stamp}.")
    failed = [r for r in check.rows if not r["survived"] or r["outputs_equal"] is False]
    failed += [r for r in bad_rows if r["result"] == "FAILED"]
    say(f"[fault] {len(check.rows)} faults, {len(bad_rows)} bad inputs, {len(failed)} not survived, in {total:.0f} s; "
        f"raw rows: {work / 'fault_check.json'}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
