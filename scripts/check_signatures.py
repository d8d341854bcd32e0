"""How visible each observation's phantom signature is at the network's input sizes.

Prints (and writes to ``--out``) a markdown table of :func:`bundle.data.phantom.signature_contrast` for the 13
findings: the mean absolute difference a finding makes inside its true mask, in units of the image's standard
deviation, after the area resize to each network size (docs/doll_tuning.md reads it).

Usage::

    python scripts/check_signatures.py --n 12 --sizes "[128,256]" --out signatures.md
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.constants import OBSERVATIONS  # noqa: E402
from bundle.data.phantom import signature_contrast  # noqa: E402
from bundle.utils import atomic_write_text  # noqa: E402


def main(n: int = 12, draw_size: int = 256, sizes: Sequence[int] = (128, 256), seed: int = 0,
         out: str | None = None) -> str:
    """Print (and write atomically to ``out``) the signature contrast of every observation at ``sizes``."""
    sizes = tuple(int(s) for s in sizes)
    rows = [f"| observation | {' | '.join(f'{s} px' for s in sizes)} |", "|---|" + "---:|" * len(sizes)]
    for k, name in enumerate(OBSERVATIONS[1:], start=1):
        c = signature_contrast(k, n=n, draw_size=draw_size, sizes=sizes, seed=seed)
        rows.append(f"| {name} | {' | '.join(f'{c[s]:.2f}' for s in sizes)} |")
    text = "\n".join(rows) + "\n"
    print(text)
    if out:
        atomic_write_text(out, text)
    return text


if __name__ == "__main__":
    fire.Fire(main)
