"""Syscall tracepoints a 64-bit MIPS kernel binds to another ABI (the n32 one): n64 callers never show.

The kernel's syscall tracer keeps one syscall number per SYSCALL_DEFINE function
(``syscall_metadata.syscall_nr``): ``init_ftrace_syscalls`` walks every number below
NR_syscalls in order and lets the last one that maps to the function win.  A MIPS64
kernel numbers its three ABIs o32 4000+, n64 5000+ and n32 6000+, and with
CONFIG_MIPS32_N32 a function that serves both n64 and n32 (``sys_kill``) ends up
with its n32 number.  Enabling ``syscalls/sys_enter_kill`` then sets only that bit,
and a kill(2) from an n64 process (every program of a mips64el Debian) is never
traced.  A function n32 reaches through a compat wrapper (``statfs`` ->
``compat_sys_statfs``) keeps its n64 number and traces n64 callers.

Seen on the lab's mips64el guest (Debian 6.1, 5kc-malta): sys_enter_kill, sys_enter_setuid and
sys_enter_clock_nanosleep silent under kill, setuidgid and sleep; sys_enter_statfs exact.  x86_64, ppc64 and arm64 trace their compat
syscalls through separate tables outside NR_syscalls, so only MIPS64 is affected.

The names are the ``sys_*`` entry points of Linux's
arch/mips/kernel/syscalls/syscall_n32.tbl (numbers 0-439, faccessat2), without ``sys_``:
the events those functions define.  Syscalls added later are not listed (a newer
syscall shared by n32 and n64 would go unsaid, as before).
"""

from __future__ import annotations

from fleetprobe.facts import Facts

#: A symbol only a MIPS64 kernel with the n32 ABI has (its rt_sigreturn): the facts stage checks it.
N32_MARKER = "sysn32_rt_sigreturn"

#: Syscalls whose n32 entry point is the n64 one (``sys_<name>``).
N32_SHARED: frozenset[str] = frozenset((
    "32_personality", "accept", "accept4", "access", "acct", "add_key", "adjtimex_time32", "alarm", "bind",
    "bpf", "brk", "cachectl", "cacheflush", "capget", "capset", "chdir", "chmod", "chown", "chroot",
    "clock_adjtime", "clock_adjtime32", "clock_getres", "clock_getres_time32", "clock_gettime",
    "clock_gettime32", "clock_nanosleep", "clock_nanosleep_time32", "clock_settime", "clock_settime32",
    "close", "close_range", "connect", "copy_file_range", "creat", "delete_module", "dup", "dup2", "dup3",
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "eventfd", "eventfd2", "exit",
    "exit_group", "faccessat", "faccessat2", "fadvise64_64", "fallocate", "fanotify_init", "fanotify_mark",
    "fchdir", "fchmod", "fchmodat", "fchown", "fchownat", "fdatasync", "fgetxattr", "finit_module",
    "flistxattr", "flock", "fremovexattr", "fsconfig", "fsetxattr", "fsmount", "fsopen", "fspick", "fsync",
    "ftruncate", "futex", "futex_time32", "futimesat_time32", "getcpu", "getcwd", "getdents64", "getegid",
    "geteuid", "getgid", "getgroups", "getpeername", "getpgid", "getpgrp", "getpid", "getppid",
    "getpriority", "getrandom", "getresgid", "getresuid", "getsid", "getsockname", "getsockopt", "gettid",
    "getuid", "getxattr", "init_module", "inotify_add_watch", "inotify_init", "inotify_init1",
    "inotify_rm_watch", "io_cancel", "io_destroy", "io_getevents_time32", "io_pgetevents",
    "io_uring_enter", "io_uring_register", "io_uring_setup", "ioprio_get", "ioprio_set", "kcmp", "kill",
    "lchown", "lgetxattr", "link", "linkat", "listen", "listxattr", "llistxattr", "lookup_dcookie",
    "lremovexattr", "lseek", "lsetxattr", "madvise", "membarrier", "memfd_create", "mincore", "mips_mmap",
    "mkdir", "mkdirat", "mknod", "mknodat", "mlock", "mlock2", "mlockall", "mount", "move_mount",
    "mprotect", "mq_timedreceive", "mq_timedreceive_time32", "mq_timedsend", "mq_timedsend_time32",
    "mq_unlink", "mremap", "msgget", "msync", "munlock", "munlockall", "munmap", "name_to_handle_at",
    "nanosleep_time32", "newfstat", "newfstatat", "newlstat", "newstat", "newuname", "open",
    "open_by_handle_at", "open_tree", "openat", "openat2", "pause", "perf_event_open", "pidfd_getfd",
    "pidfd_open", "pidfd_send_signal", "pipe2", "pivot_root", "pkey_alloc", "pkey_free", "pkey_mprotect",
    "poll", "prctl", "pread64", "prlimit64", "pwrite64", "quotactl", "read", "readahead", "readlink",
    "readlinkat", "reboot", "remap_file_pages", "removexattr", "rename", "renameat", "renameat2",
    "request_key", "restart_syscall", "rmdir", "rseq", "sched_get_priority_max", "sched_get_priority_min",
    "sched_getattr", "sched_getparam", "sched_getscheduler", "sched_rr_get_interval",
    "sched_rr_get_interval_time32", "sched_setattr", "sched_setparam", "sched_setscheduler", "sched_yield",
    "seccomp", "semget", "semop", "semtimedop", "semtimedop_time32", "sendfile64", "sendto",
    "set_thread_area", "set_tid_address", "setdomainname", "setfsgid", "setfsuid", "setgid", "setgroups",
    "sethostname", "setns", "setpgid", "setpriority", "setregid", "setresgid", "setresuid", "setreuid",
    "setsid", "setsockopt", "setuid", "setxattr", "shmat", "shmdt", "shmget", "shutdown", "socket",
    "socketpair", "splice", "statx", "swapoff", "swapon", "symlink", "symlinkat", "sync",
    "sync_file_range", "syncfs", "sysfs", "syslog", "tee", "tgkill", "timer_delete", "timer_getoverrun",
    "timer_gettime", "timer_gettime32", "timer_settime", "timer_settime32", "timerfd_create",
    "timerfd_gettime", "timerfd_gettime32", "timerfd_settime", "timerfd_settime32", "tkill", "truncate",
    "umask", "umount", "unlink", "unlinkat", "unshare", "userfaultfd", "utime32", "utimensat",
    "utimensat_time32", "utimes_time32", "vhangup", "write",
))


def n64_blind(facts: Facts, tracepoint: str) -> str | None:
    """Why ``tracepoint`` cannot see n64 processes on this host, or None when it can (or is not a syscall)."""
    group, _, event = tracepoint.partition("/")
    if group != "syscalls" or not facts.arch.startswith("mips64"):
        return None
    name = event.removeprefix("sys_enter_").removeprefix("sys_exit_")
    marker = facts.symbols.get(N32_MARKER)
    if name not in N32_SHARED or marker is None or not (marker.in_filter_functions or marker.in_kallsyms):
        return None
    return (f"{tracepoint} cannot see 64-bit (n64) processes on this MIPS64 kernel: sys_{name} serves the n64 "
            "and n32 ABIs, and the kernel's syscall tracer binds the event to its n32 number only "
            "(fleetprobe.syscall_abi)")
