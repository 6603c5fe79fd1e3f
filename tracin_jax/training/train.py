"""Training: Flax U-Net + Optax, a checkpoint after every epoch, resumable.

``train_and_evaluate(config, data_dir, workdir)`` is the whole stage. The workdir it fills:

- ``config.json``: the full config as run: for a non-BraTS task, the automatic data settings
  (:func:`~tracin_jax.data.loader.resolve_data_config`) and ``model.num_classes`` = C + 1 when
  it was left at its default (:func:`resolve_config`);
- ``run.json``: data folder, dataset info, split ids, and ``task`` (the task's channels,
  classes and label values, :class:`~tracin_jax.task.Task`).
- ``checkpoints/<epoch>/``: see :mod:`tracin_jax.checkpoints`.
- ``metrics.jsonl``: one line per epoch (loss, per-class hard Dice on train and test, lr, time).

Resuming: running again on the same workdir restores the latest complete checkpoint and goes on
from the next epoch; epoch ``e`` shuffles with a seed derived from ``(train.seed, e)``, so a
resumed run visits the data in the same order as an uninterrupted one.

Data parallel (:mod:`tracin_jax.training.parallel`): the batch is split over every device of
every JAX process (one 1-D mesh), the variables and optimiser state are replicated, and XLA
all-reduces the gradients of the global-batch loss. Any device and process count trains the
same model up to float reassociation, with the same augmentation keys, and a checkpoint
written with one count resumes with any other. Every process loads the same data and runs the
same loop; only process 0 writes the workdir. ``train.batch_size`` must be a multiple of the
device count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tracin_jax.progress import tqdm

from tracin_jax import checkpoints, identity
from tracin_jax.atomic import write_json_atomic, writing
from tracin_jax.paths import check_free_space, check_writable_folder
from tracin_jax.config import Config, ModelConfig, config_from_dict, validate
from tracin_jax.data.dataset import class_slice_counts
from tracin_jax.errors import InputError
from tracin_jax.models import build_model, count_params
from tracin_jax.task import Task, task_of
from tracin_jax.training import augment, parallel
from tracin_jax.training.window import inference_model, patch_of
from tracin_jax.training.losses import (CLASS_NAMES, absent_class_predictions,
                                        classwise_dice_loss, dice_from_counts, hard_dice_counts,
                                        training_loss)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"


def make_optimizer(cfg) -> optax.GradientTransformation:
    """Adam (paper: lr 2e-4, b1 0.5) or plain SGD; the lr stays readable in the state."""
    if cfg.optimizer == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=cfg.lr, b1=cfg.b1, b2=cfg.b2)
    return optax.inject_hyperparams(optax.sgd)(learning_rate=cfg.lr, momentum=cfg.momentum or None)


def applied_learning_rate(opt_state) -> float:
    return float(opt_state.hyperparams["learning_rate"])


def init_variables(model, key, image_shape: tuple[int, int, int]) -> dict:
    """{'params': ..., 'batch_stats': ...} for inputs of shape [H, W, C]; batch_stats may be {}.

    The same distributions as ``model.init`` (Flax defaults: kernels LeCun-normal, i.e. a normal
    truncated at 2 std with variance 1/fan_in, fan_in = prod(kernel.shape[:-1]); biases and
    BatchNorm/GroupNorm shifts 0, scales 1; running means 0, variances 1), but not the same
    numbers: the shapes come from ``jax.eval_shape(model.init)`` and the kernels are drawn with
    numpy, seeded by the key's data (:func:`_numpy_kernels`). Compiling ``model.init`` itself
    spent minutes on its per-parameter random draws on a loaded 2-core CPU. Deterministic in
    ``key``. Under tracing (``jax.eval_shape``, ``jax.jit``) the key has no value, so the kernels
    come from :func:`_draw_kernels` (same law, other numbers).
    """
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    shapes = jax.eval_shape(partial(model.init, train=False), key, x)
    shapes = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    kinds = tuple(_leaf_kind(path) for path, _ in leaves)
    kernel_shapes = tuple(tuple(leaf.shape) for (_, leaf), k in zip(leaves, kinds) if k == "kernel")
    if isinstance(key, jax.core.Tracer):
        kernels = iter(_draw_kernels(key, kernel_shapes))
    else:
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        kernels = iter(jnp.asarray(k) for k in _numpy_kernels(seed, kernel_shapes))
    out = []
    for (_, leaf), kind in zip(leaves, kinds):
        if kind == "kernel":
            out.append(next(kernels).astype(leaf.dtype))
        else:
            # numpy, then one transfer: an eager jnp.full would compile a program per shape.
            out.append(jnp.asarray(np.full(leaf.shape, 1.0 if kind == "one" else 0.0, leaf.dtype)))
    return jax.tree_util.tree_unflatten(treedef, out)


def _lecun_std(shape: tuple[int, ...]) -> float:
    """Std before truncation that gives variance 1/fan_in after truncating N(0, 1) to [-2, 2]."""
    return math.sqrt(1.0 / math.prod(shape[:-1])) / 0.87962566103423978


def _numpy_kernels(seed: list[int], shapes: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
    """LeCun-normal kernels f32[*shape] for each shape, from ``np.random.default_rng(seed)``.

    N(0, 1) truncated to [-2, 2] by redrawing the values outside (about 4.6 %, then 0.2 %, ...),
    times :func:`_lecun_std`: the law of ``jax.nn.initializers.lecun_normal()``.
    """
    rng = np.random.default_rng(seed)
    flat = rng.standard_normal(sum(math.prod(s) for s in shapes), dtype=np.float32)
    bad = np.flatnonzero(np.abs(flat) > 2.0)
    while bad.size:
        flat[bad] = rng.standard_normal(bad.size, dtype=np.float32)
        bad = bad[np.abs(flat[bad]) > 2.0]
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[start:start + size].reshape(shape) * np.float32(_lecun_std(shape)))
        start += size
    return out


def _leaf_kind(path) -> str:
    """'kernel' (LeCun normal), 'one' (norm scales, running variances) or 'zero' (the rest)."""
    name = getattr(path[-1], "key", str(path[-1]))
    if name == "kernel":
        return "kernel"
    if name in ("scale", "var"):
        return "one"
    if name in ("bias", "mean"):
        return "zero"
    raise ValueError(f"no initializer known for variable {jax.tree_util.keystr(path)}")


@partial(jax.jit, static_argnums=1)
def _draw_kernels(key, shapes: tuple[tuple[int, ...], ...]) -> list[jax.Array]:
    """Traced counterpart of :func:`_numpy_kernels`: the kernels cut from one flat
    ``jax.random.truncated_normal`` draw (one small XLA program, used under tracing only)."""
    sizes = [math.prod(s) for s in shapes]
    flat = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), jnp.float32)
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[start:start + size].reshape(shape) * _lecun_std(shape))
        start += size
    return out


def make_apply(model) -> Callable:
    """Inference-mode apply(variables, images f32[B,H,W,C]) -> logits f32[B,H,W,K]."""

    def apply(variables, images):
        return model.apply(variables, images, train=False)

    return apply


def make_train_step(model, tx, tcfg, image_hw: tuple[int, int], downsample: int = 1,
                    out_sharding=None, patch: tuple[int, ...] | None = None):
    """Jitted step(variables, opt_state, images f32[B,H,W,C], labels int32[B,H,W], key) ->
    (variables, opt_state, loss f32[]); variables and opt_state are donated. Volumes (a 3D
    model): images f32[B,X,Y,Z,C], labels int32[B,X,Y,Z].

    The loss is the mean over the B examples of the batch, however they are placed; the
    shardings of the inputs choose the placement. ``out_sharding`` (e.g. replicated on the
    data-parallel mesh) fixes that of every output; None leaves it to XLA.

    Augmentation, in this order, each drawing a key split from ``key``: a random ``patch`` of
    each volume (``data.patch``, when given), the resize-crop of slices
    (``train.augment_resize_crop``), flips (``train.augment_flip``: the last in-plane axis of a
    slice, each axis of a volume), intensity jitter (``train.augment_intensity`` > 0).
    """
    resize_to = int(round(tcfg.resize_to / downsample))
    jitter = float(getattr(tcfg, "augment_intensity", 0.0))

    def step(variables, opt_state, images, labels, key):
        if patch is not None:
            key, sub = jax.random.split(key)
            images, labels = augment.random_patch(sub, images, labels, patch)
        if tcfg.augment_resize_crop:
            key, sub = jax.random.split(key)
            images, labels = augment.random_resize_crop(sub, images, labels, resize_to)
        if tcfg.augment_flip:
            key, sub = jax.random.split(key)
            flip = augment.random_flip if labels.ndim == 3 else augment.random_flips
            images, labels = flip(sub, images, labels)
        if jitter > 0:
            key, sub = jax.random.split(key)
            images = augment.random_intensity(sub, images, jitter)

        def loss_fn(params):
            logits, new_state = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                images, train=True, mutable=["batch_stats"])
            loss = training_loss(logits, labels, kind=tcfg.loss,
                                 background_weight=tcfg.background_weight, eps=tcfg.dice_eps)
            return loss, new_state.get("batch_stats", {})

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, "batch_stats": batch_stats}, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_sharding)


def make_eval_step(model, eps: float, out_sharding=None):
    """Jitted step(variables, images f32[B,H,W,C], labels int32[B,H,W]) -> (counts f32[3, K]
    (volumes: f32[B,X,Y,Z,C], int32[B,X,Y,Z]; ``model`` the run's inference model, which for
    a run trained on patches is the sliding window, :mod:`~tracin_jax.training.window`)
    summed over the batch (see :func:`~tracin_jax.training.losses.hard_dice_counts`), loss f32[]:
    the sum over the batch of the mean tumour-class soft-Dice loss); ``out_sharding`` as in
    :func:`make_train_step`."""

    def step(variables, images, labels):
        logits = model.apply(variables, images, train=False)
        counts = hard_dice_counts(jnp.argmax(logits, -1), labels, logits.shape[-1])
        loss = jnp.sum(jnp.mean(classwise_dice_loss(logits, labels, eps)[:, 1:], axis=-1))
        return counts, loss

    return jax.jit(step, out_shardings=out_sharding)


def _put_local(images: np.ndarray, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(images), jnp.asarray(labels, jnp.int32)


def evaluate(eval_step, variables, images: np.ndarray, labels: np.ndarray, batch_size: int,
             put: Callable = _put_local, class_names=CLASS_NAMES) -> dict:
    """Per-class hard Dice over the whole split (global counts), mean soft-Dice loss, and the
    voxels predicted as classes absent from the split's labels.

    ``put(images, labels)`` places one host batch for ``eval_step`` (default: this process's
    default device; :func:`~tracin_jax.training.parallel.put_batch` for the mesh).
    ``class_names``: the C foreground classes 1..C (the task's; default BraTS). Returns
    {"dice": {class: float | None}, "fp_voxels": {class: int} (absent classes only),
    "loss": float | None}; see :func:`~tracin_jax.training.losses.dice_from_counts`.
    """
    n = len(images)
    if n == 0:
        return {"dice": dict.fromkeys(class_names), "fp_voxels": {}, "loss": None}
    counts, total = 0.0, 0.0
    for s in range(0, n, batch_size):
        c, l = eval_step(variables, *put(images[s:s + batch_size], labels[s:s + batch_size]))
        counts, total = counts + np.asarray(c), total + float(l)
    dice = dice_from_counts(counts)[1:len(class_names) + 1]
    fp = absent_class_predictions(counts)[1:len(class_names) + 1]
    return {"dice": dict(zip(class_names, dice)),
            "fp_voxels": {k: v for k, v in zip(class_names, fp) if v is not None},
            "loss": total / n}


def example_word(config) -> str:
    """What one example of a run is: ``slice`` (2D) or ``volume`` (``model.dims=3``)."""
    return "volume" if int(getattr(config.model, "dims", 2)) == 3 else "slice"


def absent_class_warnings(dataset) -> list[str]:
    """One-line warnings for foreground classes absent from every example (slice or volume) of
    a split.

    The classes are those of ``dataset.info["task"]`` (BraTS when absent). Uses
    ``dataset.info["class_slices"][split]`` where the loader provides it, else counts the
    labels (:func:`~tracin_jax.data.dataset.class_slice_counts`).
    """
    names = task_of(dataset.info).classes
    volumes = task_of(dataset.info).dims == 3
    known = dataset.info.get("class_slices") or {}
    out = []
    for split in ("train", "test"):
        part = getattr(dataset, split)
        if len(part.labels) == 0:
            continue
        counts = known.get(split) or class_slice_counts(np.asarray(part.labels), names)
        absent = [name for name in names if counts.get(name, 0) == 0]
        if absent:
            effect = ("its test Dice is undefined, shown '-'" if split == "test"
                      else "the model cannot learn it")
            if volumes:
                out.append(f"warning: no {split} volume contains {', '.join(absent)} ({effect})")
                continue
            what = ("every slice with tumour use --set data.slices=tumour" if names == CLASS_NAMES
                    else "every slice with a foreground class use --set data.slices=foreground")
            out.append(f"warning: no {split} slice contains {', '.join(absent)} ({effect}); "
                       f"to train and test on {what}")
    return out


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Deterministic shuffle of n examples for an epoch (so resumed runs match)."""
    return np.random.RandomState((seed * 100_003 + epoch) % (2**32)).permutation(n)


def _rewrite_metrics(path: Path, last_epoch: int) -> None:
    """Keeps metric lines of epochs that have a checkpoint (drops those of a killed epoch).
    Process 0 only (the caller checks)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= last_epoch:
                keep.append(line)
        except (ValueError, KeyError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    with writing(tmp, path):
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, path)


def _check_same_config(workdir: Path, config: Config) -> None:
    path = workdir / CONFIG_FILE
    if not path.exists():
        return
    # Through config_from_dict: keys added since the run was written take their defaults.
    old = json.loads(config_from_dict(json.loads(path.read_text())).to_json())
    new = json.loads(config.to_json())
    for section in ("data", "model", "train"):
        for key in sorted(set(old.get(section, {})) | set(new[section])):
            a, b = old.get(section, {}).get(key), new[section].get(key)
            if a != b:
                raise InputError(
                    f"{workdir} holds a run with a different config ({section}.{key}: {a!r} there, "
                    f"{b!r} now); use a new --workdir")


def _finished(workdir: Path, epochs: int) -> bool:
    """Whether ``workdir`` holds the checkpoint of epoch ``epochs`` or a later one."""
    done = checkpoints.list_epochs(workdir) if workdir.is_dir() else []
    return bool(done) and done[-1] >= epochs


def _run_record(data_dir, dataset, task: Task) -> dict:
    return {"data_dir": str(Path(data_dir).resolve()), "task": task.to_dict(), "dataset": dataset.info,
            "train_ids": dataset.train.ids, "test_ids": dataset.test.ids}


def resolve_config(config: Config, data_dir) -> tuple[Config, Task, dict]:
    """The config to run on ``data_dir``, its task, and the data settings chosen automatically.

    For a non-BraTS task (an MSD task other than Task01, an nnU-Net dataset) with
    ``data.auto``, the data settings come from the data
    (:func:`~tracin_jax.data.loader.resolve_data_config`, in-plane size a multiple of
    ``2**model.depth``); ``model.num_classes`` left at its default (4) becomes the task's C + 1
    (any other value is kept: :func:`check_num_classes` refuses one too small). BraTS data keep
    the config as it is. InputError in one line for bad data or a config they do not fit.
    """
    from tracin_jax.data.loader import resolve_data_config

    data, task, auto = resolve_data_config(data_dir, config.data,
                                           size_multiple=2**config.model.depth,
                                           dims=config.model.dims)
    model = config.model
    default = {f.name: f.default for f in dataclasses.fields(ModelConfig)}["num_classes"]
    if model.num_classes == default and task.num_classes != default:
        model = dataclasses.replace(model, num_classes=task.num_classes)
    if data != config.data or model != config.model:
        config = dataclasses.replace(config, data=data, model=model)
        validate(config)
    return config, task, auto


def _check_same_data(workdir: Path, record: dict, log: Callable[[str], None]) -> bool:
    """Compares the split of ``record`` with the workdir's run.json; returns whether run.json must
    be (re)written.

    The same train and test example ids from another folder are accepted (a moved or copied data
    folder: run.json then points to the new folder); other ids raise InputError, since later
    stages would treat training patients as test patients.
    """
    path = workdir / RUN_FILE
    if not path.exists():
        return True
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise InputError(f"{path}: not valid JSON; use a new --workdir") from None
    for split in ("train", "test"):
        a, b = old.get(f"{split}_ids"), record[f"{split}_ids"]
        if a != b:
            only_old = len(set(a or []) - set(b))
            raise InputError(
                f"{workdir} was trained on {old.get('data_dir')} with a different {split} split "
                f"({len(a or [])} {split} examples there, {len(b)} in {record['data_dir']}, "
                f"{only_old} not in both); use a new --workdir, or --data {old.get('data_dir')}")
    if old.get("data_dir") != record["data_dir"]:
        log(f"{workdir}: data folder moved from {old.get('data_dir')} to {record['data_dir']} "
            f"(same split); run.json updated")
        return True
    return False


LOCK_FILE = "train.lock"


@contextlib.contextmanager
def train_lock(workdir: Path, log: Callable[[str], None]):
    """Holds an exclusive lock on ``<workdir>/train.lock`` (``fcntl.flock``, released by the
    kernel when its holder dies, SIGKILL included). A second ``train`` on the same workdir waits
    for the first, saying so, then resumes after the epochs it finished."""
    handle = open(workdir / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another run is training in {workdir}; waiting for it (its checkpoints will be "
                "reused)")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()


def check_num_classes(config: Config, labels: np.ndarray, data_dir) -> None:
    """One-line InputError when ``model.num_classes`` cannot hold the data's label values
    (classes 0..num_classes-1)."""
    found = sorted(int(v) for v in np.unique(labels))
    if found and found[-1] >= config.model.num_classes:
        raise InputError(
            f"model.num_classes={config.model.num_classes} but the labels of {data_dir} take the "
            f"values {', '.join(map(str, found))}; use --set model.num_classes={found[-1] + 1}")


def train_and_evaluate(config: Config, data_dir: str | os.PathLike, workdir: str | os.PathLike,
                       progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Trains (or resumes) a run and returns the last epoch's metrics; see :func:`_train`."""
    with contextlib.ExitStack() as stack:
        return _train(config, data_dir, workdir, progress, log, stack)


def _train(config: Config, data_dir: str | os.PathLike, workdir: str | os.PathLike,
           progress: bool, log: Callable[[str], None], stack: contextlib.ExitStack) -> dict:
    """Trains (or resumes) a run and returns the last epoch's metrics.

    Prints each long step before it starts and its elapsed time after (data loading, model
    initialisation, compiling the train step), a warning for tumour classes absent from a split,
    and one line per epoch. A non-finite training loss stops the run with InputError before the
    epoch's checkpoint is saved (earlier checkpoints stay).

    Several devices or processes: every process calls this with the same arguments (same config,
    same data, a workdir on a file system every process reads); each batch is split over all
    their devices (see the module docstring) and only process 0 writes the workdir. Returns, in
    every process, after the last checkpoint is complete. ``train.batch_size`` not a multiple of
    the global device count is refused before anything is written (one-line InputError naming it
    and the device count), unless every epoch is already trained; the last, partial batch of an
    epoch keeps its meaning (a smaller step, as with one device).
    """
    from tracin_jax.data import load_dataset

    t_start = time.perf_counter()

    def elapsed() -> str:
        return f"{time.perf_counter() - t_start:.1f}s"

    workdir = Path(workdir)
    check_writable_folder(workdir, "--workdir")
    # Everything that can fail on bad input happens before the workdir is written.
    log(f"loading data from {data_dir} ...")
    config, task, auto = resolve_config(config, data_dir)
    log(f"task: {task.describe()}")
    if auto:
        log(_format_auto(task, auto))
    _check_same_config(workdir, config)
    mesh = parallel.data_mesh()
    if not _finished(workdir, config.train.epochs):  # a finished run loads with any count
        parallel.check_batch_size(config.train.batch_size, mesh.size)
    writer = parallel.is_writer()
    dataset = load_dataset(data_dir, config.data, progress=progress, dims=config.model.dims)
    train, test = dataset.train, dataset.test
    unit = example_word(config)
    if len(train.images) == 0:
        raise InputError(f"{data_dir}: the training split has no {unit}s")
    check_num_classes(config, np.concatenate([train.labels.reshape(-1),
                                              test.labels.reshape(-1)]), data_dir)
    record = _run_record(data_dir, dataset, task)
    write_run = _check_same_data(workdir, record, log)
    log(f"loaded {len(train.images)} train / {len(test.images)} test {unit}s of "
        f"{'x'.join(map(str, train.images.shape[1:]))} [{elapsed()}]")
    for line in absent_class_warnings(dataset):
        log(line)

    if writer:
        workdir.mkdir(parents=True, exist_ok=True)
        if not (workdir / CONFIG_FILE).exists():
            write_json_atomic(workdir / CONFIG_FILE, config.to_dict())
        if write_run:
            write_json_atomic(workdir / RUN_FILE, record)
        stack.enter_context(train_lock(workdir, log))
    parallel.barrier("train-locked")  # every process resumes from the same checkpoint
    run_id = identity.run_hash(json.loads(config.to_json()), train.ids, test.ids)

    tcfg = config.train
    model = build_model(config.model)
    tx = make_optimizer(tcfg)
    key = jax.random.key(tcfg.seed)
    arch = "U-Net" if config.model.arch == "unet" else config.model.arch
    log(f"initialising the {arch} (width {config.model.width}, depth {config.model.depth}) ...")
    variables = init_variables(model, key, train.images.shape[1:])
    opt_state = jax.jit(tx.init)(variables["params"])  # one program, not one per leaf shape
    jax.block_until_ready(opt_state)
    log(f"initialised {count_params(variables['params']):,} parameters [{elapsed()}]")
    done = checkpoints.list_epochs(workdir)
    start, step_count = 1, 0
    if done:
        last = done[-1]
        variables, opt_state, meta = checkpoints.load_training_state(workdir, last, variables, opt_state)
        start, step_count = last + 1, int(meta["step"])
        if writer:
            _rewrite_metrics(workdir / METRICS_FILE, last)
        log(f"resuming {workdir} after epoch {last} (step {meta['step']}) [{elapsed()}]")
    if start > tcfg.epochs:
        log(f"{workdir}: all {tcfg.epochs} epochs already trained")
        return _last_metrics(workdir)
    if writer:  # every checkpoint still to write: the variables and the optimiser state
        per = sum(np.asarray(x).nbytes for x in jax.tree.leaves((variables, opt_state)))
        check_free_space([("--workdir", workdir, (tcfg.epochs - start + 1) * per)])

    if mesh.size > 1 or jax.process_count() > 1:
        log(f"data parallel over {mesh.size} devices of {jax.process_count()} processes")
    variables, opt_state = parallel.put_replicated((variables, opt_state), mesh)
    rng = parallel.put_key(key, mesh)
    train_step = make_train_step(model, tx, tcfg, train.images.shape[1:3], config.data.downsample,
                                 out_sharding=parallel.replicated(mesh), patch=patch_of(config))
    eval_step = make_eval_step(inference_model(config), tcfg.dice_eps,
                               out_sharding=parallel.replicated(mesh))
    put = partial(parallel.put_batch, mesh)
    eval_bs = (parallel.eval_batch_size(tcfg.batch_size, mesh.size) if config.model.dims == 2
               else -(-tcfg.batch_size // mesh.size) * mesh.size)  # volumes: the train batch
    n, bs = len(train.images), tcfg.batch_size
    n_batches = math.ceil(n / bs)
    last_metrics: dict = {}
    compiled = False
    for epoch in range(start, tcfg.epochs + 1):
        kept = f"checkpoints up to epoch {epoch - 1} kept" if epoch > 1 else "no checkpoint saved"
        t0 = time.perf_counter()
        order = epoch_order(n, tcfg.seed, epoch)
        losses = []
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{tcfg.epochs}", unit="batch",
                   disable=not progress, leave=False, dynamic_ncols=True)
        for b in range(n_batches):
            idx = np.sort(order[b * bs:(b + 1) * bs])
            step_key = jax.random.fold_in(jax.random.fold_in(rng, epoch), b)
            if not compiled:
                log("compiling the train step (the first step waits for it) ...")
            variables, opt_state, loss = train_step(
                variables, opt_state, *put(train.images[idx], train.labels[idx]), step_key)
            step_count += 1
            _fault_injection(step_count)
            loss_value = float(loss)
            if not compiled:
                compiled = True
                log(f"compiled the train step and ran step 1 [{elapsed()}]")
            if not math.isfinite(loss_value):
                bar.close()
                raise InputError(
                    f"training loss became {loss_value} at epoch {epoch}, step {step_count} "
                    f"(batch {b + 1}/{n_batches}) with train.lr={tcfg.lr:g}; try a lower lr, "
                    f"e.g. --set train.lr={tcfg.lr / 10:g} ({kept})")
            losses.append(loss_value)
            if b % 5 == 0 or b == n_batches - 1:
                bar.set_postfix(loss=f"{loss_value:.4f}")
            bar.update(1)
        bar.close()
        if not _all_finite(variables):
            raise InputError(
                f"weights became non-finite at epoch {epoch}, step {step_count} with "
                f"train.lr={tcfg.lr:g}; try a lower lr ({kept})")
        train_loss = float(np.mean(losses))
        train_time = time.perf_counter() - t0
        lr = applied_learning_rate(opt_state)
        if epoch == start:
            log(f"epoch {epoch} trained in {train_time:.1f}s; evaluating (compiles the "
                f"evaluation step) ...")
        ev_train = evaluate(eval_step, variables, train.images, train.labels, eval_bs, put,
                            task.classes)
        ev_test = evaluate(eval_step, variables, test.images, test.labels, eval_bs, put,
                           task.classes)
        last_metrics = {
            "epoch": epoch, "step": step_count, "lr": lr, "train_loss": train_loss,
            "train_dice": ev_train["dice"], "test_dice": ev_test["dice"],
            "train_fp_voxels": ev_train["fp_voxels"], "test_fp_voxels": ev_test["fp_voxels"],
            "test_loss": ev_test["loss"], "epoch_time_s": round(train_time, 3),
        }
        if writer:
            with open(workdir / METRICS_FILE, "a") as f:
                f.write(json.dumps(last_metrics) + "\n")
        checkpoints.save_checkpoint(workdir, epoch, variables, opt_state,
                                    {"step": step_count, "lr": lr})
        if writer:
            identity.record_checkpoint(workdir, run_id, epoch, variables)
        log(_format_metrics(last_metrics))
    parallel.barrier("tracin_jax.train.done")  # every checkpoint is complete for every process
    log(f"trained epochs {start}..{tcfg.epochs} [{elapsed()}]")
    return last_metrics


def _all_finite(tree) -> bool:
    """Whether every leaf (arrays this process holds whole) is finite; checked on the host."""
    leaves = jax.tree_util.tree_leaves(tree)
    return all(bool(np.isfinite(parallel.host_copy(x)).all()) for x in leaves)


def _fault_injection(step: int) -> None:
    """Test hook: TRACIN_JAX_KILL_AT_STEP=n SIGKILLs this process right after step n.

    Used by the resume tests to reproduce a hard kill mid-epoch deterministically.
    """
    at = os.environ.get("TRACIN_JAX_KILL_AT_STEP")
    if at is not None and int(at) == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _format_auto(task: Task, auto: dict) -> str:
    """One line: the data settings chosen automatically for a non-BraTS task, or the volume
    window chosen for a 3D run."""
    if "crop" not in auto:
        window = (f"volume window {'x'.join(map(str, auto['volume']))} centred on each case "
                  f"(data.volume)" if "volume" in auto else "")
        if "modalities" not in auto:
            return f"automatic data settings (recorded in config.json): {window}"
        return (f"{task.name} is not BraTS: automatic data settings (recorded in config.json; "
                f"--set data.auto=false to give your own): channels "
                f"{','.join(auto['modalities'])}, {window + ', ' if window else ''}"
                f"normalise {auto['normalise']}")
    y0, y1, x0, x1 = auto["crop"]
    return (f"{task.name} is not BraTS: automatic data settings (recorded in config.json; "
            f"--set data.auto=false to give your own): channels {','.join(auto['modalities'])}, "
            f"in-plane window {y1 - y0}x{x1 - x0} centred on each case (data.crop_space=centre), "
            f"slices {auto['slices']}, normalise {auto['normalise']}")


def _format_metrics(m: dict) -> str:
    """One line per epoch; Dice of a class absent from a split's labels is '-' (undefined), and
    its predicted (false-positive) voxels are listed after the Dice."""

    def fmt(split):
        d = m[f"{split}_dice"]
        text = " ".join(f"{k}={'-' if v is None else f'{v:.3f}'}" for k, v in d.items())
        fp = m.get(f"{split}_fp_voxels") or {}
        if fp:
            text += "; absent, predicted voxels: " + " ".join(f"{k}={v}" for k, v in fp.items())
        return text

    return (f"epoch {m['epoch']}: loss {m['train_loss']:.4f}  train Dice [{fmt('train')}]  "
            f"test Dice [{fmt('test')}]  lr {m['lr']:.2e}  {m['epoch_time_s']:.1f}s")


def _last_metrics(workdir: Path) -> dict:
    path = workdir / METRICS_FILE
    if not path.exists():
        return {}
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    return json.loads(lines[-1]) if lines else {}


def load_config(workdir: str | os.PathLike) -> Config:
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise InputError(f"{workdir}: not a training workdir (no {CONFIG_FILE})")
    return config_from_dict(json.loads(path.read_text()))
