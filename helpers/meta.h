/*
 * meta.h - the parts of <imagePath>/<id>.meta the helper needs: FORMAT and the
 * image ACL (rules of udiroot/meta.py, spec sections 4 and 6.4).
 */
#ifndef SHIFTER_HELPERS_META_H
#define SHIFTER_HELPERS_META_H

#include <stddef.h>

#include "ident.h"

#define META_MAX_ACL 1000

struct image_meta {
    char format[32];
    unsigned long user_acl[META_MAX_ACL];
    size_t n_user_acl;
    unsigned long group_acl[META_MAX_ACL];
    size_t n_group_acl;
};

/* Read and parse <id>.meta below the imagePath directory fd; dies with Shifter's
 * messages ("FAILED to find requested image." ...). */
void meta_read(int image_dir, const char *id, struct image_meta *meta);

/* Parse meta text (NUL-terminated, modified in place); 0 or -1 with err. */
int meta_parse(char *text, struct image_meta *meta, char *err, size_t errlen);

/* Open when both lists are empty, else uid, gid or a supplementary gid listed. */
int meta_allows(const struct image_meta *meta, const struct ident *id);

#endif
