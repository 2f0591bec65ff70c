/*
 * util.c - fatal errors, bounded file I/O and running fixed programs for
 * shifter-helper.  See util.h.
 */
#define _GNU_SOURCE
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/openat2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int g_verbose;
void (*g_cleanup)(void);

static void vmsg(const char *prefix, const char *fmt, va_list ap, const char *suffix)
{
    char buf[16384];
    int n = vsnprintf(buf, sizeof buf, fmt, ap);

    if (n < 0)
        snprintf(buf, sizeof buf, "(cannot format message)");
    /* One write so messages of concurrent tasks do not interleave. */
    dprintf(STDERR_FILENO, "%s%s%s%s\n", prefix, buf, suffix ? ": " : "", suffix ? suffix : "");
}

int g_user_error_status = 1;

__attribute__((noreturn)) static void vdie(int status, const char *err, const char *fmt, va_list ap)
{
    void (*cleanup)(void) = g_cleanup;

    vmsg("", fmt, ap, err);
    g_cleanup = NULL; /* a failure inside the cleanup must not recurse */
    if (cleanup != NULL)
        cleanup();
    _exit(status);
}

void die(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vdie(1, NULL, fmt, ap);
}

void die_errno(const char *fmt, ...)
{
    va_list ap;
    const char *err = strerror(errno);

    va_start(ap, fmt);
    vdie(1, err, fmt, ap);
}

void die_user(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vdie(g_user_error_status, NULL, fmt, ap);
}

void verbose(const char *fmt, ...)
{
    static struct timespec start;
    struct timespec now;
    char prefix[64];
    va_list ap;

    if (!g_verbose)
        return;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (start.tv_sec == 0)
        start = now;
    snprintf(prefix, sizeof prefix, "shifter-helper [%.1f ms]: ",
             (double)(now.tv_sec - start.tv_sec) * 1e3 +
                 (double)(now.tv_nsec - start.tv_nsec) / 1e6);
    va_start(ap, fmt);
    vmsg(prefix, fmt, ap, NULL);
    va_end(ap);
}

void warn(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vmsg("", fmt, ap, NULL);
    va_end(ap);
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        die("shifter-helper: out of memory");
    return p;
}

void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL)
        die("shifter-helper: out of memory");
    return p;
}

char *xstrdup(const char *s)
{
    char *p = strdup(s);
    if (p == NULL)
        die("shifter-helper: out of memory");
    return p;
}

const char *fd_path(int fd, char *buf, size_t len)
{
    snprintf(buf, len, "/proc/self/fd/%d", fd);
    return buf;
}

int read_all_fd(int fd, size_t max, char **out, size_t *len)
{
    size_t cap = 4096, used = 0;
    char *buf = xmalloc(cap + 1);

    for (;;) {
        ssize_t n;

        if (used == cap) {
            if (cap > max) {
                free(buf);
                errno = EFBIG;
                return -1;
            }
            cap = cap * 2 > max + 1 ? max + 1 : cap * 2;
            char *nb = realloc(buf, cap + 1);
            if (nb == NULL) {
                free(buf);
                die("shifter-helper: out of memory");
            }
            buf = nb;
        }
        n = read(fd, buf + used, cap - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            free(buf);
            errno = e;
            return -1;
        }
        if (n == 0)
            break;
        used += (size_t)n;
        if (used > max) {
            free(buf);
            errno = EFBIG;
            return -1;
        }
    }
    buf[used] = '\0';
    *out = buf;
    *len = used;
    return 0;
}

int read_small_file_at(int dirfd, const char *name, int root_owned, char **out, size_t *len)
{
    struct stat st;
    int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    int rc = -1, e;

    if (fd < 0)
        return -1;
    if (fstat(fd, &st) != 0)
        ; /* errno set */
    else if (!S_ISREG(st.st_mode))
        errno = EINVAL;
    else if (root_owned && (st.st_uid != 0 || (st.st_mode & (S_IWGRP | S_IWOTH))))
        errno = EPERM;
    else
        rc = read_all_fd(fd, root_owned ? HELPER_MAX_ROOT_FILE : HELPER_MAX_SMALL_FILE, out, len);
    e = errno;
    close(fd);
    errno = e;
    return rc;
}

void write_file_at(int dirfd, const char *name, const char *data, size_t len, mode_t mode)
{
    int fd;
    size_t done = 0;

    /* Replace rather than write through: whatever was there (even a symlink) goes. */
    if (unlinkat(dirfd, name, 0) != 0 && errno != ENOENT)
        die_errno("Cannot replace %s in the container", name);
    fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
    if (fd < 0)
        die_errno("Cannot create %s in the container", name);
    while (done < len) {
        ssize_t n = write(fd, data + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die_errno("Cannot write %s in the container", name);
        done += (size_t)n;
    }
    if (fchown(fd, 0, 0) != 0 || fchmod(fd, mode) != 0)
        die_errno("Cannot set owner and mode of %s in the container", name);
    if (close(fd) != 0)
        die_errno("Cannot write %s in the container", name);
}

void mkdir_at(int dirfd, const char *name, mode_t mode)
{
    struct stat st;

    if (mkdirat(dirfd, name, mode) == 0)
        return;
    if (errno != EEXIST)
        die_errno("Cannot create directory %s", name);
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(st.st_mode))
        die("Cannot create directory %s: something else is in the way", name);
}

int openat2_resolve(int dirfd, const char *path, int flags, unsigned long long resolve)
{
    struct open_how how;

    memset(&how, 0, sizeof how);
    how.flags = (unsigned long long)flags;
    how.resolve = resolve;
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
}

int open_dir_at(int dirfd, const char *name)
{
    return openat(dirfd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
}

#define UNLIMITED RLIM_INFINITY

/*
 * The limits root's children start with.  rlimits survive the setuid exec, so without
 * this a hook or mkfs.xfs would run with whatever the user set.
 */
static const struct {
    int resource;
    const char *name;
    rlim_t soft, hard;
} child_limits[] = {
    /* mkfs.xfs writes the whole cache file; a hook must not leave a file cut short */
    {RLIMIT_FSIZE, "file size (ulimit -f)", UNLIMITED, UNLIMITED},
    /* CPU time and memory: a tight limit kills or fails a tool half way */
    {RLIMIT_CPU, "CPU time (ulimit -t)", UNLIMITED, UNLIMITED},
    {RLIMIT_DATA, "data size (ulimit -d)", UNLIMITED, UNLIMITED},
    {RLIMIT_AS, "virtual memory (ulimit -v)", UNLIMITED, UNLIMITED},
    {RLIMIT_STACK, "stack size (ulimit -s)", 8 << 20, UNLIMITED},      /* the usual 8 MiB */
    {RLIMIT_CORE, "core file size (ulimit -c)", 0, 0},  /* root's memory in no core file */
    {RLIMIT_NOFILE, "open files (ulimit -n)", 1024, 4096}, /* the usual; select() <= 1024 */
    {RLIMIT_MEMLOCK, "locked memory (ulimit -l)", 8 << 20, 8 << 20}, /* the usual */
    {RLIMIT_LOCKS, "file locks (ulimit -x)", UNLIMITED, UNLIMITED},  /* the usual */
    {RLIMIT_MSGQUEUE, "POSIX message queues (ulimit -q)", 819200, 819200}, /* the usual */
    {RLIMIT_NICE, "nice priority (ulimit -e)", 0, 0},   /* no raising of priority: unneeded */
    {RLIMIT_RTPRIO, "real-time priority (ulimit -r)", 0, 0}, /* no real-time scheduling */
    {RLIMIT_RTTIME, "real-time timeout", UNLIMITED, UNLIMITED}, /* only bounds RT tasks */
    /* Left as they are: RLIMIT_NPROC (the kernel does not apply it to root's forks),
     * RLIMIT_SIGPENDING (queued signals, which none of these tools uses) and RLIMIT_RSS
     * (ignored by Linux). */
};

/* Limit i of the table.  Raising a hard limit needs CAP_SYS_RESOURCE, which root lacks
 * on some nodes (containers): there the hard limit stays the caller's, and only a
 * caller's hard limit below the soft value wanted stops the program (a message names it). */
static int set_child_limit(size_t i, const char *prog)
{
    struct rlimit want = {child_limits[i].soft, child_limits[i].hard}, have;

    if (setrlimit(child_limits[i].resource, &want) == 0)
        return 0;
    if (errno != EPERM || getrlimit(child_limits[i].resource, &have) != 0)
        return -1;
    if (want.rlim_cur != RLIM_INFINITY &&
        (have.rlim_max == RLIM_INFINITY || want.rlim_cur <= have.rlim_max)) {
        want.rlim_max = have.rlim_max;
        return setrlimit(child_limits[i].resource, &want);
    }
    dprintf(STDERR_FILENO,
            "Cannot run %s as root with your hard limit of %s (%llu): this node does not let "
            "root raise it. Raise it (ulimit -H) and try again.\n",
            prog, child_limits[i].name, (unsigned long long)have.rlim_max);
    errno = EPERM;
    return -1;
}

/* rt_sigaction(2) as the kernel takes it (the generic layout: handler, flags,
 * restorer, mask), for the signals glibc's sigaction() will not change. */
static int set_default_raw(int sig)
{
    struct {
        void *handler;
        unsigned long flags;
        void *restorer;
        unsigned long mask;
    } ksa = {SIG_DFL, 0, NULL, 0};

    return (int)syscall(SYS_rt_sigaction, sig, &ksa, NULL, sizeof ksa.mask);
}

int child_reset_state(const char *prog)
{
    sigset_t none;
    int null;

    /* A session of its own: no controlling terminal (the user's tty cannot signal it
     * nor be its /dev/tty), not in the caller's process group. */
    if (setsid() < 0)
        return -1;
    null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null < 0 || dup2(null, STDIN_FILENO) != STDIN_FILENO)
        return -1;
    if (null != STDIN_FILENO)
        close(null);
    /* Every disposition default (SIG_IGN survives exec) and nothing blocked.  glibc
     * refuses to touch its two internal real-time signals (32, 33), which a caller can
     * still have ignored, so the kernel is asked directly; SIGKILL and SIGSTOP refuse
     * the change and are always default anyway. */
    for (int sig = 1; sig < NSIG; sig++)
        if (signal(sig, SIG_DFL) == SIG_ERR && sig != SIGKILL && sig != SIGSTOP &&
            set_default_raw(sig) != 0)
            return -1;
    if (sigemptyset(&none) != 0 || sigprocmask(SIG_SETMASK, &none, NULL) != 0)
        return -1;
    for (size_t i = 0; i < sizeof child_limits / sizeof child_limits[0]; i++)
        if (set_child_limit(i, prog) != 0)
            return -1;
    /* The caller's nice value must not slow root's work; where root may not lower it
     * (no CAP_SYS_NICE) the work is only slower, so that is no reason to stop. */
    if (setpriority(PRIO_PROCESS, 0, 0) != 0 && errno != EACCES && errno != EPERM)
        return -1;
    return 0;
}

int run_program(const char *const argv[], const char *cwd, int extra_fd, int quiet,
                const char *const extra_env[])
{
    const char *env[8] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin"};
    size_t n = 1;
    int status;
    pid_t pid;

    for (size_t i = 0; extra_env != NULL && extra_env[i] != NULL && n < 7; i++)
        env[n++] = extra_env[i];
    env[n] = NULL;
    pid = fork();
    if (pid < 0)
        die_errno("Cannot start %s", argv[0]);
    if (pid == 0) {
        /* None of the caller's session, terminal, stdin, signals or limits. */
        if (child_reset_state(argv[0]) != 0)
            _exit(126);
        /* Fully root: a shell started with real id != effective id drops privileges. */
        if (setgroups(0, NULL) != 0 || setresgid(0, 0, 0) != 0 || setresuid(0, 0, 0) != 0)
            _exit(126);
        if (extra_fd >= 0) {
            if (dup2(extra_fd, 3) != 3)
                _exit(126);
            if (close_range(4, ~0U, 0) != 0)
                _exit(126);
        } else if (close_range(3, ~0U, 0) != 0) {
            _exit(126);
        }
        if (cwd != NULL && chdir(cwd) != 0)
            _exit(126);
        if (quiet) {
            int null = open("/dev/null", O_WRONLY);
            if (null < 0 || dup2(null, STDOUT_FILENO) < 0 || dup2(null, STDERR_FILENO) < 0)
                _exit(126);
        }
        execve(argv[0], (char *const *)argv, (char *const *)env);
        dprintf(STDERR_FILENO, "%s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            die_errno("Cannot wait for %s", argv[0]);
    }
    return status;
}

void run_root_hook(const char *hook, const char *cwd, const char *what)
{
    const char *argv[] = {"/bin/sh", hook, NULL};
    int status;

    verbose("running %s %s", what, hook);
    status = run_program(argv, cwd, -1, 0, NULL);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        die("%s %s failed (status %d)", what, hook,
            WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
}

int is_abs_clean_path(const char *p)
{
    size_t len = strlen(p);

    if (len == 0 || len >= HELPER_MAX_PATH || p[0] != '/')
        return 0;
    for (const char *c = p; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            return 0;
    for (const char *c = p; (c = strstr(c, "..")) != NULL; c += 2)
        if ((c == p || c[-1] == '/') && (c[2] == '\0' || c[2] == '/'))
            return 0;
    return 1;
}

int path_under(const char *path, const char *base)
{
    size_t n = strlen(base);

    if (n == 1 && base[0] == '/')
        return path[0] == '/';
    return strncmp(path, base, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

int str_in_list(const char *s, const char *const list[])
{
    for (size_t i = 0; list[i] != NULL; i++)
        if (strcmp(s, list[i]) == 0)
            return 1;
    return 0;
}

int str_in_words(const char *word, const char *list)
{
    size_t wl = strlen(word);
    const char *p = list;

    while (p != NULL && *p) {
        size_t n;
        while (*p == ' ' || *p == '\t')
            p++;
        n = strcspn(p, " \t");
        if (n == wl && n > 0 && strncmp(p, word, n) == 0)
            return 1;
        p += n;
    }
    return 0;
}

int config_flag(const char *value, int dflt)
{
    static const char *const yes[] = {"1", "true", "yes", "on"};
    size_t n;

    if (value == NULL)
        return dflt;
    while (*value == ' ' || *value == '\t')
        value++;
    n = strlen(value);
    while (n > 0 && (value[n - 1] == ' ' || value[n - 1] == '\t'))
        n--;
    if (n == 0)
        return dflt;
    /* The whole value: "1 # on" is not a yes (udiroot/config.py flag() agrees). */
    for (size_t i = 0; i < sizeof yes / sizeof yes[0]; i++)
        if (strlen(yes[i]) == n && strncasecmp(value, yes[i], n) == 0)
            return 1;
    return 0;
}

int vset_err(char *err, size_t errlen, const char *fmt, va_list ap)
{
    if (err != NULL && errlen > 0 && vsnprintf(err, errlen, fmt, ap) < 0)
        snprintf(err, errlen, "(cannot format message)"); /* an encoding error only */
    return -1;
}

int set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vset_err(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}
