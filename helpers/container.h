/*
 * container.h - build, reuse and clear a container (docs/behaviour.md,
 * 'Runtime: building the container').
 */
#ifndef SHIFTER_HELPERS_CONTAINER_H
#define SHIFTER_HELPERS_CONTAINER_H

#include "ctx.h"

/* The reuse signature (docs/behaviour.md, 'Runtime: reusing a prepared container'; malloc'd). */
char *container_signature(const struct ctx *c);

/* If udiMount holds a prepared container with exactly this signature, its root fd;
 * else -1. */
int container_prepared(const struct ctx *c, const char *signature);

/* Build the container (docs/behaviour.md, 'Runtime: building the container'); sets c->root. */
void container_build(struct ctx *c);

#endif
