/* pipe STATUS [NBYTES]
 * A parent and its child joined by a pipe. The parent writes a known message
 * into the pipe at once; the child leaves it there (buffered in the kernel)
 * until it gets SIGUSR1, then reads exactly that many bytes and reports
 * "got <hex>" (or "gotsum <hex>" when over 2000 bytes; sum as in wl.h).
 * Message: "pycr pipe message 0123456789" by default, or NBYTES (<= 65536)
 * bytes with byte i = (i * 7 + 3) & 0xff. Reports: "child <pid>",
 * "sent <nbytes>", "ready <pid>". */
#include "wl.h"
#include <sys/wait.h>

static volatile sig_atomic_t want_read;

static void on_usr1(int sig)
{
    (void)sig;
    want_read = 1;
}

static void child_main(int rfd, size_t len)
{
    static unsigned char buf[65536];
    size_t got = 0;
    wl_status_reopen_private();
    wl_report1("child", (uint64_t)getpid());
    while (!want_read)
        wl_sleep_ms(10);
    while (got < len) {
        ssize_t n = read(rfd, buf + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    struct wl_line l = {.len = 0};
    if (got <= 2000) {
        wl_s(&l, "got");
        wl_hexbytes(&l, buf, got);
    } else {
        struct wl_sum s;
        wl_sum_init(&s);
        wl_sum_update(&s, buf, got);
        wl_s(&l, "gotsum");
        wl_x(&l, wl_sum_final(&s));
    }
    wl_emit(&l);
    for (;;)
        wl_sleep_ms(100);
}

int main(int argc, char **argv)
{
    static unsigned char msg[65536];
    const char *dflt = "pycr pipe message 0123456789";
    size_t len;
    int p[2];
    if (argc < 2)
        wl_die("usage: pipe STATUS [NBYTES]");
    if (argc > 2) {
        len = strtoul(argv[2], NULL, 0);
        if (len > sizeof(msg))
            wl_die("pipe: NBYTES over 65536");
        for (size_t i = 0; i < len; i++)
            msg[i] = (unsigned char)(i * 7 + 3);
    } else {
        len = strlen(dflt);
        memcpy(msg, dflt, len);
    }
    wl_status_open(argv[1], 1);
    wl_on_signal(SIGUSR1, on_usr1); /* inherited: the child never dies of it */
    if (pipe2(p, O_CLOEXEC) < 0)
        wl_die("pipe");
    pid_t child = fork();
    if (child < 0)
        wl_die("fork");
    if (child == 0) {
        close(p[1]);
        child_main(p[0], len);
    }
    close(p[0]);
    if (write(p[1], msg, len) != (ssize_t)len)
        wl_die("pipe write");
    wl_report1("sent", len);
    wl_ready();
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) /* reap a killed child at once */
            ;
        wl_sleep_ms(20);
    }
}
