"""Stage 8, the report: one self-contained HTML file (every image embedded as a base64 PNG), the same report in
Markdown, and its tables as CSV, from whatever the pipeline's stages wrote.

Run with ``configs/report.yaml``::

    python -m monai.bundle run --config_file "['configs/report.yaml']"

Sections (each says "not run" when its inputs are missing, so a partial pipeline still gets a report):

1. Conclusions: sentences **computed** from the numbers below (:func:`comparison_sentence` and friends), never
   written in advance;
2. the phantom data (montage);
3. DoLL against the lesion masks (the phantom's true lesions or CheXlocalize's), beside Grad-CAM and
   single-classifier IG (``doll_quality/summary.csv``, ``panel.png``);
4. the classifiers' AUROC (``classifiers/*/metrics_test.json``);
5. learning curves, Dice distributions, the statistics table and replicability (``analysis/``);
6. the studies run beside the pipeline into its output folder, when there are any: cross-validation by patient
   (``crossval/<task>/``, ``scripts/crossval.py``) and pre-training replicates (``replicates/``,
   ``scripts/pretrain_replicates.py``);
7. Grad-CAM of the segmenters and the mask ensembles / synergy (``analysis/``);
8. throughput (``pipeline_timing.json``, any benchmark JSON files);
9. reproducibility: the configs' text and the package versions.

Outputs in ``out_dir``: ``report.html``, ``report.md``, ``figures/<name>.png`` (what the Markdown links to),
``tables/<name>.csv`` (every table, full precision) and ``conclusions.csv`` (``section, statement``). Everything is
written atomically and logged to one MLflow run (experiment ``<mlflow_experiment_prefix>_report``), every figure
included.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
import os
import platform
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ..constants import OBSERVATIONS, judge_description, slug
from ..utils import PathLike, atomic_save, atomic_write_text
from .plots import sort_by_size

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PACKAGES",
    "DEFAULT_LABELS",
    "Text",
    "Table",
    "FigureBlock",
    "Code",
    "Section",
    "Report",
    "fmt_p",
    "fmt_num",
    "size_phrase",
    "comparison_sentence",
    "statistics_conclusions",
    "controls_conclusions",
    "crossval_conclusions",
    "replicate_conclusions",
    "efficiency_pair_sentences",
    "package_versions",
    "build_report",
]

#: Packages whose versions the report lists.
DEFAULT_PACKAGES: tuple[str, ...] = ("monai", "torch", "numpy", "scipy", "pandas", "matplotlib", "mlflow",
                                     "pytorch-ignite", "captum", "pillow", "pydicom", "nibabel", "pyyaml",
                                     "scikit-image", "tqdm")

NOT_RUN = "not run"
#: Display names of the inits (``init_labels`` of the configs extend them).
DEFAULT_LABELS: dict[str, str] = {"doll": "DoLL-init", "scratch": "scratch",
                                  "classifier_encoder": "classifier-encoder init", "external": "external init (TII)",
                                  "doll_shuffled": "shuffled-DoLL init", "doll_gradcam": "Grad-CAM-label init",
                                  "doll_ig_single": "single-IG-label init", "doll_oracle": "true-lesion init"}


# --------------------------------------------------------------------------------------------------------------------
# number formatting and computed sentences
# --------------------------------------------------------------------------------------------------------------------
def _isnan(value: Any) -> bool:
    try:
        return value is None or math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def fmt_num(value: Any, digits: int = 4, signed: bool = False) -> str:
    """A number with ``digits`` decimals (``+`` sign with ``signed``); ``n/a`` for NaN/None."""
    if _isnan(value):
        return "n/a"
    return f"{float(value):+.{digits}f}" if signed else f"{float(value):.{digits}f}"


def fmt_p(p: Any) -> str:
    """A p-value: 4 decimals, or 3 significant digits in scientific notation below 0.001 (``n/a`` for NaN)."""
    if _isnan(p):
        return "n/a"
    p = float(p)
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def size_phrase(size: Any) -> str:
    """``4`` -> ``"4 labelled images"``, ``"all"`` -> ``"all labelled images"``."""
    try:
        n = int(str(size))
    except ValueError:
        return f"{size} labelled images"
    return f"{n} labelled image" + ("" if n == 1 else "s")


def _label(init: Any, labels: Mapping[str, str]) -> str:
    base, _, mode = str(init).partition(":")
    name = labels.get(str(init), labels.get(base, base))
    return f"{name} ({mode})" if mode and str(init) not in labels else name


def comparison_sentence(row: Mapping[str, Any], labels: Mapping[str, str] | None = None, alpha: float = 0.05,
                        value: str = "mean Dice") -> str:
    """One conclusion from one row of the statistics table (:func:`bundle.reporting.analysis.statistics_table`).

    ``"<A> beats <B> on <task> at <size>: +0.0500 mean Dice (0.8000 vs 0.7500), 95% CI [+0.0400, +0.0600], Holm
    p=0.0020 (Wilcoxon signed-rank, n=20 test images)."`` when the Holm-adjusted p-value is below ``alpha``
    (``<B> beats <A>`` when the difference is negative), otherwise ``"No significant difference between <A> and
    <B> ..."``. The difference is always ``A - B`` (A: the init, B: the reference).
    """
    labels = {**DEFAULT_LABELS, **dict(labels or {})}
    a, b = _label(row["init"], labels), _label(row["reference"], labels)
    structure = row.get("structure")
    on = f"on {row['task']}" + (f" ({structure})" if isinstance(structure, str) and structure not in ("", "all")
                                else "")
    where = f"{on} at {size_phrase(row['train_size'])}"
    n = int(row["n"]) if not _isnan(row["n"]) else 0
    if n == 0:
        return f"{a} vs {b} {where}: no paired test images, no comparison."
    conf = float(row.get("confidence", 0.95)) if not _isnan(row.get("confidence", 0.95)) else 0.95
    numbers = (f"{fmt_num(row['mean_diff'], signed=True)} {value} ({fmt_num(row['mean_init'])} vs "
               f"{fmt_num(row['mean_reference'])}), {100 * conf:.0f}% CI [{fmt_num(row['ci_low'], signed=True)}, "
               f"{fmt_num(row['ci_high'], signed=True)}], Holm p={fmt_p(row['p_holm'])} "
               f"(Wilcoxon signed-rank, n={n} test images)")
    significant = not _isnan(row["p_holm"]) and float(row["p_holm"]) < alpha
    if not significant:
        # the smallest two-sided p-value of the exact Wilcoxon test with n pairs is 2 / 2**n
        floor = "" if 2.0 / 2.0**n < alpha else (f" (with n={n} the Wilcoxon test cannot reach p < {alpha:g}: "
                                                  "too few test images)")
        return f"No significant difference between {a} and {b} {where} (alpha={alpha:g}): {numbers}{floor}."
    winner, loser = (a, b) if float(row["mean_diff"]) > 0 else (b, a)
    note = ""
    if float(row["ci_low"]) <= 0.0 <= float(row["ci_high"]):
        note = " (note: the bootstrap CI includes 0)"
    return f"{winner} beats {loser} {where}: {numbers}{note}."


def statistics_conclusions(stats: pd.DataFrame, labels: Mapping[str, str] | None = None,
                           alpha: float = 0.05) -> list[str]:
    """An overview sentence per (task, init) (how many training sizes are significantly better, worse, or not
    different), then one :func:`comparison_sentence` per row."""
    labels = {**DEFAULT_LABELS, **dict(labels or {})}
    out = []
    for (task, init), g in stats.groupby(["task", "init"], sort=False):
        ref = _label(g["reference"].iloc[0], labels)
        sig = g["p_holm"].astype(float) < alpha
        better = [str(s) for s in g.loc[sig & (g["mean_diff"].astype(float) > 0), "train_size"]]
        worse = [str(s) for s in g.loc[sig & (g["mean_diff"].astype(float) < 0), "train_size"]]
        same = [str(s) for s in g["train_size"] if str(s) not in better + worse]

        def at(sizes: list[str]) -> str:
            if not sizes:
                return "at no size"
            return f"at {len(sizes)} size{'s' if len(sizes) > 1 else ''} ({', '.join(sizes)} labelled images)"

        parts = [f"significantly better {at(better)}", f"significantly worse {at(worse)}",
                 f"not significantly different {at(same)}"]
        sizes = f"{len(g)} training-set size" + ("s" if len(g) != 1 else "")
        out.append(f"{_label(init, labels)} against {ref} on {task}, over {sizes} (Holm-corrected, alpha={alpha:g}): "
                   + ", ".join(parts) + ".")
    out += [comparison_sentence(r, labels, alpha) for r in stats.to_dict("records")]
    return out


# --------------------------------------------------------------------------------------------------------------------
# the document model: sections of blocks, rendered to HTML and Markdown
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Text:
    """A paragraph (``conclusion=True``: listed among the report's conclusions too)."""

    text: str
    conclusion: bool = False


@dataclass
class Table:
    """A table (``name``: HTML id ``table-<name>`` and CSV file ``tables/<name>.csv``); ``formats`` maps a column to
    a formatter (default: 4 decimals for floats)."""

    name: str
    frame: Any
    caption: str = ""
    formats: dict[str, Callable[[Any], str]] = field(default_factory=dict)
    #: a boolean column: rows where it is true are defects, shown in red (HTML) and marked DEFECT (Markdown)
    highlight: str | None = None

    def flagged(self, rec: Any) -> bool:
        return bool(self.highlight) and bool(getattr(rec, self.highlight, False))

    def cell(self, col: str, value: Any) -> str:
        if col in self.formats:
            return self.formats[col](value)
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "no"
        if isinstance(value, (float, np.floating)):
            return fmt_num(value)
        return "" if value is None else str(value)


@dataclass
class FigureBlock:
    """A PNG figure (embedded in the HTML, copied to ``figures/<name>.png`` for the Markdown)."""

    name: str
    path: str
    caption: str = ""


@dataclass
class Code:
    """Verbatim text (a config file), collapsed in the HTML."""

    title: str
    text: str


Block = Text | Table | FigureBlock | Code


@dataclass
class Section:
    """A report section; ``status`` is ``"done"`` or ``"not run: <why>"`` (then the section shows that line)."""

    key: str
    title: str
    blocks: list[Block] = field(default_factory=list)
    status: str = "done"

    def not_run(self, why: str) -> Section:
        why = str(why)
        while why.startswith(f"{NOT_RUN}: "):  # reasons relayed from the analysis' status.json
            why = why[len(NOT_RUN) + 2:]
        self.status = f"{NOT_RUN}: {why}"
        return self


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#eee}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:0.85em;color:#555}
.notrun{color:#a00;font-style:italic}tr.defect td{color:#b00;font-weight:600;background:#fee}.conclusions li{margin:0.3em 0}pre{background:#f6f6f6;padding:0.6em;
overflow-x:auto;font-size:0.8em}caption{caption-side:top;text-align:left;font-weight:600;padding:0.2em 0}
"""


def _png_data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass
class Report:
    """The report: a title, sections, and the renderers."""

    title: str
    sections: list[Section] = field(default_factory=list)
    generated: str = field(default_factory=lambda: _dt.datetime.now().isoformat(timespec="seconds"))

    def conclusions(self) -> list[tuple[str, str]]:
        """``(section title, statement)`` of every conclusion paragraph."""
        return [(s.title, b.text) for s in self.sections for b in s.blocks if isinstance(b, Text) and b.conclusion]

    def figures(self) -> list[FigureBlock]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, FigureBlock)]

    def tables(self) -> list[Table]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Table)]

    # ---- HTML -------------------------------------------------------------------------------------------------
    def to_html(self) -> str:
        e = html.escape
        parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(self.title)}</title>",
                 f"<style>{_CSS}</style></head><body>", f"<h1>{e(self.title)}</h1>",
                 f"<p>Generated {e(self.generated)}. Research software on synthetic phantoms and public data: not for "
                 "clinical use.</p>", '<nav><ul>']
        parts += [f'<li><a href="#sec-{s.key}">{e(s.title)}</a>'
                  + (f' <span class="notrun">({e(NOT_RUN)})</span>' if s.status != "done" else "") + "</li>"
                  for s in self.sections]
        parts.append("</ul></nav>")
        for s in self.sections:
            parts.append(f'<section id="sec-{s.key}" data-status="{e(s.status)}"><h2>{e(s.title)}</h2>')
            if s.status != "done":
                parts.append(f'<p class="notrun">{e(s.status)}</p>')
            if s.key == "conclusions":
                parts.append('<ul class="conclusions">')
                parts += [f"<li>{e(b.text)}</li>" for b in s.blocks if isinstance(b, Text)]
                parts.append("</ul>")
                parts += [self._html_block(b) for b in s.blocks if not isinstance(b, Text)]
            else:
                parts += [self._html_block(b) for b in s.blocks]
            parts.append("</section>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    @staticmethod
    def _html_block(b: Block) -> str:
        e = html.escape
        if isinstance(b, Text):
            cls = ' class="conclusion"' if b.conclusion else ""
            return f"<p{cls}>{e(b.text)}</p>"
        if isinstance(b, Table):
            frame = b.frame
            cols = [str(c) for c in frame.columns]
            rows = [f'<table id="table-{e(b.name)}">']
            if b.caption:
                rows.append(f"<caption>{e(b.caption)}</caption>")
            rows.append("<thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr></thead><tbody>")
            for rec in frame.itertuples(index=False):
                cells = []
                for c, v in zip(cols, rec):
                    cls = ' class="num"' if _is_num(v) else ""
                    cells.append(f"<td{cls}>{e(b.cell(c, v))}</td>")
                flag = ' class="defect"' if b.flagged(rec) else ""
                rows.append(f"<tr{flag}>" + "".join(cells) + "</tr>")
            rows.append("</tbody></table>")
            return "\n".join(rows)
        if isinstance(b, FigureBlock):
            return (f'<figure id="fig-{e(b.name)}"><img src="{_png_data_uri(b.path)}" alt="{e(b.caption or b.name)}">'
                    f"<figcaption>{e(b.caption)}</figcaption></figure>")
        if isinstance(b, Code):
            return f"<details><summary>{e(b.title)}</summary><pre>{e(b.text)}</pre></details>"
        raise TypeError(f"unknown block {type(b).__name__}")

    # ---- Markdown ---------------------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        lines = [f"# {self.title}", "", f"Generated {self.generated}. Research software on synthetic phantoms and "
                 "public data: not for clinical use.", ""]
        for s in self.sections:
            lines += [f"## {s.title}", ""]
            if s.status != "done":
                lines += [f"*{s.status}*", ""]
            for b in s.blocks:
                lines += self._md_block(b, bullet=s.key == "conclusions") + [""]
        return "\n".join(lines).rstrip() + "\n"

    @staticmethod
    def _md_block(b: Block, bullet: bool = False) -> list[str]:
        def esc(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        if isinstance(b, Text):
            return [f"- {b.text}" if bullet else b.text]
        if isinstance(b, Table):
            cols = [str(c) for c in b.frame.columns]
            out = [f"**{b.caption}**", ""] if b.caption else []
            out += ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "|".join(
                "---:" if b.frame[c].map(_is_num).all() and len(b.frame) else "---" for c in b.frame.columns) + "|"]
            out += ["| " + ("**DEFECT** " if b.flagged(rec) else "") + " | ".join(esc(b.cell(c, v)) for c, v in
                                                                               zip(cols, rec)) + " |"
                    for rec in b.frame.itertuples(index=False)]
            return out
        if isinstance(b, FigureBlock):
            return [f"![{b.caption or b.name}](figures/{b.name}.png)", "", f"*{b.caption}*" if b.caption else ""]
        if isinstance(b, Code):
            return [f"<details><summary>{b.title}</summary>", "", "```yaml", b.text.rstrip(), "```", "", "</details>"]
        raise TypeError(f"unknown block {type(b).__name__}")


# --------------------------------------------------------------------------------------------------------------------
# reading the stages' outputs
# --------------------------------------------------------------------------------------------------------------------
def _read_csv(path: PathLike, **kwargs: Any) -> pd.DataFrame | None:
    import pandas as pd

    if not path or not os.path.isfile(path):
        return None
    frame = pd.read_csv(path, **kwargs)
    return frame


def _read_json(path: PathLike) -> Any:
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def package_versions(names: Sequence[str] = DEFAULT_PACKAGES) -> pd.DataFrame:
    """``package, version`` of Python and each installed package (``not installed`` otherwise)."""
    import importlib.metadata as md

    import pandas as pd

    rows = [{"package": "python", "version": platform.python_version()},
            {"package": "platform", "version": platform.platform()}]
    for name in names:
        try:
            rows.append({"package": name, "version": md.version(name)})
        except md.PackageNotFoundError:
            rows.append({"package": name, "version": "not installed"})
    return pd.DataFrame(rows)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)) and len(obj) <= 20:
        for k, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{k}]"))
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out[prefix] = obj
    return out


# --------------------------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------------------------
def _p_formats() -> dict[str, Callable[[Any], str]]:
    signed = {c: (lambda v: fmt_num(v, signed=True)) for c in ("mean_diff", "ci_low", "ci_high")}
    return {**signed, "p_value": fmt_p, "p_holm": fmt_p, "wilcoxon_stat": lambda v: fmt_num(v, 1),
            "rank_biserial": lambda v: fmt_num(v, 3), "cohens_dz": lambda v: fmt_num(v, 3)}


def _data_section(summary_path: PathLike) -> Section:
    """Which data each datalist holds (the data stage's ``datalists/summary.json``): real (the user's data file, or
    the real lungs folder) or phantom, with the root, the split sizes and how patients were identified."""
    sec = Section("data", "Data sources")
    summary = _read_json(summary_path)
    if not isinstance(summary, Mapping):
        return sec.not_run(f"no data summary at {summary_path}")
    from ..data.userdata import describe_sources

    rows = []
    for name, info in summary.items():
        if not isinstance(info, Mapping):
            continue
        written = info.get("status") == "written"
        rows.append({"datalist": name, "source": info.get("source") or "absent" if written else "absent",
                     "dataset": info.get("dataset", "") if written else "",
                     "given as": info.get("given_as") or "", "root": info.get("root") or "",
                     "training": info.get("training", ""), "validation": info.get("validation", ""),
                     "test": info.get("test", ""), "splits": info.get("splits") or "",
                     "patients": info.get("patient_grouping") or ""})
    import pandas as pd

    user = [r["datalist"] for r in rows if r["given as"]]
    sec.blocks.append(Text("Data of this run: " + describe_sources(summary) + (
        " The datasets of the data file (--data) replaced their phantoms: " + ", ".join(user) + "." if user else
        " No data file was given: every dataset but the real lungs folder is the synthetic phantom."),
        conclusion=True))
    sec.blocks.append(Table("data_sources", pd.DataFrame(rows), "Datalists: source (real or phantom), root, split "
                                                                  "sizes, how CheXpert was split (its train.csv "
                                                                  "split by patient, or CheXpert's own splits with "
                                                                  "the test set) and patient identity"))
    return sec


def _phantom_section(montage: PathLike | None) -> Section:
    sec = Section("phantom", "Phantom data")
    if not montage or not os.path.isfile(montage):
        return sec.not_run(f"no phantom montage at {montage}")
    sec.blocks += [Text("Seeded phantom radiographs: one per CheXpert observation with its true lesion mask, the SCR "
                        "anatomy and a QaTa-style infection case (scripts/make_montage.py)."),
                   FigureBlock("phantom_montage", os.fspath(montage), "Phantom montage")]
    return sec


def _doll_section(doll_dir: PathLike | None) -> Section:
    sec = Section("doll", "DoLL against the lesion masks, Grad-CAM and single-classifier IG")
    summary = _read_csv(os.path.join(doll_dir, "summary.csv")) if doll_dir else None
    if summary is None or summary.empty:
        return sec.not_run(f"no DoLL quality summary in {doll_dir}")
    summary = summary.copy()
    summary["observation"] = summary["observation"].astype(str)
    order = {n: i for i, n in enumerate((*OBSERVATIONS, "all"))}
    methods = [m for m in ("doll", "gradcam", "ig_single") if m in set(summary["method"])]
    methods += sorted(set(summary["method"]) - set(methods))
    pieces = {}
    for metric in ("iou", "dice", "hit"):
        if metric in summary.columns:
            pieces[metric] = summary.pivot_table(index="observation", columns="method", values=metric, aggfunc="mean")
    if "iou" not in pieces:
        return sec.not_run(f"{doll_dir}/summary.csv has no iou column")
    iou = pieces["iou"].reindex(columns=methods)
    iou = iou.loc[sorted(iou.index, key=lambda o: order.get(o, len(order)))]
    table = iou.reset_index().rename(columns={m: f"iou_{m}" for m in methods})
    if "n" in summary.columns:
        n = summary.groupby("observation")["n"].max()
        table.insert(1, "n", table["observation"].map(n).astype("Int64"))
    first = {c: str(summary[c].dropna().iloc[0]) for c in ("judge", "split", "scoring")
             if c in summary.columns and summary[c].notna().any()}
    truth = judge_description(first.get("judge"), first.get("split"), first.get("scoring"))
    sec.blocks.append(Table("doll_quality", table, f"IoU with the {truth} per observation (DoLL: boosted IG "
                                                   "of all classifiers; gradcam and ig_single: first classifier)"))
    if "all" in iou.index:
        overall = iou.loc["all"].dropna().sort_values(ascending=False)
        ranking = ", ".join(f"{m} {fmt_num(v)}" for m, v in overall.items())
        best = overall.index[0]
        per_obs = iou.drop(index="all", errors="ignore").dropna(how="all")
        wins = int((per_obs.idxmax(axis=1) == "doll").sum()) if "doll" in per_obs.columns else 0
        sec.blocks.append(Text(
            f"Mean IoU over observations ({truth}): {ranking}; the best method is {best}"
            + (f"; DoLL has the highest IoU on {wins} of {len(per_obs)} observations." if "doll" in per_obs.columns
               else "."), conclusion=True))
    if "iou_tp" in summary.columns:
        tp = summary[summary["observation"] == "all"].set_index("method").reindex(methods)
        tp = tp[tp["iou_tp"].notna()]
        if len(tp):
            sec.blocks.append(Text(
                "On the true-positive slice (the lesions each method drew a mask for: CheXlocalize's true_pos_only "
                "evaluation, the one its published figures use), mean IoU / hit rate: "
                + ", ".join(f"{m} {fmt_num(r['iou_tp'])} / {fmt_num(r['hit_tp'])} ({int(r['n_tp'])} lesions)"
                            for m, r in tp.iterrows()) + "."))
    panel = os.path.join(doll_dir, "panel.png")
    if os.path.isfile(panel):
        sec.blocks.append(FigureBlock("doll_panel", panel, "Per observation: image, true lesion (green), then each "
                                                           "method's mask (red)"))
    return sec


def _classifier_section(metric_files: Sequence[PathLike], out_dir: str) -> Section:
    import pandas as pd

    from .plots import plot_grouped_bars

    sec = Section("classifiers", "Classifiers: AUROC on the test split")
    rows = []
    for path in metric_files:
        obj = _read_json(path)
        if not isinstance(obj, Mapping) or not isinstance(obj.get("metrics"), Mapping):
            continue
        m = obj["metrics"]
        name = str(obj.get("classifier") or os.path.basename(os.path.dirname(os.fspath(path))))
        row: dict[str, Any] = {"classifier": name, "mean_auroc": m.get("val_mean_auroc", m.get("mean_auroc"))}
        for obs in OBSERVATIONS:
            row[obs] = m.get(f"auroc_{slug(obs)}", float("nan"))
        rows.append(row)
    if not rows:
        return sec.not_run("no classifier metrics (classifiers/*/metrics_test.json)")
    table = pd.DataFrame(rows)
    table = table[[c for c in table.columns if c in ("classifier", "mean_auroc") or table[c].notna().any()]]
    sec.blocks.append(Table("classifier_auroc", table, "AUROC per observation (mean: the classifiers' key metric)",
                            {c: (lambda v: fmt_num(v, 3)) for c in table.columns if c != "classifier"}))
    best = table.loc[table["mean_auroc"].astype(float).idxmax()] if table["mean_auroc"].notna().any() else None
    if best is not None:
        sec.blocks.append(Text(f"Best mean AUROC: {best['classifier']} ({fmt_num(best['mean_auroc'], 3)}) among "
                               f"{len(table)} classifier(s).", conclusion=True))
    obs_cols = [c for c in table.columns if c in OBSERVATIONS]
    if obs_cols:
        fig = plot_grouped_bars(table.set_index("classifier")[obs_cols].T,
                                os.path.join(out_dir, "classifier_auroc.png"), "AUROC per observation", "AUROC",
                                (0.0, 1.0))
        sec.blocks.append(FigureBlock("classifier_auroc", fig, "AUROC per observation and classifier"))
    return sec


def _analysis_table(sec: Section, analysis_dir: str, status: Mapping[str, str], figure: str,
                    caption: str) -> pd.DataFrame | None:
    """The analysis table ``<sec.key>.csv`` (``None``, and the section marked not run, when absent) and its figure
    ``<figure>.png`` added to ``sec`` when present."""
    frame = _read_csv(os.path.join(analysis_dir, f"{sec.key}.csv"), dtype={"train_size": str})
    if frame is None:
        sec.not_run(status.get(sec.key, f"no analysis/{sec.key}.csv"))
        return None
    fig = os.path.join(analysis_dir, f"{figure}.png")
    if os.path.isfile(fig):
        sec.blocks.append(FigureBlock(figure, fig, caption))
    return frame


def _learning_section(analysis_dir: str, status: Mapping[str, str], labels: Mapping[str, str]) -> Section:
    sec = Section("learning_curves", "Learning curves and Dice distributions")
    curves = _analysis_table(sec, analysis_dir, status, "learning_curves", "Mean test Dice (over images, seeds and "
                             "structures) against labelled training images, 95% bootstrap CI")
    if curves is None:
        return sec
    table = curves[curves["structure"] == "all"].drop(columns="structure")
    table = sort_by_size(table, ["task", "init", "train_size"])
    sec.blocks.append(Table("learning_curves", table, "Learning curves (structure mean)",
                            {"seed_sd": lambda v: fmt_num(v, 4)}))
    for (task, init), g in table.groupby(["task", "init"], sort=False):
        g = sort_by_size(g, ["train_size"])
        first, last = g.iloc[0], g.iloc[-1]
        sec.blocks.append(Text(
            f"{_label(init, labels)} on {task}: mean Dice {fmt_num(first['mean'])} [{fmt_num(first['ci_low'])}, "
            f"{fmt_num(first['ci_high'])}] with {size_phrase(first['train_size'])}"
            + (f", {fmt_num(last['mean'])} [{fmt_num(last['ci_low'])}, {fmt_num(last['ci_high'])}] with "
               f"{size_phrase(last['train_size'])}." if len(g) > 1 else ".")))
    seeds = _read_csv(os.path.join(analysis_dir, "seeds.csv"), dtype={"train_size": str, "collapsed_seeds": str})
    if seeds is not None:
        seeds = sort_by_size(seeds, ["task", "structure", "init", "train_size"])
        sec.blocks.append(Table("seeds", seeds, "Test Dice per structure: mean over seeds and the worst seed (a "
                                "structure below 0.05 on any seed is a defect of the recipe, in red)",
                                highlight="collapsed"))
        bad = seeds[seeds["collapsed"].astype(bool)]
        if len(bad):
            sec.blocks.append(Text("DEFECT: " + "; ".join(
                f"{r['structure']} of {_label(r['init'], labels)} on {r['task']} with {size_phrase(r['train_size'])}"
                f" collapsed (Dice < 0.05) on seed(s) {r['collapsed_seeds']}" for r in bad.to_dict("records"))
                + ".", conclusion=True))
        else:
            worst = seeds[seeds["structure"] != "all"]
            if len(worst):
                w = worst.loc[worst["worst"].idxmin()]
                sec.blocks.append(Text(
                    f"Every structure learned on every seed of every init (no test Dice below 0.05); the lowest "
                    f"seed score is {fmt_num(w['worst'])} (seed {w['worst_seed']}), {w['structure']} of "
                    f"{_label(w['init'], labels)} on {w['task']} with {size_phrase(w['train_size'])}.",
                    conclusion=True))
    dist = os.path.join(analysis_dir, "dice_distributions.png")
    if os.path.isfile(dist):
        sec.blocks.append(FigureBlock("dice_distributions", dist, "Per-image Dice (mean over structures) per seed: "
                                                                   "box plots with the points"))
    return sec


def _efficiency_section(analysis_dir: str, status: Mapping[str, str], labels: Mapping[str, str]) -> Section:
    sec = Section("efficiency", "Training efficiency: validation Dice against optimizer steps")
    eff = _analysis_table(sec, analysis_dir, status, "training_efficiency", "Validation Dice (mean over structures) "
                          "against optimizer steps: seed mean (solid) and worst seed (dashed) per init")
    if eff is None:
        return sec
    eff = sort_by_size(eff, ["task", "train_size", "init"])
    sec.blocks.append(Table("efficiency", eff, "Steps each run needs to reach 95% of its own best validation Dice "
                            "(mean and worst seed), the best validation Dice, and the steps run (plateau rule or cap)",
                            {c: (lambda v: fmt_num(v, 0)) for c in eff.columns if c.startswith("steps")}))
    for (task, size), g in eff.groupby(["task", "train_size"], sort=False):
        if len(g) < 2:
            continue
        parts = [f"{_label(r['init'], labels)} {fmt_num(r['steps_to_95_mean'], 0)} steps (best validation Dice "
                 f"{fmt_num(r['best_mean'], 3)})" for r in g.to_dict("records")]
        sec.blocks.append(Text(f"Training efficiency on {task} with {size_phrase(size)} (optimizer steps to 95% of "
                               "the final validation Dice, seed mean): " + "; ".join(parts) + ".", conclusion=True))
    return sec


def _statistics_section(analysis_dir: str, status: Mapping[str, str], labels: Mapping[str, str],
                        alpha: float) -> tuple[Section, list[str]]:
    sec = Section("statistics", "Statistics: each init against the reference")
    stats = _read_csv(os.path.join(analysis_dir, "statistics.csv"), dtype={"train_size": str})
    if stats is None:
        return sec.not_run(status.get("statistics", "no analysis/statistics.csv")), []
    stats = sort_by_size(stats, ["task", "init", "train_size"])
    conf = float(stats["confidence"].iloc[0]) if "confidence" in stats.columns and len(stats) else 0.95
    sentences = statistics_conclusions(stats, labels, alpha)
    sec.blocks.append(Text(
        f"Paired units: the test images (each image's Dice averaged over seeds and structures); two-sided Wilcoxon "
        f"signed-rank test, paired bootstrap {100 * conf:.0f}% CI of the mean difference (init minus reference), "
        f"rank-biserial correlation and Cohen's d_z; p-values Holm-adjusted over the table, significant when "
        f"p_holm < {alpha:g}."))
    shown = ["task", "train_size", "init", "reference", "n", "mean_init", "mean_reference", "mean_diff", "ci_low",
             "ci_high", "wilcoxon_stat", "p_value", "p_holm", "rank_biserial", "cohens_dz", "significant"]
    sec.blocks.append(Table("statistics", stats[[c for c in shown if c in stats.columns]],
                            "Mean Dice difference (init - reference) per task and training size", _p_formats()))
    sec.blocks += [Text(s, conclusion=True) for s in sentences]
    per_structure = _read_csv(os.path.join(analysis_dir, "statistics_structures.csv"), dtype={"train_size": str})
    if per_structure is not None and len(per_structure):
        per_structure = sort_by_size(per_structure, ["task", "structure", "init", "train_size"])
        sec.blocks.append(Table("statistics_structures", per_structure[[c for c in ["task", "structure", *shown[1:]]
                                                                        if c in per_structure.columns]],
                                "Per structure (a separate Holm family)", _p_formats()))
    rep = _read_csv(os.path.join(analysis_dir, "replicability.csv"), dtype={"train_size": str})
    if rep is not None and len(rep):
        rep = sort_by_size(rep, ["task", "init", "train_size"])
        sec.blocks.append(Table("replicability", rep, "Replicability across seeds: the seeds' mean Dice"))
        finite = rep[rep["cv"].notna()]
        if len(finite):
            worst = finite.loc[finite["cv"].astype(float).idxmax()]
            sec.blocks.append(Text(
                f"Replicability: the coefficient of variation of the mean Dice across seeds is at most "
                f"{fmt_num(worst['cv'])} ({_label(worst['init'], labels)}, {worst['task']}, "
                f"{size_phrase(worst['train_size'])}, {int(worst['n_seeds'])} seeds).", conclusion=True))
    return sec, sentences


#: the columns of :func:`bundle.reporting.analysis.controls_table` the report shows (the controls section and the
#: cross-validation's controls table)
CONTROLS_COLUMNS: tuple[str, ...] = ("task", "train_size", "init", "reference", "n", "mean_init", "mean_reference",
                                     "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "cohens_dz", "significant")

#: What the controls' paired tests do not cover, said under the controls table of every report.
ONE_PRETRAINING_CAVEAT = (
    "Each init is one pre-training (one network initialisation, augmentation draw and, for the shuffled control, one "
    "permutation), so these tests hold the pre-training draw fixed: a significant difference is shown for these "
    "pre-trainings, not yet for the label kind. `scripts/pretrain_replicates.py` pre-trains each label kind with "
    "several seeds and tests with the pre-training replicate as the unit.")


def controls_conclusions(table: pd.DataFrame, labels: Mapping[str, str] | None = None,
                         alpha: float = 0.05) -> list[str]:
    """The generated conclusions of the pre-training controls (:func:`bundle.reporting.analysis.controls_table`):
    per task and size, whether the DoLL's gain over no pre-training exceeds the gain of the same pre-training on
    shuffled labels (the generic "learn to segment blobs" effect), then one :func:`comparison_sentence` per row.

    The tests pair test images under one pre-training per label kind, so a significant verdict is said of *this*
    pre-training; whether it holds across pre-training draws is what ``scripts/pretrain_replicates.py`` tests, and
    the section says so (:data:`ONE_PRETRAINING_CAVEAT`)."""
    labels = {**DEFAULT_LABELS, **dict(labels or {})}
    out = []
    for (task, size), g in table.groupby(["task", "train_size"], sort=False):
        rows = {str(r["reference"]): r for r in g.to_dict("records")}
        if "scratch" in rows and "doll_shuffled" in rows:
            doll, scratch = float(rows["scratch"]["mean_init"]), float(rows["scratch"]["mean_reference"])
            shuffled = float(rows["doll_shuffled"]["mean_reference"])
            p = float(rows["doll_shuffled"]["p_holm"])
            gain, generic = doll - scratch, shuffled - scratch
            if p < alpha and doll > shuffled:
                verdict = ("exceeds it significantly for this pre-training: the DoLL's localisation, not only "
                           "pre-training on masks, helped")
            elif p < alpha:
                verdict = ("is significantly below it for this pre-training: pre-training on the DoLL's masks in the "
                           "wrong place did better")
            else:
                verdict = ("does not differ significantly from it: the gain is not shown to come from where the DoLL "
                           "puts its masks")
            out.append(f"On {task} with {size_phrase(size)}, the DoLL's gain over no pre-training "
                       f"({fmt_num(gain, signed=True)} mean Dice) against the shuffled control's "
                       f"({fmt_num(generic, signed=True)}) {verdict} (DoLL - shuffled {fmt_num(doll - shuffled, signed=True)}, "
                       f"Holm p={fmt_p(p)}).")
    out += [comparison_sentence(r, labels, alpha) for r in table.to_dict("records")]
    return out


def _controls_section(analysis_dir: str, status: Mapping[str, str], labels: Mapping[str, str],
                      alpha: float) -> Section:
    sec = Section("controls", "What pre-training buys: the DoLL against its controls")
    table = _read_csv(os.path.join(analysis_dir, "controls.csv"), dtype={"train_size": str})
    if table is None or table.empty:
        return sec.not_run(status.get("controls", "no analysis/controls.csv (the sweep has no control init; "
                                                  "configs/sweep.yaml grid controls)"))
    table = sort_by_size(table, ["task", "train_size", "reference"])
    sec.blocks.append(Text(
        "The segmenter pre-trained on the DoLL against the same pre-training on other labels of the same images: "
        "the DoLL of another image (shuffled: the same label statistics in the wrong place), labels from one "
        "classifier's Grad-CAM or IG (no boosting), the phantom's true lesions (the ceiling), and no pre-training; "
        "every init fine-tuned with the same recipe. Paired units: the test images (each image's Dice averaged over "
        "seeds and structures); Wilcoxon signed-rank, paired bootstrap CI of DoLL minus control, Holm over the "
        f"table, significant when p_holm < {alpha:g}."))
    means = _read_csv(os.path.join(analysis_dir, "controls_means.csv"), dtype={"train_size": str})
    if means is not None and len(means):
        means = means[means["structure"] == "all"].drop(columns="structure")
        sec.blocks.append(Table("controls_means", sort_by_size(means, ["task", "train_size", "init"]),
                                "Mean test Dice per init (95% bootstrap CI over test images; seed SD)",
                                {"seed_sd": lambda v: fmt_num(v, 4)}))
    fig = os.path.join(analysis_dir, "controls.png")
    if os.path.isfile(fig):
        sec.blocks.append(FigureBlock("controls", fig, "Mean test Dice per init and training size (95% CI)"))
    sec.blocks.append(Table("controls", table[[c for c in CONTROLS_COLUMNS if c in table.columns]],
                            "DoLL-init minus each control per task and training size", _p_formats()))
    sec.blocks.append(Text(ONE_PRETRAINING_CAVEAT))
    sec.blocks += [Text(t, conclusion=True) for t in controls_conclusions(table, labels, alpha)]
    return sec


def crossval_conclusions(summary: pd.DataFrame, tests: pd.DataFrame | None = None,
                         labels: Mapping[str, str] | None = None, alpha: float = 0.05) -> list[str]:
    """The generated conclusions of a cross-validation by patient (:func:`bundle.reporting.analysis.crossval_table`):
    per task, size and structure each init's mean over every image with its worst seed and fold range, then one
    :func:`comparison_sentence` per paired test."""
    labels = {**DEFAULT_LABELS, **dict(labels or {})}
    out = []
    for (task, size, structure), g in summary.groupby(["task", "train_size", "structure"], sort=False):
        parts = [f"{_label(r['init'], labels)} {fmt_num(r['mean'], 3)} (worst seed {fmt_num(r['worst_seed'], 3)}, "
                 f"folds {fmt_num(r['fold_min'], 3)}-{fmt_num(r['fold_max'], 3)}, lowest image "
                 f"{fmt_num(r['lowest_image'], 3)})" for r in g.to_dict("records")]
        out.append(f"Cross-validation by patient on {task} ({structure}) with {size_phrase(size)}: each of "
                   f"{int(g['n_images'].max())} images tested once over {int(g['n_folds'].max())} folds: "
                   + "; ".join(parts) + ".")
    if tests is not None and len(tests):
        out += [comparison_sentence(r, labels, alpha) for r in tests.to_dict("records")]
    return out


def _steps_phrase(diff: Any, unit: str) -> str:
    """``-45`` -> ``"45.0 <unit> sooner than"``, ``+65`` -> ``"65.0 <unit> later than"``, ``0`` -> ``"as many <unit>
    as"``."""
    if _isnan(diff) or float(diff) == 0:
        return f"as many {unit} as"
    return f"{fmt_num(abs(float(diff)), 1)} {unit} {'sooner' if float(diff) < 0 else 'later'} than"


def efficiency_pair_sentences(pairs: pd.DataFrame, labels: Mapping[str, str] | None = None,
                              alpha: float = 0.05) -> list[str]:
    """One sentence per row of :func:`bundle.reporting.analysis.efficiency_pairs`: how many fewer optimizer steps
    an init needs to reach 95% (or the table's fraction) of its best validation Dice than the reference."""
    labels = {**DEFAULT_LABELS, **dict(labels or {})}
    out = []
    for r in pairs.to_dict("records"):
        col = next(c for c in r if str(c).startswith("steps_to_") and str(c).endswith("_diff"))
        pct = str(col)[len("steps_to_"):-len("_diff")]
        a, b = _label(r["init"], labels), _label(r["reference"], labels)
        p = r["p_steps_to"]
        verdict = "significant" if not _isnan(p) and float(p) < alpha else "not significant"
        out.append(f"Training efficiency on {r['task']} with {size_phrase(r['train_size'])}: {a} reaches {pct}% of "
                   f"its best validation Dice {_steps_phrase(r[col], 'optimizer steps')} {b} (mean over "
                   f"{int(r['n'])} paired runs; sooner in {int(r['n_fewer'])}; Wilcoxon p={fmt_p(p)}, {verdict}), "
                   f"and its runs end {_steps_phrase(r['steps_run_diff'], 'steps')} {b}'s "
                   f"(p={fmt_p(r['p_steps_run'])}).")
    return out


def replicate_conclusions(table: pd.DataFrame, labels: Mapping[str, str] | None = None,
                          alpha: float = 0.05) -> list[str]:
    """The generated conclusions of the pre-training replicates (:func:`bundle.reporting.analysis.replicate_table`):
    one sentence per task, size and comparison with at least two replicates, the replicate as the unit."""
    labels = {**DEFAULT_LABELS, **dict(labels or {})}
    out = []
    for r in table[table["replicate"].astype(str) == "all"].to_dict("records"):
        if int(r["n"]) < 2:  # one replicate: nothing to say across replicates
            continue
        a, b = _label(r["a"], labels), _label(r["b"], labels)
        p_holm = r.get("p_holm", float("nan"))
        if not _isnan(p_holm) and float(p_holm) < alpha:
            verdict = f"{a if float(r['mean_diff']) > 0 else b} is better, established across pre-trainings"
        else:
            verdict = "no difference established across pre-trainings"
        out.append(f"Across {int(r['n'])} pre-training replicates on {r['task']} with {size_phrase(r['train_size'])}: "
                   f"{a} - {b} {fmt_num(r['mean_diff'], signed=True)} mean Dice ({fmt_num(r['mean_a'])} vs "
                   f"{fmt_num(r['mean_b'])}), favouring {a} in {int(r['n_favour_a'])} of {int(r['n'])} replicates, "
                   f"t-test p={fmt_p(r['p_value'])}, Holm p={fmt_p(p_holm)}: {verdict} (alpha={alpha:g}).")
    return out


def _studies_section(crossval_dirs: Sequence[PathLike], replicates_dirs: Sequence[PathLike],
                     labels: Mapping[str, str], alpha: float) -> Section | None:
    """The studies run beside the pipeline into its output folder (``scripts/crossval.py``,
    ``scripts/pretrain_replicates.py``); ``None`` when there are none (the section is then left out, not "not
    run": the pipeline does not run them)."""
    sec = Section("studies", "Studies beside the pipeline: cross-validation and pre-training replicates")
    for k, folder in enumerate(crossval_dirs):
        summary = _read_csv(os.path.join(folder, "crossval.csv"), dtype={"train_size": str})
        if summary is None or summary.empty:
            continue
        tests = _read_csv(os.path.join(folder, "crossval_tests.csv"), dtype={"train_size": str})
        tests = tests if tests is not None and len(tests) else None
        sec.blocks.append(Text(
            f"Cross-validation by patient ({os.fspath(folder)}; scripts/crossval.py): the task's images cut into "
            "folds by patient, each fold tested by networks trained on the others, so every image is tested once "
            "by a network that never saw its patient. Means over all images of each image's Dice averaged over "
            "seeds; worst seed: the lowest seed's mean over all images; folds: the lowest and highest fold mean."))
        sec.blocks.append(Table(f"crossval_{k}", summary, "Cross-validation: mean test Dice over every image"))
        if tests is not None:
            shown = ["task", "train_size", "structure", "init", "reference", "n", "mean_init", "mean_reference",
                     "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "significant"]
            sec.blocks.append(Table(f"crossval_tests_{k}", tests[[c for c in shown if c in tests.columns]],
                                    "Paired tests over every image (Wilcoxon signed-rank, Holm)", _p_formats()))
        sec.blocks += [Text(t, conclusion=True) for t in crossval_conclusions(summary, tests, labels, alpha)]
        controls = _read_csv(os.path.join(folder, "crossval_controls.csv"), dtype={"train_size": str})
        if controls is not None and len(controls):
            sec.blocks.append(Table(f"crossval_controls_{k}", sort_by_size(
                controls[[c for c in CONTROLS_COLUMNS if c in controls.columns]], ["task", "train_size", "reference"]),
                "Cross-validation: the DoLL init minus each pre-training control over every image (Wilcoxon "
                "signed-rank, Holm over the table)", _p_formats()))
            sec.blocks.append(Text(ONE_PRETRAINING_CAVEAT))
            sec.blocks += [Text(t, conclusion=True) for t in controls_conclusions(controls, labels, alpha)]
        pairs = _read_csv(os.path.join(folder, "crossval_efficiency_tests.csv"), dtype={"train_size": str})
        if pairs is not None and len(pairs):
            sec.blocks.append(Table(f"crossval_efficiency_{k}", pairs, "Training efficiency, paired by fold and seed "
                                    "(optimizer steps; negative: fewer than the reference)", _p_formats()))
            sec.blocks += [Text(t, conclusion=True) for t in efficiency_pair_sentences(pairs, labels, alpha)]
        reps = _read_csv(os.path.join(folder, "crossval_replicates.csv"), dtype={"train_size": str, "replicate": str})
        if reps is not None and len(reps):
            sec.blocks.append(Table(f"crossval_replicates_{k}", reps, "Cross-validation with several pre-trainings "
                                    "(the pre-training as the unit)", _p_formats()))
            sec.blocks += [Text(t, conclusion=True) for t in replicate_conclusions(reps, labels, alpha)]
    for k, folder in enumerate(replicates_dirs):
        table = _read_csv(os.path.join(folder, "replicates.csv"), dtype={"train_size": str, "replicate": str})
        if table is None or table.empty:
            continue
        sec.blocks.append(Text(
            f"Pre-training replicates ({os.fspath(folder)}; scripts/pretrain_replicates.py): each label kind "
            "pre-trained with several seeds, each fine-tuned with the same grid; the replicate is the unit "
            "(one-sample t-test of the replicates' differences, Holm over the replicate-level rows)."))
        sec.blocks.append(Table(f"replicates_{k}", sort_by_size(table[table["replicate"] == "all"],
                                                               ["task", "train_size"]),
                                "Across the replicates (per-replicate rows in replicates.csv)", _p_formats()))
        sec.blocks += [Text(t, conclusion=True) for t in replicate_conclusions(table, labels, alpha)]
    return sec if sec.blocks else None


def _gradcam_section(analysis_dir: str, status: Mapping[str, str], labels: Mapping[str, str]) -> Section:
    sec = Section("gradcam", "Grad-CAM of the segmentation networks")
    rows = _read_csv(os.path.join(analysis_dir, "gradcam.csv"))
    if rows is None or rows.empty:
        return sec.not_run(status.get("gradcam", "no analysis/gradcam.csv"))
    mode = str(rows["mode"].iloc[0]) if "mode" in rows.columns else "gradcam"
    layer = str(rows["layer"].iloc[0]) if "layer" in rows.columns else ""
    table = rows.groupby(["model", "structure"], sort=False).agg(
        n_images=("image", "nunique"), inside_fraction=("inside_fraction", "mean"),
        pointing=("max_inside", "mean")).reset_index()
    sec.blocks.append(Table("gradcam", table, f"Share of the {mode} map inside the reference structure, and pointing "
                                              f"game (map maximum inside it), layer {layer}"))
    overall = rows.groupby("model", sort=False).agg(inside=("inside_fraction", "mean"), hit=("max_inside", "mean"))
    sec.blocks.append(Text("Grad-CAM mass inside the reference structures (mean over images and structures): "
                           + "; ".join(f"{_label(m, labels)} {fmt_num(r['inside'], 3)} (pointing game "
                                       f"{fmt_num(r['hit'], 3)})" for m, r in overall.iterrows()) + ".",
                           conclusion=True))
    panel = os.path.join(analysis_dir, "gradcam_panel.png")
    if os.path.isfile(panel):
        sec.blocks.append(FigureBlock("gradcam_panel", panel, f"Rows: image and model; first tile: reference outlines; "
                                                              f"then one {mode} map per structure (white: reference)"))
    return sec


def _ensemble_section(analysis_dir: str, status: Mapping[str, str]) -> Section:
    sec = Section("ensembles", "Mask ensembles and synergy")
    summary = _read_csv(os.path.join(analysis_dir, "ensembles.csv"))
    if summary is None or summary.empty:
        return sec.not_run(status.get("ensembles", "no analysis/ensembles.csv"))
    overall = summary[summary["structure"].astype(str) == "all"].copy()
    overall["name"] = np.where(overall["method"] == "single", overall["models"], overall["method"])
    wide = summary.copy()
    wide["name"] = np.where(wide["method"] == "single", wide["models"], wide["method"])
    table = wide.pivot_table(index=["method", "name"], columns="structure", values="dice", sort=False).reset_index()
    cols = ["method", "name", "all"] + [c for c in table.columns if c not in ("method", "name", "all")]
    sec.blocks.append(Table("ensembles", table[cols], "Mean Dice against the reference: each model alone and the "
                                                      "ensembles of all models"))
    single = overall[overall["method"] == "single"]
    ens = overall[overall["method"] != "single"]
    if len(single) and len(ens):
        bs, be = single.loc[single["dice"].idxmax()], ens.loc[ens["dice"].idxmax()]
        verdict = "above" if be["dice"] > bs["dice"] else "not above"
        sec.blocks.append(Text(
            f"Best ensemble: {be['method']} of {len(single)} models, mean Dice {fmt_num(be['dice'])}, "
            f"{fmt_num(be['dice'] - bs['dice'], signed=True)} against the best single model ({bs['name']}, "
            f"{fmt_num(bs['dice'])}): {verdict} the best single model.", conclusion=True))
    panel = os.path.join(analysis_dir, "ensemble_panel.png")
    if os.path.isfile(panel):
        sec.blocks.append(FigureBlock("ensemble_panel", panel, "One test image: reference, each model, each ensemble "
                                                               "(title: its mean Dice on that image)"))
    synergy = _read_csv(os.path.join(analysis_dir, "synergy.csv"))
    if synergy is not None and len(synergy):
        syn = synergy[synergy["structure"].astype(str) == "all"].drop(columns=["structure"])
        sec.blocks.append(Table("synergy", syn, "Pairwise synergy (mean over images): union and intersection of two "
                                                "models against the better of the two"))
        if len(syn):
            top = syn.loc[syn["gain_union"].astype(float).idxmax()]
            topi = syn.loc[syn["gain_intersection"].astype(float).idxmax()]
            sec.blocks.append(Text(
                f"Synergy: the union of a pair beats both of its models on {fmt_num(100 * syn['union_wins'].mean(), 1)}"
                f"% of image-pair cases, the intersection on {fmt_num(100 * syn['intersection_wins'].mean(), 1)}%; "
                f"largest mean union gain {fmt_num(top['gain_union'], signed=True)} ({top['model_a']} + "
                f"{top['model_b']}), largest mean intersection gain {fmt_num(topi['gain_intersection'], signed=True)} "
                f"({topi['model_a']} + {topi['model_b']}).", conclusion=True))
    return sec


def _throughput_section(timing_json: PathLike | None, bench_files: Sequence[PathLike], out_dir: str) -> Section:
    import pandas as pd

    from .plots import plot_bars

    sec = Section("throughput", "Throughput")
    timing = _read_json(timing_json) if timing_json else None
    found = False
    if isinstance(timing, Mapping) and timing:
        found = True
        stages = {k: float(v) for k, v in timing.items() if k != "total" and _is_num(v)}
        table = pd.DataFrame({"stage": list(stages), "seconds": list(stages.values())})
        if "total" in timing:
            table = pd.concat([table, pd.DataFrame({"stage": ["total"], "seconds": [float(timing["total"])]})],
                              ignore_index=True)
        sec.blocks.append(Table("timing", table, "Wall-clock seconds per pipeline stage",
                                {"seconds": lambda v: fmt_num(v, 1)}))
        if stages:
            fig = plot_bars(list(stages), list(stages.values()), os.path.join(out_dir, "timing.png"),
                            "Pipeline stages", "seconds")
            sec.blocks.append(FigureBlock("timing", fig, "Wall-clock seconds per stage"))
            slow = max(stages, key=stages.get)  # type: ignore[arg-type]
            total = float(timing.get("total", sum(stages.values())))
            sec.blocks.append(Text(f"The pipeline took {total:.0f} s; the slowest stage was {slow} "
                                   f"({stages[slow]:.0f} s, {100 * stages[slow] / max(total, 1e-9):.0f}%).",
                                   conclusion=True))
    for path in bench_files:
        obj = _read_json(path)
        if obj is None:
            continue
        found = True
        flat = _flatten(obj)
        table = pd.DataFrame({"key": list(flat), "value": [str(v) if not _is_num(v) else v for v in flat.values()]})
        name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        sec.blocks.append(Table(f"bench_{slug(name)}", table, f"Benchmark {os.path.basename(os.fspath(path))}",
                                {"value": lambda v: f"{v:.4g}" if _is_num(v) else str(v)}))
    if not found:
        sec.not_run("no pipeline_timing.json and no benchmark JSON")
    return sec


def _repro_section(config_files: Sequence[PathLike], packages: Sequence[str]) -> Section:
    sec = Section("reproducibility", "Configs and package versions")
    sec.blocks.append(Table("packages", package_versions(packages), "Package versions"))
    for path in config_files:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                sec.blocks.append(Code(os.path.basename(os.fspath(path)), f.read()))
    return sec


# --------------------------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------------------------
def build_report(
    out_dir: PathLike,
    analysis_dir: PathLike | None = None,
    doll_quality_dir: PathLike | None = None,
    classifier_metrics: Sequence[PathLike] = (),
    montage: PathLike | None = None,
    timing_json: PathLike | None = None,
    bench_files: Sequence[PathLike] = (),
    config_files: Sequence[PathLike] = (),
    init_labels: Mapping[str, str] | None = None,
    alpha: float = 0.05,
    packages: Sequence[str] = DEFAULT_PACKAGES,
    title: str = "cxr_doll_segmentation: pipeline report",
    tracking_uri: str | None = None,
    experiment: str = "cxr_doll_report",
    data_summary: PathLike | None = None,
    crossval_dirs: Sequence[PathLike] = (),
    replicates_dirs: Sequence[PathLike] = (),
) -> dict[str, Any]:
    """Build the report (see the module docstring) from the stages' outputs.

    Args:
        out_dir: output folder (``<output_root>/report``).
        analysis_dir: the analysis stage's folder (``<output_root>/analysis``).
        doll_quality_dir: ``<output_root>/doll_quality`` (``summary.csv``, ``panel.png``).
        classifier_metrics: ``metrics_test.json`` files of the classifiers.
        montage: the phantom montage PNG.
        timing_json: ``pipeline_timing.json``.
        bench_files: benchmark JSON files (flattened into tables).
        config_files: config files whose text is included.
        init_labels: display names of the inits (e.g. ``{"doll": "DoLL-init"}``).
        alpha: significance level of the conclusions (the statistics table's ``p_holm`` is compared with it).
        packages: packages whose versions are listed.
        title: report title.
        tracking_uri: MLflow store (``None``: no MLflow run).
        experiment: MLflow experiment.
        data_summary: the data stage's ``datalists/summary.json``: a first section states which data were real
            (``None``: no such section).
        crossval_dirs: folders of ``scripts/crossval.py`` (``crossval.csv``, ``crossval_tests.csv``).
        replicates_dirs: folders of ``scripts/pretrain_replicates.py`` (``replicates.csv``). With neither, the
            studies section is left out.

    Returns:
        ``{"html", "markdown", "conclusions": [statements], "status": {section: status}, "files": [...],
        "run_id": ...}``.
    """
    import pandas as pd

    labels = {**DEFAULT_LABELS, **dict(init_labels or {})}
    out = os.fspath(out_dir)
    fig_dir, table_dir = os.path.join(out, "figures"), os.path.join(out, "tables")
    os.makedirs(fig_dir, exist_ok=True)
    adir = os.fspath(analysis_dir) if analysis_dir else ""
    status = _read_json(os.path.join(adir, "status.json")) if adir else None
    status = dict(status) if isinstance(status, Mapping) else {}
    if adir and not os.path.isdir(adir):
        status = {k: f"analysis stage not run (no {adir})" for k in
                  ("learning_curves", "efficiency", "statistics", "controls", "gradcam", "ensembles")}

    report = Report(title)
    stats_section, _ = _statistics_section(adir, status, labels, alpha)
    studies = _studies_section(list(crossval_dirs), list(replicates_dirs), labels, alpha)
    body = [
        *([_data_section(data_summary)] if data_summary is not None else []),
        _phantom_section(montage),
        _doll_section(os.fspath(doll_quality_dir) if doll_quality_dir else None),
        _classifier_section(list(classifier_metrics), fig_dir),
        _learning_section(adir, status, labels),
        _efficiency_section(adir, status, labels),
        stats_section,
        _controls_section(adir, status, labels, alpha),
        *([studies] if studies is not None else []),
        _gradcam_section(adir, status, labels),
        _ensemble_section(adir, status),
        _throughput_section(timing_json, list(bench_files), fig_dir),
        _repro_section(list(config_files), packages),
    ]
    conclusions = Section("conclusions", "Conclusions (computed from the numbers below)")
    conclusions.blocks = [Text(text, conclusion=False) for s in body for b in s.blocks
                          if isinstance(b, Text) and b.conclusion for text in [b.text]]
    not_run = [s.title for s in body if s.status != "done"]
    if not_run:
        conclusions.blocks.append(Text("Sections not run: " + "; ".join(not_run) + "."))
    if not conclusions.blocks:
        conclusions.not_run("no results to conclude from")
    report.sections = [conclusions, *body]

    files: list[str] = []
    for fig in report.figures():  # copy for the Markdown (and MLflow)
        dest = os.path.join(fig_dir, f"{fig.name}.png")
        if os.path.abspath(fig.path) != os.path.abspath(dest):
            atomic_save(dest, lambda tmp, src=fig.path: shutil.copyfile(src, tmp))
        files.append(dest)
    for table in report.tables():
        path = os.path.join(table_dir, f"{table.name}.csv")
        atomic_write_text(path, table.frame.to_csv(index=False))
        files.append(path)
    statements = report.conclusions()
    conc_path = os.path.join(out, "conclusions.csv")
    atomic_write_text(conc_path, pd.DataFrame(statements, columns=["section", "statement"]).to_csv(index=False))
    html_path, md_path = os.path.join(out, "report.html"), os.path.join(out, "report.md")
    atomic_write_text(html_path, report.to_html())
    atomic_write_text(md_path, report.to_markdown())
    files += [conc_path, html_path, md_path]
    section_status = {s.key: s.status for s in report.sections}
    run_id = None
    if tracking_uri:
        from ..tracking import log_run

        metrics = {"n_figures": float(len(report.figures())), "n_tables": float(len(report.tables())),
                   "n_sections_not_run": float(len(not_run))}
        run_id = log_run(tracking_uri, experiment, "report", params={"out_dir": out, "title": title},
                         metrics=metrics, artifacts=files,
                         tags={"stage": "report", **{f"section_{k}": v[:200] for k, v in section_status.items()}})
    logger.info(f"report: {html_path} ({len(report.figures())} figures, {len(report.tables())} tables; not run: "
                f"{', '.join(not_run) or 'none'})")
    return {"html": html_path, "markdown": md_path, "conclusions": [s for _, s in statements],
            "status": section_status, "files": files, "run_id": run_id}
