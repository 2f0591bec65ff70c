/*
 * etcfiles.c - populate the container's /etc.  Everything is written into
 * directory fds of the container's own tmpfs; nothing of the image is involved
 * yet (image /etc entries are added later and never overwrite these).  The rules
 * for passwd and group (the group filter, populateEtcDynamically) are the front
 * end's (udiroot/groups.py): they grant nothing, as the container's processes
 * have the kernel's ids and groups whatever the files say.
 */
#define _GNU_SOURCE
#include "etcfiles.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "copy.h"
#include "util.h"

/* Copy a host file (root's, symlinks followed) into etc/, 0644; absent is fine. */
static void copy_host_file(int etc, const char *path, const char *name)
{
    int dir = open("/etc", O_PATH | O_DIRECTORY | O_CLOEXEC);
    int fd;

    if (dir < 0)
        die_errno("Cannot open /etc");
    fd = openat(dir, path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        close(dir);
        if (errno == ENOENT)
            return;
        die_errno("Cannot read /etc/%s", path);
    }
    copy_fd_at(fd, path, etc, name, 0644, 0);
    close(fd);
    close(dir);
}

static void copy_etc_path(int etc, const struct udiroot_conf *conf)
{
    const char *path = conf_get(conf, "etcPath");
    int src = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    int rfd;
    DIR *d;
    struct dirent *e;

    if (src < 0)
        die_errno("Cannot open etcPath %s", path);
    rfd = openat(src, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (rfd < 0 || (d = fdopendir(rfd)) == NULL)
        die_errno("Cannot read etcPath %s", path);
    while ((errno = 0, e = readdir(d)) != NULL) {
        struct stat st;

        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        if (fstatat(rfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
            die_errno("Cannot stat %s/%s", path, e->d_name);
        if (S_ISREG(st.st_mode)) {
            copy_file_at(rfd, e->d_name, etc, e->d_name, 0644, 0);
            if (fchownat(etc, e->d_name, 0, 0, AT_SYMLINK_NOFOLLOW) != 0)
                die_errno("Cannot chown etc/%s", e->d_name);
        } else if (S_ISLNK(st.st_mode)) {
            copy_symlink_at(rfd, e->d_name, etc, e->d_name);
        } else if (S_ISDIR(st.st_mode)) {
            int s = open_dir_at(rfd, e->d_name), t;
            mkdir_at(etc, e->d_name, 0755);
            t = open_dir_at(etc, e->d_name);
            if (s < 0 || t < 0)
                die_errno("Cannot copy %s/%s", path, e->d_name);
            copy_tree(s, t, e->d_name, 0);
            close(s);
            close(t);
        }
    }
    if (errno != 0)
        die_errno("Cannot read etcPath %s", path);
    closedir(d);
    close(src);
}

void etc_populate(int root, const struct udiroot_conf *conf)
{
    int etc = open_dir_at(root, "etc");

    if (etc < 0)
        die_errno("Cannot open the container's /etc");
    /* 5.6 */
    if (symlinkat("/proc/mounts", etc, "mtab") != 0 && errno != EEXIST)
        die_errno("Cannot create etc/mtab");
    copy_host_file(etc, "hosts", "hosts");
    copy_host_file(etc, "resolv.conf", "resolv.conf");
    /* 5.7: with populateEtcDynamically the front end writes passwd and group */
    if (!config_flag(conf_get(conf, "populateEtcDynamically"), 0))
        copy_etc_path(etc, conf);
    write_file_at(etc, "shadow", "", 0, 0600);
    close(etc);
}

void etc_write_files(int root, char *const files[])
{
    static const char *const names[] = {"passwd", "group", "nsswitch.conf"};
    int etc = open_dir_at(root, "etc");

    if (etc < 0)
        die_errno("Cannot open the container's /etc");
    for (size_t i = 0; files != NULL && files[i] != NULL; i++) {
        size_t n = (size_t)(strchr(files[i], '=') - files[i]), k = 0;
        while (k < 3 && (strlen(names[k]) != n || strncmp(files[i], names[k], n) != 0))
            k++;
        if (k == 3)
            die("shifter-helper: --etc-fd: %.*s is not a file the front end writes",
                (int)(n > 64 ? 64 : n), files[i]);
        write_file_at(etc, names[k], files[i] + n + 1, strlen(files[i] + n + 1), 0644);
    }
    close(etc);
}
