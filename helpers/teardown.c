/*
 * teardown.c - shifter-setup's removal of the node's container (unsetup, a failed setup, a
 * container left by a missed unsetup): detach udiMount and loopMount as wholes
 * (mnt_detach_roots), then read /proc/self/mountinfo for anything still mounted below
 * them, which is reported, never unmounted by its path.  Root-only: the setuid helper
 * builds in a namespace of its own, where a leftover is hidden by its new mounts.
 */
#define _GNU_SOURCE
#include "teardown.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mnt.h"
#include "util.h"

#define MAX_LEFT 4096

/* Undo mountinfo's octal escapes (\040 for a space, ...) in place. */
static void unescape(char *s)
{
    char *w = s;

    for (char *r = s; *r;) {
        if (r[0] == '\\' && r[1] >= '0' && r[1] <= '3' && r[2] >= '0' && r[2] <= '7' &&
            r[3] >= '0' && r[3] <= '7') {
            *w++ = (char)((r[1] - '0') * 64 + (r[2] - '0') * 8 + (r[3] - '0'));
            r += 4;
        } else {
            *w++ = *r++;
        }
    }
    *w = '\0';
}

/* The mount point (fifth field, unescaped) of each mountinfo line under a root is
 * reported; returns how many. */
static int report_left(const char *const roots[], int np)
{
    int fd = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC), n = 0;
    char *text, *save = NULL;
    size_t len;

    if (fd < 0 || read_all_fd(fd, 64 * 1024 * 1024, &text, &len) != 0)
        die_errno("Cannot read /proc/self/mountinfo");
    close(fd);
    /* id parent major:minor root mountpoint ... */
    for (char *line = strtok_r(text, "\n", &save); line != NULL && n < MAX_LEFT;
         line = strtok_r(NULL, "\n", &save)) {
        char *f = line;
        for (int k = 0; k < 4 && f != NULL; k++)
            f = strchr(f, ' ') ? strchr(f, ' ') + 1 : NULL;
        if (f == NULL)
            continue;
        f[strcspn(f, " ")] = '\0';
        unescape(f);
        for (int i = 0; i < np; i++)
            if (path_under(f, roots[i])) {
                warn("shifter-helper: could not unmount %s", f);
                n++;
                break;
            }
    }
    free(text);
    return n;
}

int teardown(const struct ctx *c)
{
    const char *roots[2] = {c->udi, c->loop};

    mnt_detach_roots(roots, 2);
    return report_left(roots, 2) == 0 ? 0 : -1;
}
