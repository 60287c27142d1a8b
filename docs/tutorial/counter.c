/* The tutorial's workload: a counter that pycr checkpoints, restores and migrates.
 * It detaches into a session of its own, holds an eventfd (a kernel counter) and a
 * pipe with bytes nobody has read, and writes one page of a 4 MiB buffer per step. */
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

int main(void)
{
    pid_t child = fork();
    if (child > 0) { printf("%d\n", child); return 0; }  /* the parent prints the PID and exits */
    setsid();                              /* a new session: nothing outside the tree shares it */
    if (!freopen("/dev/null", "r", stdin) || !freopen("counter.log", "w", stdout)) return 1;
    dup2(1, 2);
    int efd = eventfd(0, 0), p[2];
    if (pipe(p) < 0 || write(p[1], "unread", 6) != 6) return 1;
    size_t size = 4 << 20;
    char *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(buf, 1, size);                  /* every page now present in RAM */
    for (unsigned long n = 1;; n++) {
        buf[n * 4096 % size] = n;          /* dirty one page */
        eventfd_write(efd, 1);             /* the eventfd's counter follows n */
        printf("pid %d count %lu\n", getpid(), n);
        fflush(stdout);
        usleep(200000);
    }
}
