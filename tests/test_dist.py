"""get.dist: single-process behaviour, refusal of a conflicting --nproc, collectives across spawned workers, and a
worker's user error reported in one line (other failures keep torch's report).

The two-node torchrun case (c10d rendezvous on loopback, --nproc inside each node) runs in tests/test_generate.py.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from get import dist

WORKER = textwrap.dedent("""
    import argparse, json, pathlib
    import torch
    from get import dist

    def main(args):
        device = dist.init("cpu")
        rank, world = dist.get_rank(), dist.get_world_size()
        out = {
            "rank": rank, "world": world, "local": [dist.get_local_rank(), dist.get_local_world_size()],
            "device": str(device), "mean": dist.all_mean(float(rank + 1)),
            "tensor": dist.all_mean(torch.tensor([rank, 10.0 * rank])).tolist(),
            "gathered": dist.all_gather_object({"r": rank}),
            "from_last": dist.broadcast_object(f"hello from {rank}", src=world - 1),
        }
        dist.barrier()
        # One file per rank: lines two processes print to one pipe can interleave.
        (pathlib.Path(__file__).parent / f"result-{rank}.json").write_text(json.dumps(out))
        dist.cleanup()
        return rank + 100

    if __name__ == "__main__":
        p = argparse.ArgumentParser()
        p.add_argument("--nproc", type=int, default=None)
        a = p.parse_args()
        print("RETURNED", dist.launch(main, a.nproc, a), flush=True)
""")


def _identity(args):
    return args


def test_single_process():
    assert dist.launch(_identity, None, "x") == "x" and dist.launch(_identity, 1, "y") == "y"
    assert dist.init("cpu") == torch.device("cpu")
    assert (dist.get_rank(), dist.get_world_size(), dist.get_local_rank(), dist.is_main()) == (0, 1, 0, True)
    t = torch.tensor([1.0, 2.0])
    m = dist.all_mean(t)
    assert torch.equal(m, t) and m is not t and dist.all_mean(3) == 3.0
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}] and dist.broadcast_object(5) == 5
    dist.barrier()
    dist.cleanup()


def test_conflicting_nproc_is_refused(monkeypatch):
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="--nproc 3 conflicts with the 2 processes per node that torchrun"):
        dist.launch(_identity, 3, None)
    assert dist.launch(_identity, 2, "joined") == "joined"  # matching --nproc: this process is already a worker
    with pytest.raises(ValueError, match="--nproc must be >= 1"):
        dist.launch(_identity, 0, None)


def test_spawned_workers(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([sys.executable, str(script), "--nproc", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == 2 for r in results)
    assert [r["local"] for r in results] == [[0, 2], [1, 2]] and all(r["device"] == "cpu" for r in results)
    for r in results:
        assert r["mean"] == 1.5 and r["tensor"] == [0.5, 5.0]
        assert r["gathered"] == [{"r": 0}, {"r": 1}] and r["from_last"] == "hello from 1"
    assert "RETURNED 100" in proc.stdout  # launch returns local rank 0's result


FAILING = textwrap.dedent("""
    import sys
    from get import dist

    def main(mode):
        dist.init("cpu")
        if dist.get_rank() == 1:
            raise (ValueError if mode == "user" else RuntimeError)(f"{mode} error on rank 1")
        dist.barrier()  # rank 0 waits for rank 1, which never comes: the launcher stops it
        return 0

    if __name__ == "__main__":
        try:
            dist.launch(main, 2, sys.argv[1], user_errors=(ValueError,))
        except dist.WorkerError as e:
            sys.exit(f"error: {e}")
""")


def test_worker_errors(tmp_path):
    """A user error in one worker is one line from the launching process; any other failure keeps torch's report."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    user = subprocess.run([sys.executable, str(script), "user"], capture_output=True, text=True, timeout=300)
    assert user.returncode == 1 and user.stderr.splitlines() == ["error: user error on rank 1"], user.stderr[-3000:]
    bug = subprocess.run([sys.executable, str(script), "bug"], capture_output=True, text=True, timeout=300)
    assert bug.returncode == 1 and "ChildFailedError" in bug.stderr and "Traceback" in bug.stderr
    assert "RuntimeError: bug error on rank 1" in bug.stderr
