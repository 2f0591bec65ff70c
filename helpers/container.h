/*
 * container.h - the steps of spec 6.6: build, reuse and clear a container.
 */
#ifndef SHIFTER_HELPERS_CONTAINER_H
#define SHIFTER_HELPERS_CONTAINER_H

#include "ctx.h"

/* The reuse signature of spec 6.5 (malloc'd). */
char *container_signature(const struct ctx *c);

/* If udiMount holds a prepared container with exactly this signature, its root fd;
 * else -1. */
int container_prepared(const struct ctx *c, const char *signature);

/* Build the container (spec 6.6 steps 1-8); sets c->root. */
void container_build(struct ctx *c);

/* Unmount everything under udiMount and loopMount (unsetup, setup failures). */
int container_teardown(const struct ctx *c);

#endif
