/*
 * sanopts.c - linked into the sanitizer build only.  LeakSanitizer works by
 * ptrace, which a setuid process may not do; leaks are not what these runs
 * look for, so it is off by default (ASAN_OPTIONS cannot be used: the helper
 * clears its environment and a setuid program should not read it anyway).
 */
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
    return "detect_leaks=0:abort_on_error=0";
}
