/* openfile STATUS PATH [OFFSET]
 * Opens PATH read-write (created if missing), writes 64 KiB of known bytes
 * (byte i = (i * 31 + 7) & 0xff), seeks to OFFSET (default 12345) and idles.
 * SIGUSR1: reports "offset N" (lseek(fd, 0, SEEK_CUR)).
 * SIGUSR2: reads 16 bytes at the current offset and reports "read <hex>";
 * this moves the offset by 16. The fd number is reported as "fd N". */
#include "wl.h"

#define FILE_BYTES 65536

static volatile sig_atomic_t want_offset, want_read;

static void on_usr1(int sig)
{
    (void)sig;
    want_offset = 1;
}

static void on_usr2(int sig)
{
    (void)sig;
    want_read = 1;
}

int main(int argc, char **argv)
{
    static unsigned char content[FILE_BYTES];
    long offset = argc > 3 ? atol(argv[3]) : 12345;
    int fd;
    if (argc < 3)
        wl_die("usage: openfile STATUS PATH [OFFSET]");
    wl_status_open(argv[1], 0);
    fd = open(argv[2], O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        wl_die("open file");
    for (size_t i = 0; i < FILE_BYTES; i++)
        content[i] = (unsigned char)(i * 31 + 7);
    if (write(fd, content, FILE_BYTES) != FILE_BYTES)
        wl_die("write file");
    if (lseek(fd, offset, SEEK_SET) != offset)
        wl_die("lseek");
    wl_on_signal(SIGUSR1, on_usr1);
    wl_on_signal(SIGUSR2, on_usr2);
    wl_report1("fd", (uint64_t)fd);
    wl_ready();
    for (;;) {
        if (want_offset) {
            want_offset = 0;
            wl_report1("offset", (uint64_t)lseek(fd, 0, SEEK_CUR));
        }
        if (want_read) {
            unsigned char buf[16];
            ssize_t n;
            struct wl_line l = {.len = 0};
            want_read = 0;
            n = read(fd, buf, sizeof(buf));
            wl_s(&l, "read");
            if (n > 0)
                wl_hexbytes(&l, buf, (size_t)n);
            wl_emit(&l);
        }
        wl_sleep_ms(10);
    }
}
