"""``tracin-jax``: command-line entry point.

Subcommands: ``synth``, ``train``, ``influence``, ``explain``, ``demo``. Bad input prints one line
``tracin-jax: error: ...`` and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tracin_jax.errors import InputError, write_error
from tracin_jax.paths import check_writable_folder

DESCRIPTION = ("Class-wise TracIn explanations of brain-tumour segmentation models: write synthetic "
               "data (synth), train a U-Net (train), score training slices per class (influence), "
               "write the HTML report (explain), or all four on the embedded data (demo). Bad "
               "input prints one error line and exits with status 2.")


SYNTH_FORMATS = ("brats", "nnunet")


def _parse_shape(raw: str | None) -> tuple[int, int, int] | None:
    """``--shape``: ``N`` (a cube) or ``X,Y,Z``; None when not given."""
    if raw is None:
        return None
    try:
        sizes = tuple(int(v) for v in raw.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if len(sizes) == 1:
        sizes = sizes * 3
    if len(sizes) != 3 or min(sizes) < 16:
        raise InputError(f"--shape {raw!r}: expected N or X,Y,Z, each at least 16")
    return sizes


def _cmd_synth(args) -> None:
    from tracin_jax.data import write_synthetic_dataset, write_synthetic_nnunet
    from tracin_jax.data.synth import DATASET_DIR, NNUNET_DIR

    check_writable_folder(args.out, "--out")
    if args.format not in SYNTH_FORMATS:
        raise InputError(f"--format {args.format!r}: choose one of {', '.join(SYNTH_FORMATS)}")
    if args.cases < 2:
        raise InputError(f"--cases {args.cases}: need at least 2 cases for a train/test split")
    shape = _parse_shape(args.shape)
    t0 = time.perf_counter()
    write, folder = ((write_synthetic_nnunet, NNUNET_DIR) if args.format == "nnunet"
                     else (write_synthetic_dataset, DATASET_DIR))
    ids = write(args.out, cases=args.cases, seed=args.seed, **({"shape": shape} if shape else {}))
    print(f"wrote {len(ids)} synthetic cases to {Path(args.out) / folder} in "
          f"{time.perf_counter() - t0:.1f}s")


def _config_from_args(args):
    from tracin_jax.config import apply_overrides, get_config

    return apply_overrides(get_config(args.config), args.set or [])


def _cmd_train(args) -> None:
    from tracin_jax.training.train import train_and_evaluate

    check_writable_folder(args.workdir, "--workdir")
    config = _config_from_args(args)
    if not Path(args.data).is_dir():
        raise InputError(f"--data {args.data}: not a folder")
    train_and_evaluate(config, args.data, args.workdir)


def _parse_checkpoints(raw: str):
    if raw == "all":
        return "all"
    try:
        return [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--checkpoints {raw!r}: expected 'all' or comma-separated epochs, e.g. 2,4,6") from None


def _cmd_influence(args) -> dict:
    from tracin_jax.influence import methods, run_influence

    cls = methods.get_method(args.method)
    given = {name: getattr(args, name) for name in methods.all_option_flags()
             if getattr(args, name, None) is not None}
    options = methods.make_options(cls, given)  # an option of another method: one line
    meta = run_influence(
        args.workdir, args.out, method=args.method, options=options,
        checkpoints=_parse_checkpoints(args.checkpoints), split=args.split, topk=args.topk,
        batch_size=args.batch_size, chunk_size=args.chunk_size,
        memory_budget_gb=args.memory_budget_gb, data_dir=args.data)
    print(f"influence written to {args.out}")
    return meta


def _add_method_options(parser) -> None:
    """``--method`` (choices from the registry) and every registered method's option flags,
    each defaulting to None (= the method's own default; given to a method that does not take
    it: a one-line error)."""
    from tracin_jax.influence import methods

    parser.add_argument("--method", default="tracin", help=" | ".join(
        f"{name} ({cls.summary})" for name, cls in methods.METHODS.items()))
    seen: set[str] = set()
    for name, cls in methods.METHODS.items():
        for f_name, f in methods.option_fields(cls).items():
            if f_name in seen:
                continue
            seen.add(f_name)
            takes = [m for m, c in methods.METHODS.items() if f_name in methods.option_fields(c)]
            scope = "" if len(takes) == len(methods.METHODS) else f"{', '.join(takes)}: "
            default = f.default
            defaults = {m: methods.option_fields(methods.METHODS[m])[f_name].default
                        for m in takes}
            if len(set(map(repr, defaults.values()))) > 1:
                hint = " (default " + ", ".join(f"{m} {d}" for m, d in defaults.items()) + ")"
            else:
                hint = f" (default {default})" if default not in (None, False, "") else ""
            help_ = scope + (f.metadata.get("help") or "") + hint
            flag = methods.flag_of(f)
            if isinstance(default, bool):
                parser.add_argument(flag, dest=f_name, action="store_true", default=None,
                                    help=help_)
                continue
            kind = {int: int, float: float}.get(type(default))
            if f_name == "proj_dim":
                kind = int
            parser.add_argument(flag, dest=f_name, default=None, help=help_,
                                metavar=flag.lstrip("-").replace("-", "_").upper(),
                                **({"type": kind} if kind else {}))


def _cmd_explain(args) -> None:
    from tracin_jax import distributed
    from tracin_jax.explain import run_explain

    check_writable_folder(args.out, "--out")  # in every process: all refuse alike
    if not distributed.is_main_process():
        return  # the report is written by process 0; the others wait for it at the end

    run_explain(args.workdir, args.influence, args.out, k=args.k, modality=args.modality,
                data_dir=args.data, level=args.level, similarity=args.similarity,
                evaluation=args.evaluation)
    print(f"report written to {Path(args.out) / 'index.html'}")


def _cmd_evaluate(args) -> dict:
    from tracin_jax import distributed
    from tracin_jax.evaluate.api import run_evaluate
    from tracin_jax.evaluate.workers import WorkerFailed

    if not args.worker:  # before the retrainings, not after them
        check_writable_folder(args.out, "--out")
    try:
        result = run_evaluate(
            args.workdir, args.influence, args.out, subsets=args.subsets, fraction=args.fraction,
            seeds=args.seeds, seed=args.seed, leave_out_queries=args.leave_out_queries,
            leave_out_k=args.leave_out_k, leave_out_random=args.leave_out_random,
            leave_out_variants=args.leave_out_variants, leave_out_steps=args.leave_out_steps,
            randomisation=not args.no_randomisation, baselines=not args.no_baseline,
            mislabel=args.mislabel, mode=args.mode,
            small=args.small, data_dir=args.data, workers=args.workers, worker=args.worker,
            score_only=args.score_only)
    except WorkerFailed as e:  # a crashed or killed worker: one line, exit status 1
        print(f"tracin-jax: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if args.worker:
        print(f"worker: {result.get('trained_here', 0)} model(s) trained in this process; all "
              f"{result['models']} models of this evaluation are done")
    elif distributed.is_main_process():
        print((Path(args.out) / "evaluation.md").read_text())
        print(f"evaluation written to {args.out}")
    return result


# The demos: 2D on BraTS-layout slices (make demo), 3D on volumes of the nnU-Net-format task.
DEMO_DIMS = {2: {"workdir": "runs/demo", "cases": 16, "config": "demo"},
             3: {"workdir": "runs/demo3d", "cases": 40, "config": "demo3d"}}
DEMO3D_SHAPE = (48, 48, 48)  # the synthetic volumes; demo3d's model sees them whole (no downsampling)


def _cmd_demo(args) -> None:
    from tracin_jax.config import apply_overrides, get_config
    from tracin_jax.data import write_synthetic_dataset, write_synthetic_nnunet
    from tracin_jax.data.synth import NNUNET_DIR
    from tracin_jax.explain import run_explain
    from tracin_jax.influence import run_influence
    from tracin_jax.training.train import train_and_evaluate

    if args.dims not in DEMO_DIMS:
        raise InputError(f"--dims {args.dims}: choose 2 (slices) or 3 (volumes)")
    preset = DEMO_DIMS[args.dims]
    workdir = args.workdir or preset["workdir"]
    cases = preset["cases"] if args.cases is None else args.cases
    check_writable_folder(workdir, "--workdir")
    if cases < 2:
        raise InputError(f"--cases {cases}: need at least 2 cases for a train/test split")
    root = Path(workdir)
    data, run, infl, report = root / "data", root / "run", root / "influence", root / "report"
    config = apply_overrides(get_config(preset["config"]), args.set or [])
    t0 = time.perf_counter()
    stages: dict[str, float] = {}

    def stage(name: str, start: float) -> None:
        stages[name] = time.perf_counter() - start

    t = time.perf_counter()
    if args.dims == 3:
        shape = "x".join(map(str, DEMO3D_SHAPE))
        print(f"[1/4] synthetic nnU-Net task ({cases} cases of {shape}) -> {data}")
        write_synthetic_nnunet(data, cases=cases, seed=args.seed, shape=DEMO3D_SHAPE)
        data = data / NNUNET_DIR
    else:
        print(f"[1/4] synthetic BraTS-layout data ({cases} cases) -> {data}")
        write_synthetic_dataset(data, cases=cases, seed=args.seed)
    stage("synth", t)
    print(f"[2/4] training the '{config.name}' config -> {run}")
    t = time.perf_counter()
    train_and_evaluate(config, data, run)
    stage("train", t)
    print(f"[3/4] class-wise influence (head subset, all checkpoints) -> {infl}")
    t = time.perf_counter()
    run_influence(run, infl, params="head")
    stage("influence", t)
    print(f"[4/4] explanations and report -> {report}")
    t = time.perf_counter()
    run_explain(run, infl, report)
    stage("report", t)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in stages.items())
    print(f"demo finished in {time.perf_counter() - t0:.0f}s ({times})")
    print(f"open the report: {(report / 'index.html').resolve()}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tracin-jax", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the embedded synthetic dataset: BraTS-2019 layout, or "
                       "a brain-tissue task in the nnU-Net v2 raw format (--format nnunet)")
    s.add_argument("--out", required=True)
    s.add_argument("--format", default="brats", metavar="brats|nnunet",
                   help="brats (4 modalities, the tumour classes) | nnunet (Dataset900_SynthBrain: "
                        "2 channels, 4 tissue classes)")
    s.add_argument("--cases", type=int, default=16)
    s.add_argument("--shape", default=None, metavar="X,Y,Z",
                   help="volume size, N or X,Y,Z, each >= 16 (default 240,240,155 for brats, "
                        "64,64,64 for nnunet; the field of view stays 240 x 240 x 155 mm)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)

    t = sub.add_parser("train", help="train a U-Net with a checkpoint after every epoch (resumes)")
    t.add_argument("--data", required=True,
                   help="BraTS folder (2018-2021, 2023, MSD Task01), any MSD task, or an nnU-Net v2 "
                        "raw dataset (DatasetXXX_Name)")
    t.add_argument("--workdir", required=True)
    t.add_argument("--config", default="paper", help="paper | demo | tiny | demo3d")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    t.set_defaults(func=_cmd_train)

    i = sub.add_parser("influence", help="class-wise TracIn scores of a trained run")
    i.add_argument("--workdir", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--checkpoints", default="all", help="all | E1,E2,... (epochs)")
    _add_method_options(i)
    i.add_argument("--split", default="test", help="test | train")
    i.add_argument("--topk", type=int, default=None)
    i.add_argument("--batch-size", type=int, default=16)
    i.add_argument("--chunk-size", type=int, default=256,
                   help="training examples per feature-store chunk and scoring block: the unit "
                        "of resuming and of sharing the gradients between processes")
    i.add_argument("--memory-budget-gb", type=float, default=2.0)
    i.add_argument("--data", default=None, help="data folder, if moved since training")
    i.set_defaults(func=_cmd_influence)

    x = sub.add_parser("explain", help="HTML report: proponents/opponents, global patterns, "
                       "faithfulness, filter selection")
    x.add_argument("--workdir", required=True)
    x.add_argument("--influence", required=True, help="folder written by `tracin-jax influence`")
    x.add_argument("--out", required=True)
    x.add_argument("--k", type=int, default=5, help="proponents and opponents shown per item")
    x.add_argument("--modality", default=None,
                   help="the input channel shown in figures, by the run's channel names "
                        "(default: flair for BraTS, else the first channel)")
    x.add_argument("--level", default="patient", help="patient (the paper) | slice")
    x.add_argument("--similarity", default="cosine", help="cosine | max_ratio | max_product")
    x.add_argument("--data", default=None, help="data folder, if moved since training")
    x.add_argument("--evaluation", default=None, metavar="E",
                   help="`tracin-jax evaluate --out` folder that scored this influence folder: "
                        "the report shows its LDS and leave-top-k-out (default: the newest one "
                        "found beside the run or the influence folder)")
    x.set_defaults(func=_cmd_explain)

    v = sub.add_parser("evaluate", help="score influence folders against retraining on random "
                       "patient subsets (class-wise LDS, leave-top-k-out, sanity checks)")
    v.add_argument("--workdir", required=True, help="the trained run the influence explains")
    v.add_argument("--influence", required=True, nargs="+", metavar="DIR",
                   help="folders written by `tracin-jax influence` for this run")
    v.add_argument("--out", required=True)
    v.add_argument("--subsets", type=int, default=None, help="M retrained subsets (default 64)")
    v.add_argument("--fraction", type=float, default=None,
                   help="fraction of training patients per subset (default 0.5)")
    v.add_argument("--seeds", type=int, default=None,
                   help="training seeds per subset (default 1; 2+ measures the noise ceiling)")
    v.add_argument("--seed", type=int, default=0, help="draws subsets, queries, random sets")
    v.add_argument("--leave-out-queries", type=int, default=None,
                   help="Q (test slice, class) queries for leave-top-k-out (default 16; 0 skips)")
    v.add_argument("--leave-out-k", default=None, help="k values, e.g. 1,3,5 (the default)")
    v.add_argument("--leave-out-random", type=int, default=None,
                   help="random removal sets per k, shared by all queries (default 2)")
    v.add_argument("--leave-out-variants", default=None, metavar="NAME,...",
                   help="influence folder names (or baseline-class-voxels) that get "
                        "leave-top-k-out (default: all, the baseline included)")
    v.add_argument("--leave-out-steps", default="epochs", metavar="RULE",
                   help="epochs (a model without k patients trains the run's epochs: fewer "
                        "steps; the default) | matched (as many steps as on all patients)")
    v.add_argument("--no-randomisation", action="store_true",
                   help="skip the model-randomisation check (one influence run per folder)")
    v.add_argument("--no-baseline", action="store_true",
                   help="skip the attribution-free class-voxels baseline (scored beside the "
                        "folders, with leave-out unless --leave-out-variants omits it)")
    v.add_argument("--mislabel", default=None,
                   help="results.json of `python -m experiments.mislabel` for the AUC column")
    v.add_argument("--mode", default="auto", help="auto | sequential | vmap (multi-model training)")
    v.add_argument("--small", action="store_true", help="tiny settings (tests, smoke runs)")
    v.add_argument("--data", default=None, help="data folder, if moved since training")
    v.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes that train the models before scoring (default: on CPU "
                        "one per usable core, at most one per model to train, and none for a "
                        "few hundred training steps; on GPU/TPU 1, this process; with several "
                        "JAX processes each trains on its own device)")
    v.add_argument("--worker", action="store_true",
                   help="only train this evaluation's missing models, claiming each (run many "
                        "at once: a job array, GNU parallel); writes no evaluation output")
    v.add_argument("--score-only", action="store_true",
                   help="never train: score once every model exists (after --worker runs), "
                        "else fail naming the missing models")
    v.set_defaults(func=_cmd_evaluate)

    n = sub.add_parser("launch", help="run one stage in N local JAX processes (one machine, "
                       "several cores or GPUs), e.g. launch -n 2 -- influence --workdir W --out O")
    n.add_argument("-n", "--processes", type=int, required=True, help="number of processes")
    n.add_argument("--devices", default="auto",
                   help="auto (a GPU per process when nvidia-smi lists GPUs, else a share of the "
                        "CPU cores per process) | cpu | gpu")
    n.add_argument("stage", nargs=argparse.REMAINDER,
                   help="-- then the stage and its arguments: train | influence | evaluate | explain")
    n.set_defaults(func=_cmd_launch)

    d = sub.add_parser("demo", help="synth -> train -> influence -> report on the embedded data "
                       "(--dims 3: volumes of the nnU-Net-format task)")
    d.add_argument("--dims", type=int, default=2,
                   help="2: BraTS-layout slices, config demo | 3: whole 48^3 volumes of the "
                        "synthetic nnU-Net task, config demo3d")
    d.add_argument("--workdir", default=None, help="default runs/demo (2D), runs/demo3d (3D)")
    d.add_argument("--cases", type=int, default=None, help="default 16 (2D), 40 (3D)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--set", action="append", metavar="KEY=VALUE")
    d.set_defaults(func=_cmd_demo)
    for name in CACHED_STAGES:
        sub.choices[name].add_argument(
            "--no-compile-cache", action="store_true",
            help="do not use the persistent XLA compilation cache ($TRACIN_JAX_CACHE/xla; "
                 "TRACIN_JAX_XLA_CACHE=off does the same)")
    return p


def _cmd_launch(args) -> int:
    from tracin_jax.launch import launch

    return launch(args.stage, args.processes, devices=args.devices)


def _start(args) -> None:
    """Before a stage touches JAX: join the cluster the environment asks for, then turn on the
    persistent compilation cache (:mod:`tracin_jax.compile_cache`)."""
    if args.command not in CACHED_STAGES:
        return
    from tracin_jax import compile_cache, distributed

    if args.command in CLUSTER_STAGES:
        distributed.initialize()
    compile_cache.enable(on=not getattr(args, "no_compile_cache", False))


CLUSTER_STAGES = ("train", "influence", "evaluate", "explain")
CACHED_STAGES = (*CLUSTER_STAGES, "demo")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures go to files; never open a window
    args = build_parser().parse_args(argv)
    from tracin_jax import distributed

    if args.command in CLUSTER_STAGES and distributed.needs_supervisor():
        return distributed.supervise(sys.argv[1:] if argv is None else list(argv))

    try:
        try:
            _start(args)
            code = args.func(args)
            distributed.finish()
        except OSError as e:  # a full disk, a read-only file system: one line, no traceback
            error = write_error(e, getattr(args, "out", None) or getattr(args, "workdir", None))
            if error is None:
                raise
            raise error from None
    except InputError as e:
        distributed.abort(2, f"tracin-jax: error: {e}")
        return 2
    except KeyboardInterrupt:
        distributed.abort(130, "tracin-jax: interrupted; rerun the same command to resume")
        return 130
    except BaseException as e:
        if distributed.is_multiprocess():  # out without the shutdown barrier
            peer = distributed.peer_failure(e)
            if peer is not None:  # a consequence of another process's end: one line
                distributed.abort(1, f"tracin-jax: error: {peer}")
            import traceback

            traceback.print_exc()
            distributed.abort(1)
        raise
    return code if args.command == "launch" else 0


if __name__ == "__main__":
    sys.exit(main())
