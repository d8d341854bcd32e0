"""Multi-target Integrated Gradients (bundle.explain.ig) against captum's IntegratedGradients.

Small networks (a tiny CNN with eval-mode BatchNorm, a tiny MONAI DenseNet) at 32 x 32 with 14 outputs. The
reference is captum called once per (image, target, baseline draw) with the same baselines, steps and method.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import nn

from bundle.explain import ig as igm
from bundle.explain.ig import (
    QUADRATURE_METHODS,
    IGResult,
    MultiTargetIntegratedGradients,
    gaussian_blur,
    integrated_gradients,
    make_baselines,
    normalize_targets,
    quadrature,
)

K = 14
RTOL = 1e-5  # max abs difference relative to max abs of captum's attributions


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    return model


def tiny_cnn(act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), act(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), act(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, K),
    )
    return _randomize_bn(model, seed).eval()


def tiny_densenet(seed: int = 0) -> nn.Module:
    from monai.networks.nets import DenseNet

    torch.manual_seed(seed)
    model = DenseNet(spatial_dims=2, in_channels=1, out_channels=K, init_features=8, growth_rate=4,
                     block_config=(2, 2), bn_size=2)
    return _randomize_bn(model, seed).eval()


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return tiny_cnn()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand((3, 1, 32, 32), generator=torch.Generator().manual_seed(1))


def captum_reference(model, x, target_lists, base5d, n_steps, method, multiply_by_inputs=True,
                     internal_batch_size=None):
    """Per image: captum attributions (T_b, C, H, W) and deltas (T_b,), averaged over baseline draws."""
    ig = IntegratedGradients(model, multiply_by_inputs=multiply_by_inputs)
    out = []
    for b, targets in enumerate(target_lists):
        maps, deltas = [], []
        for c in targets:
            a_sum, d_sum = 0, 0
            for d in range(base5d.shape[0]):
                a, dl = ig.attribute(x[b: b + 1], baselines=base5d[d, b: b + 1], target=c, n_steps=n_steps,
                                     method=method, internal_batch_size=internal_batch_size,
                                     return_convergence_delta=True)
                a_sum = a_sum + a[0]
                d_sum = d_sum + dl[0]
            maps.append(a_sum / base5d.shape[0])
            deltas.append(d_sum / base5d.shape[0])
        out.append((torch.stack(maps) if maps else None, torch.stack(deltas) if deltas else None))
    return out


def assert_matches_captum(res: IGResult, ref, target_lists, delta_atol: float = 1e-5) -> float:
    """Check attributions (relative to captum's max abs) and deltas; return the relative difference."""
    assert res.target_lists() == [list(t) for t in target_lists]
    scale = max(float(r[0].abs().max()) for r in ref if r[0] is not None)
    assert scale > 0
    worst = 0.0
    for b, (targets, (ra, rd)) in enumerate(zip(target_lists, ref)):
        n = len(targets)
        assert torch.all(res.attributions[b, n:] == 0), "padding slots must be zero"
        if n == 0:
            continue
        diff = float((res.attributions[b, :n] - ra).abs().max()) / scale
        worst = max(worst, diff)
        assert diff <= RTOL, f"image {b}: relative difference {diff:.2e}"
        assert res.delta is not None
        torch.testing.assert_close(res.delta[b, :n], rd.to(res.delta.dtype), atol=delta_atol, rtol=1e-4)
    return worst


# ----------------------------------------------------------------------------------------------------------------
def test_quadrature_equals_captum():
    for method in QUADRATURE_METHODS:
        for n in (2, 5, 32):
            sizes_fn, alphas_fn = approximation_parameters(method)
            assert quadrature(method, n) == (sizes_fn(n), alphas_fn(n))
    with pytest.raises(ValueError):
        quadrature("simpson", 8)


@pytest.mark.parametrize("method", QUADRATURE_METHODS)
def test_methods_match_captum_per_image_targets(cnn, images, method):
    targets = [[3, 0, 13], [5], [7, 3]]
    res = integrated_gradients(cnn, images, targets, n_steps=7, method=method)
    base = make_baselines(images, "zeros")
    assert res.attributions.shape == (3, 3, 1, 32, 32)
    assert res.attributions.dtype == torch.float32
    assert_matches_captum(res, captum_reference(cnn, images, targets, base, 7, method), targets)


@pytest.mark.parametrize("baselines", ["blur", "uniform", "tensor", 0.25])
def test_baselines_match_captum(cnn, images, baselines):
    kw = {"blur_sigma": 2.0, "n_baseline_draws": 3, "seed": 7}
    if baselines == "tensor":
        baselines = torch.rand((3, 1, 32, 32), generator=torch.Generator().manual_seed(5))
    targets = [[1, 2], [2], [4, 1]]
    res = integrated_gradients(cnn, images, targets, baselines=baselines, n_steps=6, **kw)
    base = make_baselines(images, baselines, **kw)
    assert base.shape[0] == (3 if baselines == "uniform" else 1)
    assert_matches_captum(res, captum_reference(cnn, images, targets, base, 6, "gausslegendre"), targets)


def test_baseline_builders(images):
    blur = make_baselines(images, "blur", blur_sigma=3.0)[0]
    assert blur.shape == images.shape
    assert blur.std() < images.std()  # smoother
    torch.testing.assert_close(blur.mean(), images.mean(), atol=0.02, rtol=0)
    assert torch.equal(gaussian_blur(images, 0.0), images)
    u1 = make_baselines(images, "uniform", n_baseline_draws=4, seed=3)
    u2 = make_baselines(images, "uniform", n_baseline_draws=4, seed=3)
    u3 = make_baselines(images, "uniform", n_baseline_draws=4, seed=4)
    assert u1.shape == (4, *images.shape) and torch.equal(u1, u2) and not torch.equal(u1, u3)
    lo = images.amin(dim=(1, 2, 3)).view(1, -1, 1, 1, 1)
    hi = images.amax(dim=(1, 2, 3)).view(1, -1, 1, 1, 1)
    assert torch.all(u1 >= lo) and torch.all(u1 <= hi)
    assert torch.equal(make_baselines(images, 0.5), torch.full((1, *images.shape), 0.5))
    five = torch.rand((2, *images.shape))
    assert torch.equal(make_baselines(images, five), five)
    assert make_baselines(images, torch.zeros(1, 32, 32)).shape == (1, *images.shape)
    with pytest.raises(ValueError):
        make_baselines(images, torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError):
        make_baselines(images, torch.zeros(2, 2, 1, 32, 32))  # 2 images for a batch of 3
    with pytest.raises(ValueError):
        make_baselines(images, "gaussian")


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_sizes_and_target_forms(cnn, images, batch):
    x = images[:batch]
    base = make_baselines(x, "zeros")
    # a (B, T) tensor with -1 padding, an int, a captum-style list of one target per image, None = all outputs
    t = torch.tensor([[2, 9, -1], [-1, -1, -1], [11, 2, 6]])[:batch]
    lists = normalize_targets(t, batch)
    res = integrated_gradients(cnn, x, t, n_steps=5)
    assert_matches_captum(res, captum_reference(cnn, x, lists, base, 5, "gausslegendre"), lists)
    res_int = integrated_gradients(cnn, x, 4, n_steps=5)
    assert res_int.targets.tolist() == [[4]] * batch
    ref = IntegratedGradients(cnn).attribute(x, target=4, n_steps=5)
    assert float((res_int.attributions[:, 0] - ref).abs().max() / ref.abs().max()) <= RTOL
    res_list = integrated_gradients(cnn, x, list(range(batch)), n_steps=5)
    assert res_list.target_lists() == [[b] for b in range(batch)]
    res_all = integrated_gradients(cnn, x, None, n_steps=5, return_convergence_delta=False)
    assert res_all.attributions.shape == (batch, K, 1, 32, 32) and res_all.delta is None
    assert torch.allclose(res_all.attributions[:, 4], res_int.attributions[:, 0], atol=1e-7, rtol=0)


def test_internal_batch_size_chunking(cnn, images):
    targets = [[0, 5], [], [5, 9, 1]]
    full = integrated_gradients(cnn, images, targets, n_steps=8)
    ref = captum_reference(cnn, images, targets, make_baselines(images, "zeros"), 8, "gausslegendre",
                           internal_batch_size=3)
    for ibs in (1, 5, 13):  # one row per chunk; chunks straddling images; several images per chunk
        res = integrated_gradients(cnn, images, targets, n_steps=8, internal_batch_size=ibs)
        assert_matches_captum(res, ref, targets)
        assert float((res.attributions - full.attributions).abs().max() / full.attributions.abs().max()) <= 1e-6
        torch.testing.assert_close(res.delta, full.delta, atol=1e-6, rtol=0)


def test_monai_densenet_matches_captum(images):
    model = tiny_densenet()
    x = images[:2]
    targets = [[0, 4, 13, 8], [8, 2]]
    res = integrated_gradients(model, x, targets, baselines="blur", blur_sigma=2.0, n_steps=6,
                               method="riemann_trapezoid", internal_batch_size=4)
    ref = captum_reference(model, x, targets, make_baselines(x, "blur", blur_sigma=2.0), 6, "riemann_trapezoid")
    assert_matches_captum(res, ref, targets)


def test_output_transform_and_multiply_by_inputs(cnn, images):
    targets = [[1, 6], [6], [2]]
    base = make_baselines(images, "zeros")
    res = integrated_gradients(cnn, images, targets, output="sigmoid", n_steps=5)
    ref = captum_reference(nn.Sequential(cnn, nn.Sigmoid()), images, targets, base, 5, "gausslegendre")
    assert_matches_captum(res, ref, targets)
    assert torch.allclose(res.outputs, torch.sigmoid(cnn(images)), atol=1e-6)
    res = integrated_gradients(cnn, images, targets, multiply_by_inputs=False, n_steps=5,
                               method="riemann_middle")
    ref = captum_reference(cnn, images, targets, base, 5, "riemann_middle", multiply_by_inputs=False)
    assert_matches_captum(res, ref, targets)


def test_linear_model_exact():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    b = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    w = lin[1].weight.detach().view(3, 2, 4, 4)
    f_gap = lin(x).detach() - lin(b).detach()
    for method in QUADRATURE_METHODS:
        res = integrated_gradients(lin, x, [[0, 2], [1]], baselines=b, n_steps=4, method=method)
        # the gradient of a linear model is constant: IG = (x - b) * w * sum(step sizes); the weights sum to 1
        # except captum's trapezoid rule, whose weights sum to (n - 1) / n (reproduced as captum has it)
        total = sum(quadrature(method, 4)[0])
        assert total == pytest.approx(0.75 if method == "riemann_trapezoid" else 1.0, abs=1e-15)
        torch.testing.assert_close(res.attributions[0, 0], (x[0] - b[0]) * w[0] * total, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(res.attributions[0, 1], (x[0] - b[0]) * w[2] * total, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(res.attributions[1, 0], (x[1] - b[1]) * w[1] * total, atol=1e-12, rtol=1e-12)
        assert torch.all(res.attributions[1, 1] == 0)
        expected_delta = (total - 1) * torch.stack([f_gap[0, [0, 2]], torch.stack([f_gap[1, 1], f_gap[1, 1] * 0])])
        torch.testing.assert_close(res.delta, expected_delta, atol=1e-12, rtol=0)
        if method != "riemann_trapezoid":
            assert res.delta.abs().max() < 1e-12


def test_float64_completeness_converges():
    model = tiny_cnn(act=nn.Softplus).double()
    x = torch.rand((2, 1, 32, 32), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = [[0, 3], [7]]
    coarse = integrated_gradients(model, x, targets, n_steps=2, method="riemann_right")
    fine = integrated_gradients(model, x, targets, n_steps=48, method="gausslegendre")
    gap = (fine.outputs - fine.baseline_outputs).gather(1, fine.targets.clamp(min=0))
    scale = float(gap[fine.mask].abs().min())
    assert scale > 1e-6
    assert float(coarse.delta.abs().max()) > 1e-6  # a crude rule is visibly incomplete ...
    assert float(fine.delta.abs().max()) < 1e-10 * max(1.0, scale)  # ... Gauss-Legendre with many steps is not
    assert fine.attributions.dtype == torch.float64


def test_one_backward_pass_per_target_slot(cnn, images):
    """Backward pass t sends each row the one-hot of its own image's t-th target: images with different targets
    share the passes (max targets per image, not the union), and only the targets are backpropagated."""
    seen_columns: list[list[int]] = []

    def on_forward(mod, inp, out):
        if out.requires_grad:
            out.register_hook(lambda g: seen_columns.append(sorted(torch.nonzero(g.abs().sum(0)).view(-1).tolist())))

    handle = cnn[-1].register_forward_hook(on_forward)
    try:
        engine = MultiTargetIntegratedGradients(cnn)
        targets = [[4], [2, 9], []]
        res = engine.attribute(images, targets, n_steps=4)  # one chunk: slot 0 = {4, 2}, slot 1 = {9}
        assert engine.num_backward == 2
        assert seen_columns == [[2, 4], [9]]
        seen_columns.clear()
        res_ibs = engine.attribute(images, targets, n_steps=4, internal_batch_size=4)  # one image per chunk
        assert engine.num_backward == 3  # {4} then {2}, {9}; the image without targets is never forwarded
        assert sorted(seen_columns) == [[2], [4], [9]]
        assert engine.num_forward_images == 2 * 4 + 2 * 3  # interpolated images + delta forwards
        torch.testing.assert_close(res.attributions, res_ibs.attributions, atol=1e-7, rtol=0)
        seen_columns.clear()
        engine.attribute(images, [[], [], []], n_steps=4)
        assert engine.num_backward == 0 and seen_columns == []
    finally:
        handle.remove()


def test_model_state_untouched(images):
    model = tiny_cnn().train()
    res = integrated_gradients(model, images, [[1], [2], [3]], n_steps=4)
    assert model.training  # restored
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    model.eval()
    ref = integrated_gradients(model, images, [[1], [2], [3]], n_steps=4)
    assert torch.equal(res.attributions, ref.attributions)  # computed in eval mode


def test_bad_targets_and_inputs(cnn, images):
    with pytest.raises(ValueError, match="duplicate"):
        integrated_gradients(cnn, images, [[1, 1], [], []])
    with pytest.raises(ValueError, match="out of range"):
        integrated_gradients(cnn, images, [[14], [], []])
    with pytest.raises(ValueError, match="one entry per image"):
        integrated_gradients(cnn, images, [[1], [2]])
    with pytest.raises(ValueError):
        integrated_gradients(cnn, images[0], 1)
    with pytest.raises(ValueError):
        integrated_gradients(cnn, images, 1, method="riemann_left", n_steps=1)


def test_result_helpers(cnn, images):
    res = integrated_gradients(cnn, images, [[3, 1], [], [2]], n_steps=3)
    maps, explained = res.class_maps(K)
    assert maps.shape == (3, K, 1, 32, 32)
    assert explained.sum().item() == 3 and explained[0, 3] and explained[0, 1] and explained[2, 2]
    assert torch.equal(maps[0, 1], res.attributions[0, 1]) and torch.equal(maps[2, 2], res.attributions[2, 0])
    assert torch.all(maps[~explained] == 0)
    per = res.per_image()
    assert [p[0] for p in per] == [[3, 1], [], [2]]
    assert per[1][1].shape == (0, 1, 32, 32) and per[0][2].shape == (2,)
    assert res.mask.tolist() == [[True, True], [False, False], [True, False]]


def test_reduced_precision_options_run_close(cnn, images):
    ref = integrated_gradients(cnn, images, [[1, 5]] * 3, n_steps=4)
    cl = integrated_gradients(tiny_cnn(), images, [[1, 5]] * 3, n_steps=4, channels_last=True)
    assert float((cl.attributions - ref.attributions).abs().max() / ref.attributions.abs().max()) < 1e-4
    amp = integrated_gradients(tiny_cnn(), images, [[1, 5]] * 3, n_steps=4, amp_dtype=torch.bfloat16)
    assert amp.attributions.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(amp.attributions.flatten(1), ref.attributions.flatten(1), dim=1)
    assert float(cos.min()) > 0.9
    with pytest.raises(ValueError):
        MultiTargetIntegratedGradients(cnn, amp_dtype=torch.float64)


def test_lazy_package_import():
    import subprocess
    import sys

    code = "import sys, bundle.explain; assert 'torch' not in sys.modules; " \
           "from bundle.explain import integrated_gradients; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert igm.integrated_gradients is integrated_gradients
