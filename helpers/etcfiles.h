/*
 * etcfiles.h - the container's /etc (spec 6.6 steps 5.6-5.8; rules of
 * udiroot/groups.py).
 */
#ifndef SHIFTER_HELPERS_ETCFILES_H
#define SHIFTER_HELPERS_ETCFILES_H

#include "conf.h"
#include "ident.h"

/* etc/mtab, hosts, resolv.conf; etcPath files (or the dynamic passwd/group/nsswitch);
 * empty shadow; the group filter.  root is the container root directory fd. */
void etc_populate(int root, const struct udiroot_conf *conf, const struct ident *id);

#endif
