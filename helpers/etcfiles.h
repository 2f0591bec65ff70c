/*
 * etcfiles.h - the container's /etc and /var/hostsfile (spec 6.6 steps 5.6-5.8
 * and 5.10; rules of udiroot/groups.py and udiroot/hostsfile.py).
 */
#ifndef SHIFTER_HELPERS_ETCFILES_H
#define SHIFTER_HELPERS_ETCFILES_H

#include "conf.h"
#include "ident.h"

/* etc/mtab, hosts, resolv.conf; etcPath files (or the dynamic passwd/group/nsswitch);
 * empty shadow; the group filter.  root is the container root directory fd. */
void etc_populate(int root, const struct udiroot_conf *conf, const struct ident *id);

/* 0 when text is a valid "host/N host/N" list, else -1 with a message in err. */
int hosts_validate(const char *text, char *err, size_t errlen);

/* Write var/hostsfile from a validated node list. */
void hosts_write(int root, const char *text);

#endif
