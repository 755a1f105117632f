"""The board a pretraining's driver and its Ray Train workers share during one run (a Ray actor).
Kept apart from the training code so that the actor's process imports nothing heavy."""

from __future__ import annotations


class Board:
    """What a pretraining's driver and its training workers tell each other during one Ray Train
    run: rank 0's epochs and finished iterations (the driver takes them), the last iteration the
    driver recorded (where a restarted worker group goes on from) and each next iteration's
    pseudo-labels (the workers wait for them; None: stop)."""

    def __init__(self):
        self._events: list[dict] = []
        self._next: dict[int, str | None] = {}
        self._recorded: tuple[int, str] | None = None

    def record(self, iteration: int, checkpoint: str) -> None:
        self._recorded = (iteration, checkpoint)

    def last_recorded(self) -> tuple[int, str] | None:
        return self._recorded

    def put(self, event: dict) -> None:
        self._events.append(event)

    def take(self) -> list[dict]:
        events, self._events = self._events, []
        return events

    def post(self, iteration: int, labels_path: str | None) -> None:
        self._next[iteration] = labels_path

    def next_labels(self, iteration: int) -> tuple[bool, str | None]:
        return iteration in self._next, self._next.get(iteration)
