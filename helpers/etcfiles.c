/*
 * etcfiles.c - populate the container's /etc.  Everything is written into
 * directory fds of the container's own tmpfs; nothing of the image is involved
 * yet (image /etc entries are added later and never overwrite these).
 */
#define _GNU_SOURCE
#include "etcfiles.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "copy.h"
#include "util.h"

#define NSSWITCH                                                                         \
    "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n"     \
    "protocols: files\nservices: files\nethers: files\nrpc: files\nnetgroup: files\n"

/* A growing output buffer. */
struct buf {
    char *data;
    size_t len, cap;
};

static void buf_add(struct buf *b, const char *s)
{
    size_t n = strlen(s);

    if (b->len + n + 1 > b->cap) {
        size_t cap = (b->len + n + 1) * 2;
        char *p = realloc(b->data, cap);
        if (p == NULL)
            die("shifter-helper: out of memory");
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n + 1);
    b->len += n;
}

static long max_groups(const struct udiroot_conf *conf)
{
    const char *v = conf_get(conf, "maxGroupCount");
    char *end;
    long n;

    if (v == NULL || *v == '\0')
        return 0;
    errno = 0;
    n = strtol(v, &end, 10);
    if (errno != 0 || *end != '\0' || n < 0)
        die("FAILED to parse udiRoot configuration. (maxGroupCount must be a whole number)");
    return n;
}

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
            copy_tree(s, t, e->d_name);
            close(s);
            close(t);
        }
    }
    if (errno != 0)
        die_errno("Cannot read etcPath %s", path);
    closedir(d);
    close(src);
}

/* Step 8: groups containing the user list only the user (up to maxGroupCount); the
 * others list nobody; gid 0 groups are dropped. */
static void filter_group(int etc, const struct udiroot_conf *conf, const struct ident *id)
{
    long max = max_groups(conf), listed = 0;
    struct buf out = {0};
    char *text, *cursor, *line;
    size_t len;

    if (read_small_file_at(etc, "group", 0, &text, &len) != 0) {
        if (errno == ENOENT)
            return;
        die_errno("Cannot read the container's /etc/group");
    }
    buf_add(&out, "");
    cursor = text;
    while ((line = ident_next_line(&cursor)) != NULL) {
        struct gr_fields f;
        int mine = 0;
        char num[16];

        if (ident_parse_gr_line(line, &f) != 0 || f.gid == 0)
            continue;
        if (strcmp(f.name, id->name) == 0)
            mine = 1;
        for (char *m = f.members; !mine && *m;) {
            size_t n = strcspn(m, ",");
            if (n == strlen(id->name) && strncmp(m, id->name, n) == 0)
                mine = 1;
            m += n;
            if (*m == ',')
                m++;
        }
        buf_add(&out, f.name);
        snprintf(num, sizeof num, ":x:%lu:", f.gid);
        buf_add(&out, num);
        if (mine && (max <= 0 || listed < max)) {
            buf_add(&out, id->name);
            listed++;
        }
        buf_add(&out, "\n");
    }
    write_file_at(etc, "group", out.data, out.len, 0644);
    free(out.data);
    free(text);
}

/* ---- populateEtcDynamically ------------------------------------------------------- */

static int clean_field(const char *s)
{
    return strchr(s, ':') == NULL && strchr(s, '\n') == NULL;
}

static void add_pw(struct buf *out, const char *name, unsigned long uid, unsigned long gid,
                   const char *gecos, const char *home, const char *shell)
{
    char num[48];

    if (!clean_field(name) || !clean_field(gecos) || !clean_field(home) ||
        !clean_field(shell) || name[0] == '\0')
        return;
    buf_add(out, name);
    snprintf(num, sizeof num, ":x:%lu:%lu:", uid, gid);
    buf_add(out, num);
    buf_add(out, gecos);
    buf_add(out, ":");
    buf_add(out, home);
    buf_add(out, ":");
    buf_add(out, shell);
    buf_add(out, "\n");
}

/* Up to 64 users: the caller first, then usersToImport. */
#define MAX_USERS 64
struct users {
    const char *names[MAX_USERS];
    size_t n;
    unsigned long gids[MAX_USERS];
    size_t ngids;
};

static void dynamic_passwd(int etc, const struct udiroot_conf *conf, const struct ident *id,
                           struct users *u)
{
    const char *imports = conf_get(conf, "usersToImport");
    int libc = config_flag(conf_get(conf, "allowLibcPwdCalls"), 0);
    struct buf out = {0};
    char *copy = xstrdup(imports ? imports : ""), *save = NULL;
    char *text = NULL;
    size_t len;

    u->names[u->n++] = id->name;
    for (char *w = strtok_r(copy, " \t", &save); w && u->n < MAX_USERS;
         w = strtok_r(NULL, " \t", &save)) {
        size_t i;
        for (i = 0; i < u->n && strcmp(u->names[i], w) != 0; i++)
            ;
        if (i == u->n)
            u->names[u->n++] = w;
    }
    buf_add(&out, "");
    if (!libc) {
        int dfd = open(conf_get(conf, "etcPath"), O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0 || read_small_file_at(dfd, "passwd", 1, &text, &len) != 0)
            die_errno("Cannot read %s/passwd", conf_get(conf, "etcPath"));
        close(dfd);
    }
    for (size_t i = 0; i < u->n; i++) {
        if (libc) {
            struct passwd *pw = getpwnam(u->names[i]);
            if (pw == NULL)
                continue;
            add_pw(&out, pw->pw_name, pw->pw_uid, pw->pw_gid, pw->pw_gecos, pw->pw_dir,
                   pw->pw_shell);
            u->gids[u->ngids++] = pw->pw_gid;
        } else {
            char *dup = xstrdup(text), *cursor = dup, *line;
            while ((line = ident_next_line(&cursor)) != NULL) {
                struct pw_fields f;
                if (ident_parse_pw_line(line, &f) == 0 && strcmp(f.name, u->names[i]) == 0) {
                    add_pw(&out, f.name, f.uid, f.gid, f.gecos, f.home, f.shell);
                    u->gids[u->ngids++] = f.gid;
                    break;
                }
            }
            free(dup);
        }
    }
    write_file_at(etc, "passwd", out.data, out.len, 0644);
    free(out.data);
    free(text);
    /* names point into copy: keep it for dynamic_group (freed at exit/exec) */
}

static int has_gid(const struct ident *id, unsigned long gid)
{
    if (gid == id->gid)
        return 1;
    for (size_t i = 0; i < id->ngroups; i++)
        if (id->groups[i] == gid)
            return 1;
    return 0;
}

static void dynamic_group(int etc, const struct udiroot_conf *conf, const struct ident *id,
                          const struct users *u)
{
    int libc = config_flag(conf_get(conf, "allowLibcPwdCalls"), 0);
    long max = max_groups(conf), listed = 0;
    unsigned long want[IDENT_MAX_GROUPS + MAX_USERS + 1], seen[IDENT_MAX_GROUPS + MAX_USERS + 1];
    size_t nwant = 0, nseen = 0;
    struct buf out = {0};
    char *text = NULL;
    size_t len;

    want[nwant++] = id->gid;
    for (size_t i = 0; i < id->ngroups; i++)
        want[nwant++] = id->groups[i];
    for (size_t i = 0; i < u->ngids; i++)
        want[nwant++] = u->gids[i];
    if (!libc) {
        int dfd = open(conf_get(conf, "etcPath"), O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
            die_errno("Cannot open etcPath");
        if (read_small_file_at(dfd, "group", 1, &text, &len) != 0 && errno != ENOENT)
            die_errno("Cannot read %s/group", conf_get(conf, "etcPath"));
        close(dfd);
    }
    buf_add(&out, "");
    for (size_t i = 0; i < nwant; i++) {
        unsigned long gid = want[i];
        const char *name = NULL;
        char *dup = NULL, namebuf[IDENT_MAX_NAME], num[32];
        size_t k;

        for (k = 0; k < nseen && seen[k] != gid; k++)
            ;
        if (gid == 0 || k < nseen)
            continue;
        seen[nseen++] = gid;
        if (libc) {
            struct group *gr = getgrgid((gid_t)gid);
            if (gr != NULL && strlen(gr->gr_name) < sizeof namebuf) {
                snprintf(namebuf, sizeof namebuf, "%s", gr->gr_name);
                name = namebuf;
            }
        } else if (text != NULL) {
            char *cursor, *line;
            dup = xstrdup(text);
            cursor = dup;
            while (name == NULL && (line = ident_next_line(&cursor)) != NULL) {
                struct gr_fields f;
                if (ident_parse_gr_line(line, &f) == 0 && f.gid == gid)
                    name = f.name;
            }
        }
        if (name != NULL && name[0] != '\0' && clean_field(name) && strchr(name, ',') == NULL) {
            buf_add(&out, name);
            snprintf(num, sizeof num, ":x:%lu:", gid);
            buf_add(&out, num);
            if (has_gid(id, gid) && (max <= 0 || listed < max)) {
                buf_add(&out, id->name);
                listed++;
            }
            buf_add(&out, "\n");
        }
        free(dup);
    }
    write_file_at(etc, "group", out.data, out.len, 0644);
    free(out.data);
    free(text);
}

void etc_populate(int root, const struct udiroot_conf *conf, const struct ident *id)
{
    int etc = open_dir_at(root, "etc");

    if (etc < 0)
        die_errno("Cannot open the container's /etc");
    /* 5.6 */
    if (symlinkat("/proc/mounts", etc, "mtab") != 0 && errno != EEXIST)
        die_errno("Cannot create etc/mtab");
    copy_host_file(etc, "hosts", "hosts");
    copy_host_file(etc, "resolv.conf", "resolv.conf");
    /* 5.7 */
    if (config_flag(conf_get(conf, "populateEtcDynamically"), 0)) {
        struct users u;
        memset(&u, 0, sizeof u);
        dynamic_passwd(etc, conf, id, &u);
        dynamic_group(etc, conf, id, &u);
        write_file_at(etc, "nsswitch.conf", NSSWITCH, strlen(NSSWITCH), 0644);
    } else {
        copy_etc_path(etc, conf);
        /* 5.8 */
        filter_group(etc, conf, id);
    }
    write_file_at(etc, "shadow", "", 0, 0600);
    close(etc);
}
