/*
 * ondeck-launch: start one attempt's program in its own PID namespace, under
 * resource limits, with a single exec.
 *
 *   ondeck-launch PARENT MEMORY CPU PROCESSES FILE_SIZE -- PROGRAM [ARG...]
 *
 * PARENT is the worker's PID: the launcher does not start the program if it
 * finds itself orphaned before it could tie its life to the worker's.
 * It does what `setpriv --pdeathsig KILL -- unshare --pid --fork --kill-child
 * [--user --map-current-user] -- prlimit --as --cpu --nproc --fsize --core=0 --`
 * does, without the three extra programs (each costs an exec and a dynamic
 * link, about a millisecond of CPU per run):
 *
 *   - it dies with its parent (the worker), even by SIGKILL;
 *   - the program is PID 1 of a new PID namespace, so when it exits, or when
 *     this launcher dies, the kernel kills every process left in there;
 *   - the limits are set before the fork, so the program and all it starts
 *     inherit them;
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
#include <sys/prctl.h>
#include <sys/resource.h>
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

int main(int argc, char **argv) {
    if (argc < 8 || strcmp(argv[6], "--") != 0) {
        fprintf(stderr, "usage: ondeck-launch PARENT MEMORY CPU PROCESSES FILE_SIZE -- PROGRAM [ARG...]\n");
        return FAIL;
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
        if (unshare(CLONE_NEWPID) != 0) die("unshare");
    } else {
        /* Unprivileged: a user namespace grants the right to make the PID namespace;
           map our own ids into it, as unshare --map-current-user does. */
        char map[64];
        if (unshare(CLONE_NEWUSER | CLONE_NEWPID) != 0) die("unshare");
        write_file("/proc/self/setgroups", "deny");
        snprintf(map, sizeof map, "%u %u 1", (unsigned)uid, (unsigned)uid);
        write_file("/proc/self/uid_map", map);
        snprintf(map, sizeof map, "%u %u 1", (unsigned)gid, (unsigned)gid);
        write_file("/proc/self/gid_map", map);
    }

    /* The program cannot see its parent from inside the namespace (getppid() is 0), so it
       learns whether the launcher is still alive from a pipe only the launcher writes to. */
    int alive[2];
    if (pipe2(alive, O_CLOEXEC) != 0) die("pipe");
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
    pid_t self = getpid();
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        char byte;
        close(alive[1]);
        die_with_parent();
        if (fcntl(alive[0], F_SETFL, O_NONBLOCK) != 0) die("fcntl");
        if (read(alive[0], &byte, 1) == 0) _exit(FAIL); /* the launcher died before the prctl */
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        execvp(argv[7], argv + 7);
        fprintf(stderr, "ondeck-launch: cannot run %s: %s\n", argv[7], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }

    close(alive[0]);
    int status;
    while (waitpid(child, &status, 0) < 0) {
        if (errno != EINTR) die("waitpid");
    }
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        signal(sig, SIG_DFL); /* RLIMIT_CORE is 0 already: no core file */
        kill(self, sig);
        return 128 + sig; /* a signal that cannot end this process (say, SIGSTOP-like) */
    }
    return WEXITSTATUS(status);
}
