"""The classification example's checkpoints survive a SIGKILL at any point of saving.

``examples/classification/train_kd.py`` saves with ``atomic_save``: ``torch.save`` to
``<name>.tmp`` in the same folder, then ``os.replace`` onto the checkpoint. A writer process
saves train_kd-shaped checkpoints (~20 MB, every value derived from the generation number)
in a loop with that function and is killed with SIGKILL at random moments, most of them
inside a save; after every kill the checkpoint must load (``weights_only=True``), be exactly
one generation's content, be no older than the last save that returned, and a new writer
must resume from it (over the leftover ``.tmp``) and save again.

This covers process death (SIGKILL, OOM killer, preemption). Power loss and kernel crashes
cannot be produced in a test; for them ``atomic_save`` fsyncs the file before the rename and
the folder after it, and ``test_atomic_save_fsyncs_the_file_before_the_rename_and_the_folder_after``
checks that order.
"""

import multiprocessing as mp
import os
import random
import stat
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


def test_atomic_save_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Durability order: data on disk (fsync of the .tmp file), then the rename, then the
    folder entry on disk (fsync of the folder). Each fsync is identified by the inode of the
    descriptor it was given."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "checkpoint.pt"
    writer.atomic_save(writer.checkpoint(3, 1000), path)
    inode = os.stat(path).st_ino  # the renamed .tmp file
    want = [("fsync", inode), ("replace", inode)]
    if os.name == "posix":
        want.append(("fsync", "dir"))
    assert events == want
    assert writer.check(torch.load(path, weights_only=True)) == 3
    assert not path.with_name(path.name + ".tmp").exists()
