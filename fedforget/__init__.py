"""fedforget: federated unlearning on Flower.

The shared package holds what both the server and the clients need: the wire
format of the messages they exchange and the command-line entry point. The
server side lives in :mod:`fedforget.server`, the client side in
:mod:`fedforget.client`, the unlearning algorithms in
:mod:`fedforget.strategies` and the experiments in :mod:`fedforget.simulations`.
"""

__version__ = "0.1.0"
