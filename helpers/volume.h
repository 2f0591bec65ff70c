/*
 * volume.h - volume maps (--volume and siteFs): syntax, validation, sizes and
 * the normalised signature, with the rules of udiroot/volumes.py (docs/behaviour.md,
 * 'Runtime: volumes', 'Runtime: perNodeCache', 'Runtime: reusing a prepared
 * container').  The helper re-validates every volume the user
 * asked for instead of trusting the Python front end's checks.
 */
#ifndef SHIFTER_HELPERS_VOLUME_H
#define SHIFTER_HELPERS_VOLUME_H

#include <stddef.h>
#include <stdint.h>

#define VOL_MAX_TEXT 8192    /* bytes in a whole volume list */
#define VOL_MAX_ENTRIES 64   /* entries in one list */
#define VOL_MAX_SIZE ((uint64_t)INT64_MAX) /* what a signed 64-bit off_t can hold */
#define VOL_DEFAULT_BS (1024 * 1024)
/* Room for a message quoting a whole entry or both its paths. */
#define VOL_ERR_LEN (3 * VOL_MAX_TEXT + 256)

enum vol_flag { VOL_RO, VOL_REC, VOL_SLAVE, VOL_PRIVATE, VOL_CACHE, VOL_NFLAGS };

struct volume {
    char *source; /* normalised */
    char *target; /* normalised */
    int flag[VOL_NFLAGS];       /* which flags were given */
    enum vol_flag seen[VOL_NFLAGS]; /* in the order given, for the first-bad-flag message */
    size_t n_seen;
    uint64_t cache_size; /* perNodeCache: method is always loop, fs always xfs */
    uint64_t cache_bs;
};

struct volume_list {
    struct volume vol[VOL_MAX_ENTRIES];
    size_t n;
};

/* Parse a ';'-separated list; site selects siteFs rules, else user rules. 0 or -1. */
int vol_parse_map(const char *text, int site, struct volume_list *out, char *err, size_t errlen);

/* The user destination rules alone, for a destination found by resolving symlinks
 * inside the container (to must be normalised).  0 or -1 with the message in err. */
int vol_check_user_target(const char *from, const char *to, char *err, size_t errlen);

/* 5, 5k, 500KB, 1.5g ... (powers of 1024). 0 or -1 with the message in err. */
int vol_parse_size(const char *text, uint64_t *out, char *err, size_t errlen);

/* Normalised entries sorted bytewise and joined by ';'; malloc'd, NULL when out of memory. */
char *vol_signature(const struct volume_list *list);

void vol_list_free(struct volume_list *list);

#endif
