#!/bin/sh
# Capture real trace lines from this machine's tracefs into this folder.
# Run as root.  Creates a private instance and a uprobe under its own group,
# and removes both on every exit path (disable -> delete event -> rmdir).
set -u
T=/sys/kernel/tracing
NAME=fptest_$$
I=$T/instances/$NAME
OUT=$(dirname "$0")
cleanup() {
    for e in sched/sched_process_exec sched/sched_process_fork sched/sched_process_exit "$NAME/rl" "$NAME/rlr"; do
        [ -f "$I/events/$e/enable" ] && echo 0 > "$I/events/$e/enable"
    done
    echo "-:$NAME/rl" >> $T/uprobe_events 2>/dev/null
    echo "-:$NAME/rlr" >> $T/uprobe_events 2>/dev/null
    [ -d "$I" ] && rmdir "$I"
}
trap cleanup EXIT INT TERM
mkdir "$I"
# readline's file offset in /bin/bash (uprobes take an offset into the file).
OFF=$(python3 - <<'PY'
import subprocess
out = subprocess.run(["readelf", "-Ws", "--dyn-syms", "/bin/bash"], capture_output=True, text=True).stdout
for l in out.splitlines():
    p = l.split()
    if len(p) >= 8 and p[7] == "readline" and p[3] == "FUNC":
        vaddr = int(p[1], 16)
        break
ph = subprocess.run(["readelf", "-lW", "/bin/bash"], capture_output=True, text=True).stdout
for l in ph.splitlines():
    p = l.split()
    if p and p[0] == "LOAD" and "E" in p[6:]:
        off, va = int(p[1], 16), int(p[2], 16)
        print(hex(vaddr - va + off)); break
PY
)
echo "p:$NAME/rl /bin/bash:$OFF prompt=+0(%di):string" >> $T/uprobe_events
echo "r:$NAME/rlr /bin/bash:$OFF ret=%ax" >> $T/uprobe_events
echo 1 > "$I/events/sched/sched_process_exec/enable"
echo 1 > "$I/events/sched/sched_process_fork/enable"
echo 1 > "$I/events/$NAME/rl/enable"
echo 1 > "$I/events/$NAME/rlr/enable"
echo "fpsync $(date +%s.%N)" > "$I/trace_marker"
/bin/ls / > /dev/null; /bin/true; sh -c 'exec /bin/echo hi' > /dev/null
printf 'echo one\necho "two words"\n' | PS1='fp "q" $ ' bash --norc --noprofile -i > /dev/null 2>&1
# A comm with spaces (as kworker/u8:2 and some JVM threads have): the fork line
# carries it both in the comm column and inside comm=... .
sh -c 'printf "my worker x" > /proc/self/comm; /bin/true; /bin/true'
echo "fpsync $(date +%s.%N)" > "$I/trace_marker"
echo "hello with spaces \"quoted\"" > "$I/trace_marker"
cat "$I/trace" | grep -v '^#' > "$OUT/x86_64-6.18-this-machine.txt"
echo 0 > "$I/options/irq-info"
sh -c 'printf "a b" > /proc/self/comm; /bin/true'
echo "fpsync $(date +%s)" > "$I/trace_marker"
echo 1 > "$I/options/record-tgid"
/bin/true
cat "$I/trace" | grep -v '^#' > "$OUT/x86_64-6.18-irqinfo-off-tgid.txt"
