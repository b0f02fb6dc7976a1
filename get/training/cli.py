"""What the command lines (train/train_get.py, train/train_dmd.py, train/sample.py) share: the common options, their
range checks, and how a user error ends a script (one line naming the flag, file or value; no traceback)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from get import dist
from get.seeds import parse_seeds


class UserError(Exception):
    """A problem the user must fix (an option, a file, the data, a resume); the scripts print its message as one line
    and exit with status 1. Its message names the flag, file or value."""


@dataclass(frozen=True)
class Range:
    """An allowed interval of a numeric option; NaN and inf are never allowed. `None` ends are open to infinity."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    kind: str = "a finite number"  # how the message names the values

    def __contains__(self, value) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{self.kind} {'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


POSITIVE_INT = Range(1, kind="an integer")
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
UNIT = Range(0, 1, high_open=True)  # [0, 1): decays and Adam's betas

# The shared options' ranges (plus --bs, --steps, --ema, which every training script has).
COMMON_RANGES = {
    "bs": POSITIVE_INT, "steps": POSITIVE_INT, "ema": UNIT, "beta1": UNIT, "beta2": UNIT, "eps": POSITIVE,
    "seed": NON_NEGATIVE, "max_nonfinite": POSITIVE_INT, "log_every": POSITIVE_INT, "sample_every": POSITIVE_INT,
    "ckpt_every": POSITIVE_INT, "keep": POSITIVE_INT, "nproc": POSITIVE_INT,
}


def add_common_arguments(p, sample_every: int, ckpt_every: int) -> None:
    """Command-line options every training script shares: AdamW betas/eps, seed, TF32, the non-finite guard,
    outputs and processes (train_get.py and train_dmd.py add their own around them)."""
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls (paper: on)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-nonfinite", type=int, default=10,
                   help="stop after this many non-finite updates in a row (counted per update kind)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume on another pair set than the checkpoint's (its size and shapes must still fit)")
    # Outputs.
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--sample-every", type=int, default=sample_every)
    p.add_argument("--ckpt-every", type=int, default=ckpt_every)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (the newest)")
    p.add_argument("--grid-seeds", type=str, default="0-63", help="seeds of the sample grid (EDM syntax)")
    # Processes.
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--nproc", type=int, default=None, help="local worker processes to start (default: torchrun's)")


def check_ranges(p, args, ranges: Mapping[str, Range]) -> None:
    """Refuses (parser error naming the flag and value) a numeric option outside its range; None means unset."""
    for name, allowed in ranges.items():
        value = getattr(args, name)
        if value is not None and value not in allowed:
            p.error(f"--{name.replace('_', '-')} must be {allowed}, got {value}")


def check_seeds_option(p, flag: str, value: str) -> None:
    """A seed list option (EDM syntax) parses and is not empty; checked at start-up, not when first used."""
    try:
        if not parse_seeds(value):
            p.error(f"{flag} {value!r}: no seeds")
    except ValueError as e:
        p.error(f"{flag} {value!r}: {e}")


def check_common_arguments(p, args) -> None:
    """Validates the shared options (and --bs, --steps, --ema, which every script has), with parser errors."""
    check_ranges(p, args, COMMON_RANGES)
    check_seeds_option(p, "--grid-seeds", args.grid_seeds)


@contextmanager
def blame(what: str):
    """Turns a loader's ValueError / KeyError / OSError (whose messages name the file and key) into a UserError
    prefixed with `what`, the option that gave the file, e.g. ``with blame(f"--data {args.data}"): ...``."""
    try:
        yield
    except (ValueError, KeyError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e  # KeyError's str() adds quotes
        raise UserError(f"{what}: {message}") from e


def run_script(main: Callable, parse_args: Callable) -> None:
    """A script's entry point: parse, run on --nproc processes (get.dist.launch), and end a UserError with one line
    on stderr and exit status 1 (GET_TRACEBACK=1 shows the traceback instead, for debugging). A UserError in a
    worker that --nproc spawned comes back as dist.WorkerError with its message, printed once the same way."""
    args = parse_args()
    try:
        dist.launch(main, args.nproc, args, user_errors=(UserError,))
    except (UserError, dist.WorkerError) as e:
        if os.environ.get("GET_TRACEBACK") == "1":
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(1)
