/*
 * shifter-setup - the root-only part of Shifter in Python (never setuid).
 *
 *   shifter-setup setup [options]     prepare the node's container for a job
 *   shifter-setup unsetup             remove it
 *
 * setupRoot and unsetupRoot (the Slurm prolog and epilog) run it as root.  It shares
 * the request checks (request.c) and the build (container.c) with the setuid
 * shifter-helper and adds what only root may ask for: the container in the caller's
 * mount namespace, the hostsfile, the per-container sshd (sshd.c) and the teardown.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "container.h"
#include "hosts.h"
#include "ident.h"
#include "request.h"
#include "sshd.h"
#include "teardown.h"
#include "util.h"

#define NO_USER "Failed to lookup username or attempted to run as root."
#define MAX_HOST_KEY 16384 /* bytes of the job's ssh host key file */

void usage(void)
{
    die("usage: shifter-setup setup --user NAME --uid U --gid G (--image-id ID | --local "
        "PATH) [--volume LIST]... [--modules LIST] [--nodes LIST] [--ssh-pubkey KEY "
        "[--ssh-hostkey-fd N --ssh-host-pubkey KEY]] [--etc-fd N] [--verbose]\n"
        "       shifter-setup unsetup [--verbose]");
}

/* ---- the user named by root (setup --user --uid --gid) ---------------------------- */

/*
 * The user's supplementary groups as the host has them now (getgrouplist: /etc/group,
 * LDAP, sssd, ...), not etcPath's copy of group, which is refreshed only now and then: a
 * user just removed from a group must not keep reaching its files through a volume.  gid
 * 0 becomes the primary gid, as for a caller's groups.
 */
static void groups_from_host(struct ident *id)
{
    gid_t list[IDENT_MAX_GROUPS];
    int n = IDENT_MAX_GROUPS;

    if (getgrouplist(id->name, id->gid, list, &n) < 0)
        die("%s is in more than %d groups; shifter cannot keep them all", id->name,
            IDENT_MAX_GROUPS);
    id->groups[id->ngroups++] = id->gid;
    for (int i = 0; i < n; i++) {
        gid_t g = list[i] == 0 ? id->gid : list[i];
        int seen = 0;
        for (size_t k = 0; k < id->ngroups; k++)
            seen |= id->groups[k] == g;
        if (!seen)
            id->groups[id->ngroups++] = g;
    }
}

static void ident_from_args(const char *name, const char *uid, const char *gid,
                            struct ident *id)
{
    unsigned long u, g;

    memset(id, 0, sizeof *id);
    if (name == NULL || uid == NULL || gid == NULL)
        die("setup needs --user NAME --uid UID --gid GID");
    if (ident_parse_id(uid, strlen(uid), &u) != 0 || ident_parse_id(gid, strlen(gid), &g) != 0)
        die("Invalid --uid or --gid (decimal ids expected)");
    if (u == 0 || g == 0)
        die(NO_USER);
    if (!ident_name_ok(name))
        die("Invalid user name '%s'", name);
    id->uid = (uid_t)u;
    id->gid = (gid_t)g;
    snprintf(id->name, sizeof id->name, "%s", name);
    groups_from_host(id);
}

/* ---- the build ----------------------------------------------------------------------- */

/* setup's own options */
static const char *g_user, *g_uid, *g_gid, *g_ssh_key, *g_host_pub;
static int g_host_key_fd = -1;

static int setup_option(const char *a, const char *v, struct options *o)
{
    const char **slot = strcmp(a, "--user") == 0              ? &g_user
                        : strcmp(a, "--uid") == 0             ? &g_uid
                        : strcmp(a, "--gid") == 0             ? &g_gid
                        : strcmp(a, "--nodes") == 0           ? &ctx.nodes
                        : strcmp(a, "--ssh-pubkey") == 0      ? &g_ssh_key
                        : strcmp(a, "--ssh-host-pubkey") == 0 ? &g_host_pub
                                                              : NULL;
    (void)o;
    if (strcmp(a, "--ssh-hostkey-fd") == 0 && g_host_key_fd < 0) {
        g_host_key_fd = parse_fd(a, v);
        return 1;
    }
    if (slot == NULL || *slot != NULL)
        return 0;
    *slot = v;
    return 1;
}

/* The job's ssh host key from --ssh-hostkey-fd: a memfd holding the private key file
 * (never an argument: argv is anybody's to read in /proc). */
static char *read_host_key(int fd)
{
    char *data = xmalloc(MAX_HOST_KEY + 1);
    size_t len = 0;
    struct stat st;

    if (fstat(fd, &st) != 0)
        die_errno("shifter-helper: --ssh-hostkey-fd %d", fd);
    if (!S_ISREG(st.st_mode) || st.st_size > MAX_HOST_KEY)
        die("shifter-helper: --ssh-hostkey-fd must be a regular file (memfd) of at most %d "
            "bytes", MAX_HOST_KEY);
    for (;;) {
        ssize_t r = pread(fd, data + len, MAX_HOST_KEY - len, (off_t)len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            die_errno("shifter-helper: cannot read --ssh-hostkey-fd");
        if (r == 0)
            break;
        len += (size_t)r;
        if (len == MAX_HOST_KEY)
            break; /* the check refuses it: longer than a key */
    }
    close(fd);
    data[len] = '\0';
    if (strlen(data) != len)
        die("shifter-helper: the job's ssh host key holds a NUL byte");
    return data;
}

static char *g_signature; /* written last: from then on shifter enters this container */

/* shifter-setup's own steps of the build (container.c calls them). */
static void setup_step(struct ctx *c, enum build_step step)
{
    if (step == STEP_CLEAR) {
        sshd_stop(c); /* a previous job's, left by a missed unsetup */
        if (teardown(c) != 0)
            die("Cannot clear %s and %s", c->udi, c->loop);
    }
    else if (step == STEP_SITE_FILES && c->nodes != NULL)
        hosts_write(c->root, c->nodes);
    else if (step == STEP_USER_VOLUMES) {
        int var = open_dir_at(c->root, "var");
        if (c->ssh_key != NULL)
            sshd_start(c, c->ssh_key);
        if (var < 0)
            die_errno("Cannot open the container's /var");
        write_file_at(var, "shifterConfig.json", g_signature, strlen(g_signature), 0644);
        close(var);
    }
}

static void cleanup(void)
{
    sshd_stop(&ctx);
    teardown(&ctx);
}

int main(int argc, char **argv)
{
    char err[VOL_ERR_LEN];
    struct options o;

    if (getuid() != 0)
        die("shifter-setup is for root only (setupRoot, unsetupRoot)");
    helper_init(argc);
    if (strcmp(argv[1], "unsetup") == 0) {
        if (argc == 3 && strcmp(argv[2], "--verbose") == 0)
            g_verbose = 1;
        else if (argc != 2)
            usage();
        sshd_stop(&ctx); /* first: it runs inside what is unmounted next */
        return teardown(&ctx) == 0 ? 0 : 1;
    }
    if (strcmp(argv[1], "setup") != 0)
        usage();
    parse_options(argc, argv, 2, setup_option, &o);
    if (o.argv != NULL)
        usage();
    ident_from_args(g_user, g_uid, g_gid, &ctx.id);
    /* The user's groups for the whole setup, as the caller's are in run: what is opened
     * with the user's fs ids (volume sources, --local) is reached with them.  Root's own
     * work needs no group (its children set theirs: run_program, the sshd). */
    if (setgroups(ctx.id.ngroups, ctx.id.groups) != 0)
        die_errno("Cannot switch to the user's groups");
    g_user_error_status = 2; /* the prolog fails the job, not the node (PROTOCOL.md) */
    if (g_host_key_fd >= 0)
        ctx.ssh_host_key = read_host_key(g_host_key_fd);
    ctx.etc_files = read_records(o.etc_fd, "/etc files (--etc-fd)");
    ctx.setup_mode = 1;
    ctx.setup_step = setup_step;
    common_checks(&o);
    if (ctx.nodes != NULL && hosts_validate(ctx.nodes, err, sizeof err) != 0)
        die("%s", err);
    if (g_ssh_key != NULL && sshd_check_key(g_ssh_key, err, sizeof err) != 0)
        die_user("%s", err);
    ctx.ssh_key = g_ssh_key;
    if ((g_host_key_fd >= 0) != (g_host_pub != NULL) || (g_host_pub != NULL && g_ssh_key == NULL))
        die("shifter-helper: --ssh-hostkey-fd and --ssh-host-pubkey go together, with "
            "--ssh-pubkey");
    if (g_host_pub != NULL) {
        if (sshd_check_host_key(ctx.ssh_host_key ? ctx.ssh_host_key : "", g_host_pub, err,
                                sizeof err) != 0)
            die_user("%s", err); /* it comes from the user's submission */
        ctx.ssh_host_pub = g_host_pub;
    }
    g_signature = container_signature(&ctx);
    g_cleanup = cleanup; /* from here on a failure unmounts what was built */
    container_build(&ctx);
    g_cleanup = NULL;
    verbose("setup done");
    return 0;
}
