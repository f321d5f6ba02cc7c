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
set +e
$fp run playbooks/opensnoop.yml -i "$inv" --duration 10s --json opensnoop-report.json "$@"
rc=$?
set -e
echo "merged report: opensnoop-report.json (exit status $rc)"
exit $rc
