"""The counterfactual ground truth of a run, computed once and cached in its workdir.

``compute_ground_truth(workdir)`` draws M random subsets of the training patients (fraction
alpha, seeded), retrains a model from scratch on each with R training seeds, and keeps what
scoring needs. ``<workdir>/ground_truth/<key>/`` holds:

- ``masks.npy`` bool[M, P]: the patients (sorted ids) of each subset;
- ``dice_loss.npy`` f32[M, R, n_test, C]: soft Dice loss per test slice and class (the C
  foreground classes of the run's task, in order; BraTS: the 3 tumour classes);
- ``ce_loss.npy`` f32[M, R, n_test, C]: region cross-entropy per test slice and class;
- ``dice.npy`` f32[M, R, C]: hard Dice per class over the test split (NaN: class absent);
- ``meta.json``: patients, test ids, M, R, alpha, seed, the training seeds, the run's config,
  the training mode and seconds of every unit. Written last: its presence marks a complete result.
- ``units/m<m>_r<r>.npz``: one file per retrained model, written atomically when it finishes.

``key`` hashes the run's config, its training patients and test ids, M, alpha, R and the seed,
so models of two different settings never mix. A rerun (after SIGKILL at any moment) skips the
units already written and trains only the missing ones; the result is the same.

Training seeds: retraining seed r (0 <= r < R) is shared by all subsets (common random numbers:
the differences between subsets' models come from their data, not from their initialisation) and
derived from ``seed`` (``training_seeds``). The seeds are a prefix-stable sequence, so a ground
truth with more seeds reuses the finished models of one with fewer (``--seeds 2`` after
``--seeds 1`` trains only the second seed).

``retrain_without(workdir, removed, seed)``: a model trained on every training patient except
``removed``, cached in ``<workdir>/ground_truth/leave_out/<hash>.npz`` so every caller asking
for the same removal set and seed reuses it. With ``steps="matched"`` the model trains for as
many optimiser steps as one on all patients (more passes over the kept slices) instead of the
run's epochs; such models are cached under their own keys.

Every model file (a *unit*) is trained by :func:`train_units` under a claim
(:mod:`tracin_jax.evaluate.workers`): several processes working on the same workdir (worker
processes, a job array, several JAX processes) share the units out and never train one twice.
``settings.json`` of a ground truth folder holds the settings its key hashes; a folder whose
``settings.json`` differs from the settings computed for the same key is refused (one line)
rather than mixed with models of another run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tracin_jax.atomic import fsync_dir, save_npy_atomic, save_npz_atomic, write_json_atomic
from tracin_jax import identity
from tracin_jax.errors import InputError
from tracin_jax.progress import tqdm
from tracin_jax.evaluate import workers as workers_mod
from tracin_jax.evaluate.retrain import patient_subsets, test_outputs
from tracin_jax.training.multi import (check_step_rule, resolve_mode, run_patients,
                                       schedule_steps, train_models, unstack)

GROUND_TRUTH_DIR = "ground_truth"
LEAVE_OUT_DIR = "leave_out"
MIN_PATIENTS = 4
DEFAULTS = {"subsets": 64, "fraction": 0.5, "seeds": 1}
SMALL = {"subsets": 6, "fraction": 0.5, "seeds": 1}  # the test suite's preset
VMAP_GROUP = 8  # models trained together by one vmapped step
ARRAYS = ("masks", "dice_loss", "ce_loss", "dice")
OUTPUT_KEYS = ("dice_loss", "ce_loss", "dice")


@dataclass
class GroundTruth:
    """A computed ground truth (see the module docstring for the arrays' layouts)."""

    path: Path
    masks: np.ndarray  # bool[M, P]
    dice_loss: np.ndarray  # f32[M, R, n_test, C]
    ce_loss: np.ndarray  # f32[M, R, n_test, C]
    dice: np.ndarray  # f32[M, R, C]
    meta: dict

    @property
    def patients(self) -> list[str]:
        return list(self.meta["patients"])

    @property
    def test_ids(self) -> list[str]:
        return list(self.meta["test_ids"])

    def loss(self, kind: str) -> np.ndarray:
        """f32[M, R, n_test, C] of the class-wise loss ``dice`` or ``ce``."""
        if kind not in ("dice", "ce"):
            raise InputError(f"loss {kind!r} is not one of dice, ce")
        return self.dice_loss if kind == "dice" else self.ce_loss


def load_ground_truth(path: str | os.PathLike) -> GroundTruth:
    """Reads a complete ``ground_truth/<key>/`` folder."""
    path = Path(path)
    if not (path / "meta.json").exists():
        raise InputError(f"{path}: not a complete ground truth (no meta.json)")
    arrays = {name: np.load(path / f"{name}.npy") for name in ARRAYS}
    return GroundTruth(path=path, meta=json.loads((path / "meta.json").read_text()), **arrays)


def training_seeds(seed: int, count: int) -> list[int]:
    """``count`` training seeds (< 2**31) derived from ``seed``, the same for every subset."""
    return [int(s) for s in np.random.SeedSequence([int(seed), 7919]).generate_state(count) % (2**31)]


def _as_run(workdir_or_run):
    if hasattr(workdir_or_run, "config") and hasattr(workdir_or_run, "train"):
        return workdir_or_run
    from tracin_jax.run import load_run

    return load_run(workdir_or_run)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _check_settings(subsets: int, fraction: float, seeds: int) -> None:
    if int(subsets) != subsets or subsets < 2:
        raise InputError(f"--subsets {subsets} must be an integer of at least 2")
    if not 0.0 < float(fraction) < 1.0:
        raise InputError(f"--fraction {fraction} must lie in (0, 1)")
    if int(seeds) != seeds or seeds < 1:
        raise InputError(f"--seeds {seeds} must be an integer of at least 1")


def _check_patients(run, patients: Sequence[str]) -> None:
    if len(patients) < MIN_PATIENTS:
        raise InputError(f"{run.workdir}: the run has {len(patients)} training patients; "
                         f"evaluation needs at least {MIN_PATIENTS}")


def _load_outputs(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _fault_injection(done_in_process: int) -> None:
    """Test hook: TRACIN_JAX_KILL_AFTER_UNITS=n SIGKILLs this process after its n-th model file."""
    at = os.environ.get("TRACIN_JAX_KILL_AFTER_UNITS")
    if at is not None and int(at) == done_in_process:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the same finished model file as ``src`` (a hard link, else an atomic copy;
    nothing when another process made it first)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        return
    except OSError:
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _create_json(path: Path, obj: Any) -> None:
    """Writes ``path`` unless it exists, atomically, through a temporary file private to this
    process: processes creating the same file at once never share a temporary file, and the
    first one's file stays."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # no hard links here: the same content replaces the same content
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise InputError(f"{path}: cannot be written ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Unit:
    """One model file to train: the model trains on the patients of ``mask`` (bool[P]) with
    training seed ``seed`` under the ``steps`` rule, and its test outputs go to ``path``."""

    path: Path
    mask: np.ndarray = field(repr=False, compare=False)
    seed: int
    steps: str = "epochs"
    label: str = ""

    @property
    def done(self) -> bool:
        return self.path.exists()


def describe_units(units: Sequence[Unit], shown: int = 4) -> str:
    """The first ``shown`` units by label, each kind named once: ``ground truth m0001_r00,
    m0002_r00, leave-out 3fa2b1c0 and 4 more``."""
    parts, kind = [], None
    for u in units[:shown]:
        label = u.label or u.path.stem
        k, _, name = label.rpartition(" ")
        parts.append(name if k == kind else label)
        kind = k
    more = len(units) - shown
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def unit_steps(run, unit: Unit) -> int:
    """Optimiser steps the training of ``unit`` takes."""
    _, slice_patient = run_patients(run)
    return schedule_steps(run, int(np.asarray(unit.mask, bool)[slice_patient].sum()), unit.steps)


def _local_device():
    """This process's first device: models are trained where no other process computes."""
    import jax

    return jax.default_device(jax.local_devices()[0])


def train_units(run, units: Sequence[Unit], *, mode: str = "auto", group: int | None = None,
                bar: tqdm | None = None, poll_s: float | None = None,
                log=None) -> int:
    """Trains every unit whose file is missing, each under a claim, until all files exist.

    Up to ``group`` units at a time (the units this process manages to claim, with the same
    steps rule; one in sequential mode) train together; each one's test outputs (plus
    ``seconds``, ``mode``, ``steps``, the ``worker`` that trained it and its number of ``cpus``)
    are written atomically, then its claim is released. Units claimed by other live processes
    are left to them: once nothing is left to claim, this process waits (polling every
    ``poll_s`` seconds; ``bar`` counts the finished files) until their files exist or their
    claims become free. Training runs on this process's first local device. Returns the number
    of units trained here.
    """
    mode = resolve_mode(mode)
    size = 1 if mode == "sequential" else int(group or VMAP_GROUP)
    poll_s = workers_mod.POLL_S if poll_s is None else poll_s
    log = log or workers_mod._stderr
    units = list(units)

    def sync_bar() -> None:
        if bar is not None:
            bar.update(sum(u.done for u in units) - bar.n)

    written, waiting = 0, False
    pending = [u for u in units if not u.done]
    while pending:
        batch: list[tuple[Unit, workers_mod.Claim]] = []
        for u in pending:
            if len(batch) == size:
                break
            if batch and u.steps != batch[0][0].steps:
                continue
            claim = workers_mod.try_claim(u.path, log=log)
            if claim is not None:
                batch.append((u, claim))
        if not batch:
            if not waiting:
                log(f"waiting for {len(pending)} model(s) claimed by other processes")
                waiting = True
            time.sleep(poll_s)
            sync_bar()
            pending = [u for u in pending if not u.done]
            continue
        waiting = False
        try:
            t0 = time.perf_counter()
            with _local_device():
                variables = train_models(run, np.stack([u.mask for u, _ in batch]),
                                         [u.seed for u, _ in batch], mode=mode, progress=False,
                                         steps=batch[0][0].steps)
                outs = [test_outputs(run, unstack(variables, k)) for k in range(len(batch))]
            seconds = (time.perf_counter() - t0) / len(batch)
            for (u, claim), out in zip(batch, outs):
                save_npz_atomic(u.path, seconds=np.float64(seconds), mode=np.array(mode),
                                steps=np.array(u.steps), worker=np.array(workers_mod.owner()),
                                cpus=np.int64(workers_mod.usable_cpus()), **out)
                claim.release()
                written += 1
                sync_bar()
                _fault_injection(written)
        finally:
            for _, claim in batch:
                claim.release()
        pending = [u for u in pending if not u.done]
    sync_bar()
    return written


# Config keys added after ground truths were first cached, with the value every earlier run had:
# left out of the cache key at that value, so caches written before the key existed stay valid
# (model.arch predates run identities, so only the cache key leaves it out).
KEY_ADDED_LATER = {("model", "arch"): "unet", **identity.KEYS_ADDED_LATER}


def config_identity(config) -> dict:
    """The run's config as the cache keys hash it (``config.to_dict()`` without the keys of
    :data:`KEY_ADDED_LATER` at their original value)."""
    return identity.without_keys_at(config.to_dict(), KEY_ADDED_LATER)


def ground_truth_settings(run, *, subsets: int, fraction: float, seeds: int, seed: int) -> dict:
    """The settings a ground truth depends on (hashed into its folder name)."""
    patients, _ = run_patients(run)
    return {
        "config": config_identity(run.config),
        "patients": patients,
        "train_ids": list(run.train.ids),
        "test_ids": list(run.test.ids),
        "subsets": int(subsets),
        "fraction": float(fraction),
        "seeds": int(seeds),
        "seed": int(seed),
    }


def _reusable_units(root: Path, settings: dict) -> dict[tuple[int, int], Path]:
    """Finished model files of sibling ground truths that differ from ``settings`` only in R.

    Subsets do not depend on R and the training seeds are a prefix-stable sequence
    (:func:`training_seeds`), so model (m, r) of a ground truth with R' seeds is the same model as
    (m, r) of one with R seeds, for r < min(R, R'): ``--seeds 2`` after ``--seeds 1`` trains only
    the second seed. Returns {(m, r): file}.
    """
    found: dict[tuple[int, int], Path] = {}
    if not root.is_dir():
        return found
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
    for folder in sorted(root.iterdir()):
        try:
            other = json.loads((folder / "settings.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(other, dict) or {**other, "seeds": settings["seeds"]} != settings:
            continue
        for f in (folder / "units").glob("m*_r*.npz"):
            m, r = f.stem[1:].split("_r")
            found.setdefault((int(m), int(r)), f)
    return found


@dataclass
class GroundTruthPlan:
    """What a ground truth needs, computed without writing anything (:func:`plan_ground_truth`)."""

    folder: Path  # <workdir>/ground_truth/<key>
    settings: dict
    masks: np.ndarray  # bool[M, P]
    training_seeds: list[int]
    units: list[Unit]  # M x R, (m, r) in row-major order
    reusable: dict  # {unit file: finished file of a sibling ground truth}
    patients: list[str]

    @property
    def complete(self) -> bool:
        """Whether the folder holds a finished ground truth (``meta.json``)."""
        return (self.folder / "meta.json").exists()

    def missing(self) -> list[Unit]:
        """Units neither trained nor reusable from a sibling (none once complete)."""
        if self.complete:
            return []
        return [u for u in self.units if not u.done and u.path not in self.reusable]


def plan_ground_truth(workdir, *, subsets: int | None = None, fraction: float | None = None,
                      seeds: int | None = None, seed: int = 0,
                      small: bool = False) -> GroundTruthPlan:
    """The folder, subsets, training seeds and units of a ground truth (settings checked as
    :func:`compute_ground_truth` does); writes nothing."""
    preset = SMALL if small else DEFAULTS
    subsets = preset["subsets"] if subsets is None else subsets
    fraction = preset["fraction"] if fraction is None else fraction
    seeds = preset["seeds"] if seeds is None else seeds
    _check_settings(subsets, fraction, seeds)
    run = _as_run(workdir)
    patients, _ = run_patients(run)
    _check_patients(run, patients)
    settings = ground_truth_settings(run, subsets=subsets, fraction=fraction, seeds=seeds,
                                     seed=seed)
    out = Path(run.workdir) / GROUND_TRUTH_DIR / _digest(settings)
    _check_stored_settings(out, settings, run)
    masks = patient_subsets(len(patients), int(subsets), float(fraction), int(seed))
    tseeds = training_seeds(seed, int(seeds))
    found = _reusable_units(out.parent, settings)
    units, reusable = [], {}
    for m in range(int(subsets)):
        for r in range(int(seeds)):
            name = f"m{m:04d}_r{r:02d}"
            units.append(Unit(out / "units" / f"{name}.npz", masks[m], tseeds[r], "epochs",
                              f"ground truth {name}"))
            if (m, r) in found and found[(m, r)] != units[-1].path:
                reusable[units[-1].path] = found[(m, r)]
    return GroundTruthPlan(folder=out, settings=settings, masks=masks, training_seeds=tseeds,
                           units=units, reusable=reusable, patients=patients)


def _check_stored_settings(folder: Path, settings: dict, run) -> None:
    """One-line InputError when ``folder/settings.json`` exists and is not ``settings``."""
    stored_path = folder / "settings.json"
    if not stored_path.exists():
        return
    try:
        stored = json.loads(stored_path.read_text())
    except (OSError, ValueError):
        stored = None
    if stored != json.loads(json.dumps(settings)):
        raise InputError(f"{stored_path}: differs from the settings the run in {run.workdir} "
                         "gives for this ground truth (the run changed under an existing ground "
                         "truth, or the file was edited); move that folder away to start afresh")


def prepare_ground_truth(plan: GroundTruthPlan) -> None:
    """Creates the folder of ``plan`` (``units/``, ``settings.json``) and links the reusable
    units; safe to run in several processes at once."""
    (plan.folder / "units").mkdir(parents=True, exist_ok=True)
    if not (plan.folder / "settings.json").exists():
        _create_json(plan.folder / "settings.json", plan.settings)
    for dst, src in plan.reusable.items():
        if not dst.exists():
            _link_or_copy(src, dst)


def compute_ground_truth(workdir, *, subsets: int | None = None, fraction: float | None = None,
                         seeds: int | None = None, seed: int = 0, mode: str = "auto",
                         progress: bool = True, small: bool = False,
                         group: int | None = None) -> GroundTruth:
    """Computes (or resumes, or reads) the ground truth of the run in ``workdir``.

    Args:
      workdir: a training workdir (or a loaded :class:`tracin_jax.run.Run`).
      subsets: M (default 64; 6 with ``small``). fraction: alpha (default 0.5).
      seeds: R training seeds per subset (default 1). seed: draws the subsets and training seeds.
      mode: ``auto`` | ``sequential`` | ``vmap`` (see :func:`~tracin_jax.training.multi.train_models`).
      small: the test suite's preset (``SMALL``) for settings not given.
      group: models trained together in vmap mode (default 8; sequential trains one at a time).
    Returns:
      :class:`GroundTruth`; its folder is ``<workdir>/ground_truth/<key>/``. Units being
      trained by other processes are waited for (:func:`train_units`).
    """
    mode = resolve_mode(mode)
    run = _as_run(workdir)
    plan = plan_ground_truth(run, subsets=subsets, fraction=fraction, seeds=seeds, seed=seed,
                             small=small)
    out = plan.folder
    if plan.complete:
        return load_ground_truth(out)

    prepare_ground_truth(plan)
    units = plan.units
    bar = tqdm(total=len(units), initial=sum(u.done for u in units), desc="ground truth",
               unit="model", disable=not progress, dynamic_ncols=True)
    train_units(run, units, mode=mode, group=group, bar=bar)
    bar.close()

    m_, r_ = plan.masks.shape[0], len(plan.training_seeds)
    outs = {(m, r): _load_outputs(units[m * r_ + r].path) for m in range(m_) for r in range(r_)}
    arrays = {"masks": plan.masks}
    for name in OUTPUT_KEYS:
        arrays[name] = np.stack([np.stack([outs[(m, r)][name] for r in range(r_)])
                                 for m in range(m_)]).astype(np.float32)
    for name, value in arrays.items():
        save_npy_atomic(out / f"{name}.npy", value)
    settings = plan.settings
    meta = {
        "patients": plan.patients, "test_ids": settings["test_ids"], "M": m_, "R": r_,
        "alpha": float(settings["fraction"]), "seed": int(settings["seed"]),
        "training_seeds": plan.training_seeds,
        "subset_size": int(plan.masks[0].sum()), "config": settings["config"],
        "workdir": str(Path(run.workdir).resolve()),
        "run_identity": identity.describe(run, [])["run"],
        "unit_seconds": [[float(outs[(m, r)]["seconds"]) for r in range(r_)] for m in range(m_)],
        "unit_modes": [[str(outs[(m, r)]["mode"]) for r in range(r_)] for m in range(m_)],
    }
    write_json_atomic(out / "meta.json", meta)
    return load_ground_truth(out)  # the same object a later call reads


def _removal_key(run, removed: Sequence[str], seed: int, steps: str = "epochs") -> str:
    key = {"config": config_identity(run.config), "train_ids": list(run.train.ids),
           "test_ids": list(run.test.ids), "removed": sorted(removed), "seed": int(seed)}
    if steps != "epochs" and removed:  # the full-data model is the same under both rules
        key["steps"] = steps
    return _digest(key)


def leave_out_path(workdir, removed: Sequence[str], seed: int, steps: str = "epochs") -> Path:
    """Cache file of the model trained without ``removed`` (exists once that model is trained);
    ``steps``: the rule for its number of steps (:func:`~tracin_jax.training.multi.train_models`)."""
    run = _as_run(workdir)
    return (Path(run.workdir) / GROUND_TRUTH_DIR / LEAVE_OUT_DIR
            / f"{_removal_key(run, [str(p) for p in removed], seed, steps)}.npz")


def _removal_mask(patients: Sequence[str], removed: Sequence[str], where) -> np.ndarray:
    """bool[P]: True for every patient not in ``removed``; InputError on unknown ids or k >= P."""
    unknown = sorted(set(map(str, removed)) - set(patients))
    if unknown:
        raise InputError(f"{where}: patient {unknown[0]!r} is not a training patient of the run")
    if len(set(map(str, removed))) >= len(patients):
        raise InputError(f"{where}: removing {len(set(removed))} patients leaves none of the "
                         f"{len(patients)} training patients")
    return np.array([p not in set(map(str, removed)) for p in patients], bool)


def leave_out_units(workdir, removal_sets: Sequence[Sequence[str]], seed: int,
                    steps: str = "epochs") -> list[Unit]:
    """The units of the models trained without each removal set (one per distinct file, in
    order of first appearance); checks the sets, writes nothing."""
    check_step_rule(steps)
    run = _as_run(workdir)
    patients, _ = run_patients(run)
    _check_patients(run, patients)
    units, seen = [], set()
    for removed in removal_sets:
        mask = _removal_mask(patients, removed, run.workdir)
        p = leave_out_path(run, removed, seed, steps)
        if p not in seen:
            seen.add(p)
            units.append(Unit(p, mask, int(seed), steps, f"leave-out {p.stem[:8]}"))
    return units


def retrain_without_many(workdir, removal_sets: Sequence[Sequence[str]], seed: int, *,
                         mode: str = "auto", progress: bool = True,
                         group: int | None = None, steps: str = "epochs") -> list[dict]:
    """Models trained on every training patient except each removal set (training seed ``seed``).

    ``steps``: ``epochs`` (the run's epochs over the kept slices) or ``matched`` (as many steps
    as on all patients; see :func:`~tracin_jax.training.multi.train_models`); the two are
    cached apart. Returns one :func:`~tracin_jax.evaluate.retrain.test_outputs` dict per
    removal set (plus ``seconds``); trains only those not yet cached in
    ``<workdir>/ground_truth/leave_out/`` (each under a claim, :func:`train_units`).
    """
    mode = resolve_mode(mode)
    run = _as_run(workdir)
    units = leave_out_units(run, removal_sets, seed, steps)
    paths = [leave_out_path(run, r, seed, steps) for r in removal_sets]
    todo = [u for u in units if not u.done]
    if todo:
        todo[0].path.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(todo), desc="leave-out retraining", unit="model",
                   disable=not progress, dynamic_ncols=True)
        train_units(run, todo, mode=mode, group=group, bar=bar)
        bar.close()
    return [_load_outputs(p) for p in paths]


def retrain_without(workdir, removed: Sequence[str], seed: int, *, mode: str = "auto",
                    progress: bool = True, steps: str = "epochs") -> dict:
    """The test outputs of a model trained without the patients ``removed`` (cached)."""
    return retrain_without_many(workdir, [removed], seed, mode=mode, progress=progress,
                                steps=steps)[0]
