"""Flower's simulation engine on a Ray instance that only this machine can reach.

Left to itself, Flower starts Ray when a simulation begins, and Ray 2.55 then
listens on every network interface of the machine. fedforget starts Ray first
instead, and Flower uses the running instance:

- loopback only: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray take
  127.0.0.1 as the node's address, so its GCS, raylet, workers and agents bind
  there (Ray reads the variable when it is first imported, so it is set before);
- no dashboard and no usage statistics;
- one retry: Ray waits a hard-coded 30 s for its raylet to register, which a
  2-core machine under load sometimes misses ("The current node timed out
  during startup"). A failed start is shut down and tried once more, with a
  message saying so; the second failure is reported with what to do;
- workers at the driver's own priority: Ray starts its workers at nice 15,
  so on a machine with any other busy process the clients' training (the
  whole of a simulation's work) got a small fraction of a core. fedforget
  adds nothing, so workers run at the niceness of the command the user
  started: ``nice fedforget simulate`` still yields, and a plain run
  competes fairly.

A user who wants a real Ray cluster names it (``--ray-address``); fedforget
then connects to it and changes none of its settings.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from fedforget.errors import FedforgetError

LOOPBACK_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
"""Set before Ray is imported: the node address becomes 127.0.0.1, and nothing is reported to Anyscale."""

LOOPBACK_ADDRESSES = ("127.0.0.1", "::1", "localhost")

START_ATTEMPTS = 2

WORKER_NICENESS_INCREMENT = 0
"""Added to the driver's niceness for Ray's workers (Ray's default adds 15)."""

WORKER_REGISTER_TIMEOUT_S = 180
"""Ray's default is 60 s; a worker importing torch on a loaded 2-core machine can take longer."""


class SimulationEngineError(FedforgetError):
    """Ray could not be started, or the cluster named could not be reached."""


def quiet_engines(verbose: bool = False) -> None:
    """Quiet Flower, Ray and telemetry, and keep torch single-threaded on small machines."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)


def keep_ray_on_loopback() -> None:
    """Make any Ray this process starts from now on listen on 127.0.0.1 only (see the module docstring)."""
    os.environ.update(LOOPBACK_ENVIRONMENT)


def start_ray(*, num_cpus: int, verbose: bool, address: str | None = None,
              say: Callable[[str], None] = lambda message: None) -> None:
    """Start a private loopback Ray (``address`` None), or connect to the cluster at ``address``."""
    if address is None:
        keep_ray_on_loopback()
    import ray

    if ray.is_initialized():
        ray.shutdown()  # a previous session's, left behind by an error: Flower would reuse it as it is
    settings: dict[str, object] = {
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
        # As Flower does: workers see this driver's import path.
        "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
    }
    if address is None:
        settings.update(
            num_cpus=num_cpus,
            include_dashboard=False,
            _system_config={"worker_register_timeout_seconds": WORKER_REGISTER_TIMEOUT_S,
                            "worker_niceness": WORKER_NICENESS_INCREMENT},
        )
    else:
        settings["address"] = address
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(**settings)
            break
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception when its node misses the start-up wait
            ray.shutdown()
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if address is not None:
                raise SimulationEngineError(f"cannot connect to the Ray cluster at {address}: {reason}") from exc
            if attempt == START_ATTEMPTS:
                raise SimulationEngineError(
                    f"Ray did not start, twice: {reason}. The machine is probably overloaded; rerun when it is "
                    "quieter (an interrupted simulate run continues with --resume)."
                ) from exc
            say(f"Ray did not start ({reason}); trying once more ...")
    if address is None:
        _check_loopback(ray)


def _check_loopback(ray: object) -> None:
    """Refuse to go on with a Ray that listens beyond this machine."""
    node_address = ray.util.get_node_ip_address()  # type: ignore[attr-defined]
    if node_address not in LOOPBACK_ADDRESSES:
        ray.shutdown()  # type: ignore[attr-defined]
        raise SimulationEngineError(
            f"Ray started on {node_address}, not on loopback: this process imported Ray before fedforget could "
            f"set {', '.join(f'{k}={v}' for k, v in LOOPBACK_ENVIRONMENT.items())}. Set them in the environment "
            "before starting Python, or name a cluster with --ray-address."
        )


def stop_ray() -> None:
    """Stop the Ray this process started or joined (Flower normally does at the end of a run)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def run_on_ray(
    *,
    server_app: object,
    client_app: object,
    num_supernodes: int,
    verbose: bool,
    address: str | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> None:
    """Run a Flower ServerApp and ClientApp on the simulation engine, on Ray started as above."""
    from flwr.simulation import run_simulation  # heavy import: only when simulating

    start_ray(num_cpus=2, verbose=verbose, address=address, say=say)
    try:
        run_simulation(
            server_app=server_app,  # type: ignore[arg-type]
            client_app=client_app,  # type: ignore[arg-type]
            num_supernodes=num_supernodes,
            backend_config={"client_resources": {"num_cpus": 1}},
            verbose_logging=verbose,
        )
    finally:
        stop_ray()
