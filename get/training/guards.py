"""The non-finite update guard: skip an update whose loss or gradient is NaN/inf, stop after too many in a row."""

from __future__ import annotations

from get.training.cli import UserError


class TrainingDivergedError(UserError, RuntimeError):
    """Training stopped after too many non-finite updates in a row (the scripts end with its one-line message)."""


class NonFiniteGuard:
    """Counts skipped non-finite updates of one kind; raises TrainingDivergedError after `max_in_row` in a row.

    The loop asks `check(ok, step)` after computing the loss and gradient norm and before the optimiser step: on False
    it skips the optimiser and EMA updates. A loop with several updates per step (train_dmd.py's generator and critic)
    keeps one guard per update, so that one update's good steps do not hide the other's failures.

    Args:
        max_in_row: how many non-finite updates in a row stop the run.
        what: the updates counted, in messages ("steps", "generator updates", ...).
    """

    def __init__(self, max_in_row: int = 10, what: str = "steps"):
        if max_in_row < 1:
            raise ValueError(f"max_in_row must be at least 1, got {max_in_row}")
        self.max_in_row, self.what = max_in_row, what
        self.in_row = 0
        self.total = 0

    def check(self, ok: bool, step: int) -> bool:
        """Records one update's finiteness; returns `ok`; raises once `max_in_row` bad updates follow each other."""
        if ok:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            raise TrainingDivergedError(
                f"{self.in_row} non-finite {self.what} in a row (the last at step {step}, {self.total} in all): "
                f"stopping (--max-nonfinite {self.max_in_row}). The last good checkpoint is kept; check the pairs "
                f"(--data) for NaN/inf, or resume with a lower learning rate, --clip-grad, or without --bf16")
        return False

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.in_row, self.total = int(state["in_row"]), int(state["total"])
