"""The `autounet` command: argument parsing and printing only. Every command is one call of its
twin in :mod:`autounet.api` (the only module imported here), which does the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from autounet import __version__, api


def _work(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", "-w", metavar="W", help="workspace (default: $AUTOUNET_WORK, else ./autounet_work)")


class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores like the new one and says so on stderr."""

    def __init__(self, option_strings: list[str], dest: str, use: str, **kwargs: object):
        self.use = use
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"autounet: {option_string} is deprecated, use {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _alias(parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup, old: str, use: str, **kwargs) -> None:
    """Keep ``old`` working (hidden from --help) for the option spelled ``use`` now."""
    parser.add_argument(
        old, action=_DeprecatedAlias, use=use, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs
    )


def _configs(parser: argparse.ArgumentParser, text: str, old: str | None = None) -> None:
    """``-c/--configs CONFIG ...``: the configurations a command works on."""
    parser.add_argument("-c", "--configs", dest="configurations", nargs="+", metavar="CONFIG", help=text)
    if old:
        _alias(parser, old, "-c/--configs", dest="configurations", nargs="+", metavar="CONFIG")


def _engine(parser: argparse.ArgumentParser) -> None:
    """``--engine`` and ``--precision`` of prediction."""
    parser.add_argument(
        "--engine",
        choices=["auto", "torch", "openvino", "onnxruntime"],
        default="auto",
        help="what runs the networks (default auto: OpenVINO on a CPU where installed, else PyTorch); a missing "
        "or failing engine falls back to PyTorch with a note",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="auto (default): bf16 where the hardware runs it natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs), else "
        "fp32 (fp16 on older GPUs); fp32 gives PyTorch's full-precision results",
    )


def _training_precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="training precision: auto (default: bf16 on GPUs from Ampere on, fp16 with a gradient scaler before; "
        "bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32), fp32, bf16 or fp16 (CUDA only)",
    )


def _recipe(parser: argparse.ArgumentParser) -> None:
    """``--recipe nnunet|brats`` and ``--patch-size`` of planning (``plan`` and ``run``)."""
    choices = ["nnunet", "brats", "nnunetv2", "resenc-m", "resenc-l", "resenc-xl"]
    parser.add_argument(
        "--recipe",
        choices=choices,
        help="planning recipe: nnunet (default: the nnU-Net paper's planner), brats (NVIDIA's BraTS recipe: one "
        "3d_fullres configuration, WT/TC/ET regions, foreground channel, deeper encoder, nvidia training preset), "
        "nnunetv2 (nnU-Net v2's planner) or resenc-m / resenc-l / resenc-xl (nnU-Net v2's residual-encoder presets)",
    )
    parser.add_argument(
        "--gpu-memory-target",
        type=float,
        metavar="GB",
        dest="gpu_memory_target",
        help="--recipe nnunetv2 / resenc-*: GPU memory to plan patch and batch for (default: 8, 8, 24, 40 GB)",
    )
    _alias(parser, "--preset", "--recipe", dest="recipe", choices=choices)
    parser.add_argument(
        "--patch-size",
        type=int,
        nargs="+",
        metavar="N",
        help="--recipe brats only: the 3D patch (Z Y X) instead of 128^3 (a CPU convenience, e.g. 64 64 64)",
    )


def _pretrained(parser: argparse.ArgumentParser) -> None:
    """``--pretrained SOURCE`` of ``train`` and ``run``."""
    parser.add_argument(
        "--pretrained",
        metavar="SOURCE",
        help="start from the weights of SOURCE (a checkpoint, fold folder, W/NAME/results/CONFIG, workspace W/NAME or "
        "model package .zip) whose name and shape match; the output heads are re-initialised when the labels differ. "
        "Only for a fold that starts from scratch (--resume continues the fold's own checkpoint)",
    )


def _loggers(parser: argparse.ArgumentParser) -> None:
    """``--logger NAME`` (repeatable) of ``train`` and ``run``."""
    parser.add_argument(
        "--logger",
        dest="loggers",
        action="append",
        choices=["tensorboard", "wandb", "mlflow"],
        metavar="NAME",
        help="also log every epoch to an experiment tracker: tensorboard, wandb or mlflow (repeatable; pip install "
        "'autounet[NAME]'). Local by default: W/NAME/trackers/ (W&B offline; MLFLOW_TRACKING_URI and WANDB_MODE "
        "choose otherwise). A missing or failing tracker is a warning, never a stop",
    )


def _plans_from(parser: argparse.ArgumentParser) -> None:
    """``--plans-from SOURCE`` of ``plan`` and ``run``."""
    parser.add_argument(
        "--plans-from",
        metavar="SOURCE",
        help="keep the networks, patch, spacing and normalisation of SOURCE's plans (a workspace W/NAME, a model "
        "package .zip or a plans.json), e.g. to fine-tune its trained networks with --pretrained",
    )


def _executor(parser: argparse.ArgumentParser, what: str) -> argparse._ArgumentGroup:
    """``--executor local|ray`` and ``--address`` (run and predict)."""
    g = parser.add_argument_group("cluster (Ray; pip install autounet[ray])")
    g.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help=f"local (default): this process; ray: the {what} as tasks of a Ray cluster",
    )
    g.add_argument(
        "--address", metavar="ADDR", help="the Ray cluster to join: auto or HOST:PORT (default: a local Ray instance)"
    )
    return g


def _workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-j", "--workers", type=int, default=None, metavar="N", help="worker processes (default: CPU cores, at most 8)"
    )


def _cmd_check(args: argparse.Namespace) -> int:
    report = api.check(args.raw, workers=args.workers)
    print(report.format())
    return 0 if report.ok else 2


def _cmd_plan(args: argparse.Namespace) -> int:
    try:
        result = api.plan(
            args.raw,
            work=args.work,
            name=args.name,
            fingerprint=args.fingerprint,
            recipe=args.recipe,
            patch_size=args.patch_size,
            gpu_memory_target_gb=args.gpu_memory_target,
            force=args.force,
            workers=args.workers,
            plans_from=args.plans_from,
        )
    except api.DatasetInvalid:
        print(api.check(args.raw, workers=args.workers).format())
        print(f"\nnothing was written to {args.work or 'the workspace'}.", file=sys.stderr)
        return 2
    if not args.fingerprint:
        if result.report is not None:
            for w in result.report.warnings:
                print(f"warning: {w}")
        else:
            print(f"fingerprint up to date: {result.workspace.fingerprint_json} (use --force to recompute)")
    print(f"\nplans for {result.plans.dataset_name} -> {result.workspace.plans_json}")
    print(api.format_plans(result.plans))
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    summary = api.preprocess(
        args.name,
        work=args.work,
        configurations=args.configurations,
        float16=args.float16,
        label_interpolation=args.label_interpolation,
        force=args.force,
        workers=args.workers,
    )
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


def _cmd_train(args: argparse.Namespace) -> int:
    if args.validate_only:  # prints its own line with the mean Dice
        api.validate(
            args.name, args.configuration, args.fold, work=args.work, device=args.device, tta=not args.no_validation_tta
        )
        return 0
    api.train(
        args.name,
        args.configuration,
        args.fold,
        work=args.work,
        preset=args.preset,
        augmentation=args.augmentation,
        epochs=args.epochs,
        iterations_per_epoch=args.iters_per_epoch,
        validation_iterations=args.val_iters,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        max_minutes=args.max_minutes,
        resume=args.resume,
        loader_threads=args.threads,
        validate=not args.no_validate,
        validation_tta=not args.no_validation_tta,
        attention=True if args.attention else None,
        residual=True if args.residual else None,
        drop_block=args.drop_block,
        focal=True if args.focal else None,
        deep_supervision_heads=args.deep_supervision_heads,
        features=args.features,
        deeper=args.deeper,
        width_multiplier=args.width_multiplier,
        foreground_channel=False if args.no_foreground_channel else None,
        precision=args.precision,
        pretrained=args.pretrained,
        loggers=args.loggers,
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    result = api.predict(
        args.input,
        args.output,
        model=args.model,
        folds=args.folds,
        checkpoints=[args.checkpoint] if args.checkpoint else None,
        device=args.device,
        tta=not args.no_tta,
        step=args.step,
        postprocess=not args.no_postprocessing,
        save_probabilities=args.save_probabilities,
        png=args.png,
        overwrite=args.overwrite,
        skip_complete=args.skip_complete,
        engine=args.engine,
        precision=args.precision,
        name_by=args.name_by,
        dicom_seg=args.dicom_seg,
        executor=args.executor,
        address=args.address,
        part=args.part,
        memory_limit=args.memory_limit,
    )
    if result.postprocessing is not None:
        print(f"post-processing: {result.postprocessing.describe()}")
    skipped = f" ({len(result.skipped)} case(s) already complete, skipped)" if result.skipped else ""
    print(f"{len(result.timings)} segmentation(s) -> {args.output}{skipped}")
    timings = api.format_timings(result.timings)
    if timings:
        print(timings)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    document = api.export(
        args.model,
        args.output,
        formats=["onnx", "openvino"] if args.format == "all" else [args.format],
        folds=args.folds,
        checkpoints=[args.checkpoint] if args.checkpoint else None,
        overwrite=args.overwrite,
    )
    print(f"exported -> {document}")
    return 0


def _cmd_package(args: argparse.Namespace) -> int:
    created = api.package(
        args.model,
        args.output,
        configurations=args.configurations,
        folds=args.folds,
        description=args.description,
        license=args.license,
        overwrite=args.overwrite,
        with_report=args.with_report,
    )
    model = "+".join(created.configurations)
    post = "with its post-processing" if created.postprocessing else "no post-processing"
    print(
        f"packaged {model} (folds {', '.join(map(str, created.folds))}; {created.checkpoints} checkpoint(s); {post}) "
        f"-> {created.path} ({created.size / 1e6:.1f} MB, SHA-256 {created.sha256})"
    )
    if created.selection_changed:
        print("note: not the model `autounet select` chose; the package's selection.json names the packaged one")
    print(f"predict with it: autounet predict -i IMAGES -o OUT -m {created.path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    print(api.format_info(api.info(args.model)))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    print(api.show(args.images, seg=args.seg, out=args.out, channel=args.channel, slices=args.slices))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    out = api.evaluation_json_path(args.pred, args.json)
    result = api.evaluate(
        args.pred,
        args.gt,
        labels=args.labels,
        regions=args.regions,
        brats=args.brats,
        tolerance_mm=args.tolerance,
        json_path=out,
        workers=args.workers,
        ignore_label=args.ignore_label,
    )
    print(api.format_evaluation(result, gt=args.gt, per_case=args.per_case))
    print(f"wrote {out}")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    selection = api.select(args.name, work=args.work, configurations=args.configurations, workers=args.workers)
    print(api.format_selection(selection, name=args.name, work=args.work))
    ws = api.workspace(args.name, work=args.work)
    print(f"wrote {ws.selection_json}, {ws.report_md.name} and {ws.report_html.name}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import os

    parent, name = os.path.split(os.path.normpath(os.path.abspath(args.workspace)))
    path = api.report(name, work=parent, markdown=not args.html, html=True, cases=args.cases)
    print(f"wrote {path}" if args.html else f"wrote {path} and {path.with_name('report.html')}")
    return 0


def _cmd_postprocess(args: argparse.Namespace) -> int:
    written = api.postprocess(
        args.input, args.output, workspace=args.source, workers=args.workers, overwrite=args.overwrite
    )
    print(f"{len(written)} segmentation(s) post-processed -> {args.output}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    result = api.run(
        args.raw,
        work=args.work,
        name=args.name,
        configurations=args.configurations,
        folds=args.folds,
        epochs=args.epochs,
        iterations_per_epoch=args.iters_per_epoch,
        validation_iterations=args.val_iters,
        max_minutes=args.max_minutes,
        recipe=args.recipe,
        patch_size=args.patch_size,
        gpu_memory_target_gb=args.gpu_memory_target,
        width_multiplier=args.width_multiplier,
        validation_tta=not args.no_validation_tta,
        device=args.device,
        workers=args.workers,
        seed=args.seed,
        precision=args.precision,
        plans_from=args.plans_from,
        pretrained=args.pretrained,
        executor=args.executor,
        address=args.address,
        gpus_per_fold=args.gpus_per_fold,
        cpus_per_fold=args.cpus_per_fold,
        max_retries=args.max_retries,
        loggers=args.loggers,
    )
    print(
        f"\nfinished in {result.seconds / 60:.1f} min ({len(result.trained)} fold(s) trained, {len(result.skipped)} already complete)"
    )
    print(f"predict new cases: autounet predict -i IMAGES -o OUT -m {result.workspace.root}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    api.demo(args.dir, epochs=args.epochs, iterations_per_epoch=args.iters_per_epoch, device=args.device)
    return 0


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    out = api.make_synthetic(
        args.out,
        cases=args.cases,
        test_cases=args.test_cases,
        shape=args.shape,
        spacing=args.spacing,
        spacing_jitter=args.spacing_jitter,
        modality=args.modality,
        channels=args.channels,
        classes=args.classes,
        seed=args.seed,
        layout=args.layout,
    )
    print(
        f"wrote {args.cases} training case(s)"
        + (f" and {args.test_cases} test case(s)" if args.test_cases else "")
        + f" to {out}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autounet", description="Self-configuring U-Net segmentation (nnU-Net method)."
    )
    parser.add_argument("--version", action="version", version=f"autounet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "check",
        help="validate a raw dataset and print a report; writes nothing",
        description="Validate a raw dataset (MSD or nnU-Net v2 layout). Exit code 2 lists every problem with its case.",
    )
    p.add_argument("raw", metavar="RAW", help="dataset folder holding dataset.json")
    _workers(p)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "plan",
        help="check + fingerprint + plans for all configurations",
        description="Check and fingerprint RAW, then plan every configuration into W/NAME/. With --fingerprint, plan from a fingerprint.json alone.",
    )
    p.add_argument("raw", metavar="RAW", nargs="?", help="dataset folder holding dataset.json")
    _work(p)
    p.add_argument("--name", "-n", metavar="NAME", help="dataset name in the workspace (default: RAW's folder name)")
    p.add_argument("--fingerprint", metavar="F", help="plan from this fingerprint.json instead of a raw dataset")
    p.add_argument("--force", action="store_true", help="recompute the fingerprint even if it is up to date")
    _recipe(p)
    _plans_from(p)
    _workers(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "preprocess",
        help="write preprocessed data for the configurations",
        description="Crop, resample and normalise every case of W/NAME for the planned configurations, into "
        "W/NAME/preprocessed/CONFIG/. Resumable: complete cases are skipped.",
    )
    p.add_argument("name", metavar="NAME", help="dataset name in the workspace")
    _configs(p, "configurations to preprocess (default: all planned)", old="--configurations")
    _work(p)
    p.add_argument("--float16", action="store_true", help="store images as float16 (half the disk and I/O)")
    p.add_argument(
        "--label-interpolation",
        choices=["nearest", "linear"],
        default="nearest",
        help="label resampling: nearest neighbour (the paper) or linear interpolation of the one-hot maps + argmax",
    )
    p.add_argument("--force", action="store_true", help="redo cases that are already complete")
    _workers(p)
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser(
        "train",
        help="train one fold of a configuration",
        description="Train one cross-validation fold (or -f all) of a configuration of W/NAME. Checkpoints, log.jsonl and "
        "progress.png go to W/NAME/results/CONFIG/fold_K/ after every epoch. Multi-process: torchrun --nproc_per_node=N -m autounet train ...",
    )
    p.add_argument("name", metavar="NAME", help="dataset name in the workspace")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "-c",
        "--configs",
        dest="configuration",
        metavar="CONFIG",
        help="2d, 3d_fullres, 3d_lowres or 3d_cascade_fullres",
    )
    _alias(g, "--configuration", "-c/--configs", dest="configuration", metavar="CONFIG")
    p.add_argument("-f", "--fold", required=True, metavar="FOLD", help="0..4, or 'all' to train on every case")
    _work(p)
    p.add_argument(
        "--preset",
        help="training preset: paper, nvidia, poly, or a JSON file (default: the plan's: paper, nvidia for --recipe brats)",
    )
    p.add_argument(
        "--augmentation",
        help="augmentation preset (default: the plan's, else the training preset's): paper, extended, nvidia, or a JSON file",
    )
    p.add_argument("--epochs", type=int, help="maximum epochs (extends a finished run with --resume)")
    p.add_argument("--iters-per-epoch", type=int, help="training iterations per epoch (default 250)")
    p.add_argument("--val-iters", type=int, help="validation batches per epoch (default 50)")
    p.add_argument("--batch-size", type=int, help="global batch size (default: the plan's)")
    p.add_argument("--lr", type=float, help="initial learning rate (default: the preset's)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda when present)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the network initialisation and of every batch (default 0)"
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        help="end training cleanly, with a final checkpoint, when this much time has passed",
    )
    p.add_argument("--resume", action="store_true", help="continue from checkpoint_latest.pt")
    _pretrained(p)
    _loggers(p)
    p.add_argument("--threads", type=int, help="background loader threads (default: 1 on the CPU, more beside a GPU)")
    p.add_argument(
        "--validate-only",
        action="store_true",
        help="only redo the end-of-training step: predict the fold's validation cases in full and write summary.json",
    )
    p.add_argument(
        "--no-validate", action="store_true", help="skip the end-of-training prediction of the validation cases"
    )
    p.add_argument(
        "--no-validation-tta",
        action="store_true",
        help="no mirroring in the end-of-training prediction (faster on CPU)",
    )
    g = p.add_argument_group(
        "ablation switches (seed 004 Tables 2-3; stored in the checkpoint, so --resume and inference keep them)"
    )
    g.add_argument("--attention", action="store_true", help="attention gates on the decoder's skip connections")
    g.add_argument("--residual", action="store_true", help="residual conv blocks in encoder and decoder")
    g.add_argument("--drop-block", type=float, metavar="P", help="DropBlock with probability P (block size 5)")
    g.add_argument(
        "--focal", action="store_true", help="Focal loss (gamma 2) instead of binary cross-entropy (CE for softmax)"
    )
    g.add_argument(
        "--deep-supervision-heads", type=int, metavar="N", help="extra output heads below full resolution (0: off)"
    )
    g.add_argument("--features", type=int, nargs="+", metavar="F", help="features per encoder stage (more: deeper)")
    g.add_argument("--deeper", action="store_true", help="seed 004's encoder: 64, 96, 128, 192, 256, 384, 512")
    g.add_argument("--width-multiplier", type=float, metavar="X", help="every stage's features times X")
    _training_precision(p)
    g.add_argument(
        "--no-foreground-channel",
        action="store_true",
        help="drop the one-hot foreground input channel of --recipe brats plans (inference drops it too)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "predict",
        help="segment a folder of images (or files)",
        description="Segment raw images with a trained model: preprocessing as in training, sliding window (step 1/2 "
        "patch, Gaussian weights), mirroring test-time augmentation, the folds' average, reverted to the input's grid "
        "and written with its exact geometry. Inputs in MSD naming (one file per case) or nnU-Net v2 naming "
        "(CASE_0000.nii.gz, one file per channel), or folders (trees) of DICOM series: one case per series.",
    )
    p.add_argument(
        "-i", "--input", nargs="+", required=True, metavar="IN", help="folder(s) and/or image file(s); DICOM folders"
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument(
        "-m",
        "--model",
        required=True,
        metavar="MODEL",
        help="W/NAME (the selected model), W/NAME/results/CONFIG (all its folds), one fold_K folder, or a model "
        "package FILE.zip (`autounet package`)",
    )
    p.add_argument("-f", "--folds", nargs="+", metavar="K", help="folds to ensemble (default: every trained fold)")
    p.add_argument(
        "--checkpoint",
        choices=["final", "best", "second_best", "latest"],
        help="checkpoint of each fold (default: final, or the training preset's choice)",
    )
    p.add_argument(
        "--no-postprocessing", action="store_true", help="with -m W/NAME: do not apply the selected post-processing"
    )
    p.add_argument("--no-tta", action="store_true", help="no mirroring test-time augmentation (2**axes times faster)")
    p.add_argument("--step", type=float, default=0.5, help="tile step as a fraction of the patch (default 0.5)")
    p.add_argument("--save-probabilities", action="store_true", help="also write CASE.npz with the class probabilities")
    p.add_argument("--png", action="store_true", help="also write CASE.png: slices with the segmentation overlaid")
    p.add_argument(
        "--memory-limit",
        type=float,
        metavar="GB",
        help="host memory a case may take (default: what the machine has free); a case estimated above it is "
        "refused before anything is written, and cases run one at a time when overlapping ones would not fit",
    )
    p.add_argument(
        "--name-by",
        choices=["series", "patientid"],
        default="series",
        help="name the cases of DICOM series by SeriesInstanceUID (default) or PatientID (several series of a "
        "patient: PATIENTID_1, _2, ... in SeriesNumber order)",
    )
    p.add_argument(
        "--dicom-seg",
        action="store_true",
        help="DICOM inputs: also write CASE.dcm, a DICOM SEG that references the series (pip install autounet[dicom])",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files already in OUT that this prediction writes (default: refuse, naming them)",
    )
    g.add_argument(
        "--continue",
        dest="skip_complete",
        action="store_true",
        help="skip the cases whose outputs are all in OUT already (an interrupted run); redo the others",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda when present)")
    _engine(p)
    g = _executor(p, "cases, sharded over workers that each load the model once,")
    g.add_argument(
        "--part",
        type=int,
        nargs=2,
        metavar=("I", "N"),
        help="predict only the I-th (0..N-1) of N interleaved shares of the sorted cases (N jobs of any scheduler)",
    )
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "export",
        help="write a model's networks as ONNX / OpenVINO files with a model.json to run them anywhere",
        description="Export MODEL (W/NAME: the selected model; W/NAME/results/CONFIG; one fold_K) to OUT: one "
        "network file per fold and checkpoint (dynamic batch axis) and model.json, which holds everything needed "
        "to reproduce `autounet predict` without autounet (docs/model_json.md; examples/onnx_predict.py).",
    )
    p.add_argument("model", metavar="MODEL", help="W/NAME, W/NAME/results/CONFIG or one fold_K folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument(
        "--format", choices=["onnx", "openvino", "all"], default="all", help="network file format(s) (default all)"
    )
    p.add_argument(
        "-f", "--folds", nargs="+", metavar="K", help="folds (default: every trained fold, or the selection's)"
    )
    p.add_argument("--checkpoint", metavar="C", help="final, best, second_best or latest (default: what predict uses)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace files of OUT the export writes (default: refuse, naming them)"
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "package",
        help="write one .zip holding everything `predict` needs (checkpoints, plans, selection, manifest)",
        description="Write the model of W/NAME (default: the one `autounet select` chose, with its folds and "
        "post-processing) into one zip: its inference checkpoints without training state, plans.json, "
        "selection.json, dataset.json (labels, channels; no case list), fingerprint.json (a dataset summary, "
        "no per-case data) and manifest.json (versions, description, license, every file's SHA-256); report.md and "
        "its pictures only with --with-report. `autounet predict -m FILE.zip` uses "
        "it directly, with no workspace.",
    )
    p.add_argument("model", metavar="W/NAME", help="the dataset's workspace folder")
    p.add_argument("-o", "--output", required=True, metavar="FILE.zip", help="the package file to write")
    _configs(
        p,
        "package these configurations as the model (default: the selection's); without post-processing "
        "unless they are the selected ones",
    )
    p.add_argument(
        "-f", "--folds", nargs="+", type=int, metavar="K", help="folds to package (default: the selection's)"
    )
    p.add_argument("--description", default="", help="free text stored in the manifest (what the model is for)")
    p.add_argument("--license", default="", help="the model's license, stored in the manifest (e.g. CC-BY-4.0)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE.zip if it exists (default: refuse)")
    p.add_argument(
        "--with-report",
        action="store_true",
        help="also package report.md, its pictures and the training curves (they show an example training image "
        "with its labels and per-case results; default: left out)",
    )
    p.set_defaults(func=_cmd_package)

    p = sub.add_parser(
        "info",
        help="describe a model package or workspace: labels, channels, model, training data, CV Dice, versions",
        description="Print what a model is: labels and channels, the configurations, folds and post-processing "
        "`predict` runs, the training data (cases, median spacing and shape), the cross-validation Dice and, for a "
        "package, the versions that made it, its description and license. A package is verified and unpacked "
        "into the cache first, as `predict -m FILE.zip` does.",
    )
    p.add_argument("model", metavar="FILE.zip|W/NAME", help="a model package or a workspace folder")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "show",
        help="write a PNG of an image with its segmentation overlaid",
        description="Write a PNG with axial, coronal and sagittal slices through the segmentation's foreground "
        "(the image centre without one), the image in grey and each label in its own colour.",
    )
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image file, or one file per channel")
    p.add_argument("--seg", "-s", metavar="S", help="segmentation (label map) on the image's grid")
    p.add_argument(
        "--out",
        "-o",
        metavar="PNG",
        help="output file or folder (default: ./<image name>.png); an existing file is replaced only if it is a PNG",
    )
    p.add_argument("--channel", type=int, default=0, metavar="N", help="channel to show (default 0)")
    p.add_argument("--slices", type=int, default=3, metavar="N", help="slices per view (default 3)")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser(
        "evaluate",
        help="per-case and mean Dice, IoU, HD95 and surface Dice -> JSON + table",
        description="Compare the label maps in PRED with the same-named reference label maps in GT (or two files): "
        "Dice, IoU, HD95 (mm) and surface Dice per case and class, their means, and the foreground mean. Writes JSON "
        "and prints a table.",
    )
    p.add_argument("pred", metavar="PRED", help="folder of predicted label maps (or one file)")
    p.add_argument("gt", metavar="GT", help="folder of reference label maps (or one file)")
    p.add_argument(
        "--labels", type=int, nargs="+", metavar="L", help="classes to evaluate (default: every non-zero label found)"
    )
    p.add_argument(
        "--regions", nargs="+", metavar="NAME=L,L", help="regions, each a union of labels, e.g. WT=1,2,3 TC=2,3 ET=3"
    )
    p.add_argument(
        "--brats",
        action="store_true",
        help="BraTS convention: both masks empty scores 1 (HD95 0), one empty gives HD95 = the image diagonal "
        "(default: nnU-Net's, NaN and left out of means)",
    )
    p.add_argument("--tolerance", type=float, default=1.0, metavar="MM", help="surface Dice tolerance (default 1 mm)")
    p.add_argument(
        "--ignore-label",
        type=int,
        metavar="V",
        help="reference value of unannotated voxels, left out of every metric (default: the 'ignore' label of a "
        "dataset.json beside GT, if any)",
    )
    p.add_argument(
        "--json",
        metavar="OUT",
        help="JSON output (default: PRED/evaluation.json); an existing file is replaced only if it is an evaluation",
    )
    p.add_argument("--per-case", action="store_true", help="also print one row per case and class")
    _workers(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "make-synthetic",
        help="write a synthetic MSD-layout dataset",
        description="Write a small synthetic segmentation dataset (for tests and the demo).",
    )
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--cases", type=int, default=12, help="training cases (default 12)")
    p.add_argument(
        "--test-cases", type=int, default=0, help="extra held-out cases in imagesTs/ and labelsTs/ (default 0)"
    )
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[32, 40, 36],
        metavar=("Z", "Y", "X"),
        help="case shape in voxels, varied +-10%% per case (default 32 40 36)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=[1.0, 1.0, 1.0],
        metavar=("Z", "Y", "X"),
        help="voxel spacing in mm (default 1 1 1)",
    )
    p.add_argument(
        "--spacing-jitter",
        type=float,
        default=0.0,
        metavar="F",
        help="vary each case's spacing by up to +-F (a fraction, default 0)",
    )
    p.add_argument(
        "--modality",
        default="MRI",
        choices=["MRI", "CT", "mri", "ct"],
        help="MRI (0 outside the body, arbitrary scale) or CT (HU-like)",
    )
    p.add_argument("--channels", type=int, default=1, help="image channels (default 1; >1 writes 4D files)")
    p.add_argument("--classes", type=int, default=3, help="classes including background (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default="msd", choices=["msd", "nnunetv2"], help="folder layout (default msd)")
    p.set_defaults(func=_cmd_make_synthetic)

    p = sub.add_parser(
        "select",
        help="pick the best configuration / pair ensemble from cross-validation, decide post-processing",
        description="Rank every trained configuration and every pair ensemble (averaged validation probabilities) by "
        "the mean foreground Dice of cross-validation, pick the best, and decide post-processing on its "
        "cross-validation predictions. Writes W/NAME/selection.json and prints the ranking.",
    )
    p.add_argument("name", metavar="NAME", help="dataset name in the workspace")
    _work(p)
    _configs(p, "configurations to consider (default: every trained one)")
    _workers(p)
    p.set_defaults(func=_cmd_select)

    p = sub.add_parser(
        "report",
        help="write report.md and report.html of a workspace again from its files (no training)",
        description="Write W/NAME/report.md and W/NAME/report.html from the workspace's files, without retraining. "
        "report.html is one self-contained page (opens from disk, nothing fetched): the summary, every fold's "
        "training curves, every cross-validation case of the selected model with Dice, HD95 and NSD per class, "
        "and a slice viewer with ground truth, prediction and errors for the worst cases and a sample.",
    )
    p.add_argument("workspace", metavar="W/NAME", help="the dataset's workspace folder")
    p.add_argument("--html", action="store_true", help="write only report.html (leave report.md as it is)")
    p.add_argument(
        "--cases",
        type=int,
        metavar="N",
        help="embed the N worst cases in report.html's viewer, plus a sample of N/2 more (default 20)",
    )
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "postprocess",
        help="apply the selected post-processing to a folder of segmentations",
        description="Apply the post-processing chosen by `autounet select` for W/NAME to every segmentation in IN, "
        "writing OUT (IN may equal OUT). The BraTS ET rule needs CASE.npz probabilities beside each file "
        "(`autounet predict --save-probabilities`).",
    )
    p.add_argument("input", metavar="IN", help="folder of segmentations")
    p.add_argument("output", metavar="OUT", help="output folder")
    p.add_argument("--from", dest="source", required=True, metavar="W/NAME", help="the dataset's workspace folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the cases' files already in OUT (default: refuse, naming them; OUT = IN works in place)",
    )
    _workers(p)
    p.set_defaults(func=_cmd_postprocess)

    p = sub.add_parser(
        "run",
        help="the whole pipeline: check, plan, preprocess, train every configuration and fold, select (resumable)",
        description="check -> plan -> preprocess -> train every planned configuration on every fold (a cascade's "
        "first stage first) -> select -> report. Every step is skipped when complete and resumed when partial: "
        "re-run the same command after a crash to finish the job.",
    )
    p.add_argument("raw", metavar="RAW", help="dataset folder holding dataset.json")
    _work(p)
    p.add_argument("--name", "-n", metavar="NAME", help="dataset name in the workspace (default: RAW's folder name)")
    _configs(p, "configurations to train (default: every planned one)")
    p.add_argument(
        "--folds", nargs="+", default=["0", "1", "2", "3", "4"], metavar="K", help="folds (default 0 1 2 3 4)"
    )
    p.add_argument("--epochs", type=int, help="maximum epochs per fold (default: the training preset's)")
    p.add_argument("--iters-per-epoch", type=int, help="training iterations per epoch (default 250)")
    p.add_argument("--val-iters", type=int, help="validation batches per epoch (default 50)")
    p.add_argument("--max-minutes", type=float, help="time limit per fold")
    _recipe(p)
    p.add_argument(
        "--width-multiplier",
        type=float,
        metavar="X",
        help="every network stage's features times X (as `autounet train`)",
    )
    _training_precision(p)
    p.add_argument(
        "--no-validation-tta", action="store_true", help="no mirroring when the folds' validation cases are predicted"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0)
    _plans_from(p)
    _pretrained(p)
    _loggers(p)
    _workers(p)
    g = _executor(p, "folds")
    g.add_argument(
        "--gpus-per-fold",
        type=int,
        metavar="N",
        help="GPUs per fold (default: 1 where the cluster has GPUs, else 0); more than 1 trains it under torchrun",
    )
    g.add_argument("--cpus-per-fold", type=int, metavar="N", help="CPUs (and PyTorch threads) per fold (default 1)")
    g.add_argument(
        "--max-retries", type=int, metavar="N", help="times a fold whose worker or node is lost is resumed (default 3)"
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "demo",
        help="make a small synthetic dataset and run the whole pipeline on it on the CPU",
        description="Write a small synthetic dataset, run `autounet run` on it with a tiny budget, predict its "
        "held-out test cases with the selected model and print their Dice. Resumable; a few minutes on 2 cores.",
    )
    p.add_argument("--dir", default="autounet_demo", metavar="DIR", help="demo folder (default ./autounet_demo)")
    p.add_argument("--epochs", type=int, help="epochs per fold")
    p.add_argument("--iters-per-epoch", type=int, help="training iterations per epoch")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda when present)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except api.AutounetError as exc:
        print(f"autounet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"autounet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        import os

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
