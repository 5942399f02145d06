"""bench scaling: its plans cover the issue's grid, the exponent fit is right, a tiny run writes the promised JSON."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from fedforget.cli import app
from fedforget.commands.exits import ExitCode
from fedforget.simulations.bench_scaling import (
    FIGURES,
    Federation,
    ScalingPlan,
    fit_exponent,
    growth_exponents,
    rounds_growth,
    run_scaling_benchmark,
)

REQUIRED = {"clients", "rounds", "model_params", "store_bytes", "recording_overhead", "unlearning_seconds",
            "unlearning_peak_rss_bytes"}


def test_the_quick_plan_has_a_pair_where_only_the_rounds_grow_4x() -> None:
    federations = ScalingPlan.quick().federations
    pairs = [(a, b) for a in federations for b in federations
             if (a.model, a.clients, a.clients_per_round) == (b.model, b.clients, b.clients_per_round)
             and b.rounds == 4 * a.rounds]
    assert pairs, federations
    assert {a.model for a, _ in pairs} == {"mnist", "resnet-small", "resnet-wide"}, "a 4x-rounds pair at every size"


def test_the_full_plan_covers_10_100_1000_clients_10_and_40_rounds_and_three_model_sizes() -> None:
    federations = ScalingPlan.full().federations
    assert {f.clients for f in federations} == {10, 100, 1000}
    assert {f.rounds for f in federations} >= {10, 40}
    assert {f.model for f in federations} == {"mnist", "resnet-small", "resnet-wide"}
    assert max(f.rounds for f in federations if f.model == "resnet-wide") < 40  # the largest with fewer rounds
    assert ScalingPlan.quick().federations[-1] in federations
    assert all(f.clients_per_round < f.clients for f in federations if f.clients == 1000)  # sampled


def test_the_exponent_fit_recovers_a_power_law() -> None:
    xs = [10.0, 100.0, 1000.0]
    assert fit_exponent(xs, [3 * x**1.5 for x in xs]) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="2\\+ distinct"):
        fit_exponent([10.0, 10.0], [1.0, 2.0])


def test_exponents_are_fitted_only_where_points_differ_in_one_axis() -> None:
    def point(clients: int, rounds: int, params: int, strategy: str) -> dict[str, object]:
        return {"clients": clients, "rounds": rounds, "model_params": params, "strategy": strategy,
                "store_bytes": clients * rounds * params, "recording_overhead": float(clients),
                "unlearning_seconds": rounds**0.5 * params, "unlearning_peak_rss_bytes": 100.0 * (rounds / 10) ** 0.1}

    points = [point(10, r, 1000, s) for r in (10, 40) for s in ("subtract", "replay")] + [point(100, 40, 5000, "subtract")]
    found = {(e["figure"], e["axis"], e["at"].get("strategy")): e["exponent"] for e in growth_exponents(points)}
    assert found[("store_bytes", "rounds", None)] == pytest.approx(1.0)
    assert found[("unlearning_seconds", "rounds", "replay")] == pytest.approx(0.5)
    assert found[("unlearning_peak_rss_bytes", "rounds", "subtract")] == pytest.approx(0.1)
    assert not [k for k in found if k[1] in ("clients", "model_params")]  # the 100-client point differs in two axes
    growth = rounds_growth(points)
    assert {g["strategy"] for g in growth} == {"subtract", "replay"}
    assert all(g["peak_rss_ratio"] == pytest.approx(4**0.1) and g["below_1_5x"] for g in growth)


def test_a_tiny_run_writes_the_points_exponents_and_plot(tmp_path) -> None:
    plan = ScalingPlan((Federation.of("toy_models:linear_digits", 3, 1), Federation.of("toy_models:linear_digits", 3, 4)),
                       strategies=("subtract",))
    lines: list[str] = []
    run_scaling_benchmark(plan, tmp_path, say=lines.append)
    document = json.loads((tmp_path / "scaling.json").read_text())
    assert len(document["points"]) == 2 and all(REQUIRED <= set(p) for p in document["points"])
    first, second = document["points"]
    assert first["model_params"] == 64 * 10 + 10 and (first["clients"], second["rounds"]) == (3, 4)
    assert all(p[f] > 0 for p in document["points"] for f in FIGURES)
    assert second["store_bytes"] > first["store_bytes"]
    assert {(e["figure"], e["axis"]) for e in document["exponents"]} == {(f, "rounds") for f in FIGURES}
    assert all(math.isfinite(e["exponent"]) for e in document["exponents"])
    assert document["rounds_growth_4x"][0]["rounds"] == [1, 4]
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert lines[0].startswith("[1/2") and not list(tmp_path.glob("store-*"))  # progress; histories removed


@pytest.mark.parametrize(("args", "message"), [
    (["--strategy", "retrain"], "cannot measure 'retrain'"),
    (["--bogus"], "No such option"),
])
def test_bench_scaling_usage_errors(tmp_path, args, message) -> None:
    result = CliRunner().invoke(app, ["bench", "scaling", "--quick", "--out", str(tmp_path), *args])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "scaling.json").exists()


def test_bench_scaling_has_help() -> None:
    result = CliRunner().invoke(app, ["bench", "scaling", "--help"])
    assert result.exit_code == 0 and "--quick" in result.output
