/*
 * gpu.h - NVIDIA GPU support (docs/behaviour.md, 'Runtime: GPU'): the host's driver libraries and
 * tools bound into <siteResources>/gpu/{lib64,lib,bin}, and a /dev in which only the
 * selected /dev/nvidiaN (plus the control devices) exist.
 *
 * The devices come from root's domain (gpuDeviceDir); the user chooses only which GPUs.
 * The driver's files are the caller's to name (the front end finds them): each is opened
 * with the caller's rights and bound read-only.
 */
#ifndef SHIFTER_HELPERS_GPU_H
#define SHIFTER_HELPERS_GPU_H

#include <stddef.h>

#include "conf.h"

#define GPU_MAX 64        /* /dev/nvidia0 .. /dev/nvidia63 */
#define GPU_MAX_FILES 256 /* libraries + binaries injected */
#define GPU_MAX_CAPS 64   /* MIG devices: /dev/nvidia-caps/nvidia-capN */
#define GPU_CAP_LIMIT (1 << 20)
#define GPU_MAX_MOUNTS 64 /* CDI mounts */

struct gpu_mount {
    char *target; /* absolute path in the container, a user volume's rules */
    char *source; /* the host file, directory or socket, opened as the caller */
    int fd, dir;  /* gpu_open_cdi: source opened (O_PATH), and whether a directory */
};

struct gpu_file {
    char name[256];   /* name in the container: the ld.so cache key, or the tool's name */
    char dir[8];      /* "lib64", "lib" or "bin" */
    const char *path; /* the host file (absolute), opened as the caller when mounted */
};

struct gpu_plan {
    int requested;                  /* --gpu given */
    int n_sel;
    int sel[GPU_MAX];               /* device indexes, in the order asked */
    int n_caps;
    int caps[GPU_MAX_CAPS];         /* --gpu-cap: nvidia-caps/nvidia-capN minors */
    size_t n_mounts;
    struct gpu_mount mounts[GPU_MAX_MOUNTS]; /* --gpu-mount */
    size_t n_files;
    struct gpu_file files[GPU_MAX_FILES];
    char dev_dir[4096];             /* gpuDeviceDir, where /dev/nvidiaN are found */
    char resources[4096];           /* siteResources, a path inside the container */
};

/* Parse --gpu: comma-separated indexes (no repeats; the front end expands "all" to the
 * node's GPUs).  0, or -1 with err. */
int gpu_parse(const char *text, struct gpu_plan *g, char *err, size_t errlen);

/* Parse --gpu-cap: comma-separated nvidia-cap minors of MIG instances.  0, or -1 with err. */
int gpu_parse_caps(const char *text, struct gpu_plan *g, char *err, size_t errlen);

/* One --gpu-mount "TARGET=SOURCE" (a CDI spec's mount, found by the front end): both
 * absolute without "..", TARGET where a user volume may go.  0, or -1 with err. */
int gpu_add_mount(const char *spec, struct gpu_plan *g, char *err, size_t errlen);

/* One --gpu-file "lib64|lib|bin/NAME=/PATH" (spec kept, not copied).  0, or -1 with err. */
int gpu_add_file(const char *spec, struct gpu_plan *g, char *err, size_t errlen);

/* Check siteResources and gpuDeviceDir; dies with a clear message when a requested GPU
 * is not a character device there. */
void gpu_discover(const struct udiroot_conf *conf, struct gpu_plan *g);

/* The selected GPUs as the reuse signature's text ("0,1"), in buf. */
void gpu_signature(const struct gpu_plan *g, char *buf, size_t len);

struct ctx;

/* Step 5.12 with a GPU request: the container's /dev is a fresh tmpfs holding the
 * host's /dev minus every /dev/nvidiaN, then the selected ones and the control devices.
 * Replaces the plain bind of /dev. */
void gpu_mount_dev(struct ctx *c);

/* Open each --gpu-mount source with the caller's rights, in the namespace it is bound
 * in (a regular file, directory or socket; dies otherwise), before the image overlay
 * (writable.c) makes the mount points the image lacks. */
void gpu_open_cdi(struct ctx *c);

/* The --gpu-mount list after the image content: each source opened with the caller's
 * rights (a regular file, directory or socket), bound read-only, nosuid, nodev at its
 * target, resolved and checked as a user volume's; a target the image cannot take (no
 * mount point, or one that resolves into a reserved dir) is skipped, said with -v. */
void gpu_mount_cdi(struct ctx *c);

/* Bind the discovered files read-only into <siteResources>/gpu/{lib64,lib,bin}, on the
 * container root before the image content (image: the image's mount, to refuse a
 * siteResources path that would hide an entry of the image). */
void gpu_mount_files(struct ctx *c, int image);

#endif
