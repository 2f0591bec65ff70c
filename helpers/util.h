/*
 * util.h - small shared pieces of shifter-helper: fatal errors, bounded
 * reads and writes, fd-relative paths, running a fixed program.
 *
 * Every failure in the helper ends in die(): one message on stderr, then
 * exit 1.  die_user() is the same for a request the user's own input makes
 * impossible (an image they may not use, a volume source they cannot open):
 * setup mode exits 2 there, so that the Slurm prolog can tell the user's
 * mistake (fail the job) from the node's fault (drain the node).  Both first
 * tear down what was mounted (the cleanup hook set by setup.c).  Nothing here
 * reads the environment.
 */
#ifndef SHIFTER_HELPERS_UTIL_H
#define SHIFTER_HELPERS_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <sys/types.h>

#define HELPER_MAX_PATH 4096
#define HELPER_MAX_SMALL_FILE (1024 * 1024) /* files others may write: an image's .meta */
/* Root's own files (etcPath passwd, state json): a large site's passwd is several MiB. */
#define HELPER_MAX_ROOT_FILE (64 * 1024 * 1024)

extern int g_verbose;

/* Called by die() before exiting (setup mode: unmount what was built). */
extern void (*g_cleanup)(void);

__attribute__((noreturn, format(printf, 1, 2))) void die(const char *fmt, ...);
/* die() with ": strerror(errno)" appended. */
__attribute__((noreturn, format(printf, 1, 2))) void die_errno(const char *fmt, ...);
/* Exit status of die_user(): 1 (run: the statuses are the command's), 2 in setup. */
extern int g_user_error_status;
/* die() for a user-input error; only at checks of what the user chose. */
__attribute__((noreturn, format(printf, 1, 2))) void die_user(const char *fmt, ...);
__attribute__((format(printf, 1, 2))) void verbose(const char *fmt, ...);
__attribute__((format(printf, 1, 2))) void warn(const char *fmt, ...);

void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
char *xstrdup(const char *s);

/* "/proc/self/fd/N" in buf (at least 32 bytes). */
const char *fd_path(int fd, char *buf, size_t len);

/* Read a whole fd (from its current offset) into a NUL-terminated buffer; -1 on error
 * (errno set; EFBIG when longer than max). */
int read_all_fd(int fd, size_t max, char **out, size_t *len);

/* Open dirfd/name without following a final symlink, require a regular file owned by
 * root (when root_owned) and read it; -1 with errno on failure. */
int read_small_file_at(int dirfd, const char *name, int root_owned, char **out, size_t *len);

/* Create or replace dirfd/name (never following a symlink) with data, mode, root:root. */
void write_file_at(int dirfd, const char *name, const char *data, size_t len, mode_t mode);

/* mkdirat that accepts an existing directory (checked without following symlinks). */
void mkdir_at(int dirfd, const char *name, mode_t mode);

/* openat2(2) with resolve flags (RESOLVE_IN_ROOT, ...); -1 with errno. */
int openat2_resolve(int dirfd, const char *path, int flags, unsigned long long resolve);

/* Open a directory below dirfd, O_PATH, refusing symlinks. */
int open_dir_at(int dirfd, const char *name);

/* In a child that root is about to exec (prog, for messages): a new session (no
 * controlling terminal), stdin from /dev/null, every signal default and unblocked, the
 * fixed rlimits of util.c's child_limits table, nice 0.  0, or -1 with errno (the child
 * should _exit; a hard limit root cannot raise is named on stderr). */
int child_reset_state(const char *prog);

/* Run argv[0] (an absolute path) as root (all ids 0, no groups) with argv, the fixed root
 * environment, cwd (or NULL), child_reset_state() applied, stdout/err inherited, extra_fd (or -1) dup'ed to fd 3, all other fds
 * closed; quiet sends its stdout and stderr to /dev/null; extra_env (NULL or a short
 * NULL-terminated list of fixed strings) is added to the environment.  Returns the wait
 * status. */
int run_program(const char *const argv[], const char *cwd, int extra_fd, int quiet,
                const char *const extra_env[]);

/* A /bin/sh hook as root (sitePreMountHook, roothook): non-zero dies with what. */
void run_root_hook(const char *hook, const char *cwd, const char *what);

/* Format a message into err (errlen bytes); always -1, for "return set_err(...)". */
__attribute__((format(printf, 3, 4))) int set_err(char *err, size_t errlen, const char *fmt, ...);
__attribute__((format(printf, 3, 0))) int vset_err(char *err, size_t errlen, const char *fmt,
                                                   va_list ap);

int is_abs_clean_path(const char *p); /* absolute, no "..", no control chars, bounded */
int str_in_words(const char *word, const char *list); /* word in a blank-separated list */
/* path is base or below it, whole components ("/etcx" is not under "/etc"; all is under "/"). */
int path_under(const char *path, const char *base);
int str_in_list(const char *s, const char *const list[]); /* s in a NULL-terminated list */
int config_flag(const char *value, int dflt); /* whole value 1/true/yes/on, any case; empty: dflt */

#endif
