"""The non-finite step guard: skip a step whose loss or gradient is NaN/inf, stop after too many in a row."""

from __future__ import annotations


class TrainingDivergedError(RuntimeError):
    """Training stopped after too many non-finite steps in a row."""


class NonFiniteGuard:
    """Counts skipped non-finite steps; raises TrainingDivergedError after `max_in_row` in a row.

    The loop asks `check(ok, step)` after computing the loss and gradient norm and before the optimiser step: on False
    it skips the optimiser and EMA updates for that step.
    """

    def __init__(self, max_in_row: int = 10):
        if max_in_row < 1:
            raise ValueError(f"max_in_row must be at least 1, got {max_in_row}")
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def check(self, ok: bool, step: int) -> bool:
        """Records one step's finiteness; returns `ok`; raises once `max_in_row` bad steps follow each other."""
        if ok:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            raise TrainingDivergedError(
                f"{self.in_row} non-finite steps in a row (the last at step {step}, {self.total} in all): stopping. "
                f"The last good checkpoint is kept; resume from it with a lower learning rate, --clip-grad, "
                f"or without --bf16")
        return False

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.in_row, self.total = int(state["in_row"]), int(state["total"])
