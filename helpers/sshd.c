/*
 * sshd.c - the per-container sshd (docs/behaviour.md, 'Runtime: per-container sshd'; setup --ssh-pubkey KEY).
 *
 * sshd_start (setup, after the user volumes, while the container root is still writable):
 *   1 opt/udiImage/etc: the job's host key (setup --ssh-hostkey-fd) or a fresh one (the
 *     host's ssh-keygen, run as root), chowned to the user (a non-root sshd must read
 *     it); authorized_keys holding exactly KEY; sshd_config (port 1204 on 0.0.0.0 and ::,
 *     AllowUsers the user, public key only, no PAM); ssh_known_hosts holding the host key
 *     under one alias, and the client's ssh_config (port 1204, strict host key checking
 *     against that file alone), used by the ssh wrapper of optUdiImage
 *   2 the user's login shell must exist in the container (sshd runs commands with it):
 *     if it does not, the user's line of the container's /etc/passwd gets /bin/sh
 *   3 fork: the child becomes the user inside the container exactly as enter_user()
 *     does (chroot, no capabilities, the user's ids, no_new_privs) and execs
 *     /opt/udiImage/sbin/sshd -D -e in its own session, stderr in a memfd; the parent
 *     waits until that very process listens on port 1204 on every address family of
 *     the node (its socket inodes in /proc/PID/net/tcp*), failing at once, with the
 *     squatter named, if any other socket listens on that port; then records
 *     "pid starttime" in var/run/shifter-sshd (root's, on the container's root,
 *     read-only afterwards)
 *
 * sshd_stop (unsetup, and a setup that fails after sshd_start): first the recorded pid,
 * if it still runs this container's sshd (its executable is the container's own copy of
 * sshd: same device and inode, on the container's tmpfs), inside the container (its
 * root directory is the container root), as the user (real and effective uid the host
 * key's owner, never 0), with the recorded start time; then every other process of the
 * user inside the container (per-connection sshds and the sessions' processes, which
 * the job's cgroup does not hold).  Every check is made through a pidfd opened before
 * it, and SIGKILL goes through that pidfd: a pid reused meanwhile is never hit.  A
 * forged record names at worst a process that is killed anyway.
 */
#define _GNU_SOURCE
#include "sshd.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/pidfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "enter.h"
#include "util.h"

/* A formatted, malloc'd string; dies when out of memory. */
__attribute__((format(printf, 1, 2))) static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    char *out;
    int n;

    va_start(ap, fmt);
    n = vasprintf(&out, fmt, ap);
    va_end(ap);
    if (n < 0)
        die("shifter-helper: out of memory");
    return out;
}

#define SSHD_PORT 1204
#define KEYGEN "/usr/bin/ssh-keygen"
#define UDI "/opt/udiImage"
#define SSHD UDI "/sbin/sshd"
#define HOST_KEY "ssh_host_ed25519_key"
#define KNOWN_HOSTS "ssh_known_hosts"
#define HOST_ALIAS "shifter-job-node" /* the name every node's host key is checked under */
#define STATE "shifter-sshd" /* in var/run */
#define MAX_KEY 16384
#define START_TIMEOUT_MS 10000
#define STOP_TIMEOUT_MS 5000

static const char *const key_types[] = {
    "ssh-ed25519",         "ssh-rsa",
    "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
};

/* ---- the key ------------------------------------------------------------------------ */

static int b64(int ch)
{
    const char *set = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const char *p = ch ? strchr(set, ch) : NULL;
    return p ? (int)(p - set) : -1;
}

int sshd_check_key(const char *key, char *err, size_t len)
{
    size_t n = strlen(key), tlen, blen, out = 0;
    const char *sp = strchr(key, ' '), *data;
    unsigned char *blob;
    unsigned long bits = 0, name_len;
    int nbits = 0, known = 0, ok;

    if (n > MAX_KEY) {
        snprintf(err, len, "Invalid ssh public key: longer than %d bytes", MAX_KEY);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if ((unsigned char)key[i] < 0x20 || (unsigned char)key[i] >= 0x7f) {
            snprintf(err, len, "Invalid ssh public key: one line of printable ASCII expected");
            return -1;
        }
    }
    tlen = sp ? (size_t)(sp - key) : 0;
    for (size_t i = 0; i < sizeof key_types / sizeof key_types[0]; i++)
        known |= tlen == strlen(key_types[i]) && strncmp(key, key_types[i], tlen) == 0;
    if (!known) {
        snprintf(err, len, "Invalid ssh public key '%.40s': expected '<type> <base64> "
                 "[comment]' with type ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256/384/521 or "
                 "sk-*@openssh.com (no authorized_keys options)", key);
        return -1;
    }
    data = sp + 1;
    blen = strcspn(data, " ");
    ok = blen > 0 && blen % 4 == 0;
    for (int pad = 0; ok && pad < 2 && data[blen - 1] == '='; pad++)
        blen--;
    blob = xmalloc(blen);
    for (size_t i = 0; ok && i < blen; i++) {
        int v = b64((unsigned char)data[i]);
        ok = v >= 0;
        bits = (bits << 6 | (unsigned long)(v < 0 ? 0 : v)) & 0xffffff;
        if ((nbits += 6) >= 8) {
            nbits -= 8;
            blob[out++] = (unsigned char)(bits >> nbits);
        }
    }
    /* What OpenSSH calls a key blob: uint32 length, the type name, then the key. */
    name_len = out < 4 ? 0
                       : (unsigned long)blob[0] << 24 | (unsigned long)blob[1] << 16 |
                             (unsigned long)blob[2] << 8 | blob[3];
    ok = ok && out >= 4 && name_len == tlen && out > 4 + tlen + 4 &&
         memcmp(blob + 4, key, tlen) == 0;
    free(blob);
    if (!ok) {
        snprintf(err, len, "Invalid ssh public key: its data is not a base64 %.*s key",
                 (int)tlen, key);
        return -1;
    }
    return 0;
}

#define PEM_BEGIN "-----BEGIN OPENSSH PRIVATE KEY-----\n"
#define PEM_END "-----END OPENSSH PRIVATE KEY-----\n"

int sshd_check_host_key(const char *pem, const char *pub, char *err, size_t len)
{
    size_t n = strlen(pem), head = strlen(PEM_BEGIN), tail = strlen(PEM_END);

    if (sshd_check_key(pub, err, len) != 0)
        return -1;
    /* What ssh-keygen writes: the two marker lines around lines of base64. Nothing is
     * parsed as root beyond that; sshd (the user's) reads the key. */
    if (n > MAX_KEY || n < head + tail + 4 || strncmp(pem, PEM_BEGIN, head) != 0 ||
        strcmp(pem + n - tail, PEM_END) != 0 || pem[n - tail - 1] != '\n' ||
        strspn(pem + head, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                           "0123456789+/=\n") != n - head - tail) {
        snprintf(err, len, "Invalid job ssh host key: expected an OpenSSH private key file "
                 "(at most %d bytes)", MAX_KEY);
        return -1;
    }
    return 0;
}

/* ---- files in the container ------------------------------------------------------------- */

static int usable_shell(int root, const char *path)
{
    struct stat st;
    int fd, ok;

    if (path[0] != '/')
        return 0;
    fd = openat2_resolve(root, path, O_PATH | O_CLOEXEC, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS);
    if (fd < 0)
        return 0;
    ok = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 0111);
    close(fd);
    return ok;
}

/* sshd runs every command with the login shell of the container's /etc/passwd and refuses
 * a user whose shell does not exist: a user whose shell is not in the image (bash in a
 * busybox image) gets /bin/sh in the container's passwd, with a warning. */
static void check_shell(struct ctx *c)
{
    int etc = open_dir_at(c->root, "etc");
    char *text, *copy, *cursor, *line;
    size_t len;

    if (etc < 0 || read_small_file_at(etc, "passwd", 1, &text, &len) != 0)
        die_errno("Cannot start sshd: cannot read the container's /etc/passwd");
    copy = cursor = xstrdup(text);
    while ((line = ident_next_line(&cursor)) != NULL) {
        struct pw_fields f;
        const char *shell;
        size_t at, end;
        char *out;

        if (ident_parse_pw_line(line, &f) != 0 || strcmp(f.name, c->id.name) != 0)
            continue;
        if (f.uid != c->id.uid)
            die("Cannot start sshd: the container's /etc/passwd gives %s uid %lu, not %lu",
                c->id.name, f.uid, (unsigned long)c->id.uid);
        shell = f.shell[0] ? f.shell : "/bin/sh"; /* sshd's own default */
        if (usable_shell(c->root, shell))
            goto done;
        if (!usable_shell(c->root, "/bin/sh"))
            die_user("Cannot start sshd: the image has neither %s's login shell %s nor /bin/sh",
                c->id.name, shell);
        warn("setupRoot: %s's login shell %s is not in the image; ssh sessions use /bin/sh",
             c->id.name, shell);
        at = (size_t)(f.shell - copy); /* offsets in the copy are those of the text */
        end = at + strlen(f.shell);
        out = xasprintf("%.*s/bin/sh%s", (int)at, text, text + end);
        write_file_at(etc, "passwd", out, strlen(out), 0644);
        free(out);
        goto done;
    }
    die("Cannot start sshd: %s is not in the container's /etc/passwd", c->id.name);
done:
    free(copy);
    free(text);
    close(etc);
}

/* The address families this node has: sshd listens on each, and the start check wants
 * it to hold each (a family left out is a port another user can take). */
enum { FAM4 = 1, FAM6 = 2 };

static int node_families(void)
{
    int fams = 0;

    for (int v6 = 0; v6 < 2; v6++) {
        int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0) {
            fams |= v6 ? FAM6 : FAM4;
            close(fd);
        }
    }
    if (fams == 0)
        die_errno("Cannot start sshd: this node has neither IPv4 nor IPv6 sockets");
    return fams;
}

static void write_configs(struct ctx *c, int etc, const char *key, const char *host_pub,
                          int fams)
{
    char *text;
    const char *name = c->id.name;

    /* An sshd_config word: AllowUsers takes patterns, so no wildcard or blank. */
    if (name[0] == '\0' || strspn(name, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                        "0123456789._-") != strlen(name))
        die_user("Cannot start sshd for user '%s': the name holds characters sshd_config cannot "
            "hold ([A-Za-z0-9._-] only)", name);
    text = xasprintf("%s\n", key);
    write_file_at(etc, "authorized_keys", text, strlen(text), 0644);
    free(text);
    text = xasprintf(
        "# The container's own sshd (shifter-setup setup --ssh-pubkey): it runs\n"
        "# as %s, accepts only the job's key and nothing else.\n"
        "Port %d\n"
        "%s%s"
        "HostKey " UDI "/etc/" HOST_KEY "\n"
        "AuthorizedKeysFile " UDI "/etc/authorized_keys\n"
        "AuthorizedKeysCommand none\n"
        "AuthorizedPrincipalsFile none\n"
        "AllowUsers %s\n"
        "PermitRootLogin no\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "HostbasedAuthentication no\n"
        "GSSAPIAuthentication no\n"
        "KerberosAuthentication no\n"
        "UsePAM no\n"
        "StrictModes yes\n"
        "PermitUserEnvironment no\n"
        "X11Forwarding no\n"
        "PidFile none\n"
        "PrintMotd no\n"
        "PrintLastLog no\n"
        "UseDNS no\n"
        "SetEnv PATH=" UDI "/bin:/usr/local/bin:/usr/bin:/bin\n"
        "Subsystem sftp internal-sftp\n",
        name, SSHD_PORT, fams & FAM4 ? "ListenAddress 0.0.0.0\n" : "",
        fams & FAM6 ? "ListenAddress ::\n" : "", name);
    write_file_at(etc, "sshd_config", text, strlen(text), 0644);
    free(text);
    /* One host key for every node of the job (the job's, or this container's when
     * setup was given none): one known_hosts line under one alias covers them all. */
    text = xasprintf("# The job's sshd host key (every node of the job presents it)\n"
                     HOST_ALIAS " %s\n", host_pub);
    write_file_at(etc, KNOWN_HOSTS, text, strlen(text), 0644);
    free(text);
    text = xasprintf(
        "# ssh inside the container (" UDI "/bin/ssh): the job's other nodes run the\n"
        "# container's sshd on port %d with the job's host key, the only one trusted\n"
        "# (" UDI "/etc/" KNOWN_HOSTS "); the job's key is ~/.shifter/id_ed25519 (what\n"
        "# our Slurm plugin makes), ~/.udiRoot/id_rsa.key (Shifter's) or a usual one.\n"
        "Host *\n"
        "    Port %d\n"
        "    IdentityFile ~/.shifter/id_ed25519\n"
        "    IdentityFile ~/.udiRoot/id_rsa.key\n"
        "    IdentityFile ~/.ssh/id_ed25519\n"
        "    IdentityFile ~/.ssh/id_ecdsa\n"
        "    IdentityFile ~/.ssh/id_rsa\n"
        "    HostKeyAlias " HOST_ALIAS "\n"
        "    StrictHostKeyChecking yes\n"
        "    UserKnownHostsFile " UDI "/etc/" KNOWN_HOSTS "\n"
        "    GlobalKnownHostsFile " UDI "/etc/" KNOWN_HOSTS "\n"
        "    UpdateHostKeys no\n"
        "    CheckHostIP no\n"
        "    PreferredAuthentications publickey\n"
        "    LogLevel ERROR\n",
        SSHD_PORT, SSHD_PORT);
    write_file_at(etc, "ssh_config", text, strlen(text), 0644);
    free(text);
}

/* A fresh host key for this container alone (setup was given no job host key),
 * generated by the host's ssh-keygen into the container's tmpfs (a path of root's alone:
 * udiMount and directories the helper made).  Returns its public line (malloc'd). */
static char *fresh_host_key(struct ctx *c, int etc)
{
    char *path = xasprintf("%s" UDI "/etc/" HOST_KEY, c->udi), *text, err[256];
    const char *argv[] = {KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C",
                          "shifter container host key", "-f", path, NULL};
    int status;
    size_t len;

    status = run_program(argv, NULL, -1, 0, NULL);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        die("Cannot start sshd: %s failed (status %d)", KEYGEN,
            WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    free(path);
    if (read_small_file_at(etc, HOST_KEY ".pub", 1, &text, &len) != 0)
        die_errno("Cannot start sshd: cannot read the new host key's public half");
    text[strcspn(text, "\n")] = '\0';
    if (sshd_check_key(text, err, sizeof err) != 0)
        die("Cannot start sshd: %s made an unexpected public key: %s", KEYGEN, err);
    return text;
}

/* The container's host key: the job's (setup --ssh-hostkey-fd, the same on every node of
 * the job) or a fresh one; given to the user, 0600, since sshd runs as the user and must
 * read it.  Returns the public line for known_hosts (malloc'd). */
static char *host_key(struct ctx *c, int etc)
{
    char *pub;
    int fd;

    if ((unlinkat(etc, HOST_KEY, 0) != 0 && errno != ENOENT) ||
        (unlinkat(etc, HOST_KEY ".pub", 0) != 0 && errno != ENOENT))
        die_errno("Cannot start sshd: cannot replace the host key");
    if (c->ssh_host_key != NULL) {
        write_file_at(etc, HOST_KEY, c->ssh_host_key, strlen(c->ssh_host_key), 0600);
        pub = xstrdup(c->ssh_host_pub);
    } else {
        pub = fresh_host_key(c, etc);
    }
    fd = openat(etc, HOST_KEY, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 || fchown(fd, c->id.uid, c->id.gid) != 0 || fchmod(fd, 0600) != 0)
        die_errno("Cannot start sshd: cannot give the host key to %s", c->id.name);
    close(fd);
    return pub;
}

/* ---- processes ---------------------------------------------------------------------- */

/* ppid and start time (clock ticks after boot) from /proc/PID/stat; -1 if it is gone. */
static int proc_stat(pid_t pid, pid_t *ppid, unsigned long long *start)
{
    char path[64], buf[1024], *p;
    int fd, n, got;

    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    n = (int)read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    p = strrchr(buf, ')'); /* the command name may hold anything */
    if (p == NULL)
        return -1;
    /* fields 3 (state) .. 22 (starttime) */
    got = sscanf(p + 1, " %*s %d %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s"
                        " %*s %*s %*s %llu", ppid, start);
    return got == 2 ? 0 : -1;
}

struct sshd_id {
    dev_t root_dev, exe_dev;
    ino_t root_ino, exe_ino;
    uid_t uid; /* the user it runs as: never 0 */
};

/* Real and effective uid of pid are uid (and not 0)? */
static int runs_as(pid_t pid, uid_t uid)
{
    char path[64], buf[4096], *p;
    unsigned long r, e;
    int fd, n;

    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = (int)read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    p = strstr(buf, "\nUid:");
    return p != NULL && sscanf(p + 5, "%lu %lu", &r, &e) == 2 && uid != 0 && r == uid &&
           e == uid;
}

/* Does pid run inside the container as the user (and, with sshd, run its sshd)? */
static int ours(pid_t pid, const struct sshd_id *want, int sshd)
{
    char path[64];
    struct stat st;

    snprintf(path, sizeof path, "/proc/%d/exe", (int)pid);
    if (sshd &&
        (stat(path, &st) != 0 || st.st_dev != want->exe_dev || st.st_ino != want->exe_ino))
        return 0;
    snprintf(path, sizeof path, "/proc/%d/root", (int)pid);
    if (stat(path, &st) != 0 || st.st_dev != want->root_dev || st.st_ino != want->root_ino)
        return 0;
    return runs_as(pid, want->uid);
}

/* SIGKILL pid if (checked through a pidfd opened first) it is ours (see ours()) and, when
 * start is not 0, started then.  Returns the pidfd (to wait on) or -1. */
static int kill_if_ours(pid_t pid, const struct sshd_id *want, int sshd,
                        unsigned long long start)
{
    unsigned long long t;
    pid_t ppid;
    int fd = pidfd_open(pid, 0);

    if (fd < 0)
        return -1;
    if (!ours(pid, want, sshd) || proc_stat(pid, &ppid, &t) != 0 || (start && t != start)) {
        close(fd);
        return -1;
    }
    if (pidfd_send_signal(fd, SIGKILL, NULL, 0) != 0 && errno != ESRCH)
        warn("shifter-helper: cannot stop process %d: %s", (int)pid, strerror(errno));
    verbose("stopped %s %d", sshd ? "sshd" : "process", (int)pid);
    return fd;
}

static void wait_gone(int *fds, size_t n)
{
    struct timespec t0, now;

    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (size_t i = 0; i < n; i++) {
        struct pollfd p = {.fd = fds[i], .events = POLLIN};
        long ms;

        clock_gettime(CLOCK_MONOTONIC, &now);
        ms = STOP_TIMEOUT_MS - ((now.tv_sec - t0.tv_sec) * 1000 +
                                (now.tv_nsec - t0.tv_nsec) / 1000000);
        if (poll(&p, 1, ms > 0 ? (int)ms : 0) == 0)
            warn("shifter-helper: an sshd of the container did not exit");
        close(fds[i]);
    }
}

/* Kill the recorded listener (pid, start) first, so that no new connection comes in, then
 * everything else the user runs inside the container: the per-connection sshds and what
 * was started through them, which is not in the job's cgroup (sshd was started by the
 * prolog) and would outlive the job.  More rounds catch what forked while /proc was
 * being read. */
static void stop_all(pid_t pid, unsigned long long start, const struct sshd_id *want)
{
    int fds[1024];
    size_t n = 0;

    if (pid > 0) {
        int fd = kill_if_ours(pid, want, 1, start);
        if (fd >= 0)
            fds[n++] = fd;
        else if (kill(pid, 0) == 0)
            warn("shifter-helper: not stopping process %d of var/run/" STATE ": it is not "
                 "this container's sshd", (int)pid);
    }
    for (int round = 0; round < 10; round++) {
        DIR *d = opendir("/proc");
        struct dirent *e;
        int found = 0;

        if (d == NULL) {
            warn("shifter-helper: cannot read /proc: %s", strerror(errno));
            break;
        }
        while ((e = readdir(d)) != NULL) {
            char *end;
            long p = strtol(e->d_name, &end, 10);
            int fd;

            if (*end != '\0' || p <= 0 || p == pid)
                continue;
            if ((fd = kill_if_ours((pid_t)p, want, 0, 0)) < 0)
                continue;
            found = 1;
            if (n == sizeof fds / sizeof fds[0]) { /* full: wait for these, go on killing */
                wait_gone(fds, n);
                n = 0;
            }
            fds[n++] = fd;
        }
        closedir(d);
        if (!found)
            break;
    }
    wait_gone(fds, n);
}

/* What the container's sshd processes are: their root, their executable and their user
 * (the owner sshd_start gave the host key; a container whose key is root's has no sshd). */
static int sshd_id_of(int root, struct sshd_id *id)
{
    struct stat r, x, k;

    if (fstat(root, &r) != 0 || fstatat(root, SSHD + 1, &x, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISREG(x.st_mode) ||
        fstatat(root, (UDI "/etc/" HOST_KEY) + 1, &k, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISREG(k.st_mode) || k.st_uid == 0)
        return -1;
    id->root_dev = r.st_dev;
    id->root_ino = r.st_ino;
    id->exe_dev = x.st_dev;
    id->exe_ino = x.st_ino;
    id->uid = k.st_uid;
    return 0;
}

void sshd_stop(struct ctx *c)
{
    struct sshd_id want;
    unsigned long long start = 0;
    long pid = 0;
    int root, run;
    char *text;
    size_t len;

    if (c->sshd_pidfd >= 0) { /* this setup started it and is failing */
        if (pidfd_send_signal(c->sshd_pidfd, SIGKILL, NULL, 0) != 0 && errno != ESRCH)
            warn("shifter-helper: cannot stop sshd: %s", strerror(errno));
        if (c->root >= 0 && sshd_id_of(c->root, &want) == 0)
            stop_all(0, 0, &want);
        wait_gone(&c->sshd_pidfd, 1);
        c->sshd_pidfd = -1;
        return;
    }
    root = open(c->udi, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0 || sshd_id_of(root, &want) != 0) {
        if (root >= 0)
            close(root);
        return; /* no container, or none with an sshd */
    }
    /* The record: root's file on the container's own root (never the user's). */
    run = openat2_resolve(root, "var/run", O_PATH | O_DIRECTORY | O_CLOEXEC,
                          RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV);
    if (run >= 0 && read_small_file_at(run, STATE, 1, &text, &len) == 0) {
        char *end;
        errno = 0;
        pid = strtol(text, &end, 10);
        if (errno == 0 && *end == ' ')
            start = strtoull(end + 1, &end, 10);
        if (errno != 0 || pid <= 0 || pid > 0x3fffffff || start == 0 || *end != '\n') {
            warn("shifter-helper: ignoring a malformed var/run/" STATE);
            pid = 0;
            start = 0;
        }
        free(text);
    }
    if (run >= 0)
        close(run);
    stop_all((pid_t)pid, start, &want);
    close(root);
}

/* ---- starting it ---------------------------------------------------------------------- */

/* A TCP socket listening on SSHD_PORT, as /proc/PID/net/tcp{,6} shows it. */
struct listener {
    int fam;                              /* FAM4 or FAM6 */
    int wildcard;                         /* bound to 0.0.0.0 or :: */
    char addr[INET6_ADDRSTRLEN + 16];     /* "0.0.0.0:1204", "[::1]:1204" */
    unsigned long uid, inode;
};

/* "0100007F" (tcp) or four such words (tcp6): the kernel prints each 32-bit word of the
 * address in host order. */
static int parse_addr(const char *hex, int v6, char *out, size_t len, int *wildcard)
{
    unsigned char raw[16];
    size_t words = v6 ? 4 : 1;
    char ip[INET6_ADDRSTRLEN];

    if (strlen(hex) != words * 8)
        return -1;
    for (size_t i = 0; i < words; i++) {
        char word[9];
        uint32_t w;
        memcpy(word, hex + i * 8, 8);
        word[8] = '\0';
        w = (uint32_t)strtoul(word, NULL, 16);
        memcpy(raw + i * 4, &w, 4);
    }
    if (inet_ntop(v6 ? AF_INET6 : AF_INET, raw, ip, sizeof ip) == NULL)
        return -1;
    *wildcard = 1;
    for (size_t i = 0; i < words * 4; i++)
        *wildcard &= raw[i] == 0;
    snprintf(out, len, v6 ? "[%s]:%d" : "%s:%d", ip, SSHD_PORT);
    return 0;
}

/* Every socket listening on SSHD_PORT in pid's network namespace; returns how many (at
 * most max). */
static size_t port_listeners(pid_t pid, struct listener *out, size_t max)
{
    size_t n = 0;

    for (int v6 = 0; v6 < 2; v6++) {
        char path[64], *text, *cursor, *line;
        size_t len;
        int fd;

        snprintf(path, sizeof path, "/proc/%d/net/tcp%s", (int)pid, v6 ? "6" : "");
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        if (read_all_fd(fd, 64 * 1024 * 1024, &text, &len) != 0) {
            close(fd);
            continue;
        }
        close(fd);
        cursor = text;
        while ((line = ident_next_line(&cursor)) != NULL && n < max) {
            char hex[33];
            unsigned lport, state;
            unsigned long uid, inode;
            /* sl local:port remote:port st tx:rx tr:when retrnsmt uid timeout inode */
            if (sscanf(line, " %*s %32[0-9A-Fa-f]:%x %*s %x %*s %*s %*s %lu %*s %lu", hex,
                       &lport, &state, &uid, &inode) != 5 ||
                lport != SSHD_PORT || state != 0x0A)
                continue;
            if (parse_addr(hex, v6, out[n].addr, sizeof out[n].addr, &out[n].wildcard) != 0)
                continue;
            out[n].fam = v6 ? FAM6 : FAM4;
            out[n].uid = uid;
            out[n].inode = inode;
            n++;
        }
        free(text);
    }
    return n;
}

/* Does process pid hold socket inode among its fds? */
static int holds_socket(pid_t pid, unsigned long inode)
{
    char path[64], want[64];
    struct dirent *e;
    int found = 0;
    DIR *d;

    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
    snprintf(want, sizeof want, "socket:[%lu]", inode);
    if ((d = opendir(path)) == NULL)
        return 0;
    while (!found && (e = readdir(d)) != NULL) {
        char link[64];
        ssize_t l = readlinkat(dirfd(d), e->d_name, link, sizeof link - 1);
        if (l <= 0)
            continue;
        link[l] = '\0';
        found = strcmp(link, want) == 0;
    }
    closedir(d);
    return found;
}

/* The process that holds socket inode, for the message naming it (0: not found). */
static pid_t socket_owner(unsigned long inode)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    pid_t found = 0;

    if (d == NULL)
        return 0;
    while (found == 0 && (e = readdir(d)) != NULL) {
        char *end;
        long p = strtol(e->d_name, &end, 10);
        if (*end == '\0' && p > 0 && holds_socket((pid_t)p, inode))
            found = (pid_t)p;
    }
    closedir(d);
    return found;
}

enum start_state { START_WAIT, START_OK, START_TAKEN };

__attribute__((noreturn)) static void fail_with_log(int log, const char *what)
{
    char buf[2048];
    ssize_t n = pread(log, buf, sizeof buf - 1, 0);

    buf[n > 0 ? n : 0] = '\0';
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        buf[--n] = '\0';
    die("Failed to start sshd in the container: %s%s%s", what, buf[0] ? ":\n" : "", buf);
}

/* Where the start stands: OK once sshd (pid) itself listens on port 1204 on the wildcard
 * address of every family the node has (fams); TAKEN as soon as anything else listens on
 * that port, on any address of any family: it would get the job's ssh connections (a
 * more specific address wins; sshd skips an address it cannot bind and serves the rest);
 * *other is then that socket.  *have: the families sshd holds.  pid 0: sshd is gone,
 * every listener is someone else's. */
static enum start_state start_state(pid_t pid, int fams, int *have, struct listener *other)
{
    struct listener l[32];
    size_t n = port_listeners(pid > 0 ? pid : getpid(), l, sizeof l / sizeof l[0]);

    int taken = 0;

    *have = 0;
    for (size_t i = 0; i < n; i++) {
        if (pid > 0 && holds_socket(pid, l[i].inode)) {
            *have |= l[i].wildcard ? l[i].fam : 0;
        } else if (!taken) {
            *other = l[i];
            taken = 1;
        }
    }
    if (taken)
        return START_TAKEN;
    return (*have & fams) == fams ? START_OK : START_WAIT;
}

/* Fail naming the squatter: its address, its uid and (a scan of every process's fds,
 * done once) its pid. */
__attribute__((noreturn)) static void fail_taken(int log, const struct listener *other)
{
    char why[512], pid[32] = "";
    pid_t owner = socket_owner(other->inode);

    if (owner > 0)
        snprintf(pid, sizeof pid, " (pid %d)", (int)owner);
    snprintf(why, sizeof why, "port %d is taken: %s is a listening socket of uid %lu%s, "
             "which would receive the job's ssh connections; stop it", SSHD_PORT,
             other->addr, other->uid, pid);
    fail_with_log(log, why);
}

/* The child: its own session, stdin/stdout /dev/null, stderr the log; the user inside the
 * container; sshd.  die() here only reaches the log (the parent reports it). */
__attribute__((noreturn)) static void child(struct ctx *c, int log)
{
    static char *const argv[] = {SSHD, "-D", "-e", "-f", UDI "/etc/sshd_config", NULL};
    static char *const envp[] = {"PATH=/usr/local/bin:/usr/bin:/bin", NULL};
    static const int sigs[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGPIPE, SIGCHLD};
    sigset_t none;
    int null;

    g_cleanup = NULL; /* the container is the parent's to tear down, never the child's */
    if (dup2(log, STDERR_FILENO) != STDERR_FILENO)
        _exit(1);
    sigemptyset(&none);
    if (sigprocmask(SIG_SETMASK, &none, NULL) != 0)
        die_errno("sshd: sigprocmask");
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        if (signal(sigs[i], SIG_DFL) == SIG_ERR)
            die_errno("sshd: signal");
    if (setsid() < 0)
        die_errno("sshd: setsid");
    null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0 || dup2(null, STDIN_FILENO) < 0 || dup2(null, STDOUT_FILENO) < 0)
        die_errno("sshd: /dev/null");
    if (close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) != 0) /* sshd gets fds 0-2 only */
        die_errno("sshd: close_range");
    enter_user(c, c->root);
    execve(SSHD, argv, envp);
    die_errno("Cannot execute %s", SSHD);
}

static void record(struct ctx *c, pid_t pid)
{
    unsigned long long start;
    pid_t ppid;
    int run = openat2_resolve(c->root, "var/run", O_PATH | O_DIRECTORY | O_CLOEXEC,
                              RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV);
    char *text;

    if (run < 0)
        die_errno("Cannot open the container's /var/run");
    if (proc_stat(pid, &ppid, &start) != 0)
        die("sshd exited right after it started");
    text = xasprintf("%d %llu\n", (int)pid, start);
    write_file_at(run, STATE, text, strlen(text), 0644);
    free(text);
    close(run);
}


/* Milliseconds since *t0 (CLOCK_MONOTONIC). */
static long ms_since(const struct timespec *t0)
{
    struct timespec now;

    if (clock_gettime(CLOCK_MONOTONIC, &now) != 0)
        die_errno("clock_gettime");
    return (long)(now.tv_sec - t0->tv_sec) * 1000 + (now.tv_nsec - t0->tv_nsec) / 1000000;
}

void sshd_start(struct ctx *c, const char *key)
{
    int udi, etc, log, fams = node_families(), have;
    struct listener other;
    char *host_pub;
    struct stat st;
    struct timespec t0;
    pid_t pid;

    udi = openat2_resolve(c->root, UDI + 1, O_PATH | O_DIRECTORY | O_CLOEXEC,
                          RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV);
    if (udi < 0)
        die_errno("Cannot open the container's " UDI);
    if (fstatat(udi, "sbin/sshd", &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
        die("Cannot start sshd: optUdiImage (%s) has no sbin/sshd; build it with "
            "shifter-prep-udiimage (make udiimage)",
            conf_get(c->conf, "optUdiImage") ? conf_get(c->conf, "optUdiImage") : "unset");
    mkdir_at(udi, "etc", 0755);
    etc = open_dir_at(udi, "etc");
    if (etc < 0)
        die_errno("Cannot open the container's " UDI "/etc");
    host_pub = host_key(c, etc);
    write_configs(c, etc, key, host_pub, fams);
    free(host_pub);
    close(etc);
    close(udi);
    check_shell(c);

    log = memfd_create("shifter-sshd-log", MFD_CLOEXEC);
    if (log < 0)
        die_errno("Cannot start sshd: memfd_create");
    pid = fork();
    if (pid < 0)
        die_errno("Cannot start sshd: fork");
    if (pid == 0)
        child(c, log);
    c->sshd_pidfd = pidfd_open(pid, 0); /* from here on a failure stops it (teardown) */
    if (c->sshd_pidfd < 0)
        die_errno("Cannot start sshd: pidfd_open");
    /* Wall time, not a count of 20 ms naps: on a node with thousands of TCP sockets one
     * look at /proc/PID/net/tcp takes far longer than the nap. */
    if (clock_gettime(CLOCK_MONOTONIC, &t0) != 0)
        die_errno("Cannot start sshd: clock_gettime");
    for (long waited = 0;; waited = ms_since(&t0)) {
        struct timespec ms20 = {0, 20 * 1000 * 1000};
        enum start_state state;
        int status;
        pid_t w = waitpid(pid, &status, WNOHANG);

        if (w < 0)
            die_errno("Cannot start sshd: waitpid");
        state = start_state(w == pid ? 0 : pid, fams, &have, &other);
        /* Taken: fail once sshd is done binding (it exited, or it serves what it could
         * bind), so that its log says which bind failed. */
        if (state == START_TAKEN && (w == pid || have || waited >= START_TIMEOUT_MS))
            fail_taken(log, &other);
        if (w == pid && WIFEXITED(status))
            fail_with_log(log, WEXITSTATUS(status) == 1 ? "it could not be started"
                                                        : "sshd exited");
        if (w == pid)
            fail_with_log(log, "sshd was killed");
        if (state == START_OK)
            break;
        if (waited >= START_TIMEOUT_MS)
            fail_with_log(log, fams == (FAM4 | FAM6)
                                   ? "it did not listen on port 1204 (IPv4 and IPv6) "
                                     "within 10 s"
                                   : "it did not listen on port 1204 within 10 s");
        nanosleep(&ms20, NULL);
    }
    record(c, pid);
    close(log);
    verbose("sshd %d listening on port %d", (int)pid, SSHD_PORT);
}
