/* shifter_slurm.so: the Shifter SPANK plugin (docs/behaviour.md, 'Slurm plugin').
 *
 * Thin on purpose (pyxis is the model): it only moves strings between Slurm and the
 * Python runtime. What it does, by context:
 *
 *   allocator (sbatch, salloc) and local (srun):
 *     --image/--volume/--module (and --ccm with enable_ccm=1) are collected by the
 *     option callbacks; in init_post_opt the submit-time checker
 *         shifter-spank check --image=… --volume=… --module=… [--ccm] [--ssh-key]
 *     runs as the user (udiroot's own rules; a tag resolved once to its image id;
 *     with --pull-timeout=N, given only when the submission makes a new job, so never on
 *     a compute node, a tag the system lacks is pulled first, progress on the terminal). Its
 *     stderr is the user's terminal; its stdout is NAME=VALUE lines, which are set in
 *     the job's environment (setenv: sbatch/salloc/srun pass it to the tasks) and in
 *     the job control environment (spank_job_control_setenv: the prolog/epilog see them
 *     as SPANK_NAME). A non-zero exit refuses the submission.
 *   job_script (slurmd's prolog, epilog; root):
 *     prolog: for an exclusive job with SPANK_SHIFTER_IMAGE set, run
 *         setupRoot -U uid -G gid -u user -N "host/cpus …" [-v vol] [-m mods] [-s key] -- type id
 *     (with -s, the job's sshd host key in setupRoot's environment, SHIFTER_SSH_HOSTKEY)
 *     and then extern_setup if configured. setupRoot's exit status says whose fault a
 *     failure is. 2, the user's (an image they may not use, a volume source that is
 *     gone): the message goes to slurmd's log, the job's Comment and a root-only record
 *     <state_dir>/<job id>, and the prolog succeeds, so the node stays in service; the
 *     job's steps then fail (task_init_privileged, below). Anything else is the node's:
 *     the message goes to slurmd's log, the Comment and (batch jobs) the job's
 *     error/output file if it is a regular file, and the prolog fails (Slurm drains the
 *     node and requeues the job held).
 *     epilog: unsetupRoot; the record is removed.
 *   remote (slurmstepd), the job's extern step (PrologFlags=contain), task_post_fork, with
 *     extern_cgroup=1 (the default): the container's sshd, which the prolog started in
 *     slurmd's cgroups with slurmd's rlimits, is moved into every cgroup of the extern
 *     step's task and given that task's rlimits, so ssh sessions are held to the job's
 *     limits and killed with it.
 *   remote (slurmstepd, user_init): the job's private sshd host key is removed from the
 *     tasks' environment (Slurm copies the job control environment there).
 *   remote (slurmstepd), task_init_privileged: a task of a job with such a record
 *     prints it on its stderr (the job's output file, srun's stderr) and fails, so the
 *     job ends FAILED with the reason where the user looks.
 *   local, at exit: an srun/salloc that made its own allocation and saw it fail prints
 *     the job's Comment when the prolog put a Shifter message there.
 *
 * plugstack.conf arguments: shifter_config= enable_sshd=0|1 enable_ccm=0|1 extern_setup=
 * extern_cgroup=0|1 setuproot= unsetuproot= spank_tool= state_dir= pull_timeout=SECONDS
 * (README, "Slurm"; docs/admin-guide.md);
 * memory_cgroup= (Shifter's) is refused with a message.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(shifter, 1);

#ifndef SHIFTER_PREFIX
#define SHIFTER_PREFIX "/usr/local"
#endif

#define OUT_MAX 16384 /* bytes kept of a child's output */
#define MSG_MAX 2048  /* bytes of a failure message put in the job's Comment */
#define USER_ERROR 2  /* setupRoot: the user's request cannot be served (not the node's fault) */
#define JOB_FILE_SECONDS 10 /* at most this long writing the failure note to the job's file */
#define PULL_TIMEOUT 600    /* pull_timeout= default: seconds a submission waits for a pull */
#define PULL_TIMEOUT_MAX 86400

extern char **environ;

/* -- configuration (plugstack.conf) ---------------------------------------------------- */

static struct {
    char shifter_config[PATH_MAX]; /* "" = the front end's default */
    char extern_setup[PATH_MAX];
    char setuproot[PATH_MAX];
    char unsetuproot[PATH_MAX];
    char spank_tool[PATH_MAX];
    char state_dir[PATH_MAX]; /* root-only records of refused jobs */
    int enable_sshd;
    int enable_ccm;
    int extern_cgroup;
    int pull_timeout; /* 0: an image not on the system is refused, never pulled */
} cfg;

static int set_path(char *dst, const char *key, const char *value)
{
    if (value[0] != '/') {
        slurm_error("shifter: plugstack.conf: %s must be an absolute path, not '%s'", key, value);
        return -1;
    }
    if (strlen(value) >= PATH_MAX) {
        slurm_error("shifter: plugstack.conf: %s is too long", key);
        return -1;
    }
    strcpy(dst, value);
    return 0;
}

/* memory_cgroup= named Shifter's memory cgroup mount; the cgroups are now read from the
 * kernel (mountinfo, /proc/PID/cgroup), so a value is refused rather than ignored. */
static int refuse_memory_cgroup(const char *value)
{
    if (value[0] == '\0')
        return 0;
    slurm_error("shifter: plugstack.conf: memory_cgroup is not supported: the job's cgroups "
                "(every controller) are read from /proc; remove memory_cgroup=%s", value);
    return -1;
}

static int set_flag(int *dst, const char *key, const char *value)
{
    if (strcmp(value, "0") != 0 && strcmp(value, "1") != 0) {
        slurm_error("shifter: plugstack.conf: %s must be 0 or 1, not '%s'", key, value);
        return -1;
    }
    *dst = value[0] == '1';
    return 0;
}

/* pull_timeout=SECONDS: whole seconds, 0 (no pulls at submit) to a day. */
static int set_pull_timeout(const char *value)
{
    char *end = NULL;
    long n;

    errno = 0;
    n = strtol(value, &end, 10);
    if (value[0] < '0' || value[0] > '9' || *end != '\0' || errno != 0 || n > PULL_TIMEOUT_MAX) {
        slurm_error("shifter: plugstack.conf: pull_timeout must be 0 (never pull at submit) to "
                    "%d seconds, not '%s'", PULL_TIMEOUT_MAX, value);
        return -1;
    }
    cfg.pull_timeout = (int)n;
    return 0;
}

static int parse_config(int ac, char **av)
{
    int i;

    memset(&cfg, 0, sizeof(cfg));
    strcpy(cfg.setuproot, SHIFTER_PREFIX "/bin/setupRoot");
    strcpy(cfg.unsetuproot, SHIFTER_PREFIX "/bin/unsetupRoot");
    strcpy(cfg.spank_tool, SHIFTER_PREFIX "/libexec/shifter/shifter-spank");
    strcpy(cfg.state_dir, "/run/shifter");
    cfg.extern_cgroup = 1;
    cfg.pull_timeout = PULL_TIMEOUT;
    for (i = 0; i < ac; i++) {
        const char *eq = strchr(av[i], '=');
        size_t klen = eq ? (size_t)(eq - av[i]) : 0;
        const char *value = eq ? eq + 1 : "";
        int rc;

#define KEY(name) (klen == sizeof(name) - 1 && strncmp(av[i], name, klen) == 0)
        if (eq == NULL)
            rc = -1;
        else if (KEY("shifter_config"))
            rc = set_path(cfg.shifter_config, "shifter_config", value);
        else if (KEY("extern_setup"))
            rc = value[0] ? set_path(cfg.extern_setup, "extern_setup", value) : 0;
        else if (KEY("memory_cgroup"))
            rc = refuse_memory_cgroup(value);
        else if (KEY("setuproot"))
            rc = set_path(cfg.setuproot, "setuproot", value);
        else if (KEY("unsetuproot"))
            rc = set_path(cfg.unsetuproot, "unsetuproot", value);
        else if (KEY("spank_tool"))
            rc = set_path(cfg.spank_tool, "spank_tool", value);
        else if (KEY("state_dir"))
            rc = set_path(cfg.state_dir, "state_dir", value);
        else if (KEY("enable_sshd"))
            rc = set_flag(&cfg.enable_sshd, "enable_sshd", value);
        else if (KEY("enable_ccm"))
            rc = set_flag(&cfg.enable_ccm, "enable_ccm", value);
        else if (KEY("extern_cgroup"))
            rc = set_flag(&cfg.extern_cgroup, "extern_cgroup", value);
        else if (KEY("pull_timeout"))
            rc = set_pull_timeout(value);
        else {
            slurm_error("shifter: plugstack.conf: unknown argument '%s' (known: shifter_config= "
                        "enable_sshd= enable_ccm= extern_setup= extern_cgroup= "
                        "setuproot= unsetuproot= spank_tool= state_dir= pull_timeout=)", av[i]);
            return -1;
        }
#undef KEY
        if (rc != 0) {
            if (eq == NULL)
                slurm_error("shifter: plugstack.conf: expected key=value, not '%s'", av[i]);
            return -1;
        }
    }
    return 0;
}

/* -- options --------------------------------------------------------------------------- */

static char *opt_image;
static char *opt_volume; /* every --volume joined with ';' */
static char *opt_module;
static int opt_ccm;
static int made_allocation; /* local/allocator: no job existed when we started */
static time_t started_at;
static void show_allocation_failure(void);

static int replace(char **dst, const char *value)
{
    char *copy = strdup(value ? value : "");

    if (copy == NULL) {
        slurm_error("shifter: out of memory");
        return -1;
    }
    free(*dst);
    *dst = copy;
    return 0;
}

static int cb_image(int val, const char *optarg, int remote)
{
    (void)val;
    (void)remote;
    return replace(&opt_image, optarg);
}

static int cb_volume(int val, const char *optarg, int remote)
{
    char *joined;

    (void)val;
    (void)remote;
    if (opt_volume == NULL || opt_volume[0] == '\0')
        return replace(&opt_volume, optarg);
    if (asprintf(&joined, "%s;%s", opt_volume, optarg ? optarg : "") < 0) {
        slurm_error("shifter: out of memory");
        return -1;
    }
    free(opt_volume);
    opt_volume = joined;
    return 0;
}

static int cb_module(int val, const char *optarg, int remote)
{
    (void)val;
    (void)remote;
    return replace(&opt_module, optarg);
}

static int cb_ccm(int val, const char *optarg, int remote)
{
    (void)val;
    (void)optarg;
    (void)remote;
    opt_ccm = 1;
    return 0;
}

static struct spank_option options[] = {
    {"image", "type:tag", "Shifter image to run the job in (pinned to its id at submit)", 1, 0,
     cb_image},
    {"volume", "from:to[:ro][;...]", "Shifter volume(s) to bind into the job's container", 1, 0,
     cb_volume},
    {"module", "a,b|none", "Shifter site modules for the job's container", 1, 0, cb_module},
    {"ccm", NULL, "Shifter CCM mode: the node's own root in a prepared container", 0, 0, cb_ccm},
};

int slurm_spank_init(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    size_t i, n = sizeof(options) / sizeof(options[0]);

    if (parse_config(ac, av) != 0)
        return -1;
    if (ctx != S_CTX_ALLOCATOR && ctx != S_CTX_LOCAL && ctx != S_CTX_REMOTE)
        return 0;
    for (i = 0; i < n; i++) {
        spank_err_t rc;

        if (strcmp(options[i].name, "ccm") == 0 && !cfg.enable_ccm)
            continue;
        rc = spank_option_register(sp, &options[i]);
        if (rc != ESPANK_SUCCESS) {
            slurm_error("shifter: cannot register --%s: %s", options[i].name, spank_strerror(rc));
            return -1;
        }
    }
    return 0;
}

/* Slurm gives the job control environment to every step as SLURM_SPANK_<name>. The
 * job's private sshd host key is the prolog's alone: it leaves the tasks' environment
 * (a job script's `env` would print it into an output file others may read). */
int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
    spank_err_t rc;

    (void)ac;
    (void)av;
    if (spank_context() != S_CTX_REMOTE)
        return 0;
    rc = spank_unsetenv(sp, "SLURM_SPANK_SHIFTER_SSH_HOSTKEY");
    if (rc != ESPANK_SUCCESS) {
        slurm_error("shifter: cannot remove the job's ssh host key from the tasks' "
                    "environment: %s", spank_strerror(rc));
        return -1;
    }
    return 0;
}

/* -- running programs ------------------------------------------------------------------ */

static void copy_out(char *out, size_t *len, const char *buf, size_t n)
{
    size_t room = OUT_MAX - 1 - *len;

    if (n > room)
        n = room;
    memcpy(out + *len, buf, n);
    *len += n;
    out[*len] = '\0';
}

/* Run argv[0] with envp; its stdout (and stderr when merge) into out (OUT_MAX bytes,
 * NUL-terminated, the rest read and dropped). Returns the exit status, 128+signal, or
 * -1 when it could not be run (a message is in out). */
static int run(char *const argv[], char *const envp[], int merge, char *out)
{
    int fds[2], status = 0;
    size_t len = 0;
    pid_t pid;
    char buf[4096];

    out[0] = '\0';
    if (pipe2(fds, O_CLOEXEC) != 0) {
        snprintf(out, OUT_MAX, "cannot make a pipe: %s", strerror(errno));
        return -1;
    }
    pid = fork();
    if (pid < 0) {
        snprintf(out, OUT_MAX, "cannot fork: %s", strerror(errno));
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    if (pid == 0) {
        int null = open("/dev/null", O_RDONLY | O_CLOEXEC);

        if (null < 0 || dup2(null, STDIN_FILENO) < 0 || dup2(fds[1], STDOUT_FILENO) < 0 ||
            (merge && dup2(fds[1], STDERR_FILENO) < 0))
            _exit(126);
        execve(argv[0], argv, envp);
        dprintf(merge ? STDOUT_FILENO : STDERR_FILENO, "cannot run %s: %s\n", argv[0],
                strerror(errno));
        _exit(127);
    }
    close(fds[1]);
    for (;;) {
        ssize_t n = read(fds[0], buf, sizeof(buf));

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        copy_out(out, &len, buf, (size_t)n);
    }
    close(fds[0]);
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            snprintf(out, OUT_MAX, "cannot wait for %s: %s", argv[0], strerror(errno));
            return -1;
        }
    }
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return -1;
}

/* -- submit time ----------------------------------------------------------------------- */

static int same(const char *a, const char *b)
{
    return strcmp(a ? a : "", b ? b : "") == 0;
}

/* An srun inside a job sees the job's options again (Slurm forwards them): when they
 * are what the job was pinned with, there is nothing to check or look up. */
static int already_pinned(void)
{
    const char *type = getenv("SHIFTER_IMAGETYPE");
    const char *request = opt_ccm ? "local:/" : opt_image;

    if (getenv("SLURM_JOB_ID") == NULL || getenv("SHIFTER_IMAGE") == NULL || type == NULL)
        return 0;
    if (strcmp(type, "id") != 0 && strcmp(type, "local") != 0)
        return 0;
    return same(request, getenv("SHIFTER_IMAGEREQUEST")) &&
           same(opt_volume, getenv("SHIFTER_VOLUME")) &&
           same(opt_module, getenv("SHIFTER_MODULE"));
}

static const char *const job_vars[] = {
    "SHIFTER_IMAGE",  "SHIFTER_IMAGETYPE", "SHIFTER_IMAGEREQUEST", "SHIFTER_VOLUME",
    "SHIFTER_MODULE", "SHIFTER_CCM",       "SHIFTER_SSH_PUBKEY", "SHIFTER_SSH_HOSTKEY",
};

/* For the prolog only, never in the tasks' environment: the job key's public half and
 * the private host key of the job's sshd. */
static int prolog_only(const char *name)
{
    return strcmp(name, "SHIFTER_SSH_PUBKEY") == 0 || strcmp(name, "SHIFTER_SSH_HOSTKEY") == 0;
}

static int known_var(const char *name)
{
    size_t i;

    for (i = 0; i < sizeof(job_vars) / sizeof(job_vars[0]); i++)
        if (strcmp(name, job_vars[i]) == 0)
            return 1;
    return 0;
}

/* The user's environment with SHIFTER_UDIROOT_CONF set to shifter_config (if given). */
static char **checker_env(char *conf_var)
{
    size_t n = 0, j = 0;
    char **env, **e;

    for (e = environ; *e; e++)
        n++;
    env = calloc(n + 2, sizeof(char *));
    if (env == NULL)
        return NULL;
    for (e = environ; *e; e++)
        if (!(conf_var[0] && strncmp(*e, "SHIFTER_UDIROOT_CONF=", 21) == 0))
            env[j++] = *e;
    if (conf_var[0])
        env[j++] = conf_var;
    env[j] = NULL;
    return env;
}

static int apply_line(spank_t sp, char *line)
{
    char *eq = strchr(line, '=');
    spank_err_t rc;

    if (eq == NULL)
        return 0;
    *eq = '\0';
    if (!known_var(line)) {
        slurm_error("shifter: the checker printed an unexpected variable %s", line);
        return -1;
    }
    if (!prolog_only(line) && setenv(line, eq + 1, 1) != 0) {
        slurm_error("shifter: cannot set %s: %s", line, strerror(errno));
        return -1;
    }
    rc = spank_job_control_setenv(sp, line, eq + 1, 1);
    if (rc != ESPANK_SUCCESS) {
        slurm_error("shifter: cannot pass %s to the prolog: %s", line, spank_strerror(rc));
        return -1;
    }
    return 0;
}

/* "--pull-timeout=N" when the checker may pull a missing image: only for a submission
 * that makes a new job (sbatch, salloc, an srun outside a job), which runs where users
 * submit; inside a job (a batch script's srun runs on a compute node) nothing is pulled.
 * NULL when not (or out of memory: then the image must be there, as without pulls). */
static char *pull_argument(void)
{
    char *arg = NULL;

    if (!opt_image || !made_allocation || cfg.pull_timeout == 0)
        return NULL;
    if (asprintf(&arg, "--pull-timeout=%d", cfg.pull_timeout) < 0)
        return NULL;
    return arg;
}

static int submit_check(spank_t sp)
{
    char *argv[10], *image = NULL, *volume = NULL, *module = NULL, *pull = NULL, **env;
    char conf_var[PATH_MAX + 32] = "";
    char *out, *line, *save = NULL;
    int argc = 0, rc = -1, status;

    out = malloc(OUT_MAX);
    if (out == NULL) {
        slurm_error("shifter: out of memory");
        return -1;
    }
    argv[argc++] = cfg.spank_tool;
    argv[argc++] = "check";
    if (opt_image && asprintf(&image, "--image=%s", opt_image) < 0)
        image = NULL;
    if (opt_volume && asprintf(&volume, "--volume=%s", opt_volume) < 0)
        volume = NULL;
    if (opt_module && asprintf(&module, "--module=%s", opt_module) < 0)
        module = NULL;
    if ((opt_image && !image) || (opt_volume && !volume) || (opt_module && !module)) {
        slurm_error("shifter: out of memory");
        goto done;
    }
    if (image)
        argv[argc++] = image;
    if (volume)
        argv[argc++] = volume;
    if (module)
        argv[argc++] = module;
    if (opt_ccm)
        argv[argc++] = "--ccm";
    if (cfg.enable_sshd && (opt_image || opt_ccm))
        argv[argc++] = "--ssh-key";
    pull = pull_argument();
    if (pull)
        argv[argc++] = pull;
    argv[argc] = NULL;
    if (cfg.shifter_config[0])
        snprintf(conf_var, sizeof(conf_var), "SHIFTER_UDIROOT_CONF=%s", cfg.shifter_config);
    env = checker_env(conf_var);
    if (env == NULL) {
        slurm_error("shifter: out of memory");
        goto done;
    }
    status = run(argv, env, 0, out);
    free(env);
    if (status != 0) {
        /* The checker's own message went to the user's stderr already. */
        if (status < 0)
            slurm_error("shifter: %s", out);
        else if (status > 1)
            slurm_error("shifter: %s exited with status %d", cfg.spank_tool, status);
        goto done;
    }
    if (opt_image || opt_ccm) {
        /* The job's container is what the options say: nothing inherited from the
         * submitting shell may make the tasks' request differ from the prolog's. */
        if (unsetenv("SHIFTER_VOLUME") != 0 || unsetenv("SHIFTER_MODULE") != 0) {
            slurm_error("shifter: cannot reset the environment: %s", strerror(errno));
            goto done;
        }
    }
    for (line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
        if (apply_line(sp, line) != 0)
            goto done;
    rc = 0;
done:
    free(image);
    free(volume);
    free(module);
    free(pull);
    free(out);
    return rc;
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();

    (void)ac;
    (void)av;
    if (ctx != S_CTX_ALLOCATOR && ctx != S_CTX_LOCAL)
        return 0;
    made_allocation = getenv("SLURM_JOB_ID") == NULL;
    if (!opt_image && !opt_volume && !opt_module && !opt_ccm)
        return 0;
    if (ctx == S_CTX_LOCAL && already_pinned())
        return 0;
    started_at = time(NULL) - 1;
    if (made_allocation && strcmp(program_invocation_short_name, "sbatch") != 0 &&
        atexit(show_allocation_failure) != 0)
        slurm_error("shifter: cannot register the exit handler");
    return submit_check(sp);
}

/* -- prolog / epilog ------------------------------------------------------------------- */

static char hostname[256];

static job_info_t *load_job(uint32_t job_id, job_info_msg_t **msg)
{
    *msg = NULL;
    if (slurm_load_job(msg, job_id, SHOW_DETAIL) != SLURM_SUCCESS) {
        slurm_error("shifter: cannot load job %u from slurmctld: %s", job_id,
                    slurm_strerror(slurm_get_errno()));
        return NULL;
    }
    if (*msg == NULL || (*msg)->record_count < 1) {
        slurm_error("shifter: slurmctld knows no job %u", job_id);
        if (*msg)
            slurm_free_job_info_msg(*msg);
        *msg = NULL;
        return NULL;
    }
    return &(*msg)->job_array[0];
}

/* "2(x3),1" → the CPU count of node i (0 when the text cannot be read). */
static unsigned long cpus_of_node(const char *text, unsigned long index)
{
    unsigned long seen = 0;
    const char *p = text;

    while (p && *p) {
        char *end;
        unsigned long cpus = strtoul(p, &end, 10), times = 1;

        if (end == p)
            return 0;
        p = end;
        if (strncmp(p, "(x", 2) == 0) {
            times = strtoul(p + 2, &end, 10);
            if (end == p + 2 || *end != ')')
                return 0;
            p = end + 1;
        }
        if (index < seen + times)
            return cpus;
        seen += times;
        if (*p == ',')
            p++;
        else if (*p)
            return 0;
    }
    return 0;
}

/* "host/cpus host/cpus …" for setupRoot -N (its /var/hostsfile), from the job's nodes. */
static char *node_list(const job_info_t *job)
{
    hostlist_t hl = slurm_hostlist_create(job->nodes);
    const char *per_node = getenv("SLURM_JOB_CPUS_PER_NODE");
    unsigned long fallback = job->num_nodes ? job->num_cpus / job->num_nodes : 1, i = 0;
    char *out = NULL, *host;
    size_t len = 0;
    FILE *f;

    if (hl == NULL)
        return NULL;
    f = open_memstream(&out, &len);
    if (f == NULL) {
        slurm_hostlist_destroy(hl);
        return NULL;
    }
    while ((host = slurm_hostlist_shift(hl)) != NULL) {
        unsigned long cpus = per_node ? cpus_of_node(per_node, i) : 0;

        if (fprintf(f, "%s%s/%lu", i ? " " : "", host, cpus ? cpus : fallback) < 0) {
            free(host);
            break;
        }
        free(host);
        i++;
    }
    slurm_hostlist_destroy(hl);
    if (fclose(f) != 0 || i == 0) {
        free(out);
        return NULL;
    }
    return out;
}

/* One line for a Comment: newlines folded, trailing space cut, at most MSG_MAX bytes. */
static void one_line(char *dst, const char *src)
{
    size_t n = 0;

    for (; *src && n < MSG_MAX - 1; src++)
        dst[n++] = (*src == '\n' || *src == '\r') ? ' ' : *src;
    while (n && dst[n - 1] == ' ')
        n--;
    dst[n] = '\0';
}

/* The child of tell_job_file(): as the job's user, append text to path if it is a regular
 * file. O_NONBLOCK and the fstat on the fd: a FIFO (or a device) named as the output file
 * is skipped instead of blocking the prolog; the alarm bounds a write to a slow file. */
static void write_job_file(const job_info_t *job, uid_t uid, gid_t gid, const char *path,
                           const char *text)
{
    sigset_t none;
    struct stat st;
    int fd;

    sigemptyset(&none);
    if (sigprocmask(SIG_SETMASK, &none, NULL) != 0 || signal(SIGALRM, SIG_DFL) == SIG_ERR)
        _exit(1);
    alarm(JOB_FILE_SECONDS);
    if (setgroups(1, &gid) != 0 || setresgid(gid, gid, gid) != 0 || setresuid(uid, uid, uid) != 0)
        _exit(1);
    if (path[0] != '/' && (job->work_dir == NULL || chdir(job->work_dir) != 0))
        _exit(2);
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC,
              0644);
    if (fd < 0)
        _exit(3);
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        _exit(4);
    if (write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        _exit(5);
    _exit(close(fd) == 0 ? 0 : 6);
}

/* Wait for pid at most seconds; then kill it. Returns its status, or -1 (timed out). */
static int wait_bounded(pid_t pid, int seconds)
{
    struct timespec tick = {0, 50 * 1000 * 1000};
    int status, i;

    for (i = 0; i < seconds * 20; i++) {
        pid_t r = waitpid(pid, &status, WNOHANG);

        if (r == pid)
            return status;
        if (r < 0 && errno != EINTR)
            return -1;
        nanosleep(&tick, NULL);
    }
    kill(pid, SIGKILL);
    if (waitpid(pid, &status, WNOHANG) == pid)
        return status;
    return -1; /* stuck in the kernel: left to be reaped when slurmstepd exits */
}

/* Append the message to the batch job's error file (its output file unless -e was
 * given), as the job's user: a prolog failure otherwise leaves the user nothing. */
static void tell_job_file(job_info_t *job, uid_t uid, gid_t gid, const char *text)
{
    char path[PATH_MAX];
    pid_t pid;
    int status;

    if (!job->batch_flag)
        return;
    slurm_get_job_stderr(path, sizeof(path), job);
    if (path[0] == '\0')
        return;
    pid = fork();
    if (pid < 0) {
        slurm_error("shifter: cannot fork to write %s: %s", path, strerror(errno));
        return;
    }
    if (pid == 0)
        write_job_file(job, uid, gid, path, text);
    status = wait_bounded(pid, JOB_FILE_SECONDS + 1);
    if (status < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        slurm_error("shifter: could not write the failure to %s as uid %u (%s)", path,
                    (unsigned)uid,
                    status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 4
                        ? "not a regular file"
                        : "cannot open or write it in time");
}

/* -- refused jobs: <state_dir>/<job id>, root's ---------------------------------------- */

/* The state directory, made root-only if missing; refused unless it is a real directory
 * of root's that nobody else can write. -1 when it cannot be used (logged). */
static int open_state_dir(int create)
{
    struct stat st;
    int fd;

    if (create && mkdir(cfg.state_dir, 0700) != 0 && errno != EEXIST) {
        slurm_error("shifter: cannot make %s: %s", cfg.state_dir, strerror(errno));
        return -1;
    }
    fd = open(cfg.state_dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (create || errno != ENOENT)
            slurm_error("shifter: cannot open %s: %s", cfg.state_dir, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) != 0 || st.st_uid != 0 || (st.st_mode & 022) != 0) {
        slurm_error("shifter: %s must be a directory of root's that only root can write",
                    cfg.state_dir);
        close(fd);
        return -1;
    }
    return fd;
}

static void record_name(char *name, size_t size, uint32_t job_id)
{
    snprintf(name, size, "%u", job_id);
}

/* Remember why the job cannot run, for its steps. 0, or -1 (logged). */
static int record_refusal(uint32_t job_id, const char *text)
{
    char name[16];
    int dir = open_state_dir(1), fd, rc = -1;

    if (dir < 0)
        return -1;
    record_name(name, sizeof(name), job_id);
    fd = openat(dir, name, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd >= 0 && write(fd, text, strlen(text)) == (ssize_t)strlen(text))
        rc = 0;
    if (fd >= 0 && close(fd) != 0)
        rc = -1;
    if (rc != 0)
        slurm_error("shifter: cannot write %s/%s: %s", cfg.state_dir, name, strerror(errno));
    close(dir);
    return rc;
}

static void forget_refusal(uint32_t job_id)
{
    char name[16];
    int dir = open_state_dir(0);

    if (dir < 0)
        return;
    record_name(name, sizeof(name), job_id);
    if (unlinkat(dir, name, 0) != 0 && errno != ENOENT)
        slurm_error("shifter: cannot remove %s/%s: %s", cfg.state_dir, name, strerror(errno));
    close(dir);
}

/* The record of a refused job into out (OUT_MAX): 1 when there is one, 0 when not. */
static int read_refusal(uint32_t job_id, char *out)
{
    char name[16];
    int dir = open_state_dir(0), fd;
    ssize_t n;

    if (dir < 0)
        return 0;
    record_name(name, sizeof(name), job_id);
    fd = openat(dir, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    close(dir);
    if (fd < 0)
        return 0;
    n = read(fd, out, OUT_MAX - 1);
    close(fd);
    out[n > 0 ? n : 0] = '\0';
    return 1;
}

static void set_comment(uint32_t job_id, const char *comment)
{
    job_desc_msg_t update;

    slurm_init_job_desc_msg(&update);
    update.job_id = job_id;
    update.comment = (char *)comment;
    if (slurm_update_job(&update) != SLURM_SUCCESS)
        slurm_error("shifter: cannot set the Comment of job %u: %s", job_id,
                    slurm_strerror(slurm_get_errno()));
}

/* A node fault: slurmd's log, the Comment, the batch job's file; the prolog then fails. */
static void report_failure(uint32_t job_id, job_info_t *job, uid_t uid, gid_t gid,
                           const char *what, const char *output)
{
    char line[MSG_MAX], comment[MSG_MAX + 512], *text = NULL;

    one_line(line, output[0] ? output : "(no message)");
    slurm_error("shifter: %s failed for job %u on %s: %s", what, job_id, hostname, line);
    snprintf(comment, sizeof(comment), "shifter: %s failed on %s: %s", what, hostname, line);
    set_comment(job_id, comment);
    if (job && asprintf(&text, "shifter: %s failed on %s for job %u, the job did not start:\n%s%s",
                        what, hostname, job_id, output,
                        output[0] && output[strlen(output) - 1] == '\n' ? "" : "\n") >= 0) {
        tell_job_file(job, uid, gid, text);
        free(text);
    }
}

/* A user error: slurmd's log, the Comment and the record the job's steps fail with; the
 * node stays in service. -1 when the record cannot be written (then it is the node's). */
static int report_refusal(uint32_t job_id, const char *output)
{
    char line[MSG_MAX], comment[MSG_MAX + 512], *text = NULL;
    int rc;

    one_line(line, output[0] ? output : "(no message)");
    if (asprintf(&text, "shifter: setupRoot refused job %u on %s, the job did not start:\n%s%s",
                 job_id, hostname, output,
                 output[0] && output[strlen(output) - 1] == '\n' ? "" : "\n") < 0)
        return -1;
    rc = record_refusal(job_id, text);
    free(text);
    if (rc != 0)
        return -1;
    slurm_info("shifter: setupRoot refused job %u on %s (the user's request; the job fails, the "
               "node stays in service): %s", job_id, hostname, line);
    snprintf(comment, sizeof(comment), "shifter: setupRoot refused on %s: %s", hostname, line);
    set_comment(job_id, comment);
    return 0;
}

/* extern_cgroup=1 needs the extern step (PrologFlags=contain) and cgroup tracking: say
 * so in slurmd's log when a container's sshd is started without them. */
static void check_extern_step(uint32_t job_id)
{
    slurm_conf_t *conf = NULL;

    if (slurm_load_ctl_conf((time_t)0, &conf) != SLURM_SUCCESS || conf == NULL)
        return;
    if (!(conf->prolog_flags & PROLOG_FLAG_CONTAIN) || conf->proctrack_type == NULL ||
        strcmp(conf->proctrack_type, "proctrack/cgroup") != 0)
        slurm_error("shifter: job %u: the container's sshd stays outside the job's cgroups: "
                    "extern_cgroup=1 needs PrologFlags=contain and ProctrackType=proctrack/cgroup "
                    "(unsetupRoot still stops it and its sessions at the end of the job)", job_id);
    slurm_free_ctl_conf(conf);
}

static char *const root_env_plain[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", NULL};

/* setupRoot's and unsetupRoot's environment: fixed, plus the configuration path and the
 * helper installed with this plugin (the front ends default to /usr/local's). */
static int root_env(char *buf, size_t size, char *env[5])
{
    env[0] = root_env_plain[0];
    env[1] = "SHIFTER_HELPER=" SHIFTER_PREFIX "/libexec/shifter/shifter-helper";
    env[2] = NULL;
    env[3] = NULL;
    env[4] = NULL; /* room for the prolog's SHIFTER_SSH_HOSTKEY */
    if (cfg.shifter_config[0]) {
        if (snprintf(buf, size, "SHIFTER_UDIROOT_CONF=%s", cfg.shifter_config) >= (int)size)
            return -1;
        env[2] = buf;
    }
    return 0;
}

static int job_ids(spank_t sp, uint32_t *job_id, uid_t *uid, gid_t *gid)
{
    if (spank_get_item(sp, S_JOB_ID, job_id) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_UID, uid) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_GID, gid) != ESPANK_SUCCESS) {
        slurm_error("shifter: cannot get the job id, uid and gid");
        return -1;
    }
    if (gethostname(hostname, sizeof(hostname) - 1) != 0)
        strcpy(hostname, "?");
    hostname[sizeof(hostname) - 1] = '\0';
    return 0;
}

int slurm_spank_job_prolog(spank_t sp, int ac, char **av)
{
    const char *image = getenv("SPANK_SHIFTER_IMAGE"), *type = getenv("SPANK_SHIFTER_IMAGETYPE");
    const char *volume = getenv("SPANK_SHIFTER_VOLUME"), *module = getenv("SPANK_SHIFTER_MODULE");
    const char *key = getenv("SPANK_SHIFTER_SSH_PUBKEY");
    const char *host_key = getenv("SPANK_SHIFTER_SSH_HOSTKEY");
    char uid_s[16], gid_s[16], conf_buf[PATH_MAX + 32], *env[5], *argv[24], *out = NULL;
    char *host_key_var = NULL;
    char *nodes = NULL, pwbuf[4096];
    struct passwd pw, *found = NULL;
    job_info_msg_t *msg = NULL;
    job_info_t *job;
    uint32_t job_id;
    uid_t uid;
    gid_t gid;
    int argc = 0, rc = -1, status;

    if (image == NULL || type == NULL || image[0] == '\0')
        return 0;
    /* job_script context: slurm_spank_init is not called, the arguments come here. */
    if (parse_config(ac, av) != 0 || job_ids(sp, &job_id, &uid, &gid) != 0)
        return -1;
    forget_refusal(job_id); /* a job id used again after a lost epilog */
    job = load_job(job_id, &msg);
    if (job == NULL) {
        slurm_error("shifter: job %u: not preparing a container (job unknown); tasks build "
                    "their own", job_id);
        return 0;
    }
    if (job->shared != 0) {
        slurm_info("shifter: job %u is not exclusive: no prepared container, each task "
                   "builds its own", job_id);
        rc = 0;
        goto done;
    }
    out = malloc(OUT_MAX);
    nodes = node_list(job);
    if (out == NULL || nodes == NULL || root_env(conf_buf, sizeof(conf_buf), env) != 0) {
        report_failure(job_id, job, uid, gid, "setupRoot",
                       "out of memory or the job's node list cannot be read");
        goto done;
    }
    if (getpwuid_r(uid, &pw, pwbuf, sizeof(pwbuf), &found) != 0 || found == NULL) {
        report_failure(job_id, job, uid, gid, "setupRoot", "the job's user is unknown on this node");
        goto done;
    }
    snprintf(uid_s, sizeof(uid_s), "%u", (unsigned)uid);
    snprintf(gid_s, sizeof(gid_s), "%u", (unsigned)gid);
    argv[argc++] = cfg.setuproot;
    argv[argc++] = "-U";
    argv[argc++] = uid_s;
    argv[argc++] = "-G";
    argv[argc++] = gid_s;
    argv[argc++] = "-u";
    argv[argc++] = pw.pw_name;
    argv[argc++] = "-N";
    argv[argc++] = nodes;
    if (volume && volume[0]) {
        argv[argc++] = "-v";
        argv[argc++] = (char *)volume;
    }
    if (module) {
        argv[argc++] = "-m";
        argv[argc++] = (char *)module;
    }
    if (cfg.enable_sshd && key && key[0]) {
        argv[argc++] = "-s";
        argv[argc++] = (char *)key;
        /* The job's sshd host key, the same on every node: in setupRoot's environment
         * (root's to read, like this prolog's), never in its argv (anybody's). */
        if (host_key && host_key[0]) {
            if (asprintf(&host_key_var, "SHIFTER_SSH_HOSTKEY=%s", host_key) < 0) {
                host_key_var = NULL;
                report_failure(job_id, job, uid, gid, "setupRoot", "out of memory");
                goto done;
            }
            env[env[2] ? 3 : 2] = host_key_var;
        }
        if (cfg.extern_cgroup)
            check_extern_step(job_id);
    }
    argv[argc++] = "--";
    argv[argc++] = (char *)type;
    argv[argc++] = (char *)image;
    argv[argc] = NULL;
    status = run(argv, env, 1, out);
    if (status == USER_ERROR && report_refusal(job_id, out) == 0) {
        rc = 0; /* the job fails in its steps; the node is fine */
        goto done;
    }
    if (status != 0) {
        report_failure(job_id, job, uid, gid, "setupRoot", out);
        goto done;
    }
    slurm_info("shifter: job %u: container prepared (%s:%s)", job_id, type, image);
    if (cfg.extern_setup[0]) {
        char *xargv[] = {cfg.extern_setup, NULL};
        char job_var[32], *xenv[] = {root_env_plain[0], job_var, NULL};

        snprintf(job_var, sizeof(job_var), "SLURM_JOB_ID=%u", job_id);
        status = run(xargv, xenv, 1, out);
        if (status != 0) {
            report_failure(job_id, job, uid, gid, "extern_setup", out);
            goto undo;
        }
    }
    rc = 0;
    goto done;
undo: {
        char *uargv[] = {cfg.unsetuproot, NULL};

        if (run(uargv, env, 1, out) != 0)
            slurm_error("shifter: unsetupRoot failed on %s: %s", hostname, out);
    }
done:
    free(host_key_var);
    free(nodes);
    free(out);
    if (msg)
        slurm_free_job_info_msg(msg);
    return rc;
}

int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
    const char *image = getenv("SPANK_SHIFTER_IMAGE");
    char conf_buf[PATH_MAX + 32], *env[5], *argv[] = {cfg.unsetuproot, NULL}, *out;
    job_info_msg_t *msg = NULL;
    job_info_t *job;
    uint32_t job_id;
    uid_t uid;
    gid_t gid;
    int status;

    if (image == NULL || image[0] == '\0')
        return 0;
    if (parse_config(ac, av) != 0 || job_ids(sp, &job_id, &uid, &gid) != 0)
        return -1;
    forget_refusal(job_id);
    job = load_job(job_id, &msg);
    if (job != NULL && job->shared != 0) {
        slurm_free_job_info_msg(msg);
        return 0; /* nothing was prepared */
    }
    if (msg)
        slurm_free_job_info_msg(msg);
    out = malloc(OUT_MAX);
    if (out == NULL || root_env(conf_buf, sizeof(conf_buf), env) != 0) {
        slurm_error("shifter: job %u: cannot run unsetupRoot: out of memory", job_id);
        free(out);
        return -1;
    }
    status = run(argv, env, 1, out);
    if (status != 0) {
        char line[MSG_MAX];

        one_line(line, out);
        slurm_error("shifter: unsetupRoot failed for job %u on %s: %s", job_id, hostname, line);
        free(out);
        return -1;
    }
    free(out);
    return 0;
}

/* -- the job's steps: fail every task of a refused job --------------------------------- */

/* In each task (slurmstepd's child, root, before exec; its stderr is the task's: the batch
 * job's output file or srun's stderr): a job whose setupRoot the prolog found to be the
 * user's mistake prints why and fails, so Slurm ends the job FAILED. */
int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
    uint32_t job_id;
    char *text;

    (void)ac;
    (void)av;
    if (spank_context() != S_CTX_REMOTE ||
        spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS)
        return 0;
    text = malloc(OUT_MAX);
    if (text == NULL)
        return 0;
    if (!read_refusal(job_id, text)) {
        free(text);
        return 0;
    }
    if (write(STDERR_FILENO, text, strlen(text)) < 0)
        slurm_error("%s", text);
    free(text);
    return -1;
}

/* -- the job's extern step: the container's sshd joins the job -------------------------- */

/* /proc/PID/NAME as text (at most size - 1 bytes) into buf; -1 when unreadable. */
static int read_proc(pid_t pid, const char *name, char *buf, size_t size)
{
    char path[64];
    ssize_t n;
    int fd;

    snprintf(path, sizeof(path), "/proc/%d/%s", (int)pid, name);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = '\0';
    return 0;
}

/* ppid, real uid and start time (clock ticks after boot) of pid; -1 when it is gone. */
static int proc_info(pid_t pid, pid_t *ppid, uid_t *uid, unsigned long long *start)
{
    char buf[4096], *p;
    unsigned long real;

    if (read_proc(pid, "stat", buf, sizeof(buf)) != 0)
        return -1;
    p = strrchr(buf, ')'); /* the command name may hold anything */
    if (p == NULL || sscanf(p + 1, " %*s %d %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s"
                                   " %*s %*s %*s %*s %llu", ppid, start) != 2)
        return -1;
    /* the owner of /proc/PID is not the uid of a process that is not dumpable (sshd) */
    if (read_proc(pid, "status", buf, sizeof(buf)) != 0)
        return -1;
    p = strstr(buf, "\nUid:");
    if (p == NULL || sscanf(p + 5, "%lu", &real) != 1)
        return -1;
    *uid = (uid_t)real;
    return 0;
}

/* pid is the sshd a Shifter container records (root's var/run/shifter-sshd in the
 * process's own root names it with its start time) and runs as uid? */
static int is_container_sshd(pid_t pid, uid_t uid)
{
    char path[96], buf[128];
    unsigned long long start, recorded;
    long rpid;
    struct stat st;
    pid_t ppid;
    uid_t owner;
    int fd, n;

    if (proc_info(pid, &ppid, &owner, &start) != 0 || owner != uid || uid == 0)
        return 0;
    snprintf(path, sizeof(path), "/proc/%d/root/var/run/shifter-sshd", (int)pid);
    fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == 0)
            ? (int)read(fd, buf, sizeof(buf) - 1) : -1;
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    return sscanf(buf, "%ld %llu", &rpid, &recorded) == 2 && rpid == (long)pid &&
           recorded == start;
}

/* Every comma-separated word of words is one of opts's ("rw,memory" holds "memory")? */
static int has_all_words(const char *opts, const char *words)
{
    const char *w = words;

    while (*w) {
        size_t n = strcspn(w, ","), m;
        const char *o = opts;
        int found = 0;

        while (*o && !found) {
            m = strcspn(o, ",");
            found = m == n && strncmp(o, w, n) == 0;
            o += m + (o[m] == ',');
        }
        if (!found)
            return 0;
        w += n + (w[n] == ',');
    }
    return 1;
}

/* The mount point of the cgroup hierarchy of a /proc/PID/cgroup line's controller field
 * ("memory", "cpu,cpuacct", "name=systemd"; "" for v2), from mountinfo; 0 when found. */
static int cgroup_mount(const char *controllers, char *out, size_t size)
{
    FILE *f = fopen("/proc/self/mountinfo", "re");
    char *line = NULL, mnt[PATH_MAX], root[PATH_MAX], fstype[64], opts[1024];
    size_t cap = 0;
    int found = -1;

    if (f == NULL)
        return -1;
    while (found != 0 && getline(&line, &cap, f) > 0) {
        const char *dash = strstr(line, " - ");

        /* whole hierarchies only (root "/"), paths without escaped characters */
        if (dash == NULL || sscanf(line, "%*s %*s %*s %4095s %4095s", root, mnt) != 2 ||
            sscanf(dash + 3, "%63s %*s %1023s", fstype, opts) != 2 || strcmp(root, "/") != 0 ||
            strchr(mnt, '\\') != NULL || strlen(mnt) >= size)
            continue;
        if (controllers[0] == '\0' ? strcmp(fstype, "cgroup2") == 0
                                    : strcmp(fstype, "cgroup") == 0 &&
                                          has_all_words(opts, controllers)) {
            strcpy(out, mnt);
            found = 0;
        }
    }
    free(line);
    fclose(f);
    return found;
}

/* Move pid into the cgroup of one line of the task's /proc/PID/cgroup. */
static int join_one(pid_t pid, char *line)
{
    char *controllers = strchr(line, ':'), *cg, mnt[PATH_MAX], procs[2 * PATH_MAX];
    int fd, rc = 0;

    cg = controllers ? strchr(controllers + 1, ':') : NULL;
    if (cg == NULL)
        return 0;
    *cg++ = '\0';
    controllers++;
    if (cgroup_mount(controllers, mnt, sizeof(mnt)) != 0) {
        slurm_error("shifter: no mount of the cgroup hierarchy '%s'", controllers);
        return -1;
    }
    snprintf(procs, sizeof(procs), "%s%s/cgroup.procs", mnt, cg);
    fd = open(procs, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 || dprintf(fd, "%d\n", (int)pid) < 0) {
        slurm_error("shifter: cannot move process %d into %s: %s", (int)pid, procs,
                    strerror(errno));
        rc = -1;
    }
    if (fd >= 0)
        close(fd);
    return rc;
}

/* Put pid into every cgroup task is in (all hierarchies of /proc/TASK/cgroup), except
 * those it is in already. */
static int join_cgroups(pid_t pid, pid_t task)
{
    char *want = malloc(OUT_MAX), *have = malloc(OUT_MAX), *line, *save = NULL;
    int rc = -1;

    if (want == NULL || have == NULL || read_proc(task, "cgroup", want, OUT_MAX) != 0 ||
        read_proc(pid, "cgroup", have, OUT_MAX) != 0)
        goto done;
    rc = 0;
    for (line = strtok_r(want, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char exact[PATH_MAX + 300];

        snprintf(exact, sizeof(exact), "\n%s\n", line);
        if (strncmp(have, exact + 1, strlen(exact + 1)) == 0 || strstr(have, exact) != NULL)
            continue; /* there already (the same hierarchy and path) */
        if (join_one(pid, line) != 0)
            rc = -1;
    }
done:
    free(want);
    free(have);
    return rc;
}

/* Set pid's rlimits to lim[] from a child with the user's ids (allowed without
 * CAP_SYS_RESOURCE, which root lacks on some machines, e.g. in containers): a hard
 * limit above the process's current one cannot be raised that way and stays. */
static int set_rlimits_as_user(pid_t pid, uid_t uid, gid_t gid, const struct rlimit *lim)
{
    pid_t child = fork();
    int status, r;

    if (child < 0)
        return -1;
    if (child == 0) {
        if (setgroups(1, &gid) != 0 || setresgid(gid, gid, gid) != 0 ||
            setresuid(uid, uid, uid) != 0)
            _exit(1);
        for (r = 0; r < RLIM_NLIMITS; r++) {
            struct rlimit now, want = lim[r];

            if (prlimit(pid, (enum __rlimit_resource)r, NULL, &now) != 0)
                _exit(2);
            if (want.rlim_max > now.rlim_max)
                want.rlim_max = now.rlim_max;
            if (want.rlim_cur > want.rlim_max)
                want.rlim_cur = want.rlim_max;
            if (prlimit(pid, (enum __rlimit_resource)r, &want, NULL) != 0)
                _exit(3);
        }
        _exit(0);
    }
    while (waitpid(child, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}

/* Give pid the rlimits of task (the job's: Slurm set them on its extern task). */
static int copy_rlimits(pid_t pid, pid_t task, uid_t uid, gid_t gid)
{
    struct rlimit lim[RLIM_NLIMITS];
    int r, denied = 0;

    for (r = 0; r < RLIM_NLIMITS; r++)
        if (prlimit(task, (enum __rlimit_resource)r, NULL, &lim[r]) != 0) {
            slurm_error("shifter: cannot read the rlimits of the extern task %d: %s", (int)task,
                        strerror(errno));
            return -1;
        }
    for (r = 0; r < RLIM_NLIMITS && !denied; r++)
        if (prlimit(pid, (enum __rlimit_resource)r, &lim[r], NULL) != 0)
            denied = 1;
    if (denied && set_rlimits_as_user(pid, uid, gid, lim) != 0) {
        slurm_error("shifter: cannot give process %d the job's rlimits", (int)pid);
        return -1;
    }
    return 0;
}

/* The process the extern step just forked (its "sleep"): a child of this slurmstepd. */
static pid_t extern_task(void)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    pid_t found = -1;

    if (d == NULL)
        return -1;
    while ((e = readdir(d)) != NULL && found < 0) {
        unsigned long long start;
        pid_t pid = (pid_t)atoi(e->d_name), ppid;
        uid_t uid;

        if (pid > 0 && proc_info(pid, &ppid, &uid, &start) == 0 && ppid == getpid())
            found = pid;
    }
    closedir(d);
    return found;
}

/* Every process of uid that is the container's sshd or a child of it (a session begun
 * before the extern step existed): into the job's cgroups, with the job's rlimits. One
 * that cannot be moved is killed: an sshd outside the job would let sessions escape. */
static void contain_sshd(uint32_t job_id, uid_t uid, gid_t gid, pid_t task)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    pid_t sshd = -1;

    if (d == NULL)
        return;
    while ((e = readdir(d)) != NULL && sshd < 0) {
        pid_t pid = (pid_t)atoi(e->d_name);

        if (pid > 0 && is_container_sshd(pid, uid))
            sshd = pid;
    }
    if (sshd < 0) {
        closedir(d);
        return;
    }
    rewinddir(d);
    while ((e = readdir(d)) != NULL) {
        unsigned long long start;
        pid_t pid = (pid_t)atoi(e->d_name), ppid;
        uid_t owner;

        if (pid <= 0 || proc_info(pid, &ppid, &owner, &start) != 0 || owner != uid ||
            (pid != sshd && ppid != sshd))
            continue;
        if (join_cgroups(pid, task) != 0 || copy_rlimits(pid, task, uid, gid) != 0) {
            slurm_error("shifter: job %u: the container's sshd (or session) %d cannot join "
                        "the job's cgroups; killing it", job_id, (int)pid);
            kill(pid, SIGKILL);
            continue;
        }
        slurm_info("shifter: job %u: process %d of the container's sshd joined the job's "
                   "extern step", job_id, (int)pid);
    }
    closedir(d);
}

int slurm_spank_task_post_fork(spank_t sp, int ac, char **av)
{
    uint32_t job_id, step_id;
    uid_t uid;
    gid_t gid;
    pid_t task;

    (void)ac;
    (void)av;
    if (spank_context() != S_CTX_REMOTE || !cfg.extern_cgroup ||
        spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS ||
        step_id != SLURM_EXTERN_CONT || spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_UID, &uid) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_GID, &gid) != ESPANK_SUCCESS)
        return 0;
    task = extern_task();
    if (task < 0) {
        slurm_error("shifter: job %u: the extern step's task is not found", job_id);
        return 0;
    }
    contain_sshd(job_id, uid, gid, task);
    return 0;
}

/* -- srun/salloc exit: show why the allocation failed ----------------------------------- */

/* An srun or salloc that makes its own allocation waits for the prolog and, when it
 * fails, exits with Slurm's "Prolog failure on node X" and nothing else. At exit (an
 * atexit handler: no SPANK callback runs on that path), find the allocation this
 * process made (same user and session, submitted after we started; slurmctld records
 * the submitting host by the name it resolved, not ours) and print the reason the
 * prolog put in its Comment. */
static void show_allocation_failure(void)
{
    job_info_msg_t *msg = NULL;
    const job_info_t *best = NULL;
    uint32_t sid = (uint32_t)getsid(0), i;

    if (slurm_load_job_user(&msg, getuid(), SHOW_ALL) != SLURM_SUCCESS || msg == NULL)
        return;
    for (i = 0; i < msg->record_count; i++) {
        const job_info_t *job = &msg->job_array[i];

        if (job->alloc_sid != sid || job->submit_time < started_at || job->comment == NULL ||
            strncmp(job->comment, "shifter: ", 9) != 0)
            continue;
        if (best == NULL || job->submit_time >= best->submit_time)
            best = job;
    }
    if (best)
        fprintf(stderr, "%s: error: job %u: %s\n", program_invocation_short_name, best->job_id,
                best->comment);
    slurm_free_job_info_msg(msg);
}
