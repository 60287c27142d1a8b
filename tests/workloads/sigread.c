/* sigread STATUS restart|norestart
 * Blocks in read() on a pipe it holds both ends of, with a SIGUSR1 handler
 * installed with SA_RESTART or without. Reports "pipe <rfd> <wfd>", "ready
 * <pid>", then for every read: "reading N" before it, then "read <n> <hex>"
 * or "read error <errno>" after it. The handler reports "usr1". So a signal
 * during the read shows the kernel's restart rule: without SA_RESTART the
 * read fails with EINTR (4), with it the read goes on and returns the data
 * written into the pipe later (through /proc/PID/fd/<wfd>). */
#include "wl.h"

static void on_usr1(int sig)
{
    (void)sig;
    struct wl_line l = {.len = 0};
    wl_s(&l, "usr1");
    wl_emit(&l);
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    unsigned char buf[64];
    uint64_t n = 0;
    int p[2];
    if (argc < 3)
        wl_die("usage: sigread STATUS restart|norestart");
    wl_status_open(argv[1], 0);
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = strcmp(argv[2], "restart") == 0 ? SA_RESTART : 0;
    if (sigaction(SIGUSR1, &sa, NULL) < 0)
        wl_die("sigaction");
    if (pipe2(p, O_CLOEXEC) < 0)
        wl_die("pipe");
    wl_report2("pipe", (uint64_t)p[0], (uint64_t)p[1]);
    wl_ready();
    for (;;) {
        struct wl_line l = {.len = 0};
        ssize_t got;
        wl_report1("reading", ++n);
        got = read(p[0], buf, sizeof(buf));
        if (got < 0) {
            wl_report1("read error", (uint64_t)errno);
            continue;
        }
        wl_s(&l, "read");
        wl_u(&l, (uint64_t)got);
        wl_hexbytes(&l, buf, (size_t)got);
        wl_emit(&l);
    }
}
