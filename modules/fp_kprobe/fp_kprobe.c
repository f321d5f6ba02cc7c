// SPDX-License-Identifier: GPL-2.0
/*
 * fp_kprobe: one kprobe, printing the registers the probed CPU was in.
 *
 * The seed's do_fork example, modernised for kernels 4.x to current:
 *  - the symbol is a parameter; when empty the first of kernel_clone (5.10+),
 *    _do_fork (4.2-5.9) and do_fork (< 4.2, some arches until 5.9) that
 *    registers is used;
 *  - fault_handler is only set before 5.14 (the field was removed in 5.14);
 *  - every line is one machine-readable record naming the run and probe, so
 *    the collector can pick it out of a busy /dev/kmsg (format: README.md);
 *  - lines are rate-limited per second; suppressed lines are counted, reported
 *    when the next second starts and in the final "unregistered" line.
 */
#include <linux/atomic.h>
#include <linux/jiffies.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/ptrace.h>
#include <linux/sched.h>
#include <linux/smp.h>
#include <linux/string.h>
#include <linux/version.h>

static char *run = "";
module_param(run, charp, 0444);
MODULE_PARM_DESC(run, "run id printed in every line (letters, digits, _ . - only)");

static char *probe = "fp_kprobe";
module_param(probe, charp, 0444);
MODULE_PARM_DESC(probe, "probe name printed in every line (letters, digits, _ . - only)");

static char *symbol = "";
module_param(symbol, charp, 0444);
MODULE_PARM_DESC(symbol, "function to probe; empty: first of kernel_clone, _do_fork, do_fork");

static unsigned int offset;
module_param(offset, uint, 0444);
MODULE_PARM_DESC(offset, "byte offset into the function (must be an instruction boundary)");

static bool post = true;
module_param(post, bool, 0444);
MODULE_PARM_DESC(post, "also print from the post handler (a post handler stops kprobe jump optimisation)");

static unsigned int rate = 100;
module_param(rate, uint, 0444);
MODULE_PARM_DESC(rate, "at most this many lines per second; the rest are counted as suppressed (0: no limit)");

/* The fork symbol moved: do_fork -> _do_fork (4.2) -> kernel_clone (5.10). */
static const char *const fork_symbols[] = { "kernel_clone", "_do_fork", "do_fork" };

static struct kprobe kp;
static const char *probed_symbol;

static atomic_long_t hits = ATOMIC_LONG_INIT(0);
static atomic_long_t printed = ATOMIC_LONG_INIT(0);
static atomic_long_t suppressed_total = ATOMIC_LONG_INIT(0);
static atomic_long_t window = ATOMIC_LONG_INIT(0);
static atomic_t window_lines = ATOMIC_INIT(0);
static atomic_long_t window_suppressed = ATOMIC_LONG_INIT(0);

/*
 * Lock-free per-second budget: handlers run with preemption (sometimes
 * interrupts) disabled, so no sleeping locks.  The CPU that moves the window
 * forward reports what the previous second suppressed.
 */
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

/*
 * One event line.  comm is always last and runs to the end of the line
 * because a task name may contain spaces.
 */
static void fp_print(const char *ev, struct pt_regs *regs)
{
#if defined(CONFIG_X86)
	printk(KERN_INFO "fleetprobe run=%s probe=%s ev=%s sym=%s+0x%x cpu=%d pid=%d tgid=%d ip=0x%lx flags=0x%lx comm=%s\n",
	       run, probe, ev, probed_symbol, offset, raw_smp_processor_id(),
	       task_pid_nr(current), task_tgid_nr(current),
	       (unsigned long)regs->ip, (unsigned long)regs->flags, current->comm);
#elif defined(CONFIG_PPC)
	printk(KERN_INFO "fleetprobe run=%s probe=%s ev=%s sym=%s+0x%x cpu=%d pid=%d tgid=%d nip=0x%lx msr=0x%lx comm=%s\n",
	       run, probe, ev, probed_symbol, offset, raw_smp_processor_id(),
	       task_pid_nr(current), task_tgid_nr(current),
	       (unsigned long)regs->nip, (unsigned long)regs->msr, current->comm);
#elif defined(CONFIG_MIPS)
	printk(KERN_INFO "fleetprobe run=%s probe=%s ev=%s sym=%s+0x%x cpu=%d pid=%d tgid=%d cp0_epc=0x%lx cp0_status=0x%lx comm=%s\n",
	       run, probe, ev, probed_symbol, offset, raw_smp_processor_id(),
	       task_pid_nr(current), task_tgid_nr(current),
	       (unsigned long)regs->cp0_epc, (unsigned long)regs->cp0_status, current->comm);
#elif defined(CONFIG_ARM64)
	printk(KERN_INFO "fleetprobe run=%s probe=%s ev=%s sym=%s+0x%x cpu=%d pid=%d tgid=%d pc=0x%llx pstate=0x%llx comm=%s\n",
	       run, probe, ev, probed_symbol, offset, raw_smp_processor_id(),
	       task_pid_nr(current), task_tgid_nr(current),
	       (unsigned long long)regs->pc, (unsigned long long)regs->pstate, current->comm);
#else
	printk(KERN_INFO "fleetprobe run=%s probe=%s ev=%s sym=%s+0x%x cpu=%d pid=%d tgid=%d ip=0x%lx comm=%s\n",
	       run, probe, ev, probed_symbol, offset, raw_smp_processor_id(),
	       task_pid_nr(current), task_tgid_nr(current),
	       (unsigned long)instruction_pointer(regs), current->comm);
#endif
}

/* Called just before the probed instruction runs. */
static int handler_pre(struct kprobe *p, struct pt_regs *regs)
{
	atomic_long_inc(&hits);
	if (fp_may_print())
		fp_print("pre", regs);
	return 0;
}

/* Called after the probed instruction was single-stepped. */
static void handler_post(struct kprobe *p, struct pt_regs *regs, unsigned long flags)
{
	if (fp_may_print())
		fp_print("post", regs);
}

#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 14, 0)
/* Removed in 5.14 (commit ec6aba3d2be1); we never handle the fault, only count it. */
static int handler_fault(struct kprobe *p, struct pt_regs *regs, int trapnr)
{
	if (fp_may_print())
		printk(KERN_INFO "fleetprobe run=%s probe=%s ev=fault sym=%s+0x%x trap=%d\n",
		       run, probe, probed_symbol, offset, trapnr);
	return 0;
}
#endif

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

/* Register kp on one symbol; kp is cleared first because a failed attempt leaves state in it. */
static int fp_register(const char *sym)
{
	memset(&kp, 0, sizeof(kp));
	kp.symbol_name = sym;
	kp.offset = offset;
	kp.pre_handler = handler_pre;
	if (post)
		kp.post_handler = handler_post;
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 14, 0)
	kp.fault_handler = handler_fault;
#endif
	probed_symbol = sym;
	return register_kprobe(&kp);
}

static int __init fp_kprobe_init(void)
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
		printk(KERN_ERR "fleetprobe run=%s probe=%s ev=failed sym=%s+0x%x err=%d\n",
		       run, probe, *symbol ? symbol : "kernel_clone|_do_fork|do_fork", offset, ret);
		return ret;
	}
	printk(KERN_INFO "fleetprobe run=%s probe=%s ev=planted sym=%s+0x%x addr=%pS\n",
	       run, probe, probed_symbol, offset, kp.addr);
	return 0;
}

static void __exit fp_kprobe_exit(void)
{
	unregister_kprobe(&kp);
	printk(KERN_INFO "fleetprobe run=%s probe=%s ev=unregistered sym=%s+0x%x hits=%ld printed=%ld suppressed=%ld missed=%lu\n",
	       run, probe, probed_symbol, offset, atomic_long_read(&hits),
	       atomic_long_read(&printed), atomic_long_read(&suppressed_total),
	       (unsigned long)kp.nmissed);
}

module_init(fp_kprobe_init);
module_exit(fp_kprobe_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("fleetprobe: one kprobe printing per-arch registers as machine-readable kernel log lines");
