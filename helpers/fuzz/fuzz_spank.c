/* The SPANK plugin's input parsing (slurm/shifter_spank.c, static: the harness includes
 * it): its plugstack.conf arguments (parse_config), the --image/--volume/--module/--ccm
 * option callbacks, and the per-node CPU counts of the job record (cpus_of_node).
 * The first byte picks which; the rest is NUL-separated arguments.  The few Slurm
 * functions the plugin calls are stubs here (it is never loaded by Slurm in this build). */
#include "../../slurm/shifter_spank.c"

#include <stdarg.h>

#include "fuzz.h"

/* -- stubs of what slurmd/srun/libslurm provide --------------------------------------- */
/* The log functions format the message (so a bad argument still trips the sanitizers). */
#define FUZZ_LOG(name)                                                                      \
    void name(const char *fmt, ...)                                                        \
    {                                                                                      \
        char buf[4096];                                                                    \
        va_list ap;                                                                        \
        va_start(ap, fmt);                                                                 \
        (void)vsnprintf(buf, sizeof buf, fmt, ap);                                         \
        va_end(ap);                                                                        \
    }
FUZZ_LOG(slurm_error)
FUZZ_LOG(slurm_info)
FUZZ_LOG(slurm_verbose)
FUZZ_LOG(slurm_debug)

/* Not reached from what is fuzzed: abort() so that a change which reaches them shows. */
spank_context_t spank_context(void) { abort(); }
spank_err_t spank_option_register(spank_t sp, struct spank_option *opt) { (void)sp; (void)opt; abort(); }
const char *spank_strerror(spank_err_t err) { (void)err; abort(); }
spank_err_t spank_job_control_setenv(spank_t sp, const char *name, const char *value,
                                     int overwrite)
{
    (void)sp; (void)name; (void)value; (void)overwrite; abort();
}
spank_err_t spank_get_item(spank_t sp, spank_item_t item, ...) { (void)sp; (void)item; abort(); }
int slurm_load_job(job_info_msg_t **resp, uint32_t job_id, uint16_t flags)
{
    (void)resp; (void)job_id; (void)flags; abort();
}
int slurm_load_job_user(job_info_msg_t **resp, uint32_t uid, uint16_t flags)
{
    (void)resp; (void)uid; (void)flags; abort();
}
void slurm_free_job_info_msg(job_info_msg_t *msg) { (void)msg; abort(); }
int slurm_get_errno(void) { abort(); }
char *slurm_strerror(int errnum) { (void)errnum; abort(); }
hostlist_t slurm_hostlist_create(const char *hostlist) { (void)hostlist; abort(); }
char *slurm_hostlist_shift(hostlist_t hl) { (void)hl; abort(); }
void slurm_hostlist_destroy(hostlist_t hl) { (void)hl; abort(); }
void slurm_init_job_desc_msg(job_desc_msg_t *msg) { (void)msg; abort(); }
int slurm_update_job(job_desc_msg_t *msg) { (void)msg; abort(); }
void slurm_get_job_stderr(char *buf, int size, job_info_t *job) { (void)buf; (void)size; (void)job; abort(); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text, *argv[258];
    int argc = 0;

    if (size < 1)
        return 0;
    text = fuzz_cstr(data + 1, size - 1);
    for (char *p = text; p < text + size - 1 && argc < 256; p += strlen(p) + 1)
        argv[argc++] = p;
    argv[argc] = NULL;
    switch (data[0] % 3) {
    case 0:
        (void)parse_config(argc, argv);
        break;
    case 1: /* each argument: its first byte picks the option, the rest is its value */
        for (int i = 0; i < argc; i++) {
            const char *v = argv[i][0] ? argv[i] + 1 : argv[i];
            switch (argv[i][0] % 4) {
            case 0: (void)cb_image(0, v, i & 1); break;
            case 1: (void)cb_volume(0, v, i & 1); break;
            case 2: (void)cb_module(0, v, i & 1); break;
            default: (void)cb_ccm(0, v, i & 1); break;
            }
        }
        free(opt_image);
        free(opt_volume);
        free(opt_module);
        opt_image = opt_volume = opt_module = NULL;
        opt_ccm = 0;
        break;
    default:
        for (int i = 0; i < argc; i++)
            (void)cpus_of_node(argv[0], (unsigned long)i * 3);
        break;
    }
    free(text);
    return 0;
}
