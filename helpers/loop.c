/*
 * loop.c - loop devices for images and perNodeCache files.  The device is
 * configured in one LOOP_CONFIGURE call (no window where it is bound but not
 * yet read-only/autoclear).  Another process may take the device between
 * LOOP_CTL_GET_FREE and LOOP_CONFIGURE; that is EBUSY, and we ask again.
 *
 * An image is shared: a launch that finds the same image file already on a
 * read-only autoclear device (another launch's, or setupRoot's) mounts that
 * device, and the kernel gives it the same squashfs superblock, page cache
 * and all.  Mounts stay per mount namespace; autoclear frees the device when
 * the last mount in any namespace is gone.
 */
#define _GNU_SOURCE
#include "loop.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

#define LOOP_TRIES 32

/* Does the open device fd hold exactly the file st: same inode, whole of it (offset 0,
 * as long as the file is now: a size limit, or a file changed in place since, differs),
 * read-only, autoclear?  Asked on the open fd: while we hold it, autoclear cannot
 * release the device, so what was checked here is what gets mounted (a device cleared
 * or rebound since the scan fails this, ENXIO or another inode, and is not used). */
static int loop_holds(int fd, const struct stat *st)
{
    const unsigned want = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
    struct loop_info64 li;
    unsigned long long size;

    return ioctl(fd, LOOP_GET_STATUS64, &li) == 0 && ioctl(fd, BLKGETSIZE64, &size) == 0 &&
           li.lo_device == (unsigned long long)st->st_dev && li.lo_inode == st->st_ino &&
           li.lo_offset == 0 && (li.lo_flags & want) == want &&
           size == ((unsigned long long)st->st_size & ~511ULL);
}

/* The lowest-numbered device that holds the image (see loop_holds), opened; -1 if none.
 * Cheap: /proc/partitions lists only bound devices (an unbound one has no size), with
 * their size in KiB; only those of the image's size are opened and checked. */
static int loop_find(const struct stat *st, char *dev, size_t devlen)
{
    FILE *parts = fopen("/proc/partitions", "re");
    unsigned long long kib;
    char line[256], path[64];
    int fd = -1, best = -1, num, got, lfd;

    while (parts != NULL && fgets(line, sizeof line, parts) != NULL) {
        got = 0;
        if (sscanf(line, "%*u %*u %llu loop%d%n", &kib, &num, &got) != 2 ||
            line[got] != '\n' || kib != (unsigned long long)st->st_size >> 10 ||
            (fd >= 0 && num > best))
            continue;
        snprintf(path, sizeof path, "/dev/loop%d", num);
        if ((lfd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
            continue; /* released meanwhile */
        if (!loop_holds(lfd, st)) {
            close(lfd);
            continue;
        }
        if (fd >= 0)
            close(fd);
        fd = lfd;
        best = num;
        snprintf(dev, devlen, "%s", path);
    }
    if (parts != NULL)
        fclose(parts);
    return fd;
}

int loop_attach(int backing_fd, int read_only, const char *label, char *dev, size_t devlen)
{
    struct loop_config cfg;
    struct stat st;
    int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);

    if (ctl < 0)
        die_errno("Cannot open /dev/loop-control (is the loop module loaded?)");
    if (read_only && fstat(backing_fd, &st) != 0)
        die_errno("Cannot stat %s", label);
    memset(&cfg, 0, sizeof cfg);
    cfg.fd = (unsigned)backing_fd;
    cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR | (read_only ? LO_FLAGS_READ_ONLY : 0);
    snprintf((char *)cfg.info.lo_file_name, sizeof cfg.info.lo_file_name, "%s", label);

    for (int i = 0; i < LOOP_TRIES; i++) {
        int n, fd, low;

        /* First, and again after losing a device to another launch (perhaps of this
         * image): a device that holds the image already is shared. */
        if (read_only && (fd = loop_find(&st, dev, devlen)) >= 0) {
            close(ctl);
            verbose("sharing %s, which holds %s", dev, label);
            return fd;
        }
        if ((n = ioctl(ctl, LOOP_CTL_GET_FREE)) < 0)
            die_errno("Cannot get a free loop device");
        snprintf(dev, devlen, "/dev/loop%d", n);
        fd = open(dev, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
        if (fd < 0)
            die_errno("Cannot open %s", dev);
        if (ioctl(fd, LOOP_CONFIGURE, &cfg) == 0) {
            close(ctl);
            verbose("attached %s to %s", label, dev);
            /* Launches started together may each have attached one: all take the lowest
             * (ours or not) and the others go, autoclear, with their last close.  No lock:
             * a launch its user stops must not stop anyone else's. */
            if (read_only && (low = loop_find(&st, dev, devlen)) >= 0) {
                close(fd);
                fd = low;
            }
            return fd;
        }
        if (errno != EBUSY)
            die_errno("Cannot configure %s for %s", dev, label);
        close(fd); /* lost the race for this device: look again, then ask for another */
    }
    die("Cannot get a free loop device after %d tries", LOOP_TRIES);
}
