/*
 * meta.h - the parts of <imagePath>/<id>.meta the helper needs: FORMAT and the
 * image ACL (rules of udiroot/meta.py; docs/behaviour.md, 'Conversion and the .meta file'
 * and 'Runtime: image selection').
 */
#ifndef SHIFTER_HELPERS_META_H
#define SHIFTER_HELPERS_META_H

#include <stddef.h>

#include "ident.h"

#define META_MAX_ACL 1000
#define META_MAX_ID 128 /* bytes in an image id */

struct image_meta {
    char format[32];
    unsigned long user_acl[META_MAX_ACL];
    size_t n_user_acl;
    unsigned long group_acl[META_MAX_ACL];
    size_t n_group_acl;
};

/* An image id the helper accepts (udiroot/descriptor.py valid_image_id is the same
 * rule): 1..128 of [A-Za-z0-9_.+-], not starting with '.', '+' or '-', no "..". */
int meta_valid_image_id(const char *id);

/* Read and parse the .meta file dirfd/name (not following a symlink, a regular file
 * of at most 1 MiB, no NUL); 0, or -1 with Shifter's message in err
 * ("FAILED to find requested image." ...).  udiroot/meta.py read_meta is the same. */
int meta_load_at(int dirfd, const char *name, struct image_meta *meta, char *err,
                 size_t errlen);

/* meta_load_at of <id>.meta below the imagePath directory fd; dies on failure. */
void meta_read(int image_dir, const char *id, struct image_meta *meta);

/* Parse meta text (NUL-terminated, modified in place); 0 or -1 with err. */
int meta_parse(char *text, struct image_meta *meta, char *err, size_t errlen);

/* Open when both lists are empty, else uid, gid or a supplementary gid listed. */
int meta_allows(const struct image_meta *meta, const struct ident *id);

#endif
