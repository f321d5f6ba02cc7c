# A dead run that used in-kernel aggregation, left behind by hand: its instance (deadline long past),
# kprobe group, synthetic event, and triggers that depend on each other (onmatch uses $fpts_x).
T=/sys/kernel/tracing
G=fp_zz9stale_abcd; I=$T/instances/${G}_1000000000
mkdir $I
echo "p:$G/st user_statfs path=+0(%di):ustring" >> $T/kprobe_events
echo "r:$G/st_ret user_statfs" >> $T/kprobe_events
echo "${G}_st_ret u64 lat; int pid" >> $T/synthetic_events
echo 'hist:keys=path:vals=hitcount' >> $I/events/$G/st/trigger
echo 'hist:keys=common_pid:fpts_x=common_timestamp' >> $I/events/$G/st/trigger
echo "hist:keys=common_pid:fplat_x=common_timestamp-\$fpts_x:onmatch($G.st).trace(${G}_st_ret,\$fplat_x,common_pid)" >> $I/events/$G/st_ret/trigger
echo 'hist:keys=lat.log2' >> $I/events/synthetic/${G}_st_ret/trigger
echo 'hist:keys=common_pid.execname' >> $I/events/syscalls/sys_enter_statfs/trigger
grep -v '^#' $I/events/*/*/trigger | wc -l; cat $T/synthetic_events
