"""`cxrtune` command line: run a sweep, make phantom data, list backbones.

Input errors (bad data, bad space file, unknown backbone, missing weights) print one line
naming the file or field and the rule, and exit with code 2 — no traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Explainability-aware hyperparameter search for chest X-ray models on Ray Tune.")
data_app = typer.Typer(no_args_is_help=True, help="Data sets: generate phantom chest X-rays.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)


@app.command()
def run(
    space: str = typer.Option("default", help="Space file, or the name of one in spaces/ (default: spaces/default.yaml)."),
    data: Optional[str] = typer.Option(None, help="Data directory (manifest.csv or class folders), or 'synthetic'; overrides the space file."),
    out: Path = typer.Option(Path("results"), help="Parent directory of the results."),
    name: Optional[str] = typer.Option(None, help="Results go to OUT/NAME (default: the space's name plus a timestamp)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address ('auto', 'ray://host:10001'); default: a local cluster."),
) -> None:
    """Run a sweep: OptunaSearch + ASHA over the space, patient-grouped CV, Grad-CAM lung focus."""
    import time

    from search.space import load_space, resolve_space_file
    from search.sweep import run_sweep

    spec = load_space(space)
    if data is not None and data != "synthetic" and not Path(data).exists():
        raise _user_error(f"data path {data} does not exist")
    run_name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_sweep(spec, space_file=resolve_space_file(space), data=data, out=out, name=run_name,
              address=address, log=lambda m: console.print(m, markup=False, highlight=False))


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Output directory (manifest.csv, images/, masks/)."),
    n_patients: int = typer.Option(60, help="Number of patients (classes balanced)."),
    size: int = typer.Option(256, help="Image side in pixels."),
    shortcut: float = typer.Option(0.0, help="Marker/class correlation P: P of covid images carry an edge marker, 1-P of the others; 0 = no markers."),
    seed: int = typer.Option(0, help="Random seed (same seed, same bytes)."),
) -> None:
    """Generate deterministic phantom chest X-rays with true lung masks and optional shortcut markers."""
    from trainable.phantom import synthesize

    if out.exists() and (out / "manifest.csv").exists():
        raise _user_error(f"{out} already holds a data set (manifest.csv); choose another --out")
    try:
        manifest = synthesize(out, n_patients=n_patients, size=size, shortcut=shortcut, seed=seed)
    except ValueError as e:
        raise _user_error(str(e)) from None
    console.print(f"wrote {manifest}", markup=False)


@app.command()
def select(
    results: Path = typer.Argument(..., help="A finished sweep's results directory."),
    within: Optional[float] = typer.Option(None, help="Metric tolerance Δ (default: the space's select_within)."),
    metric: Optional[str] = typer.Option(None, help="Metric column (default: the space's objective metric)."),
) -> None:
    """Export the most lung-focused trial whose metric is within Δ of the best to RESULTS/selected/."""
    from search.select import export_selection

    export_selection(results, within=within, metric=metric,
                     log=lambda m: console.print(m, markup=False, highlight=False))


@app.command()
def explain(
    images: list[Path] = typer.Argument(..., help="Image files (PNG/JPEG/…)."),
    model: Path = typer.Option(..., help="An exported model directory (best/ or selected/)."),
    out: Path = typer.Option(..., help="Output directory: <image>.overlay.png, <image>.cam.npy, explain.jsonl."),
    target: str = typer.Option("predicted", help="'predicted' or a class name."),
    mask: Optional[list[Path]] = typer.Option(None, help="Lung mask per image (default: the lung atlas)."),
) -> None:
    """Grad-CAM of an exported model on images: overlay PNG, CAM .npy and a JSON line each."""
    from search.explain_images import explain_images

    for line in explain_images(model, images, out, target=target, masks=mask):
        print(json.dumps(line))


@app.command()
def backbones(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the backbone registry: source, parameters, Grad-CAM layer, offline weights here."""
    from trainable.backbones import describe_backbones

    rows = describe_backbones(check_offline=True)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table("name", "source", "params", "Grad-CAM layer", "offline weights")
    for r in rows:
        table.add_row(str(r["name"]), str(r.get("source", "")), _millions(r.get("params")),
                      str(r.get("target_layer", "")), str(r.get("offline_weights", "")))
    Console().print(table)


def _millions(n: object) -> str:
    return f"{n / 1e6:.1f}M" if isinstance(n, (int, float)) else str(n)


class _UserError(Exception):
    pass


def _user_error(message: str) -> _UserError:
    return _UserError(message)


def _user_errors() -> tuple[type[BaseException], ...]:
    from trainable.backbones import UnknownBackboneError
    from trainable.errors import CxrtuneError
    from trainable.weights import WeightsNotFoundError

    return (_UserError, CxrtuneError, UnknownBackboneError, WeightsNotFoundError, FileNotFoundError)


def main() -> None:
    try:
        app(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - user errors become one line; anything else re-raises
        cause = getattr(e, "cause", None) or e  # a RayTaskError carries the task's exception
        if isinstance(cause, _user_errors()):
            console.print(f"error: {cause}", markup=False, highlight=False)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
