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
 *                    The restorer may name the restored root (r13: its PID in
 *                    the namespace) and a 12-byte slot in the stub's stack
 *                    (r14): wait4 then writes each status there, and once the
 *                    root is reaped the stub stores its status as a shell
 *                    would report it (code, or 128 + signal) at r14+4 and 1 at
 *                    r14+8, and exits with that code when the namespace ends.
 *                    pycr reads the slot through /proc/PID/mem (or takes the
 *                    exit code), so it never has to hold the init stopped.
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
        xor     %r13d, %r13d            /* r13: the root's PID, 0 until the restorer sets it */
        xor     %r14d, %r14d            /* r14: the status slot, 0 for none */
        xor     %r15d, %r15d            /* r15: the exit code (the root's) */
.Lreap:
        mov     $SYS_wait4, %eax
        mov     $-1, %rdi
        mov     %r14, %rsi
        mov     $WALL, %edx
        xor     %r10d, %r10d
        syscall
        test    %rax, %rax
        js      .Lfailed
        mov     $1, %r12d               /* reaped one: again */
        test    %r13, %r13
        jz      .Lreap
        cmp     %r13, %rax
        jne     .Lreap
        test    %r14, %r14
        jz      .Lreap
        movl    (%r14), %eax            /* the root's wait status */
        mov     %eax, %ecx
        and     $0x7f, %ecx
        jz      .Lexited
        add     $128, %ecx              /* killed by signal ecx */
        jmp     .Lstore
.Lexited:
        movzbl  %ah, %ecx               /* exit code: bits 8..15 */
.Lstore:
        mov     %ecx, %r15d
        movl    %ecx, 4(%r14)
        movl    $1, 8(%r14)
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
        mov     %r15d, %edi
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
