"""Profile a run over local workers against the same run over a Dask LocalCluster: cProfile of the parent
and of each slice (a local worker process, or a Dask task's thread).

    .venv/bin/python bench/profile_slices.py [--hosts 300] [--kinds fp-run-w2,fp-run-c2] [--top 25]

Same simulated hosts and playbook as bench/fanout.py's fp-run (execsnoop, 1 s, 20 trace lines).  The
parent runs under cProfile with a CPU clock (process time: the LocalCluster's scheduler runs in this
process, so its cost is the parent's here).  Each slice is profiled from inside: a ``sitecustomize``
on the workers' PYTHONPATH wraps ``run_slice`` (the pipeline on one slice, both ways) in a cProfile
with the thread's CPU clock, so a Dask worker's own threads (its comms, heartbeats, statistical
profiler) are not in it, and are read off ``/proc`` CPU totals instead.  Prints the top functions
by cumulative and by own time for the parent and for slice 0, and CPU totals per process.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import fanout  # noqa: E402

SITECUSTOMIZE = '''
import os
if os.environ.get("FP_PROFILE_DIR"):
    import cProfile, time
    import fleetprobe.workers as _w
    _orig = _w.run_slice

    async def _profiled(job, *args):
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
        try:
            await _orig(job, *args)
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(os.environ["FP_PROFILE_DIR"], f"slice-{job.index}-{os.getpid()}.prof"))

    _w.run_slice = _profiled
    try:
        import fleetprobe.cluster as _c
        _c.run_slice = _profiled
        if os.environ.get("FP_CLUSTER_SEND"):
            _c.SEND_SECONDS = float(os.environ["FP_CLUSTER_SEND"])
    except ImportError:
        pass
'''


def _top(path_or_prof: object, n: int, title: str) -> str:
    out = io.StringIO()
    st = pstats.Stats(path_or_prof, stream=out)  # type: ignore[arg-type]
    st.strip_dirs()
    total = st.total_tt  # type: ignore[attr-defined]
    out.write(f"== {title}: {total:.2f} s CPU profiled\n")
    st.sort_stats("cumulative").print_stats(n)
    st.sort_stats("tottime").print_stats(n)
    return out.getvalue()


T0 = [0.0]


async def _run(kind: str, spec: dict[str, object]) -> object:
    from fleetprobe.playbook import load_playbook
    from fleetprobe.workers import run_playbook_workers
    pb = load_playbook(BENCH.parent / "playbooks" / "execsnoop.yml")
    hosts = fanout._hosts(spec)
    settings = fanout._settings(spec)
    if kind == "fp-run-c2":
        import dask
        from distributed import LocalCluster
        from fleetprobe.cluster import RESOURCE, WORKER_CONFIG, run_playbook_cluster
        hosts = [replace(h, vars={"fleetprobe_zone": "bench"}) for h in hosts]
        # As bench/fanout.py's fp-run-c2: fleetprobe-worker's settings, non-daemon workers.
        config = {} if os.environ.get("FP_CLUSTER_SEND") else WORKER_CONFIG
        with dask.config.set({"distributed.worker.daemon": False, **config}):
            cluster = await LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                         dashboard_address=None, resources={RESOURCE + "bench": 1},
                                         asynchronous=True)
        t1 = time.monotonic()
        c1 = time.process_time()
        try:
            return await run_playbook_cluster(hosts, pb, settings, scheduler=cluster.scheduler_address)
        finally:
            t2, c2 = time.monotonic(), time.process_time()
            await cluster.close()
            print(f"    LocalCluster start until the run: {t1 - T0[0]:.1f} s wall; the run {t2 - t1:.1f} s wall, "
                  f"{c2 - c1:.2f} s parent CPU; close {time.monotonic() - t2:.1f} s", flush=True)
    return await run_playbook_workers(hosts, pb, settings, workers=int(kind[len("fp-run-w"):]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=300)
    ap.add_argument("--kinds", default="fp-run-w2,fp-run-c2")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--first-port", type=int, default=27000)
    ap.add_argument("--out", help="keep the .prof files in this folder")
    ap.add_argument("--cluster-old", action="store_true",
                    help="the cluster path as it was before (0.2 s puts and polls, Dask's profiler on), to compare")
    args = ap.parse_args()
    fanout.FIRST_PORT = args.first_port
    if args.cluster_old:
        import fleetprobe.cluster
        fleetprobe.cluster.POLL_SECONDS = 0.2
        os.environ["FP_CLUSTER_SEND"] = "0.2"
    work = Path(tempfile.mkdtemp(prefix="fp-profile-"))
    site = work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    fleet = fanout.SimFleet(work, args.hosts)
    try:
        fleet.start(4, lines=20)
        spec = {"ports": fleet.ports, "forks": 50, "key": str(work / "client_key"),
                "known_hosts": str(work / "known_hosts")}
        for kind in args.kinds.split(","):
            prof_dir = Path(args.out or work) / kind
            prof_dir.mkdir(parents=True, exist_ok=True)
            os.environ["FP_PROFILE_DIR"] = str(prof_dir)
            os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(BENCH.parent)])
            prof = cProfile.Profile(time.process_time)
            c0 = os.times()
            t0 = T0[0] = time.monotonic()
            prof.enable()
            report = asyncio.run(_run(kind, spec))
            prof.disable()
            prof.dump_stats(str(prof_dir / "parent.prof"))
            wall = time.monotonic() - t0
            c1 = os.times()
            ok = sum(1 for o in report.hosts if o.status == "ok")  # type: ignore[attr-defined]
            bad = [f"{o.host}: {o.reason}" for o in report.hosts if o.status != "ok"]  # type: ignore[attr-defined]
            if bad:
                print(f"    not ok: {len(bad)}, e.g. {bad[0][:300]}", flush=True)
            parent = (c1.user - c0.user) + (c1.system - c0.system)
            children = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
            print(f"### {kind}: {args.hosts} hosts, ok {ok}, wall {wall:.1f} s, parent CPU {parent:.2f} s "
                  f"({parent / args.hosts * 1000:.2f} ms/host), waited children CPU {children:.2f} s "
                  f"({children / args.hosts * 1000:.2f} ms/host)", flush=True)
            slices = sorted(prof_dir.glob("slice-*.prof"))
            for s in slices:
                st = pstats.Stats(str(s))
                print(f"    {s.name}: {st.total_tt:.2f} s thread CPU in run_slice", flush=True)  # type: ignore[attr-defined]
            print(_top(prof, args.top, f"{kind} parent"))
            if slices:
                print(_top(str(slices[0]), args.top, f"{kind} {slices[0].name}"))
    finally:
        fleet.stop()
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
