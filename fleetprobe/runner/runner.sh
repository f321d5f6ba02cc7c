# fleetprobe runner: places one run's probes on this host, streams what they see, removes everything.
# POSIX sh, busybox-compatible. Started as: sh -c "$THIS" fleetprobe-runner [facts MOUNT WORDS...]
# The controller sends it on stdin (transport.script_input: comment lines, blank lines and
# indentation are dropped on the way, so no line of a multi-line string or here-document may
# start with "#" or a blank), with facts.sh in front of it as the function fp_facts (runner.py).
#
# With "facts ...", it first prints the facts script's output for those arguments (ending in
# "@@end") and then waits for the plan: a run needs one channel for facts, plan, probe and
# teardown. EOF before "go" (the controller planned nothing for this host) exits quietly.
# stdin: the plan, one directive a line, ended by "go"; after "go", stdin stays open and
# "stop" (or EOF: the controller vanished) ends the run.
#   tracefs PATH | group G | instance I | duration SECS | deadline EPOCH | grace SECS | buffer_kb N
#   def FILE LINE           append LINE to FILE (kprobe_events or uprobe_events); never truncate
#   filter EVENT EXPR       EVENT is a path under events/ (GROUP/NAME or SUBSYS/NAME)
#   guard EVENT [FIELD...]  filter out EVENT's events whose FIELDs or comm hold a newline
#   enable EVENT
#   module NAME PATH PARAMS load a kernel module (insmod PATH PARAMS), remove it at the end; while
#                           modules are loaded the kernel log is forwarded (see kmsg_read below)
#   teardown [MODULES]      remove group G and instance I now (a dead runner's run) and exit
#   ping                    answered, with the first control lines after "go", by "@@fp pong RX TX":
#                           realtime when the ping came and when the answer left (NTP's four
#                           timestamps: the controller takes the time we held it out of the round trip)
# stdout: trace_pipe lines as the kernel prints them, and "@@fp ..." control lines
# (which never collide: trace lines start with a blank, loss lines with "CPU:").
# Kernel log records of this run's modules reach stdout only through the instance's
# trace_marker ("tracing_mark_write: fpk <record>" lines): one writer, no torn lines.
#
# Teardown layers (see DESIGN-NOTES): normal end and "stop" -> teardown here; EOF on stdin or
# a dead stdout -> teardown here; this process killed -> the detached watchdog removes the
# run's group, instance and modules after DEADLINE+GRACE; and every run (and
# "fleetprobe cleanup") first sweeps stale fp_* leftovers of dead runs.

trap '' PIPE          # a dropped link must not kill us half-way through teardown
STOP=
trap 'STOP=${STOP:-signal}' TERM INT HUP
# The stdin watcher's own signal: "stop" or EOF (the controller asked, or vanished).
trap 'STOP=${STOP:-stop-or-eof}' USR1

# Control lines go out one printf each, or, between hold and release, together in one write:
# every write is an SSH packet for the controller to decrypt (a 64-CPU host says 64 "stats" lines).
# Only hold while no other process writes our stdout (the trace reader), and release before a
# step that may kill us (loading a module) whatever must survive it. The kernel's oops/warn
# counts from before anything is placed are in the facts, should we die before a release.
# Every control line starts with CP: "@@fp:<secret> " once the plan's "secret" directive came (the
# kernel prints file names raw, newlines included: without the secret a user who execs
# "x\n@@fp error" would speak for us), "@@fp " before it (sweeps, teardowns: no trace stream).
HOLD=; HELD=; PING_RX=; CP='@@fp '
# Module records through trace_marker carry the secret too ("fpk:<secret> <record>"): a user's
# string holding "tracing_mark_write: fpk ..." (a run's modules are named in /proc/modules) is no record.
KS=
say() {
  if [ -n "$HOLD" ]; then HELD="$HELD$CP$*
"; else printf '%s%s\n' "$CP" "$*" 2>/dev/null; fi
}
hold() { HOLD=1; }
release() {
  HOLD=
  [ -n "$PING_RX" ] && { HELD="${CP}pong $PING_RX $(rt1)
$HELD"; PING_RX=; }
  [ -n "$HELD" ] && printf '%s' "$HELD" 2>/dev/null
  HELD=
}
now() { date +%s; }
# The newline guard's character range (TAB-VT holds LF): a filter string cannot hold a newline itself
# (the kernel cuts a filter write at its first newline: "Missing matching quote").
TAB=$(printf '\t'); VT=$(printf '\v')

# --- module file checks (tests/test_hostile.py runs this block by itself) ---
# A module file is loaded only if it is exactly what the controller wrote (kmod: put_private):
# a regular file, not a symlink, one link, owned by us (root) and writable by no one else, in a
# directory that is not a symlink, owned by us, mode 0700 (mktemp -d).  Any user of the host
# can plant a symlink or a file of their own in /tmp; none of those reaches insmod.
module_file_ok() {
  _f=$1; _d=${1%/*}
  case $_d in /tmp/fp_*) ;; *) echo "$_d is not a fleetprobe module directory"; return 1;; esac
  if [ -L "$_d" ] || [ ! -d "$_d" ]; then echo "$_d is not a directory"; return 1; fi
  if [ -L "$_f" ] || [ ! -f "$_f" ]; then echo "$_f is not a regular file"; return 1; fi
  _me=$(id -u)
  # ls -ldn: mode, links, uid (busybox and coreutils alike).
  set -- $(ls -ldn "$_d"); _dm=$1; _du=$3
  set -- $(ls -ln "$_f"); _fm=$1; _fl=$2; _fu=$3
  case $_dm in drwx------*) _dok=1;; *) _dok=;; esac   # a trailing . or + is an SELinux label or ACL
  if [ "$_du" != "$_me" ] || [ -z "$_dok" ]; then
    echo "$_d is owned by uid $_du with mode $_dm, not by uid $_me with drwx------"; return 1
  fi
  if [ "$_fu" != "$_me" ] || [ "$_fl" != 1 ]; then
    echo "$_f is owned by uid $_fu with $_fl link(s), not by uid $_me with 1"; return 1
  fi
  case $_fm in -????-??-*) ;; *) echo "$_f has mode $_fm (writable by others)"; return 1;; esac
  return 0
}
# Remove module directories of group $1 (ours only: owned by us, not symlinks).
remove_module_dirs() {
  for _d in /tmp/"$1"_*.mod.*; do
    [ -d "$_d" ] && [ ! -L "$_d" ] && [ -O "$_d" ] && rm -rf -- "$_d"
  done
  return 0
}
# --- end of module file checks ---
# CLOCK_REALTIME with a fraction. busybox date prints "%N" literally; its adjtimex
# applet reports tv_usec; failing both, whole seconds with a 1 s uncertainty.
rt() {
  _t=$(date +%s.%N 2>/dev/null)
  case $_t in
    *N*|*%*|'')
      set -- $(adjtimex 2>/dev/null | sed -n 's/.*tv_sec: *\([0-9]*\).*/\1/p; s/.*tv_usec: *\([0-9]*\).*/\1/p')
      if [ -n "$2" ]; then printf '%s.%06d\n' "$1" "$2"; else echo "$(date +%s) 1"; fi;;
    *) echo "$_t";;
  esac
}
# rt without its uncertainty word: a stamp without a fraction says "whole seconds" by itself.
rt1() { set -- $(rt); echo "$1"; }

T=; G=; I=; DUR=10; DEADLINE=0; GRACE=60; BUF=; MODS=; PLAN=; RUN=; KREAD=; KCAT=; KDIR=; KSKIP=; KNOSTART=; FILTERS=; GUARDS=; QEV=; QIS=; QK=0; BADFILTER=; TICKED=; OWNK=; HIST_Q=; WD_GONE=; HIST_LIVE=

# Stop every process that still holds files of instance dir $1 open (a dead runner's reader):
# an open trace_pipe keeps the instance busy and rmdir fails with EBUSY.
kill_readers() {
  for _fd in /proc/[0-9]*/fd/*; do
    case $(readlink "$_fd" 2>/dev/null) in
      "$1"/*) _p=${_fd#/proc/}; kill -TERM "${_p%%/*}" 2>/dev/null;;
    esac
  done
}

# ---- hist triggers: in-kernel aggregation (fleetprobe/histplan.py plans them) ----------------------
# Directives: "notrace_self"; "synth LINE" (append to synthetic_events); "trigger EVENT LINE"
# (append LINE to instances/I/events/EVENT/trigger); "histread EVENT" (print its hist at the end).
# A trigger soft-enables its event: an event whose tables are all in the kernel is never enabled.
HIST_NONE=; HIST_PLACED=0
hist_place() {
  case $1 in
    notrace_self)
      # Not observing ourselves: this shell, its children (event-fork), the watchdog and the SSH
      # server process serving us are filtered out of the instance, triggers included (5.8+).
      echo 1 > "$T/instances/$I/options/event-fork" 2>/dev/null
      { echo "$$ $PPID $WD" > "$T/instances/$I/set_event_notrace_pid"; } 2>/dev/null || say "notrace unsupported";;
    synth)
      if _hx=$( { echo "$2" >> "$T/synthetic_events"; } 2>&1 ); then say "placed synth ${2%% *}"
      else say "synthfail ${2%% *} :: ${_hx##*: } $(tail -n 2 "$T/error_log" 2>/dev/null | tr -s ' \n' '  ')"; fi;;
    trigger)
      _he=${2%% *}; _ht=${2#* }
      # The kernel runs unconditional triggers before it looks at set_event_notrace_pid: a filter
      # keeps the SSH server process serving us and every process of ours ($_own) out of the tables.
      _hf="common_pid != $PPID${_own:+ && $_own}"
      case $_ht in
        *" if "*) _hw="${_ht%% if *} if (${_ht#* if }) && $_hf";;
        *) _hw="$_ht if $_hf";;
      esac
      # Written by this shell itself, no $(...): a subshell is a process the triggers placed
      # before this one would count. Only a refusal forks (to read the kernel's reason).
      if [ ! -d "$T/instances/$I/events/$_he" ]; then
        say "trigfail $_he $_ht :: no such event"
      elif ! { echo "$_hw" >> "$T/instances/$I/events/$_he/trigger"; } 2>/dev/null; then
        say "trigfail $_he $_ht :: write refused; $(tail -n 2 "$T/error_log" 2>/dev/null | tr -s ' \n' '  ')"
      else
        HIST_PLACED=$((HIST_PLACED + 1))
        # To pause it first thing at teardown: the same trigger with ":pause" (the kernel finds it
        # by its keys, values and filter).
        HIST_LIVE="${HIST_LIVE:+$HIST_LIVE
}$_he ${_hw%% if *}:pause if ${_hw#* if }"
      fi;;
  esac
}
# The tables, once, at the end: every line prefixed and with '%' and '[' escaped, so that no key a
# user chose (a comm, a path) can pass for a trace line, a control line or another entry.
hist_read() {
  for _he in $(printf '%s\n' "$PLAN" | sed -n 's/^histread //p'); do
    say "hist $_he"
    sed "s/%/%25/g; s/\\[/%5B/g; s/^/${CP}hl /" "$T/instances/$I/events/$_he/hist" 2>/dev/null || say "histfail $_he"
  done
  say "hist end"
}
# Remove every trigger of instance $2 (dependents first: a trigger whose variable another uses is
# busy until that one is gone, so a few passes), then the synthetic events of group $1 (after
# the triggers that generate or read them). Before the group's events go: a triggered event is busy.
hist_unplace() {
  if [ -n "$2" ] && [ -d "$T/instances/$2" ] && ! { [ "$2" = "$I" ] && [ -n "$HIST_NONE" ]; }; then
    _hp=0
    while [ $_hp -lt 4 ]; do
      _hx=$(grep -v '^#' "$T/instances/$2"/events/*/*/trigger 2>/dev/null | sed 's/ \[[a-z]*\]$//')
      [ -z "$_hx" ] && break
      printf '%s\n' "$_hx" | while IFS= read -r _hl; do { echo "!${_hl#*:}" >> "${_hl%%:*}"; } 2>/dev/null; done
      _hp=$((_hp + 1))
    done
    [ $_hp -ge 4 ] && say "unclean triggers in $2"
  fi
  [ -n "$1" ] && [ -w "$T/synthetic_events" ] || return 0
  for _hs in $(sed -n "s/^\\($1_[A-Za-z0-9_]*\\)[ 	].*/\\1/p" "$T/synthetic_events" 2>/dev/null); do
    { echo "!$_hs" >> "$T/synthetic_events"; } 2>/dev/null || say "unclean synthetic $_hs busy"
  done
}
# Synthetic events of fp_ groups that have no instance left (their run is gone).
hist_sweep() {
  [ -r "$T/synthetic_events" ] || return 0
  for _hg in $(sed -n 's/^\(fp_[a-z0-9]*_[0-9a-f][0-9a-f][0-9a-f][0-9a-f]\)_.*/\1/p' "$T/synthetic_events" | sort -u); do
    _live=
    for _d in "$T/instances/${_hg}"_*; do [ -d "$_d" ] && _live=1; done
    [ -z "$_live" ] && { hist_unplace "$_hg" ""; say "swept synthetic $_hg"; }
  done
}

# The run's guard instances (one per guarded event: its instance's name, deadline + 1, + 2, ...), for
# those who do not know QIS (the watchdog, the controller's teardown): the group's other instances.
teardown_guards() {
  for _qi in "$T/instances/${I%_*}"_*; do
    [ -d "$_qi" ] && [ "${_qi##*/}" != "$I" ] && teardown_group "" "${_qi##*/}"
  done
}

# Disable, delete and remove everything of group $1 / instance $2 (either may be empty).
# Order matters: an enabled event cannot be deleted (EBUSY); a deleted event leaves the instance.
teardown_group() {
  _g=$1; _i=$2
  # The group's events may be enabled in its guard instance too (see QIS): disabled everywhere first.
  if [ -n "$_g" ]; then
    for _x in "$T/instances/$_g"_*; do [ -d "$_x" ] && echo 0 > "$_x/events/enable" 2>/dev/null; done
  fi
  if [ -n "$_i" ] && [ -d "$T/instances/$_i" ]; then
    echo 0 > "$T/instances/$_i/events/enable" 2>/dev/null
    for _e in "$T/instances/$_i"/events/*/*/enable; do
      [ -f "$_e" ] && echo 0 > "$_e" 2>/dev/null
    done
  fi
  hist_unplace "$_g" "$_i"
  if [ -n "$_g" ]; then
    for _f in kprobe_events uprobe_events; do
      [ -w "$T/$_f" ] || continue
      for _n in $(sed -n "s/^[^:]*:$_g\/\([^ ]*\).*/\1/p" "$T/$_f" 2>/dev/null); do
        _try=0
        # EBUSY while something still has it enabled: retry briefly, then report, never loop forever.
        until echo "-:$_g/$_n" >> "$T/$_f" 2>/dev/null; do
          _try=$((_try + 1))
          [ $_try -ge 20 ] && { say "unclean event $_g/$_n busy"; break; }
          sleep 1
        done
      done
    done
  fi
  if [ -n "$_i" ] && [ -d "$T/instances/$_i" ]; then
    _try=0
    until rmdir "$T/instances/$_i" 2>/dev/null; do
      [ $_try -eq 0 ] && kill_readers "$T/instances/$_i"
      _try=$((_try + 1))
      [ $_try -ge 20 ] && { say "unclean instance $_i busy"; break; }
      sleep 1
    done
  fi
}

# The start time (clock ticks since boot, field 22 of /proc/PID/stat) of process $1; our own
# processes' comm (sh, dash, busybox, sleep, dd) never holds a blank, which would shift the fields.
starttime() {
  { read -r _1 _2 _3 _4 _5 _6 _7 _8 _9 _10 _11 _12 _13 _14 _15 _16 _17 _18 _19 _20 _21 _22 _r < "/proc/$1/stat"; } 2>/dev/null &&
    echo "$_22"
}

# Stop a dead run's processes ("PID:START" words, from its "own" line, its shell's first): only
# those whose start time still matches. CONT too: a reader stopped before its start holds TERM
# pending otherwise. Then the rest of the dead shell's process group, when it led one (as under
# sshd): the watchdog's and timer's sleeps outlive a watchdog killed with the shell. While any
# member lives, the kernel gives no new process that group's id, so they can only be the run's.
kill_own() {
  _lead=; KILLED=
  for _w in $1; do
    _p=${_w%%:*}; _s=${_w#*:}
    case $_p in ''|*[!0-9]*) continue;; esac
    [ -z "$_lead" ] && _lead=$_p
    [ "$_p" = "$$" ] && continue
    [ -n "$_s" ] && [ "$(starttime "$_p")" = "$_s" ] || continue
    kill -TERM "$_p" 2>/dev/null && KILLED=1; kill -CONT "$_p" 2>/dev/null
  done
  # Only when the shell is gone (or a zombie): a live process with its pid leads someone else's group.
  [ -n "$_lead" ] && [ "$_lead" != "$$" ] || return 0
  if { read -r _l < "/proc/$_lead/stat"; } 2>/dev/null; then
    set -f; set -- ${_l##*) }; set +f
    [ "$1" = Z ] || return 0
  fi
  for _f in /proc/[0-9]*/stat; do
    { read -r _l < "$_f"; } 2>/dev/null || continue
    # After the last ")": comm (anything a user named a process) is behind us.
    set -f; set -- ${_l##*) }; set +f
    [ "$3" = "$_lead" ] || continue
    _p=${_f#/proc/}; _p=${_p%/stat}
    [ "$_p" = "$$" ] && continue
    kill -TERM "$_p" 2>/dev/null; kill -CONT "$_p" 2>/dev/null
  done
}

# Unload this run's modules (names in $1), only while their run parameter is still this run's:
# a module of the same name may belong to another run by now.
unload_modules() {
  for _m in $1; do
    grep -q "^$_m " /proc/modules 2>/dev/null || continue
    _owner=$(cat "/sys/module/$_m/parameters/run" 2>/dev/null)
    [ -n "$_owner" ] && [ -n "$RUN" ] && [ "$_owner" != "$RUN" ] && continue
    rmmod "$_m" 2>/dev/null || { sleep 1; rmmod "$_m" 2>/dev/null; } || say "unclean module $_m"
  done
}

# fp_* modules whose run (their "run" parameter, 0444 in /sys/module) has no instance left:
# their runner and watchdog are gone. A live run makes its instance before it loads modules
# and unloads them before it removes the instance.
sweep_modules() {
  for _p in /sys/module/fp_*/parameters/run; do
    [ -r "$_p" ] || continue
    _m=${_p#/sys/module/}; _m=${_m%%/*}; _r=$(cat "$_p" 2>/dev/null)
    _live=
    for _d in "$T/instances/fp_${_r}"_*; do [ -d "$_d" ] && _live=1; done
    [ -n "$_live" ] && continue
    if rmmod "$_m" 2>/dev/null; then say "swept module $_m"; else say "unclean module $_m"; fi
  done
}

# --- kernel log forwarding (tests/test_runner_kmsg.py runs this block by itself) ---
# The kernel log, for modules: every record after this run's start record, written into the
# instance's trace_marker as "fpk <record>" (one write(2) per record, so it travels through the
# ring buffer and trace_pipe whole; a second writer on our stdout could tear trace lines).
# Records of other runs and ordinary kernel messages are reduced to their header
# "prio,seq,usec,flags;": the controller still sees every sequence number, so a gap means
# records the kernel overwrote before we read them (Documentation/ABI/testing/dev-kmsg).
# The shell's read builtin reads a pipe byte by byte, so records never wait in a buffer
# (mawk would hold them until 4 KiB arrived).
#
# The records before our start record (the whole kernel log since boot, or since the ring last
# wrapped) are skipped before they reach the shell: byte by byte, a long log took longer than a
# 5 s run on a slow host (a TCG MIPS guest), and the module's lines came after the run had ended.
# Each read(2) of /dev/kmsg returns exactly one record, so a filter reading the device itself
# stops right after the record it looks for: GNU sed and busybox grep -m1 were checked not to read
# ahead (busybox sed does: it loses the next record). The filter prints the record it stopped at.
# It stops at our start record, or at the end, bye or watchdog record of our instance, so it
# can never wait forever for a start record the kernel dropped. Then this process becomes cat
# (exec: the pid the filters and the "own" line already name). kmsg_read still checks every record.
kmsg_skipper() {
  [ -n "$KNOSTART" ] && return 0   # no start record to stop at
  case $(sed --version 2>/dev/null) in *"(GNU sed)"*) echo gnused; return 0;; esac
  case $(grep --help 2>&1) in *BusyBox*) echo bbgrep;; esac
  return 0
}
kmsg_src() {
  trap - PIPE    # die when the reader is gone (the runner ignores SIGPIPE for itself)
  exec 7</dev/kmsg 2>/dev/null || exec cat /dev/null
  _k="${KRUN}probe=- ev="
  case $KSKIP in
    gnused) sed -n -e "/;${_k}clock inst=$I /{p;q}" -e "/;${_k}end inst=$I\$/{p;q}" \
              -e "/;${_k}bye inst=$I\$/{p;q}" -e "/;fleetprobe watchdog removed $G $I /{p;q}" <&7;;
    bbgrep) grep -m1 -F -e ";${_k}clock inst=$I " -e ";${_k}end inst=$I" -e ";${_k}bye inst=$I" \
              -e ";fleetprobe watchdog removed $G $I " <&7;;
  esac
  exec cat <&7 7<&-
}
# read(2) fails with EPIPE when the ring overwrote unread records (cat exits): reopen, which
# replays from the oldest record (kmsg_fwd skips sequence numbers it has seen). Rare, and these
# cats are forks our filters do not name.
kmsg_reopen() {
  trap - PIPE
  _n=0
  while [ $_n -lt 30 ]; do
    sleep 1; _n=$((_n + 1))
    cat /dev/kmsg 2>/dev/null
    [ $? -gt 128 ] && exit 0
  done
}
kmsg_read() {
  _on=$KNOSTART; _last=-1
  exec 4>"$T/instances/$I/trace_marker" || exit 1
  kmsg_fwd < "$1"
  # The source ended before our end record: the ring overwrote what we had not read yet. The
  # forwarding stays in this process (killing it stops it); the reopened cat dies on the FIFO.
  kmsg_reopen > "$1" &
  kmsg_fwd < "$1"
}
kmsg_fwd() {
  while IFS= read -r _l; do
    case $_l in ''|' '*) continue;; esac     # dictionary lines (" KEY=value")
    _h=${_l%%;*}; _t=${_l#*;}
    _s=${_h#*,}; _s=${_s%%,*}
    case $_s in ''|*[!0-9]*) continue;; esac
    [ "$_s" -le "$_last" ] && continue
    if [ -z "$_on" ]; then
      case $_t in "$KRUN"'probe=- ev=clock inst='"$I "*) _on=1;; *) continue;; esac
    fi
    _last=$_s
    case $_t in
      "$KRUN"*) printf 'fpk%s %s\n' "$KS" "$_l" >&4;;
      *) printf 'fpk%s %s;\n' "$KS" "$_h" >&4;;
    esac
    case $_t in "$KRUN"'probe=- ev=end inst='"$I") exit 0;; esac
  done
}
kmsg_clock() {
  echo "${KRUN}probe=- ev=clock inst=$I realtime=$(rt)" > /dev/kmsg 2>/dev/null
}
kmsg_start() {
  kmsg_clock
  # printk_devkmsg=off drops writes to /dev/kmsg (our start record): forward from the oldest.
  KNOSTART=; [ "$(cat /proc/sys/kernel/printk_devkmsg 2>/dev/null)" = off ] && KNOSTART=1
  KSKIP=$(kmsg_skipper)
  # A FIFO in a private directory (removed with the module directories) joins source and reader,
  # so that both pids are known: both are in the "own" line and out of every event.
  KDIR=$(mktemp -d "/tmp/${G}_kmsg.mod.XXXXXX") && mkfifo "$KDIR/records" || { say "error cannot make a private FIFO for the kernel log in /tmp"; KDIR=; return 0; }
  kmsg_src > "$KDIR/records" &
  KCAT=$!
  kmsg_read "$KDIR/records" &
  KREAD=$!
}
# After the modules are unloaded (their totals are in the log): let the reader forward up to
# our end record, then stop it; one more record wakes a cat blocked in read(2) so it meets
# the closed pipe and exits.
kmsg_stop() {
  [ -n "$KREAD" ] || return 0
  kmsg_clock
  echo "${KRUN}probe=- ev=end inst=$I" > /dev/kmsg 2>/dev/null
  _try=0
  while kill -0 "$KREAD" 2>/dev/null && [ $_try -lt 5 ]; do sleep 1; _try=$((_try + 1)); done
  kill "$KREAD" 2>/dev/null
  # The record wakes the source (cat, or the filter) blocked in read(2): it meets the closed FIFO.
  echo "${KRUN}probe=- ev=bye inst=$I" > /dev/kmsg 2>/dev/null
  wait "$KREAD" 2>/dev/null
  wait "$KCAT" 2>/dev/null
  [ -n "$KDIR" ] && rm -rf -- "$KDIR"
  KREAD=; KCAT=; KDIR=
}

# --- end of kernel log forwarding ---

# Remove leftovers of dead runs: instances whose deadline (last _field of the name) + grace has
# passed, and fp_ groups that have no instance at all (a live run makes its instance first).
sweep() {
  _now=$(now)
  [ -n "$T" ] && [ -d "$T/instances" ] || return 0
  for _d in "$T"/instances/fp_*; do
    [ -d "$_d" ] || continue
    _n=${_d##*/}; _dl=${_n##*_}
    case $_dl in ''|*[!0-9]*) continue;; esac
    if [ $((_dl + GRACE)) -lt "$_now" ]; then
      # teardown_group reuses _n (sh has no local variables): say the instance's name first.
      say "swept $_n"; teardown_group "${_n%_*}" "$_n"
    fi
  done
  for _g in $(cat "$T/kprobe_events" "$T/uprobe_events" 2>/dev/null | sed -n 's/^[^:]*:\(fp_[A-Za-z0-9_]*\)\/.*/\1/p' | sort -u); do
    _live=
    for _d in "$T/instances/${_g}"_*; do [ -d "$_d" ] && _live=1; done
    [ -z "$_live" ] && { teardown_group "$_g" ""; say "swept $_g"; }
  done
  hist_sweep
  sweep_modules
}

# Snapshot loss counters: per-cpu ring buffer stats of our instance, and kprobe_profile (hits, misses).
# An oops or WARN during the run is the first thing an operator must hear about.
kernel_counts() {
  say "kernel $1 oops=$(cat /sys/kernel/oops_count 2>/dev/null) warn=$(cat /sys/kernel/warn_count 2>/dev/null) taint=$(cat /proc/sys/kernel/tainted 2>/dev/null)"
}

snapshot() {
  _phase=$1
  # The start counts are taken before anything is placed (see "hello"): a probe that oopses
  # the kernel at once may kill this shell before it gets here.
  [ "$_phase" = end ] && kernel_counts end
  for _s in "$T/instances/$I"/per_cpu/cpu*/stats; do
    [ -f "$_s" ] || continue
    _c=${_s%/stats}; _c=${_c##*/}
    say "stats $_phase $_c $(tr -s ' ' < "$_s" | sed -n 's/^overrun: /overrun=/p; s/^commit overrun: /commit_overrun=/p; s/^dropped events: /dropped=/p; s/^entries: /entries=/p; s/^read events: /read=/p' | tr '\n' ' ')"
  done
  if [ -r "$T/kprobe_profile" ]; then
    # kprobe_profile lists events in kprobe_events order without their group: zip them on the controller.
    while IFS= read -r _l; do say "kev $_phase $_l"; done < "$T/kprobe_events"
    while IFS= read -r _l; do say "kprof $_phase $_l"; done < "$T/kprobe_profile"
  fi
}

sync_marker() {
  echo "fpsync $(rt)" > "$T/instances/$I/trace_marker" 2>/dev/null
}

# The watchdog outlives this process if it is killed, and removes everything at DEADLINE + GRACE;
# a normal teardown stops it (TERM) first. One sleep for the whole run, started before anything
# is enabled: a watchdog that woke every few seconds (date, sleep) was fleetprobe observing itself.
watchdog() {
  trap '' HUP INT PIPE
  trap 'kill "$_s" 2>/dev/null; exit 0' TERM
  _left=$((DEADLINE + GRACE - $(now)))
  [ "$_left" -gt 0 ] || _left=1
  sleep "$_left" &
  _s=$!
  wait "$_s"
  unload_modules "$MODS"
  # Its guard instances, if the run made any (QIS is set after this subshell started).
  teardown_guards
  [ -d "$T/instances/$I" ] || grep -q ":$G/" "$T/kprobe_events" "$T/uprobe_events" 2>/dev/null || exit 0
  teardown_group "$G" "$I"; remove_module_dirs "$G"
  echo "fleetprobe watchdog removed $G $I $MODS" > /dev/kmsg 2>/dev/null
  exit 0
}

# ---- facts, then read the plan ---------------------------------------------------------------
# Captured, then printed in one write (not one packet per command); fp_facts runs in a subshell.
if [ "$1" = facts ]; then
  shift
  _facts=$(fp_facts "$@")
  printf '%s\n' "$_facts"
  _facts=
fi
exec 3<&0
GO=
while IFS= read -r line <&3; do
  set -f
  # shellcheck disable=SC2086
  set -- $line
  set +f
  case $1 in
    go) GO=1; break;;
    # Hex only: it goes into a sed replacement (hist_read) and must never need quoting.
    secret) case $2 in ''|*[!0-9a-f]*) say "error secret must be hex"; exit 2;; esac; CP="@@fp:$2 "; KS=":$2";;
    tracefs) T=$2;; group) G=$2;; instance) I=$2;; duration) DUR=$2;; deadline) DEADLINE=$2;;
    grace) GRACE=$2;; buffer_kb) BUF=$2;;
    own) shift; OWNK="$*";;
    def|filter|guard|enable|module|synth|trigger|histread|notrace_self) PLAN="${PLAN:+$PLAN
}$line";;
    sweep) sweep; say "sweep done"; exit 0;;
    # The controller's own teardown of a run whose runner died (killed by an oops, say).
    teardown)
      case $G in fp_*) ;; *) say "error group must start with fp_"; exit 2;; esac
      RUN=${G#fp_}; RUN=${RUN%_*}; shift
      # Modules first: unloading prints their totals, and stops their handlers before anything else goes.
      unload_modules "$*"
      # Its reader is one of its own processes: stopping those spares the scan of every process's
      # fds (a fork per fd: seconds on a busy host), which stays the fallback.
      kill_own "$OWNK"
      if [ -n "$KILLED" ]; then sleep 1; else kill_readers "$T/instances/$I"; fi
      teardown_guards
      teardown_group "$G" "$I"
      remove_module_dirs "$G"
      # A kernel-log record wakes a forwarder's cat blocked in read(2): it meets its dead reader and exits.
      [ -n "$*" ] && echo "fleetprobe run=$RUN probe=- ev=bye inst=$I" > /dev/kmsg 2>/dev/null
      _left=
      for _m in $*; do grep -q "^$_m " /proc/modules 2>/dev/null && _left="$_left module:$_m"; done
      _inst=; for _x in "$T/instances/${I%_*}"_*; do [ -d "$_x" ] && _inst=1; done
      if [ -n "$_inst" ] || grep -q ":$G/" "$T/kprobe_events" "$T/uprobe_events" 2>/dev/null; then
        _left="$_left tracefs"; fi
      if [ -z "$_left" ]; then say "clean"; else say "unclean after teardown$_left"; fi
      exit 0;;
    # NTP-style clock sample on the already-running shell: stamped now, answered with the next write.
    ping) PING_RX=$(rt1);;
    *) say "error unknown directive $1"; exit 2;;
  esac
done
[ -n "$GO" ] || exit 0
case $G in fp_*) ;; *) say "error group must start with fp_"; exit 2;; esac
case $I in "$G"_*) ;; *) say "error instance must start with the group"; exit 2;; esac
# The run id is the group's middle part (fp_<run>_<host>); modules print it in every line.
# Our own kernel-log records also name the instance: "hosts" sharing one kernel share the run id.
RUN=${G#fp_}; RUN=${RUN%_*}; KRUN="fleetprobe run=$RUN "
[ -w "$T/instances" ] || { say "error no writable tracefs instances at $T"; exit 3; }
# Until the trace reader starts, nothing else writes our stdout: everything up to "started" goes
# out in one write (the pong first), except what goes before an insmod.
hold
say "hello pid=$$"
# The host's clock when the plan came, and its uptime then: the probing window is measured
# against the deadline later without a fork (read from /proc/uptime) once probes may see us.
GO_EPOCH=$(now); read -r GO_UP _rest < /proc/uptime
kernel_counts start
sweep

MODS=$(printf '%s\n' "$PLAN" | sed -n 's/^module \([^ ]*\) .*/\1/p' | tr '\n' ' ')
printf '%s\n' "$PLAN" | grep -q '^trigger ' || HIST_NONE=1
# Detached from our stdio so it never holds the SSH channel open; it knows MODS from the plan.
(watchdog) </dev/null >/dev/null 2>&1 &
WD=$!

mkdir "$T/instances/$I" || { say "error cannot create instance $I"; release; kill "$WD"; exit 3; }
[ -n "$BUF" ] && echo "$BUF" > "$T/instances/$I/buffer_size_kb" 2>/dev/null
# A clock that is monotonic across CPUs; the fpsync markers map it to realtime.
grep -q mono "$T/instances/$I/trace_clock" 2>/dev/null && echo mono > "$T/instances/$I/trace_clock"
# Before any module loads: its "planted" or "failed" line must not be missed.
[ -n "$MODS" ] && kmsg_start

LOADED=
while IFS= read -r line; do
  kind=${line%% *}; rest=${line#* }
  case $kind in
    def)
      f=${rest%% *}; d=${rest#* }
      # printf, not echo: dash's echo reads the seal's "\0x..." as an octal escape (a NUL).
      if err=$(printf '%s\n' "$d" 2>&1 >> "$T/$f"); then
        say "placed $d"
      else
        why=$(tail -n 3 "$T/error_log" 2>/dev/null | tr -s ' \n' '  ')
        say "deffail $d :: ${err##*: } $why"
      fi;;
    module)
      set -f; set -- $rest; set +f
      mn=$1; mp=$2; shift 2
      # One module name loads once per kernel: name the run that holds it (another operator,
      # or a second "host" sharing this kernel) instead of insmod's bare "File exists".
      if [ -d "/sys/module/$mn" ]; then
        say "modfail $mn :: $mn is already loaded (by run $(cat "/sys/module/$mn/parameters/run" 2>/dev/null || echo '?'))"
      else
        # A module can take the kernel (and us) down: what was placed so far goes out first.
        release
        if ! why=$(module_file_ok "$mp"); then say "modfail $mn :: refused $mp: $why"
        elif out=$(insmod "$mp" "$@" 2>&1); then LOADED="$LOADED $mn"; say "loaded $mn"
        else say "modfail $mn :: $(echo $out)"; fi
        hold
      fi
      rm -f -- "$mp"; rmdir -- "${mp%/*}" 2>/dev/null;;
    synth|notrace_self) hist_place "$kind" "$rest";;
    # "guard EVENT FIELD...": keep every event whose FIELDs or comm hold a newline out of the ring
    # buffer (issue 11 #2: the kernel prints strings raw, and a user's "y\n<trace line>" would be
    # an event of its own). Applied with the enable's filter below.
    guard) GUARDS="$GUARDS$rest
";;
    # Triggers wait until every process of ours exists: their filter names all of them.
    trigger) HIST_Q="${HIST_Q:+$HIST_Q
}$rest";;
    filter)
      ev=${rest%% *}; ex=${rest#* }
      FILTERS="$FILTERS$ev $ex
"
      # The kernel explains a refused filter in the filter file itself ("parse_error: Field not found"),
      # not in error_log (checked on 6.18): error_log's tail would name an unrelated older error.
      if [ ! -d "$T/instances/$I/events/$ev" ]; then
        say "filterfail $ev :: no such event"
      elif ! { echo "$ex" > "$T/instances/$I/events/$ev/filter"; } 2>/dev/null; then
        say "filterfail $ev :: $(sed -n 's/^parse_error: //p' "$T/instances/$I/events/$ev/filter" 2>/dev/null)"
        BADFILTER="$BADFILTER $ev "
      fi;;
  esac
done <<EOF_PLAN
$PLAN
EOF_PLAN

snapshot start
# The marker and the first events wait in the ring buffer for the reader, started below.
sync_marker

# ---- fleetprobe must not observe itself --------------------------------------------------
# Every process of ours that lives through the run is started now, before anything is enabled,
# and its pid is kept out of every event in the kernel (common_pid != N in the event's filter in
# our instance). In the steady state nothing forks: the main shell blocks in "wait" on one sleep
# for the whole duration, woken by the controller's "tick" (every few seconds, via the stdin
# watcher's kill -USR2) to write a heartbeat marker through an fd opened once.
trap 'TICKED=1' USR2
( while IFS= read -r cmd; do
    case $cmd in stop) break;; tick) kill -USR2 $$ 2>/dev/null || exit 0;; esac
  done; kill -USR1 $$ 2>/dev/null ) <&3 &
WATCH=$!
# The window ends by the deadline (the planned end plus the teardown slack): a host slow to place
# its probes eats into the slack, never past it, so the on-host timer (DEADLINE + GRACE) never
# removes a live run's probes under it. A shortened window is said, with both lengths.
_win=${DUR%.*}
read -r _up _rest < /proc/uptime
_room=$((DEADLINE - GO_EPOCH - (${_up%.*} - ${GO_UP%.*})))
if [ "$DEADLINE" -gt 0 ] && [ "$_room" -lt "$_win" ]; then
  [ "$_room" -gt 0 ] || _room=0
  say "shortened $_win $_room"
  _win=$_room
fi
sleep "$_win" &
TIMER=$!
# The reader is forked now but stops itself until everything is said (only then may it write our
# stdout): its exec of dd is then a process whose pid the filters already name.
( read -r _self _rest < /proc/self/stat && kill -STOP "$_self"
  exec dd if="$T/instances/$I/trace_pipe" bs=65536 2>/dev/null ) &
READER=$!
_n=0
while [ $_n -lt 100000 ]; do
  _st=; read -r _a _b _st _rest < "/proc/$READER/stat" 2>/dev/null
  case $_st in T|t|'') break;; esac
  _n=$((_n + 1))
done
OWN="$$ $WD $WATCH $TIMER $READER${KREAD:+ $KREAD}${KCAT:+ $KCAT}"
_own=; _ownk=
for _p in $OWN; do
  _own="${_own:+$_own && }common_pid != $_p"
  # With its start time (field 22 of stat): a controller's teardown of this run, should we die,
  # stops these (the watchdog's and the timer's sleeps would linger) and never a reused pid.
  _st=$(starttime "$_p")
  _ownk="${_ownk:+$_ownk }$_p:$_st"
done
say "own $_ownk"
# From the first enable on, nothing of ours may fork (a $(...) forks too): the pong's stamp and the
# module list are made now.
[ -n "$PING_RX" ] && { HELD="${CP}pong $PING_RX $(rt1)
$HELD"; PING_RX=; }
_mods=
for _m in $LOADED; do _mods="${_mods:+$_mods }$_m"; done
enabled=0
while IFS= read -r _q; do
  [ -n "$_q" ] && hist_place trigger "$_q"
done <<EOF_HIST
$HIST_Q
EOF_HIST
for ev in $(printf '%s\n' "$PLAN" | sed -n 's/^enable //p'); do
  [ -d "$T/instances/$I/events/$ev" ] || continue
  _u=
  case $BADFILTER in *" $ev "*) ;; *)
    while IFS= read -r _l; do case $_l in "$ev "*) _u=${_l#"$ev "};; esac; done <<EOF_FILTERS
$FILTERS
EOF_FILTERS
  ;; esac
  _gx=
  while IFS= read -r _l; do
    case $_l in "$ev"|"$ev "*) for _gf in COMM ${_l#"$ev"}; do _gx="${_gx:+$_gx && }!($_gf ~ \"*[$TAB-$VT]*\")"; done;; esac
  done <<EOF_GUARDS
$GUARDS
EOF_GUARDS
  _ff="$T/instances/$I/events/$ev/filter"
  _gok=$_gx
  if ! { echo "${_u:+($_u) && }${_gx:+$_gx && }$_own" > "$_ff"; } 2>/dev/null; then
    _why=$(sed -n 's/^parse_error: //p' "$_ff" 2>/dev/null)
    if [ -n "$_gx" ] && { echo "${_u:+($_u) && }$_own" > "$_ff"; } 2>/dev/null; then
      # Without the guard the kernel takes it: the controller must treat the host's lines as forgeable.
      say "unguarded $ev :: $_why"; _gok=
    else
      # A refused filter leaves the event unfiltered: put the playbook's own back, with the guard
      # if it can (the controller then drops our pids' events itself and counts them).
      if [ -n "$_gx" ] && { echo "${_u:+($_u) && }$_gx" > "$_ff"; } 2>/dev/null; then :
      else
        [ -n "$_gx" ] && say "unguarded $ev :: $_why"; _gok=
        if [ -n "$_u" ]; then { echo "$_u" > "$_ff"; } 2>/dev/null; else { echo 0 > "$_ff"; } 2>/dev/null; fi
      fi
      say "ownfilter $ev :: $_why"
    fi
  fi
  if [ -n "$_gok" ]; then
    # What the guard keeps out goes to a guard instance of this event's own, never read, only counted
    # at the end (entries + overrun per CPU: this event's alone), so that a user cannot hide an exec
    # behind a newline unseen. Named as ours with the deadline QK seconds later: sweeps know it as the
    # run's. The same event, the playbook's filter, the guard turned round (enabled after all of ours:
    # whoever waits for our events to be enabled counts enable files).
    QK=$((QK + 1)); _q="${I%_*}_$((${I##*_} + QK))"
    if ! mkdir "$T/instances/$_q" 2>/dev/null; then
      say "guardcount none :: cannot create instance $_q"
    else
      QIS="$QIS $_q"; echo 8 > "$T/instances/$_q/buffer_size_kb" 2>/dev/null
      if { echo "${_u:+($_u) && }!($_gx)" > "$T/instances/$_q/events/$ev/filter"; } 2>/dev/null; then
        QEV="$QEV $_q:$ev"
      else
        say "guardcount none :: $ev"
      fi
    fi
  fi
done
for ev in $(printf '%s\n' "$PLAN" | sed -n 's/^enable //p'); do
  # { } 2>/dev/null: a failed redirection reports on stderr before a trailing 2>/dev/null applies (dash).
  if { echo 1 > "$T/instances/$I/events/$ev/enable"; } 2>/dev/null; then
    enabled=$((enabled + 1))
  elif [ ! -d "$T/instances/$I/events/$ev" ]; then
    say "enablefail $ev :: no such event"
  else
    say "enablefail $ev"
  fi
done
for _qe in $QEV; do
  { echo 1 > "$T/instances/${_qe%%:*}/events/${_qe#*:}/enable"; } 2>/dev/null || say "guardcount none :: ${_qe#*:}"
done
say "started enabled=$enabled modules=$_mods duration=$DUR triggers=$HIST_PLACED"
# Heartbeats go through the trace buffer (so they never tear a trace line, as a direct write
# could), on an fd opened once: an open per beat is an event for every opensnoop.
# (exec with a failed redirection would end a POSIX shell: check first.)
if [ -w "$T/instances/$I/trace_marker" ]; then exec 5>"$T/instances/$I/trace_marker"; else exec 5>/dev/null; fi
release

# dd, not cat: busybox cat copies with sendfile/splice, which waits for trace data inside the
# kernel holding our stdout pipe, so nothing else (markers, "stopping", "bye") gets out while
# the probes are quiet. dd reads and writes; each read returns whole lines as they come.
kill -CONT "$READER" 2>/dev/null

# ---- run: until the duration ends, "stop"/EOF on stdin, the reader dies, or a signal -----
[ "$enabled" -eq 0 ] && [ -z "$LOADED" ] && [ "$HIST_PLACED" -eq 0 ] && STOP=nothing-placed
while [ -z "$STOP" ]; do
  TICKED=
  # Returns when the timer ends (the duration) or a trapped signal arrives (tick, stop, TERM).
  wait "$TIMER" 2>/dev/null
  [ -n "$STOP" ] && break
  [ -n "$TICKED" ] || { STOP=duration; break; }
  kill -0 "$READER" 2>/dev/null || { STOP=reader-exit; break; }
  # The controller's proof of life: the runner itself still answers.
  echo fpbeat >&5 2>/dev/null
done

# ---- teardown ----------------------------------------------------------------------------
# Disabled first: what we do from here on (date, grep, sed ...) is nobody's event. Triggers keep
# an event live when it is disabled, and their filter names only the processes we had at the
# start: they are paused (builtins only), so teardown's children are in no kernel table either.
echo 0 > "$T/instances/$I/events/enable" 2>/dev/null
while IFS= read -r _hl; do
  [ -n "$_hl" ] && { echo "${_hl#* }" >> "$T/instances/$I/events/${_hl%% *}/trigger"; } 2>/dev/null
done <<EOF_LIVE
$HIST_LIVE
EOF_LIVE
for _q in $QIS; do echo 0 > "$T/instances/$_q/events/enable" 2>/dev/null; done
# A watchdog that is gone has removed (or is removing) our probes: what follows is partial.
kill -0 "$WD" 2>/dev/null || WD_GONE=1
kill "$TIMER" 2>/dev/null
exec 5>&-
sync_marker
# Modules go first, while the kernel log still flows: rmmod prints their totals (hits, missed).
unload_modules "$LOADED"
kmsg_stop
sleep 1      # let the reader drain what is in flight before we stop it
kill "$READER" "$WATCH" 2>/dev/null
# A reader that never got its CONT (we were stopped early) would hold the TERM pending forever.
kill -CONT "$READER" 2>/dev/null
wait "$READER" 2>/dev/null
# Entries the reader had not consumed yet are still in the buffer: print them (without headers).
grep -v '^#' "$T/instances/$I/trace" 2>/dev/null
# The reader is gone: ours is the only writer again.
hold
say "stopping $STOP"
[ -n "$WD_GONE" ] || kill -0 "$WD" 2>/dev/null || WD_GONE=1
[ -n "$WD_GONE" ] && say "watchdog-fired"
snapshot end
if [ "$QK" -gt 0 ]; then
  # "guardcount EVENT N" for each guarded event, then the host's total.
  _gn=0
  for _qe in $QEV; do
    _ge=0
    for _s in "$T/instances/${_qe%%:*}"/per_cpu/cpu*/stats; do
      [ -f "$_s" ] || continue
      while IFS=: read -r _k _v; do
        case $_k in entries|overrun) _ge=$((_ge + ${_v:-0}));; esac
      done < "$_s"
    done
    say "guardcount ${_qe#*:} $_ge"; _gn=$((_gn + _ge))
  done
  say "guardcount $_gn"
fi
release
[ -z "$HIST_NONE" ] && hist_read
hold
for _q in $QIS; do teardown_group "" "$_q"; done
teardown_group "$G" "$I"
unload_modules "$LOADED"
remove_module_dirs "$G"    # copied modules that never reached insmod
left=
[ -d "$T/instances/$I" ] && left="$left instance"
for _q in $QIS; do [ -d "$T/instances/$_q" ] && left="$left guard-instance"; done
grep -q ":$G/" "$T/kprobe_events" "$T/uprobe_events" 2>/dev/null && left="$left events"
for m in $LOADED; do grep -q "^$m " /proc/modules && left="$left module:$m"; done
kill "$WD" 2>/dev/null
if [ -z "$left" ]; then say "clean"; else say "unclean$left"; fi
say "bye"
release
exit 0
