/*
 * pycr-stub: the first program of every restored process.
 *
 * No libc, no data, one text page. The restorer starts it with the wanted PID
 * and rebuilds the process inside it by injected syscalls, using the
 * `syscall; int3` at pycr_trampoline as its trampoline.
 *
 *   pycr-stub        wait forever in pause()
 *   pycr-stub init   act as PID 1 of a new PID namespace: reap children until,
 *                    having reaped at least one (or been told so: r12 != 0, set
 *                    by the restorer), none is left; then exit, which ends the
 *                    namespace. Before its first child it naps and retries.
 *
 * These numbers are pycr.abi's (tests/test_abi.py checks that they agree).
 */
#define SYS_pause       34
#define SYS_nanosleep   35
#define SYS_wait4       61
#define SYS_exit_group  231
#define WALL            0x40000000
#define ECHILD          10

        .text
        .globl  _start
_start:
        mov     (%rsp), %rcx            /* argc */
        cmp     $2, %rcx
        jb      .Lpause
        mov     16(%rsp), %rsi          /* argv[1] */
        cmpl    $0x74696e69, (%rsi)     /* "init" */
        jne     .Lpause
        cmpb    $0, 4(%rsi)
        jne     .Lpause

        xor     %r12d, %r12d            /* r12: a child was reaped (syscalls keep it) */
.Lreap:
        mov     $SYS_wait4, %eax
        mov     $-1, %rdi
        xor     %esi, %esi
        mov     $WALL, %edx
        xor     %r10d, %r10d
        syscall
        test    %rax, %rax
        js      .Lfailed
        mov     $1, %r12d               /* reaped one: again */
        jmp     .Lreap
.Lfailed:
        cmp     $-ECHILD, %rax          /* none left, or none yet */
        jne     .Lreap                  /* EINTR: again */
        test    %r12d, %r12d
        jnz     .Lexit
        mov     $SYS_nanosleep, %eax
        lea     .Lnap(%rip), %rdi
        xor     %esi, %esi
        syscall
        jmp     .Lreap
.Lexit:
        mov     $SYS_exit_group, %eax
        xor     %edi, %edi
        syscall

.Lpause:
        mov     $SYS_pause, %eax
        syscall
        jmp     .Lpause

        /* The injection trampoline: found by symbol or by scanning for 0f 05 cc. */
        .globl  pycr_trampoline
        .p2align 4
pycr_trampoline:
        syscall
        int3
        int3

        .p2align 3
.Lnap:  .quad   0, 50000000             /* 50 ms */

        .section .note.GNU-stack,"",@progbits
