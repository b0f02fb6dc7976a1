import contextlib
import os
import resource
import signal

# Tests run tiny tensors: one intra-op thread avoids OpenMP synchronisation stalls on a 2-core machine (up to 40x
# slower with 2 threads when the machine is busy), and subprocesses (DDP tests) inherit it. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Without a GPU the Triton kernels run in the interpreter; it must be switched on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison_kernel_outputs():
    """Kernel outputs allocated as NaN for the test's duration (get_kernels.utils.empty), so unwritten tiles fail."""
    from get_kernels import utils

    with utils.poison_outputs():
        yield


@pytest.fixture
def fails_fast():
    """``with fails_fast(seconds, max_mb):`` the block must end within ``seconds`` (SIGALRM) and raise this process's
    peak memory by less than ``max_mb``: crafted files must be refused before their claimed sizes cost anything."""

    @contextlib.contextmanager
    def guard(seconds: int = 10, max_mb: int = 1024):
        def timeout(signum, frame):
            raise TimeoutError(f"still running after {seconds} s")

        previous = signal.signal(signal.SIGALRM, timeout)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
        assert grown < max_mb, f"peak memory grew by {grown:.0f} MB"

    return guard
