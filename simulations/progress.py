"""Terminal progress for long runs: one line per round and per unlearning, and a loud warning if the model is not learning."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from fedforget.simulations.config import NUM_CLASSES
from fedforget.simulations.learning import training_problem


class ConsoleObserver:
    """Prints a run's progress as it happens (a :class:`~fedforget.server.rounds.loop.RunObserver`).

    The divergence guard watches every round: the first time the loss is NaN or
    accuracy has stayed near chance for several rounds it says so at once,
    rather than after a run that can take minutes.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self._num_rounds = 0
        self._rounds: list[dict[str, object]] = []
        self._warned = False

    def run_started(self, first_round: int, num_rounds: int) -> None:
        self._num_rounds = num_rounds
        if first_round > 1:
            self.console.print(f"[bold]resuming[/] at round {first_round} of {num_rounds}")
        else:
            self.console.print(f"[bold]training[/] {num_rounds} rounds")

    def round_starting(self, server_round: int) -> None:
        pass

    def round_finished(self, entry: dict[str, object]) -> None:
        accuracy = entry.get("test_accuracy")
        loss = entry.get("test_loss")
        shown = (
            f"test accuracy {accuracy:6.2%}  loss {loss:.4f}" if isinstance(accuracy, float) else ""
        )
        participants = entry.get("participants") or []
        self.console.print(
            f"  round {entry['round']:>3}/{self._num_rounds}  {shown}  "
            f"{len(participants)} clients  {entry.get('seconds', 0.0):.1f} s"  # type: ignore[arg-type]
        )
        self._rounds.append(entry)
        problem = training_problem(self._rounds, NUM_CLASSES)
        if problem is not None and not self._warned:
            self._warned = True
            self.console.print(f"[bold red]WARNING: the model is not learning[/]: {escape(problem)}")

    def unlearning_started(self, clients: Sequence[str], before_round: int, strategy: str) -> None:
        self.console.print(
            f"[bold yellow]withdrawal[/] of client(s) {', '.join(clients)} before round "
            f"{before_round}: unlearning with [bold]{strategy}[/] ..."
        )

    def unlearning_step(self, step: str) -> None:
        self.console.print(f"    {escape(step)}")

    def unlearning_finished(self, event: dict[str, object]) -> None:
        before = event.get("test_accuracy_before")
        after = event.get("test_accuracy_after")
        accuracy = (
            f"test accuracy {before:.2%} -> {after:.2%}, "
            if isinstance(before, float) and isinstance(after, float)
            else ""
        )
        self.console.print(
            f"  unlearned in {event['seconds']:.1f} s ({accuracy}"
            f"{event['rounds_replayed']} rounds replayed, {event['client_epochs']:.0f} client-epochs)"
        )
