#!/bin/sh
# Issue 15's "Measured" list in one sequence, for a quiet machine (bench/RESULTS.md section 6):
#   fp-run vs fp-run-w2 vs asyncssh-gcm vs asyncssh-runner vs parallel-ssh vs fp-run-c2 at 2000 simulated
#   hosts (3 rounds, interleaved), ingest through SSH with 1 and 2 local workers (twice each), the per-host
#   CPU ratio against asyncssh-gcm and asyncssh-runner (fp-run's exchange in bare asyncssh) at 200 and 500
#   hosts, and with HUGE=10000 one run of that many hosts over local workers (memory, every host accounted for).  The load average before and after each part is printed:
#   read a figure only with the load it was measured under.  ~5 min on an idle 2-core machine.
#
#   sh bench/issue15_measure.sh [OUT_DIR]          (run from the checkout's root)
#   BIG=100 SMALL=50 ROUNDS=1 LINES=200000 sh bench/issue15_measure.sh     (a smoke test of the sequence)
set -u
BIG=${BIG:-2000} SMALL=${SMALL:-200,500} ROUNDS=${ROUNDS:-3} LINES=${LINES:-4000000}
out=${1:-/tmp/fp-issue15-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$out"
py=.venv/bin/python
stamp() { echo "== $(date -u +%H:%M:%S) UTC $1: $(uptime)"; }
{
  stamp "start"
  echo "commit $(git rev-parse --short HEAD), $(nproc) cores"
  $py bench/fanout.py --sizes "$BIG" --rounds "$ROUNDS" --kinds fp-run,fp-run-w2,asyncssh-gcm,asyncssh-runner,pssh,fp-run-c2 \
      --first-port 26000 --json "$out/fanout-$BIG.json"
  stamp "after fan-out at $BIG"
  $py bench/ingest_ssh.py --hosts 50 --lines "$LINES" --workers 1,2,1,2 --first-port 27500
  stamp "after ingest"
  $py bench/fanout.py --sizes "$SMALL" --rounds "$ROUNDS" --kinds fp-run,asyncssh-gcm,asyncssh-runner,pssh --first-port 26000 \
      --json "$out/fanout-small.json"
  if [ -n "${HUGE:-}" ]; then
    $py bench/fanout.py --sizes "$HUGE" --rounds 1 --kinds fp-run-w2 --forks 200 --setup-timeout 900 --timeout 1400 \
        --first-port 16000 --json "$out/fanout-$HUGE.json"
  fi
  stamp "end"
} 2>&1 | tee "$out/log.txt"
