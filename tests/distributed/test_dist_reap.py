"""An embedded Ray leaves no process behind: shutdown_ray reaps the tree of the head processes this process
started, by pid (never by name), after Ray's own shutdown had its chance."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from cluster import runtime

# A process that ignores SIGTERM and has a child: what an actor stuck on its way out looks like to its parent.
_STUBBORN = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
    "time.sleep(300)\n"
)


def test_reap_kills_a_tree_that_outlives_its_grace_and_only_that_tree():
    proc = subprocess.Popen([sys.executable, "-c", _STUBBORN], start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        root = psutil.Process(proc.pid)
        deadline = time.time() + 30
        while not root.children() and time.time() < deadline:
            time.sleep(0.05)
        tree = runtime._process_tree([root])
        assert len(tree) == 2, "the stubborn process never started its child"
        t0 = time.perf_counter()
        killed = runtime.reap(tree, grace_s=0.3)
        assert time.perf_counter() - t0 >= 0.3  # the tree had its grace first
        assert sorted(killed) == sorted(p.pid for p in tree)
        assert not any(runtime._running(p) for p in tree)  # gone, or a zombie until its parent waits
        assert psutil.Process(bystander.pid).is_running()  # not in the snapshot: untouched
        assert runtime.reap([], grace_s=5.0) == []
    finally:
        for p in (proc, bystander):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_tree_that_exits_in_its_grace_is_not_killed():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"], start_new_session=True)
    tree = runtime._process_tree([psutil.Process(proc.pid)])
    assert runtime.reap(tree, grace_s=30.0) == []
    assert proc.wait(timeout=5) == 0  # it ended by itself


def test_the_embedded_rays_tree_holds_its_workers(ray_module, ray_cluster):
    """The snapshot shutdown_ray reaps is the embedded Ray's: its head processes are this process's children and
    a task's worker is in their tree (a Ray joined from outside would leave the list empty)."""
    ray = ray_module

    @ray.remote(num_cpus=0)
    def worker_pid() -> int:
        return os.getpid()

    pid = ray.get(worker_pid.remote())
    heads = runtime._EMBEDDED_HEADS
    if not ray_cluster.started_here:  # a Ray this session did not start is never reaped
        assert heads == []
        return
    assert heads and all(h.ppid() == os.getpid() for h in heads)
    assert pid in {p.pid for p in runtime._process_tree(heads)}


def test_a_zombie_counts_as_exited_and_costs_no_grace():
    """An orphaned Ray worker that exits where PID 1 does not reap stays a zombie: dead, so no wait for it. The
    zombie here is a grandchild whose parent never waits (our own child would be reaped by psutil's wait)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "print(subprocess.Popen([sys.executable, '-c', 'pass']).pid, flush=True)\ntime.sleep(300)\n"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        zombie = psutil.Process(int(parent.stdout.readline()))
        deadline = time.time() + 30
        while zombie.status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
            time.sleep(0.02)
        assert zombie.status() == psutil.STATUS_ZOMBIE
        t0 = time.perf_counter()
        assert runtime.reap([zombie], grace_s=30.0) == []
        assert time.perf_counter() - t0 < 10.0  # not the 30 s grace
    finally:
        parent.kill()
        parent.wait()
