/*
 * ctx.h - the state of one container build, shared by the modules that build the
 * container (container.c, volmount.c, gpu.c), enter it (enter.c) and, in the root-only
 * shifter-setup, run its sshd (sshd.c).  Only data: no module's functions.
 */
#ifndef SHIFTER_HELPERS_CTX_H
#define SHIFTER_HELPERS_CTX_H

#include "conf.h"
#include "gpu.h"
#include "ident.h"
#include "meta.h"
#include "volume.h"

#define MAX_MODULES CONF_MAX_MODULES
#define MAX_MODULE_NAME CONF_MAX_MODULE_NAME

/* The points of the build where shifter-setup adds its root-only steps. */
enum build_step {
    STEP_CLEAR,        /* before udiMount/loopMount are cleared: stop a leftover sshd */
    STEP_SITE_FILES,   /* /etc and /opt/udiImage written, roothooks not run: hostsfile */
    STEP_USER_VOLUMES, /* user volumes mounted, root still writable: the sshd and
                        * var/shifterConfig.json, which lets others enter it */
};

struct ctx {
    const struct udiroot_conf *conf;
    int setup_mode;           /* setup: caller's namespace, root caller */
    struct ident id;          /* the user the container is for */
    const char *image_id;     /* --image-id, or NULL */
    const char *local_path;   /* --local, or NULL */
    struct image_meta meta;
    struct volume_list vols;  /* user volumes, validated */
    const char *modules[MAX_MODULES];
    size_t n_modules;
    char udi[4096];           /* udiMount, canonical */
    char loop[4096];          /* loopMount, canonical */
    int root;                 /* container root (the rootfs mount), -1 until built */
    unsigned long propagation; /* MS_SLAVE or MS_PRIVATE (mountPropagationStyle) */
    struct gpu_plan gpu;      /* --gpu: what to inject (gpu.requested 0: nothing) */
    char **etc_files;         /* --etc-fd: the front end's passwd, group, nsswitch.conf */
    const char *pmix_dir;     /* run --pmix-dir, canonical and checked (pmix.c), or NULL */
    int pmix_fd;              /* that directory, opened as the user (with pmix_dir) */
    unsigned long long writable_size; /* run --writable-tmpfs: the layer's bytes, or 0 */
    /* shifter-setup's steps (NULL in the setuid helper) */
    void (*setup_step)(struct ctx *c, enum build_step step);
    const char *nodes;        /* setup --nodes, or NULL */
    const char *ssh_key;      /* setup --ssh-pubkey (validated), or NULL: no sshd */
    const char *ssh_host_key; /* the job's host key (private, PEM), or NULL: a fresh one */
    const char *ssh_host_pub; /* its public line (with ssh_host_key) */
    int sshd_pidfd;           /* the sshd this setup started, -1 until then */
};

#endif
