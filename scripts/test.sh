#!/usr/bin/env bash
# Run every test: unit, real sshd in network namespaces, this machine's tracefs, and the qemu lab
# (real x86_64, ppc64le and mips64el kernels). Sets the machine up first. Extra args go to pytest,
# e.g. scripts/test.sh -m "not lab" for the fast part only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Static checks first: they take seconds and a type or lint error fails the run like a test.
.venv/bin/mypy fleetprobe
.venv/bin/ruff check fleetprobe tests bench
# The qemu lab and the module builds cache Debian packages, images and built modules here,
# inside the checkout (ignored by git), so every test that needs the lab shares one set of VMs.
export FLEETPROBE_LAB_DIR=${FLEETPROBE_LAB_DIR:-$PWD/.lab}
export FLEETPROBE_CACHE=${FLEETPROBE_CACHE:-$PWD/.fpcache}
start=$(date +%s)
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
echo "tests took $(( $(date +%s) - start ))s"
if [ $rc -eq 5 ]; then
  echo "test: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit $rc
