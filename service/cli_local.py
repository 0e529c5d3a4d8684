"""CLI commands that act on this machine rather than over HTTP: `up` (the whole local stack), `serve`
(the API), `worker` (a dispatcher), `model make-tiny` and `data make-synthetic` (offline demo inputs)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]


def _configure_logging(level: str, log_format: str = "text") -> None:
    from fleet.log_format import configure_logging

    configure_logging(level, log_format)


def _settings():
    from pydantic import ValidationError

    from fleet.settings import Settings

    try:
        return Settings()
    except ValidationError as e:
        problems = "; ".join(f"LORAFLEET_{'_'.join(map(str, err['loc'])).upper()}: {err['msg']}"
                             for err in e.errors())
        raise typer.BadParameter(f"invalid settings: {problems}") from e


def _check_redis_login(settings) -> None:
    """Stop at start-up, saying what to fix, when Redis refuses the configured login."""
    from fleet.settings import check_redis_login, make_redis

    client = make_redis(settings)
    try:
        check_redis_login(client)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    finally:
        client.close()


def up(
    port: Annotated[int, typer.Option(help="Port of the API.")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="Where Redis, objects, models and logs live.")] = Path("./var"),
    host: Annotated[str, typer.Option(help="Interface the API listens on.")] = "127.0.0.1",
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    ray_address: Annotated[str | None, typer.Option(
        envvar="LORAFLEET_RAY_ADDRESS",
        help="Ray cluster to join (host:port); default: start a private local one.")] = None,
    accelerators: Annotated[int | None, typer.Option(
        min=0, help="Logical GPUs the local Ray node declares (training runs on the CPU); default: "
                    "LORAFLEET_LOCAL_ACCELERATORS or 4.")] = None,
) -> None:
    """Start the whole stack in the foreground: redis-server, Ray, the API, a dispatcher, a tiny model."""
    from service.stack import StackOptions, run_local_stack

    settings = _settings()
    _configure_logging(log_level, settings.log_format)
    options = StackOptions(port=port, host=host, data_dir=data_dir, ray_address=ray_address,
                           local_accelerators=settings.local_accelerators if accelerators is None else accelerators,
                           accelerator_resource=settings.accelerator_resource)
    raise typer.Exit(run_local_stack(options))


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Serve the REST API (settings from LORAFLEET_* environment variables)."""
    from service.server import run_server

    settings = _settings()
    _configure_logging(log_level, settings.log_format)
    _check_redis_login(settings)
    run_server(settings, host=host, port=port, log_level=log_level)


def worker(
    worker_id: Annotated[str | None, typer.Option(help="Name in leases and events; default host:pid.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run a dispatcher: claim queued jobs, train them on Ray, publish adapters (until SIGTERM/Ctrl-C)."""
    from workers.dispatcher import Dispatcher

    settings = _settings()
    _configure_logging(log_level, settings.log_format)
    _check_redis_login(settings)
    dispatcher = Dispatcher(settings, worker_id=worker_id)
    dispatcher.connect_ray()
    # After Ray's own handlers: SIGTERM behaves like Ctrl-C, so a running job is handed back to the
    # queue and resumes elsewhere from its last checkpoint.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        dispatcher.run_forever()
    except KeyboardInterrupt:
        logging.getLogger(__name__).info("dispatcher stopped")


model_app = typer.Typer(help="Base models.", no_args_is_help=True)


@model_app.command("make-tiny")
def make_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model and tokenizer to.")],
    seed: Annotated[int, typer.Option(help="Seed of the random init.")] = 0,
) -> None:
    """Generate the tiny Llama-architecture model + tokenizer offline (random weights, for tests/demos)."""
    from workers.tiny_model import make_tiny_model

    path = make_tiny_model(out_dir, seed=seed)
    typer.echo(f"wrote a tiny Llama model to {path}")


data_app = typer.Typer(help="Datasets.", no_args_is_help=True)


@data_app.command("make-synthetic")
def make_synthetic(
    out_dir: Annotated[Path, typer.Argument(help="Directory for train.jsonl and val.jsonl.")],
    task: Annotated[str, typer.Option(help="reverse, sort, uppercase or first_last.")] = "reverse",
    n_train: Annotated[int, typer.Option(help="Training examples.")] = 400,
    n_val: Annotated[int, typer.Option(help="Validation examples.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Write a small synthetic chat dataset (a text transformation) that even the tiny model learns."""
    from workers.synthetic import TASKS, write_synthetic_splits

    if task not in TASKS:
        raise typer.BadParameter(f"unknown task {task!r}; choose one of {', '.join(TASKS)}", param_hint="--task")
    train, val = write_synthetic_splits(out_dir, n_train=n_train, n_val=n_val, seed=seed, task=task)
    typer.echo(f"wrote {train} ({n_train} examples) and {val} ({n_val} examples)")


def register(app: typer.Typer) -> None:
    """Add these commands to the `lorafleet` CLI."""
    app.command("up")(up)
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.add_typer(model_app, name="model")
    app.add_typer(data_app, name="data")
