/*
 * ondeck-launch: start one attempt's program in its own PID namespace, under
 * resource limits, with a single exec.
 *
 *   ondeck-launch PARENT MEMORY CPU PROCESSES FILE_SIZE USER KEEP [HIDE...] -- PROGRAM [ARG...]
 *
 * PARENT is the worker's PID: the launcher does not start the program if it
 * finds itself orphaned before it could tie its life to the worker's.
 * Each HIDE directory is covered, for the program only, by an empty read-only
 * tmpfs, except for KEEP (the attempt's workspace), bound back in where it lies
 * in one of them: so the program cannot read ondeck's data directory (the
 * database, the master key) or other runs' workspaces. It also gets a /proc of its own
 * namespace, so it cannot read the worker's memory or environment there.
 * USER is UID:GID to run the program as (the launcher must run as root), or -
 * to run it as the launcher's own user; a root program keeps the capabilities
 * to undo the hiding, another user has none.
 * It does what `setpriv --pdeathsig KILL -- unshare --pid --fork --kill-child
 * [--user --map-current-user] -- prlimit --as --cpu --nproc --fsize --core=0 --`
 * does, without the three extra programs (each costs an exec and a dynamic
 * link, about a millisecond of CPU per run):
 *
 *   - it dies with its parent (the worker), even by SIGKILL;
 *   - the program runs in a new PID namespace, under a first process that
 *     reaps orphans and ends when the program does; so when the program exits,
 *     or when this launcher dies, the kernel kills every process left in
 *     there (the program is not PID 1 itself, which ignores SIGTERM);
 *   - the limits are set before the fork, so the program and all it starts
 *     inherit them;
 *   - in a mount namespace of its own, the HIDE directories but KEEP are
 *     hidden, and /proc shows only the namespace's processes;
 *   - it ignores SIGINT and SIGTERM (the worker signals the program and its
 *     group; the launcher's own death would kill them without a grace period)
 *     and ends the way the program ended: the same exit code, or the same signal.
 *
 * It is built without a C library (-nostdlib, see the Makefile): it makes its system
 * calls itself. A program linked with glibc, even statically, spends its first
 * moments probing the CPU (dozens of CPUID instructions, to tune memcpy), which a
 * virtual machine answers one trap at a time: about half a millisecond of CPU per
 * process, a quarter of all this launcher's cost per run. Hence x86-64 and AArch64
 * only; elsewhere the build fails and runs start through setpriv, unshare and prlimit.
 */
#include <asm/signal.h>
#include <asm/unistd.h>
#include <linux/errno.h>
#include <linux/fcntl.h>
#include <linux/mount.h>
#include <linux/prctl.h>
#include <linux/resource.h>
#include <linux/sched.h>

#define FAIL 125 /* as unshare and env do when they cannot start the program */
#define PATH_MAX 4096
#define NAME_MAX 255

typedef unsigned long long u64;

/* --- system calls: they return -errno on failure, as the kernel does ---------- */

static long syscall6(long n, long a, long b, long c, long d, long e, long f) {
    long ret;
#if defined(__x86_64__)
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    register long x5 __asm__("x5") = f;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5) : "memory");
    ret = x0;
#else
#error "ondeck-launch makes its own system calls: x86-64 and AArch64 only"
#endif
    return ret;
}

#define SYS(n, ...) SYS_(n, __VA_ARGS__, 0, 0, 0, 0, 0, 0)
#define SYS_(n, a, b, c, d, e, f, ...) \
    syscall6(__NR_##n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), (long)(f))

static int err; /* the last failed call's errno, for die() */

/* A call's result; on failure (-errno) it records errno and answers -1. */
static long check(long result) {
    if (result < 0 && result > -4096) {
        err = (int)-result;
        return -1;
    }
    return result;
}

__attribute__((noreturn)) static void exit_now(int code) {
    for (;;) SYS(exit_group, code);
}

/* --- text ---------------------------------------------------------------------- */

static unsigned long length(const char *text) {
    unsigned long n = 0;
    while (text[n]) n++;
    return n;
}

static int same(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

/* Whether `text` starts with the `n` bytes of `prefix`. */
static int starts(const char *text, const char *prefix, unsigned long n) {
    for (unsigned long i = 0; i < n; i++)
        if (text[i] != prefix[i]) return 0;
    return 1;
}

/* Append as much of `text` as fits to the buffer `out` of `size` at `*at` (below `size`);
   false when not all of it did. */
static int put(char *out, unsigned long size, unsigned long *at, const char *text) {
    unsigned long i = 0;
    for (; text[i] && *at + 1 < size; i++) out[(*at)++] = text[i];
    out[*at] = '\0';
    return !text[i];
}

static const char *decimal(u64 value, char buffer[24]) {
    char *end = buffer + 23;
    *end = '\0';
    do *--end = (char)('0' + value % 10); while (value /= 10);
    return end;
}

static const char *error_text(int code) {
    switch (code) {
    case EPERM: return "Operation not permitted";
    case ENOENT: return "No such file or directory";
    case ESRCH: return "No such process";
    case EIO: return "Input/output error";
    case E2BIG: return "Argument list too long";
    case ENOEXEC: return "Exec format error";
    case EBADF: return "Bad file descriptor";
    case ECHILD: return "No child processes";
    case EAGAIN: return "Resource temporarily unavailable";
    case ENOMEM: return "Cannot allocate memory";
    case EACCES: return "Permission denied";
    case EFAULT: return "Bad address";
    case EBUSY: return "Device or resource busy";
    case EEXIST: return "File exists";
    case ENOTDIR: return "Not a directory";
    case EISDIR: return "Is a directory";
    case EINVAL: return "Invalid argument";
    case ENFILE: return "Too many open files in system";
    case EMFILE: return "Too many open files";
    case ETXTBSY: return "Text file busy";
    case ENOSPC: return "No space left on device";
    case EROFS: return "Read-only file system";
    case ENAMETOOLONG: return "File name too long";
    case ELOOP: return "Too many levels of symbolic links";
    case ENOSYS: return "Function not implemented";
    case EUSERS: return "Too many users";
    case EINTR: return "Interrupted system call";
    case ENXIO: return "No such device or address";
    case ENODEV: return "No such device";
    case EOPNOTSUPP: return "Operation not supported";
    case ESTALE: return "Stale file handle";
    case ETIMEDOUT: return "Connection timed out";
    default: return 0;
    }
}

/* "ondeck-launch: " and the parts to stderr, then a newline; a part of over 1000
   bytes (a path, a program's name) cut to that, so that what follows it still shows. */
static void say(const char *a, const char *b, const char *c, const char *d) {
    char line[4 * 1024 + 64];
    unsigned long at = 0;
    const char *parts[] = {"ondeck-launch: ", a, b, c, d};
    for (int i = 0; i < 5; i++) {
        if (!parts[i]) continue;
        unsigned long end = at + 1000 < sizeof line - 8 ? at + 1000 : sizeof line - 8;
        if (!put(line, end + 1, &at, parts[i])) put(line, sizeof line, &at, "...");
    }
    line[at++] = '\n';
    SYS(write, 2, line, at);
}

/* The last error as strerror would tell it ("error N" for one it does not know). */
static const char *last_error(char buffer[32]) {
    const char *text = error_text(err);
    if (text) return text;
    char digits[24];
    unsigned long at = 0;
    put(buffer, 32, &at, "error ");
    put(buffer, 32, &at, decimal((u64)err, digits));
    return buffer;
}

/* "what: the last error" and exit. */
static void die(const char *what) {
    char text[32];
    say(what, ": ", last_error(text), 0);
    exit_now(FAIL);
}

static u64 number(const char *text) {
    u64 value = 0;
    if (!*text) goto bad;
    for (const char *c = text; *c; c++) {
        if (*c < '0' || *c > '9' || value > (~0ULL - (u64)(*c - '0')) / 10) goto bad;
        value = value * 10 + (u64)(*c - '0');
    }
    return value;
bad:
    say("not a number: ", text, 0, 0);
    exit_now(FAIL);
    return 0;
}

/* --- the calls it makes, glibc-style (-1 and err on failure) -------------------- */

static void limit(int resource, u64 value, const char *what) {
    u64 both[2] = {value, value};
    if (check(SYS(prlimit64, 0, resource, both, 0)) < 0) die(what);
}

static void ignore(int sig, int ignored) {
    struct { unsigned long handler, flags, restorer, mask; } action = {ignored ? 1UL : 0UL, 0, 0, 0};
    SYS(rt_sigaction, sig, &action, 0, sizeof action.mask);
}

static int make_directory(const char *path) {
    return (int)check(SYS(mkdirat, AT_FDCWD, path, 0755));
}

static void write_file(const char *path, const char *text) {
    int fd = (int)check(SYS(openat, AT_FDCWD, path, O_WRONLY | O_CLOEXEC));
    if (fd < 0) die(path);
    long n = (long)length(text);
    if (check(SYS(write, fd, text, n)) != n) die(path);
    SYS(close, fd);
}

static int fork_now(void) {
    return (int)check(SYS(clone, SIGCHLD, 0, 0, 0, 0));
}

static int wait_for(int pid, int *status) {
    return (int)check(SYS(wait4, pid, status, 0, 0));
}

static void die_with_parent(void) {
    if (check(SYS(prctl, PR_SET_PDEATHSIG, SIGKILL)) < 0) die("prctl");
}

/* Run `file` as a shell script, as execvp does for one that is no executable format. */
static void exec_script(const char *file, char **argv, char **envp) {
    int count = 0;
    while (argv[count]) count++;
    char *shell[count + 2];
    shell[0] = "/bin/sh";
    shell[1] = (char *)file;
    for (int i = 1; i <= count; i++) shell[i + 1] = argv[i];
    check(SYS(execve, "/bin/sh", shell, envp));
}

/* execvp: `argv[0]` looked up in $PATH unless it names a path; -1 and err if it cannot run. */
static void exec_program(char **argv, char **envp) {
    const char *name = argv[0];
    int slash = 0;
    for (const char *c = name; *c; c++) slash |= *c == '/';
    if (!*name) {
        err = ENOENT;
        return;
    }
    if (slash) {
        if (check(SYS(execve, name, argv, envp)) < 0 && err == ENOEXEC) exec_script(name, argv, envp);
        return;
    }
    if (length(name) > NAME_MAX) {
        err = ENAMETOOLONG;
        return;
    }
    const char *path = "/bin:/usr/bin"; /* glibc's, when PATH is unset */
    for (char **variable = envp; *variable; variable++) {
        if (starts(*variable, "PATH=", 5)) {
            path = *variable + 5; /* the first, as getenv finds */
            break;
        }
    }
    int denied = 0;
    err = ENOENT;
    for (const char *start = path;; start++) {
        const char *end = start;
        while (*end && *end != ':') end++;
        char file[PATH_MAX];
        unsigned long at = 0, n = (unsigned long)(end - start);
        if (n + length(name) + 2 <= sizeof file) {
            for (; at < n; at++) file[at] = start[at];
            if (at) file[at++] = '/'; /* an empty entry is the working directory */
            file[at] = '\0';
            put(file, sizeof file, &at, name);
            if (check(SYS(execve, file, argv, envp)) < 0 && err == ENOEXEC) exec_script(file, argv, envp);
            if (err == EACCES) denied = 1;
            else if (err != ENOENT && err != ENOTDIR && err != ESTALE && err != ENODEV && err != ETIMEDOUT)
                return;
        }
        if (!*end) break;
        start = end;
    }
    if (denied) err = EACCES; /* else the last one's */
}

/* --- the launcher ----------------------------------------------------------------- */

/* Whether absolute path `inner` is `outer` or below it. */
static int inside(const char *inner, const char *outer) {
    unsigned long n = length(outer);
    return starts(inner, outer, n) && (inner[n] == '/' || inner[n] == '\0');
}

/* Make each directory of `path` below `top` (which exists), as mkdir -p would. */
static void make_path(char *path, unsigned long top) {
    if (!path[top]) return; /* `path` is `top` itself */
    for (char *slash = path + top + 1; *slash; slash++) {
        if (*slash != '/') continue;
        *slash = '\0';
        if (make_directory(path) != 0 && err != EEXIST) die(path);
        *slash = '/';
    }
    if (make_directory(path) != 0 && err != EEXIST) die(path);
}

/* In the new mount namespace (called by PID 1 of the new PID namespace, before it
   starts the program): a /proc of this namespace, each of `hide` covered but `keep`. */
static void contain(const char *keep, char **hide, int hidden) {
    char cwd[PATH_MAX], target[PATH_MAX], source[64], digits[24];
    if (check(SYS(getcwd, cwd, sizeof cwd)) < 0) die("getcwd");
    /* Nothing mounted here reaches the host's namespace, nor the other way. */
    if (check(SYS(mount, 0, "/", 0, MS_REC | MS_PRIVATE, 0)) < 0) die("mount --make-rprivate /");
    if (check(SYS(mount, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0)) < 0)
        die("mount /proc");
    int kept = (int)check(SYS(openat, AT_FDCWD, keep, O_PATH | O_DIRECTORY | O_CLOEXEC)); /* before it is covered */
    if (kept < 0) die(keep);
    const char *cover = 0;
    for (int i = 0; i < hidden; i++) {
        if (check(SYS(mount, "tmpfs", hide[i], "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")) < 0)
            die(hide[i]);
        if (inside(keep, hide[i])) cover = hide[i];
    }
    if (cover) {
        unsigned long at = 0;
        if (!put(target, sizeof target, &at, keep)) {
            err = ENAMETOOLONG;
            die(keep);
        }
        make_path(target, length(cover));
        at = 0;
        put(source, sizeof source, &at, "/proc/self/fd/");
        put(source, sizeof source, &at, decimal((u64)kept, digits));
        if (check(SYS(mount, source, keep, 0, MS_BIND | MS_REC, 0)) < 0) die("bind the workspace");
    }
    SYS(close, kept);
    for (int i = 0; i < hidden; i++) { /* now the covers can be made read-only */
        unsigned long flags = MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV;
        if (check(SYS(mount, 0, hide[i], 0, flags, 0)) < 0) die(hide[i]);
    }
    if (check(SYS(chdir, cwd)) < 0) die(cwd); /* through the mounts: the old one would lead around them */
}

/* Become UID:GID with no supplementary groups: ids only, so the capabilities go too. */
static void become(char *user) {
    if (same(user, "-")) return;
    char *colon = user;
    while (*colon && *colon != ':') colon++;
    if (!*colon) {
        say("USER is UID:GID or -, not ", user, 0, 0);
        exit_now(FAIL);
    }
    *colon = '\0';
    u64 uid = number(user), gid = number(colon + 1);
    if (uid >= 0xffffffffULL || gid >= 0xffffffffULL) { /* -1 would keep the ids, more wrap around */
        say("not a user or group id: ", uid >= 0xffffffffULL ? user : colon + 1, 0, 0);
        exit_now(FAIL);
    }
    if (check(SYS(setgroups, 0, 0)) < 0) die("setgroups");
    if (check(SYS(setresgid, gid, gid, gid)) < 0) die("setresgid");
    if (check(SYS(setresuid, uid, uid, uid)) < 0) die("setresuid");
    if (check(SYS(prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) < 0) die("no new privileges");
}

/* The id map line "ID ID 1". */
static void map_line(char *line, unsigned long size, u64 id) {
    char digits[24];
    unsigned long at = 0;
    put(line, size, &at, decimal(id, digits));
    put(line, size, &at, " ");
    put(line, size, &at, decimal(id, digits));
    put(line, size, &at, " 1");
}

static int launch(int argc, char **argv, char **envp) {
    int dashes = 8;
    while (dashes < argc && !same(argv[dashes], "--")) dashes++;
    if (dashes + 1 >= argc || argv[7][0] != '/') {
        static const char usage[] =
            "usage: ondeck-launch PARENT MEMORY CPU PROCESSES FILE_SIZE USER KEEP [HIDE...] -- PROGRAM [ARG...]\n";
        SYS(write, 2, usage, sizeof usage - 1);
        return FAIL;
    }
    for (int i = 8; i < dashes; i++) {
        if (argv[i][0] != '/') {
            say("not an absolute path: ", argv[i], 0, 0);
            return FAIL;
        }
    }
    die_with_parent();
    /* The worker may have died before the prctl (even before this exec): then nothing
       would ever stop the program, so it is not started. */
    if ((u64)SYS(getppid, 0) != number(argv[1])) {
        say("the worker (pid ", argv[1], ") is gone", 0);
        return FAIL;
    }

    limit(RLIMIT_AS, number(argv[2]), "memory limit");
    limit(RLIMIT_CPU, number(argv[3]), "cpu limit");
    limit(RLIMIT_NPROC, number(argv[4]), "process limit");
    limit(RLIMIT_FSIZE, number(argv[5]), "file size limit");
    limit(RLIMIT_CORE, 0, "core limit");

    long uid = SYS(geteuid, 0);
    long gid = SYS(getegid, 0);
    if (uid == 0) {
        if (check(SYS(unshare, CLONE_NEWPID | CLONE_NEWNS)) < 0) die("unshare");
    } else {
        /* Unprivileged: a user namespace grants the right to make the PID namespace;
           map our own ids into it, as unshare --map-current-user does. */
        char map[64];
        if (check(SYS(unshare, CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNS)) < 0) die("unshare");
        write_file("/proc/self/setgroups", "deny");
        map_line(map, sizeof map, (u64)uid);
        write_file("/proc/self/uid_map", map);
        map_line(map, sizeof map, (u64)gid);
        write_file("/proc/self/gid_map", map);
    }

    /* The namespace's first process cannot see its parent (getppid() is 0), so it learns
       whether the launcher is still alive from a pipe only the launcher writes to; and it
       reports how the program ended on another, as it cannot end by the same signal. */
    int alive[2], report[2];
    if (check(SYS(pipe2, alive, O_CLOEXEC)) < 0 || check(SYS(pipe2, report, O_CLOEXEC)) < 0) die("pipe");
    ignore(SIGINT, 1);
    ignore(SIGTERM, 1);
    long self = SYS(getpid, 0);
    int child = fork_now();
    if (child < 0) die("fork");
    if (child == 0) {
        char byte;
        SYS(close, alive[1]);
        SYS(close, report[0]);
        die_with_parent();
        if (check(SYS(fcntl, alive[0], F_SETFL, O_NONBLOCK)) < 0) die("fcntl");
        if (SYS(read, alive[0], &byte, 1) == 0) exit_now(FAIL); /* the launcher died before the prctl */
        contain(argv[7], argv + 8, dashes - 8);
        become(argv[6]);
        /* This process is PID 1 of the namespace, which the kernel shields from signals it
           has no handler for, SIGTERM included: the program is its child, so a timeout's
           or a cancel's SIGTERM reaches it. This one reaps what is orphaned meanwhile, and
           ends when the program does, which ends everything left in the namespace. */
        int program = fork_now();
        if (program < 0) die("fork");
        if (program == 0) {
            ignore(SIGINT, 0);
            ignore(SIGTERM, 0);
            char **command = argv + dashes + 1;
            exec_program(command, envp);
            char text[32];
            say("cannot run ", command[0], ": ", last_error(text));
            exit_now(err == ENOENT ? 127 : 126);
        }
        int ended = 0, reaped;
        while ((reaped = wait_for(-1, &ended)) != program) {
            if (reaped < 0 && err != EINTR) die("waitpid");
        }
        if (SYS(write, report[1], &ended, sizeof ended) != (long)sizeof ended) exit_now(FAIL);
        exit_now(0);
    }

    SYS(close, alive[0]);
    SYS(close, report[1]);
    int status = 0;
    while (wait_for(child, &status) < 0) {
        if (err != EINTR) die("waitpid");
    }
    int reported;
    if (SYS(read, report[0], &reported, sizeof reported) == (long)sizeof reported) status = reported;
    int sig = status & 0x7f;
    if (sig != 0 && sig != 0x7f) { /* WIFSIGNALED */
        ignore(sig, 0); /* RLIMIT_CORE is 0 already: no core file */
        SYS(kill, self, sig);
        return 128 + sig; /* a signal that cannot end this process (say, SIGSTOP-like) */
    }
    return (status >> 8) & 0xff;
}

/* The compiler may call these for copies and zeroing of its own, even with -fno-builtin;
   volatile, so that it does not make calls to them of these very loops. */
void *memcpy(void *to, const void *from, unsigned long n) {
    volatile char *t = to;
    const volatile char *f = from;
    while (n--) *t++ = *f++;
    return to;
}

void *memmove(void *to, const void *from, unsigned long n) {
    volatile char *t = to;
    const volatile char *f = from;
    if (t < f) {
        while (n--) *t++ = *f++;
    } else {
        while (n--) t[n] = f[n];
    }
    return to;
}

void *memset(void *to, int byte, unsigned long n) {
    volatile char *t = to;
    while (n--) *t++ = (char)byte;
    return to;
}

/* The entry point: no C library sets anything up, the stack holds argc, argv, envp. */
__attribute__((noreturn, used)) void start(long *stack);
void start(long *stack) {
    int argc = (int)stack[0];
    char **argv = (char **)(stack + 1);
    exit_now(launch(argc, argv, argv + argc + 1));
}

#if defined(__x86_64__)
__asm__(".text\n.globl _start\n.type _start, %function\n_start:\n xor %rbp, %rbp\n mov %rsp, %rdi\n and $-16, %rsp\n call start\n hlt\n");
#else
__asm__(".text\n.globl _start\n.type _start, %function\n_start:\n mov x29, #0\n mov x30, #0\n mov x0, sp\n bl start\n");
#endif
