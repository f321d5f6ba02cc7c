# fleetprobe facts: everything the planner needs, in one round trip.
# POSIX sh, busybox-compatible (hosts may be minimal systems with no Python).
# Arguments: MOUNT(0|1) then words: "s:SYMBOL", "t:GROUP/EVENT", "f:/path/to/binary".
# Output: sections, each a line "@@name" followed by that section's raw lines.
# The controller parses it with one pure function (fleetprobe.facts.parse_facts).
mount_ok=$1; shift
sec() { printf '@@%s\n' "$1"; }
# The clock twice at once: the second says how long one date takes here (fork and exec), which
# the controller takes off the round trip (the first date ran that long after the ping arrived).
sec realtime; date +%s.%N 2>/dev/null; date +%s.%N 2>/dev/null; adjtimex 2>/dev/null | grep 'tv_'
sec uname; uname -m; uname -r; uname -v
sec uid; id -u
sec ncpus; grep -c '^processor' /proc/cpuinfo 2>/dev/null; ls -d /sys/devices/system/cpu/cpu[0-9]* 2>/dev/null | wc -l
sec boot_id; cat /proc/sys/kernel/random/boot_id 2>/dev/null
# Oopses and WARNs so far (6.2+): a run's baseline should its runner die before it reports its own.
sec kernel_counts; cat /sys/kernel/oops_count /sys/kernel/warn_count 2>/dev/null
# /bin/sh's ELF header: uname -m says "mips64" for both endiannesses (EI_CLASS at 4, EI_DATA at 5).
sec elf; od -An -tx1 -N6 /bin/sh 2>/dev/null
T=
for d in /sys/kernel/tracing /sys/kernel/debug/tracing; do
  if [ -e "$d/README" ]; then T=$d; break; fi
done
mounted=0
if [ -z "$T" ] && [ "$mount_ok" = 1 ] && [ -d /sys/kernel/tracing ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null && [ -e /sys/kernel/tracing/README ] && T=/sys/kernel/tracing && mounted=1
fi
sec tracefs; echo "$T"; echo "$mounted"
sec readme; [ -n "$T" ] && cat "$T/README" 2>/dev/null
sec files_tracefs
if [ -n "$T" ]; then
  for f in kprobe_events uprobe_events dynamic_events kprobe_profile error_log; do
    if [ -w "$T/$f" ]; then echo "$f w"; elif [ -e "$T/$f" ]; then echo "$f r"; fi
  done
  [ -d "$T/instances" ] && echo "instances d"
fi
sec lockdown; cat /sys/kernel/security/lockdown 2>/dev/null
sec modules_disabled; cat /proc/sys/kernel/modules_disabled 2>/dev/null
sec kprobes_enabled; cat /sys/kernel/debug/kprobes/enabled 2>/dev/null
# Symbols: one grep per source for all of them (a clone like foo.isra.0 or foo.cold counts as a clone).
alt=
for w in "$@"; do
  case $w in s:*) s=${w#s:}; case $s in *[!A-Za-z0-9_.]*|'') ;; *) alt="$alt${alt:+|}$s";; esac;; esac
done
sec aff
[ -n "$alt" ] && [ -n "$T" ] && grep -E "^($alt)(\.[A-Za-z0-9_.]+)?([ 	].*)?\$" "$T/available_filter_functions" 2>/dev/null
sec kallsyms
[ -n "$alt" ] && grep -E " [tTwW] ($alt)(\.[A-Za-z0-9_.]+)?([ 	].*)?\$" /proc/kallsyms 2>/dev/null | cut -d' ' -f3
sec blacklist
[ -n "$alt" ] && grep -E "[ 	]($alt)(\.[A-Za-z0-9_.]+)?\$" /sys/kernel/debug/kprobes/blacklist 2>/dev/null
sec tracepoints
for w in "$@"; do
  case $w in t:*) tp=${w#t:}; if [ -n "$T" ] && [ -d "$T/events/$tp" ]; then echo "$tp 1"; else echo "$tp 0"; fi;; esac
done
# What the host says each tracepoint is (name, ID, fields, print fmt): the controller attributes
# trace lines by it, because some events print under another name (syscalls: "sys_openat(...)").
sec tpformat
for w in "$@"; do
  case $w in t:*) tp=${w#t:}
    case $tp in *[!A-Za-z0-9_/]*|*/*/*|'') continue;; esac
    [ -n "$T" ] && [ -r "$T/events/$tp/format" ] && sed -n "s|^name: |$tp name |p; s|^ID: |$tp id |p; s|^print fmt: |$tp fmt |p; s|^[ 	]*field:\([^;]*\);.*|$tp field \1|p" "$T/events/$tp/format" 2>/dev/null;;
  esac
done
sec files
for w in "$@"; do
  case $w in f:*) p=${w#f:}
    if [ -f "$p" ] && [ -r "$p" ]; then
      echo "1 $(wc -c < "$p" | tr -d ' ') $(md5sum < "$p" | cut -d' ' -f1) $p"
    else
      echo "0 0 - $p"
    fi;;
  esac
done
# MIPS kprobe hazard (README, "Known kernel problem (MIPS)"): kprobe_flush_task, run from an RCU
# callback, can clear the CPU's current kprobe mid-probe (MIPS takes the kprobe break with IRQs on).
# CPUs whose RCU callbacks run in kthreads (rcu_nocbs= on a CONFIG_RCU_NOCB_CPU kernel) are safe:
# list them by their rcuo[ps]/N kthreads (children of kthreadd, pid 2: a user process may take the name).
sec mips_kprobe
case $(uname -m) in
  mips*)
    grep -qE ' [tTwW] kprobe_flush_task$' /proc/kallsyms 2>/dev/null && echo "kprobe_flush_task"
    for f in $(grep -lE '^rcuo[ps]/[0-9]+$' /proc/[0-9]*/comm 2>/dev/null); do
      d=${f%/comm}
      read -r st < "$d/stat" 2>/dev/null || continue
      set -- ${st##*) }
      [ "$2" = 2 ] || continue
      read -r c < "$f" && echo "nocb ${c#*/}"
    done;;
esac
sec build
r=$(uname -r)
[ -d "/lib/modules/$r/build" ] && echo "build_dir /lib/modules/$r/build"
command -v make >/dev/null 2>&1 && echo "make yes"
for c in cc gcc; do command -v $c >/dev/null 2>&1 && { echo "cc $c"; break; }; done
sec leftovers
if [ -n "$T" ]; then
  ls "$T/instances" 2>/dev/null | grep '^fp_' | sed 's/^/instance /'
  cat "$T/kprobe_events" "$T/uprobe_events" 2>/dev/null | sed -n 's/^[^:]*:\(fp_[A-Za-z0-9_]*\)\/.*/group \1/p' | sort -u
  sed -n 's/^\(fp_[A-Za-z0-9_]*\).*/synthetic \1/p' "$T/synthetic_events" 2>/dev/null
fi
grep '^fp_' /proc/modules 2>/dev/null | cut -d' ' -f1 | sed 's/^/module /'
sec end
