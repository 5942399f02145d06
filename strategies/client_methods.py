"""What a withdrawing client can be asked to run on its own data: one message, three methods.

Client-side unlearning strategies (gradient ascent, fine-tuning with
modified labels, representation misdirection) all need the same thing from
the federation: send the still-online withdrawing client a model and the
settings of one method, get back the model it produced and the epochs it
spent. The federation handle has one call for that
(:meth:`~fedforget.strategies.base.Federation.client_unlearning`) and the
ClientApp one handler (``train.unlearn``); the method travels as a name and
flat scalar settings, which is all a Flower ``ConfigRecord`` carries.

The dataclasses here are the wire contract between the strategies (which
choose the settings) and ``fedforget.client.unlearning`` (which runs them).
Pure Python: no torch, no Flower.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

RELABEL_MODES: tuple[str, ...] = ("random", "complementary")
"""How the relabelling fine-tune treats each forget example's true class (see :class:`RelabelSettings`)."""

METHOD_KEY = "method"
"""The config key naming the method; every other key is one of the method's settings (kebab-case)."""


@dataclass(frozen=True)
class AscentSettings:
    """Projected gradient ascent a withdrawing client runs on its own data (Halimi et al. 2022).

    The ball is centred on the model the client is sent: the strategy sends
    its reference model w_ref, which is where the ascent starts as well.
    """

    method: ClassVar[str] = "ascent"

    radius: float
    """L2 radius of the ball around the model sent that every iterate is projected onto."""
    lr: float = 0.01
    epochs: float = 5.0
    batch_size: int = 32
    accuracy_floor: float = 0.1
    """Early stopping: stop once accuracy on the client's own data falls to this value."""
    momentum: float = 0.9
    """SGD momentum of the ascent, as in the reference implementation (IBM/federated-unlearning):
    without it, ascent from a model that fits the client's data confidently barely moves."""
    clip_norm: float | None = 5.0
    """Gradient-norm clipping of the ascent, as in the reference implementation."""


@dataclass(frozen=True)
class RelabelSettings:
    """Fine-tuning on the forget data with modified labels (the "random labels" baseline of the literature).

    ``mode = "random"``: cross-entropy against a wrong class drawn uniformly
    for every example at every step (Graves et al.'s amnesiac relabelling;
    Golatkar et al.'s "random labels" baseline). ``mode = "complementary"``:
    the complementary-label loss −log(1 − p_y), which only pushes the true
    class y down without naming a wrong one (Ishida et al. 2017's
    complementary labels).
    """

    method: ClassVar[str] = "relabel"

    lr: float = 0.05
    epochs: float = 2.0
    """Step budget: at most this many epochs over the forget data."""
    batch_size: int = 32
    accuracy_floor: float = 0.5
    """Stop rule: stop once accuracy on the forget data (true labels) falls to this value."""
    mode: str = "random"
    momentum: float = 0.0


@dataclass(frozen=True)
class MisdirectSettings:
    """RMU-style representation misdirection (Li et al. 2024, "The WMDP Benchmark", section 5).

    The activations of ``layer`` on the forget data are steered towards
    c·u, u a fixed random unit vector (uniform entries, normalised) drawn
    from the seed, c = ``steering`` × the mean activation norm on the forget
    data at the start, so the setting does not depend on the model's scale.
    Only the parameters upstream of ``layer`` receive gradient.
    """

    method: ClassVar[str] = "misdirect"

    layer: str = ""
    """Name of the module whose output is steered; empty: the second-to-last ``nn.Linear`` (the
    pre-activation of the features the classifier head reads)."""
    steering: float = 1.0
    lr: float = 0.05
    epochs: float = 2.0
    """Step budget: at most this many epochs over the forget data."""
    batch_size: int = 32
    accuracy_floor: float = 0.3
    """Stop rule: stop once accuracy on the forget data (true labels) falls to this value."""
    momentum: float = 0.0


ClientMethod = AscentSettings | RelabelSettings | MisdirectSettings
"""The settings of one client-side unlearning method; their class says which method."""

_METHODS: dict[str, type[AscentSettings] | type[RelabelSettings] | type[MisdirectSettings]] = {
    cls.method: cls for cls in (AscentSettings, RelabelSettings, MisdirectSettings)
}


def method_config(settings: ClientMethod) -> dict[str, int | float | str]:
    """The method and its settings as flat config entries (a ``None`` setting is left out)."""
    config: dict[str, int | float | str] = {METHOD_KEY: settings.method}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            config[f.name.replace("_", "-")] = value
    return config


def method_from_config(config: Mapping[str, object]) -> ClientMethod:
    """The settings :func:`method_config` wrote; unknown methods or keys are errors naming the known ones.

    A setting that may be ``None`` and is absent is ``None`` (that is how
    :func:`method_config` sends it), not its default.
    """
    name = config.get(METHOD_KEY)
    if name not in _METHODS:
        raise ValueError(
            f"unknown client-side unlearning method {name!r}; this client knows {', '.join(sorted(_METHODS))}"
        )
    cls = _METHODS[str(name)]
    known = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, object] = {
        f.name: None for f in known.values() if type(None) in typing.get_args(hints[f.name])
    }
    for key, value in config.items():
        if key == METHOD_KEY:
            continue
        if key not in known:
            raise ValueError(f"client-side method {name!r} has no setting {key!r}; it has {', '.join(sorted(known))}")
        values[known[key].name] = value
    return cls(**values)  # type: ignore[arg-type]
