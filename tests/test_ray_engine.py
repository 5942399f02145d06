"""Starting Ray for a simulation: one retry with a message, then an error that says what to do."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from fedforget.simulations import ray_engine  # noqa: E402
from fedforget.simulations.ray_engine import SimulationEngineError, start_ray  # noqa: E402

TIMED_OUT = "The current node timed out during startup. This could happen because ..."


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init fails as often as ``failures[0]`` says, then succeeds on loopback; nothing really starts."""
    calls: list[dict[str, object]] = []
    failures = [0]

    def init(**settings: object) -> None:
        calls.append(settings)
        if len(calls) <= failures[0]:
            raise Exception(TIMED_OUT)  # what Ray raises

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    return calls, failures


def test_a_start_that_times_out_is_retried_once_with_a_message(fake_ray):
    calls, failures = fake_ray
    failures[0] = 1
    said: list[str] = []
    start_ray(num_cpus=2, verbose=False, say=said.append)
    assert len(calls) == 2
    assert said == [f"Ray did not start ({TIMED_OUT}); trying once more ..."]
    assert calls[0]["include_dashboard"] is False
    assert calls[0]["_system_config"] == {
        "worker_register_timeout_seconds": ray_engine.WORKER_REGISTER_TIMEOUT_S, "worker_niceness": 0,
    }


@pytest.mark.simulation
def test_the_clients_train_at_the_priority_of_the_command_that_started_them():
    """Ray's own default starts workers 15 nice levels below the driver, starving them beside any busy process."""
    import os

    start_ray(num_cpus=1, verbose=False)
    try:
        niceness = ray.get(ray.remote(lambda: os.nice(0)).remote(), timeout=120)
    finally:
        ray_engine.stop_ray()
    assert niceness == os.nice(0)


def test_a_second_failure_says_what_to_do(fake_ray):
    calls, failures = fake_ray
    failures[0] = 2
    with pytest.raises(SimulationEngineError, match="Ray did not start, twice: .* rerun when it is quieter"):
        start_ray(num_cpus=2, verbose=False)
    assert len(calls) == 2


def test_a_cluster_named_is_joined_as_it_is(fake_ray):
    calls, _ = fake_ray
    start_ray(num_cpus=2, verbose=False, address="10.0.0.5:6379")
    (settings,) = calls
    assert settings["address"] == "10.0.0.5:6379"
    assert "include_dashboard" not in settings and "num_cpus" not in settings


def test_a_ray_that_is_not_on_loopback_is_refused(fake_ray, monkeypatch):
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "192.0.2.2")
    with pytest.raises(SimulationEngineError, match="not on loopback"):
        start_ray(num_cpus=2, verbose=False)
