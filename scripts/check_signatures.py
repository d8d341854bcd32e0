"""How visible each observation's phantom signature is at the network's input sizes.

Prints (and writes to ``--out``) a markdown table of :func:`bundle.data.phantom.signature_contrast` for the 13
findings: the mean absolute difference a finding makes inside its true mask, in units of the image's standard
deviation, after the area resize to each network size (docs/doll_tuning.md reads it).

With ``--learn``, it also measures whether a classifier can learn each named finding at all: the upper bound of
what any explanation of that finding can localise. For each finding, a classifier of the pipeline's architecture is
trained to tell phantoms with that finding alone from phantoms with no finding (each class with probability 1/2,
no other finding to confuse it, independent draws) and scored by its validation AUROC after every epoch
(:func:`learnability`). The best epoch is reported, which favours the classifier: a finding that stays near 0.5 even
so is below what the classifier sees, whatever the DoLL recipe does with its explanation.

Usage::

    python scripts/check_signatures.py --n 12 --sizes "[128,256]" --out signatures.md
    python scripts/check_signatures.py --sizes "[128]" --learn "['Cardiomegaly','Fracture']" --learn_n 1600
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import fire
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.constants import OBSERVATIONS  # noqa: E402
from bundle.data.phantom import signature_contrast  # noqa: E402
from bundle.data.phantom.drawing import draw_frontal  # noqa: E402
from bundle.utils import atomic_write_text  # noqa: E402


def learning_set(finding: int, n: int, size: int = 128, draw_size: int = 256, seed: int = 0
                 ) -> list[dict[str, np.ndarray]]:
    """``n`` phantoms, each with ``finding`` alone (label 1) or no finding (label 0), prepared as the network input.

    Image ``i`` draws its label and its phantom from the generators ``[seed, finding, i, 0]`` and
    ``[seed, finding, i, 1]``, so a set is reproducible and a larger set extends a smaller one. Items are MONAI
    dictionaries: ``image`` (1, size, size) float32 prepared by :class:`bundle.transforms.PrepareRadiographd`,
    ``label`` (1,) float32.
    """
    from bundle.transforms import PrepareRadiographd

    prepare = PrepareRadiographd(keys="image", spatial_size=(int(size), int(size)))
    items = []
    for i in range(int(n)):
        y = int(np.random.default_rng([seed, finding, i, 0]).random() < 0.5)
        ph = draw_frontal(np.random.default_rng([seed, finding, i, 1]), image_size=draw_size,
                          findings=[finding] if y else [])
        image = np.asarray(prepare({"image": ph.image[None].astype(np.float32)})["image"], dtype=np.float32)
        items.append({"image": image, "label": np.array([y], dtype=np.float32)})
    return items


def learnability(finding: int | str, n_train: int = 1600, n_val: int = 400, size: int = 128, epochs: int = 10,
                 arch: str = "densenet_small", draw_size: int = 256, batch_size: int = 16,
                 learning_rate: float = 3e-3, seed: int = 0) -> list[float]:
    """Validation AUROC after each epoch of a classifier trained to detect ``finding`` alone.

    MONAI's ``SupervisedTrainer`` trains ``arch`` (:func:`bundle.networks.classifiers.build_classifier`, one output)
    with binary cross-entropy, AdamW and a cosine schedule (the classifier stage's optimiser and learning rate, no
    augmentation); a ``SupervisedEvaluator`` scores the ``n_val`` validation phantoms (other generator states than
    the training ones) with MONAI's ``ROCAUC`` after every epoch. Deterministic under ``seed`` on one machine.
    """
    from ignite.engine import Events
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import ROCAUC, LrScheduleHandler, ValidationHandler, from_engine

    from bundle.networks.classifiers import build_classifier

    k = OBSERVATIONS.index(finding) if finding in OBSERVATIONS else finding
    if isinstance(k, str) or not 1 <= int(k) < len(OBSERVATIONS):
        raise ValueError(f"finding must be an observation name or index 1-{len(OBSERVATIONS) - 1}, got {finding!r}")
    k = int(k)
    torch.manual_seed(seed)
    train = learning_set(k, n_train, size, draw_size, seed)
    val = learning_set(k, n_val, size, draw_size, seed + 1)
    device = torch.device("cpu")
    net = build_classifier(arch, num_classes=1).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(epochs))
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=DataLoader(Dataset(val), batch_size=64), network=net,
        key_val_metric={"auroc": ROCAUC(output_transform=from_engine(["pred", "label"]))})
    trainer = SupervisedTrainer(
        device=device, max_epochs=int(epochs), network=net, optimizer=optimizer,
        train_data_loader=DataLoader(Dataset(train), batch_size=batch_size, shuffle=True,
                                     generator=torch.Generator().manual_seed(seed)),
        loss_function=torch.nn.BCEWithLogitsLoss(),
        train_handlers=[ValidationHandler(1, evaluator), LrScheduleHandler(scheduler, print_lr=False)])
    scores: list[float] = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: scores.append(float(evaluator.state.metrics["auroc"])))
    trainer.run()
    return scores


def main(n: int = 12, draw_size: int = 256, sizes: Sequence[int] = (128, 256), seed: int = 0,
         out: str | None = None, learn: Sequence[str] = (), learn_n: int = 1600, learn_val: int = 400,
         learn_epochs: int = 10) -> str:
    """Print (and write atomically to ``out``) the signature contrast of every observation at ``sizes``; with
    ``learn`` (observation names), also each named finding's :func:`learnability` at each size (best epoch)."""
    sizes = tuple(int(s) for s in sizes)
    rows = [f"| observation | {' | '.join(f'{s} px' for s in sizes)} |", "|---|" + "---:|" * len(sizes)]
    for k, name in enumerate(OBSERVATIONS[1:], start=1):
        c = signature_contrast(k, n=n, draw_size=draw_size, sizes=sizes, seed=seed)
        rows.append(f"| {name} | {' | '.join(f'{c[s]:.2f}' for s in sizes)} |")
    if isinstance(learn, str):
        learn = [learn]
    if learn:
        rows += ["", f"Validation AUROC, best of {learn_epochs} epochs, {learn_n} training / {learn_val} validation "
                 "phantoms, the finding alone against no finding:", "",
                 f"| observation | {' | '.join(f'{s} px' for s in sizes)} |", "|---|" + "---:|" * len(sizes)]
        for name in learn:
            best = [max(learnability(name, learn_n, learn_val, s, learn_epochs, draw_size=draw_size, seed=seed))
                    for s in sizes]
            rows.append(f"| {name} | {' | '.join(f'{b:.3f}' for b in best)} |")
    text = "\n".join(rows) + "\n"
    print(text)
    if out:
        atomic_write_text(out, text)
    return text


if __name__ == "__main__":
    fire.Fire(main)
