/*
 * loop.c - loop devices for images and perNodeCache files.  The device is
 * configured in one LOOP_CONFIGURE call (no window where it is bound but not
 * yet read-only/autoclear).  Another process may take the device between
 * LOOP_CTL_GET_FREE and LOOP_CONFIGURE; that is EBUSY, and we ask again.
 */
#define _GNU_SOURCE
#include "loop.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "util.h"

#define LOOP_TRIES 32

int loop_attach(int backing_fd, int read_only, const char *label, char *dev, size_t devlen)
{
    struct loop_config cfg;
    int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);

    if (ctl < 0)
        die_errno("Cannot open /dev/loop-control (is the loop module loaded?)");
    memset(&cfg, 0, sizeof cfg);
    cfg.fd = (unsigned)backing_fd;
    cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR | (read_only ? LO_FLAGS_READ_ONLY : 0);
    snprintf((char *)cfg.info.lo_file_name, sizeof cfg.info.lo_file_name, "%s", label);

    for (int i = 0; i < LOOP_TRIES; i++) {
        int n = ioctl(ctl, LOOP_CTL_GET_FREE);
        int fd;

        if (n < 0)
            die_errno("Cannot get a free loop device");
        snprintf(dev, devlen, "/dev/loop%d", n);
        fd = open(dev, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
        if (fd < 0)
            die_errno("Cannot open %s", dev);
        if (ioctl(fd, LOOP_CONFIGURE, &cfg) == 0) {
            close(ctl);
            verbose("attached %s to %s", label, dev);
            return fd;
        }
        if (errno != EBUSY)
            die_errno("Cannot configure %s for %s", dev, label);
        close(fd); /* lost the race for this device: ask for another */
    }
    die("Cannot get a free loop device after %d tries", LOOP_TRIES);
}
