# fleetprobe list: the names this host can probe that match a pattern (fleetprobe.discover).
# POSIX sh, busybox-compatible; changes nothing. Arguments: WHAT FUNCRE TPRE [BINARY]
#   WHAT: letters: f kernel functions, t tracepoints, d tracepoint fields, x the binary's identity
#   FUNCRE, TPRE: extended regular expressions (grep -E, anchored by the controller) that a
#   function name, and a tracepoint's "group:event", must match.
# Output: sections "@@name"; a section's first line is "ok" or "!why it is empty".
what=$1; fre=$2; tre=$3; bin=$4
sec() { printf '@@%s\n' "$1"; }
# The read error of a file (a tracefs file may exist and refuse reading: EPERM under lockdown).
readable() { head -c 1 "$1" >/dev/null 2>&1; }
# head's message is "head: cannot open 'F' for reading: Operation not permitted" (busybox: "head: F: ..."): the reason is its last part.
why() { printf '!cannot read %s: %s\n' "$1" "$(head -c 1 "$1" 2>&1 >/dev/null | head -n 1 | sed 's/.*: //')"; }
T=
for d in /sys/kernel/tracing /sys/kernel/debug/tracing; do
  if [ -e "$d/README" ]; then T=$d; break; fi
done
sec tracefs; echo "$T"
[ -n "$T" ] && [ -e "$T/kprobe_events" ] && echo "kprobe_events"
[ -n "$T" ] && [ -e "$T/uprobe_events" ] && echo "uprobe_events"
case $what in *f*)
  sec functions
  f=$T/available_filter_functions
  if [ -z "$T" ]; then echo "!no tracefs mounted"
  elif [ ! -e "$f" ]; then echo "!no $f (a kernel without CONFIG_DYNAMIC_FTRACE)"
  elif ! readable "$f"; then why "$f"
  else
    echo ok
    # "name" or "name [module]": the module goes too; duplicates (static functions) are merged later.
    cut -d' ' -f1 < "$f" | grep -E -- "$fre"
  fi;;
esac
case $what in *t*)
  sec tracepoints
  f=$T/available_events
  if [ -z "$T" ]; then echo "!no tracefs mounted"
  elif ! readable "$f"; then why "$f"
  else
    echo ok
    grep -E -- "$tre" "$f"
  fi;;
esac
case $what in *d*)
  sec fields
  echo ok
  if [ -n "$T" ]; then
    # At most 200 tracepoints' fields (the controller asks only for a few); common_ fields are in all.
    grep -E -- "$tre" "$T/available_events" 2>/dev/null | head -n 200 | while IFS=: read -r g e; do
      case $g$e in *[!A-Za-z0-9_]*|'') continue;; esac
      sed -n "s|^[ 	]*field:\([^;]*\);.*|$g:$e \1|p" "$T/events/$g/$e/format" 2>/dev/null | grep -v ' common_'
    done
  fi;;
esac
case $what in *x*)
  sec binary
  if [ -f "$bin" ] && [ -r "$bin" ]; then
    echo "ok $(wc -c < "$bin" | tr -d ' ') $(md5sum < "$bin" | cut -d' ' -f1)"
  elif [ -e "$bin" ]; then
    echo "!$bin is not a readable file"
  else
    echo "!$bin does not exist"
  fi;;
esac
sec end
