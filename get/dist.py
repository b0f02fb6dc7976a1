"""One small distributed helper (EDM's torch_utils/distributed.py style) that also works as a single process.

Every script calls `launch(main, args.nproc, args)` from its `__main__` block and `init()` at the top of `main`:

- `python script.py` or `torchrun script.py` (one process): runs `main` in this process, no process group.
- `python script.py --nproc N` or `torchrun --nproc-per-node 1 [--nnodes M ...] script.py -- --nproc N`: starts N
  local workers per node through torch's own elastic launcher (`torch.distributed.launcher.api.elastic_launch`, what
  torchrun runs); with M torchrun nodes the N·M workers form one world through a c10d rendezvous. (torchrun's parser
  takes `--nproc` as an abbreviation of its own `--nproc-per-node`; the `--` keeps it for the script.)
- `torchrun --nproc-per-node N script.py`: joins that world; an `--nproc` that is not N is refused.

Backend: nccl on CUDA, gloo on CPU. Rank, world size and local rank come from the environment torchrun sets.

Workers started by `launch` end with their launcher (even one killed by SIGKILL), and a worker stopped by one of the
script's `user_errors` (bad input) is reported once, as `WorkerError` with that error's message, instead of torch's
failure dump.
"""

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid

import torch
import torch.distributed as tdist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

_device: torch.device | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def get_rank() -> int:
    """Global rank of this process (0 as a single process)."""
    return tdist.get_rank() if tdist.is_initialized() else _env_int("RANK", 0)


def get_world_size() -> int:
    """Number of processes in the world (1 as a single process)."""
    return tdist.get_world_size() if tdist.is_initialized() else _env_int("WORLD_SIZE", 1)


def get_local_rank() -> int:
    """Rank of this process on its node."""
    return _env_int("LOCAL_RANK", 0)


def get_local_world_size() -> int:
    """Number of processes on this node."""
    return _env_int("LOCAL_WORLD_SIZE", get_world_size())


def is_main() -> bool:
    """True on global rank 0."""
    return get_rank() == 0


def init(device: str | torch.device | None = None) -> torch.device:
    """Joins the world described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), if any.

    Args:
        device: 'cuda', 'cpu' or None (CUDA when available). On CUDA each process takes the GPU of its local rank.

    Returns:
        The device this process computes on.
    """
    global _device
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("init(device='cuda') but CUDA is not available; use device='cpu'")
        if get_local_rank() >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {get_local_rank()} needs GPU {get_local_rank()}, but only "
                               f"{torch.cuda.device_count()} are visible: start at most that many processes per node")
        device = torch.device("cuda", get_local_rank())
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Processes sharing a node's cores: split them instead of oversubscribing.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // get_local_world_size()))
    _device = device
    if get_world_size() > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend, init_method="env://", device_id=device if backend == "nccl" else None)
    return device


def cleanup() -> None:
    """Leaves the process group (no-op as a single process)."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    """Waits for every rank (no-op as a single process)."""
    if tdist.is_initialized():
        if tdist.get_backend() == "nccl":
            tdist.barrier(device_ids=[get_local_rank()])
        else:
            tdist.barrier()


def all_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over ranks; a float in gives a float out, a tensor a new tensor (the input is not modified)."""
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        if tdist.is_initialized():
            tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
            out /= get_world_size()
        return out
    if not tdist.is_initialized():
        return float(value)
    out = torch.tensor(float(value), dtype=torch.float64, device=_device)
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out.item() / get_world_size()


def all_gather_object(obj) -> list:
    """Every rank's (picklable, trusted: our own ranks) object, in rank order."""
    if not tdist.is_initialized():
        return [obj]
    out = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank src's object on every rank."""
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


class WorkerError(Exception):
    """A worker started by :func:`launch` stopped on one of the ``user_errors``; the message is that error's."""


_USER_ERROR = "get_user_error"  # marks the error files of workers stopped by a user error
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _watch_launcher(launcher_pid: int) -> None:
    while os.getppid() == launcher_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def _follow_launcher(launcher_pid: int) -> None:
    """Ends this worker with SIGTERM when its launcher dies: the launcher's agent, which would stop it, may be gone
    (SIGKILL), and an orphan worker would wait on its rendezvous or peers indefinitely."""
    if sys.platform == "linux":
        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch_launcher, args=(launcher_pid,), daemon=True).start()
    if os.getppid() != launcher_pid:  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


@record
def _worker(main_fn, args, launcher_pid, user_errors):
    _follow_launcher(launcher_pid)
    try:
        return main_fn(args)
    except user_errors as e:
        # No traceback: the launcher raises WorkerError with this message (torch's agent reads the error file).
        path = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if path:
            with open(path, "w") as f:
                json.dump({"message": str(e), "timestamp": int(time.time()), _USER_ERROR: True}, f)
        raise SystemExit(1) from None


@contextlib.contextmanager
def _held_logs(names=("torch.distributed.elastic", "torch.multiprocessing")):
    """Holds the launcher's log records (torch's agent logs every worker failure at length) in a list; the caller
    replays them unless a user error explains the failure."""
    held = []
    handler = logging.Handler()
    handler.emit = held.append
    loggers = [logging.getLogger(name) for name in names]
    propagate = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield held
    finally:
        for logger, value in zip(loggers, propagate):
            logger.removeHandler(handler)
            logger.propagate = value


def _replay(records) -> None:
    for rec in records:
        logging.getLogger(rec.name).handle(rec)


def _nested_rendezvous():
    """c10d rendezvous for N workers per node when torchrun started one process on each of several nodes.

    Node 0 hosts the rendezvous store itself (a torch TCPStore on a free port) so that it outlives every node's
    rendezvous shutdown; the outer world (one process per node) joins a gloo group to learn the port, and keeps it
    to wait for every node at the end.

    Returns:
        (endpoint 'host:port', number of nodes, the store on node 0 or None: keep it alive until the end).
    """
    host = os.environ["MASTER_ADDR"]
    store = tdist.TCPStore(host, 0, is_master=True, multi_tenant=True) if get_rank() == 0 else None
    tdist.init_process_group(backend="gloo", init_method="env://")
    port = broadcast_object(store.port if store is not None else None)
    return f"{host}:{port}", get_world_size(), store


def launch(main_fn, nproc: int | None, args, user_errors: tuple[type[BaseException], ...] = ()):
    """Runs `main_fn(args)` in every worker; returns this process's result, or that of local rank 0 when it spawned.

    Args:
        main_fn: a module-level function (workers are spawned and import it); it calls `init()` itself.
        nproc: local workers per node wanted (the script's --nproc), or None to take what the launcher gave.
        args: picklable arguments (an argparse.Namespace).
        user_errors: exception types that mean bad input (the user's to fix). In spawned workers they end the worker
            without a traceback, and this process raises WorkerError with the first one's message; as a single
            process or under torchrun they propagate unchanged.

    Raises:
        ValueError: nproc < 1, or nproc conflicts with the number of local processes torchrun already started.
        WorkerError: a spawned worker stopped on one of ``user_errors``.
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError: a worker failed otherwise (the root cause
            is printed).
    """
    local_world = get_local_world_size()
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if nproc is None or nproc == local_world:
        return main_fn(args)
    if local_world > 1:
        raise ValueError(
            f"--nproc {nproc} conflicts with the {local_world} processes per node that torchrun already started; "
            f"drop --nproc or pass --nproc {local_world} (or start torchrun with --nproc-per-node 1)"
        )
    nested = get_world_size() > 1
    if nested:
        endpoint, nnodes, store = _nested_rendezvous()  # noqa: F841 (store: held until the end)
        run_id = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'get')}-nproc{nproc}"
    else:
        endpoint, nnodes, run_id = "127.0.0.1:0", 1, str(uuid.uuid4())
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        rdzv_configs={"is_host": False} if nested else {},
        max_restarts=0,
        start_method="spawn",
    )
    logs, quiet = [], False
    try:
        with _held_logs() as logs:
            try:
                # {global rank: result} of this node's workers
                results = elastic_launch(config, _worker)(main_fn, args, os.getpid(), tuple(user_errors))
            except ChildFailedError as e:
                causes = sorted((f.timestamp, rank, f.message) for rank, f in e.failures.items()
                                if isinstance(f.error_file_data, dict) and f.error_file_data.get(_USER_ERROR))
                if not causes:
                    raise
                quiet = True  # the user error explains the failure: the other workers were stopped because of it
                raise WorkerError(causes[0][2]) from None
        if nested:  # node 0's store (alive until here) must outlive the other nodes' rendezvous shutdown
            tdist.barrier()
    finally:
        if not quiet:
            _replay(logs)
        if nested:
            tdist.destroy_process_group()
    return results[min(results)]
