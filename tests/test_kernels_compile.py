"""The kernels compile for the H100 (sm_90) and trace through torch.compile, without a GPU.

The interpreter cannot see what only the GPU compiler sees (Triton lowering errors, shared-memory overflow, spills),
nor how torch.compile captures the ops. Run as a script in a subprocess without TRITON_INTERPRET (so the kernels are
real JITFunctions), standing in a target-only driver when no GPU is present, this file
- traces a block using all three ops through Dynamo and AOTAutograd (static and dynamic shapes), with compilers that
  only count the Triton kernels Inductor would receive in the forward and backward graphs (nothing runs);
- compiles each launch the launchers make for GET-B/2 inputs for sm_90, with Triton's real argument specialisation
  (`JITFunction.warmup`), using the ptxas and cuobjdump bundled in Triton's wheel, and prints each cubin's resources.
"""

import os
import re
import subprocess
import sys
from contextlib import nullcontext

import pytest

SM90_SHARED_BYTES = 232448  # 227 KB per block on an H100


def launches():
    """(kernel, grid, args, kwargs) of every launch our launchers make for GET-B/2-like inputs, without running."""
    import torch

    import get_kernels.attention as attention
    import get_kernels.gelu as gelu
    import get_kernels.layer_norm as layer_norm

    recorded = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: recorded.append((self.kernel, grid, args, kwargs))

    for module in (attention, layer_norm, gelu):
        module.launcher = Recorder
        module.check_inputs = lambda *args, **kwargs: None  # CPU (and bf16) stand-ins for CUDA tensors
    torch.set_float32_matmul_precision("highest")  # fp32 attention compiles its exact-IEEE dot variant
    for dtype in (torch.bfloat16, torch.float32):
        qkv = torch.empty(128, 256, 3, 12, 64, dtype=dtype)  # GET-B/2 attention input, never touched
        o, lse = torch.empty(128, 256, 768, dtype=dtype), torch.empty(128, 12, 256)
        attention.attention_fwd(qkv, 0.125)
        attention.attention_bwd(o, qkv, o, lse, 0.125)
    x, w = torch.empty(128 * 256, 768, dtype=torch.bfloat16), torch.empty(768)
    mean = torch.empty(128 * 256)
    layer_norm.add_layer_norm_fwd(x, x, w, w, 1e-6)
    layer_norm.layer_norm_bwd(x, x, x, w, mean, mean)
    h = torch.empty(128 * 256, 3072, dtype=torch.bfloat16)
    gelu.bias_gelu_fwd(h, torch.empty(3072))
    gelu.bias_gelu_bwd(h, h, torch.empty(3072))
    return recorded


def trace_block() -> None:
    """Prints how many Triton kernels the forward and backward graphs of a compiled block hold."""
    import torch
    import torch._functorch.config as functorch_config
    from torch._dynamo.backends.common import aot_autograd

    import get_kernels.utils
    from get_kernels import get_ops

    get_kernels.utils.INTERPRET = True  # lets CPU tensors stand in for CUDA ones; nothing is launched
    ops = get_ops("triton")
    graphs = []

    class Captured(Exception):
        pass

    def capture(gm, example_inputs):
        graphs.append(sum("triton_kernel_wrapper_functional" in str(node.target) for node in gm.graph.nodes))

        def never_run(*args):
            raise Captured

        return never_run

    def block(x, weight, bias, w_qkv, w_fc1, b_fc1):
        B, N, D = x.shape
        h, s = ops.layer_norm(x, weight, bias, residual=2 * x)
        a = ops.attention((h @ w_qkv).view(B, N, 3, 2, D // 2))  # (B, N, D)
        return ops.bias_gelu(a @ w_fc1, b_fc1) + s.sum()

    shapes = [(2, 16, 64), (64,), (64,), (64, 192), (64, 256), (256,)]
    args = [torch.randn(shape, requires_grad=True) for shape in shapes]
    # Lower the backward graph at compile time rather than at the first backward (a private switch; if this torch
    # lacks it, only the forward graph is counted).
    eager_backward = hasattr(functorch_config, "force_non_lazy_backward_lowering")
    for dynamic in (False, True):
        graphs.clear()
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, dynamic=dynamic,
                                 backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))  # fmt: skip
        with functorch_config.patch(force_non_lazy_backward_lowering=True) if eager_backward else nullcontext():
            try:
                compiled(*args)
            except Captured:
                pass
        print(f"traced dynamic={dynamic} forward={graphs[0]} backward={graphs[1] if eager_backward else 'n/a'}")


def main() -> None:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    if not torch.cuda.is_available():

        class TargetOnlyDriver:  # what JITFunction.warmup asks of a driver to compile (not to launch)
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

        driver.set_active(TargetOnlyDriver())
    trace_block()
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for kernel, grid, args, kwargs in launches():
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        with open("kernel.cubin", "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", "kernel.cubin"], capture_output=True, text=True, check=True)
        stack = int(usage.stdout.split("STACK:")[1].split()[0])
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
        print(f"{kernel.__name__} {dtype} shared={compiled.metadata.shared} stack={stack}", flush=True)


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this triton has no bundled CUDA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run([sys.executable, __file__], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.split("\n")[:-1]
    for dynamic in (False, True):  # forward: LN, attention, GELU; backward: LN, attention (2 kernels), GELU
        assert re.search(rf"^traced dynamic={dynamic} forward=3 backward=(4|n/a)$", result.stdout, re.M), result.stdout
    lines = [line for line in lines if not line.startswith("traced")]
    names = {line.split()[0] for line in lines}
    assert names == {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_kernel", "_layer_norm_fwd_kernel",
                     "_layer_norm_bwd_kernel", "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel"}  # fmt: skip
    for line in lines:
        fields = dict(item.split("=") for item in line.split()[2:])
        assert int(fields["shared"]) <= SM90_SHARED_BYTES, line
        assert int(fields["stack"]) == 0, f"register spills: {line}"


if __name__ == "__main__":
    main()
