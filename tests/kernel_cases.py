"""What the kernel tests share: the device they run on and the dtypes they cover (bf16 only on a GPU)."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=gpu_only)]
