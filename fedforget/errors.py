"""The root of fedforget's exceptions, shared by server, client and simulations.

A caller (the CLI, a ServerApp, a test) catches ``FedforgetError`` to report any
problem fedforget detected itself, and lets every other exception surface as
the bug it is. Messages are written for a person: they name the file, round or
client concerned and, where there is one, what to do about it.
"""


class FedforgetError(Exception):
    """Base class of every error fedforget raises on purpose."""
