"""The `autounet` command: every command is one call of its twin in :mod:`autounet.api`, whose
signature and docstring make the command's options and help (:mod:`autounet.signature_cli`). Here
are only how the parameters are spelled on the command line and what each command prints."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from autounet import __version__, api
from autounet.signature_cli import Command, build, table

# How keyword-only API parameters are spelled where not `--param-name PARAM_NAME` (grammar: autounet.signature_cli);
# a command's positional ones and its own spellings are given where it is registered, below.
SPELLINGS = table("""
    work=--work -w W; workers=-j --workers N; name=--name -n NAME; configurations=-c --configs CONFIG
    fingerprint=F; gpu_memory_target_gb=--gpu-memory-target GB; patch_size=N; plans_from=SOURCE; pretrained=SOURCE
    loggers=--logger NAME append; iterations_per_epoch=--iters-per-epoch; validation_iterations=--val-iters
    loader_threads=--threads; validate=--no-validate; validation_tta=--no-validation-tta; drop_block=P
    deep_supervision_heads=N; features=F; width_multiplier=X; foreground_channel=--no-foreground-channel
    model=-m --model MODEL; folds=-f --folds K; checkpoints=--checkpoint one; postprocess=--no-postprocessing
    tta=--no-tta; memory_limit=GB; skip_complete=--continue; address=ADDR; part=I N; gpus_per_fold=N
    cpus_per_fold=N; max_retries=N; labels=L; regions=NAME=L,L; tolerance_mm=--tolerance MM; ignore_label=V
    json_path=--json OUT; seg=--seg -s S; out=--out -o PNG; channel=N; slices=N; shape=Z Y X; spacing=Z Y X
    spacing_jitter=F; formats=--format one; workspace=--from W/NAME
""")
CLUSTER = {"cluster (Ray; pip install autounet[ray])": "executor address part gpus_per_fold cpus_per_fold max_retries"}
ABLATION = {
    "ablation switches (seed 004 Tables 2-3; stored in the checkpoint, so --resume and inference keep them)": (
        "attention residual drop_block focal deep_supervision_heads features deeper width_multiplier foreground_channel"
    )
}
COMMANDS: list[Command] = []


def command(name: str, spell: str = "", **options):
    """Register the function below as what the command ``name`` (the twin of ``api.NAME``) runs and prints."""

    def register(run):
        function = getattr(api, name.replace("-", "_"))
        COMMANDS.append(Command(name, function, run, table(spell), **options))
        return run

    return register


@command("check")
def _check(kw: dict) -> int:
    report = api.check(**kw)
    print(report.format())
    return 0 if report.ok else 2


@command("plan", "recipe=--recipe ~--preset", hide="options")
def _plan(kw: dict) -> int:
    try:
        result = api.plan(**kw)
    except api.DatasetInvalid:
        print(api.check(kw["raw"], workers=kw["workers"]).format())
        print(f"\nnothing was written to {kw['work'] or 'the workspace'}.", file=sys.stderr)
        return 2
    if not kw["fingerprint"]:
        if result.report is not None:
            for w in result.report.warnings:
                print(f"warning: {w}")
        else:
            print(f"fingerprint up to date: {result.workspace.fingerprint_json} (use --force to recompute)")
    print(f"\nplans for {result.plans.dataset_name} -> {result.workspace.plans_json}")
    print(api.format_plans(result.plans))
    return 0


@command("preprocess", "configurations=-c --configs CONFIG ~--configurations")
def _preprocess(kw: dict) -> int:
    summary = api.preprocess(**kw)
    for ident in summary.configurations:
        folder = summary.workspace.preprocessed_dir(ident)
        print(
            f"{ident}: {summary.written[ident]} case(s) written, {summary.skipped[ident]} already complete -> {folder}"
        )
    rate = f" ({summary.seconds / summary.processed:.2f} s per case)" if summary.processed else ""
    print(f"{summary.processed} of {summary.cases} case(s) processed in {summary.seconds:.1f} s{rate}")
    if summary.failures:
        print(f"\n{len(summary.failures)} case(s) failed:", file=sys.stderr)
        for f in summary.failures:
            print(f"  - {f}", file=sys.stderr)
        return 2
    return 0


VALIDATE_ONLY = "only redo the end-of-training step: predict the fold's validation cases in full and write summary.json"


@command(
    "train",
    "configuration=-c --configs CONFIG ~--configuration; fold=-f --fold FOLD",
    groups=ABLATION,
    extra={"--validate-only": ("validate", VALIDATE_ONLY)},
)
def _train(kw: dict) -> None:
    if kw.pop("validate_only"):  # prints its own line with the mean Dice
        fold = (kw["name"], kw["configuration"], kw["fold"])
        api.validate(*fold, work=kw["work"], device=kw["device"], tta=kw["validation_tta"])
    else:
        api.train(**kw)


@command("predict", "inputs=-i --input IN; output=-o --output OUT", groups=CLUSTER)
def _predict(kw: dict) -> None:
    result = api.predict(**kw)
    if result.postprocessing is not None:
        print(f"post-processing: {result.postprocessing.describe()}")
    skipped = f" ({len(result.skipped)} case(s) already complete, skipped)" if result.skipped else ""
    print(f"{len(result.timings)} segmentation(s) -> {kw['output']}{skipped}")
    timings = api.format_timings(result.timings)
    if timings:
        print(timings)


@command("export", "output=-o --output OUT; checkpoints=--checkpoint C one")
def _export(kw: dict) -> None:
    print(f"exported -> {api.export(**kw)}")


@command("package", "model=W/NAME; output=-o --output FILE.zip")
def _package(kw: dict) -> None:
    created = api.package(**kw)
    model = "+".join(created.configurations)
    post = "with its post-processing" if created.postprocessing else "no post-processing"
    print(
        f"packaged {model} (folds {', '.join(map(str, created.folds))}; {created.checkpoints} checkpoint(s); {post}) "
        f"-> {created.path} ({created.size / 1e6:.1f} MB, SHA-256 {created.sha256})"
    )
    if created.selection_changed:
        print("note: not the model `autounet select` chose; the package's selection.json names the packaged one")
    print(f"predict with it: autounet predict -i IMAGES -o OUT -m {created.path}")


@command("info", "model=FILE.zip|W/NAME")
def _info(kw: dict) -> None:
    print(api.format_info(api.info(**kw)))


@command("show", "images=IMAGE")
def _show(kw: dict) -> None:
    print(api.show(**kw))


@command("evaluate", extra={"--per-case": ("workers", "also print one row per case and class")})
def _evaluate(kw: dict) -> None:
    per_case = kw.pop("per_case")
    kw["json_path"] = api.evaluation_json_path(kw["pred"], kw["json_path"])
    result = api.evaluate(**kw)
    print(api.format_evaluation(result, gt=kw["gt"], per_case=per_case))
    print(f"wrote {kw['json_path']}")


@command("make-synthetic")
def _make_synthetic(kw: dict) -> None:
    out = api.make_synthetic(**kw)
    tests = f" and {kw['test_cases']} test case(s)" if kw["test_cases"] else ""
    print(f"wrote {kw['cases']} training case(s){tests} to {out}")


@command("select")
def _select(kw: dict) -> None:
    print(api.format_selection(api.select(**kw), name=kw["name"], work=kw["work"]))
    ws = api.workspace(kw["name"], work=kw["work"])
    print(f"wrote {ws.selection_json}, {ws.report_md.name} and {ws.report_html.name}")


@command(
    "report",
    "name=W/NAME; markdown=--html; cases=N",
    hide="work html",
    helps={"name": "the dataset's workspace folder"},
)
def _report(kw: dict) -> None:
    kw["work"], kw["name"] = os.path.split(os.path.normpath(os.path.abspath(kw["name"])))
    path = api.report(**kw)
    print(f"wrote {path} and {path.with_name('report.html')}" if kw["markdown"] else f"wrote {path}")


@command("postprocess", "input_dir=IN; output_dir=OUT")
def _postprocess(kw: dict) -> None:
    written = api.postprocess(**kw)
    print(f"{len(written)} segmentation(s) post-processed -> {kw['output_dir']}")


@command("run", "folds=--folds K; recipe=--recipe ~--preset", groups=CLUSTER)
def _run(kw: dict) -> None:
    result = api.run(**kw)
    trained = f"{len(result.trained)} fold(s) trained, {len(result.skipped)} already complete"
    print(f"\nfinished in {result.seconds / 60:.1f} min ({trained})")
    print(f"predict new cases: autounet predict -i IMAGES -o OUT -m {result.workspace.root}")


@command("demo", "folder=--dir DIR")
def _demo(kw: dict) -> None:
    api.demo(**kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autounet", description="Self-configuring U-Net segmentation (nnU-Net method)."
    )
    parser.add_argument("--version", action="version", version=f"autounet {__version__}")
    build(parser, COMMANDS, SPELLINGS, exclusive=(("overwrite", "skip_complete"),), documented=(api.workspace,))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    kw = {k: v for k, v in vars(args).items() if k not in ("command", "run")}
    try:
        return args.run(kw) or 0
    except api.AutounetError as exc:
        print(f"autounet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"autounet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the file system refused: read-only, full, a file where a folder is needed
        print(f"autounet {args.command}: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except MemoryError:  # never swallowed below (an engine failure is not this), said once here
        print(f"autounet {args.command}: error: out of memory (the machine could not allocate enough)", file=sys.stderr)
        return 2


def _os_error(exc: OSError) -> str:
    """``PATH: reason`` (``strerror``, e.g. "No space left on device"), else the error's text."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 else "")
    return f"{where}: {reason}"


if __name__ == "__main__":
    sys.exit(main())
