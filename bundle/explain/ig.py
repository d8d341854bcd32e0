"""Multi-target Integrated Gradients (IG) with a shared forward pass.

Integrated Gradients (Sundararajan et al., 2017) attributes the output ``F_c`` of a classifier to the pixels of
an input ``x`` relative to a baseline ``x'``::

    IG_c(x) = (x - x') * integral_0^1 dF_c(x' + a (x - x')) / dx  da
            ~ (x - x') * sum_s w_s * dF_c(x' + a_s (x - x')) / dx

with quadrature nodes ``a_s`` and weights ``w_s`` (``n_steps`` of them). ``captum.attr.IntegratedGradients``
explains one target per call, so explaining ``T`` targets costs ``T x n_steps`` forward *and* backward passes.
The interpolated images do not depend on the target, so this engine runs **one** forward pass per interpolated
image and then one input-gradient backward pass per target *slot* (``torch.autograd.grad(out, xs, onehot,
retain_graph=True)``), i.e. ``n_steps x (1 + T)`` passes instead of ``2 x T x n_steps``. Backward pass ``t`` of a
chunk of interpolated images sends, for every row, a one-hot gradient on the ``t``-th target of that row's image
(samples are independent, so each row's input gradient is that of its own target): images with *different* targets
share the passes, and a chunk costs ``max_b T_b`` backward passes, not the size of the union of its targets. This is
what makes batching images of different targets (:class:`bundle.doll.inferer.DoLLInferer`) pay off.

The quadrature nodes and weights are exactly captum's (:mod:`captum.attr._utils.approximation_methods`), the
interpolation ``x' + a (x - x')`` and the scaling of the gradients follow captum's operation order, so in
float32 the attributions equal captum's to rounding (``tests/test_ig.py`` checks it per method and baseline).

Public API:

* :class:`MultiTargetIntegratedGradients` - the engine (``attribute(inputs, targets, ...)``).
* :func:`integrated_gradients` - one-call convenience wrapper.
* :class:`IGResult` - what ``attribute`` returns: padded ``(B, T_max, C, H, W)`` attributions, the targets they
  belong to (``-1`` = padding), the completeness delta per map and the model outputs at inputs and baselines.
* :func:`make_baselines` - the baselines (``zeros``/constant, ``blur``, ``uniform`` draws, tensor) as a
  ``(D, B, C, H, W)`` tensor (``D`` baseline draws), e.g. to hand the very same baselines to captum.
* :func:`quadrature` - captum's step sizes and alphas for a method.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = [
    "BaselineSpec",
    "IGResult",
    "MultiTargetIntegratedGradients",
    "QUADRATURE_METHODS",
    "TargetSpec",
    "gaussian_blur",
    "integrated_gradients",
    "make_baselines",
    "normalize_targets",
    "quadrature",
]

#: Quadrature rules, named as in captum.
QUADRATURE_METHODS: tuple[str, ...] = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)

#: ``targets`` accepted by :meth:`MultiTargetIntegratedGradients.attribute`.
TargetSpec = Union[None, int, Sequence[int], Sequence[Sequence[int]], Tensor]
#: ``baselines`` accepted by :meth:`MultiTargetIntegratedGradients.attribute`.
BaselineSpec = Union[str, float, int, Tensor]
#: What the gradients are taken of: raw logits, their sigmoid (multi-label), softmax, or any callable.
OutputSpec = Union[Literal["logits", "sigmoid", "softmax"], Callable[[Tensor], Tensor]]


# ----------------------------------------------------------------------------------------------------------------
# quadrature, baselines, targets
# ----------------------------------------------------------------------------------------------------------------
def quadrature(method: str, n_steps: int) -> tuple[list[float], list[float]]:
    """Step sizes (weights) and alphas (nodes in ``[0, 1]``) of ``method`` with ``n_steps`` nodes, as captum.

    Args:
        method: one of :data:`QUADRATURE_METHODS`.
        n_steps: number of nodes (``> 1`` for the Riemann rules, ``> 0`` for Gauss-Legendre).

    Returns:
        ``(step_sizes, alphas)``, two lists of ``n_steps`` Python floats, computed exactly as
        ``captum.attr._utils.approximation_methods.approximation_parameters(method)`` does. Note that captum's
        ``riemann_trapezoid`` weights sum to ``(n - 1) / n``, not 1 (reproduced here for equality with captum), so
        its completeness delta does not vanish even for a linear model.
    """
    if method not in QUADRATURE_METHODS:
        raise ValueError(f"unknown quadrature method {method!r}; choose one of {QUADRATURE_METHODS}")
    if method == "gausslegendre":
        if n_steps < 1:
            raise ValueError("n_steps must be >= 1 for gausslegendre")
        import numpy as np

        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return (0.5 * weights).tolist(), (0.5 * (1 + nodes)).tolist()
    if n_steps < 2:
        raise ValueError("n_steps must be >= 2 for the Riemann rules")
    deltas = [1 / n_steps] * n_steps
    kind = method.split("_")[-1]
    if kind == "trapezoid":
        deltas[0] /= 2
        deltas[-1] /= 2
        alphas = torch.linspace(0, 1, n_steps).tolist()
    elif kind == "left":
        alphas = torch.linspace(0, 1 - 1 / n_steps, n_steps).tolist()
    elif kind == "middle":
        alphas = torch.linspace(1 / (2 * n_steps), 1 - 1 / (2 * n_steps), n_steps).tolist()
    else:  # right
        alphas = torch.linspace(1 / n_steps, 1, n_steps).tolist()
    return deltas, alphas


def gaussian_blur(x: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian blur of a ``(B, C, H, W)`` tensor, per channel, edges replicated.

    Args:
        x: images ``(B, C, H, W)``.
        sigma: standard deviation in pixels (``<= 0`` returns a copy of ``x``).
        truncate: the kernel is cut at ``truncate * sigma`` pixels (as ``scipy.ndimage.gaussian_filter``).
    """
    if sigma <= 0:
        return x.clone()
    radius = max(1, int(truncate * sigma + 0.5))
    grid = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=x.device, dtype=x.dtype)
    c = x.shape[1]
    out = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out


def make_baselines(
    inputs: Tensor,
    baselines: BaselineSpec = "zeros",
    *,
    blur_sigma: float = 10.0,
    n_baseline_draws: int = 1,
    seed: int = 0,
) -> Tensor:
    """The baselines for ``inputs`` as a ``(D, B, C, H, W)`` tensor (``D`` baseline draws, averaged over in IG).

    Args:
        inputs: images ``(B, C, H, W)``.
        baselines:
            - ``"zeros"`` or a number: a constant image (``D = 1``);
            - ``"blur"``: the input blurred with a Gaussian of ``blur_sigma`` pixels (``D = 1``);
            - ``"uniform"``: ``n_baseline_draws`` images of uniform noise in each input's own value range
              ``[min(x_b), max(x_b)]``, drawn from a CPU generator seeded with ``seed`` (``D = n_baseline_draws``);
            - a tensor broadcastable to ``(B, C, H, W)`` (``(C, H, W)``, ``(1, C, H, W)``, ``(B, C, H, W)``;
              ``D = 1``) or a ``(D, B, C, H, W)`` tensor of ``D`` draws.
        blur_sigma: Gaussian sigma in pixels for ``"blur"``.
        n_baseline_draws: number of noise draws for ``"uniform"``.
        seed: seed of the noise draws (the same seed gives the same baselines on any device).
    """
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be (B, C, H, W), got shape {tuple(inputs.shape)}")
    x = inputs.detach()
    if isinstance(baselines, Tensor):
        b = baselines.detach().to(device=x.device, dtype=x.dtype)
        if b.dim() == 5:
            if b.shape[2:] != x.shape[1:] or b.shape[1] not in (1, x.shape[0]):
                raise ValueError(f"5-D baselines must be (D, B, C, H, W) = (D, *{tuple(x.shape)}), "
                                 f"got {tuple(b.shape)}")
            return b.expand(b.shape[0], *x.shape).contiguous()
        try:
            return torch.broadcast_to(b, x.shape).unsqueeze(0).contiguous()
        except RuntimeError as err:
            raise ValueError(f"baselines of shape {tuple(b.shape)} do not broadcast to inputs "
                             f"{tuple(x.shape)}") from err
    if isinstance(baselines, (int, float)) and not isinstance(baselines, bool):
        return torch.full_like(x, float(baselines)).unsqueeze(0)
    if baselines == "zeros":
        return torch.zeros_like(x).unsqueeze(0)
    if baselines == "blur":
        return gaussian_blur(x, blur_sigma).unsqueeze(0)
    if baselines == "uniform":
        if n_baseline_draws < 1:
            raise ValueError("n_baseline_draws must be >= 1")
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.rand((n_baseline_draws, *x.shape), generator=gen, dtype=torch.float64)
        flat = x.reshape(x.shape[0], -1)
        lo = flat.min(1).values.view(1, -1, 1, 1, 1).to(torch.float64).cpu()
        hi = flat.max(1).values.view(1, -1, 1, 1, 1).to(torch.float64).cpu()
        return (lo + noise * (hi - lo)).to(device=x.device, dtype=x.dtype)
    raise ValueError(f"unknown baselines {baselines!r}: use 'zeros', 'blur', 'uniform', a number or a tensor")


def normalize_targets(targets: TargetSpec, batch_size: int, num_outputs: int | None = None) -> list[list[int]]:
    """Per-image target lists from any accepted ``targets`` form.

    Accepted forms: ``None`` (every output, needs ``num_outputs``); an ``int`` (that class for every image); a
    sequence of ``B`` ints (one target per image, as captum); a sequence of ``B`` sequences of ints (per-image
    lists, possibly empty, possibly of different lengths); a tensor ``()`` / ``(B,)`` (as the int forms) or
    ``(B, T)`` where negative entries are padding.

    Raises:
        ValueError: wrong length, duplicate or out-of-range targets.
    """
    if targets is None:
        if num_outputs is None:
            raise ValueError("targets=None needs the number of outputs")
        out = [list(range(num_outputs)) for _ in range(batch_size)]
    elif isinstance(targets, Tensor):
        t = targets.detach().cpu().long()
        if t.dim() == 0:
            out = [[int(t)] for _ in range(batch_size)]
        elif t.dim() == 1:
            if t.shape[0] != batch_size:
                raise ValueError(f"a 1-D targets tensor needs one entry per image ({batch_size}), got {t.shape[0]}")
            out = [[int(v)] if v >= 0 else [] for v in t.tolist()]
        elif t.dim() == 2:
            if t.shape[0] != batch_size:
                raise ValueError(f"a (B, T) targets tensor needs B = {batch_size} rows, got {t.shape[0]}")
            out = [[int(v) for v in row if v >= 0] for row in t.tolist()]
        else:
            raise ValueError(f"targets tensor must be 0-, 1- or 2-D, got shape {tuple(t.shape)}")
    elif isinstance(targets, int) and not isinstance(targets, bool):
        out = [[int(targets)] for _ in range(batch_size)]
    else:
        seq = list(targets)
        if len(seq) != batch_size:
            raise ValueError(f"targets must have one entry per image ({batch_size}), got {len(seq)}")
        out = []
        for entry in seq:
            if isinstance(entry, Tensor):
                entry = entry.reshape(-1).tolist()
            if isinstance(entry, int) and not isinstance(entry, bool):
                out.append([int(entry)])
            else:
                out.append([int(v) for v in entry])
    for b, row in enumerate(out):
        if len(set(row)) != len(row):
            raise ValueError(f"image {b}: duplicate targets {row}")
        if any(c < 0 or (num_outputs is not None and c >= num_outputs) for c in row):
            raise ValueError(f"image {b}: targets {row} out of range [0, {num_outputs})")
    return out


# ----------------------------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class IGResult:
    """Integrated Gradients of ``B`` images, up to ``T_max`` targets each.

    Attributes:
        attributions: ``(B, T_max, C, H, W)``; ``attributions[b, t]`` explains class ``targets[b, t]`` of image
            ``b`` (averaged over baseline draws); zero where ``targets[b, t] == -1`` (padding).
        targets: ``(B, T_max)`` int64 class indices, ``-1`` for padding. Row ``b`` keeps the order in which the
            targets of image ``b`` were given.
        delta: ``(B, T_max)`` completeness delta ``sum(attributions[b, t]) - (F(x_b)[c] - F(x'_b)[c])`` (mean over
            baseline draws; equals captum's ``return_convergence_delta``), zero on padding; ``None`` when not
            requested.
        outputs: ``(B, K)`` model outputs at the inputs (after the ``output`` transform, float32); ``None`` when
            the delta was not requested.
        baseline_outputs: ``(B, K)`` model outputs at the baselines (mean over draws); ``None`` likewise.
    """

    attributions: Tensor
    targets: Tensor
    delta: Tensor | None = None
    outputs: Tensor | None = None
    baseline_outputs: Tensor | None = None

    @property
    def mask(self) -> Tensor:
        """``(B, T_max)`` bool, true where a map exists (not padding)."""
        return self.targets >= 0

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def target_lists(self) -> list[list[int]]:
        """Per-image target lists (padding removed)."""
        return [[int(c) for c in row if c >= 0] for row in self.targets.tolist()]

    def per_image(self) -> list[tuple[list[int], Tensor, Tensor | None]]:
        """Per image ``(targets, attributions (T_b, C, H, W), delta (T_b,) or None)`` without padding."""
        out = []
        for b, row in enumerate(self.target_lists()):
            n = len(row)
            out.append((row, self.attributions[b, :n], None if self.delta is None else self.delta[b, :n]))
        return out

    def class_maps(self, num_classes: int) -> tuple[Tensor, Tensor]:
        """Scatter the maps into class slots: ``(B, num_classes, C, H, W)`` maps (zero where not explained) and a
        ``(B, num_classes)`` bool mask of the explained classes."""
        b, _, *spatial = self.attributions.shape
        maps = self.attributions.new_zeros((b, num_classes, *spatial))
        explained = torch.zeros((b, num_classes), dtype=torch.bool, device=self.attributions.device)
        for i, row in enumerate(self.target_lists()):
            if row:
                idx = torch.tensor(row, device=maps.device)
                maps[i, idx] = self.attributions[i, : len(row)]
                explained[i, idx] = True
        return maps, explained


# ----------------------------------------------------------------------------------------------------------------
# engine
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _inference_setup(model: Callable[..., Tensor], eval_mode: bool, freeze: bool) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode and switch off its parameters' ``requires_grad``; restore afterwards."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad] if freeze else []
    try:
        if eval_mode:
            model.eval()
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if eval_mode and was_training:
            model.train()


def _output_fn(output: OutputSpec) -> Callable[[Tensor], Tensor]:
    if callable(output):
        return output
    if output == "logits":
        return lambda y: y
    if output == "sigmoid":
        return torch.sigmoid
    if output == "softmax":
        return lambda y: torch.softmax(y, dim=-1)
    raise ValueError(f"unknown output {output!r}: use 'logits', 'sigmoid', 'softmax' or a callable")


class MultiTargetIntegratedGradients:
    """Integrated Gradients for many targets per image with one forward pass per interpolated image.

    Equivalent to calling ``captum.attr.IntegratedGradients(model, multiply_by_inputs).attribute(x, baselines,
    target=c, n_steps=n_steps, method=method)`` once per target ``c`` (and averaging over baseline draws), but it
    shares the forward pass of the interpolated images between targets and backpropagates one target slot per
    pass (the ``t``-th target of every image of a step chunk at once), so images with different targets batch.

    Args:
        model: a classifier (``nn.Module`` or callable) mapping ``(N, C, H, W)`` to outputs ``(N, K)``. An
            ``nn.Module`` is put in eval mode during :meth:`attribute` (previous mode restored after) and its
            parameters' ``requires_grad`` is switched off meanwhile (only input gradients are computed). It must
            treat samples independently (eval-mode BatchNorm is fine).
        multiply_by_inputs: multiply the integrated gradients by ``inputs - baselines`` (IG proper, default) or
            return the integrated gradients alone (captum's ``multiply_by_inputs=False``).
        output: what the gradients are taken of: ``"logits"`` (the model's outputs), ``"sigmoid"`` (multi-label
            probabilities), ``"softmax"`` or a callable applied to the ``(N, K)`` outputs.
        amp_dtype: run the forward pass under ``torch.autocast(device_type, amp_dtype)`` (``torch.bfloat16`` or
            ``torch.float16``); ``None`` (default) keeps the model's precision. Attributions are float32 either
            way, but no longer equal captum's float32 values.
        channels_last: feed the interpolated images in ``torch.channels_last`` memory format and convert the
            model to it (in place, once). Off by default; numerically close but not identical.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        multiply_by_inputs: bool = True,
        output: OutputSpec = "logits",
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        self.model = model
        self.multiply_by_inputs = bool(multiply_by_inputs)
        self.output = output
        self._output_fn = _output_fn(output)
        if amp_dtype is not None and amp_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be torch.bfloat16, torch.float16 or None, got {amp_dtype}")
        self.amp_dtype = amp_dtype
        self.channels_last = bool(channels_last)
        if self.channels_last and isinstance(model, nn.Module):
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        #: number of ``torch.autograd.grad`` calls (backward passes) and forward passes of the last ``attribute``
        self.num_backward: int = 0
        self.num_forward_images: int = 0

    # ------------------------------------------------------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.amp_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
                y = self.model(x)
        else:
            y = self.model(x)
        if not isinstance(y, Tensor) or y.dim() != 2:
            raise ValueError(f"the model must return a (N, K) tensor, got "
                             f"{tuple(y.shape) if isinstance(y, Tensor) else type(y)}")
        self.num_forward_images += x.shape[0]
        return self._output_fn(y.float() if self.amp_dtype is not None else y)

    @torch.no_grad()
    def _outputs(self, x: Tensor, chunk: int) -> Tensor:
        """Model outputs of ``x`` in chunks of ``chunk`` images, no gradients."""
        return torch.cat([self._forward(x[i: i + chunk]) for i in range(0, x.shape[0], chunk)], dim=0)

    # ------------------------------------------------------------------------------------------------------------
    def attribute(
        self,
        inputs: Tensor,
        targets: TargetSpec = None,
        baselines: BaselineSpec = "zeros",
        n_steps: int = 32,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = True,
        *,
        blur_sigma: float = 10.0,
        n_baseline_draws: int = 1,
        seed: int = 0,
    ) -> IGResult:
        """Integrated Gradients of ``inputs`` for each image's targets.

        Args:
            inputs: images ``(B, C, H, W)`` (any float dtype the model accepts; on the model's device).
            targets: per-image classes to explain (see :func:`normalize_targets`): ``None`` = every output, an
                int, a list of ``B`` ints, a list of ``B`` lists (different lengths, empty allowed) or a
                ``(B, T)`` tensor padded with ``-1``.
            baselines: ``"zeros"``, a number, ``"blur"``, ``"uniform"`` or a tensor (see :func:`make_baselines`).
                With several draws (``"uniform"``, or a 5-D tensor) the attribution and delta are the means
                over draws of the per-draw IG.
            n_steps: number of quadrature nodes.
            method: ``"gausslegendre"`` (default) or ``"riemann_left|right|middle|trapezoid"``, as captum.
            internal_batch_size: at most this many interpolated images per forward pass (memory cap; the graph
                of one chunk is kept while its targets are backpropagated). ``None``: all ``B x D x n_steps`` at
                once, as captum. Results do not depend on it beyond float rounding.
            return_convergence_delta: also compute the completeness delta (two extra gradient-free forward
                passes per image and draw) and the model outputs.
            blur_sigma: sigma in pixels of the ``"blur"`` baseline.
            n_baseline_draws: number of ``"uniform"`` draws.
            seed: seed of the ``"uniform"`` draws.

        Returns:
            :class:`IGResult` with ``attributions (B, T_max, C, H, W)``, ``targets (B, T_max)`` (``-1`` padding),
            ``delta (B, T_max)`` and the outputs at inputs and baselines.
        """
        if not isinstance(inputs, Tensor) or inputs.dim() != 4:
            raise ValueError("inputs must be a (B, C, H, W) tensor")
        if internal_batch_size is not None and internal_batch_size < 1:
            raise ValueError("internal_batch_size must be >= 1 or None")
        step_sizes, alphas = quadrature(method, n_steps)
        x = inputs.detach()
        n_img = x.shape[0]
        base = make_baselines(x, baselines, blur_sigma=blur_sigma, n_baseline_draws=n_baseline_draws, seed=seed)
        n_draw = base.shape[0]
        base = base.reshape(n_draw * n_img, *x.shape[1:])  # item i = draw (i // B), image (i % B)
        self.num_backward = 0
        self.num_forward_images = 0
        chunk_cap = internal_batch_size or n_draw * n_img * n_steps

        with _inference_setup(self.model, eval_mode=True, freeze=True):
            outputs = base_outputs = None
            num_outputs = None
            if return_convergence_delta or targets is None:
                outputs = self._outputs(torch.cat([x, base], dim=0), chunk_cap)
                outputs, base_outputs = outputs[:n_img], outputs[n_img:]
                num_outputs = outputs.shape[1]
            target_lists = normalize_targets(targets, n_img, num_outputs)
            t_max = max((len(t) for t in target_lists), default=0)
            tgt = torch.full((n_img, t_max), -1, dtype=torch.long)
            for b, row in enumerate(target_lists):
                tgt[b, : len(row)] = torch.tensor(row, dtype=torch.long)

            # the integrated (weighted, summed) gradients per item and target slot
            total = torch.zeros((n_draw * n_img, t_max, *x.shape[1:]), dtype=x.dtype, device=x.device)
            diff = x.repeat(n_draw, 1, 1, 1) - base
            self._integrate(diff, base, target_lists, step_sizes, alphas, chunk_cap, total)

        items_attr = total * diff.unsqueeze(1) if self.multiply_by_inputs else total  # (D*B, T, C, H, W)
        attr = items_attr.reshape(n_draw, n_img, t_max, *x.shape[1:])
        attr = attr[0] if n_draw == 1 else attr.mean(0)

        delta = None
        if return_convergence_delta and outputs is not None and base_outputs is not None:
            # captum: sum(attributions) - (F(inputs)[c] - F(baselines)[c]), per draw, then the mean over draws
            attr_sum = items_attr.flatten(2).sum(-1)
            idx = tgt.clamp(min=0).to(outputs.device)
            f_x = outputs.gather(1, idx).repeat(n_draw, 1)
            f_b = base_outputs.gather(1, idx.repeat(n_draw, 1))
            d = (attr_sum - (f_x - f_b).to(attr_sum.dtype)).reshape(n_draw, n_img, t_max)
            delta = (d[0] if n_draw == 1 else d.mean(0)) * tgt.ge(0).to(d.device)
            base_outputs = base_outputs.reshape(n_draw, n_img, -1).mean(0)
        del items_attr
        return IGResult(attributions=attr, targets=tgt, delta=delta, outputs=outputs, baseline_outputs=base_outputs)

    # ------------------------------------------------------------------------------------------------------------
    def _integrate(
        self,
        diff: Tensor,
        base: Tensor,
        target_lists: list[list[int]],
        step_sizes: list[float],
        alphas: list[float],
        chunk_cap: int,
        total: Tensor,
    ) -> None:
        """Accumulate ``sum_s w_s * grad F_c(base + a_s * diff)`` into ``total[item, slot(c)]`` in place."""
        n_img = len(target_lists)
        n_steps = len(alphas)
        dev, dtype = diff.device, diff.dtype
        w_all = torch.tensor(step_sizes, dtype=dtype, device=dev)
        a_all = torch.tensor(alphas, dtype=dtype, device=dev)
        # rows = (item, step); items with no target are skipped; items with as many targets are adjacent (a chunk
        # costs as many backward passes as its image with the most targets has targets)
        items = [i for i in range(diff.shape[0]) if target_lists[i % n_img]]
        items.sort(key=lambda i: len(target_lists[i % n_img]))
        rows = [(i, s) for i in items for s in range(n_steps)]

        for start in range(0, len(rows), chunk_cap):
            chunk = rows[start: start + chunk_cap]
            item_idx = torch.tensor([r[0] for r in chunk], device=dev)
            step_idx = torch.tensor([r[1] for r in chunk], device=dev)
            # captum's interpolation: baseline + alpha * (input - baseline)
            xs = base[item_idx] + a_all[step_idx].view(-1, *([1] * (diff.dim() - 1))) * diff[item_idx]
            xs.requires_grad_(True)
            # contiguous runs of rows per item in this chunk
            runs: list[tuple[int, int, int]] = []  # (item, first row, end row)
            for r, (i, _) in enumerate(chunk):
                if runs and runs[-1][0] == i:
                    runs[-1] = (i, runs[-1][1], r + 1)
                else:
                    runs.append((i, r, r + 1))
            n_slots = max(len(target_lists[i % n_img]) for i, _, _ in runs)
            w = w_all[step_idx].view(-1, *([1] * (diff.dim() - 1)))
            with torch.enable_grad():
                out = self._forward(xs)
                for t in range(n_slots):
                    # slot t: each row's gradient is taken of the t-th target of its image (one-hot per row)
                    users = [(i, r0, r1) for i, r0, r1 in runs if len(target_lists[i % n_img]) > t]
                    onehot = torch.zeros(out.shape, dtype=out.dtype)
                    for i, r0, r1 in users:
                        onehot[r0:r1, target_lists[i % n_img][t]] = 1
                    (g,) = torch.autograd.grad(out, xs, grad_outputs=onehot.to(out.device),
                                               retain_graph=t < n_slots - 1)
                    self.num_backward += 1
                    g = g.contiguous() * w  # captum: grad * step_size, then sum over steps
                    for i, r0, r1 in users:
                        total[i, t] += g[r0:r1].sum(0)
            del out, xs


def integrated_gradients(
    model: Callable[..., Tensor],
    inputs: Tensor,
    targets: TargetSpec = None,
    *,
    multiply_by_inputs: bool = True,
    output: OutputSpec = "logits",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    **attribute_kwargs,
) -> IGResult:
    """One-call Integrated Gradients: ``MultiTargetIntegratedGradients(model, ...).attribute(inputs, targets, **kw)``.

    ``attribute_kwargs``: ``baselines``, ``n_steps``, ``method``, ``internal_batch_size``,
    ``return_convergence_delta``, ``blur_sigma``, ``n_baseline_draws``, ``seed`` (see
    :meth:`MultiTargetIntegratedGradients.attribute`).
    """
    engine = MultiTargetIntegratedGradients(model, multiply_by_inputs=multiply_by_inputs, output=output,
                                            amp_dtype=amp_dtype, channels_last=channels_last)
    return engine.attribute(inputs, targets, **attribute_kwargs)
