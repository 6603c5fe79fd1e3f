"""Training: Flax U-Net + Optax, a checkpoint after every epoch, resumable.

``train_and_evaluate(config, data_dir, workdir)`` is the whole stage. The workdir it fills:

- ``config.json``: the full config; ``run.json``: data folder, dataset info, split ids.
- ``checkpoints/<epoch>/``: see :mod:`tracin_jax.checkpoints`.
- ``metrics.jsonl``: one line per epoch (loss, per-class hard Dice on train and test, lr, time).

Resuming: running again on the same workdir restores the latest complete checkpoint and goes on
from the next epoch; epoch ``e`` shuffles with a seed derived from ``(train.seed, e)``, so a
resumed run visits the data in the same order as an uninterrupted one.
"""

from __future__ import annotations

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

from tracin_jax import checkpoints
from tracin_jax.atomic import write_json_atomic
from tracin_jax.config import Config, config_from_dict
from tracin_jax.errors import InputError
from tracin_jax.models import build_unet
from tracin_jax.training import augment
from tracin_jax.training.losses import (CLASS_NAMES, classwise_dice_loss, dice_from_counts,
                                        hard_dice_counts, training_loss)

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
    """{'params': ..., 'batch_stats': ...} for inputs of shape [H, W, C]; batch_stats may be {}."""
    # Jitted: one XLA program instead of one per layer (init is otherwise the slowest step of a
    # small run).
    variables = jax.jit(partial(model.init, train=False))(key, jnp.zeros((1, *image_shape), jnp.float32))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def make_apply(model) -> Callable:
    """Inference-mode apply(variables, images f32[B,H,W,C]) -> logits f32[B,H,W,K]."""

    def apply(variables, images):
        return model.apply(variables, images, train=False)

    return apply


def make_train_step(model, tx, tcfg, image_hw: tuple[int, int], downsample: int = 1):
    resize_to = int(round(tcfg.resize_to / downsample))

    def step(variables, opt_state, images, labels, key):
        if tcfg.augment_resize_crop:
            key, sub = jax.random.split(key)
            images, labels = augment.random_resize_crop(sub, images, labels, resize_to)
        if tcfg.augment_flip:
            key, sub = jax.random.split(key)
            images, labels = augment.random_flip(sub, images, labels)

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

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(model, eps: float):
    def step(variables, images, labels):
        logits = model.apply(variables, images, train=False)
        counts = hard_dice_counts(jnp.argmax(logits, -1), labels, logits.shape[-1])
        loss = jnp.sum(jnp.mean(classwise_dice_loss(logits, labels, eps)[:, 1:], axis=-1))
        return counts, loss

    return jax.jit(step)


def evaluate(eval_step, variables, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict:
    """Per-class hard Dice over the whole split (global counts) and mean soft-Dice loss."""
    n = len(images)
    if n == 0:
        return {"dice": dict.fromkeys(CLASS_NAMES), "loss": None}
    counts, total = 0.0, 0.0
    for s in range(0, n, batch_size):
        c, l = eval_step(variables, jnp.asarray(images[s:s + batch_size]),
                         jnp.asarray(labels[s:s + batch_size], jnp.int32))
        counts, total = counts + np.asarray(c), total + float(l)
    dice = dice_from_counts(counts)[1:]
    return {"dice": dict(zip(CLASS_NAMES, dice)), "loss": total / n}


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Deterministic shuffle of n examples for an epoch (so resumed runs match)."""
    return np.random.RandomState((seed * 100_003 + epoch) % (2**32)).permutation(n)


def _rewrite_metrics(path: Path, last_epoch: int) -> None:
    """Keeps metric lines of epochs that have a checkpoint (drops those of a killed epoch)."""
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
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


def _check_same_config(workdir: Path, config: Config) -> None:
    path = workdir / CONFIG_FILE
    if not path.exists():
        return
    old = json.loads(path.read_text())
    new = json.loads(config.to_json())
    for section in ("data", "model", "train"):
        for key in sorted(set(old.get(section, {})) | set(new[section])):
            a, b = old.get(section, {}).get(key), new[section].get(key)
            if a != b:
                raise InputError(
                    f"{workdir} holds a run with a different config ({section}.{key}: {a!r} there, "
                    f"{b!r} now); use a new --workdir")


def train_and_evaluate(config: Config, data_dir: str | os.PathLike, workdir: str | os.PathLike,
                       progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Trains (or resumes) a run and returns the last epoch's metrics."""
    from tracin_jax.data import load_dataset

    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"--workdir {workdir} exists and is not a folder")
    _check_same_config(workdir, config)
    # Everything that can fail on bad input happens before the workdir is written.
    dataset = load_dataset(data_dir, config.data, progress=progress)
    train, test = dataset.train, dataset.test
    if len(train.images) == 0:
        raise InputError(f"{data_dir}: the training split has no slices")

    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / CONFIG_FILE).exists():
        write_json_atomic(workdir / CONFIG_FILE, config.to_dict())
    write_json_atomic(workdir / RUN_FILE, {
        "data_dir": str(Path(data_dir).resolve()),
        "dataset": dataset.info,
        "train_ids": train.ids,
        "test_ids": test.ids,
    })

    tcfg = config.train
    model = build_unet(config.model)
    tx = make_optimizer(tcfg)
    key = jax.random.key(tcfg.seed)
    variables = init_variables(model, key, train.images.shape[1:])
    opt_state = tx.init(variables["params"])
    done = checkpoints.list_epochs(workdir)
    start, step_count = 1, 0
    if done:
        last = done[-1]
        variables, opt_state, meta = checkpoints.load_training_state(workdir, last, variables, opt_state)
        start, step_count = last + 1, int(meta["step"])
        _rewrite_metrics(workdir / METRICS_FILE, last)
        log(f"resuming {workdir} after epoch {last} (step {meta['step']})")
    if start > tcfg.epochs:
        log(f"{workdir}: all {tcfg.epochs} epochs already trained")
        return _last_metrics(workdir)

    train_step = make_train_step(model, tx, tcfg, train.images.shape[1:3], config.data.downsample)
    eval_step = make_eval_step(model, tcfg.dice_eps)
    n, bs = len(train.images), tcfg.batch_size
    n_batches = math.ceil(n / bs)
    last_metrics: dict = {}
    for epoch in range(start, tcfg.epochs + 1):
        t0 = time.perf_counter()
        order = epoch_order(n, tcfg.seed, epoch)
        losses = []
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{tcfg.epochs}", unit="batch",
                   disable=not progress, leave=False, dynamic_ncols=True)
        for b in range(n_batches):
            idx = np.sort(order[b * bs:(b + 1) * bs])
            step_key = jax.random.fold_in(jax.random.fold_in(key, epoch), b)
            variables, opt_state, loss = train_step(
                variables, opt_state, jnp.asarray(train.images[idx]),
                jnp.asarray(train.labels[idx], jnp.int32), step_key)
            step_count += 1
            _fault_injection(step_count)
            losses.append(loss)
            if b % 5 == 0 or b == n_batches - 1:
                bar.set_postfix(loss=f"{float(loss):.4f}")
            bar.update(1)
        bar.close()
        train_loss = float(np.mean([float(l) for l in losses]))
        train_time = time.perf_counter() - t0
        lr = applied_learning_rate(opt_state)
        ev_train = evaluate(eval_step, variables, train.images, train.labels, max(bs, 16))
        ev_test = evaluate(eval_step, variables, test.images, test.labels, max(bs, 16))
        last_metrics = {
            "epoch": epoch, "step": step_count, "lr": lr, "train_loss": train_loss,
            "train_dice": ev_train["dice"], "test_dice": ev_test["dice"],
            "test_loss": ev_test["loss"], "epoch_time_s": round(train_time, 3),
        }
        with open(workdir / METRICS_FILE, "a") as f:
            f.write(json.dumps(last_metrics) + "\n")
        checkpoints.save_checkpoint(workdir, epoch, variables, opt_state,
                                    {"step": step_count, "lr": lr})
        log(_format_metrics(last_metrics))
    return last_metrics


def _fault_injection(step: int) -> None:
    """Test hook: TRACIN_JAX_KILL_AT_STEP=n SIGKILLs this process right after step n.

    Used by the resume tests to reproduce a hard kill mid-epoch deterministically.
    """
    at = os.environ.get("TRACIN_JAX_KILL_AT_STEP")
    if at is not None and int(at) == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _format_metrics(m: dict) -> str:
    def fmt(d):
        return " ".join(f"{k}={'-' if v is None else f'{v:.3f}'}" for k, v in d.items())

    return (f"epoch {m['epoch']}: loss {m['train_loss']:.4f}  train Dice [{fmt(m['train_dice'])}]  "
            f"test Dice [{fmt(m['test_dice'])}]  lr {m['lr']:.2e}  {m['epoch_time_s']:.1f}s")


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
