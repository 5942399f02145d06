"""``fedforget bench shards``: the plan, and bad shard counts refused before anything is written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedforget.cli import app
from fedforget.commands.exits import ExitCode
from fedforget.simulations.bench_shards import ShardsPlan

runner = CliRunner()


def test_the_unsharded_federation_is_always_measured_as_the_yardstick():
    plan = ShardsPlan.of(["digits"], ["iid", "dirichlet"], [4, 2], rounds=5)
    assert plan.shard_counts == (1, 2, 4)
    assert [(r.config.partition, r.config.rounds, r.config.clients) for r in plan.runs] == [
        ("iid", 5, 10), ("dirichlet", 5, 10)]
    plan.check()


@pytest.mark.parametrize(
    ("shards", "message"),
    [
        ("0", "--shards must be at least 1"),
        ("1,4,11", "--shards 11 is more than the 10 clients"),
        ("two", "expected comma-separated whole numbers"),
    ],
)
def test_bad_shard_counts_are_refused_before_anything_is_written(tmp_path, shards, message):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", "shards", "--out", str(out), "--shards", shards])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()
