/*
 * volmount.c - siteFs and user volumes.
 *
 * User volume sources are opened while the filesystem ids are the user's
 * (setfsuid/setfsgid; the supplementary groups are the user's too), so the
 * user must be able to reach them; the opened directory is what gets mounted.
 * Destinations are resolved inside the container root with openat2
 * RESOLVE_IN_ROOT (symlinks cannot climb out), and the path they resolved to
 * is checked again against the destination rules, so an image symlink cannot
 * turn /data into /etc.
 */
#define _GNU_SOURCE
#include "volmount.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loop.h"
#include "mnt.h"
#include "util.h"

#define SMALL_XFS (300ULL * 1024 * 1024)
#define DENIED "Invalid mount request, permission denied! Cannot mount from %s to %s: %s."

static void set_fs_ids(uid_t uid, gid_t gid)
{
    /* setfsuid/setfsgid report the previous id, never an error: check by reading back. */
    setfsgid(gid);
    setfsuid(uid);
    if ((uid_t)setfsuid((uid_t)-1) != uid || (gid_t)setfsgid((gid_t)-1) != gid)
        die("Cannot switch filesystem ids");
}

static int open_as_user(const struct ident *id, const char *path, int want_dir,
                        unsigned long long resolve)
{
    int fd, dir, e;

    /* The supplementary groups are already the user's: run's caller's, and setup takes
     * the user's for its whole run (setup.c). */
    set_fs_ids(id->uid, id->gid);
    fd = openat2_resolve(AT_FDCWD, path, O_PATH | (want_dir ? O_DIRECTORY : 0) | O_CLOEXEC,
                         resolve);
    /* Looking up "." in it needs search permission: the user can reach inside. */
    dir = fd >= 0 && want_dir ? openat(fd, ".", O_PATH | O_DIRECTORY | O_CLOEXEC) : fd;
    e = errno;
    set_fs_ids(0, 0);
    if (fd >= 0 && want_dir)
        close(fd);
    errno = e;
    return dir;
}

int volmount_open_as_user(const struct ident *id, const char *path, int want_dir)
{
    return open_as_user(id, path, want_dir, RESOLVE_NO_MAGICLINKS);
}

int volmount_open_dir_as_user_nofollow(const struct ident *id, const char *path)
{
    return open_as_user(id, path, 1, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS);
}

/* The container path fd resolved to (fd inside the container root), in out. */
static void container_path(const struct ctx *c, int fd, char *out, size_t len)
{
    char link[32], buf[HELPER_MAX_PATH + 1];
    size_t n = strlen(c->udi);
    ssize_t r = readlink(fd_path(fd, link, sizeof link), buf, sizeof buf - 1);

    if (r < 0)
        die_errno("Cannot resolve a mount destination");
    buf[r] = '\0';
    if (strcmp(c->udi, "/") == 0)
        n = 0;
    if (strncmp(buf, c->udi, n) != 0 || (buf[n] != '\0' && buf[n] != '/'))
        die("A mount destination resolved outside the container (%s)", buf);
    {
        const char *rest = buf[n] ? buf + n : "/";
        if (strlen(rest) >= len)
            die("A mount destination path is too long");
        memcpy(out, rest, strlen(rest) + 1);
    }
}

/*
 * Open the destination path inside the container, creating missing components while
 * their parent is the container's own rootfs.  want_dir: the last component is a
 * directory (else an empty file is created).  -1 with a reason in why.
 */
static int open_target(const struct ctx *c, const char *path, int want_dir, int user,
                       const char **why)
{
    uint64_t root_id = mnt_id(c->root);
    char prefix[HELPER_MAX_PATH];
    const char *p = path;
    int fd = -1;

    fd = openat2_resolve(c->root, path, O_PATH | O_CLOEXEC,
                         RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS);
    if (fd >= 0 || errno != ENOENT)
        goto done;
    /* Walk from the top, creating what is missing. */
    prefix[0] = '\0';
    while (*p) {
        size_t len;
        int parent, last;
        char name[256];

        while (*p == '/')
            p++;
        len = strcspn(p, "/");
        if (len == 0)
            break;
        if (len >= sizeof name || strlen(prefix) + len + 2 > sizeof prefix) {
            *why = "the destination path is too long";
            return -1;
        }
        memcpy(name, p, len);
        name[len] = '\0';
        p += len;
        last = p[strspn(p, "/")] == '\0';
        parent = openat2_resolve(c->root, prefix[0] ? prefix : "/",
                                 O_PATH | O_DIRECTORY | O_CLOEXEC,
                                 RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS);
        if (parent < 0) {
            *why = "its parent directory cannot be opened";
            return -1;
        }
        strcat(prefix, "/");
        strcat(prefix, name);
        fd = openat2_resolve(parent, name, O_PATH | O_CLOEXEC,
                             RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS);
        if (fd >= 0 || errno != ENOENT) {
            /* exists (maybe as a symlink: resolve it again inside the root below) */
            if (fd >= 0)
                close(fd);
            close(parent);
            continue;
        }
        if (mnt_id(parent) != root_id) {
            close(parent);
            *why = "it does not exist and its parent is not on the container's own "
                   "filesystem, so it cannot be created";
            return -1;
        }
        if (user) {
            /* Check what would be created where it really is, before creating it. */
            static char where[HELPER_MAX_PATH], err[VOL_ERR_LEN];
            container_path(c, parent, where, sizeof where - 256);
            if (strlen(where) + strlen(name) + 2 >= sizeof where) {
                close(parent);
                *why = "the destination path is too long";
                return -1;
            }
            if (strcmp(where, "/") != 0)
                strcat(where, "/");
            strcat(where, name);
            if (vol_check_user_target("-", where, err, sizeof err) != 0) {
                close(parent);
                *why = "it resolves into a directory reserved for the system";
                return -1;
            }
        }
        if (!last || want_dir) {
            if (mkdirat(parent, name, 0755) != 0 && errno != EEXIST) {
                close(parent);
                *why = "it cannot be created";
                return -1;
            }
        } else {
            int f = openat(parent, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                           0644);
            if (f < 0) {
                close(parent);
                *why = "it cannot be created";
                return -1;
            }
            close(f);
        }
        close(parent);
    }
    fd = openat2_resolve(c->root, path, O_PATH | O_CLOEXEC,
                         RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS);
done:
    if (fd < 0) {
        *why = errno == ENOENT ? "the destination does not exist" : strerror(errno);
        return -1;
    }
    {
        struct stat st;
        if (fstat(fd, &st) != 0 || (want_dir && !S_ISDIR(st.st_mode)) ||
            (!want_dir && S_ISDIR(st.st_mode))) {
            close(fd);
            *why = want_dir ? "the destination is not a directory"
                            : "the destination is a directory but the source is not";
            return -1;
        }
    }
    return fd;
}

int volmount_target(const struct ctx *c, const char *path, int want_dir, const char **why)
{
    return open_target(c, path, want_dir, 0, why);
}

int volmount_user_target(const struct ctx *c, const char *path, int want_dir, const char **why)
{
    char where[HELPER_MAX_PATH], err[VOL_ERR_LEN];
    int fd = open_target(c, path, want_dir, 1, why);

    if (fd < 0)
        return -1;
    container_path(c, fd, where, sizeof where);
    if (vol_check_user_target("-", where, err, sizeof err) != 0) {
        close(fd);
        *why = "it resolves into a directory reserved for the system";
        return -1;
    }
    return fd;
}

void volmount_site(struct ctx *c, const char *text, const char *what)
{
    static struct volume_list list;
    static char err[VOL_ERR_LEN];

    if (vol_parse_map(text, 1, &list, err, sizeof err) != 0)
        die("FAILED to parse udiRoot configuration. (%s siteFs: %s)", what, err);
    for (size_t i = 0; i < list.n; i++) {
        const struct volume *v = &list.vol[i];
        unsigned attrs = ATTR_NOSUID | (path_under(v->target, "/dev") ? 0 : ATTR_NODEV) |
                         (v->flag[VOL_RO] ? ATTR_RO : 0);
        unsigned long prop = v->flag[VOL_SLAVE] ? MS_SLAVE
                             : v->flag[VOL_PRIVATE] ? MS_PRIVATE
                                                    : c->propagation;
        const char *why = NULL;
        struct stat st;
        int src, dst, mfd;

        if (v->flag[VOL_CACHE])
            die("FAILED to parse udiRoot configuration. (perNodeCache is for user volumes)");
        src = open(v->source, O_PATH | O_CLOEXEC);
        if (src < 0 || fstat(src, &st) != 0)
            die_errno("Cannot mount siteFs %s", v->source);
        dst = open_target(c, v->target, S_ISDIR(st.st_mode), 0, &why);
        if (dst < 0)
            die("Cannot mount siteFs %s to %s: %s", v->source, v->target, why);
        mfd = mnt_clone(src, v->flag[VOL_REC], attrs, v->source);
        mnt_attach(mfd, dst, 0, v->target);
        mnt_set(mfd, v->flag[VOL_REC], 0, prop, v->target);
        verbose("siteFs %s on %s", v->source, v->target);
        close(mfd);
        close(dst);
        close(src);
    }
    vol_list_free(&list);
}

/* A size key of udiRoot.conf; UINT64_MAX when unset (no limit). */
static uint64_t conf_size(const struct ctx *c, const char *key)
{
    const char *v = conf_get(c->conf, key);
    char err[VOL_ERR_LEN];
    uint64_t n = UINT64_MAX;

    if (v != NULL && *v != '\0' && vol_parse_size(v, &n, err, sizeof err) != 0)
        die("FAILED to parse udiRoot configuration. (%s: %s)", key, err);
    return n;
}

void volmount_check_caches(const struct ctx *c)
{
    const char *dir = conf_get(c->conf, "perNodeCachePath");
    const char *allowed = conf_get(c->conf, "perNodeCacheAllowedFsType");
    uint64_t max = conf_size(c, "perNodeCacheSizeLimit"), sum = 0;
    /* Unset: one launch may use as much as one cache may be; neither set: no limit. */
    uint64_t total = conf_size(c, "perNodeCacheTotalSizeLimit");
    char err[VOL_ERR_LEN];

    total = total == UINT64_MAX ? max : total;
    for (size_t i = 0; i < c->vols.n; i++) {
        const struct volume *v = &c->vols.vol[i];
        if (!v->flag[VOL_CACHE])
            continue;
        if (dir == NULL || !is_abs_clean_path(dir))
            die_user(DENIED, v->source, v->target, "perNodeCache is not available on this system");
        if (v->cache_size > max) {
            snprintf(err, sizeof err, "perNodeCache size %llu is over the site limit of %llu",
                     (unsigned long long)v->cache_size, (unsigned long long)max);
            die_user(DENIED, v->source, v->target, err);
        }
        if (allowed != NULL && *allowed != '\0' && !str_in_words("xfs", allowed))
            die_user(DENIED, v->source, v->target, "perNodeCache fs xfs is not allowed");
        sum = v->cache_size > UINT64_MAX - sum ? UINT64_MAX : sum + v->cache_size;
        if (sum > total) {
            snprintf(err, sizeof err,
                     "the perNodeCaches of this launch add up to %llu bytes, over the site "
                     "total of %llu (perNodeCacheTotalSizeLimit)",
                     (unsigned long long)sum, (unsigned long long)total);
            die_user(DENIED, v->source, v->target, err);
        }
    }
}

/* ftruncate the cache file to size.  The caller's RLIMIT_FSIZE (ours in run mode) is a
 * limit on the user's own files; this file is root's and its size the site's limit
 * checked, so the limit is lifted for the call (the hard one too where root may) and put
 * back for the user's command.  A hard limit below the size is refused with a message
 * (exceeding it would kill us with SIGXFSZ). */
static void size_cache_file(int fd, uint64_t size)
{
    struct rlimit saved, none = {RLIM_INFINITY, RLIM_INFINITY}, soft;
    int rc, e;

    if (getrlimit(RLIMIT_FSIZE, &saved) != 0)
        die_errno("Cannot read the file size limit");
    soft.rlim_cur = soft.rlim_max = saved.rlim_max;
    if (setrlimit(RLIMIT_FSIZE, &none) != 0 && setrlimit(RLIMIT_FSIZE, &soft) != 0)
        die_errno("Cannot lift the file size limit for the perNodeCache file");
    if (getrlimit(RLIMIT_FSIZE, &soft) != 0 ||
        (soft.rlim_cur != RLIM_INFINITY && soft.rlim_cur < size)) {
        if (setrlimit(RLIMIT_FSIZE, &saved) != 0)
            die_errno("Cannot restore the file size limit");
        die("Cannot create a perNodeCache of %llu bytes: your hard file size limit is %llu "
            "bytes (ulimit -H -f). Raise it or ask for a smaller cache.",
            (unsigned long long)size, (unsigned long long)soft.rlim_cur);
    }
    rc = fchmod(fd, 0600) == 0 && ftruncate(fd, (off_t)size) == 0 ? 0 : -1;
    e = errno;
    if (setrlimit(RLIMIT_FSIZE, &saved) != 0)
        die_errno("Cannot restore the file size limit");
    errno = e;
    if (rc != 0)
        die_errno("Cannot size the perNodeCache file");
}

static void cache_mount(struct ctx *c, const struct volume *v, int dst)
{
    const char *dir = conf_get(c->conf, "perNodeCachePath");
    const char *mkfs = conf_get(c->conf, "mkfsXfsPath");
    char dev[64], label[64], fdp[32];
    int fd, lfd, mfd, status;

    /* path, size limits and fs type: volmount_check_caches, before anything is built */
    if (mkfs == NULL || *mkfs == '\0')
        mkfs = "/sbin/mkfs.xfs";
    if (mkfs[0] != '/')
        die("FAILED to parse udiRoot configuration. (mkfsXfsPath must be absolute)");
    /* O_TMPFILE: the file never has a name, so no kill at any moment leaves one behind;
     * the fd (and later the loop device) keeps it alive. */
    fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0)
        die_errno("Cannot create the perNodeCache file in %s (perNodeCachePath must be a "
                  "directory on a filesystem with O_TMPFILE, such as xfs, ext4 or tmpfs)", dir);
    size_cache_file(fd, v->cache_size);
    {
        const char *argv[] = {mkfs, "-q", fd_path(3, fdp, sizeof fdp), NULL};
        /* xfsprogs >= 5.19 refuses filesystems under 300 MiB unless it believes it runs
         * under fstests; small caches work fine, so say so (fixed values, ours). */
        static const char *const small[] = {"TEST_DIR=/nonexistent", "TEST_DEV=/nonexistent",
                                            "QA_CHECK_FS=1", NULL};
        status = run_program(argv, "/", fd, 1, v->cache_size < SMALL_XFS ? small : NULL);
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        die("Cannot create the perNodeCache filesystem for %s (%s failed with status %d; "
            "XFS needs a size of at least 16M)",
            v->target, mkfs, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    snprintf(label, sizeof label, "perNodeCache_uid%lu", (unsigned long)c->id.uid);
    lfd = loop_attach(fd, 0, label, dev, sizeof dev);
    close(fd);
    mfd = mnt_new("xfs", dev, NULL, ATTR_NOSUID | ATTR_NODEV, "perNodeCache");
    close(lfd);
    if (fchownat(mfd, "", c->id.uid, c->id.gid, AT_EMPTY_PATH) != 0)
        die_errno("Cannot chown the perNodeCache root");
    mnt_attach(mfd, dst, MS_PRIVATE, v->target);
    verbose("perNodeCache of %llu bytes on %s", (unsigned long long)v->cache_size, v->target);
    close(mfd);
}

void volmount_user(struct ctx *c)
{
    for (size_t i = 0; i < c->vols.n; i++) {
        const struct volume *v = &c->vols.vol[i];
        char err[VOL_ERR_LEN], where[HELPER_MAX_PATH];
        const char *why = NULL;
        int src = -1, dst, mfd;

        if (!v->flag[VOL_CACHE]) {
            src = volmount_open_as_user(&c->id, v->source, 1);
            if (src < 0)
                die_user(DENIED, v->source, v->target,
                    errno == ENOTDIR ? "the source is not a directory"
                    : errno == ENOENT ? "the source does not exist"
                    : errno == EACCES ? "you cannot access the source"
                                      : strerror(errno));
        }
        dst = open_target(c, v->target, 1, 1, &why);
        if (dst < 0)
            die_user(DENIED, v->source, v->target, why);
        container_path(c, dst, where, sizeof where);
        if (vol_check_user_target(v->source, where, err, sizeof err) != 0)
            die_user("%s (the destination resolves to %s)", err, where);
        if (v->flag[VOL_CACHE]) {
            cache_mount(c, v, dst);
        } else {
            mfd = mnt_clone(src, 0, ATTR_NOSUID | ATTR_NODEV | (v->flag[VOL_RO] ? ATTR_RO : 0),
                            v->source);
            mnt_attach(mfd, dst, c->propagation, v->target);
            verbose("volume %s on %s", v->source, v->target);
            close(mfd);
            close(src);
        }
        close(dst);
    }
}
