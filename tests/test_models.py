"""Models and registry: shapes, learning on a tiny synthetic task, the physics layer, the
edge-popup supermask (only scores train, exact top-k, straight-through gradients), ops the
ONNX training-step export handles, parameter counts and the ``crowdtrain models`` table."""
from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value
from torch.fx.experimental.proxy_tensor import make_fx

from models import registry
from models.layers import PhysicsLayer
from models.supermask import SupermaskConv, SupermaskLinear, top_k_mask

NAMES = list(registry.MODELS)
ROOT = Path(__file__).resolve().parents[1]


def synthetic_batch(n: int = 40, seed: int = 2024) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes, each a fixed random 8x8 colour pattern blown up to 32x32, plus noise; 0..255.
    (A seed of its own: with the models' seed 0 the templates would repeat their init draws.)"""
    g = torch.Generator().manual_seed(seed)
    templates = (torch.rand(10, 3, 8, 8, generator=g) * 255).repeat_interleave(4, 2).repeat_interleave(4, 3)
    y = torch.arange(n) % 10
    x = (templates[y] + 40 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 255)
    return x, y


def train_mode_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The loss with the same dropout masks at every call, leaving the training RNG alone."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(123)
        return F.cross_entropy(model(x), y).item()


def sgd_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.SGD(registry.trainable_parameters(model), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def supermask_layers(model: torch.nn.Module) -> list[SupermaskLinear | SupermaskConv]:
    return [m for m in model.modules() if isinstance(m, (SupermaskLinear, SupermaskConv))]


@pytest.mark.parametrize("name", NAMES)
def test_output_shape(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 32, 32)).float()
    assert registry.build(name)(x).shape == (3, 10)
    assert registry.build(name, num_classes=7).eval()(x).shape == (3, 7)


@pytest.mark.parametrize("name", NAMES)
def test_loss_goes_down_on_a_fixed_batch(name: str) -> None:
    torch.manual_seed(0)
    model = registry.build(name).train()
    x, y = synthetic_batch()
    before = train_mode_loss(model, x, y)
    sgd_steps(model, x, y, steps=12, lr=registry.get(name).recipe.lr)
    after = train_mode_loss(model, x, y)
    # A modest bar: cnn keeps PyTorch's default init (it learned CIFAR-10 faster than He init),
    # whose first steps are a slow plateau (2.30 -> 2.19 here); the others fall far more.
    assert math.isfinite(after) and after < 0.97 * before, (before, after)


def test_physics_layer_formula_and_gradients() -> None:
    torch.manual_seed(0)
    layer = PhysicsLayer(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        layer.forces.copy_(torch.arange(5.0).view(1, 5, 1, 1))
        f = [0.0, 1.0, 2.0, 3.0, 4.0]
        total = torch.tensor([f[c] + f[(c - 1) % 5] + f[(c + 1) % 5] for c in range(5)]).view(1, 5, 1, 1)
        assert torch.allclose(layer(x) - layer.conv(x), layer.strength * total)


def test_physics_forces_and_strength_get_gradients() -> None:
    torch.manual_seed(0)
    layer = PhysicsLayer(3, 4, 3, padding=1)
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    grads = []
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        grads.append((layer.forces.grad.abs().sum().item(), layer.strength.grad.abs().item()))
        opt.step()
    # Step 1: d(loss)/d(strength) = sum(grad_out * forces_total), and the forces start at zero,
    # so only the forces move (their gradient is proportional to strength = 0.1). From step 2
    # the forces are non-zero and strength gets a gradient too.
    assert grads[0][0] > 0 and grads[0][1] == 0
    assert grads[1][0] > 0 and grads[1][1] > 0


def test_physics_alexnet_adds_only_forces_and_strength() -> None:
    torch.manual_seed(0)
    plain = registry.build("alexnet").eval()
    torch.manual_seed(0)
    physics = registry.build("physics_alexnet").eval()
    x = synthetic_batch(n=4)[0]
    features = torch.nn.Sequential(*list(plain)[:-1])(x)  # (the last layer starts at zero)
    assert features.abs().sum() > 0, "features before the zero-initialised last layer"
    assert torch.equal(features, torch.nn.Sequential(*list(physics)[:-1])(x)), "same seed, same start"
    convs = [m for m in physics.modules() if isinstance(m, PhysicsLayer)]
    assert len(convs) == 5
    extra = sum(layer.forces.numel() + 1 for layer in convs)
    assert registry.count_parameters(physics)[0] == registry.count_parameters(plain)[0] + extra


@pytest.mark.parametrize("name", ["supermask_fc", "supermask_conv"])
def test_supermask_trains_only_scores(name: str) -> None:
    torch.manual_seed(0)
    model = registry.build(name).train()
    layers = supermask_layers(model)
    assert [id(p) for p in registry.trainable_parameters(model)] == [id(m.scores) for m in layers]
    weights = [m.weight.clone() for m in layers]
    scores = [m.scores.clone() for m in layers]
    params = {n: p.clone() for n, p in model.named_parameters()}
    x, y = synthetic_batch(n=20)
    sgd_steps(model, x, y, steps=2, lr=0.1)
    for m, w, s in zip(layers, weights, scores):
        assert torch.equal(m.weight, w)
        assert not torch.equal(m.scores, s)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, params[n])}
    assert changed == {n for n in params if n.endswith("scores")}


@pytest.mark.parametrize("name", ["supermask_fc", "supermask_conv"])
def test_supermask_keeps_top_half_and_last_layer_whole(name: str) -> None:
    torch.manual_seed(0)
    model = registry.build(name)
    sgd_steps(model, *synthetic_batch(n=20), steps=2, lr=0.1)
    *hidden, last = supermask_layers(model)
    for m in hidden:
        mask, n = top_k_mask(m.scores.abs(), m.k).flatten(), m.scores.numel()
        assert m.k == 0.5 and mask.sum().item() == math.ceil(n / 2)
        assert mask[m.scores.abs().flatten().topk(math.ceil(n / 2)).indices].all()
    assert last.k == 1 and top_k_mask(last.scores.abs(), last.k).sum().item() == last.scores.numel()


def test_supermask_weights_are_signed_constants_and_no_biases() -> None:
    torch.manual_seed(0)
    for m in supermask_layers(registry.build("supermask_conv")) + supermask_layers(registry.build("supermask_fc")):
        fan_in = m.weight[0].numel()
        assert m.bias is None
        assert torch.allclose(m.weight.abs(), torch.full_like(m.weight, math.sqrt(2 / (m.k * fan_in))))


def test_supermask_forward_uses_masked_weights_and_straight_through_grads() -> None:
    torch.manual_seed(0)
    layer = SupermaskLinear(12, 6)
    x = torch.randn(4, 12)
    mask = top_k_mask(layer.scores.abs(), 0.5)
    out = layer(x)
    assert torch.allclose(out, F.linear(x, layer.weight * mask))
    out.square().sum().backward()
    g = layer.scores.grad
    # straight-through: the gradient reaches every score, pruned weights included
    assert (g[mask == 0] != 0).any() and (g[mask == 1] != 0).any()
    expected = (2 * out).t() @ x * layer.weight * layer.scores.sign()
    assert torch.allclose(g, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["supermask_fc", "supermask_conv"])
def test_supermask_model_score_grads_nonzero(name: str) -> None:
    torch.manual_seed(0)
    model = registry.build(name)
    x, y = synthetic_batch(n=20)
    F.cross_entropy(model(x), y).backward()
    for m in supermask_layers(model):
        assert m.scores.grad is not None and m.scores.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [n for n in NAMES if registry.get(n).browser is None])
def test_training_step_traces_into_exportable_ops(name: str) -> None:
    """make_fx of forward + backward + update (the first stage of the ONNX step export) works,
    and every conv / max-pool in it is of the kinds the export's decompositions handle (for the models the
    models a browser may train: ``ModelSpec.browser`` says why airbench is not one)."""
    torch.manual_seed(0)
    model = registry.build(name).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fixed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    fixed |= {n: b.clone() for n, b in model.named_buffers()}  # BN running stats mutate: inputs

    def step(params: list[torch.Tensor], state: dict, x: torch.Tensor, y: torch.Tensor) -> tuple:
        def loss(ps: list[torch.Tensor], st: dict) -> torch.Tensor:
            return F.cross_entropy(functional_call(model, {**st, **dict(zip(names, ps))}, (x,)), y)
        grads, value = grad_and_value(loss)(params, state)
        return value, [p - 0.1 * g for p, g in zip(params, grads)]

    params = [p.detach().clone() for n, p in model.named_parameters() if p.requires_grad]
    x, y = synthetic_batch(n=2)
    graph = make_fx(step)(params, fixed, x, y).graph
    aten = torch.ops.aten
    targets = [node.target for node in graph.nodes]
    for node in graph.nodes:
        if node.target == aten.convolution.default:
            stride, _, dilation, transposed, _, groups = node.args[3:]
            assert (stride, dilation, transposed, groups) == ([1, 1], [1, 1], False, 1)
        if node.target == aten.max_pool2d_with_indices.default:
            kernel, stride = node.args[1], node.args[2] if len(node.args) > 2 else []
            assert list(kernel) == [2, 2] and list(stride) in ([], [2, 2])
            h, w = node.args[0].meta["val"].shape[2:]
            assert h % 2 == 0 and w % 2 == 0
    assert not [t for t in targets if re.search(r"adaptive|avg_pool|scatter|sort|index_put", str(t))]


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'; expected one of: " + ", ".join(NAMES)):
        registry.get("vgg")
    with pytest.raises(ValueError):
        registry.build("vgg")


def test_specs_are_complete() -> None:
    assert set(NAMES) == {"cnn", "alexnet", "physics_alexnet", "supermask_fc", "supermask_conv", "resnet_fast",
                          "airbench"}
    for name, spec in registry.MODELS.items():
        assert spec.name == name and spec.kind in ("dense", "supermask") and spec.description
        assert spec.kind == ("supermask" if name.startswith("supermask") else "dense")
    with pytest.raises(ValueError, match="kind"):
        registry.ModelSpec("x", registry.build, registry.get("cnn").recipe, "sparse", "")


def test_parameter_counts_by_hand() -> None:
    fc_weights = 3072 * 200 + 3 * 200 * 200 + 200 * 10  # no biases; scores mirror weights
    assert registry.count_parameters(registry.build("supermask_fc")) == (2 * fc_weights, fc_weights)
    convs = (3 * 32 + 32 * 32) * 9 + 32 + 32 + (32 * 64 + 64 * 64) * 9 + 64 + 64
    cnn = convs + 4096 * 512 + 512 + 512 * 10 + 10
    assert registry.count_parameters(registry.build("cnn")) == (cnn, cnn)


def test_crowdtrain_models_lists_every_model_with_counts() -> None:
    out = subprocess.run([str(ROOT / ".venv/bin/crowdtrain"), "models"], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=120).stdout
    for name in NAMES:
        row = re.search(rf"^{name}\s+(dense|supermask)\s+([\d,]+)\s+([\d,]+)\s+\S", out, re.M)
        assert row, f"{name} missing from:\n{out}"
        counts = tuple(int(c.replace(",", "")) for c in row.group(2, 3))
        assert counts == registry.count_parameters(registry.build(name))


def test_airbench_whitening_filters_decorrelate_the_patches_they_were_set_from() -> None:
    """``init_from_data``: the first 12 filters map 2x2 patches to components of covariance ~identity
    (scaled by lambda / (lambda + eps)), the other 12 are their negatives; deterministic given the images."""
    from models.airbench import WHITEN_EPS

    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (64, 3, 8, 8), generator=gen).float()
    x = torch.nn.functional.interpolate(base, size=32, mode="bilinear").round().clamp(0, 255).to(torch.uint8)
    model = registry.build("airbench")
    assert torch.count_nonzero(model.whiten.weight) > 0   # a random stem before
    model.init_from_data(x)
    w = model.whiten.weight.detach()
    assert torch.equal(w[12:], -w[:12]) and not model.whiten.weight.requires_grad
    patches = model.normalize(x.float()).unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    out = patches.double() @ w[:12].reshape(12, 12).double().T
    cov = out.T @ out / len(out)
    values = torch.linalg.eigvalsh((patches.double().T @ patches.double()) / len(out)).flip(0)
    assert torch.allclose(cov, torch.diag(values / (values + WHITEN_EPS)), atol=1e-4)
    again = registry.build("airbench")
    again.init_from_data(x)
    assert torch.equal(again.whiten.weight, model.whiten.weight)


def test_airbench_decays_its_shifts_and_trains_its_whitening_bias_for_three_epochs_only() -> None:
    """airbench94's optimizer: batch-norm shifts and the whitening bias decayed like the kernels, the
    bias frozen after ``WHITEN_BIAS_EPOCHS``; other models decay no 1-D parameter."""
    from models.airbench import WHITEN_BIAS_EPOCHS
    from models.train import make_optimizer, sgd_step

    model = registry.build("airbench")
    recipe = registry.get("airbench").recipe
    opt = make_optimizer(model, recipe)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    shifts = {n for n in names.values() if n.endswith(".shift")}
    assert len(shifts) == 6 and shifts | {"whiten.bias"} <= decayed
    assert {"head.weight", "groups.0.layers.0.weight"} <= decayed and "whiten.weight" not in decayed
    plain_model = registry.build("resnet_fast")
    plain_opt = make_optimizer(plain_model, registry.get("resnet_fast").recipe)
    assert all(p.ndim > 1 for g in plain_opt.param_groups if g["weight_decay"] > 0 for p in g["params"])
    x, y = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(1, WHITEN_BIAS_EPOCHS + 2):
        model.start_epoch(epoch)
        before = model.whiten.bias.detach().clone()
        sgd_step(model, opt, x, y, recipe, 0.1, gen)
        moved = not torch.equal(before, model.whiten.bias)
        assert moved == (epoch <= WHITEN_BIAS_EPOCHS), epoch


def test_shift_norm_trains_its_shift_as_batch_norm_at_64_times_the_lr_and_lookahead_and_tta() -> None:
    from models.airbench import SHIFT_GAIN, ShiftNorm
    from models.train import Lookahead, evaluate, tta_logits

    torch.manual_seed(0)
    shifted, plain = ShiftNorm(4), torch.nn.BatchNorm2d(4, momentum=0.4, eps=1e-12)
    plain.weight.requires_grad_(False)
    opts = [torch.optim.SGD([shifted.shift], lr=0.01, momentum=0.85, nesterov=True),
            torch.optim.SGD([plain.bias], lr=0.01 * SHIFT_GAIN ** 2, momentum=0.85, nesterov=True)]
    for _ in range(3):
        x, r = torch.randn(8, 4, 5, 5), torch.randn(8, 4, 5, 5)
        for module, opt in zip((shifted, plain), opts):
            opt.zero_grad()
            ((module(x) + 0.5) ** 2 * r).sum().backward()
            opt.step()
    assert torch.allclose(SHIFT_GAIN * shifted.shift, plain.bias, atol=1e-5)
    assert torch.count_nonzero(plain.bias) == 4
    model = registry.build("airbench")
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 1 and not n.endswith("shift")
                and n != "whiten.bias"]   # batch norm: no scale, only shifts
    # lookahead: none at progress 0 (the model stays), a trailing average later (the model moves back)
    la = Lookahead(model)
    head = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    la.update(model, 0.0)
    assert torch.allclose(model.head.weight, head + 1.0)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    la.update(model, 1.0)
    decay = 0.95 ** Lookahead.EVERY
    assert torch.allclose(model.head.weight, head + 1.0 + (1 - decay), atol=1e-6)
    # test-time augmentation: level 1 is the mean over the image and its mirror
    model.eval()
    xf = torch.randint(0, 256, (8, 3, 32, 32)).float()
    with torch.no_grad():
        assert torch.allclose(tta_logits(model, xf, 1), 0.5 * (model(xf) + model(xf.flip(3))), atol=1e-5)
        padded = torch.nn.functional.pad(xf, (1, 1, 1, 1), mode="replicate")
        views = [xf, padded[:, :, :32, :32], padded[:, :, 2:, 2:]]
        mirrored = [0.5 * (model(v) + model(v.flip(3))) for v in views]
        assert torch.allclose(tta_logits(model, xf, 2), 0.5 * mirrored[0] + 0.25 * (mirrored[1] + mirrored[2]),
                              atol=1e-5)
    # one evaluation gives the accuracy with test-time augmentation and without (from its first view)
    y = torch.randint(0, 10, (8,))
    x_u8 = xf.to(torch.uint8)
    _, with_tta, plain = evaluate(model, x_u8, y, batch=3, tta=2, with_plain=True)
    assert (with_tta, plain) == (evaluate(model, x_u8, y, tta=2)[1], evaluate(model, x_u8, y)[1])
