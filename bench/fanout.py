"""Benchmark: controller cost per host of fleetprobe against bare asyncssh, ansible, parallel-ssh and OpenSSH.

    .venv/bin/python bench/fanout.py [--sizes 100,500,2000] [--rounds 3] [--quick]

Starts ``--servers`` simulated-host processes (bench/simhost.py: asyncssh
servers, one logical host per port on 127.0.0.1) and, on the same hosts,
interleaved round by round, runs each client as its own child process:

  fp-run      fleetprobe run_playbook(execsnoop, 1 s): connect, runner channel (facts, then
              one clock ping with the plan, --lines trace lines, stop/teardown protocol), close
  fp-run-w2   the same over 2 local worker processes (fleetprobe.workers; fp-run-wN for N), forks fleet-wide;
              the workers' CPU is in both CPU columns (waited children)
  fp-run-x2   2 independent fp-run clients side by side on halves of the hosts (no fleetprobe.workers): the
              control for fp-run-w2, what 2 loops cost on these cores without any worker machinery
  fp-run-c2   the same over a Dask LocalCluster of 2 worker processes (fleetprobe.cluster; needs distributed)
  fp-facts    fleetprobe facts_fleet: connect, facts script, parse, close
  asyncssh    bare asyncssh: connect, one command, close (asyncssh's default ciphers)
  asyncssh-gcm  the same with fleetprobe's cipher preference (transport.PREFERRED_CIPHERS):
              fleetprobe's overhead over the library on equal terms
  asyncssh-runner  bare asyncssh (gcm) doing fp-run's exchange byte for byte: the runner command, its
              script, read to the facts' end, the plan (computed once, before the section), read to
              ``bye``: the protocol's own cost in asyncssh, without fleetprobe's parsing, planning,
              clock, watchdog or report (what separates fp-run from it is fleetprobe's Python)
  pssh        parallel-ssh (libssh2) run_command + join
  openssh     OpenSSH ssh processes under xargs -P FORKS
  ansible     ansible all -m raw (ControlMaster off: no persistent masters left behind)

Peers run ``uname -m; cat /proc/version``.  Controller CPU and peak RSS come
from wait4() on the client's process, so they include its children (ssh
processes) and exclude the simulated hosts.  Python clients also report the
CPU of the measured section alone (without interpreter start-up and imports: each client's
modules are imported before its section starts).
The simulated hosts count connections per port: fleetprobe must use exactly one.
Keys, known_hosts and HOME are throwaway (never ~/.ssh).  Every server
process started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncssh

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS_VENV = Path(os.environ.get("FP_BENCH_PEERS", "/tmp/fp-bench/peers"))
COMMAND = "uname -m; cat /proc/version"
FIRST_PORT = 21000
ALL_KINDS = ("fp-run", "fp-run-w2", "fp-facts", "asyncssh", "asyncssh-gcm", "asyncssh-runner", "pssh", "openssh",
             "ansible")


# --- simulated hosts ------------------------------------------------------------------------

@dataclass
class SimFleet:
    """Server processes, the throwaway key material and the hosts they serve."""

    work: Path
    count: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return list(range(FIRST_PORT, FIRST_PORT + self.count))

    def start(self, servers: int, lines: int = 20, flood: bool = False, vary: bool = False) -> None:
        """Keys, known_hosts, and ``servers`` simhost processes sharing the ports."""
        client = asyncssh.generate_private_key("ssh-ed25519")
        client.write_private_key(str(self.work / "client_key"))
        os.chmod(self.work / "client_key", 0o600)
        (self.work / "client_key.pub").write_bytes(client.export_public_key())
        host = asyncssh.generate_private_key("ssh-ed25519")
        host.write_private_key(str(self.work / "host_key"))
        pub = host.export_public_key().decode().strip()
        (self.work / "known_hosts").write_text("".join(f"[127.0.0.1]:{p} {pub}\n" for p in self.ports))
        (self.work / "home").mkdir(exist_ok=True)
        per = -(-self.count // servers)
        for first in range(FIRST_PORT, FIRST_PORT + self.count, per):
            n = min(per, FIRST_PORT + self.count - first)
            cmd = [sys.executable, str(BENCH / "simhost.py"), "--first-port", str(first), "--count", str(n),
                   "--dir", str(self.work), "--lines", str(lines)] + (["--flood"] if flood else []) + \
                (["--vary"] if vary else [])
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        for p in self.procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"simhost did not start: {line!r}")

    def control(self, word: str) -> list[dict[str, Any]]:
        """Send one control word to every server; their JSON answers."""
        out = []
        for p in self.procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(word.encode() + b"\n")
            p.stdin.flush()
            out.append(json.loads(p.stdout.readline()))
        return out

    def stats(self, ports: list[int]) -> dict[str, Any]:
        """Connections per port (min/max over ``ports``) and sessions per kind, since the last reset."""
        conns: dict[int, int] = {}
        sessions: dict[str, int] = {}
        lines = 0
        for s in self.control("stats"):
            conns.update({int(k): v for k, v in s["connections"].items()})
            for k, v in s["sessions"].items():
                sessions[k] = sessions.get(k, 0) + v
            lines += s["lines_sent"]
        per = [conns.get(p, 0) for p in ports]
        return {"conn_min": min(per), "conn_max": max(per), "conn_total": sum(per), "sessions": sessions,
                "lines_sent": lines}

    def cpu_seconds(self) -> float:
        """CPU the simulated-host processes used so far (user + system, from /proc): on one machine they
        share the cores with the client, so a client's wall time is read against it."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for p in self.procs:
            try:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def stop(self) -> None:
        """Stop every server process (EOF on its control pipe, then SIGTERM, then SIGKILL)."""
        for p in self.procs:
            try:
                assert p.stdin is not None
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()


# --- clients (each runs in its own child process) -------------------------------------------

def _hosts(spec: dict[str, Any]) -> list[Any]:
    """fleetprobe Hosts for the spec's ports."""
    from fleetprobe.inventory import Host
    return [Host(name=f"sim{p}", address="127.0.0.1", port=p, user="root", key_file=spec["key"])
            for p in spec["ports"]]


def _settings(spec: dict[str, Any]) -> Any:
    """RunSettings that trust only the throwaway known_hosts and key."""
    from fleetprobe.settings import RunSettings
    from fleetprobe.session import SSHOptions
    ssh = SSHOptions(known_hosts=(spec["known_hosts"],), ssh_config=(), use_agent=False,
                     connect_timeout=60.0)
    return RunSettings(ssh=ssh, forks=spec["forks"], duration=spec.get("duration", 1.0),
                       setup_timeout=spec.get("setup_timeout", 120.0), teardown_timeout=30.0)


class StartRecorder:
    """Observer that records when each host got a setup slot and when it left setup."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.connecting: dict[str, float] = {}
        self.setup_done: dict[str, float] = {}

    def set_state(self, host: str, state: str, detail: str = "") -> None:
        """Record the first 'connecting' and the first state that ends setup."""
        now = time.monotonic() - self.t0
        if state == "connecting":
            self.connecting.setdefault(host, now)
        elif host in self.connecting and state != "facts":
            # "planning" is the last state inside the setup slot (plan_host runs without awaiting,
            # for playbooks without uprobes), so it marks the slot's release; later states would be
            # seen only after other hosts already took the slot.
            self.setup_done.setdefault(host, now)

    def add_events(self, host: str, n: int) -> None:
        """Not needed here."""

    def summary(self, forks: int) -> dict[str, Any]:
        """Start-time spread and the most hosts ever in setup at once (must be <= forks)."""
        starts = sorted(self.connecting.values())
        edges = [(t, 1) for t in self.connecting.values()] + [(t, -1) for t in self.setup_done.values()]
        live = peak = 0
        for _, d in sorted(edges, key=lambda e: (e[0], e[1])):
            live += d
            peak = max(peak, live)
        setup = [self.setup_done[h] - self.connecting[h] for h in self.setup_done]
        return {"hosts_started": len(starts), "first_start": starts[0] if starts else None,
                "last_start": starts[-1] if starts else None,
                "p50_start": statistics.median(starts) if starts else None,
                "max_in_setup": peak, "forks": forks,
                "setup_s_median": statistics.median(setup) if setup else None,
                "setup_s_max": max(setup) if setup else None}


async def _runner_client(spec: dict[str, Any], command: str, script: bytes, plan: bytes) -> dict[str, Any]:
    """asyncssh-runner: fp-run's exchange with each host in bare asyncssh (setup bounded by forks, as fp-run's)."""
    from fleetprobe.session import PREFERRED_CIPHERS
    sem = asyncio.Semaphore(spec["forks"])
    known = asyncssh.read_known_hosts(spec["known_hosts"])
    keys = asyncssh.load_keypairs([spec["key"]])
    ok = 0

    async def one(port: int) -> None:
        nonlocal ok
        async with sem:
            conn = await asyncssh.connect("127.0.0.1", port, username="root", client_keys=keys, known_hosts=known,
                                          config=[], agent_path=None, encryption_algs=PREFERRED_CIPHERS)
            proc = await conn.create_process(command, encoding=None)
            proc.stdin.write(script)
            buf = bytearray()
            facts = await _read_until(proc, b"\n@@end\n", buf)
        async with conn:
            proc.stdin.write(plan)
            if facts and await _read_until(proc, b" bye\n", buf):
                await proc.wait()
                ok += proc.exit_status == 0

    res = await asyncio.gather(*(one(p) for p in spec["ports"]), return_exceptions=True)
    errors = [repr(r) for r in res if isinstance(r, BaseException)]
    return {"ok": ok, "errors": errors[:3], "n_errors": len(errors)}


def _runner_exchange(spec: dict[str, Any]) -> tuple[str, bytes, bytes]:
    """The command, script and plan fp-run sends a simulated host (its execsnoop plan for the captured
    facts, one fixed secret and seal), computed before the section: asyncssh-runner only moves bytes."""
    from fleetprobe.facts import parse_facts
    from fleetprobe.playbook import load_playbook
    from fleetprobe.plan import new_run_id, plan_host
    from fleetprobe.runner.channel import _facts_words
    from fleetprobe.runner.runner import plan_directives, runner_script
    from fleetprobe.seal import new_seal
    from fleetprobe.session import script_command, script_input
    settings = _settings(spec)
    pb = load_playbook(ROOT / "playbooks" / "execsnoop.yml")
    host = _hosts(spec)[0]
    symbols, words = _facts_words(pb, settings.mount_tracefs)
    facts = parse_facts(host.name, (BENCH / "data" / "facts-x86_64-6.18.txt").read_text(), symbols)
    deadline = int(time.time()) + 600
    plan = plan_host(pb, facts, run_id=new_run_id(), deadline=deadline, uprobe_offsets={}, duration=1.0,
                     seal=new_seal())
    directives = plan_directives(plan, tracefs=facts.tracefs or "/sys/kernel/tracing", duration=1.0,
                                 deadline=deadline, grace=settings.grace, buffer_kb=settings.buffer_kb,
                                 secret="0" * 32)
    return (script_command(host, "fleetprobe-runner", "facts", *words), script_input(runner_script()),
            b"ping\n" + directives.encode())


async def _read_until(proc: Any, mark: bytes, buf: bytearray) -> bool:
    """Read the process's stdout into ``buf`` until ``mark`` is in it (False: it ended first)."""
    while mark not in buf:
        chunk = await proc.stdout.read(65536)
        if not chunk:
            return False
        buf += chunk
    return True


async def _side_by_side(spec: dict[str, Any], n: int) -> dict[str, Any]:
    """fp-run-xN: N independent fp-run clients (one loop each, no fleetprobe.workers) on N slices of the hosts
    (round robin, forks shared as the workers share them), side by side: what N loops cost on this machine's
    cores with no worker machinery at all, the control for fp-run-wN."""
    from fleetprobe.workers import fork_shares
    procs = []
    for i, forks in enumerate(fork_shares(spec["forks"], n)):
        part = dict(spec, ports=spec["ports"][i::n], forks=forks)
        path = Path(spec["spec_path"]).with_suffix(f".x{i}.json")
        path.write_text(json.dumps(part))
        procs.append(await asyncio.create_subprocess_exec(sys.executable, str(BENCH / "fanout.py"), "--client",
                                                          "fp-run", str(path), stdout=asyncio.subprocess.PIPE))
    outs = [json.loads((await p.communicate())[0].decode().strip().splitlines()[-1]) for p in procs]
    return {"ok": sum(o["ok"] for o in outs), "errors": [e for o in outs for e in o["errors"]][:3],
            "n_errors": sum(o["n_errors"] for o in outs),
            "workers": [{"hosts": len(spec["ports"][i::n]), "cpu_s": round(o["section_cpu"], 3),
                         "peak_rss_mib": o["parent_peak_rss_mib"]} for i, o in enumerate(outs)]}


async def _client_async(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one Python client against the spec's hosts; its own figures."""
    forks = spec["forks"]
    if kind == "asyncssh-runner":
        return await _runner_client(spec, *spec["exchange"])
    if kind in ("asyncssh", "asyncssh-gcm"):
        sem = asyncio.Semaphore(forks)
        ok = 0
        # The cheapest careful asyncssh: key and known_hosts loaded once, not per connection.
        known = asyncssh.read_known_hosts(spec["known_hosts"])
        keys = asyncssh.load_keypairs([spec["key"]])
        extra: dict[str, Any] = {}
        if kind == "asyncssh-gcm":
            from fleetprobe.session import PREFERRED_CIPHERS
            extra["encryption_algs"] = PREFERRED_CIPHERS

        async def one(port: int) -> None:
            nonlocal ok
            async with sem:
                async with asyncssh.connect("127.0.0.1", port, username="root", client_keys=keys,
                                            known_hosts=known, config=[],
                                            agent_path=None, **extra) as conn:
                    r = await conn.run(COMMAND, check=False, encoding=None)
                    ok += r.exit_status == 0 and b"x86_64" in (r.stdout or b"")

        res = await asyncio.gather(*(one(p) for p in spec["ports"]), return_exceptions=True)
        errors = [repr(r) for r in res if isinstance(r, BaseException)]
        return {"ok": ok, "errors": errors[:3], "n_errors": len(errors)}
    if kind == "fp-facts":
        from fleetprobe.orchestrate import facts_fleet
        out = await facts_fleet(_hosts(spec), _settings(spec))
        errors = [str(h.error) for h in out if h.error]
        return {"ok": sum(1 for h in out if h.facts and h.facts.arch == "x86_64"), "errors": errors[:3],
                "n_errors": len(errors)}
    if kind.startswith("fp-run-x"):
        return await _side_by_side(spec, int(kind[len("fp-run-x"):]))
    if kind == "fp-run" or kind.startswith(("fp-run-w", "fp-run-c")):
        from fleetprobe.orchestrate import run_playbook
        from fleetprobe.playbook import load_playbook
        from fleetprobe.workers import WorkerStats, run_playbook_workers
        rec = StartRecorder()
        pb = load_playbook(ROOT / "playbooks" / "execsnoop.yml")
        workers: list[WorkerStats] = []
        if kind == "fp-run":
            report = await run_playbook(_hosts(spec), pb, _settings(spec), observer=rec)
        elif kind.startswith("fp-run-c"):
            # fp-run-cN: over a Dask LocalCluster of N worker processes serving one zone (fleetprobe.cluster).
            import dask
            from distributed import LocalCluster
            from fleetprobe.cluster import RESOURCE, WORKER_CONFIG, run_playbook_cluster
            hosts = [replace(h, vars={"fleetprobe_zone": "bench"}) for h in _hosts(spec)]
            # The settings fleetprobe-worker gives its Dask workers (no statistical profiler), and
            # non-daemon workers (a LocalCluster's are daemons, which may not start processes).
            with dask.config.set({"distributed.worker.daemon": False, **WORKER_CONFIG}):
                cluster = await LocalCluster(n_workers=int(kind[len("fp-run-c"):]), threads_per_worker=1,
                                             processes=True, host="127.0.0.1", dashboard_address=None,
                                             resources={RESOURCE + "bench": 1}, asynchronous=True)
            try:
                report = await run_playbook_cluster(hosts, pb, _settings(spec), scheduler=cluster.scheduler_address,
                                                    observer=rec)
            finally:
                await cluster.close()
        else:
            # fp-run-wN: the same run over N local worker processes (fleetprobe.workers), forks fleet-wide.
            report = await run_playbook_workers(_hosts(spec), pb, _settings(spec), observer=rec,
                                                workers=int(kind[len("fp-run-w"):]), stats=workers)
        outs = report.hosts
        errors = [f"{o.host}: {o.status} {o.reason}" for o in outs if o.status != "ok"]
        return {"ok": sum(1 for o in outs if o.status == "ok" and o.cleanup == "clean"),
                "events": sum(o.events for o in outs), "errors": errors[:3], "n_errors": len(errors),
                "starts": rec.summary(forks),
                "workers": [{"hosts": w.hosts, "cpu_s": round(w.cpu_seconds, 3),
                             "peak_rss_mib": round(w.peak_rss_kib / 1024, 1)} for w in workers]}
    raise ValueError(kind)


#: What each Python client imports before its measured section starts.
PRELOAD = {"fp-run": ("fleetprobe.orchestrate", "fleetprobe.playbook"),
           "fp-run-w2": ("fleetprobe.orchestrate", "fleetprobe.playbook", "fleetprobe.workers"),
           "fp-run-x2": ("fleetprobe.workers",),
           "fp-run-c2": ("fleetprobe.orchestrate", "fleetprobe.playbook", "fleetprobe.cluster", "distributed"),
           "fp-facts": ("fleetprobe.orchestrate",),
           "asyncssh-gcm": ("fleetprobe.connectors.asyncssh",),
           "asyncssh-runner": ("fleetprobe.connectors.asyncssh",)}


def client_main(kind: str, spec_path: str) -> int:
    """Child-process entry: run the client, print one JSON line of in-process figures."""
    spec = json.loads(Path(spec_path).read_text())
    # Imports are start-up, not the section (asyncssh itself is imported at the top of this file).
    for module in PRELOAD.get(kind, ()):
        importlib.import_module(module)
    if kind == "asyncssh-runner":
        spec["exchange"] = _runner_exchange(spec)   # fleetprobe's bytes, made before the section
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    res = asyncio.run(_client_async(kind, spec))
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res["section_wall"] = wall
    # Worker processes (fp-run-wN) are this client's children: their CPU is the section's too
    # (their interpreter start-up and imports included: they are part of running that way).
    res["section_cpu"] = ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
                          + (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime))
    res["parent_peak_rss_mib"] = round(r1.ru_maxrss / 1024, 1)
    print(json.dumps(res), flush=True)
    return 0


# --- the parent: run each client as a child, measure it with wait4 ----------------------------

@dataclass
class Measure:
    """One client run on one fleet size."""

    kind: str
    hosts: int
    wall: float
    cpu: float
    rss_mib: float
    section_cpu: float | None
    ok: int
    detail: dict[str, Any]
    server: dict[str, Any]
    #: CPU seconds the simulated hosts used during the run (they share this machine's cores).
    server_cpu: float = 0.0


def _wait4_run(cmd: list[str], env: dict[str, str], cwd: Path, stdout_path: Path,
               timeout: float) -> tuple[float, float, float, int]:
    """Run cmd; (wall, cpu incl. waited children, peak RSS MiB, exit status) from wait4."""
    t0 = time.monotonic()
    with open(stdout_path, "wb") as out, open(str(stdout_path) + ".err", "wb") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, proc.returncode


def run_client(kind: str, fleet: SimFleet, ports: list[int], forks: int, out_dir: Path,
               timeout: float, setup_timeout: float = 120.0) -> Measure:
    """Run one client against the ports; measured from outside."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(fleet.work / "home"),
           "LANG": "C.UTF-8"}
    key, kh = str(fleet.work / "client_key"), str(fleet.work / "known_hosts")
    spec = {"ports": ports, "forks": forks, "key": key, "known_hosts": kh, "setup_timeout": setup_timeout}
    spec_path = out_dir / f"spec-{kind}-{len(ports)}.json"
    spec["spec_path"] = str(spec_path)
    spec_path.write_text(json.dumps(spec))
    stdout_path = out_dir / f"out-{kind}-{len(ports)}.txt"
    ssh_opts = ["-F", "/dev/null", "-i", key, "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={kh}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ControlMaster=no",
                "-o", "LogLevel=ERROR"]
    if kind in ("fp-run", "fp-facts", "asyncssh", "asyncssh-gcm", "asyncssh-runner") or kind.startswith(("fp-run-w", "fp-run-c", "fp-run-x")):
        env["PYTHONPATH"] = str(ROOT)
        cmd = [sys.executable, str(BENCH / "fanout.py"), "--client", kind, str(spec_path)]
    elif kind == "pssh":
        cmd = [str(PEERS_VENV / "bin" / "python"), str(BENCH / "peer_pssh.py"), str(spec_path)]
    elif kind == "openssh":
        plist = out_dir / "ports.txt"
        plist.write_text("".join(f"{p}\n" for p in ports))
        script = 'ssh "$@" >/dev/null'
        cmd = ["sh", "-c", f"xargs -P {forks} -I PORT sh -c {shlex_quote(script)} ssh " +
               " ".join(shlex_quote(o) for o in ssh_opts) +
               f" -p PORT root@127.0.0.1 {shlex_quote(COMMAND)} < {plist}"]
    elif kind == "ansible":
        inv = out_dir / "ansible-inventory.ini"
        (out_dir / "ansible.cfg").write_text("[defaults]\n")
        inv.write_text("[sim]\n" + "".join(f"sim{p} ansible_host=127.0.0.1 ansible_port={p}\n" for p in ports))
        env.update({"ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_SSH_ARGS": "-o ControlMaster=no",
                    "ANSIBLE_PRIVATE_KEY_FILE": key, "ANSIBLE_REMOTE_USER": "root",
                    "ANSIBLE_LOCAL_TEMP": str(fleet.work / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1",
                    "ANSIBLE_SSH_COMMON_ARGS": " ".join(ssh_opts[2:]), "ANSIBLE_CONFIG": str(out_dir / "ansible.cfg"),
                    "ANSIBLE_PYTHON_INTERPRETER": "auto_silent", "ANSIBLE_DEPRECATION_WARNINGS": "False"})
        cmd = [str(PEERS_VENV / "bin" / "ansible"), "all", "-i", str(inv), "-m", "raw", "-a", COMMAND,
               "-f", str(forks)]
    else:
        raise ValueError(kind)
    fleet.control("reset")
    sim0 = fleet.cpu_seconds()
    wall, cpu, rss, status = _wait4_run(cmd, env, out_dir, stdout_path, timeout)
    sim_cpu = fleet.cpu_seconds() - sim0
    server = fleet.stats(ports)
    text = stdout_path.read_text(errors="replace")
    detail: dict[str, Any] = {"exit": status}
    section = None
    if kind in ("fp-run", "fp-facts", "asyncssh", "asyncssh-gcm", "asyncssh-runner", "pssh") or kind.startswith(("fp-run-w", "fp-run-c", "fp-run-x")):
        try:
            detail.update(json.loads(text.strip().splitlines()[-1]))
            ok = int(detail.get("ok", 0))
            section = float(detail["section_cpu"])
        except (IndexError, ValueError, KeyError):
            ok = 0
            detail["stderr"] = Path(str(stdout_path) + ".err").read_text(errors="replace")[-2000:]
    elif kind == "openssh":
        # The simulated hosts answered one "other" session per host that got through.
        ok = server["sessions"].get("other", 0)
    else:
        # Default callback: "simNNNN | CHANGED | rc=0 >>" per host that ran the command.
        ok = sum(1 for line in text.splitlines() if line.startswith("sim") and "| CHANGED | rc=0" in line)
    if ok < len(ports):
        detail.setdefault("stderr", Path(str(stdout_path) + ".err").read_text(errors="replace")[-800:])
    return Measure(kind, len(ports), wall, cpu, rss, section, ok, detail, server, sim_cpu)


def shlex_quote(s: str) -> str:
    """shlex.quote (imported lazily to keep the client path lean)."""
    import shlex
    return shlex.quote(s)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(results: list[Measure], kinds: list[str]) -> str:
    """A Markdown table: medians over rounds per (size, client), ratios against fp-run.

    The ratios: fp-run's process CPU over this client's, and (Python clients) fp-run's section
    CPU over this client's section CPU.
    """
    lines = ["| hosts | client | rounds | wall s | hosts/s | CPU ms/host (process) | CPU ms/host (section) "
             "| peak RSS MiB | ok | conns/host (min-max) | fp-run CPU / this (process) | (section) "
             "| sim hosts CPU ms/host | client + sim hosts CPU / wall (cores busy) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted({m.hosts for m in results}):
        fp = [m.cpu / n for m in results if m.hosts == n and m.kind == "fp-run"]
        fp_sec = [m.section_cpu / n for m in results
                  if m.hosts == n and m.kind == "fp-run" and m.section_cpu is not None]
        for kind in kinds:
            ms = [m for m in results if m.hosts == n and m.kind == kind]
            if not ms:
                continue
            cpu = _median([m.cpu / n * 1000 for m in ms])
            sec = [m.section_cpu / n * 1000 for m in ms if m.section_cpu is not None]
            wall = _median([m.wall for m in ms])
            ratio = (_median(fp) * 1000 / cpu) if fp and cpu else float("nan")
            sec_ratio = (_median(fp_sec) * 1000 / _median(sec)) if fp_sec and sec else float("nan")
            lines.append(
                f"| {n} | {kind} | {len(ms)} | {wall:.1f} | {n / wall:.0f} | {cpu:.2f} | "
                f"{f'{_median(sec):.2f}' if sec else '-'} | {max(m.rss_mib for m in ms):.0f} | "
                f"{min(m.ok for m in ms)}/{n} | {min(m.server['conn_min'] for m in ms)}-"
                f"{max(m.server['conn_max'] for m in ms)} | {ratio:.2f} | "
                f"{'-' if sec_ratio != sec_ratio else f'{sec_ratio:.2f}'} | "
                f"{_median([m.server_cpu / n * 1000 for m in ms]):.2f} | "
                f"{_median([(m.cpu + m.server_cpu) / m.wall for m in ms]):.2f} |")
    return "\n".join(lines)


def _peer_installed(peer: str) -> bool:
    """Whether the peers venv has ``peer`` (ansible's command, parallel-ssh's module)."""
    if peer == "ansible":
        return (PEERS_VENV / "bin" / "ansible").exists()
    python = PEERS_VENV / "bin" / "python"
    return python.exists() and subprocess.run([str(python), "-c", "import pssh.clients"],
                                              capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    """Run the fan-out benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--client", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="100,500,2000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forks", type=int, default=50, help="concurrency of every client (ansible -f, xargs -P ...)")
    ap.add_argument("--servers", type=int, default=4, help="simulated-host processes")
    ap.add_argument("--kinds", default=",".join(ALL_KINDS))
    ap.add_argument("--lines", type=int, default=20,
                    help="trace lines each simulated runner streams (event cost: see bench/ingest.py)")
    ap.add_argument("--ansible-max", type=int, default=500,
                    help="largest fleet ansible runs on (~10 hosts/s: 2000 hosts take minutes per round)")
    ap.add_argument("--timeout", type=float, default=900.0, help="per client run")
    ap.add_argument("--setup-timeout", type=float, default=120.0,
                    help="fleetprobe's --setup-timeout (a host waiting for a forks slot waits inside 2x this)")
    ap.add_argument("--json", help="write every measurement as JSON")
    ap.add_argument("--quick", action="store_true", help="smoke run: 100 hosts, 1 round (< 60 s)")
    ap.add_argument("--first-port", type=int, default=FIRST_PORT,
                    help=f"first port of the simulated hosts (default {FIRST_PORT}; bench/ingest_ssh.py uses it too)")
    args = ap.parse_args(argv)
    globals()["FIRST_PORT"] = args.first_port  # SimFleet.ports reads it
    if args.client:
        return client_main(*args.client)
    if args.quick:
        args.sizes, args.rounds = "100", 1
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    for peer in [k for k in kinds if k in ("ansible", "pssh")]:
        if not _peer_installed(peer):
            print(f"peer {peer} missing in {PEERS_VENV}: python3 -m venv {PEERS_VENV} && "
                  f"{PEERS_VENV}/bin/pip install ansible-core parallel-ssh  (skipping {peer})")
            kinds.remove(peer)
    work = Path(tempfile.mkdtemp(prefix="fp-fanout-"))
    fleet = SimFleet(work, max(sizes))
    results: list[Measure] = []
    try:
        fleet.start(args.servers, lines=args.lines)
        print(f"{len(fleet.procs)} simulated-host processes, {fleet.count} ports, work dir {work}", flush=True)
        for n in sizes:
            ports = fleet.ports[:n]
            for r in range(args.rounds):
                order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]   # rotate: no client always first
                for kind in order:
                    if kind == "ansible" and n > args.ansible_max:
                        continue
                    m = run_client(kind, fleet, ports, args.forks, work, args.timeout, args.setup_timeout)
                    results.append(m)
                    extra = ""
                    if "starts" in m.detail:
                        st = m.detail["starts"]
                        extra = (f" started {st['hosts_started']}, last start {st['last_start']:.1f}s, "
                                 f"max in setup {st['max_in_setup']} (forks {st['forks']})")
                    if m.detail.get("workers"):
                        extra += (f" parent rss {m.detail.get('parent_peak_rss_mib')} MiB, workers "
                                  f"{json.dumps(m.detail['workers'])}")
                    extra += f" sim hosts cpu {m.server_cpu * 1000 / n:.2f} ms/host"
                    print(f"n={n} round={r} {kind:9s} wall {m.wall:6.2f}s  cpu {m.cpu * 1000 / n:6.2f} ms/host"
                          f"  section {'' if m.section_cpu is None else f'{m.section_cpu * 1000 / n:6.2f}'}"
                          f"  rss {m.rss_mib:5.0f} MiB  ok {m.ok}/{n}  conns/port "
                          f"{m.server['conn_min']}-{m.server['conn_max']} sessions {m.server['sessions']}"
                          f"{extra}", flush=True)
                    if m.ok < n:
                        print(f"   problems: {json.dumps({k: v for k, v in m.detail.items() if k in ('errors', 'stderr', 'n_errors', 'exit')})[:600]}")
    finally:
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(report(results, kinds))
    if args.json:
        Path(args.json).write_text(json.dumps([m.__dict__ for m in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
