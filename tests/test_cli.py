"""The command line's help and the progress lines it writes to a pipe."""

import os
import subprocess
import sys
import textwrap


def test_help_is_plain_text():
    proc = subprocess.run([sys.executable, "-m", "tracin_jax.cli", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0
    assert "``" not in proc.stdout and ":func:" not in proc.stdout
    assert "influence" in proc.stdout and "synth" in proc.stdout


PIPED = textwrap.dedent("""
    import time
    from tracin_jax.progress import tqdm
    bar = tqdm(total=20, desc="work", unit="ex", dynamic_ncols=True, leave=False)
    for i in range(20):
        time.sleep(0.05)
        bar.update(1)
        bar.set_postfix(epoch=i // 10)
    bar.close()
""")


def test_progress_on_a_pipe_prints_plain_timed_lines():
    env = dict(os.environ, TRACIN_JAX_PROGRESS_INTERVAL="0.2")
    proc = subprocess.run([sys.executable, "-c", PIPED], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("work:")]
    assert 2 <= len(lines) <= 10, err  # about one per 0.2 s over 1 s, not one per update
    assert lines[-1].startswith("work: 20/20 (100%)") and "ex/s" in lines[-1]
    assert "epoch=1" in lines[-1] and "<" in lines[0]  # position, rate, ETA, postfix
