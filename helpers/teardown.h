/*
 * teardown.h - shifter-setup's removal of the node's container (teardown.c).
 */
#ifndef SHIFTER_HELPERS_TEARDOWN_H
#define SHIFTER_HELPERS_TEARDOWN_H

#include "ctx.h"

/* Detach udiMount and loopMount as wholes; 0, or -1 when something stayed mounted below
 * them (each named on stderr). */
int teardown(const struct ctx *c);

#endif
