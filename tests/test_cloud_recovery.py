"""Recovery of a damaged store survives a SIGKILL of its own, at every step.

A child process opens a damaged store and kills itself with SIGKILL at a chosen point of the
recovery (right after the damaged file was moved aside and read, after the fresh copy was written
but not yet marked complete, after the mark but before the rename).  The next open must end with
the same batches and the same loss report as a recovery that was never interrupted.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloudlink.batch import KIND_GAP, Sealer, Telemetry, decode
from cloudlink.store import PAGE_SIZE, Store

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_000

CHILD = r"""
import os, signal, sys
from pathlib import Path
import cloudlink.store as store
from cloudlink.batch import Sealer

phase, path = sys.argv[1], Path(sys.argv[2])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def after(name):
    orig = getattr(store.Store, name)
    def wrapped(self, *a, **kw):
        out = orig(self, *a, **kw)
        die()
        return out
    setattr(store.Store, name, wrapped)

if phase == "salvaged":  # moved aside and read; nothing written yet
    after("_salvage")
elif phase == "restored":  # the fresh copy written, not yet marked complete
    after("_restore")
elif phase == "marked":  # marked complete, not yet renamed into place
    orig_rename = store._rename_family
    def rename(src, dst):
        if src.name.endswith(".recovering"):
            die()
        orig_rename(src, dst)
    store._rename_family = rename
s = store.Store(path, Sealer("gw", "child", 128 * 1024), quota_bytes=1 << 30, min_free_bytes=1 << 20,
                fsync_window_s=0.5, thin_window_ms=5000)
s.open()
s.close()
print("not killed")
"""


def tel(seed: int) -> Telemetry:
    rng = np.random.default_rng(seed)
    values = np.round(3.7 + np.cumsum(rng.normal(0, 0.002, (50, 200)), axis=0), 3)
    return Telemetry([f"cell[{i}].voltage" for i in range(200)], T0 + seed * 5000 + np.arange(50, dtype=np.int64) * 100,
                     values, np.zeros((50, 200), np.int8), 10.0)


def store(path: Path, boot: str) -> Store:
    s = Store(path, Sealer("gw", boot, 128 * 1024), quota_bytes=1 << 30, min_free_bytes=1 << 20,
              fsync_window_s=0.5, thin_window_ms=5000)
    s.open()
    return s


def damaged(dirname: Path) -> Path:
    dirname.mkdir()
    path = dirname / "cloud.db"
    s = store(path, "b0")
    for i in range(60):
        s.put(s.sealer.telemetry("cells", tel(i)))
    s.sync(force=True)
    s.close()
    data = bytearray(path.read_bytes())
    p = len(data) // PAGE_SIZE // 2
    data[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = np.random.default_rng(1).integers(0, 256, PAGE_SIZE, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def outcome(s: Store) -> tuple[list[int], list[list[int]]]:
    """The cells batches kept and the cells seqs reported lost."""
    rows = s.all_rows()
    kept = sorted(r.seq for r in rows if r.stream == "cells")
    lost = sorted(q for r in rows if r.kind == KIND_GAP for g in decode(r.payload).records if g["stream"] == "cells"
                  for a, b in g["seqs"] for q in range(a, b + 1))
    return kept, [lost]


@pytest.mark.parametrize("phase", ["salvaged", "restored", "marked"])
def test_sigkill_during_recovery_loses_nothing(tmp_path: Path, phase: str) -> None:
    path = damaged(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "ref")
    ref = store(tmp_path / "ref" / "cloud.db", "ref")
    assert ref.recovery.state == "recovered"
    expected = outcome(ref)
    assert 50 <= len(expected[0]) < 60 and expected[1] != [[]]  # some batches lost to the damage, most kept
    ref.close()

    proc = subprocess.run([sys.executable, "-c", CHILD, phase, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL at that point
    assert (tmp_path / "a" / "cloud.db.corrupt").exists()

    s = store(path, "b1")
    assert s.recovery.state == "recovered", s.recovery
    assert outcome(s) == expected
    assert s.stats()["losses"]["corrupt"]["batches"] == len(expected[1][0])
    s.close()
    s = store(path, "b2")  # finished: the next open finds a sound store, the damaged copy is kept
    assert s.recovery.state == "ok" and outcome(s) == expected
    assert (tmp_path / "a" / "cloud.db.corrupt").exists()
    s.close()


def test_a_second_damage_replaces_a_completed_copy_only(tmp_path: Path) -> None:
    path = damaged(tmp_path / "a")
    s = store(path, "b1")
    assert s.recovery.state == "recovered"
    first = outcome(s)
    s.close()
    data = bytearray(path.read_bytes())  # damaged again: the header this time
    data[:PAGE_SIZE] = b"\0" * PAGE_SIZE
    path.write_bytes(bytes(data))
    s = store(path, "b2")
    assert s.recovery.state == "recovered"
    assert outcome(s)[0] == first[0]  # carved out of the new damaged copy, which replaced the old one
    s.close()
