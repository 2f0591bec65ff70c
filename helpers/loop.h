/*
 * loop.h - attach a file to a loop device (LOOP_CTL_GET_FREE + LOOP_CONFIGURE),
 * always with LO_FLAGS_AUTOCLEAR so the device is released with its last user:
 * nothing outlives the container.  A read-only file already held by a
 * read-only autoclear device (the same inode, whole) shares that device.
 */
#ifndef SHIFTER_HELPERS_LOOP_H
#define SHIFTER_HELPERS_LOOP_H

#include <stddef.h>

/* Attach backing_fd (read_only: or find a device that already holds it, label being its
 * file name); returns the open loop fd (close it once mounted) and the device path in
 * dev (at least 32 bytes).  Dies on failure. */
int loop_attach(int backing_fd, int read_only, const char *label, char *dev, size_t devlen);

#endif
