"""What a segmentation task is: its input channels and its mutually exclusive classes.

A :class:`Task` is read with the data (``Dataset.info["task"]``), stored in the run's
``run.json`` (``"task"``) and reached by every later stage through ``Run.task``: the model's
input channels and output classes, the class-wise losses, ``meta.json``, the report and the
evaluation tables.

Class indices are the model's: 0 is background, ``1..C`` are the foreground classes in the
order of :attr:`Task.classes`. ``values[c - 1]`` is the label value class ``c`` has in the
dataset's own label files (BraTS 2018-2021: ET is 4; the loader maps it to 3).

A run written before tasks were recorded has no ``"task"`` in ``run.json``: it is BraTS
(:func:`brats`), with the channels of its ``data.modalities``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tracin_jax.errors import InputError

BRATS_CLASSES = ("NCR/NET", "ED", "ET")
BRATS_CHANNELS = ("flair", "t1", "t1ce", "t2")


@dataclass(frozen=True)
class Task:
    """A task with ``M = len(channels)`` input channels and ``C = len(classes)`` mutually
    exclusive foreground classes (plus background).

    Attributes:
      name: the dataset's name (``"BraTS"``, ``"Dataset501_Shapes"``).
      format: how it was read (``brats2019`` ... ``brats2023``, ``msd``, ``nnunet``).
      channels: M channel names, in the order of the model's input channels.
      classes: C foreground class names; class ``c`` (1-based) is ``classes[c - 1]``.
      values: C label values of those classes in the dataset's label files.
      dims: 2 when the examples are slices, 3 when they are volumes (the files' own
        dimensionality is not this: a 3D dataset is read as slices by a 2D model).
    """

    name: str
    format: str
    channels: tuple[str, ...]
    classes: tuple[str, ...]
    values: tuple[int, ...]
    dims: int = 2

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(str(c) for c in self.channels))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "values", tuple(int(v) for v in self.values))
        if not self.channels:
            raise InputError(f"task {self.name!r}: no input channels")
        if not self.classes:
            raise InputError(f"task {self.name!r}: no foreground classes")
        if len(self.values) != len(self.classes):
            raise InputError(f"task {self.name!r}: {len(self.classes)} classes but "
                             f"{len(self.values)} label values")
        for what, items in (("class", self.classes), ("channel", self.channels),
                            ("label value", self.values)):
            seen = [x for i, x in enumerate(items) if x in items[:i]]
            if seen:
                raise InputError(f"task {self.name!r}: {what} {seen[0]!r} is given twice")
        if self.dims not in (2, 3):
            raise InputError(f"task {self.name!r}: dims={self.dims} must be 2 or 3")

    @property
    def num_classes(self) -> int:
        """Model outputs: C foreground classes plus background."""
        return len(self.classes) + 1

    @property
    def class_labels(self) -> tuple[int, ...]:
        """The model's indices of the foreground classes, ``(1, ..., C)``."""
        return tuple(range(1, len(self.classes) + 1))

    @property
    def is_brats(self) -> bool:
        """Whether this is the BraTS task (any BraTS layout or MSD Task01): its data settings
        (crop, slices, modalities) are the paper's; other tasks choose theirs from the data."""
        return self.name == "BraTS" and self.classes == BRATS_CLASSES

    def label_map(self) -> dict[int, int]:
        """{label value in the dataset's files: model class index}: 0 -> 0 (background) and
        ``values[c - 1]`` -> ``c``."""
        return {0: 0, **{int(v): c for c, v in enumerate(self.values, start=1)}}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "format": self.format, "channels": list(self.channels),
                "classes": list(self.classes), "values": list(self.values), "dims": self.dims}

    @classmethod
    def from_dict(cls, raw: Any, where: str = "run.json") -> "Task":
        """Inverse of :meth:`to_dict`; a malformed entry is a one-line InputError naming
        ``where``."""
        try:
            return cls(name=str(raw["name"]), format=str(raw["format"]),
                       channels=tuple(raw["channels"]), classes=tuple(raw["classes"]),
                       values=tuple(raw["values"]), dims=int(raw.get("dims", 2)))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{where}: the task entry is malformed ({type(e).__name__}: {e})") \
                from None

    def describe(self) -> str:
        """One line for the console: name, format, channels and classes with their values."""
        classes = ", ".join(f"{n} ({v})" for n, v in zip(self.classes, self.values))
        return (f"{self.name} ({self.format}, {self.dims}D): {len(self.channels)} channels "
                f"[{', '.join(self.channels)}], {len(self.classes)} classes [{classes}]")


def brats(channels: Sequence[str] = BRATS_CHANNELS, layout: str = "brats2019",
          dims: int = 2) -> Task:
    """The BraTS task: NCR/NET, ED, ET, with the label values of ``layout``'s files."""
    values = {"brats2023": (1, 2, 3), "msd": (2, 1, 3)}.get(layout, (1, 2, 4))
    return Task(name="BraTS", format=layout, channels=tuple(channels), classes=BRATS_CLASSES,
                values=values, dims=dims)


def task_of(info: dict, channels: Sequence[str] = BRATS_CHANNELS) -> Task:
    """The task recorded in ``info`` (``run.json`` or a dataset's info), BraTS with
    ``channels`` when there is none (runs written before tasks were recorded)."""
    raw = info.get("task") if isinstance(info, dict) else None
    if raw is None:
        return brats(channels, layout=str(info.get("layout", "brats2019"))
                     if isinstance(info, dict) else "brats2019")
    return Task.from_dict(raw)


__all__ = ["BRATS_CHANNELS", "BRATS_CLASSES", "Task", "brats", "task_of"]
