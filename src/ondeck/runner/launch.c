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
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <grp.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define FAIL 125 /* as unshare and env do when they cannot start the program */

static void die(const char *what) {
    fprintf(stderr, "ondeck-launch: %s: %s\n", what, strerror(errno));
    _exit(FAIL);
}

static rlim_t number(const char *text) {
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-') {
        fprintf(stderr, "ondeck-launch: not a number: %s\n", text);
        _exit(FAIL);
    }
    return (rlim_t)value;
}

static void limit(int resource, rlim_t value, const char *what) {
    struct rlimit rl = {value, value};
    if (setrlimit(resource, &rl) != 0) die(what);
}

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) die(path);
    ssize_t length = (ssize_t)strlen(text);
    if (write(fd, text, (size_t)length) != length) die(path);
    close(fd);
}

static void die_with_parent(void) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) die("prctl");
}

/* Whether absolute path `inner` is `outer` or below it. */
static int inside(const char *inner, const char *outer) {
    size_t n = strlen(outer);
    return strncmp(inner, outer, n) == 0 && (inner[n] == '/' || inner[n] == '\0');
}

/* Make each directory of `path` below `top` (which exists), as mkdir -p would. */
static void make_path(char *path, size_t top) {
    for (char *slash = strchr(path + top + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = '\0';
        if (mkdir(path, 0755) != 0 && errno != EEXIST) die(path);
        *slash = '/';
    }
    if (mkdir(path, 0755) != 0 && errno != EEXIST) die(path);
}

/* In the new mount namespace (called by PID 1 of the new PID namespace, before it
   starts the program): a /proc of this namespace, each of `hide` covered but `keep`. */
static void contain(const char *keep, char **hide, int hidden) {
    char cwd[PATH_MAX], target[PATH_MAX], source[64];
    if (!getcwd(cwd, sizeof cwd)) die("getcwd");
    /* Nothing mounted here reaches the host's namespace, nor the other way. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) die("mount --make-rprivate /");
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) die("mount /proc");
    int kept = open(keep, O_PATH | O_DIRECTORY | O_CLOEXEC); /* before it is covered */
    if (kept < 0) die(keep);
    const char *cover = NULL;
    for (int i = 0; i < hidden; i++) {
        if (mount("tmpfs", hide[i], "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755") != 0) die(hide[i]);
        if (inside(keep, hide[i])) cover = hide[i];
    }
    if (cover) {
        if (snprintf(target, sizeof target, "%s", keep) >= (int)sizeof target) die("path too long");
        make_path(target, strlen(cover));
        snprintf(source, sizeof source, "/proc/self/fd/%d", kept);
        if (mount(source, keep, NULL, MS_BIND | MS_REC, NULL) != 0) die("bind the workspace");
    }
    close(kept);
    for (int i = 0; i < hidden; i++) { /* now the covers can be made read-only */
        unsigned long flags = MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV;
        if (mount(NULL, hide[i], NULL, flags, NULL) != 0) die(hide[i]);
    }
    if (chdir(cwd) != 0) die(cwd); /* through the mounts: the old one would lead around them */
}

/* Become UID:GID with no supplementary groups: ids only, so the capabilities go too. */
static void become(const char *user) {
    if (strcmp(user, "-") == 0) return;
    char *colon = strchr(user, ':');
    if (!colon) {
        fprintf(stderr, "ondeck-launch: USER is UID:GID or -, not %s\n", user);
        _exit(FAIL);
    }
    *colon = '\0';
    uid_t uid = (uid_t)number(user);
    gid_t gid = (gid_t)number(colon + 1);
    if (setgroups(0, NULL) != 0) die("setgroups");
    if (setresgid(gid, gid, gid) != 0) die("setresgid");
    if (setresuid(uid, uid, uid) != 0) die("setresuid");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no new privileges");
}

int main(int argc, char **argv) {
    int dashes = 8;
    while (dashes < argc && strcmp(argv[dashes], "--") != 0) dashes++;
    if (dashes + 1 >= argc || argv[7][0] != '/') {
        fprintf(stderr, "usage: ondeck-launch PARENT MEMORY CPU PROCESSES FILE_SIZE USER KEEP [HIDE...] -- PROGRAM [ARG...]\n");
        return FAIL;
    }
    for (int i = 8; i < dashes; i++) {
        if (argv[i][0] != '/') {
            fprintf(stderr, "ondeck-launch: not an absolute path: %s\n", argv[i]);
            return FAIL;
        }
    }
    die_with_parent();
    /* The worker may have died before the prctl (even before this exec): then nothing
       would ever stop the program, so it is not started. */
    if (getppid() != (pid_t)number(argv[1])) {
        fprintf(stderr, "ondeck-launch: the worker (pid %s) is gone\n", argv[1]);
        _exit(FAIL);
    }

    limit(RLIMIT_AS, number(argv[2]), "memory limit");
    limit(RLIMIT_CPU, number(argv[3]), "cpu limit");
    limit(RLIMIT_NPROC, number(argv[4]), "process limit");
    limit(RLIMIT_FSIZE, number(argv[5]), "file size limit");
    limit(RLIMIT_CORE, 0, "core limit");

    uid_t uid = geteuid();
    gid_t gid = getegid();
    if (uid == 0) {
        if (unshare(CLONE_NEWPID | CLONE_NEWNS) != 0) die("unshare");
    } else {
        /* Unprivileged: a user namespace grants the right to make the PID namespace;
           map our own ids into it, as unshare --map-current-user does. */
        char map[64];
        if (unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNS) != 0) die("unshare");
        write_file("/proc/self/setgroups", "deny");
        snprintf(map, sizeof map, "%u %u 1", (unsigned)uid, (unsigned)uid);
        write_file("/proc/self/uid_map", map);
        snprintf(map, sizeof map, "%u %u 1", (unsigned)gid, (unsigned)gid);
        write_file("/proc/self/gid_map", map);
    }

    /* The namespace's first process cannot see its parent (getppid() is 0), so it learns
       whether the launcher is still alive from a pipe only the launcher writes to; and it
       reports how the program ended on another, as it cannot end by the same signal. */
    int alive[2], report[2];
    if (pipe2(alive, O_CLOEXEC) != 0 || pipe2(report, O_CLOEXEC) != 0) die("pipe");
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
    pid_t self = getpid();
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        char byte;
        close(alive[1]);
        close(report[0]);
        die_with_parent();
        if (fcntl(alive[0], F_SETFL, O_NONBLOCK) != 0) die("fcntl");
        if (read(alive[0], &byte, 1) == 0) _exit(FAIL); /* the launcher died before the prctl */
        contain(argv[7], argv + 8, dashes - 8);
        become(argv[6]);
        /* This process is PID 1 of the namespace, which the kernel shields from signals it
           has no handler for, SIGTERM included: the program is its child, so a timeout's
           or a cancel's SIGTERM reaches it. This one reaps what is orphaned meanwhile, and
           ends when the program does, which ends everything left in the namespace. */
        pid_t program = fork();
        if (program < 0) die("fork");
        if (program == 0) {
            signal(SIGINT, SIG_DFL);
            signal(SIGTERM, SIG_DFL);
            char **command = argv + dashes + 1;
            execvp(command[0], command);
            fprintf(stderr, "ondeck-launch: cannot run %s: %s\n", command[0], strerror(errno));
            _exit(errno == ENOENT ? 127 : 126);
        }
        int ended;
        pid_t reaped;
        while ((reaped = waitpid(-1, &ended, 0)) != program) {
            if (reaped < 0 && errno != EINTR) die("waitpid");
        }
        if (write(report[1], &ended, sizeof ended) != (ssize_t)sizeof ended) _exit(FAIL);
        _exit(0);
    }

    close(alive[0]);
    close(report[1]);
    int status;
    while (waitpid(child, &status, 0) < 0) {
        if (errno != EINTR) die("waitpid");
    }
    int reported;
    if (read(report[0], &reported, sizeof reported) == (ssize_t)sizeof reported) status = reported;
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        signal(sig, SIG_DFL); /* RLIMIT_CORE is 0 already: no core file */
        kill(self, sig);
        return 128 + sig; /* a signal that cannot end this process (say, SIGSTOP-like) */
    }
    return WEXITSTATUS(status);
}
