/*
 * enter.c - the last privileged steps.  Order matters:
 *
 *   chroot (needs CAP_SYS_CHROOT)
 *   drop the whole bounding set, clear ambient caps (need CAP_SETPCAP)
 *   setgroups, setresgid, setresuid (need CAP_SETGID / CAP_SETUID)
 *   clear any capability left (inheritable survives setuid)
 *   PR_SET_NO_NEW_PRIVS: no setuid file, no file capability can give anything back
 *   verify all of it; any doubt aborts with status 1
 *
 * After that the helper is an ordinary process of the user; chdir, userhooks and
 * exec happen with the user's rights.
 */
#define _GNU_SOURCE
#include "enter.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "conf.h" /* module_get */
#include "util.h"

#define DEFAULT_PATH "/usr/local/bin:/usr/bin:/bin"

static void caps(int set_zero)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];

    memset(data, 0, sizeof data);
    if (set_zero) {
        if (syscall(SYS_capset, &hdr, data) != 0)
            die_errno("Cannot clear capabilities");
        return;
    }
    if (syscall(SYS_capget, &hdr, data) != 0)
        die_errno("Cannot read capabilities");
    for (int i = 0; i < 2; i++)
        if (data[i].effective || data[i].permitted || data[i].inheritable)
            die("Failed to drop privileges: capabilities remain");
}

static void drop_privileges(const struct ident *id)
{
    uid_t r, e, s;
    gid_t rg, eg, sg;
    gid_t groups[IDENT_MAX_GROUPS + 1];
    int n;

    /* Every capability the kernel knows: PR_CAPBSET_READ fails past the last one. */
    for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0)
            die_errno("Failed to drop capability %d from the bounding set", cap);
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0)
        die_errno("Failed to clear ambient capabilities");
    if (setgroups(id->ngroups, id->groups) != 0)
        die_errno("Failed to set supplementary groups");
    if (setresgid(id->gid, id->gid, id->gid) != 0)
        die_errno("Failed to set gid");
    if (setresuid(id->uid, id->uid, id->uid) != 0)
        die_errno("Failed to set uid");
    caps(1);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        die_errno("Failed to set no_new_privs");

    /* Verify: trust nothing that was not read back. */
    if (getresuid(&r, &e, &s) != 0 || r != id->uid || e != id->uid || s != id->uid)
        die("Failed to drop privileges: uid");
    if (getresgid(&rg, &eg, &sg) != 0 || rg != id->gid || eg != id->gid || sg != id->gid)
        die("Failed to drop privileges: gid");
    n = getgroups(IDENT_MAX_GROUPS + 1, groups);
    if (n < 0 || (size_t)n != id->ngroups)
        die("Failed to drop privileges: groups");
    for (int i = 0; i < n; i++) { /* the kernel keeps them sorted, not in our order */
        size_t k = 0;
        while (k < id->ngroups && id->groups[k] != groups[i])
            k++;
        if (k == id->ngroups || groups[i] == 0)
            die("Failed to drop privileges: groups");
    }
    caps(0);
    for (int cap = 0, r; (r = prctl(PR_CAPBSET_READ, cap, 0, 0, 0)) >= 0; cap++)
        if (r != 0)
            die("Failed to drop privileges: bounding set");
    if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
        die("Failed to drop privileges: no_new_privs");
    if (setresuid(0, 0, 0) == 0 || setresgid(0, 0, 0) == 0)
        die("Failed to drop privileges: root can be regained");
}

static void userhooks(const struct ctx *c, char *const envp[])
{
    for (size_t i = 0; i < c->n_modules; i++) {
        const char *hook = module_get(c->conf, c->modules[i], "userhook");
        pid_t pid;
        int status;

        if (hook == NULL || *hook == '\0')
            continue;
        pid = fork();
        if (pid < 0)
            die_errno("Failed to setup module %s", c->modules[i]);
        if (pid == 0) {
            char *const argv[] = {"/bin/sh", (char *)hook, NULL};
            execve("/bin/sh", argv, envp);
            dprintf(STDERR_FILENO, "/bin/sh: %s\n", strerror(errno));
            _exit(127);
        }
        while (waitpid(pid, &status, 0) < 0)
            if (errno != EINTR)
                die_errno("Failed to setup module %s", c->modules[i]);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            die("Failed to setup module %s", c->modules[i]);
    }
}

void enter_user(const struct ctx *c, int root)
{
    if (fchdir(root) != 0 || chroot(".") != 0 || chdir("/") != 0)
        die_errno("Failed to chroot to the container");
    close(root);
    drop_privileges(&c->id);
    verbose("privileges dropped");
}

void enter(const struct ctx *c, int root, const char *workdir, char *const argv[],
           char *const envp[])
{
    const char *path = DEFAULT_PATH;

    enter_user(c, root);

    if (workdir != NULL && chdir(workdir) != 0)
        warn("Failed to switch to working dir: %s, staying in /", workdir);
    userhooks(c, envp);

    /* execvpe searches our own PATH (not envp's): give it the container's. */
    for (size_t i = 0; envp[i] != NULL; i++)
        if (strncmp(envp[i], "PATH=", 5) == 0)
            path = envp[i] + 5;
    if (setenv("PATH", path, 1) != 0)
        die_errno("Cannot set PATH");
    execvpe(argv[0], argv, envp);
    warn("%s: %s", argv[0], strerror(errno));
    _exit(127);
}
