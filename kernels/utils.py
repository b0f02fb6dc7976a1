"""Shared helpers for the Triton ops: interpreter detection, input checks, output allocation, op registration.

Every output buffer a kernel writes is allocated with `empty`, so the tests can switch on `poison_outputs()` and
have any element a kernel forgot to write show up as NaN.
"""

import contextlib

import torch
import triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Programs per SM for the persistent reduction grids (LayerNorm and bias-GELU backward).
PROGRAMS_PER_SM = 4
# Stand-in "SM count" for the interpreter: programs run one after another there, so only their number matters.
INTERPRETER_SMS = 2


@triton.jit
def _probe(x):
    pass


# triton.jit picks the interpreter when it decorates (TRITON_INTERPRET=1 must be set before triton is imported), so
# the type of a jitted function says which mode every kernel of this package was built in.
INTERPRET = type(_probe).__name__ == "InterpretedFunction"

POISON_OUTPUTS = False

try:  # torch >= 2.6: ops visible to torch.compile (Inductor sees through them) and safe in CUDA graphs
    from torch.library import triton_op as _triton_op
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # older torch: plain Python functions launching the kernels directly
    _triton_op = None
    _wrap_triton = None


def register_op(name: str):
    """Decorator registering a launcher as the torch.library op `get_kernels::<name>` (no mutated arguments).

    Falls back to the undecorated launcher when this torch has no `torch.library.triton_op`.
    """
    if _triton_op is None:
        return lambda fn: fn
    return _triton_op(f"get_kernels::{name}", mutates_args=())


def launcher(kernel):
    """The kernel as launched from inside a registered op: `launcher(kernel)[grid](...)`."""
    return kernel if _wrap_triton is None else _wrap_triton(kernel)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Within the block, `empty` fills new buffers with NaN so that unwritten elements are caught by tests."""
    global POISON_OUTPUTS
    previous, POISON_OUTPUTS = POISON_OUTPUTS, enabled
    try:
        yield
    finally:
        POISON_OUTPUTS = previous


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer: uninitialised, or all NaN under `poison_outputs()`."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_inputs(op: str, **tensors: torch.Tensor | None) -> None:
    """Clear errors for tensors the kernels cannot take: wrong dtype, mixed devices, CPU without the interpreter.

    Args:
        op: name of the op, used in the messages.
        **tensors: the tensor arguments by name; None entries (absent optional inputs) are skipped.
    """
    given = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in given.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")
    for name, t in given.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if INTERPRET and t.dtype == torch.bfloat16:
            raise TypeError(
                f"{op}: {name} is bfloat16, which the Triton interpreter computes wrongly (its bf16 dot and casts are "
                "broken); use float32/float16 on CPU, or backend='torch'"
            )
    device = devices.pop() if devices else None
    if device is not None and device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"{op}: the Triton kernels need CUDA tensors, got {device}; run them on a GPU, use backend='torch', or set "
            "TRITON_INTERPRET=1 before importing triton to run them (slowly) in the Triton interpreter"
        )


def reduction_grid(M: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """Persistent grid over M rows for per-program partial sums: (num_programs, rows_per_program).

    A few waves of programs, each owning a contiguous range of whole row tiles; trailing programs may own no rows
    (they write zero partials). Kept to one level of integer division, so symbolic shapes stay cheap to trace.
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else INTERPRETER_SMS
    num_programs = max(1, min(triton.cdiv(M, block_m), PROGRAMS_PER_SM * sms))
    return num_programs, triton.cdiv(triton.cdiv(M, num_programs), block_m) * block_m


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n. Comparisons only, so a symbolic n under torch.compile becomes simple guards."""
    p = 1
    while p < n:
        p *= 2
    return p


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision for fp32 operands: TF32 where torch allows it for CUDA matmuls, else exact IEEE fp32.

    Read through torch's newer per-backend setting where it exists: once a program has mixed the legacy switches
    (`allow_tf32`, `set_float32_matmul_precision`) with the new ones, torch refuses to answer through the legacy
    getters, while `matmul.fp32_precision` always answers ('none' = inherit the global `torch.backends` setting).
    """
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    mode = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if mode is None:  # torch without the per-backend setting
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if mode == "none":
        mode = getattr(torch.backends, "fp32_precision", "ieee")
    return "tf32" if mode == "tf32" else "ieee"


def row_block(block_d: int, max_elements: int = 4096, max_rows: int = 16) -> int:
    """Rows per tile so that a (rows, block_d) tile holds about `max_elements` elements (a power of two)."""
    return max(1, min(max_rows, max_elements // block_d))


def warps_for(elements: int) -> int:
    """num_warps for a memory-bound tile of `elements` elements: about 16 elements per thread, 4 to 16 warps."""
    return max(4, min(16, triton.next_power_of_2(elements // 512)))


__all__ = [
    "INTERPRET",
    "SUPPORTED_DTYPES",
    "check_inputs",
    "dot_precision",
    "empty",
    "launcher",
    "pow2_at_least",
    "reduction_grid",
    "poison_outputs",
    "register_op",
    "row_block",
    "warps_for",
]
