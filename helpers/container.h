/*
 * container.h - the state of one container build and the steps of spec 6.6.
 */
#ifndef SHIFTER_HELPERS_CONTAINER_H
#define SHIFTER_HELPERS_CONTAINER_H

#include <stdint.h>

#include "conf.h"
#include "gpu.h"
#include "ident.h"
#include "meta.h"
#include "volume.h"

#define MAX_MODULES CONF_MAX_MODULES
#define MAX_MODULE_NAME CONF_MAX_MODULE_NAME

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
    const char *nodes;        /* setup --nodes, or NULL */
    char udi[4096];           /* udiMount, canonical */
    char loop[4096];          /* loopMount, canonical */
    int root;                 /* container root (the rootfs mount), -1 until built */
    unsigned long propagation; /* MS_SLAVE or MS_PRIVATE (mountPropagationStyle) */
    struct gpu_plan gpu;      /* --gpu: what to inject (gpu.requested 0: nothing) */
    const char *ssh_key;      /* setup --ssh-pubkey (validated), or NULL: no sshd */
    const char *ssh_host_key; /* the job's host key (private, PEM), or NULL: a fresh one */
    const char *ssh_host_pub; /* its public line (with ssh_host_key) */
    int sshd_pidfd;           /* the sshd this setup started, -1 until then */
};

/* The reuse signature of spec 6.5 (malloc'd). */
char *container_signature(const struct ctx *c);

/* If udiMount holds a prepared container with exactly this signature, its root fd;
 * else -1. */
int container_prepared(const struct ctx *c, const char *signature);

/* Build the container (spec 6.6 steps 1-8); sets c->root. */
void container_build(struct ctx *c, const char *signature);

/* Unmount everything under udiMount and loopMount (unsetup, setup failures). */
int container_teardown(const struct ctx *c);

#endif
