/*
 * hosts.h - the node list of setup --nodes and var/hostsfile (shifter-setup only).
 */
#ifndef SHIFTER_HELPERS_HOSTS_H
#define SHIFTER_HELPERS_HOSTS_H

#include <stddef.h>

/* 0 when text is a valid "host/N host/N" list, else -1 with a message in err. */
int hosts_validate(const char *text, char *err, size_t errlen);

/* Write var/hostsfile (each host N times) from a validated list; root is the container
 * root directory fd. */
void hosts_write(int root, const char *text);

#endif
