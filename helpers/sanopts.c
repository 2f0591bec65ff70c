/*
 * sanopts.c - linked into the sanitizer build (make sanitize) only.
 *
 * LeakSanitizer works by ptrace, which a setuid process may not do; leaks are
 * not what these runs look for, so it is off by default.
 *
 * The sanitizer runtime is not safe in a setuid program: libasan and libubsan
 * read ASAN_OPTIONS/UBSAN_OPTIONS in their constructors, before main() and
 * its clearenv() run, and honour them whoever the caller is.  A caller who
 * sets log_path to a symlink they planted makes root create or truncate any
 * file (other options load suppression files, change exit codes, ...).  So
 * this build is never installed setuid where untrusted users can reach it:
 * the tests install it root:shifter-testers 4750 in a 0750 directory only
 * the test users can enter, and remove it when the session ends
 * (tests/world/runtime.py).  Sites install only the plain build
 * (make install).
 */
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
    return "detect_leaks=0:abort_on_error=0";
}
