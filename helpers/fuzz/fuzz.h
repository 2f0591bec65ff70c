/*
 * fuzz.h - shared by the libFuzzer harnesses (helpers/fuzz/fuzz_*.c; make fuzz).
 *
 * The harnesses are thin: they feed one input to one parser of the helper (or of the
 * SPANK plugin) and check nothing but what the sanitizers check.  Parsers that end in
 * die() (which _exit()s) are made recoverable through the hook die() already has:
 * g_cleanup runs before _exit(), and here it longjmp()s back into the harness.  So the
 * sources are compiled unchanged.
 */
#ifndef SHIFTER_FUZZ_H
#define SHIFTER_FUZZ_H

#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../util.h"

#include <fcntl.h>
#include <sanitizer/allocator_interface.h>
#include <unistd.h>

/* The keys conf.c requires, for harnesses that need a loaded udiRoot.conf. */
#define FUZZ_BASE_CONF                                                                     \
    "udiMount=/nonexistent/udiMount\nloopMount=/nonexistent/loopMount\n"                   \
    "imagePath=/nonexistent/images\nudiRootPath=/nonexistent\netcPath=/nonexistent/etc\n" \
    "rootfsType=tmpfs\n"

static jmp_buf fuzz_died;

/*
 * What the code under test allocated or opened while it may die(): in the helper, exit
 * frees and closes it; here die() jumps back, and fuzz_release() frees the memory still
 * live (tracked through the sanitizer allocator's hooks, so leak checking stays on) and
 * closes the fds it left open (below FUZZ_MAX_FD), so a long run does not grow.
 */
#define FUZZ_MAX_FD 64 /* fds are allocated lowest first: new ones are small */
static unsigned char fuzz_fd_was_open[FUZZ_MAX_FD];
#define FUZZ_MAX_LIVE 65536
static void *fuzz_live[FUZZ_MAX_LIVE];
static size_t fuzz_n_live;
static int fuzz_tracking, fuzz_hooked;

static void fuzz_on_malloc(const volatile void *ptr, size_t size)
{
    (void)size;
    if (fuzz_tracking && fuzz_n_live < FUZZ_MAX_LIVE)
        fuzz_live[fuzz_n_live++] = (void *)ptr;
}

static void fuzz_on_free(const volatile void *ptr)
{
    if (!fuzz_tracking)
        return;
    for (size_t i = fuzz_n_live; i-- > 0;)
        if (fuzz_live[i] == ptr) {
            fuzz_live[i] = fuzz_live[--fuzz_n_live];
            return;
        }
}

static inline void fuzz_track(void)
{
    if (!fuzz_hooked) {
        __sanitizer_install_malloc_and_free_hooks(fuzz_on_malloc, fuzz_on_free);
        fuzz_hooked = 1;
    }
    fuzz_n_live = 0;
    fuzz_tracking = 1;
    for (int fd = 0; fd < FUZZ_MAX_FD; fd++)
        fuzz_fd_was_open[fd] = fcntl(fd, F_GETFD) != -1;
}

/* Free what the code under FUZZ_TRY allocated and left live, and close the fds it left
 * open, died or not (call it once the harness is done with the results). */
static inline void fuzz_release(void)
{
    fuzz_tracking = 0;
    for (size_t i = 0; i < fuzz_n_live; i++)
        free(fuzz_live[i]);
    fuzz_n_live = 0;
    g_cleanup = NULL;
    for (int fd = 0; fd < FUZZ_MAX_FD; fd++)
        if (!fuzz_fd_was_open[fd] && fcntl(fd, F_GETFD) != -1)
            close(fd);
}

static inline __attribute__((noreturn)) void fuzz_recover(void)
{
    longjmp(fuzz_died, 1);
}

/* if (FUZZ_TRY) { code that may die() } : false again when it died.  die() clears
 * g_cleanup before calling it, so every FUZZ_TRY re-arms the hook.  Then use the
 * results, then fuzz_release(). */
#define FUZZ_TRY (fuzz_track(), g_cleanup = (void (*)(void))fuzz_recover, setjmp(fuzz_died) == 0)

/* The input as a NUL-terminated string (it may hold NULs of its own); free() it. */
static inline char *fuzz_cstr(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);

    if (s == NULL)
        abort();
    memcpy(s, data, size);
    s[size] = '\0';
    return s;
}

#endif
