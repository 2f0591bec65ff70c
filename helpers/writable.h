/*
 * writable.h - the image under an overlay with a tmpfs upper layer: run
 * --writable-tmpfs, and mount points for volumes inside image directories
 * (docs/behaviour.md, 'Runtime: writable containers').
 */
#ifndef SHIFTER_HELPERS_WRITABLE_H
#define SHIFTER_HELPERS_WRITABLE_H

#include "ctx.h"

/* run --writable-tmpfs SIZE: allowed by the site (allowWritableTmpfs), an image (not
 * --local), SIZE at most writableTmpfsSizeLimit; sets c->writable_size.  Dies otherwise. */
void writable_check(struct ctx *c, const char *size);

/* The image mount fd to merge from: image itself, or (--writable-tmpfs, or a user
 * volume missing inside an image directory) an overlay over it whose missing volume
 * mount points are made; image is then closed. */
int writable_image(struct ctx *c, int image);

#endif
