/* xstate
 * Keeps state in the CPU's extended registers and checks it every step:
 * zmm31 (AVX-512, a register compiled C never touches) when the CPU has
 * AVX-512, and AMX tile 0 (after arch_prctl(ARCH_REQ_XCOMP_PERM)) when it
 * has AMX. Reports "has avx512 <0|1> amx <0|1>", then every 20 ms
 * "check N ok" or "check N bad <what>"; a restore must bring the registers
 * back exactly, in whatever place the restoring CPU keeps them. */
#include "wl.h"
#include <cpuid.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static unsigned char zmm_in[64] __attribute__((aligned(64)));
static unsigned char zmm_out[64] __attribute__((aligned(64)));
static unsigned char tile_in[1024], tile_out[1024];
static unsigned char tile_cfg[64];

static int has_avx512(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 16)))
        return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xe6) == 0xe6;
}

static int has_amx(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)))
        return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        wl_die("usage: xstate STATUS");
    wl_status_open(argv[1], 0);
    int avx = has_avx512(), amx = has_amx();
    for (int i = 0; i < 64; i++)
        zmm_in[i] = (unsigned char)(i * 13 + 5);
    for (int i = 0; i < 1024; i++)
        tile_in[i] = (unsigned char)(i * 7 + 3);
    if (avx)
        __asm__ volatile("vmovdqu64 (%0), %%zmm31" : : "r"(zmm_in) : "memory");
    if (amx) {
        tile_cfg[0] = 1;                        /* palette 1 */
        tile_cfg[16] = 64;                      /* tmm0: 64 bytes per row */
        tile_cfg[48] = 16;                      /* tmm0: 16 rows */
        __asm__ volatile("ldtilecfg (%0)" : : "r"(tile_cfg) : "memory");
        __asm__ volatile("tileloadd (%0,%1,1), %%tmm0" : : "r"(tile_in), "r"(64L) : "memory");
    }
    struct wl_line l = {.len = 0};
    wl_s(&l, "has avx512");
    wl_u(&l, (uint64_t)avx);
    wl_s(&l, " amx");
    wl_u(&l, (uint64_t)amx);
    wl_emit(&l);
    wl_ready();
    for (long n = 1;; n++) {
        const char *bad = NULL;
        if (avx) {
            __asm__ volatile("vmovdqu64 %%zmm31, (%0)" : : "r"(zmm_out) : "memory");
            if (memcmp(zmm_in, zmm_out, 64))
                bad = "zmm31";
        }
        if (amx) {
            __asm__ volatile("tilestored %%tmm0, (%0,%1,1)" : : "r"(tile_out), "r"(64L) : "memory");
            if (memcmp(tile_in, tile_out, 1024))
                bad = "tmm0";
        }
        wl_s(&l, "check");
        wl_u(&l, (uint64_t)n);
        wl_s(&l, bad ? " bad " : " ok");
        if (bad)
            wl_s(&l, bad);
        wl_emit(&l);
        wl_sleep_ms(20);
    }
}
