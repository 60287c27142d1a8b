/* seccomp STATUS
 * Installs two seccomp filters (no_new_privs first): the older makes uname(2)
 * fail with errno 42 (ENOMSG), the newer makes syslog(2) fail with errno 43
 * (EIDRM); everything else is allowed. Then counts ("count N" every 10 ms).
 * SIGUSR1: calls both and reports "filtered errno 42" and "filtered2 errno 43"
 * (whatever errno they really give). */
#include "wl.h"
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>

#define UNAME_ERRNO 42
#define SYSLOG_ERRNO 43

static volatile sig_atomic_t want_try;

static void on_usr1(int sig)
{
    (void)sig;
    want_try = 1;
}

static void install_errno_filter(int nr, int err)
{
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (err & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof(code) / sizeof(code[0]), .filter = code};
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
        wl_die("seccomp");
}

static int errno_of(long ret)
{
    return ret < 0 ? errno : 0;
}

int main(int argc, char **argv)
{
    uint64_t n = 0;
    if (argc < 2)
        wl_die("usage: seccomp STATUS");
    wl_status_open(argv[1], 0);
    wl_on_signal(SIGUSR1, on_usr1);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        wl_die("no_new_privs");
    install_errno_filter(SYS_uname, UNAME_ERRNO);
    install_errno_filter(SYS_syslog, SYSLOG_ERRNO);
    wl_ready();
    for (;;) {
        if (want_try) {
            struct { char f[6][65]; } uts;
            want_try = 0;
            wl_report1("filtered errno", (uint64_t)errno_of(syscall(SYS_uname, &uts)));
            /* 10 = SYSLOG_ACTION_SIZE_BUFFER: harmless when allowed. */
            wl_report1("filtered2 errno", (uint64_t)errno_of(syscall(SYS_syslog, 10, NULL, 0)));
        }
        n++;
        wl_report1("count", n);
        wl_sleep_ms(10);
    }
}
