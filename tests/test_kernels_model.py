"""A small GET on the Triton backend equals the torch backend (Triton interpreter without a GPU).

Both fp32 models are judged against a float64 copy on the torch backend: the Triton model's error on the images and
on every parameter gradient must be at most 2x the fp32 torch model's (plus a small floor).
"""

import copy

import pytest
import torch

import get_kernels
from get.models import GET_models
from get_kernels import reference, utils
from get_kernels.testing import assert_matches_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs():
    with utils.poison_outputs():
        yield


def make_models(**kwargs):
    """Triton fp32, torch fp32 and torch float64 copies of one GET-XS/2 (d = 64) with every weight randomised."""
    model = GET_models["GET-XS/2"](input_size=8, num_classes=3, backend="torch", **kwargs)  # N = 16 tokens
    with torch.no_grad():
        for p in model.parameters():  # off the zero/identity init, so every op matters to the output
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model = model.to(DEVICE)
    triton_model = copy.deepcopy(model)
    triton_model.backend = "triton"
    return triton_model, model, copy.deepcopy(model).double()


def check_models_agree(run, models):
    """run(model, dtype) -> tensor to differentiate; compares it and all parameter gradients across the models."""
    results = []
    for model, dtype in zip(models, (torch.float32, torch.float32, torch.float64)):
        out = run(model, dtype)
        out.square().mean().backward()
        results.append([out] + [p.grad for p in model.parameters() if p.requires_grad])
    names = ["output"] + [name for name, p in models[0].named_parameters() if p.requires_grad]
    for name, ours, theirs, ref in zip(names, *results):
        assert_matches_reference(name, ours, theirs, ref, atol=1e-5)


def inputs(dtype):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 3, 8, 8, generator=g).to(DEVICE, dtype)  # (B, C, H, W)
    z0 = torch.randn(2, 16, 128, generator=g).to(DEVICE, dtype)  # (B, N, D)
    return noise, torch.tensor([0, 2], device=DEVICE), z0


def test_training_trajectory_and_gradients_match():
    def run(model, dtype):
        noise, labels, z0 = inputs(dtype)
        return torch.stack(model.train().trajectory(noise, labels, z0=z0))  # (3, B, C, H, W), 3 unrolled steps

    check_models_agree(run, make_models(deq=dict(grad=3)))  # 3 of the paper's 6 steps: the interpreter is slow


def test_evaluation_solve_matches():
    # The relative residual of these random weights falls steadily, so the lowest one is the last iterate: the
    # comparison covers every iteration (with the absolute residual, the first iterate would be selected).
    models = make_models(deq=dict(eval_f_max_iter=4, f_stop_mode="rel"))
    images = []
    for model, dtype in zip(models, (torch.float32, torch.float32, torch.float64)):
        noise, labels, z0 = inputs(dtype)
        with torch.no_grad():
            image, info = model.eval()(noise, labels, z0=z0, return_info=True)  # 4 iterations, lowest residual kept
        images.append(image)
        assert info["nstep"].tolist() == [4, 4]
    assert_matches_reference("images", *images, atol=1e-5)


def test_implicit_differentiation_reuses_the_backward():
    # IFT re-runs vector-Jacobian products of one graph (retain_graph): the backward kernels must be re-entrant.
    deq = dict(ift=True, f_max_iter=2, eval_f_max_iter=2, b_max_iter=3)

    def run(model, dtype):
        noise, labels, z0 = inputs(dtype)
        (image,) = model.train().trajectory(noise, labels, z0=z0)
        return image

    check_models_agree(run, make_models(deq=deq))


def test_backend_dispatch():
    assert get_kernels.default_backend("cpu") == "torch"
    assert get_kernels.default_backend(torch.device("cuda", 0)) == "triton"  # triton imports here
    assert get_kernels.get_ops("torch") is reference
    ops = get_kernels.get_ops("triton")
    assert (ops.attention, ops.layer_norm, ops.bias_gelu) == (
        get_kernels.attention.attention,
        get_kernels.layer_norm.layer_norm,
        get_kernels.gelu.bias_gelu,
    )
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_kernels.get_ops("cuda")
