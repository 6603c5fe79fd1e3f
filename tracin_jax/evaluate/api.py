"""``run_evaluate``: scores influence folders against one counterfactual ground truth.

Steps (all inputs are checked before anything is trained or written):

1. the ground truth of the run: M subset models x R seeds (:func:`.ground_truth.compute_ground_truth`,
   cached in ``<workdir>/ground_truth/<key>/``, shared by every influence folder and rerun);
2. per influence folder: class-wise LDS against the loss it differentiates (Dice or region
   cross-entropy), its paired difference with the best folder and with the attribution-free
   baseline (:mod:`.baselines`, scored the same way), and the LDS against the other loss
   (``lds_by_loss``);
3. leave-top-k-out on Q queries shared by every folder (removal sets deduplicated and cached
   by :func:`.ground_truth.retrain_without_many`); the number of retrainings and an estimate of
   their time are printed before they start;
4. model randomisation (one influence recomputation per folder with re-initialised weights,
   cached in ``<out>/randomised/<folder>/``) and, if given, the mislabel AUC of the
   experiment's gradient with the same spec (:func:`.sanity.mislabel_match`);
5. ``evaluation.json``, ``evaluation.md``, ``lds.png``, ``leave_out.png`` in ``out``.

Sharing the retrainings out (:mod:`.workers`; every model file is trained under a claim, so
processes never train one twice and a killed process's models are taken over):

- ``workers=N`` (N > 1): all models of steps 1 and 3 are trained first by N worker processes
  (each ``tracin-jax evaluate <same settings> --worker --workers 1``, pinned to its own cores on
  CPU), then this process scores. ``workers=None`` picks N: on CPU the usable cores, at most one
  per model to train, and one (this process) when the models to train take fewer than
  :data:`AUTO_MIN_STEPS` optimiser steps in all (starting processes would cost about as much
  as they save); on GPU/TPU one (the vmapped multi-model step).
- ``worker=True``: only trains (the same models, claiming them), writes no evaluation output,
  returns once every model exists: a job array or ``parallel`` runs many such workers, then one
  ``score_only=True`` call (which never trains, and fails with one line naming the missing
  models) or a plain call (which trains what is missing) scores.
- several JAX processes (``jax.process_count() > 1``, :mod:`tracin_jax.distributed`): every
  process trains on its own first local device (``workers`` is ignored) until all models exist;
  process 0 then writes the ground truth's arrays, every process takes part in the scoring (the
  randomisation check's influence recomputation is a collective), and only process 0 writes the
  outputs.

On CPU a model's float rounding depends on the number of cores of the process that trains it
(:mod:`.workers`): with as many cores per training process, every way of sharing out gives bit
for bit the same models and numbers.

Defaults size the demo study (40 synthetic cases, 32 training patients): 64 subsets x 1 seed.
``small=True`` is the preset the test suite uses (6 subsets, one leave-out query, k = 1).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tracin_jax import identity
from tracin_jax.errors import InputError
from tracin_jax.paths import check_writable_folder
from tracin_jax.evaluate import baselines as base_mod
from tracin_jax.evaluate import lds as lds_mod
from tracin_jax.evaluate import leave_out as lo_mod
from tracin_jax.evaluate.retrain import check_step_rule
from tracin_jax.evaluate import sanity
from tracin_jax.evaluate.report import write_outputs

DEFAULTS = {"subsets": 64, "fraction": 0.5, "seeds": 1, "leave_out_queries": lo_mod.DEFAULT_QUERIES,
            "leave_out_k": lo_mod.DEFAULT_KS, "leave_out_random": lo_mod.DEFAULT_RANDOM_SETS,
            "resamples": lds_mod.BOOTSTRAP_RESAMPLES}
SMALL = {"subsets": 6, "fraction": 0.5, "seeds": 1, "leave_out_queries": 1, "leave_out_k": (1,),
         "leave_out_random": 1, "resamples": 200}
MIN_PATIENTS = 4
MODES = ("auto", "sequential", "vmap")
AUTO_MIN_STEPS = 256  # optimiser steps to train below which workers=None trains in-process
LOSS_KEYS = {"dice": "dice_loss", "ce": "ce_loss"}


def parse_ks(raw) -> tuple[int, ...]:
    """``"1,3,5"`` or a sequence -> (1, 3, 5); one-line InputError otherwise."""
    if isinstance(raw, str):
        parts = [p.strip() for p in raw.split(",") if p.strip()]
    else:
        parts = list(raw)
    try:
        ks = tuple(sorted({int(p) for p in parts}))
        if any(str(p).strip() != str(int(p)) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"--leave-out-k {raw!r}: expected comma-separated positive integers, "
                         "e.g. 1,3,5") from None
    if any(k < 1 for k in ks):
        raise InputError(f"--leave-out-k {raw!r}: every k must be at least 1")
    return ks


def _check_settings(subsets, fraction, seeds, queries, draws) -> None:
    if not isinstance(subsets, (int, np.integer)) or subsets < 2:
        raise InputError(f"--subsets {subsets!r}: need at least 2 subsets (M >= 2)")
    try:
        ok = 0.0 < float(fraction) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"--fraction {fraction!r}: must lie strictly between 0 and 1")
    if not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise InputError(f"--seeds {seeds!r}: need at least 1 training seed per subset")
    if not isinstance(queries, (int, np.integer)) or queries < 0:
        raise InputError(f"--leave-out-queries {queries!r}: must be 0 (skip) or a positive integer")
    if not isinstance(draws, (int, np.integer)) or draws < 1:
        raise InputError(f"--leave-out-random {draws!r}: need at least 1 random removal set per k")


def _load_influence(folder: Path, patients: list[str], train_ids: list[str],
                    test_ids: list[str], workdir: Path, task=None) -> dict:
    """meta, patient_scores f32[n_test, C, P, C] and test_present bool[n_test, C] of one
    folder, checked against the run: its ids, and its classes, which must be the C classes of
    the run's ``task`` (names and labels 1..C; BraTS when None), those the ground truth's
    losses measure."""
    meta_path = folder / "meta.json"
    if not folder.is_dir():
        raise InputError(f"--influence {folder}: not a folder")
    if not meta_path.exists():
        raise InputError(f"--influence {folder}: no meta.json (not written by `tracin-jax "
                         "influence`, or unfinished)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        raise InputError(f"--influence {folder}: meta.json is not valid JSON") from None
    if meta.get("split", "test") != "test":
        raise InputError(f"--influence {folder}: scores the {meta.get('split')!r} split; "
                         "evaluation needs test-split influence")
    for key, want in (("train_ids", train_ids), ("test_ids", test_ids), ("patients", patients)):
        if [str(x) for x in meta.get(key, [])] != want:
            raise InputError(f"--influence {folder}: its {key} differ from those of {workdir} "
                             "(influence of another run?)")
    _check_classes(folder, meta, task)
    n_classes = len(task.classes) if task is not None else 3
    pat_path = folder / "patient_scores.npy"
    if not pat_path.exists():
        raise InputError(f"--influence {folder}: no patient_scores.npy (rerun `tracin-jax "
                         "influence` with a larger --memory-budget-gb)")
    scores = np.load(pat_path, mmap_mode="r")
    want_shape = (len(test_ids), n_classes, len(patients), n_classes)
    if tuple(scores.shape) != want_shape:
        raise InputError(f"--influence {pat_path}: shape {tuple(scores.shape)}, expected "
                         f"{want_shape}")
    present_path = folder / "test_present.npy"
    if not present_path.exists():
        raise InputError(f"--influence {folder}: no test_present.npy (unfinished folder?)")
    present = np.load(present_path)
    if tuple(present.shape) != (len(test_ids), n_classes):
        raise InputError(f"--influence {present_path}: shape {tuple(present.shape)}, expected "
                         f"{(len(test_ids), n_classes)}")
    return {"meta": meta, "scores": np.asarray(scores, np.float32), "present": present,
            "spec": sanity.gradient_spec(meta)}


def _check_classes(folder: Path, meta: dict, task) -> None:
    """One-line InputError when the folder's classes (meta.json ``class_names`` and
    ``class_labels``; a folder without them holds the BraTS classes) are not the run's task's
    foreground classes, in order, with labels 1..C."""
    from tracin_jax.influence.folder import classes_of
    from tracin_jax.task import brats

    task = brats() if task is None else task
    names, labels = classes_of(meta, folder / "meta.json")
    want_names, want_labels = list(task.classes), list(task.class_labels)
    if names != want_names or labels != want_labels:
        raise InputError(f"--influence {folder}: its classes {names} (labels {labels}) are not "
                         f"the run's {want_names} (labels {want_labels}); the evaluation "
                         "measures the losses of the run's foreground classes")


def _summaries(by_loss: dict) -> dict:
    """{loss: lds dict} without the per-target list (json's ``lds_by_loss``)."""
    return {k: {kk: vv for kk, vv in r.items() if kk != "per_target"} for k, r in by_loss.items()}


def _unit_seconds(gt) -> float | None:
    """Median seconds per retrained model recorded by the ground truth (``unit_seconds``)."""
    vals = np.asarray((getattr(gt, "meta", None) or {}).get("unit_seconds") or [], float).ravel()
    return float(np.median(vals)) if vals.size else None


def _cached_without(gt_mod, run, removed: Sequence[str], seed: int, steps: str) -> bool:
    """Whether the model trained without ``removed`` is already in the leave-out cache."""
    return gt_mod.leave_out_path(run, removed, seed, steps).exists()


def _check_sharing(workers, worker: bool, score_only: bool) -> None:
    if workers is not None and (not isinstance(workers, (int, np.integer))
                                or isinstance(workers, bool) or workers < 1):
        raise InputError(f"--workers {workers!r}: must be at least 1 (leave it out for the "
                         "default: one per usable core on CPU)")
    if worker and score_only:
        raise InputError("--worker trains and --score-only never trains: give one of them")


def _worker_argv(workdir, folders: Sequence[Path], out, *, data_dir, mode: str,
                 baselines: bool, subsets, fraction, seeds, seed, leave_out_queries,
                 leave_out_k, leave_out_random, leave_out_variants, leave_out_steps) -> list[str]:
    """The command line of a worker process: ``tracin-jax evaluate`` with every setting that
    decides which models are trained, resolved (so a worker trains exactly the same models),
    plus ``--worker --workers 1``."""
    import sys

    argv = [sys.executable, "-m", "tracin_jax.cli", "evaluate",
            "--workdir", str(Path(workdir).resolve()),
            "--influence", *[str(Path(f).resolve()) for f in folders],
            "--out", str(Path(out).resolve()),
            "--subsets", str(int(subsets)), "--fraction", repr(float(fraction)),
            "--seeds", str(int(seeds)), "--seed", str(int(seed)),
            "--leave-out-queries", str(int(leave_out_queries)),
            "--leave-out-k", ",".join(str(int(k)) for k in leave_out_k),
            "--leave-out-random", str(int(leave_out_random)),
            f"--leave-out-variants={','.join(leave_out_variants)}",
            "--leave-out-steps", leave_out_steps, "--mode", mode,
            "--no-randomisation", "--worker", "--workers", "1"]
    if not baselines:
        argv.append("--no-baseline")
    if data_dir is not None:
        argv += ["--data", str(Path(data_dir).resolve())]
    return argv


def _worker_count(workers: int | None, run, missing: Sequence) -> int:
    """Worker processes for ``missing`` models: ``workers`` (at most one per model), or with
    None the module docstring's default."""
    import jax

    from tracin_jax.evaluate import ground_truth as gt_mod
    from tracin_jax.evaluate.workers import usable_cpus

    if not missing:
        return 1
    if workers is None:
        if jax.default_backend() != "cpu":
            return 1
        if sum(gt_mod.unit_steps(run, u) for u in missing) < AUTO_MIN_STEPS:
            return 1
        workers = usable_cpus()
    return max(1, min(int(workers), len(missing)))


def _train_shared(run, gt_plan, units: list, missing: list, *, n: int, mode: str,
                  progress: bool, log: Callable[[str], None], argv: list[str]) -> dict:
    """Trains every missing model of ``units`` (ground truth, then leave-out) before scoring:
    in ``n`` > 1 worker processes running ``argv``, or here under claims (a worker, or one of
    several JAX processes). Returns {"workers", "processes", "to_train", "trained_here",
    "seconds"}."""
    import jax

    from tracin_jax.evaluate import ground_truth as gt_mod
    from tracin_jax.evaluate import workers as workers_mod
    from tracin_jax.progress import tqdm

    t0 = time.perf_counter()
    trained = 0
    if not gt_plan.complete:
        gt_mod.prepare_ground_truth(gt_plan)  # links the models reusable from sibling folders
    for folder in {u.path.parent for u in units}:
        folder.mkdir(parents=True, exist_ok=True)
    if missing and n > 1:
        log(f"retraining: {len(missing)} of {len(units)} models to train, in {n} worker "
            "processes")
        workers_mod.run_workers(argv, n, [u.path for u in units],
                                on_cpu=jax.default_backend() == "cpu", progress=progress)
    elif missing:
        procs = jax.process_count()
        where = f" (process {jax.process_index()} of {procs})" if procs > 1 else ""
        log(f"retraining: {len(missing)} of {len(units)} models to train{where}")
        bar = tqdm(total=len(units), initial=sum(u.done for u in units), desc="retraining",
                   unit="model", disable=not progress, dynamic_ncols=True)
        trained = gt_mod.train_units(run, units, mode=mode, bar=bar)
        bar.close()
    return {"workers": n, "processes": jax.process_count(), "to_train": len(missing),
            "trained_here": trained, "seconds": round(time.perf_counter() - t0, 1)}


def _barrier(name: str) -> None:
    from tracin_jax.influence.sharding import barrier

    barrier(name)


def run_evaluate(workdir, influence_dirs: Sequence, out, *, subsets: int | None = None,
                 fraction: float | None = None, seeds: int | None = None, seed: int = 0,
                 leave_out_queries: int | None = None, leave_out_k=None,
                 leave_out_random: int | None = None, leave_out_variants=None,
                 leave_out_steps: str = "epochs", randomisation: bool = True,
                 baselines: bool = True, mislabel=None, mode: str = "auto",
                 small: bool = False, progress: bool = True,
                 data_dir=None, log: Callable[[str], None] = print, workers: int | None = 1,
                 worker: bool = False, score_only: bool = False) -> dict:
    """Evaluates every folder of ``influence_dirs`` (keyed by folder name) against the ground
    truth of ``workdir``; writes the outputs listed in the module docstring into ``out``.

    Settings left None take :data:`DEFAULTS` (or :data:`SMALL` with ``small``).
    ``leave_out_variants``: folder names (a list or ``"a,b"``) that get leave-top-k-out (default:
    all); the others skip it, which bounds the number of retrainings. ``leave_out_steps``:
    ``epochs`` (a model without k patients trains the run's epochs, so fewer steps) or
    ``matched`` (as many steps as the model on all patients). ``baselines``: also score the
    attribution-free :mod:`.baselines` (under ``"baselines"``, each variant's paired
    ``vs_baseline``; leave-out too unless ``leave_out_variants`` leaves it out).
    ``workers``, ``worker``, ``score_only``: how the retrainings are shared out (module
    docstring). Returns the dict written to ``evaluation.json`` (with ``worker``: a summary of
    the retrainings, nothing written).
    """
    from tracin_jax import load_run

    preset = SMALL if small else DEFAULTS
    subsets = preset["subsets"] if subsets is None else subsets
    fraction = preset["fraction"] if fraction is None else fraction
    seeds = preset["seeds"] if seeds is None else seeds
    queries_n = preset["leave_out_queries"] if leave_out_queries is None else leave_out_queries
    ks = parse_ks(preset["leave_out_k"] if leave_out_k is None else leave_out_k)
    draws = preset["leave_out_random"] if leave_out_random is None else leave_out_random
    resamples = preset["resamples"]
    _check_settings(subsets, fraction, seeds, queries_n, draws)
    check_step_rule(leave_out_steps)
    if mode not in MODES:
        raise InputError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    _check_sharing(workers, worker, score_only)

    # -- every input check before any work ----------------------------------------------
    workdir, out = Path(workdir), Path(out)
    if not worker:
        check_writable_folder(out, "--out")
    if not influence_dirs:
        raise InputError("--influence: give at least one influence folder")
    run = load_run(workdir, data_dir)
    patients = sorted({str(c) for c in run.train.cases})
    if len(patients) < MIN_PATIENTS:
        raise InputError(f"{workdir}: {len(patients)} training patients; the evaluation needs at "
                         f"least {MIN_PATIENTS} (retraining on subsets of patients)")
    if queries_n and max(ks) > len(patients) - 1:
        raise InputError(f"--leave-out-k {max(ks)}: larger than the {len(patients)} training "
                         f"patients allow (at most {len(patients) - 1})")
    train_ids = [str(i) for i in run.train.ids]
    test_ids = [str(i) for i in run.test.ids]
    folders = [Path(d) for d in influence_dirs]
    names = [f.resolve().name for f in folders]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"--influence: two folders share the name {dupes[0]!r} (results are "
                         "keyed by folder name)")
    task = run.task
    class_names = list(task.classes)
    variants = {n: _load_influence(f, patients, train_ids, test_ids, workdir, task)
                for n, f in zip(names, folders)}
    for n, v in variants.items():  # the epochs each folder used must still be there
        run.check_complete(epochs=list(v["spec"].epochs), option=f"--influence {n}")
        identity.check_same_run(v["meta"].get("run_identity"), run, f"--influence {n}")
    if [e for e in run.missing_epochs() if e > run.checkpoints[-1].epoch]:
        run.check_complete()  # the run's last epoch, which the retrainings copy, is gone
    present = next(iter(variants.values()))["present"]
    # Attribution-free baselines: the same tensor layout, scored on the Dice loss.
    base_scores = {}
    if baselines:
        if base_mod.CLASS_VOXELS in variants:
            raise InputError(f"--influence: the folder name {base_mod.CLASS_VOXELS!r} is the "
                             "baseline's (rename the folder or pass --no-baseline)")
        voxels = base_mod.patient_class_voxels(run.train.labels, run.train.cases, patients,
                                               class_labels=task.class_labels)
        base_scores[base_mod.CLASS_VOXELS] = base_mod.class_voxel_scores(voxels, len(test_ids))
    scored = {**{n: v["scores"] for n, v in variants.items()}, **base_scores}
    if isinstance(leave_out_variants, str):
        leave_out_variants = [x.strip() for x in leave_out_variants.split(",") if x.strip()]
    lo_names = list(scored) if leave_out_variants is None else list(leave_out_variants)
    unknown = [n for n in lo_names if n not in scored]
    if unknown:
        raise InputError(f"--leave-out-variants {unknown[0]!r}: not the name of an --influence "
                         f"folder or a baseline (have {', '.join(scored)})")
    mislabel_res = sanity.read_mislabel(mislabel) if mislabel else None
    if mislabel_res is not None and mislabel_res.reason and not worker:
        log(mislabel_res.reason)
    last_epoch = run.checkpoints[-1].epoch

    # -- the leave-out plan (cheap: rankings only) -----------------------------------------
    queries = lo_mod.select_queries(present, queries_n, seed) if queries_n else []
    randoms = lo_mod.random_sets(len(patients), ks, draws, seed) if queries else {}
    plan = (lo_mod.removal_plan({n: scored[n] for n in lo_names}, queries, ks, randoms)
            if queries and lo_names else None)

    removal_ids = [[patients[p] for p in s] for s in plan["sets"]] if plan is not None else []

    # -- 0. the retrainings shared out over processes (workers, a job array, JAX processes) --
    import jax

    from tracin_jax.evaluate import ground_truth as gt_mod

    multi = jax.process_count() > 1
    retraining = None
    if worker or score_only or multi or workers != 1:
        settings = dict(subsets=subsets, fraction=fraction, seeds=seeds, seed=seed)
        gt_plan = gt_mod.plan_ground_truth(run, small=small, **settings)
        lo_units = (gt_mod.leave_out_units(run, removal_ids, seed, leave_out_steps)
                    if plan is not None else [])
        units = ([] if gt_plan.complete else gt_plan.units) + lo_units
        missing = gt_plan.missing() + [u for u in lo_units if not u.done]
        if score_only:
            if missing:
                raise InputError(
                    f"--score-only: {len(missing)} of {len(units)} models are missing "
                    f"({gt_mod.describe_units(missing)}); train them with the same command and "
                    "--worker (in as many processes as you like), or run it without --score-only")
        else:
            n = 1 if multi else _worker_count(workers, run, missing)
            if n > 1 or worker or multi:  # else steps 1 and 3 train here, as they go
                argv = _worker_argv(workdir, folders, out, data_dir=data_dir, mode=mode,
                                    baselines=baselines, leave_out_queries=queries_n,
                                    leave_out_k=ks, leave_out_random=draws,
                                    leave_out_variants=lo_names, leave_out_steps=leave_out_steps,
                                    **settings)
                retraining = _train_shared(run, gt_plan, units, missing, n=n, mode=mode,
                                           progress=progress, log=log, argv=argv)
        if worker:
            return {"worker": True, "models": len(units), **(retraining or {})}

    # -- 1. ground truth ------------------------------------------------------------------
    t0 = time.perf_counter()
    log(f"ground truth: {subsets} subsets x {seeds} seed(s) of {len(patients)} patients "
        f"(fraction {fraction}); cached in {workdir / 'ground_truth'}")
    rank0 = jax.process_index() == 0
    if multi and not rank0:  # process 0 writes the ground truth's arrays, the others read them
        _barrier("tracin_jax_evaluate_ground_truth")
    gt = gt_mod.compute_ground_truth(run, subsets=subsets, fraction=fraction, seeds=seeds,
                                     seed=seed, mode=mode, progress=progress, small=small)
    if multi and rank0:
        _barrier("tracin_jax_evaluate_ground_truth")
    gt_s = time.perf_counter() - t0
    losses = {"dice": np.asarray(gt.dice_loss), "ce": np.asarray(gt.ce_loss)}
    masks = np.asarray(gt.masks, bool)

    # -- 2. LDS ---------------------------------------------------------------------------
    def lds_by_loss(scores) -> dict:  # {loss: lds dict} against the Dice and the CE loss
        return {loss: lds_mod.lds(scores, masks, arr, present, class_names=class_names,
                                  resamples=resamples, seed=seed)
                for loss, arr in losses.items()}

    result_variants: dict = {}
    for name, v in variants.items():
        by_loss = lds_by_loss(v["scores"])
        own = v["spec"].loss
        result_variants[name] = {
            "folder": str(folders[names.index(name)]), "gradient": v["spec"].describe(),
            "loss": own, "lds": by_loss[own], "lds_by_loss": _summaries(by_loss),
        }
    best = max(result_variants, key=lambda n: (result_variants[n]["lds"]["mean"]
                                               if result_variants[n]["lds"]["mean"] is not None
                                               else -math.inf))
    for name, v in variants.items():
        if name == best:
            result_variants[name]["vs_best"] = None
            continue
        b = variants[best]
        result_variants[name]["vs_best"] = lds_mod.paired_difference(
            v["scores"], losses[v["spec"].loss], b["scores"], losses[b["spec"].loss], masks,
            present, resamples=resamples, seed=seed)
    result_baselines: dict = {}
    for bname, bscores in base_scores.items():
        by_loss = lds_by_loss(bscores)
        b = variants[best]
        result_baselines[bname] = {
            "gradient": base_mod.DESCRIPTION, "loss": "dice", "lds": by_loss["dice"],
            "lds_by_loss": _summaries(by_loss),
            "vs_best": lds_mod.paired_difference(
                bscores, losses["dice"], b["scores"], losses[b["spec"].loss], masks, present,
                resamples=resamples, seed=seed),
            "randomisation": None, "mislabel_auc": None, "mislabel_method": None}
        for name, v in variants.items():  # each variant against the baseline, on its own loss
            own = losses[v["spec"].loss]
            result_variants[name]["vs_baseline"] = lds_mod.paired_difference(
                v["scores"], own, bscores, own, masks, present, resamples=resamples, seed=seed)
            # how far the variant's patient ranking is the baseline's (mean Spearman over
            # targets): near 1, its scores add little beyond each patient's class voxels
            result_variants[name]["baseline_rho"] = sanity.rank_agreement(
                v["scores"], bscores, present)["mean"]

    # -- 3. leave-top-k-out ---------------------------------------------------------------
    leave_out_info: dict = {}
    if plan is not None:
        sets = plan["sets"]
        todo = len(sets) - sum(_cached_without(gt_mod, run, r, seed, leave_out_steps)
                               for r in removal_ids)
        per_model = _unit_seconds(gt)
        eta = (f", about {todo * per_model / 60:.1f} min at {per_model:.1f} s per model (the "
               "ground truth's rate)") if per_model and todo else ""
        log(f"leave-top-k-out: {len(queries)} queries x k in {{{', '.join(map(str, ks))}}} x "
            f"{len(lo_names)} variant(s) -> {len(sets)} distinct removal sets, {todo} to "
            f"retrain{eta}")
        t = time.perf_counter()
        outputs = gt_mod.retrain_without_many(run, removal_ids, seed, mode=mode, progress=progress,
                                              steps=leave_out_steps)
        leave_out_s = time.perf_counter() - t
        for name in lo_names:
            entry = result_variants.get(name) or result_baselines[name]
            key = LOSS_KEYS[entry["loss"]]
            loss_without = {s: np.asarray(o[key]) for s, o in zip(sets, outputs)}
            changes = lo_mod.loss_changes(plan["top"][name], randoms, queries, loss_without,
                                          seed=seed)
            entry["leave_out"] = {str(k): c for k, c in changes.items()}
            entry["leave_out_sets"] = {
                side: {str(k): [[patients[p] for p in s] for s in lst] for k, lst in d.items()}
                for side, d in plan["top"][name].items()}
        leave_out_info = {
            "k": list(ks), "queries_n": len(queries), "seed": int(seed),
            "queries": [{"test_id": test_ids[a], "class": class_names[i]}
                        for a, i in queries],
            "random_sets": {str(k): [[patients[p] for p in s] for s in lst]
                            for k, lst in randoms.items()},
            "retrainings": len(sets), "seconds": round(leave_out_s, 1),
            "steps": leave_out_steps}

    # -- 4. sanity checks -----------------------------------------------------------------
    for name, v in variants.items():
        rnd = None
        if randomisation:
            log(f"model randomisation: {name}")
            rnd = sanity.model_randomisation(run, folders[names.index(name)],
                                             out / "randomised" / name, seed=seed,
                                             progress=progress)
            rnd["per_class"] = {class_names[int(c)]: m for c, m in rnd["per_class"].items()}
        result_variants[name]["randomisation"] = rnd
        # the experiment's gradient with the same spec (checkpoints: its run's last or several)
        match = (sanity.mislabel_match(v["meta"].get("spec"), last_epoch, mislabel_res.gradients)
                 if mislabel_res is not None else None)
        result_variants[name]["mislabel_method"] = match.row if match is not None else None
        result_variants[name]["mislabel_auc"] = match.auc if match is not None else None

    a, i = lds_mod.target_mask(present)
    result = {
        "format": 1, "workdir": str(workdir),
        "task": task.to_dict(), "class_names": class_names,
        "class_labels": list(task.class_labels),
        "ground_truth": {
            "path": str(gt.path), "subsets": int(masks.shape[0]), "fraction": float(fraction),
            "seeds": int(losses["dice"].shape[1]), "seed": int(seed), "patients": len(patients),
            "n_test": len(test_ids), "targets": int(len(a)),
            "targets_per_class": {c: int((i == k).sum()) for k, c in enumerate(class_names)},
            "noise_ceiling": {loss: lds_mod.noise_ceiling(arr, present, class_names=class_names)
                              for loss, arr in losses.items()},
            "seconds": round(gt_s, 1),
        },
        "bootstrap": {"over": "subsets", "resamples": resamples, "method": "percentile",
                      "level": 0.95},
        "best": best, "variants": result_variants, "baselines": result_baselines,
        "leave_out": leave_out_info,
        "mislabel": str(mislabel) if mislabel else None,
    }
    if retraining is not None:
        result["retraining"] = retraining
    if rank0:
        write_outputs(result, out)
    return result
