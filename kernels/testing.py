"""Accuracy criterion shared by the kernel tests and benchmark checks.

A kernel output is compared with a float64 reference, and its error is judged against the error of the same
computation done by PyTorch in the kernel's own precision (the FlashAttention test criterion, docs/KERNELS.md):

    max|ours - ref64| <= ratio * max|torch_same_precision - ref64| + atol * max(1, max|ref64|)

NaN or inf never passes.
"""

import torch


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max|actual - reference| in float64; inf when actual has a NaN or inf that the reference does not."""
    if actual.shape != reference.shape:
        raise ValueError(f"shape mismatch: {tuple(actual.shape)} vs reference {tuple(reference.shape)}")
    actual, reference = actual.detach().double().cpu(), reference.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return (actual - reference).abs().max().item() if actual.numel() else 0.0


def assert_matches_reference(
    name: str,
    actual: torch.Tensor,
    same_precision: torch.Tensor,
    reference: torch.Tensor,
    ratio: float = 2.0,
    atol: float = 1e-6,
) -> tuple[float, float]:
    """Asserts the criterion above and returns (our error, torch's same-precision error).

    Args:
        name: what is compared, for the message.
        actual: the kernel's output.
        same_precision: PyTorch's output computed in the kernel's input precision.
        reference: the float64 reference.
        ratio: allowed multiple of PyTorch's error.
        atol: floor, relative to max(1, max|reference|), for cases where PyTorch happens to be nearly exact.
    """
    ours = max_error(actual, reference)
    theirs = max_error(same_precision, reference)
    assert theirs < float("inf"), f"{name}: the PyTorch same-precision result is not finite; the case is unusable"
    scale = max(1.0, reference.detach().abs().max().item()) if reference.numel() else 1.0
    bound = ratio * theirs + atol * scale
    assert ours <= bound, (
        f"{name}: max error {ours:.3e} vs float64 exceeds {ratio} x torch's {theirs:.3e} + {atol * scale:.1e}"
    )
    return ours, theirs


def outputs_and_grads(fn, inputs, upstream, dtype=None) -> list[torch.Tensor]:
    """Outputs of fn(*inputs) and the gradients of every tensor input, on fresh leaf copies.

    Args:
        fn: the op; returns a tensor or a tuple of tensors.
        inputs: positional arguments; tensors become leaves (cast to `dtype` when given), None passes through.
        upstream: one gradient per output (cast to each output's dtype).
        dtype: None to keep each input's dtype, e.g. torch.float64 for the reference.

    Returns:
        [*outputs, *input gradients] in argument order.
    """
    leaves = [t if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, upstream)])
    return outs + [t.grad for t in leaves if t is not None]


__all__ = ["assert_matches_reference", "max_error", "outputs_and_grads"]
