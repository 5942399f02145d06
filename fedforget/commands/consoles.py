"""Terminal output that a person can read, on a terminal or in a log file.

Rich wraps at 80 columns when its output is not a terminal, which splits table
headers and breaks sentences mid-line in logs and pipes. These consoles never
wrap a line themselves: on a terminal the terminal folds long lines, and when
piped every line arrives whole.
"""

from __future__ import annotations

from rich.console import Console

PIPED_WIDTH = 1000
"""Width assumed when output is not a terminal: wide enough that no table of ours is squeezed."""


def console(*, stderr: bool = False) -> Console:
    """A console for stdout (results) or stderr (progress, warnings, errors)."""
    terminal = Console(stderr=stderr, soft_wrap=True, highlight=False)
    if terminal.is_terminal:
        return terminal
    return Console(stderr=stderr, soft_wrap=True, highlight=False, width=PIPED_WIDTH)
