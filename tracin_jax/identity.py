"""A run's identity: what influence folders and ground truths record, and later stages compare.

``<workdir>/identity.json``, written by ``train`` after every checkpoint::

    {"format": 1, "run": "<hash of the config and the split>",
     "checkpoints": {"1": "<fingerprint of epoch 1's variables>", ...}}

``run`` hashes the training config and the training and test example ids; a checkpoint's
fingerprint hashes every array of its variables (:func:`variables_fingerprint`). An influence
folder or a ground truth stores :func:`describe` of the run it was computed from (the run hash
and the fingerprints of the checkpoints it used), and :func:`check_same_run` compares such a
record with a run, whether or not the workdir that produced the record still exists: a folder
computed from another run (another seed, another split, retrained weights) is refused with one
line. Records written before identities existed hold none and are accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from tracin_jax.atomic import write_json_atomic
from tracin_jax.errors import InputError

IDENTITY_FILE = "identity.json"
FORMAT = 1


def variables_fingerprint(variables: Any) -> str:
    """Hash of every array of a variables tree (with its path, dtype and shape), as JAX arrays
    (the feature store keys each checkpoint's chunks on it too). Arrays spread over several
    processes are gathered first."""
    import jax
    import jax.numpy as jnp

    h = hashlib.sha1()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        leaf = jnp.asarray(leaf)
        if not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# Config keys added after identities were first recorded (format 1), with the value every
# earlier run had: left out of the hash at that value, so a run trained before the key existed
# keeps its identity (and its influence folders and ground truths stay valid).
KEYS_ADDED_LATER: dict[tuple[str, str], Any] = {
    ("model", "dims"): 2, ("data", "auto"): True, ("data", "volume"): [0, 0, 0],
    ("data", "patch"): [0, 0, 0], ("data", "patch_overlap"): 0.5,
    ("train", "augment_intensity"): 0.0}


def without_keys_at(config: dict, keys: dict[tuple[str, str], Any]) -> dict:
    """A copy of ``config`` (a config as a JSON dict: tuples as lists) without each
    ``(section, key)`` of ``keys`` whose value is the one given."""
    d = json.loads(json.dumps(config))
    for (section, key), value in keys.items():
        if isinstance(d.get(section), dict) and key in d[section] and d[section][key] == value:
            d[section].pop(key)
    return d


def run_hash(config: dict, train_ids: Iterable[Any], test_ids: Iterable[Any]) -> str:
    """Hash of a run's config (as a dict; the keys of :data:`KEYS_ADDED_LATER` at their
    original value left out) and its split."""
    config = without_keys_at(config, KEYS_ADDED_LATER)
    blob = json.dumps({"config": config, "train_ids": [str(i) for i in train_ids],
                       "test_ids": [str(i) for i in test_ids]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read(workdir: str | os.PathLike) -> dict | None:
    """The workdir's identity.json, or None when it has none (a run trained before it existed)."""
    path = Path(workdir) / IDENTITY_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise InputError(f"{path}: not valid JSON; delete it (it is rewritten by `tracin-jax "
                         "train` and by `describe`)") from None


def record_checkpoint(workdir: str | os.PathLike, run: str, epoch: int, variables: Any) -> None:
    """Adds checkpoint ``epoch``'s fingerprint to identity.json (run hash ``run``); a different
    run hash there starts the file afresh."""
    old = read(workdir) or {}
    if old.get("run") != run:
        old = {"format": FORMAT, "run": run, "checkpoints": {}}
    old["checkpoints"][str(int(epoch))] = variables_fingerprint(variables)
    write_json_atomic(Path(workdir) / IDENTITY_FILE, old)


def describe(run: Any, epochs: Iterable[int]) -> dict:
    """The identity of a loaded :class:`~tracin_jax.run.Run` restricted to ``epochs``: {"run",
    "checkpoints": {epoch: fingerprint}}. Fingerprints missing from identity.json (a run
    trained before it existed) are computed from the checkpoints."""
    config = json.loads(run.config.to_json())
    rh = run_hash(config, run.train.ids, run.test.ids)
    stored = read(run.workdir) or {}
    known = stored.get("checkpoints", {}) if stored.get("run") == rh else {}
    prints = {}
    for e in epochs:
        fp = known.get(str(int(e)))
        if fp is None:
            fp = variables_fingerprint(run.checkpoint(int(e)).variables)
        prints[str(int(e))] = fp
    return {"run": rh, "checkpoints": prints}


def check_same_run(recorded: dict | None, run: Any, what: str) -> None:
    """One-line InputError when ``recorded`` (a :func:`describe` stored in ``what``) is not the
    identity of ``run``; None (a record without identity) passes."""
    if not recorded:
        return
    epochs = [int(e) for e in recorded.get("checkpoints", {})]
    have = {c.epoch for c in run.checkpoints}
    mine = describe(run, [e for e in epochs if e in have])
    if recorded.get("run") != mine["run"]:
        raise InputError(f"{what} was computed from another run than {run.workdir} (another "
                         "config, seed or split); compute it again for this run")
    for e in epochs:
        if str(e) not in mine["checkpoints"]:
            raise InputError(f"{what} used the checkpoint of epoch {e}, which {run.workdir} "
                             "does not have")
        if mine["checkpoints"][str(e)] != recorded["checkpoints"][str(e)]:
            raise InputError(f"{what} was computed from other weights of epoch {e} than those "
                             f"in {run.workdir} (the run was retrained); compute it again")
