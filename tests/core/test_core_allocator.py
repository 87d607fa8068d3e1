"""dpalign.allocator: freed memory stays with the process, so a step's large tensors stop faulting in every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dpalign.allocator import ENV, _libc

pytestmark = pytest.mark.skipif(_libc() is None, reason="mallopt is glibc's")

# Allocate, touch and free a 64 MiB buffer five times; report the minor page faults of the last four rounds.
_PROBE = r"""
import ctypes, json, os, resource, sys
from dpalign.allocator import keep_freed_memory
kept = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
env = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
print(json.dumps({"kept": kept, "faults": faults[1:], "env": env}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "DPALIGN_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    kept = _probe()
    assert kept["kept"] is True
    # 64 MiB is 16,384 pages: glibc's default unmaps the buffer on free and faults every page back in next round
    assert max(kept["faults"]) < 200, kept
    assert kept["env"] == ENV  # exported for the children an embedded Ray or torchrun starts


def test_opt_out_leaves_glibc_default():
    default = _probe(DPALIGN_MALLOC="default")
    assert default["kept"] is False
    assert min(default["faults"]) > 10_000, default  # the default allocator's behaviour the setting removes
    assert default["env"] == {k: None for k in ENV}


def test_a_users_own_glibc_setting_wins():
    own = _probe(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    assert own["env"] == {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    assert min(own["faults"]) > 10_000, own  # their thresholds, not ours


_ENTRY = r"""
import json, os, sys
from cluster.train import _learner_entry
print(json.dumps(_learner_entry(lambda config: {k: os.environ.get(k) for k in config["keys"]}, {"keys": sys.argv[1:]})))
"""


def test_a_learner_rank_keeps_freed_memory_before_its_loop():
    """Ray Train ranks run through ``cluster.train._learner_entry``: a rank on a cluster node, which did not
    inherit the driver's environment, has the setting on before its loop starts."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "DPALIGN_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _ENTRY, *ENV], env=clean, capture_output=True, text=True,
                         check=True, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ENV


def test_the_cli_keeps_freed_memory_before_any_command(monkeypatch, capsys):
    import launch.cli

    calls = []
    monkeypatch.setattr(launch.cli, "keep_freed_memory", lambda: calls.append(1) or True)
    rc = launch.cli.main(["privacy", "epsilon", "--noise-multiplier", "1.1", "--sampling-rate", "0.004267",
                          "--steps", "100", "--delta", "1e-5"])
    assert rc == 0 and calls == [1]
    assert "epsilon" in capsys.readouterr().out
