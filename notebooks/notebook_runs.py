"""The trained run the notebooks work on: built once (synthetic data, then training), then reused.

Two sizes, chosen by the notebooks' first cell (environment variable ``TRACIN_JAX_NOTEBOOK_SIZE``):

- ``demo`` (default): the ``demo`` config (96 x 96 slices, width-8 U-Net, 6 epochs) on 16
  synthetic BraTS cases. If ``tracin-jax demo`` already ran (``runs/demo/run`` is fully trained),
  that run and its data are reused as they are.
- ``tiny``: 80 x 80 x 48 synthetic volumes, the ``tiny`` config at 32 x 32, 3 epochs; what the
  test suite executes the notebooks with.

Everything is written under the work folder (``TRACIN_JAX_NOTEBOOK_DIR``, default
``runs/notebooks``; a relative path is taken from the repository root): ``data-<size>/``,
``run-<size>/`` and ``figures/``. Training resumes when interrupted and is skipped when the run
is complete.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# tqdm.auto asks for ipywidgets inside Jupyter; its text bars are fine here.
warnings.filterwarnings("ignore", message="IProgress not found")

from tracin_jax import checkpoints  # noqa: E402
from tracin_jax.config import Config, apply_overrides, get_config  # noqa: E402
from tracin_jax.data import write_synthetic_dataset  # noqa: E402
from tracin_jax.data.synth import DATASET_DIR  # noqa: E402
from tracin_jax.errors import InputError  # noqa: E402
from tracin_jax.training.train import RUN_FILE, load_config, train_and_evaluate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "runs" / "demo"  # what `tracin-jax demo` writes: data/, run/, influence/, report/
SEED = 0

# size -> (synthetic cases, volume shape or None for the full 240 x 240 x 155, config, overrides)
SIZES = {
    "demo": (16, None, "demo", []),
    "tiny": (6, (80, 80, 48), "tiny",
             ["data.crop=8,72,8,72", "data.downsample=2", "data.slices=26:30", "train.epochs=3"]),
}


@dataclass
class NotebookRun:
    size: str
    work: Path  # the work folder (figures/ and anything else the notebooks write)
    data_dir: Path  # the synthetic BraTS folder
    run_dir: Path | None  # a training workdir for tracin_jax.load_run (None: data only)
    config: Config
    reused: bool  # nothing had to be built
    seconds: float

    def __str__(self) -> str:
        what = "reused" if self.reused else f"built in {self.seconds:.0f}s"
        return (f"size {self.size!r}, config {self.config.name!r} ({what})\n"
                f"  data: {self.data_dir}\n  run:  {self.run_dir}\n  work: {self.work}")

    @property
    def figures(self) -> Path:
        folder = self.work / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def size_config(size: str) -> Config:
    """The config of a notebook size (``demo`` or ``tiny``)."""
    if size not in SIZES:
        raise InputError(f"TRACIN_JAX_NOTEBOOK_SIZE={size!r}: choose one of {', '.join(SIZES)}")
    _, _, name, overrides = SIZES[size]
    return apply_overrides(get_config(name), overrides)


def work_folder(work: str | Path | None) -> Path:
    work = Path(work or "runs/notebooks").expanduser()
    return work if work.is_absolute() else REPO / work


def _synth(folder: Path, size: str) -> None:
    cases, shape, _, _ = SIZES[size]
    write_synthetic_dataset(folder, cases=cases, seed=SEED, progress=False,
                            **({"shape": shape} if shape else {}))


def _data(size: str, work: Path) -> tuple[Path, bool]:
    if size == "demo" and (DEMO / "data" / DATASET_DIR / "synth.json").is_file():
        try:  # returns at once when runs/demo/data is the same synthetic dataset
            _synth(DEMO / "data", size)
            return DEMO / "data", True
        except InputError:
            pass
    folder = work / f"data-{size}"
    done = (folder / DATASET_DIR / "synth.json").is_file()
    _synth(folder, size)
    return folder, done


def _complete(run_dir: Path, config: Config) -> bool:
    try:
        return (load_config(run_dir).to_dict() == config.to_dict()
                and len(checkpoints.list_epochs(run_dir)) >= config.train.epochs)
    except Exception:  # noqa: BLE001 - anything unreadable means "not a finished run"
        return False


def prepare_data(size: str = "demo", work: str | Path | None = None) -> NotebookRun:
    """The synthetic dataset of ``size`` (written once); no training."""
    t0 = time.perf_counter()
    config = size_config(size)
    work = work_folder(work)
    data, reused = _data(size, work)
    return NotebookRun(size, work, data, None, config, reused, time.perf_counter() - t0)


def prepare_run(size: str = "demo", work: str | Path | None = None) -> NotebookRun:
    """The trained run of ``size``: reused when complete, else synthesised and trained here."""
    t0 = time.perf_counter()
    config = size_config(size)
    work = work_folder(work)
    demo_run = DEMO / "run"
    if size == "demo" and _complete(demo_run, config):
        data = Path(json.loads((demo_run / RUN_FILE).read_text()).get("data_dir", ""))
        if data.is_dir():
            return NotebookRun(size, work, data, demo_run, config, True, time.perf_counter() - t0)
    data, reused = _data(size, work)
    run_dir = work / f"run-{size}"
    if not _complete(run_dir, config):
        reused = False
        print(f"training the {config.name!r} config into {run_dir} ...")
        train_and_evaluate(config, data, run_dir, progress=False,
                           log=lambda line: print("  " + line))
    return NotebookRun(size, work, data, run_dir, config, reused, time.perf_counter() - t0)
