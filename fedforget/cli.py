"""The ``fedforget`` command."""

from __future__ import annotations

import os

# gRPC's C core logs at INFO whenever Ray forks with gRPC threads running: noise to
# a user. It reads this once, when grpc is first imported, so it is set first.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fedforget import __version__
from fedforget.keys_cli import keys_app, verify_certificate_command
from fedforget.strategy_options import with_strategy_options
from fedforget.server.ledger.audit_cli import audit_app
from fedforget.server.unlearning.cli import unlearn_command
from fedforget.withdraw_cli import enroll_command, serve_command, withdraw_app

app = typer.Typer(
    name="fedforget",
    help="Federated unlearning on Flower: record, withdraw, unlearn, prove.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: ratios measured side by side in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
client_app = typer.Typer(help="What a client runs: check what the server says it did.", no_args_is_help=True)
app.add_typer(client_app, name="client")
app.add_typer(keys_app, name="keys", help="Organisation keys (ECDSA P-384, OpenSSH format, as Flower's node auth).")
client_app.command("verify-certificate")(verify_certificate_command)
app.add_typer(audit_app, name="audit", help="Verify the signed ledger and the history store; checkpoints; which models contain a client.")
app.add_typer(withdraw_app, name="withdraw", help="Withdraw consent with a signed request; follow its status.")
app.command("withdrawal-service")(serve_command)
app.command("enroll")(enroll_command)
app.command("unlearn")(unlearn_command)

_err = Console(stderr=True)


def _fail(message: str) -> None:
    _err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedforget {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """Federated unlearning on Flower: record, withdraw, unlearn, prove."""


@app.command()
@with_strategy_options
def simulate(
    out: Annotated[Path, typer.Option(help="Directory for the history store and report.json.")] = Path("runs/demo"),
    dataset: Annotated[Optional[str], typer.Option(help="digits (bundled), mnist or fashion-mnist.")] = None,
    clients: Annotated[Optional[int], typer.Option(help="Number of simulated clients (ids 0..N-1).")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Federated rounds.")] = None,
    local_epochs: Annotated[Optional[float], typer.Option(help="Local epochs per round.")] = None,
    partition: Annotated[Optional[str], typer.Option(help="iid, dirichlet or pathological.")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Dirichlet concentration (with --partition dirichlet).")] = None,
    classes_per_partition: Annotated[
        Optional[int], typer.Option(help="Labels per client (with --partition pathological).")
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for data split, model and training.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Client learning rate (SGD, momentum 0.9).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Client batch size.")] = None,
    withdraw: Annotated[
        Optional[list[str]],
        typer.Option(help="CLIENT@ROUND: the client withdraws before ROUND (repeatable)."),
    ] = None,
    strategy: Annotated[
        Optional[str],
        typer.Option(
            help="Unlearning strategy: retrain (exact), replay (FedRecover: history replay with estimated "
            "updates), subtract (the client's own contributions), calibrated (FedEraser), fedrecovery "
            "(FedRecovery), gradient-ascent (Halimi et al.)."
        ),
    ] = None,
    retention_interval: Annotated[
        Optional[int], typer.Option(help="Keep client updates every N rounds (FedEraser's Δt).")
    ] = None,
    store_dtype: Annotated[Optional[str], typer.Option(help="Stored update precision: float32 or float16.")] = None,
    backdoor: Annotated[
        Optional[list[str]],
        typer.Option(help="CLIENT plants a backdoor canary in its data (repeatable)."),
    ] = None,
    backdoor_fraction: Annotated[
        Optional[float], typer.Option(help="Share of a backdoored client's examples that carry the trigger.")
    ] = None,
    backdoor_target: Annotated[Optional[int], typer.Option(help="Class the trigger relabels to.")] = None,
    shadows: Annotated[
        Optional[int], typer.Option(help="Shadow models for the per-example membership attack (0 skips it).")
    ] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Repeat over this many seeds: mean ± std.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's own logs.")] = False,
    strategy_settings: dict[str, object] | None = None,
) -> None:
    """Run a federation on Flower's simulation engine, with withdrawals and unlearning.

    Each strategy's own settings are options below; [name: default] says which strategies have one.
    """
    from fedforget.server.store.errors import FedforgetError
    from fedforget.simulations.config import SimulationConfig, parse_withdrawal
    from fedforget.simulations.datasets import DatasetUnavailableError
    from fedforget.simulations.progress import ConsoleObserver
    from fedforget.simulations.runner import saved_config, simulate as run

    given = {
        "dataset": dataset,
        "clients": clients,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "partition": partition,
        "alpha": alpha,
        "classes_per_partition": classes_per_partition,
        "seed": seed,
        "lr": lr,
        "batch_size": batch_size,
        "strategy": strategy,
        "retention_interval": retention_interval,
        "store_dtype": store_dtype,
        "backdoor_fraction": backdoor_fraction,
        "backdoor_target": backdoor_target,
        "shadows": shadows,
        "seeds": seeds,
    }
    try:
        settings = {k: v for k, v in given.items() if v is not None}
        if withdraw is not None:
            settings["withdrawals"] = tuple(parse_withdrawal(w) for w in withdraw)
        if backdoor is not None:
            settings["backdoors"] = tuple(backdoor)
        base = saved_config(out) if resume else SimulationConfig()
        if strategy_settings:
            previous = base.strategy_settings if settings.get("strategy", base.strategy) == base.strategy else {}
            settings["strategy_settings"] = {**previous, **strategy_settings}
        elif "strategy" in settings and settings["strategy"] != base.strategy:
            settings["strategy_settings"] = {}
        config = SimulationConfig(**{**base.__dict__, **settings})
        observer = ConsoleObserver()
        result = run(
            config,
            out,
            resume=resume,
            observer=observer,
            verbose=verbose,
            progress=lambda message: observer.console.print(f"[bold]{message}[/]"),
        )
    except (FedforgetError, DatasetUnavailableError, PermissionError, ValueError) as exc:
        _fail(str(exc))
        return
    if "rounds" in result.report:
        _print_run_summary(result.report, out)
    if result.verification is not None:
        from fedforget.simulations.summary import print_verification

        print_verification(result.verification, out, Console())


def _print_run_summary(report: dict[str, object], out: Path) -> None:
    console = Console()
    console.print(
        f"final test accuracy [bold]{report['final_test_accuracy']:.2%}[/] "
        f"after {len(report['rounds'])} rounds in {report['wall_seconds']:.1f} s"  # type: ignore[arg-type]
    )
    for event in report["unlearning"]:  # type: ignore[union-attr]
        console.print(
            f"client {event['client']} forgotten before round {event['round']} by {event['strategy']}: "
            f"{event['seconds']:.1f} s, {event['client_epochs']:.0f} client-epochs, test accuracy "
            f"{event['test_accuracy_before']:.2%} -> {event['test_accuracy_after']:.2%}"
        )
    store = report["store"]
    console.print(
        f"history store: {store['bytes'] / 1e6:.2f} MB for {store['client_rounds']} client-rounds "  # type: ignore[index]
        f"in {out / 'store'}; report: {out / 'report.json'}"
    )


@bench_app.command("unlearning")
def bench_unlearning(
    out: Annotated[Path, typer.Option(help="Directory for bench.json, the plot and the runs.")] = Path("runs/bench-unlearning"),
    quick: Annotated[
        bool, typer.Option(help="Digits (IID), 15 rounds, plus FedEraser's Δt × r grid: where settings are chosen.")
    ] = False,
    full: Annotated[
        bool,
        typer.Option(help="Digits, MNIST and Fashion-MNIST (held out), each IID and Dirichlet α=0.3: about 2 h."),
    ] = False,
    dataset: Annotated[
        Optional[list[str]], typer.Option(help="With --full: only these datasets (repeatable).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Seeds to average over (at least 3 for a band).")] = 3,
    round_cost: Annotated[
        float, typer.Option(help="Seconds a deployed round trip costs, for the modelled deployment speed-up.")
    ] = 9.7,
) -> None:
    """Every unlearning strategy against exact retraining: forgetting, accuracy, and cost in client work."""
    from dataclasses import replace

    from fedforget.simulations.bench_unlearning import BenchPlan, run_unlearning_benchmark
    from fedforget.simulations.datasets import DatasetUnavailableError

    if quick == full:
        _fail("choose one of --quick (digits, minutes) or --full (three datasets, two partitions, hours)")
        return
    if dataset and not full:
        _fail("--dataset goes with --full")
        return
    plan = BenchPlan.quick(seeds) if quick else BenchPlan.full_plan(seeds, tuple(dataset or ("digits", "mnist", "fashion-mnist")))
    try:
        run_unlearning_benchmark(replace(plan, round_cost=round_cost), out)
    except (ValueError, PermissionError, DatasetUnavailableError) as exc:
        _fail(str(exc))


@bench_app.command("estimation")
def bench_estimation(
    store: Annotated[Path, typer.Argument(help="A history store holding a history and its exact retrain.")],
    out: Annotated[Optional[Path], typer.Option(help="Also write bench-estimation.json here.")] = None,
) -> None:
    """How far a stored update is from the client's real update on the retrain's models (FedRecover's premise)."""
    from fedforget.errors import FedforgetError
    from fedforget.simulations.bench_estimation import run_estimation_benchmark

    try:
        run_estimation_benchmark(store, out)
    except (FedforgetError, ValueError, PermissionError) as exc:
        _fail(str(exc))


@bench_app.command("overhead")
def bench_overhead(
    dataset: Annotated[str, typer.Option(help="digits, mnist or fashion-mnist.")] = "digits",
    clients: Annotated[int, typer.Option(help="Simulated clients.")] = 10,
    rounds: Annotated[int, typer.Option(help="Rounds per configuration.")] = 10,
    out: Annotated[Optional[Path], typer.Option(help="Also write the figures as JSON here.")] = None,
) -> None:
    """Round time with history recording on vs off, and bytes stored per client-round (fp32, fp16)."""
    from fedforget.simulations.bench_overhead import run_overhead_benchmark

    try:
        result = run_overhead_benchmark(dataset=dataset, clients=clients, rounds=rounds)
    except (ValueError, PermissionError) as exc:
        _fail(str(exc))
        return
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-overhead.json").write_text(json.dumps(result, indent=2) + "\n")


@bench_app.command("deployment")
def bench_deployment(
    out: Annotated[Path, typer.Option(help="Directory for the federation's files and bench-deployment.json.")] = Path(
        "runs/bench-deployment"
    ),
    organisations: Annotated[int, typer.Option(help="Organisations (SuperNodes).")] = 3,
    rounds: Annotated[int, typer.Option(help="Rounds to run (round 1 is not counted).")] = 4,
) -> None:
    """A real loopback TLS federation: the deployed round time against one ClientApp's own work."""
    from fedforget.simulations.bench_deployment import run_deployment_benchmark

    try:
        run_deployment_benchmark(out, organisations=organisations, rounds=rounds)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command("certs")
def certs_command(
    out: Annotated[Path, typer.Option(help="Directory to write the credentials into.")],
    host: Annotated[
        list[str], typer.Option(help="DNS name or IP address the server is reached at (repeatable).")
    ],
    org: Annotated[Optional[list[str]], typer.Option(help="An organisation to make a key pair for (repeatable).")] = None,
) -> None:
    """A CA, the server's TLS certificate, the federation's signing key and each organisation's keys."""
    from fedforget.certs import make_credentials
    from fedforget.errors import FedforgetError

    try:
        made = make_credentials(out, hosts=list(host), organisations=list(org or []))
    except (FedforgetError, ValueError, OSError) as exc:
        _fail(str(exc))
        return
    console = Console(soft_wrap=True)
    console.print(f"CA certificate (give it to every organisation): {made.tls.ca_certificate}")
    console.print(f"server certificate and key (SuperLink, withdrawal service): {made.tls.certificate}, {made.tls.private_key}")
    console.print(f"federation signing key (certificates of unlearning): {made.federation_key}; public: {made.federation_public_key}")
    for name, (private, public) in made.organisations.items():
        console.print(f"organisation {name}: {private} (keep secret, 0600), {public} (register and enrol it)")


@app.command("export-data")
def export_data_command(
    out: Annotated[Path, typer.Option(help="Directory for part-0.npz, part-1.npz, ...")],
    partitions: Annotated[int, typer.Option(help="How many shares (one per organisation).")],
    dataset: Annotated[str, typer.Option(help="digits (bundled), mnist or fashion-mnist.")] = "digits",
    partition: Annotated[str, typer.Option(help="iid, dirichlet or pathological.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (with --partition dirichlet).")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
) -> None:
    """Write shares of a built-in dataset as the data files deployed organisations train on (x, y in .npz)."""
    from fedforget.errors import FedforgetError
    from fedforget.simulations.export import export_partitions

    try:
        paths = export_partitions(dataset, partitions, out, scheme=partition, alpha=alpha, seed=seed)
    except (FedforgetError, ValueError, RuntimeError, OSError) as exc:
        _fail(str(exc))
        return
    for path in paths:
        typer.echo(f"{path.resolve()}")


@client_app.command("verify")
def client_verify(
    model: Annotated[Path, typer.Option(help="The published model (.npz of named arrays).")],
    data: Annotated[Path, typer.Option(help="Your own training data: .npz with x and y.")],
    holdout: Annotated[Path, typer.Option(help="Data of the same kind nobody trained on: .npz with x and y.")],
    dataset: Annotated[Optional[str], typer.Option(help="Built-in architecture: digits, mnist or fashion-mnist.")] = None,
    model_factory: Annotated[
        Optional[str], typer.Option(help="Your architecture instead: package.module:function returning the nn.Module.")
    ] = None,
    trigger_target: Annotated[Optional[int], typer.Option(help="Your canary's target class (measures backdoor success).")] = None,
    trigger_size: Annotated[int, typer.Option(help="Your canary's square size in pixels.")] = 3,
    trigger_corner: Annotated[
        str, typer.Option(help="Your canary's corner: top-left, top-right, bottom-left or bottom-right.")
    ] = "top-left",
    output: Annotated[Optional[Path], typer.Option(help="Also write the figures as JSON here.")] = None,
) -> None:
    """Check, with your own data only, whether a published model still remembers it."""
    from fedforget.client.verify import load_examples, model_factory as factory_of, verify_published_model
    from fedforget.evidence.backdoor import Trigger

    if (dataset is None) == (model_factory is None):
        _fail("give exactly one of --dataset (a built-in architecture) or --model-factory")
        return
    try:
        figures = verify_published_model(
            model,
            factory_of(dataset or model_factory or ""),
            load_examples(data),
            load_examples(holdout),
            None
            if trigger_target is None
            else Trigger(target_class=trigger_target, size=trigger_size, corner=trigger_corner),
        )
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))
        return
    console = Console()
    for name, value in figures.items():
        console.print(f"{name:>22}: {'-' if value is None else f'{value:.4f}'}")
    console.print(
        "A membership AUC near 0.5 and a backdoor success rate near the natural target rate are what a "
        "model that never saw your data shows; compare with the server's retrain figures."
    )
    if output is not None:
        output.write_text(json.dumps(figures, indent=2) + "\n")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fedforget")


if __name__ == "__main__":
    sys.exit(main())
