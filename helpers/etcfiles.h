/*
 * etcfiles.h - the container's /etc (docs/behaviour.md, 'Runtime: building the container'; rules of
 * udiroot/groups.py).
 */
#ifndef SHIFTER_HELPERS_ETCFILES_H
#define SHIFTER_HELPERS_ETCFILES_H

#include "conf.h"

/* etc/mtab, hosts, resolv.conf; etcPath files (not with populateEtcDynamically); empty
 * shadow.  root is the container root directory fd. */
void etc_populate(int root, const struct udiroot_conf *conf);

/* The front end's files (--etc-fd records "passwd=TEXT", "group=TEXT",
 * "nsswitch.conf=TEXT"; no other name) written over etc/, root 0644. */
void etc_write_files(int root, char *const files[]); /* files NULL: none */

#endif
