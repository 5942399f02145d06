"""What the withdrawing ClientApp runs on a ``train.unlearn`` message: the named method, on its own data.

One entry for every client-side unlearning method, so the ClientApp has one
handler and the server one message
(:data:`fedforget.wire.CLIENT_UNLEARNING_MESSAGE`).
"""

from __future__ import annotations

from torch import nn
from torch.utils.data import Dataset

from fedforget.arrays import Arrays
from fedforget.strategies.client_methods import AscentSettings, ClientMethod, MisdirectSettings, RelabelSettings


def unlearn_on_client(model: nn.Module, forget: Dataset, method: ClientMethod, *, seed: int) -> tuple[Arrays, float]:
    """Run ``method`` from ``model`` (changed in place) on the client's ``forget`` data; weights and epochs spent.

    The whole of the client's data is the forget data: fedforget's only
    withdrawal scope is all of a client's contributions, so no method gets
    retain data here.
    """
    if isinstance(method, AscentSettings):
        from fedforget.client.ascent import projected_gradient_ascent
        from fedforget.client.forget_loop import state_arrays

        return projected_gradient_ascent(  # the ball is centred on the model sent
            model, forget, state_arrays(model), method, seed=seed, momentum=method.momentum,
            clip_norm=method.clip_norm,
            # About ten early-stopping checks per epoch: each one evaluates all local data.
            check_every=max(1, len(forget) // (method.batch_size * 10)),  # type: ignore[arg-type]
        )
    if isinstance(method, RelabelSettings):
        from fedforget.client.relabel import relabel_fine_tune

        return relabel_fine_tune(model, forget, method, seed=seed)
    if isinstance(method, MisdirectSettings):
        from fedforget.client.misdirect import misdirect

        return misdirect(model, forget, method, seed=seed)
    raise TypeError(f"no client-side unlearning method takes {type(method).__name__}")
