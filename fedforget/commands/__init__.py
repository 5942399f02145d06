"""The ``fedforget`` command's groups, one module each; ``fedforget/cli.py`` routes them.

Every module here imports only typer and rich at the top: torch, Flower and
grpc are imported inside a command, after its arguments are checked, so bad
input is refused in well under a second. Errors go through
:func:`fedforget.commands.exits.fail` with one of the documented
:class:`~fedforget.commands.exits.ExitCode` values.
"""
