"""Training-step time of a named config on this machine, and the epoch time it implies.

    python -m benchmarks.train_epoch --config paper --steps 3
    python -m benchmarks.train_epoch --config demo --n-train 130

Times ``--steps`` jitted training steps (after one warm-up step that compiles) on random inputs of
the config's image size and batch size, then reports seconds per step and the epoch time for
``--n-train`` training slices (the paper: 2070). One JSON line; the machine is named in it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.config import apply_overrides, get_config
from tracin_jax.models import build_unet, count_params
from tracin_jax.training.train import init_variables, make_optimizer, make_train_step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="paper")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--n-train", type=int, default=2070)
    args = p.parse_args(argv)

    cfg = apply_overrides(get_config(args.config), args.set)
    d = cfg.data
    h, w = (d.crop[1] - d.crop[0]) // d.downsample, (d.crop[3] - d.crop[2]) // d.downsample
    model = build_unet(cfg.model)
    variables = init_variables(model, jax.random.key(0), (h, w, 4))
    tx = make_optimizer(cfg.train)
    opt_state = tx.init(variables["params"])
    step = make_train_step(model, tx, cfg.train, (h, w), d.downsample)
    bs = cfg.train.batch_size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(bs, h, w, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=(bs, h, w)), jnp.int32)

    t0 = time.perf_counter()
    variables, opt_state, loss = step(variables, opt_state, x, y, jax.random.key(1))
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        variables, opt_state, loss = step(variables, opt_state, x, y, jax.random.key(2 + i))
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    per_step = float(np.median(times))
    steps_per_epoch = math.ceil(args.n_train / bs)
    out = {
        "config": cfg.name, "overrides": args.set, "image": [h, w], "batch_size": bs,
        "params": count_params(variables["params"]), "first_step_incl_compile_s": round(compile_s, 2),
        "step_s_median": round(per_step, 4), "step_s_all": [round(t, 4) for t in times],
        "n_train": args.n_train, "steps_per_epoch": steps_per_epoch,
        "epoch_s_estimate": round(per_step * steps_per_epoch, 1),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "backend": jax.default_backend(), "device": jax.devices()[0].device_kind},
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
