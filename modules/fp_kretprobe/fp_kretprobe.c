// SPDX-License-Identifier: GPL-2.0
/*
 * fp_kretprobe: one kretprobe, printing each call's return value and latency.
 *
 * The entry handler stores a ktime in the per-instance data (ri->data, sized
 * by .data_size) and the return handler prints the difference, so latency is
 * measured per call even when calls nest or run on several CPUs at once.
 * When more calls are in flight than maxactive allows, the kernel counts them
 * in nmissed instead of calling us; the final "unregistered" line reports it.
 *
 * The symbol is a parameter; when empty the first of kernel_clone (5.10+),
 * _do_fork (4.2-5.9) and do_fork (older) that registers is used.  Lines use
 * the same format as fp_kprobe (README.md).
 */
#include <linux/atomic.h>
#include <linux/jiffies.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/ptrace.h>
#include <linux/sched.h>
#include <linux/smp.h>
#include <linux/string.h>

static char *run = "";
module_param(run, charp, 0444);
MODULE_PARM_DESC(run, "run id printed in every line (letters, digits, _ . - only)");

static char *probe = "fp_kretprobe";
module_param(probe, charp, 0444);
MODULE_PARM_DESC(probe, "probe name printed in every line (letters, digits, _ . - only)");

static char *symbol = "";
module_param(symbol, charp, 0444);
MODULE_PARM_DESC(symbol, "function to probe; empty: first of kernel_clone, _do_fork, do_fork");

static int maxactive;
module_param(maxactive, int, 0444);
MODULE_PARM_DESC(maxactive, "calls tracked at once; 0: the kernel's default (about 2 x CPUs)");

static unsigned int rate = 100;
module_param(rate, uint, 0444);
MODULE_PARM_DESC(rate, "at most this many lines per second; the rest are counted as suppressed (0: no limit)");

/* The fork symbol moved: do_fork -> _do_fork (4.2) -> kernel_clone (5.10). */
static const char *const fork_symbols[] = { "kernel_clone", "_do_fork", "do_fork" };

/* Per-call data the kernel keeps for us between entry and return. */
struct fp_call {
	u64 entry_ns;
};

static struct kretprobe krp;
static const char *probed_symbol;

static atomic_long_t hits = ATOMIC_LONG_INIT(0);
static atomic_long_t printed = ATOMIC_LONG_INIT(0);
static atomic_long_t suppressed_total = ATOMIC_LONG_INIT(0);
static atomic_long_t window = ATOMIC_LONG_INIT(0);
static atomic_t window_lines = ATOMIC_INIT(0);
static atomic_long_t window_suppressed = ATOMIC_LONG_INIT(0);

/* Lock-free per-second budget (same scheme as fp_kprobe). */
static bool fp_may_print(void)
{
	unsigned long now = jiffies / HZ;
	unsigned long seen = atomic_long_read(&window);

	if (seen != now && atomic_long_cmpxchg(&window, seen, now) == seen) {
		long lost = atomic_long_xchg(&window_suppressed, 0);

		atomic_set(&window_lines, 0);
		if (lost > 0)
			printk(KERN_INFO "fleetprobe run=%s probe=%s ev=suppressed count=%ld\n",
			       run, probe, lost);
	}
	if (rate == 0 || atomic_inc_return(&window_lines) <= rate) {
		atomic_long_inc(&printed);
		return true;
	}
	atomic_long_inc(&window_suppressed);
	atomic_long_inc(&suppressed_total);
	return false;
}

/* Function entry: remember when. Returning 0 asks for the return handler. */
static int entry_handler(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct fp_call *call = (struct fp_call *)ri->data;

	call->entry_ns = ktime_get_ns();
	return 0;
}

/* Function return: print the return value and how long the call took; comm last (may hold spaces). */
static int return_handler(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct fp_call *call = (struct fp_call *)ri->data;
	u64 lat = ktime_get_ns() - call->entry_ns;
	unsigned long retval = regs_return_value(regs);

	atomic_long_inc(&hits);
	if (fp_may_print())
		printk(KERN_INFO "fleetprobe run=%s probe=%s ev=ret sym=%s cpu=%d pid=%d tgid=%d retval=0x%lx lat_ns=%llu comm=%s\n",
		       run, probe, probed_symbol, raw_smp_processor_id(),
		       task_pid_nr(current), task_tgid_nr(current), retval,
		       (unsigned long long)lat, current->comm);
	return 0;
}

/* run and probe end up as key=value tokens: refuse anything that would break the line. */
static bool fp_valid_name(const char *s)
{
	if (!*s)
		return false;
	for (; *s; s++) {
		char c = *s;

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-'))
			return false;
	}
	return true;
}

/* Register krp on one symbol; krp is cleared first because a failed attempt leaves state in it. */
static int fp_register(const char *sym)
{
	memset(&krp, 0, sizeof(krp));
	krp.kp.symbol_name = sym;
	krp.entry_handler = entry_handler;
	krp.handler = return_handler;
	krp.data_size = sizeof(struct fp_call);
	krp.maxactive = maxactive;
	probed_symbol = sym;
	return register_kretprobe(&krp);
}

static int __init fp_kretprobe_init(void)
{
	int ret = -ENOENT;
	size_t i;

	if (!fp_valid_name(run) || !fp_valid_name(probe)) {
		/* Do not echo the bad values: they could forge a line. */
		printk(KERN_ERR "fleetprobe run=- probe=- ev=failed err=%d reason=bad-run-or-probe-name\n",
		       -EINVAL);
		return -EINVAL;
	}
	if (*symbol) {
		ret = fp_register(symbol);
	} else {
		for (i = 0; i < ARRAY_SIZE(fork_symbols); i++) {
			ret = fp_register(fork_symbols[i]);
			if (ret == 0)
				break;
		}
	}
	if (ret < 0) {
		printk(KERN_ERR "fleetprobe run=%s probe=%s ev=failed sym=%s err=%d\n",
		       run, probe, *symbol ? symbol : "kernel_clone|_do_fork|do_fork", ret);
		return ret;
	}
	printk(KERN_INFO "fleetprobe run=%s probe=%s ev=planted sym=%s+0x0 addr=%pS maxactive=%d\n",
	       run, probe, probed_symbol, krp.kp.addr, krp.maxactive);
	return 0;
}

static void __exit fp_kretprobe_exit(void)
{
	unregister_kretprobe(&krp);
	printk(KERN_INFO "fleetprobe run=%s probe=%s ev=unregistered sym=%s+0x0 hits=%ld printed=%ld suppressed=%ld missed=%lu\n",
	       run, probe, probed_symbol, atomic_long_read(&hits),
	       atomic_long_read(&printed), atomic_long_read(&suppressed_total),
	       (unsigned long)krp.nmissed);
}

module_init(fp_kretprobe_init);
module_exit(fp_kretprobe_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("fleetprobe: one kretprobe printing return value and latency as machine-readable kernel log lines");
