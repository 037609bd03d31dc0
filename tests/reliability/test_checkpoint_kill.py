"""The classification example's checkpoints survive a SIGKILL at any point of saving.

``examples/classification/train_kd.py`` saves with ``atomic_save``: ``torch.save`` to
``<name>.tmp`` in the same folder, then ``os.replace`` onto the checkpoint. A writer process
saves train_kd-shaped checkpoints (~20 MB, every value derived from the generation number)
in a loop with that function and is killed with SIGKILL at random moments, most of them
inside a save; after every kill the checkpoint must load (``weights_only=True``), be exactly
one generation's content, be no older than the last save that returned, and a new writer
must resume from it (over the leftover ``.tmp``) and save again.

This covers process death (SIGKILL, OOM killer, preemption). It does not cover power loss:
``atomic_save`` does not fsync the file before the rename nor the folder after it (see
docs/DISTRIBUTED.md's notes).
"""

import multiprocessing as mp
import random
import time

import torch

from tests.reliability import _ckpt_writer as writer

NUMEL = 4_000_000  # 16 MB of weights + 4 MB of momentum: a save takes ~0.1 s here
KILLS = 12  # at least this many kills...
MIN_MID_SAVE = 4  # ...and more until this many landed inside a save (timing varies with load)
MAX_KILLS = 60


def read_log(log):
    try:
        lines = log.read_text().split()
    except FileNotFoundError:
        return 0, 0
    begun = [int(v) for k, v in zip(lines[::2], lines[1::2]) if k == "begin"]
    done = [int(v) for k, v in zip(lines[::2], lines[1::2]) if k == "done"]
    return (max(begun) if begun else 0), (max(done) if done else 0)


def test_sigkill_during_saves_leaves_the_previous_checkpoint_loadable(tmp_path):
    ctx = mp.get_context("forkserver")  # children start without re-importing torch
    ctx.set_forkserver_preload(["torch", "tests.reliability._ckpt_writer"])
    path, log = tmp_path / "checkpoint.pt", tmp_path / "progress.log"
    rng = random.Random(0)
    mid_save, last = 0, 0
    kills = 0
    while kills < KILLS or (mid_save < MIN_MID_SAVE and kills < MAX_KILLS):
        kills += 1
        proc = ctx.Process(target=writer.main, args=(path, NUMEL, log))
        proc.start()
        target = read_log(log)[0] + rng.randint(1, 3)  # let it finish 0-2 saves first
        deadline = time.monotonic() + 120
        while read_log(log)[0] < target:
            assert proc.is_alive() and time.monotonic() < deadline, "the writer stopped"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.15))  # somewhere inside (or just after) save `target`
        proc.kill()
        proc.join()
        assert proc.exitcode == -9
        begun, done = read_log(log)
        mid_save += path.with_name(path.name + ".tmp").exists()
        n = writer.check(torch.load(path, weights_only=True))
        assert n in (done, begun) and n >= last, (n, done, begun)
        last = n
    # Most kills must have hit a save in progress (a .tmp left behind) for this to mean much.
    assert mid_save >= MIN_MID_SAVE, f"only {mid_save} of {kills} kills landed inside a save"
