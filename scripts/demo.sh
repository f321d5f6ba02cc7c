#!/usr/bin/env bash
# The main job on a fresh machine: set up, build and boot a small lab fleet of real Debian kernels
# (3 x x86_64, ppc64le, mips64el, arm64 under qemu), run a kprobe + kretprobe playbook across all of it,
# and show the merged report. Extra args go to `fleetprobe run` (e.g. --duration 30s).
# Set KEEP_LAB=1 to leave the VMs running afterwards (then: .venv/bin/fleetprobe lab down).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export FLEETPROBE_LAB_DIR=${FLEETPROBE_LAB_DIR:-$HOME/.cache/fleetprobe/lab}
fp=.venv/bin/fleetprobe
[ -n "${KEEP_LAB:-}" ] || trap '$fp lab down' EXIT
$fp lab up
inv=$FLEETPROBE_LAB_DIR/inventory.yml
$fp facts -i "$inv"
# An idle lab opens next to nothing (and fleetprobe's own processes are left out): give each guest
# a little work to see, an SSH session reading a few files while the probes are on.
workload() {
  .venv/bin/python - "$inv" <<'PY' | while read -r port; do
import sys, yaml
inv = yaml.safe_load(open(sys.argv[1]))
for group in inv["all"]["children"].values():
    for vars_ in (group.get("hosts") or {}).values():
        if vars_ and "ansible_port" in vars_:
            print(vars_["ansible_port"])
PY
    ssh -n -i "$FLEETPROBE_LAB_DIR/id_ed25519" -o UserKnownHostsFile="$FLEETPROBE_LAB_DIR/known_hosts" \
        -o StrictHostKeyChecking=yes -o BatchMode=yes -p "$port" root@127.0.0.1 \
        'sleep 5; i=0; while [ $i -lt 70 ]; do cat /etc/hostname /etc/os-release /etc/shadow >/dev/null; i=$((i+1)); sleep 0.5; done' \
        >/dev/null 2>&1 &
  done
}
workload
set +e
$fp run playbooks/opensnoop.yml -i "$inv" --duration 20s --json opensnoop-report.json "$@"
rc=$?
wait
set -e
echo "merged report: opensnoop-report.json (exit status $rc)"
exit $rc
