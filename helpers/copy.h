/*
 * copy.h - copying files, symlinks and trees between directory fds, without
 * ever following a symlink and without starting a cp process.  Copies are
 * owned by root; set-id bits are dropped.
 */
#ifndef SHIFTER_HELPERS_COPY_H
#define SHIFTER_HELPERS_COPY_H

#include <sys/types.h>

/* Copy the regular file src_dir/name to dst_dir/dst_name (replacing it unless
 * keep_existing, in which case an existing entry wins and 1 is returned).  mode 0 keeps
 * the source's permission bits.  0 when copied. */
int copy_file_at(int src_dir, const char *name, int dst_dir, const char *dst_name,
                 mode_t mode, int keep_existing);

/* The same from an open file descriptor (name for messages). */
int copy_fd_at(int in, const char *name, int dst_dir, const char *dst_name, mode_t mode,
               int keep_existing);

/* Copy the symlink src_dir/name (its text, unresolved). */
void copy_symlink_at(int src_dir, const char *name, int dst_dir, const char *dst_name);

/* Copy the contents of directory src into directory dst, recursively (files, symlinks,
 * directories; other types skipped).  Existing entries are replaced.  a_rx: the copies
 * are made a+rX (read for all; execute for all on directories and on files someone may
 * execute). */
void copy_tree(int src, int dst, const char *what, int a_rx);

#endif
