"""The unlearning bench's plan: which variants run, and what a bad choice says."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedforget.cli import app
from fedforget.simulations.bench_unlearning import BenchPlan


def test_a_plan_narrowed_to_some_variants_keeps_retrain_and_the_plan_order() -> None:
    plan = BenchPlan.full_plan(seeds=3).only(["replay", "subtract"])
    assert [v.label for v in plan.variants] == ["retrain", "subtract", "replay"]
    assert plan.runs == BenchPlan.full_plan(seeds=3).runs


def test_an_unknown_variant_is_named_with_the_ones_the_plan_has() -> None:
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['subtrakt'\].*subtract-2"):
        BenchPlan.quick().only(["subtrakt"])


def test_the_cli_rejects_an_unknown_variant_as_a_usage_error(tmp_path) -> None:
    result = CliRunner().invoke(
        app, ["bench", "unlearning", "--quick", "--variant", "nope", "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 2, result.output
    assert "unknown variant" in result.output
    assert not (tmp_path / "b" / "bench.json").exists()


def test_a_dp_plan_trains_every_federation_under_the_same_dp_settings() -> None:
    plan = BenchPlan.full_plan(seeds=1).with_privacy("central-fixed", 2.0, 0.5)
    plan.check()
    settings = {run.config.privacy() for run in plan.runs}
    assert len(settings) == 1
    (only,) = settings
    assert only is not None and (only.mechanism, only.noise_multiplier, only.clipping_norm) == ("central-fixed", 2.0, 0.5)
    assert all(run.config.privacy() is None for run in BenchPlan.full_plan(seeds=1).with_privacy(None, None, None).runs)


def test_the_cli_rejects_dp_without_its_noise_multiplier_as_a_usage_error(tmp_path) -> None:
    result = CliRunner().invoke(
        app, ["bench", "unlearning", "--quick", "--dp", "central-fixed", "--clipping-norm", "0.5",
              "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 2, result.output
    assert "--noise-multiplier" in result.output
    assert not (tmp_path / "b").exists()
def test_a_plan_records_every_history_with_the_asked_encoding_and_refuses_an_unknown_one(tmp_path) -> None:
    plan = BenchPlan.full_plan(seeds=1).with_history("topk:0.05", 2)
    assert {(r.config.store_dtype, r.config.retention_interval) for r in plan.runs} == {("topk:0.05", 2)}
    result = CliRunner().invoke(
        app, ["bench", "unlearning", "--quick", "--store-dtype", "int4", "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 2 and "--store-dtype 'int4' is not known" in result.output, result.output
    assert not (tmp_path / "b" / "bench.json").exists()
