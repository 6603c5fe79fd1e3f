"""``load_run(workdir)``: one object that later stages and notebooks use to reach a trained run.

>>> run = tracin_jax.load_run("runs/demo")
>>> run.checkpoints[0].epoch, run.checkpoints[0].lr
>>> logits = run.apply(run.checkpoints[-1].variables, run.test.images[:2])   # f32[2,H,W,C+1]
>>> run.classwise_loss(logits, run.test.labels[:2])                        # f32[2,C]
>>> run.task.classes                          # the C class names (BraTS: NCR/NET, ED, ET)

A 3D run (``model.dims=3``) is the same with volumes: one example per case, images
f32[N, X, Y, Z, M] (canonical RAS axes), labels u8[N, X, Y, Z], logits f32[B, X, Y, Z, C+1];
``run.model`` is the network, or, for a run trained on patches (``data.patch``), the network
behind a sliding window over whole volumes (:mod:`tracin_jax.training.window`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from tracin_jax import checkpoints
from tracin_jax.errors import InputError
from tracin_jax.models import features_apply, head_name
from tracin_jax.task import task_of
from tracin_jax.training.losses import tumour_dice_loss
from tracin_jax.training.train import RUN_FILE, init_variables, load_config
from tracin_jax.training.window import inference_model


@dataclass
class Checkpoint:
    """One saved epoch. ``variables`` ({'params', 'batch_stats'}) load on first access."""

    workdir: Path
    epoch: int
    step: int
    lr: float
    _like: Any = field(repr=False, default=None)
    _variables: Any = field(repr=False, default=None)

    @property
    def variables(self) -> Any:
        if self._variables is None:
            self._variables = checkpoints.load_variables(self.workdir, self.epoch, self._like)
        return self._variables

    def check(self) -> None:
        """Reads the variables once (without keeping them) so a damaged checkpoint is reported,
        as a one-line InputError, before any work starts."""
        if self._variables is None:
            checkpoints.load_variables(self.workdir, self.epoch, self._like)


class Run:
    """A trained run: config, checkpoints in epoch order, pure apply and loss, and the data."""

    def __init__(self, workdir: str | os.PathLike, data_dir: str | os.PathLike | None = None):
        self.workdir = Path(workdir)
        if not self.workdir.is_dir():
            raise InputError(f"--workdir {self.workdir} is not a folder")
        self.config = load_config(self.workdir)
        run_file = self.workdir / RUN_FILE
        self.info = json.loads(run_file.read_text()) if run_file.exists() else {}
        self.data_dir = Path(data_dir) if data_dir else Path(self.info.get("data_dir", ""))
        self.task = task_of(self.info, self.config.data.modalities)
        if "task" in self.info:  # (a run without one is BraTS, whatever its model)
            check_outputs(self.task, self.config, self.workdir)
        self.model = inference_model(self.config)
        epochs = checkpoints.list_epochs(self.workdir)
        if not epochs:
            raise InputError(f"{self.workdir}: no checkpoints found (train first)")
        like = self.variable_shapes
        self.checkpoints = []
        for e in epochs:
            meta = checkpoints.load_meta(self.workdir, e)
            self.checkpoints.append(Checkpoint(self.workdir, e, int(meta["step"]), float(meta["lr"]), like))

    @property
    def class_names(self) -> tuple[str, ...]:
        """The C foreground class names (``task.classes``; BraTS: NCR/NET, ED, ET)."""
        return self.task.classes

    @property
    def dims(self) -> int:
        """2 when an example is a slice, 3 when it is a volume (``model.dims``)."""
        return int(getattr(self.config.model, "dims", 2))

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One example's input shape: (H, W, M) for a slice, (X, Y, Z, M) for a volume."""
        d = self.config.data
        if self.dims == 3:
            return (*(n // d.downsample for n in d.volume), len(d.modalities))
        h = (d.crop[1] - d.crop[0]) // d.downsample
        w = (d.crop[3] - d.crop[2]) // d.downsample
        return (h, w, len(d.modalities))

    @cached_property
    def variable_shapes(self) -> Any:
        """The model's variables tree ({'params', 'batch_stats'}) as ``jax.ShapeDtypeStruct``
        leaves, for inputs of :attr:`image_shape` (``jax.eval_shape`` of the initialiser: no
        arrays are allocated). Computed once per Run."""
        return jax.eval_shape(lambda: init_variables(self.model, jax.random.key(0),
                                                     self.image_shape))

    def checkpoint(self, epoch: int) -> Checkpoint:
        for c in self.checkpoints:
            if c.epoch == epoch:
                return c
        have = ", ".join(str(c.epoch) for c in self.checkpoints)
        raise InputError(f"{self.workdir}: no checkpoint for epoch {epoch} (have {have})")

    def missing_epochs(self) -> list[int]:
        """Epochs this run finished whose checkpoint is gone (see
        :func:`tracin_jax.checkpoints.missing_epochs`); empty for a complete or unfinished run."""
        return checkpoints.missing_epochs(self.workdir, [c.epoch for c in self.checkpoints])

    def check_complete(self, epochs=None, option: str = "--checkpoints") -> None:
        """One-line InputError when a checkpoint the caller needs is missing: with ``epochs``
        None every finished epoch (a caller of all checkpoints), else the epochs listed (see
        :func:`tracin_jax.checkpoints.check_complete`)."""
        checkpoints.check_complete(self.workdir, [c.epoch for c in self.checkpoints],
                                   epochs=None if epochs is None else [int(e) for e in epochs],
                                   option=option)

    def apply(self, variables: Any, images: jax.Array) -> jax.Array:
        """Inference mode (BatchNorm running stats). images f32[B,H,W,M] -> logits
        f32[B,H,W,C+1] (volumes: f32[B,X,Y,Z,M] -> f32[B,X,Y,Z,C+1]).

        Jitted (compiled once per input shape; callable inside other jitted functions too)."""
        return self._apply_jit(variables, images)

    def features(self, variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(logits f32[B,H,W,C+1], last hidden features f32[B,H,W,width]) in inference mode
        (jitted like :meth:`apply`; volumes with one more axis)."""
        return self._features_jit(variables, images)

    @cached_property
    def _apply_jit(self):
        return jax.jit(lambda variables, images: self.model.apply(variables, images, train=False))

    @cached_property
    def _features_jit(self):
        return jax.jit(lambda variables, images: features_apply(self.model, variables, images))

    @property
    def head_name(self) -> str:
        """The model's final 1x1 conv in the params tree (``head`` for every built-in model)."""
        return head_name(self.model)

    def classwise_loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """Per-example soft Dice of the task's C foreground classes (background left out):
        logits f32[B, H, W, C + 1], labels int[B, H, W] -> f32[B, C], column c - 1 for class
        c = 1..C, i.e. ``task.classes`` in order (BraTS: NCR/NET, ED, ET)."""
        return tumour_dice_loss(logits, jnp.asarray(labels, jnp.int32), self.config.train.dice_eps)

    @cached_property
    def dataset(self):
        from tracin_jax.data import load_dataset

        if not self.data_dir or not Path(self.data_dir).exists():
            raise InputError(f"{self.workdir}: data folder {str(self.data_dir)!r} not found "
                             "(pass data_dir= to load_run)")
        return load_dataset(self.data_dir, self.config.data, progress=False, dims=self.dims)

    @property
    def train(self):
        """Training examples (images f32[N,H,W,M], labels u8[N,H,W], ids, cases; a 3D run's
        volumes f32[N,X,Y,Z,M], u8[N,X,Y,Z], one per case)."""
        return self.dataset.train

    @property
    def test(self):
        return self.dataset.test


def check_outputs(task, config, workdir: Path) -> None:
    """One-line InputError when the model's outputs are not the task's background plus C
    classes (``model.num_classes`` must be C + 1): every class-wise loss, influence tensor and
    table of the run is indexed by the task's classes."""
    k = getattr(getattr(config, "model", None), "num_classes", None)
    if k is not None and int(k) != task.num_classes:
        raise InputError(f"{workdir / RUN_FILE}: the task {task.name!r} has {len(task.classes)} "
                         f"classes ({', '.join(task.classes)}) but the model has "
                         f"model.num_classes={k} outputs (expected {task.num_classes}: "
                         "background plus one per class)")


def load_run(workdir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Run:
    """Opens a training workdir. ``data_dir`` overrides the data folder recorded at training."""
    return Run(workdir, data_dir)
