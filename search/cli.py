"""`cxrtune` command line: run a sweep, make phantom data, list backbones.

Usage errors (an unknown option, a missing argument, a bad option value) print typer's usage
text and exit with code 2; a bare `cxrtune` prints the help and exits with code 2 too (click's
convention for "no command given"). Input errors (bad data, bad space file, unknown backbone,
missing weights) print one line naming the file or field and the rule, and exit with code 2.
Neither shows a traceback.
"""
from __future__ import annotations

import gc
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from search.api import local_ray_env

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Explainability-aware hyperparameter search for chest X-ray models on Ray Tune.")
data_app = typer.Typer(no_args_is_help=True, help="Data sets: check one, or generate phantom chest X-rays.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)


def _show_version(value: bool) -> None:
    if value:
        print(f"cxrtune {package_version()}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                       help="Print the installed cxrtune version and exit.")) -> None:
    pass


def package_version() -> str:
    """The installed `cxrtune` distribution's version ("unknown" when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxrtune")
    except PackageNotFoundError:
        return "unknown (not installed)"


@app.command()
def run(
    space: str = typer.Option("default", help="Space file, or the name of one in spaces/ (default: spaces/default.yaml)."),
    data: Optional[str] = typer.Option(None, help="Data directory (manifest.csv or class folders), or 'synthetic'; overrides the space file."),
    out: Path = typer.Option(Path("results"), help="Parent directory of the results."),
    name: Optional[str] = typer.Option(None, help="Results go to OUT/NAME (default: the space's name plus a timestamp)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address ('auto', 'ray://host:10001'); default: a local cluster."),
    data_format: str = typer.Option("auto", "--format", help="Data layout: auto, manifest, ieee8023, kermany, covid19_radiography, dicom, folders."),
    mlflow: Optional[str] = typer.Option(None, "--mlflow", metavar="URI", help="Log every trial to MLflow: a directory / file:///path (local file store) or http(s)://server. Needs the `track` extra (mlflow-skinny)."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Write TensorBoard event files per trial (tensorboard --logdir OUT/NAME/tune)."),
    storage: Optional[str] = typer.Option(None, "--storage", metavar="DIR|URI", help="Where Tune keeps the experiment (checkpoints, state): a directory every node shares, or s3://bucket/prefix; default OUT/NAME/tune. Needed on multi-node clusters."),
) -> None:
    """Run a sweep: OptunaSearch + ASHA over the space, patient-grouped CV, Grad-CAM lung focus.

    SIGTERM (or `cxrtune stop`) stops it with its state saved: exit code 143, `cxrtune resume` goes on."""
    import time

    local_ray_env(address)
    from search.space import load_space, resolve_space_file

    spec = load_space(space)  # the space and the data path are checked before Ray and torch are imported
    if data is not None and data != "synthetic" and not Path(data).exists():
        raise _user_error(f"data path {data} does not exist")
    from search.durable import check_storage

    check_storage(storage)  # before Ray starts: an unusable --storage is one line
    from search.sweep import run_sweep

    run_name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _resumable():
        run_sweep(spec, space_file=resolve_space_file(space), data=data, data_format=data_format,
                  out=out, name=run_name, address=address, mlflow=mlflow, tensorboard=tensorboard,
                  storage=storage,
                  log=lambda m: console.print(m, markup=False, highlight=False))


@app.command()
def report(
    results: Path = typer.Argument(..., help="A sweep's results directory (holds trials.csv)."),
    out: Optional[Path] = typer.Option(None, help="Output file (default: RESULTS/report.html)."),
) -> None:
    """Write report.html: one self-contained page with summary, leaderboard, plots and Grad-CAM montages."""
    from search.report.html import write_report

    write_report(results, out=out, log=lambda m: console.print(m, markup=False, highlight=False))


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Output directory (manifest.csv, images/, masks/)."),
    n_patients: int = typer.Option(60, help="Number of patients (classes balanced)."),
    size: int = typer.Option(256, help="Image side in pixels."),
    shortcut: float = typer.Option(0.0, help="Marker/class correlation P: P of covid images carry an edge marker, 1-P of the others; 0 = no markers."),
    seed: int = typer.Option(0, help="Random seed (same seed, same bytes)."),
    lesion_strength: float = typer.Option(1.0, help="Lesion brightness factor (lower: subtler true signal)."),
    confound: str = typer.Option("none", help="'anatomy': adult-like vs child-like bodies correlated with the class (manifest column `body`)."),
    confound_rate: float = typer.Option(0.85, help="With --confound anatomy: share of covid patients that are adults and of the others that are children, in [0.5, 1]; 0.5 = body independent of the class (a test set)."),
) -> None:
    """Generate deterministic phantom chest X-rays with true lung masks and optional shortcut markers."""
    from trainable.data.phantom import synthesize

    if out.exists() and (out / "manifest.csv").exists():
        raise _user_error(f"{out} already holds a data set (manifest.csv); choose another --out")
    try:
        manifest = synthesize(out, n_patients=n_patients, size=size, shortcut=shortcut, seed=seed,
                              lesion_strength=lesion_strength, confound=confound, confound_rate=confound_rate)
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
    from search.api import select_trial

    select_trial(results, within=within, metric=metric, log=lambda m: console.print(m, markup=False, highlight=False))


@app.command()
def explain(
    images: list[Path] = typer.Argument(..., help="Image files (PNG/JPEG/…)."),
    model: Path = typer.Option(..., help="An exported model directory (best/ or selected/)."),
    out: Path = typer.Option(..., help="Output directory: <image>.overlay.png, <image>.cam.npy, explain.jsonl."),
    target: str = typer.Option("predicted", help="'predicted' or a class name."),
    mask: Optional[list[Path]] = typer.Option(None, help="Lung mask per image (default: the lung atlas)."),
) -> None:
    """Grad-CAM of an exported model on images: overlay PNG, CAM .npy and a JSON line each."""
    from trainable.model_dir import check_model_dir

    check_model_dir(model)  # a broken export is one line before torch is imported
    from search.outputs.explain_images import explain_images

    for line in explain_images(model, images, out, target=target, masks=mask):
        print(json.dumps(line))


@app.command()
def backbones(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the backbone aliases with the exact timm name each means, parameters, Grad-CAM layer, offline weights."""
    from trainable.models.backbones import describe_backbones

    rows = describe_backbones(check_offline=True)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    print_table(("name", "exact timm name", "source", "params", "Grad-CAM layer", "offline weights"),
                [(str(r["name"]), str(r.get("timm_name") or r.get("arch", "")), str(r.get("source", "")),
                  _millions(r.get("params")), str(r.get("target_layer", "")), str(r.get("offline_weights", "")))
                 for r in rows])
    # on stderr: stdout stays one table row per alias (scripts cut it)
    print("Any other timm.list_models() name is accepted verbatim, with an optional pretrained tag "
          "(resnet50.a1_in1k, convnext_tiny); its Grad-CAM layer comes from timm's feature_info.", file=sys.stderr)


@data_app.command("check")
def data_check(
    path: Path = typer.Argument(..., help="Data directory (or manifest CSV) in any supported layout."),
    data_format: str = typer.Option("auto", "--format", help="Data layout: auto, manifest, ieee8023, kermany, covid19_radiography, dicom, folders."),
    group_by: str = typer.Option("source", "--group-by", help="Column for the confounding report (source, view, sex, site, age_band, any manifest column)."),
) -> None:
    """Counts, patients, masks, sizes, duplicates, confounding and unreadable files; exit 2 when not usable."""
    from trainable.data.datacheck import check_data

    result = check_data(path, format=data_format, group_by=group_by)
    print("\n".join(result.lines))
    if not result.usable:
        sys.exit(2)


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="An exported model directory (model.pt + metadata.json), e.g. RESULTS/best."),
    data: Path = typer.Option(..., help="Data directory (or manifest CSV) in any supported layout."),
    data_format: str = typer.Option("auto", "--format", help="Data layout: auto, manifest, ieee8023, kermany, covid19_radiography, dicom, folders."),
    out: Optional[Path] = typer.Option(None, help="Also write the results as JSON to this file."),
) -> None:
    """Score an exported model on a data set: accuracy, balanced accuracy, AUC, per-class P/R/F1, confusion matrix, lung_mass, edge_mass."""
    from trainable.model_dir import check_model_dir

    check_model_dir(model)  # a broken export is one line before torch is imported
    from search.outputs.evaluate import evaluate as evaluate_model
    from search.outputs.evaluate import report_lines, write_json

    if not data.exists():
        raise _user_error(f"data path {data} does not exist")
    result = evaluate_model(model, data, format=data_format,
                            log=lambda m: console.print(m, markup=False, highlight=False))
    print("\n".join(report_lines(result)))
    if out is not None:
        console.print(f"wrote {write_json(result, out)}", markup=False, highlight=False)


# ------------------------------------------------------------------ cluster: resume and jobs

@app.command()
def resume(
    results: Path = typer.Argument(..., help="The results directory of a stopped or crashed sweep (holds space.json)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address ('auto', 'ray://host:10001'); default: a local cluster."),
) -> None:
    """Continue a stopped sweep: unfinished and errored trials resume from their last checkpoints."""
    local_ray_env(address)
    from search.sweep import resume_sweep

    with _resumable():
        resume_sweep(results, address=address, log=lambda m: console.print(m, markup=False, highlight=False))


_JOB_ADDRESS = typer.Option(None, "--address", help="Ray job server (dashboard) URL; default $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265 (the local end of `ray dashboard cluster.yaml`).")


@app.command()
def submit(
    space: str = typer.Option("default", help="Space file, or the name of one in spaces/ (validated here, shipped with the job)."),
    data: Optional[str] = typer.Option(None, help="Data directory ON THE CLUSTER's head node, or 'synthetic'; default: the space file's."),
    out: str = typer.Option("~/cxrtune-results", help="Parent directory of the results on the head node (a shared mount keeps them)."),
    name: Optional[str] = typer.Option(None, help="Results go to OUT/NAME (default: the space's name plus a timestamp)."),
    storage: Optional[str] = typer.Option(None, "--storage", metavar="DIR|URI", help="Tune experiment storage every node reaches (s3://bucket/prefix or a shared directory); the report files are copied there too."),
    resume_dir: Optional[str] = typer.Option(None, "--resume", metavar="RESULTS", help="Instead of a new sweep, resume this results directory on the cluster."),
    follow: bool = typer.Option(False, "--follow", help="Stream the job's output until it ends; exit 0 only if it SUCCEEDED."),
    address: Optional[str] = _JOB_ADDRESS,
) -> None:
    """Submit a sweep to a Ray cluster as a job (JobSubmissionClient; the code travels as the working_dir)."""
    from search import jobs

    sid = jobs.submit_sweep(address, space=space, data=data, out=out, name=name, storage=storage,
                            resume=resume_dir)
    print(sid)
    console.print(f"submitted {sid}: `cxrtune status {sid}`, `cxrtune logs {sid} --follow`, "
                  f"`cxrtune stop {sid}`", markup=False, highlight=False)
    if follow:
        _follow(address, sid)


@app.command()
def status(job: str = typer.Argument(..., help="Submission id (see `cxrtune jobs`)."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
           address: Optional[str] = _JOB_ADDRESS) -> None:
    """A job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), times and results directory."""
    from search import jobs

    info = jobs.job_status(address, job)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        if v:
            print(f"{k:>13}: {v}")


@app.command()
def logs(job: str = typer.Argument(..., help="Submission id."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
         address: Optional[str] = _JOB_ADDRESS) -> None:
    """A job's output (the sweep's progress lines); --follow streams it."""
    from search import jobs

    if follow:
        _follow(address, job)
    else:
        sys.stdout.write(jobs.job_logs(address, job))


@app.command()
def stop(job: str = typer.Argument(..., help="Submission id."),
         wait: float = typer.Option(60.0, help="Seconds to wait for the job to end (0: don't wait)."),
         address: Optional[str] = _JOB_ADDRESS) -> None:
    """Stop a job: the sweep gets SIGTERM, Tune saves its state; `cxrtune submit --resume` continues it."""
    from search import jobs

    final = jobs.stop_job(address, job, wait_s=wait)
    results = jobs.job_status(address, job).get("results")
    print(final)
    if results:
        console.print(f"continue it with: cxrtune submit --resume {results}", markup=False, highlight=False)


@app.command("jobs")
def list_jobs(address: Optional[str] = _JOB_ADDRESS,
              as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Every job on the cluster, newest first."""
    from search import jobs

    rows = jobs.list_jobs(address)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print_table(("submission id", "status", "start", "end", "results"),
                [(r["submission_id"], r["status"], r["start"], r["end"], r["results"]) for r in rows])


def _follow(address: Optional[str], job: str) -> None:
    from search import jobs

    for chunk in jobs.follow_logs(address, job):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    final = jobs.wait_for(address, job, timeout_s=30)
    console.print(f"job {job}: {final}", markup=False, highlight=False)
    if final != "SUCCEEDED":
        raise typer.Exit(1)


@contextmanager
def _resumable():
    """A sweep stopped by SIGTERM exits with code 143 and says how to resume it."""
    from search.durable import SweepInterrupted

    try:
        yield
    except SweepInterrupted as e:
        console.print(str(e), markup=False, highlight=False)
        raise typer.Exit(143) from None


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A rich table on a terminal; tab-separated lines (a header first) in a pipe or file, where a
    table cut at 80 columns would hide the values a script reads."""
    if not sys.stdout.isatty():
        for row in (header, *rows):
            print("\t".join(str(v).replace("\t", " ") for v in row))
        return
    table = Table(*header)
    for row in rows:
        table.add_row(*map(str, row))
    Console().print(table)


def _millions(n: object) -> str:
    return f"{n / 1e6:.1f}M" if isinstance(n, (int, float)) else str(n)


class _UserError(Exception):
    pass


def _user_error(message: str) -> _UserError:
    return _UserError(message)


def _user_errors() -> tuple[type[BaseException], ...]:
    from trainable.errors import CxrtuneError
    from trainable.models.registry import UnknownBackboneError
    from trainable.models.weights import WeightsNotFoundError

    return (_UserError, CxrtuneError, UnknownBackboneError, WeightsNotFoundError, FileNotFoundError)


def main() -> None:
    """Standalone mode: typer itself prints usage errors (exit 2), `--help` and `--version`, and
    turns `raise typer.Exit(n)` into exit code n and Ctrl-C into 130. What a command raises comes
    out here: a user error becomes one line and exit code 2, anything else a traceback."""
    try:
        app()
    except Exception as e:  # noqa: BLE001 - user errors become one line; anything else re-raises
        cause = getattr(e, "cause", None) or e  # a RayTaskError carries the task's exception
        if isinstance(cause, _user_errors()):
            console.print(f"error: {cause}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)
        raise
    finally:
        # the interpreter's last garbage collection walks every object torch, Ray and Tune made
        # (~1.5 s after a sweep); they die with the process anyway, so that walk is skipped
        gc.freeze()


if __name__ == "__main__":
    main()
