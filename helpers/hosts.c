/*
 * hosts.c - setup's --nodes "host/N host/N" list and the container's var/hostsfile
 * (rules of udiroot/hostsfile.py).  Root's input: linked into shifter-setup only.
 */
#define _GNU_SOURCE
#include "hosts.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

#define MAX_HOST_COUNT 65536
#define HOST_CHARS "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"

int hosts_validate(const char *text, char *err, size_t errlen)
{
    const char *p = text;

    if (strlen(text) > 1024 * 1024) {
        snprintf(err, errlen, "Node list too long");
        return -1;
    }
    while (*p) {
        size_t n = strcspn(p, " \t"), hl;
        const char *slash;
        unsigned long count = 0;

        if (n == 0) {
            p++;
            continue;
        }
        slash = memchr(p, '/', n);
        hl = slash ? (size_t)(slash - p) : 0;
        if (slash == NULL || hl == 0 || hl > 250 || strspn(p, HOST_CHARS) != hl || n - hl - 1 == 0 ||
            n - hl - 1 > 6 || strspn(slash + 1, "0123456789") != n - hl - 1)
            goto bad;
        for (const char *c = slash + 1; c < p + n; c++)
            count = count * 10 + (unsigned long)(*c - '0');
        if (count < 1 || count > MAX_HOST_COUNT)
            goto bad;
        p += n;
        continue;
    bad:
        snprintf(err, errlen, "Invalid node list entry '%.*s': expected host/count, count 1..%d",
                 (int)(n > 256 ? 256 : n), p, MAX_HOST_COUNT);
        return -1;
    }
    return 0;
}

void hosts_write(int root, const char *text)
{
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    const char *p = text;
    int var = open_dir_at(root, "var");

    if (var < 0 || f == NULL)
        die_errno("Cannot open the container's /var");
    while (*p) {
        size_t n = strcspn(p, " \t");
        if (n == 0) {
            p++;
            continue;
        }
        const char *slash = memchr(p, '/', n);
        unsigned long count = strtoul(slash + 1, NULL, 10);
        for (unsigned long i = 0; i < count; i++)
            fprintf(f, "%.*s\n", (int)(slash - p), p);
        p += n;
    }
    if (fclose(f) != 0)
        die("shifter-setup: out of memory");
    write_file_at(var, "hostsfile", out, len, 0644);
    free(out);
    close(var);
}
