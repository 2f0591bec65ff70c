/*
 * pmix.c - the Slurm step's PMIx server directory in the container (docs/behaviour.md,
 * 'Runtime: PMIx').
 *
 * With srun --mpi=pmix, slurmstepd runs a PMIx server for the step and gives every task
 * PMIX_* variables; its directory (PMIX_SERVER_TMPDIR, <SlurmdSpoolDir>/pmix.<job>.<step>,
 * made for the job's user, mode 0700) holds the shared-memory job data the clients map.
 * The front end passes that directory as --pmix-dir and it is bound at the same path in
 * the container, as enroot's slurm-pmi hook does.  What crosses is only a directory the
 * user already owns and reaches, opened with the user's identity along a path without
 * symbolic links, named like Slurm's (pmix.N.N: no site file is called that), never
 * under /etc, /opt/udiImage, /proc, /sys or /dev, mounted nosuid, nodev, noexec and
 * without the mounts below it.
 */
#define _GNU_SOURCE
#include "pmix.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "container.h"
#include "mnt.h"
#include "util.h"
#include "volmount.h"

#define WHAT "The PMIx server directory %s (PMIX_SERVER_TMPDIR)"
#define WAYOUT "Run the MPI program with srun --mpi=pmix, which makes the step's own " \
               "directory, or unset PMIX_SERVER_TMPDIR to run without it."

static int under(const char *path, const char *base)
{
    size_t n = strlen(base);
    return strncmp(path, base, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

/* "pmix.<digits>.<digits>", each number 1 to 10 digits (Slurm's %u). */
static int slurm_name(const char *name)
{
    const char *p = name + 5;

    if (strncmp(name, "pmix.", 5) != 0)
        return 0;
    for (int part = 0; part < 2; part++) {
        size_t n = strspn(p, "0123456789");
        if (n == 0 || n > 10 || p[n] != (part == 0 ? '.' : '\0'))
            return 0;
        p += n + 1;
    }
    return 1;
}

int pmix_check_path(const char *path, char *out, size_t len, char *err, size_t errlen)
{
    static const char *const reserved[] = {"/etc", "/opt/udiImage", "/proc", "/sys", "/dev"};
    size_t n = strlen(path);
    const char *base;

    if (!is_abs_clean_path(path) || n >= len)
        return set_err(err, errlen, "it is not an absolute path without \"..\"");
    while (n > 1 && path[n - 1] == '/')
        n--;
    memcpy(out, path, n);
    out[n] = '\0';
    if (strstr(out, "//") != NULL || strstr(out, "/./") != NULL)
        return set_err(err, errlen, "it is not a canonical path");
    base = strrchr(out, '/') + 1;
    if (!slurm_name(base))
        return set_err(err, errlen, "its name is not Slurm's pmix.<job>.<step>");
    for (size_t i = 0; i < sizeof reserved / sizeof reserved[0]; i++)
        if (under(out, reserved[i]))
            return set_err(err, errlen, "it is under %s, which is the system's", reserved[i]);
    return 0;
}

/* The mount point: path inside the container root, every component a real directory
 * (no symbolic link followed, so an image's link cannot move it, into /etc say), the
 * missing ones made on the container's own filesystem.  -1 with the reason in *why;
 * *link set when a symbolic link (or a non-directory) is on the way. */
static int open_mount_point(const struct ctx *c, const char *path, const char **why, int *link)
{
    uint64_t root_id = mnt_id(c->root);
    int dir = openat(c->root, ".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    const char *p = path;

    *link = 0;
    if (dir < 0)
        die_errno("Cannot open the container root");
    while (*p) {
        const unsigned long long how = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
                                       RESOLVE_NO_MAGICLINKS;
        char name[256];
        size_t len;
        int next;

        p += strspn(p, "/");
        len = strcspn(p, "/");
        if (len == 0)
            break;
        if (len >= sizeof name) {
            close(dir);
            *why = "a name on its path is too long";
            return -1;
        }
        memcpy(name, p, len);
        name[len] = '\0';
        p += len;
        next = openat2_resolve(dir, name, O_PATH | O_DIRECTORY | O_CLOEXEC, how);
        if (next < 0 && errno == ENOENT) {
            if (mnt_id(dir) != root_id) {
                close(dir);
                *why = "it does not exist and its parent is not on the container's own "
                       "filesystem, so it cannot be created";
                return -1;
            }
            if (mkdirat(dir, name, 0755) != 0 && errno != EEXIST) {
                close(dir);
                *why = "it cannot be created";
                return -1;
            }
            next = openat2_resolve(dir, name, O_PATH | O_DIRECTORY | O_CLOEXEC, how);
        }
        close(dir);
        if (next < 0) {
            *link = errno == ELOOP || errno == ENOTDIR;
            *why = *link ? "something on its path in the image is a symbolic link or not a "
                           "directory"
                         : strerror(errno);
            return -1;
        }
        dir = next;
    }
    return dir;
}

/* The directory checked: opened as the user, a directory of theirs; dies otherwise. */
static int open_checked(const struct ctx *c, const char *canon, struct stat *st)
{
    int fd = volmount_open_dir_as_user_nofollow(&c->id, canon);

    if (fd < 0)
        die_user(WHAT " cannot be opened: %s. " WAYOUT, canon,
                 errno == ELOOP ? "its path has a symbolic link"
                 : errno == ENOTDIR ? "it is not a directory"
                                    : strerror(errno));
    if (fstat(fd, st) != 0)
        die_errno("Cannot stat %s", canon);
    if (st->st_uid != c->id.uid)
        die_user(WHAT " is owned by uid %lu, not by you (uid %lu): it is not mounted. "
                 "Only your job step's own directory is. " WAYOUT,
                 canon, (unsigned long)st->st_uid, (unsigned long)c->id.uid);
    return fd;
}

void pmix_open(struct ctx *c, const char *path)
{
    static char canon[HELPER_MAX_PATH];
    char err[256];
    struct stat st;

    if (pmix_check_path(path, canon, sizeof canon, err, sizeof err) != 0)
        die_user(WHAT " is not mounted: %s. " WAYOUT, path, err);
    c->pmix_fd = open_checked(c, canon, &st);
    c->pmix_dir = canon;
}

void pmix_mount(struct ctx *c)
{
    const char *why = NULL;
    struct stat first, now;
    int dst, mfd, src, link;

    /* A mount can only be cloned in the namespace it belongs to: open it again here (in
     * the private one) and make sure it is still the directory checked before. */
    if (fstat(c->pmix_fd, &first) != 0)
        die_errno("Cannot stat %s", c->pmix_dir);
    src = open_checked(c, c->pmix_dir, &now);
    if (now.st_dev != first.st_dev || now.st_ino != first.st_ino)
        die_user(WHAT " was replaced while the container was built: it is not mounted",
                 c->pmix_dir);
    dst = open_mount_point(c, c->pmix_dir, &why, &link);
    if (dst < 0 && link)
        die_user(WHAT " is not mounted: %s", c->pmix_dir, why);
    if (dst < 0) {
        /* The site's layout, not the user's doing (a spool dir below a host directory the
         * container has without it): PMIx still works, by messages to the server. */
        warn("shifter: " WHAT " is not mounted in the container: %s. PMIx clients ask "
             "the server for the job's data instead (slower at scale); tell your site "
             "admin (docs/admin-guide.md, 'Open MPI and PMIx').", c->pmix_dir, why);
        close(src);
        return;
    }
    mfd = mnt_clone(src, 0, ATTR_NOSUID | ATTR_NODEV | ATTR_NOEXEC, c->pmix_dir);
    mnt_attach(mfd, dst, MS_PRIVATE, c->pmix_dir);
    verbose("PMIx server directory on %s", c->pmix_dir);
    close(mfd);
    close(dst);
    close(src);
}

int pmix_enter_prepared(struct ctx *c, int root, const char *signature)
{
    int writable = config_flag(conf_get(c->conf, "mountUdiRootWritable"), 0);

    close(root);
    if (unshare(CLONE_NEWNS) != 0)
        die_errno("Cannot create a private mount namespace");
    if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) != 0)
        die_errno("Cannot make / a slave mount");
    /* This namespace's copy of the container, checked again: it may have gone meanwhile. */
    root = container_prepared(c, signature);
    if (root < 0)
        die("The prepared container at %s went away; try again", c->udi);
    c->root = root;
    /* Writable in this namespace only (the flag is this copy's), for the mount point. */
    if (!writable)
        mnt_clear(root, ATTR_RO, "the container root");
    pmix_mount(c);
    if (!writable)
        mnt_set(root, 0, ATTR_RO, 0, "the container root");
    return root;
}
