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

T=; G=; I=; DUR=10; DEADLINE=0; GRACE=60; BUF=; MODS=; PLAN=; RUN=; KREAD=

# Stop every process that still holds files of instance dir $1 open (a dead runner's reader):
# an open trace_pipe keeps the instance busy and rmdir fails with EBUSY.
kill_readers() {
  for _fd in /proc/[0-9]*/fd/*; do
    case $(readlink "$_fd" 2>/dev/null) in
      "$1"/*) _p=${_fd#/proc/}; kill -TERM "${_p%%/*}" 2>/dev/null;;
    esac
  done
}

# ---- hist triggers: in-kernel aggregation (fleetprobe/hist.py plans them) ----------------------
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
      # keeps this shell, the SSH server process serving it and the watchdog out of the tables.
      _hf="common_pid != $$ && common_pid != $PPID && common_pid != ${WD:-0}"
      case $_ht in
        *" if "*) _hw="${_ht%% if *} if (${_ht#* if }) && $_hf";;
        *) _hw="$_ht if $_hf";;
      esac
      if [ ! -d "$T/instances/$I/events/$_he" ]; then
        say "trigfail $_he $_ht :: no such event"
      elif ! _hx=$( { echo "$_hw" >> "$T/instances/$I/events/$_he/trigger"; } 2>&1 ); then
        say "trigfail $_he $_ht :: ${_hx##*: } $(tail -n 2 "$T/error_log" 2>/dev/null | tr -s ' \n' '  ')"
      else
        HIST_PLACED=$((HIST_PLACED + 1))
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

# Disable, delete and remove everything of group $1 / instance $2 (either may be empty).
# Order matters: an enabled event cannot be deleted (EBUSY); a deleted event leaves the instance.
teardown_group() {
  _g=$1; _i=$2
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

# The kernel log, for modules: every record after this run's start record, written into the
# instance's trace_marker as "fpk <record>" (one write(2) per record, so it travels through the
# ring buffer and trace_pipe whole; a second writer on our stdout could tear trace lines).
# Records of other runs and ordinary kernel messages are reduced to their header
# "prio,seq,usec,flags;": the controller still sees every sequence number, so a gap means
# records the kernel overwrote before we read them (Documentation/ABI/testing/dev-kmsg).
# The shell's read builtin reads a pipe byte by byte, so records never wait in a buffer
# (mawk would hold them until 4 KiB arrived).
kmsg_cat() {
  trap - PIPE    # die when the reader is gone (the runner ignores SIGPIPE for itself)
  _n=0
  # read(2) fails with EPIPE when the ring overwrote unread records: reopen, which replays
  # from the oldest record (kmsg_read skips sequence numbers it has seen).
  while [ $_n -lt 30 ]; do
    cat /dev/kmsg 2>/dev/null
    [ $? -gt 128 ] && exit 0
    _n=$((_n + 1)); sleep 1
  done
}
kmsg_read() {
  _on=; _last=-1
  # printk_devkmsg=off drops writes to /dev/kmsg (our start record): forward from the oldest.
  [ "$(cat /proc/sys/kernel/printk_devkmsg 2>/dev/null)" = off ] && _on=1
  exec 4>"$T/instances/$I/trace_marker" || exit 1
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
      "$KRUN"*) printf 'fpk %s\n' "$_l" >&4;;
      *) printf 'fpk %s;\n' "$_h" >&4;;
    esac
    case $_t in "$KRUN"'probe=- ev=end inst='"$I") exit 0;; esac
  done
}
kmsg_clock() {
  echo "${KRUN}probe=- ev=clock inst=$I realtime=$(rt)" > /dev/kmsg 2>/dev/null
}
kmsg_start() {
  kmsg_clock
  kmsg_cat | kmsg_read &
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
  echo "${KRUN}probe=- ev=bye inst=$I" > /dev/kmsg 2>/dev/null
  # busybox waits for the whole pipeline, cat included: only after the record above woke it.
  wait "$KREAD" 2>/dev/null
  KREAD=
}

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

# The watchdog outlives this process if it is killed; it exits by itself once the instance
# is gone (normal teardown), and otherwise removes everything at DEADLINE + GRACE.
watchdog() {
  trap '' HUP INT PIPE
  _seen=
  while :; do
    sleep 2
    if [ -d "$T/instances/$I" ]; then _seen=1; elif [ -n "$_seen" ]; then exit 0; fi
    # A runner tearing down by itself (reading its hist tables, then removing them) gets a minute more.
    _wl=$((DEADLINE + GRACE)); [ -e "/tmp/${G}_teardown" ] && _wl=$((_wl + 60))
    if [ "$(now)" -ge "$_wl" ]; then
      unload_modules "$MODS"; teardown_group "$G" "$I"; rm -f /tmp/"$G"_*.ko "/tmp/${G}_teardown"
      echo "fleetprobe watchdog removed $G $I $MODS" > /dev/kmsg 2>/dev/null
      exit 0
    fi
  done
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
    secret) case $2 in ''|*[!0-9a-f]*) say "error secret must be hex"; exit 2;; esac; CP="@@fp:$2 ";;
    tracefs) T=$2;; group) G=$2;; instance) I=$2;; duration) DUR=$2;; deadline) DEADLINE=$2;;
    grace) GRACE=$2;; buffer_kb) BUF=$2;;
    def|filter|enable|module|synth|trigger|histread|notrace_self) PLAN="${PLAN:+$PLAN
}$line";;
    sweep) sweep; say "sweep done"; exit 0;;
    # The controller's own teardown of a run whose runner died (killed by an oops, say).
    teardown)
      case $G in fp_*) ;; *) say "error group must start with fp_"; exit 2;; esac
      RUN=${G#fp_}; RUN=${RUN%_*}; shift
      # Modules first: unloading prints their totals, and stops their handlers before anything else goes.
      unload_modules "$*"
      kill_readers "$T/instances/$I"; teardown_group "$G" "$I"
      rm -f /tmp/"$G"_*.ko "/tmp/${G}_teardown"
      # A kernel-log record wakes a forwarder's cat blocked in read(2): it meets its dead reader and exits.
      [ -n "$*" ] && echo "fleetprobe run=$RUN probe=- ev=bye inst=$I" > /dev/kmsg 2>/dev/null
      _left=
      for _m in $*; do grep -q "^$_m " /proc/modules 2>/dev/null && _left="$_left module:$_m"; done
      if [ -d "$T/instances/$I" ] || grep -q ":$G/" "$T/kprobe_events" "$T/uprobe_events" 2>/dev/null; then
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
      if err=$(echo "$d" 2>&1 >> "$T/$f"); then
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
        if out=$(insmod "$mp" "$@" 2>&1); then LOADED="$LOADED $mn"; say "loaded $mn"
        else say "modfail $mn :: $(echo $out)"; fi
        hold
      fi
      rm -f "$mp";;
    synth|trigger|notrace_self) hist_place "$kind" "$rest";;
    filter)
      ev=${rest%% *}; ex=${rest#* }
      # The kernel explains a refused filter in the filter file itself ("parse_error: Field not found"),
      # not in error_log (checked on 6.18): error_log's tail would name an unrelated older error.
      if [ ! -d "$T/instances/$I/events/$ev" ]; then
        say "filterfail $ev :: no such event"
      elif ! { echo "$ex" > "$T/instances/$I/events/$ev/filter"; } 2>/dev/null; then
        say "filterfail $ev :: $(sed -n 's/^parse_error: //p' "$T/instances/$I/events/$ev/filter" 2>/dev/null)"
      fi;;
  esac
done <<EOF_PLAN
$PLAN
EOF_PLAN

snapshot start
# The marker and the first events wait in the ring buffer for the reader, started below.
sync_marker
enabled=0
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
say "started enabled=$enabled modules=$(echo $LOADED) duration=$DUR triggers=$HIST_PLACED"
release

# dd, not cat: busybox cat copies with sendfile/splice, which waits for trace data inside the
# kernel holding our stdout pipe, so nothing else (markers, "stopping", "bye") gets out while
# the probes are quiet. dd reads and writes; each read returns whole lines as they come.
dd if="$T/instances/$I/trace_pipe" bs=65536 2>/dev/null &
READER=$!

# ---- run: until the duration ends, "stop"/EOF on stdin, the reader dies, or a signal -----
( while IFS= read -r cmd; do [ "$cmd" = stop ] && break; done; kill -USR1 $$ 2>/dev/null ) <&3 &
WATCH=$!
END=$(( $(now) + ${DUR%.*} ))
[ "$enabled" -eq 0 ] && [ -z "$LOADED" ] && [ "$HIST_PLACED" -eq 0 ] && STOP=nothing-placed
TICK=0
while [ -z "$STOP" ]; do
  kill -0 "$READER" 2>/dev/null || { STOP=reader-exit; break; }
  [ "$(now)" -ge "$END" ] && { STOP=duration; break; }
  # Every 5 s a clock marker: more points for the clock fit, and the controller's proof of life
  # (through the trace buffer, so it can never tear a trace line as a direct write could).
  TICK=$((TICK + 1)); [ $((TICK % 5)) -eq 0 ] && sync_marker
  sleep 1 &
  wait $! 2>/dev/null
done

# ---- teardown ----------------------------------------------------------------------------
: > "/tmp/${G}_teardown" 2>/dev/null
sync_marker
echo 0 > "$T/instances/$I/events/enable" 2>/dev/null
# Modules go first, while the kernel log still flows: rmmod prints their totals (hits, missed).
unload_modules "$LOADED"
kmsg_stop
sleep 1      # let the reader drain what is in flight before we stop it
kill "$READER" "$WATCH" 2>/dev/null
wait "$READER" 2>/dev/null
# Entries the reader had not consumed yet are still in the buffer: print them (without headers).
grep -v '^#' "$T/instances/$I/trace" 2>/dev/null
# The reader is gone: ours is the only writer again.
hold
say "stopping $STOP"
snapshot end
release
[ -z "$HIST_NONE" ] && hist_read
hold
teardown_group "$G" "$I"
unload_modules "$LOADED"
rm -f /tmp/"$G"_*.ko "/tmp/${G}_teardown"    # copied modules that never reached insmod
left=
[ -d "$T/instances/$I" ] && left="$left instance"
grep -q ":$G/" "$T/kprobe_events" "$T/uprobe_events" 2>/dev/null && left="$left events"
for m in $LOADED; do grep -q "^$m " /proc/modules && left="$left module:$m"; done
kill "$WD" 2>/dev/null
if [ -z "$left" ]; then say "clean"; else say "unclean$left"; fi
say "bye"
release
exit 0
