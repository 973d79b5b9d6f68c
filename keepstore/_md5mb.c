/* Multi-buffer MD5: up to eight independent MD5 computations advanced together, one per 32-bit lane of an AVX2
 * register.
 *
 * MD5 is a chain of dependent 32-bit operations, so one stream keeps a core's arithmetic units mostly idle
 * (OpenSSL reaches ~4.5 cycles per byte whatever the CPU). Eight streams in the eight lanes of a vector do eight
 * times the work per instruction; this is the technique of Intel's isa-l_crypto md5_mb. The digests are plain MD5,
 * bit for bit: every block keepstore serves or stores is still verified in full; only more of them are verified
 * per core-second.
 *
 * The module is written for keepstore's hash engine (keepstore/hashing.py):
 *
 *   Md5()                      an MD5 state; update(buffer) hashes one stream (scalar code, GIL released above
 *                              a few KiB); hexdigest() / digest() read it without finishing it; copy().
 *   update_many(states, bufs)  state[i].update(bufs[i]) for all i at once, eight lanes at a time, GIL released.
 *   simd_lanes()               8 when the CPU has AVX2 (update_many uses it), else 1 (update_many loops).
 *   digest_file(fd, size, interval, chains, scratch, keep)
 *                              a stored block's MD5 from its checkpoints (see digest_file below), read and hashed
 *                              in one call without the GIL.
 *   read_cached(path, into, max_size)
 *                              a small block read from the page cache and hashed in one call (see below).
 *
 * A state must not be used by two threads at once; update_many holds no reference to a buffer after it returns.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

#define LANES 8
#define RELEASE_GIL_ABOVE 4096

/* ---- the MD5 state and the scalar compression function ------------------------------------------------------- */

#define MAX_MARKS 15

typedef struct {
    uint32_t h[4];
    uint64_t length;     /* bytes given to the state so far */
    uint64_t compressed; /* bytes of those run through the compression function (a multiple of 64) */
    uint8_t tail[64];    /* the rest: length - compressed bytes */
    uint32_t tail_len;
    uint32_t interval;   /* record the chaining value every this many bytes (a multiple of 64), 0: never */
    uint32_t nmarks;
    uint32_t marks[MAX_MARKS][4];
} md5_ctx;

static const uint32_t K[64] = {
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
};

static void md5_init(md5_ctx *c) {
    c->h[0] = 0x67452301;
    c->h[1] = 0xefcdab89;
    c->h[2] = 0x98badcfe;
    c->h[3] = 0x10325476;
    c->length = 0;
    c->compressed = 0;
    c->tail_len = 0;
    c->interval = 0;
    c->nmarks = 0;
}

/* Blocks the state may compress before it must stop at a checkpoint. */
static inline size_t blocks_to_mark(const md5_ctx *c) {
    if (!c->interval || c->nmarks >= MAX_MARKS) return SIZE_MAX;
    return (size_t)((c->interval - c->compressed % c->interval) / 64);
}

/* Account for ``n`` compressed blocks; record a checkpoint if that reached one. */
static inline void compressed_blocks(md5_ctx *c, size_t n) {
    c->compressed += (uint64_t)n * 64;
    if (c->interval && c->nmarks < MAX_MARKS && c->compressed % c->interval == 0) {
        memcpy(c->marks[c->nmarks], c->h, 16);
        c->nmarks++;
    }
}

static inline uint32_t rotl(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static inline uint32_t load_le32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4); /* MD5 words are little-endian, as is every CPU this runs on (checked at import) */
    return v;
}

#define SF(a, b, c, d, k, s, i) a = b + rotl(a + ((d) ^ ((b) & ((c) ^ (d)))) + K[i] + load_le32(p + 4 * (k)), s)
#define SG(a, b, c, d, k, s, i) a = b + rotl(a + ((c) ^ ((d) & ((b) ^ (c)))) + K[i] + load_le32(p + 4 * (k)), s)
#define SH(a, b, c, d, k, s, i) a = b + rotl(a + ((b) ^ (c) ^ (d)) + K[i] + load_le32(p + 4 * (k)), s)
#define SI(a, b, c, d, k, s, i) a = b + rotl(a + ((c) ^ ((b) | ~(d))) + K[i] + load_le32(p + 4 * (k)), s)

static void md5_blocks(uint32_t h[4], const uint8_t *p, size_t nblocks) {
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3];
    for (; nblocks; nblocks--, p += 64) {
        uint32_t aa = a, bb = b, cc = c, dd = d;
        SF(a, b, c, d, 0, 7, 0);   SF(d, a, b, c, 1, 12, 1);  SF(c, d, a, b, 2, 17, 2);  SF(b, c, d, a, 3, 22, 3);
        SF(a, b, c, d, 4, 7, 4);   SF(d, a, b, c, 5, 12, 5);  SF(c, d, a, b, 6, 17, 6);  SF(b, c, d, a, 7, 22, 7);
        SF(a, b, c, d, 8, 7, 8);   SF(d, a, b, c, 9, 12, 9);  SF(c, d, a, b, 10, 17, 10); SF(b, c, d, a, 11, 22, 11);
        SF(a, b, c, d, 12, 7, 12); SF(d, a, b, c, 13, 12, 13); SF(c, d, a, b, 14, 17, 14); SF(b, c, d, a, 15, 22, 15);
        SG(a, b, c, d, 1, 5, 16);  SG(d, a, b, c, 6, 9, 17);  SG(c, d, a, b, 11, 14, 18); SG(b, c, d, a, 0, 20, 19);
        SG(a, b, c, d, 5, 5, 20);  SG(d, a, b, c, 10, 9, 21); SG(c, d, a, b, 15, 14, 22); SG(b, c, d, a, 4, 20, 23);
        SG(a, b, c, d, 9, 5, 24);  SG(d, a, b, c, 14, 9, 25); SG(c, d, a, b, 3, 14, 26);  SG(b, c, d, a, 8, 20, 27);
        SG(a, b, c, d, 13, 5, 28); SG(d, a, b, c, 2, 9, 29);  SG(c, d, a, b, 7, 14, 30);  SG(b, c, d, a, 12, 20, 31);
        SH(a, b, c, d, 5, 4, 32);  SH(d, a, b, c, 8, 11, 33); SH(c, d, a, b, 11, 16, 34); SH(b, c, d, a, 14, 23, 35);
        SH(a, b, c, d, 1, 4, 36);  SH(d, a, b, c, 4, 11, 37); SH(c, d, a, b, 7, 16, 38);  SH(b, c, d, a, 10, 23, 39);
        SH(a, b, c, d, 13, 4, 40); SH(d, a, b, c, 0, 11, 41); SH(c, d, a, b, 3, 16, 42);  SH(b, c, d, a, 6, 23, 43);
        SH(a, b, c, d, 9, 4, 44);  SH(d, a, b, c, 12, 11, 45); SH(c, d, a, b, 15, 16, 46); SH(b, c, d, a, 2, 23, 47);
        SI(a, b, c, d, 0, 6, 48);  SI(d, a, b, c, 7, 10, 49); SI(c, d, a, b, 14, 15, 50); SI(b, c, d, a, 5, 21, 51);
        SI(a, b, c, d, 12, 6, 52); SI(d, a, b, c, 3, 10, 53); SI(c, d, a, b, 10, 15, 54); SI(b, c, d, a, 1, 21, 55);
        SI(a, b, c, d, 8, 6, 56);  SI(d, a, b, c, 15, 10, 57); SI(c, d, a, b, 6, 15, 58);  SI(b, c, d, a, 13, 21, 59);
        SI(a, b, c, d, 4, 6, 60);  SI(d, a, b, c, 11, 10, 61); SI(c, d, a, b, 2, 15, 62);  SI(b, c, d, a, 9, 21, 63);
        a += aa; b += bb; c += cc; d += dd;
    }
    h[0] = a; h[1] = b; h[2] = c; h[3] = d;
}

/* ---- eight lanes with AVX2 ------------------------------------------------------------------------------------ */

#if HAVE_X86
#define V __m256i
#define VADD(x, y) _mm256_add_epi32(x, y)
#define VXOR(x, y) _mm256_xor_si256(x, y)
#define VAND(x, y) _mm256_and_si256(x, y)
#define VOR(x, y) _mm256_or_si256(x, y)
#define VROTL(x, n) VOR(_mm256_slli_epi32(x, n), _mm256_srli_epi32(x, 32 - (n)))
#define VK(i) _mm256_set1_epi32((int)K[i])

#define VF(b, c, d) VXOR(d, VAND(b, VXOR(c, d)))
#define VG(b, c, d) VXOR(c, VAND(d, VXOR(b, c)))
#define VH(b, c, d) VXOR(VXOR(b, c), d)
#define VI(b, c, d) VXOR(c, VOR(b, VXOR(d, ones)))
#define VSTEP(f, a, b, c, d, k, s, i) a = VADD(b, VROTL(VADD(VADD(a, f(b, c, d)), VADD(VK(i), w[k])), s))

/* Transpose eight rows of eight 32-bit words (row l = eight words of lane l) into eight columns (column k = word
 * k of every lane). */
__attribute__((target("avx2"))) static inline void transpose8(V r[8]) {
    V t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    V t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    V t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    V t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    V u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    V u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    V u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    V u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

/* Advance eight MD5 states by ``nblocks`` 64-byte blocks each, lane l reading from p[l]. */
__attribute__((target("avx2"))) static void md5_blocks_x8(uint32_t *h[LANES], const uint8_t *p[LANES],
                                                           size_t nblocks) {
    V a = _mm256_setr_epi32((int)h[0][0], (int)h[1][0], (int)h[2][0], (int)h[3][0], (int)h[4][0], (int)h[5][0],
                            (int)h[6][0], (int)h[7][0]);
    V b = _mm256_setr_epi32((int)h[0][1], (int)h[1][1], (int)h[2][1], (int)h[3][1], (int)h[4][1], (int)h[5][1],
                            (int)h[6][1], (int)h[7][1]);
    V c = _mm256_setr_epi32((int)h[0][2], (int)h[1][2], (int)h[2][2], (int)h[3][2], (int)h[4][2], (int)h[5][2],
                            (int)h[6][2], (int)h[7][2]);
    V d = _mm256_setr_epi32((int)h[0][3], (int)h[1][3], (int)h[2][3], (int)h[3][3], (int)h[4][3], (int)h[5][3],
                            (int)h[6][3], (int)h[7][3]);
    const V ones = _mm256_set1_epi32(-1);
    for (size_t blk = 0; blk < nblocks; blk++) {
        V w[16];
        size_t off = blk * 64;
        for (int l = 0; l < LANES; l++) {
            w[l] = _mm256_loadu_si256((const V *)(p[l] + off));
            w[8 + l] = _mm256_loadu_si256((const V *)(p[l] + off + 32));
        }
        transpose8(w);
        transpose8(w + 8);
        V aa = a, bb = b, cc = c, dd = d;
        VSTEP(VF, a, b, c, d, 0, 7, 0);   VSTEP(VF, d, a, b, c, 1, 12, 1);
        VSTEP(VF, c, d, a, b, 2, 17, 2);  VSTEP(VF, b, c, d, a, 3, 22, 3);
        VSTEP(VF, a, b, c, d, 4, 7, 4);   VSTEP(VF, d, a, b, c, 5, 12, 5);
        VSTEP(VF, c, d, a, b, 6, 17, 6);  VSTEP(VF, b, c, d, a, 7, 22, 7);
        VSTEP(VF, a, b, c, d, 8, 7, 8);   VSTEP(VF, d, a, b, c, 9, 12, 9);
        VSTEP(VF, c, d, a, b, 10, 17, 10); VSTEP(VF, b, c, d, a, 11, 22, 11);
        VSTEP(VF, a, b, c, d, 12, 7, 12); VSTEP(VF, d, a, b, c, 13, 12, 13);
        VSTEP(VF, c, d, a, b, 14, 17, 14); VSTEP(VF, b, c, d, a, 15, 22, 15);
        VSTEP(VG, a, b, c, d, 1, 5, 16);  VSTEP(VG, d, a, b, c, 6, 9, 17);
        VSTEP(VG, c, d, a, b, 11, 14, 18); VSTEP(VG, b, c, d, a, 0, 20, 19);
        VSTEP(VG, a, b, c, d, 5, 5, 20);  VSTEP(VG, d, a, b, c, 10, 9, 21);
        VSTEP(VG, c, d, a, b, 15, 14, 22); VSTEP(VG, b, c, d, a, 4, 20, 23);
        VSTEP(VG, a, b, c, d, 9, 5, 24);  VSTEP(VG, d, a, b, c, 14, 9, 25);
        VSTEP(VG, c, d, a, b, 3, 14, 26); VSTEP(VG, b, c, d, a, 8, 20, 27);
        VSTEP(VG, a, b, c, d, 13, 5, 28); VSTEP(VG, d, a, b, c, 2, 9, 29);
        VSTEP(VG, c, d, a, b, 7, 14, 30); VSTEP(VG, b, c, d, a, 12, 20, 31);
        VSTEP(VH, a, b, c, d, 5, 4, 32);  VSTEP(VH, d, a, b, c, 8, 11, 33);
        VSTEP(VH, c, d, a, b, 11, 16, 34); VSTEP(VH, b, c, d, a, 14, 23, 35);
        VSTEP(VH, a, b, c, d, 1, 4, 36);  VSTEP(VH, d, a, b, c, 4, 11, 37);
        VSTEP(VH, c, d, a, b, 7, 16, 38); VSTEP(VH, b, c, d, a, 10, 23, 39);
        VSTEP(VH, a, b, c, d, 13, 4, 40); VSTEP(VH, d, a, b, c, 0, 11, 41);
        VSTEP(VH, c, d, a, b, 3, 16, 42); VSTEP(VH, b, c, d, a, 6, 23, 43);
        VSTEP(VH, a, b, c, d, 9, 4, 44);  VSTEP(VH, d, a, b, c, 12, 11, 45);
        VSTEP(VH, c, d, a, b, 15, 16, 46); VSTEP(VH, b, c, d, a, 2, 23, 47);
        VSTEP(VI, a, b, c, d, 0, 6, 48);  VSTEP(VI, d, a, b, c, 7, 10, 49);
        VSTEP(VI, c, d, a, b, 14, 15, 50); VSTEP(VI, b, c, d, a, 5, 21, 51);
        VSTEP(VI, a, b, c, d, 12, 6, 52); VSTEP(VI, d, a, b, c, 3, 10, 53);
        VSTEP(VI, c, d, a, b, 10, 15, 54); VSTEP(VI, b, c, d, a, 1, 21, 55);
        VSTEP(VI, a, b, c, d, 8, 6, 56);  VSTEP(VI, d, a, b, c, 15, 10, 57);
        VSTEP(VI, c, d, a, b, 6, 15, 58); VSTEP(VI, b, c, d, a, 13, 21, 59);
        VSTEP(VI, a, b, c, d, 4, 6, 60);  VSTEP(VI, d, a, b, c, 11, 10, 61);
        VSTEP(VI, c, d, a, b, 2, 15, 62); VSTEP(VI, b, c, d, a, 9, 21, 63);
        a = VADD(a, aa); b = VADD(b, bb); c = VADD(c, cc); d = VADD(d, dd);
    }
    uint32_t out[4][LANES];
    _mm256_storeu_si256((V *)out[0], a);
    _mm256_storeu_si256((V *)out[1], b);
    _mm256_storeu_si256((V *)out[2], c);
    _mm256_storeu_si256((V *)out[3], d);
    for (int l = 0; l < LANES; l++)
        for (int j = 0; j < 4; j++) h[l][j] = out[j][l];
}
#endif

static int have_avx2 = 0;

/* ---- updating states ------------------------------------------------------------------------------------------ */

typedef struct {
    md5_ctx *ctx;
    const uint8_t *data;
    size_t len;
} lane_job;

/* Bring a state's tail to a block boundary from the job's data (or take all of the data into the tail); afterwards
 * the job's data is whole blocks plus a remainder that finish_job() stores as the new tail. */
static void start_job(lane_job *j) {
    md5_ctx *c = j->ctx;
    c->length += j->len;
    if (c->tail_len) {
        size_t need = 64 - c->tail_len;
        size_t take = j->len < need ? j->len : need;
        memcpy(c->tail + c->tail_len, j->data, take);
        c->tail_len += (uint32_t)take;
        j->data += take;
        j->len -= take;
        if (c->tail_len == 64) {
            md5_blocks(c->h, c->tail, 1);
            compressed_blocks(c, 1);
            c->tail_len = 0;
        }
    }
}

static void finish_job(lane_job *j) {
    /* j->len < 64 here, and the tail is empty unless the data never reached a block boundary */
    md5_ctx *c = j->ctx;
    if (j->len) {
        memcpy(c->tail + c->tail_len, j->data, j->len);
        c->tail_len += (uint32_t)j->len;
        j->data += j->len;
        j->len = 0;
    }
}

static void scalar_job(lane_job *j) {
    while (j->len >= 64) {
        size_t n = j->len / 64, room = blocks_to_mark(j->ctx);
        if (n > room) n = room;
        md5_blocks(j->ctx->h, j->data, n);
        compressed_blocks(j->ctx, n);
        j->data += n * 64;
        j->len -= n * 64;
    }
}

/* Update every job's state with its data. */
static void update_jobs(lane_job *jobs, size_t njobs) {
    for (size_t i = 0; i < njobs; i++) start_job(&jobs[i]);
#if HAVE_X86
    if (have_avx2) {
        /* Lanes are filled from the jobs that still have whole blocks; each round runs as many blocks as the
         * shortest lane has left, then refills. A lane with nothing to do re-reads lane 0's data into a scratch
         * state: the work is wasted but it keeps the code branch-free. */
        size_t next = 0;
        lane_job *lane[LANES] = {0};
        uint32_t scratch[LANES][4];
        for (;;) {
            int active = 0;
            for (int l = 0; l < LANES; l++) {
                if (lane[l] && lane[l]->len < 64) lane[l] = NULL;
                while (!lane[l] && next < njobs) {
                    if (jobs[next].len >= 64) lane[l] = &jobs[next];
                    next++;
                }
                if (lane[l]) active++;
            }
            if (active == 0) break;
            if (active == 1) {
                /* One stream left: the scalar code is as fast per stream and wastes nothing. */
                for (int l = 0; l < LANES; l++)
                    if (lane[l]) scalar_job(lane[l]);
                continue;
            }
            size_t blocks = SIZE_MAX;
            lane_job *any = NULL;
            for (int l = 0; l < LANES; l++) {
                if (lane[l]) {
                    size_t n = lane[l]->len / 64, room = blocks_to_mark(lane[l]->ctx);
                    if (room < n) n = room;
                    if (n < blocks) blocks = n;
                    any = lane[l];
                }
            }
            uint32_t *h[LANES];
            const uint8_t *p[LANES];
            for (int l = 0; l < LANES; l++) {
                if (lane[l]) {
                    h[l] = lane[l]->ctx->h;
                    p[l] = lane[l]->data;
                } else {
                    h[l] = scratch[l];
                    p[l] = any->data;
                }
            }
            md5_blocks_x8(h, p, blocks);
            for (int l = 0; l < LANES; l++) {
                if (lane[l]) {
                    compressed_blocks(lane[l]->ctx, blocks);
                    lane[l]->data += blocks * 64;
                    lane[l]->len -= blocks * 64;
                }
            }
        }
    } else
#endif
    {
        for (size_t i = 0; i < njobs; i++) scalar_job(&jobs[i]);
    }
    for (size_t i = 0; i < njobs; i++) finish_job(&jobs[i]);
}

static void md5_final(const md5_ctx *c, uint8_t out[16]) {
    uint32_t h[4] = {c->h[0], c->h[1], c->h[2], c->h[3]};
    uint8_t pad[128];
    size_t n = c->tail_len;
    memcpy(pad, c->tail, n);
    pad[n++] = 0x80;
    size_t total = n <= 56 ? 64 : 128;
    memset(pad + n, 0, total - 8 - n);
    uint64_t bits = c->length * 8;
    for (int i = 0; i < 8; i++) pad[total - 8 + i] = (uint8_t)(bits >> (8 * i));
    md5_blocks(h, pad, total / 64);
    for (int i = 0; i < 4; i++) {
        out[4 * i] = (uint8_t)h[i];
        out[4 * i + 1] = (uint8_t)(h[i] >> 8);
        out[4 * i + 2] = (uint8_t)(h[i] >> 16);
        out[4 * i + 3] = (uint8_t)(h[i] >> 24);
    }
}

/* ---- Python type ---------------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    md5_ctx ctx;
} Md5Object;

static PyTypeObject Md5Type;

static PyObject *Md5_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"checkpoint", NULL};
    PyObject *arg = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O!", kwlist, &PyLong_Type, &arg)) return NULL;
    unsigned long long interval = arg ? PyLong_AsUnsignedLongLong(arg) : 0; /* OverflowError if negative */
    if (interval == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (interval % 64 || interval > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "checkpoint must be a multiple of 64 below 2**32");
        return NULL;
    }
    Md5Object *self = (Md5Object *)type->tp_alloc(type, 0);
    if (self) {
        md5_init(&self->ctx);
        self->ctx.interval = (uint32_t)interval;
    }
    return (PyObject *)self;
}

static PyObject *Md5_resume(PyTypeObject *type, PyObject *args) {
    Py_buffer chain;
    PyObject *arg;
    if (!PyArg_ParseTuple(args, "y*O!", &chain, &PyLong_Type, &arg)) return NULL;
    unsigned long long length = PyLong_AsUnsignedLongLong(arg); /* OverflowError if negative or too large */
    if (length == (unsigned long long)-1 && PyErr_Occurred()) {
        PyBuffer_Release(&chain);
        return NULL;
    }
    if (chain.len != 16 || length % 64) {
        PyBuffer_Release(&chain);
        PyErr_SetString(PyExc_ValueError, "resume needs a 16-byte chaining value and a length that is a multiple of 64");
        return NULL;
    }
    Md5Object *self = (Md5Object *)type->tp_alloc(type, 0);
    if (self) {
        md5_init(&self->ctx);
        memcpy(self->ctx.h, chain.buf, 16);
        self->ctx.length = self->ctx.compressed = length;
    }
    PyBuffer_Release(&chain);
    return (PyObject *)self;
}

static PyObject *Md5_chain(Md5Object *self, PyObject *unused) {
    if (self->ctx.tail_len) {
        PyErr_SetString(PyExc_ValueError, "the state is not at a 64-byte boundary");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)self->ctx.h, 16);
}

static PyObject *Md5_checkpoints(Md5Object *self, PyObject *unused) {
    return PyBytes_FromStringAndSize((const char *)self->ctx.marks, (Py_ssize_t)self->ctx.nmarks * 16);
}

static PyObject *Md5_update(Md5Object *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    lane_job job = {&self->ctx, view.buf, (size_t)view.len};
    if (view.len > RELEASE_GIL_ABOVE) {
        Py_BEGIN_ALLOW_THREADS
        update_jobs(&job, 1);
        Py_END_ALLOW_THREADS
    } else {
        update_jobs(&job, 1);
    }
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *Md5_digest(Md5Object *self, PyObject *unused) {
    uint8_t out[16];
    md5_final(&self->ctx, out);
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyObject *Md5_hexdigest(Md5Object *self, PyObject *unused) {
    static const char hex[] = "0123456789abcdef";
    uint8_t out[16];
    char text[32];
    md5_final(&self->ctx, out);
    for (int i = 0; i < 16; i++) {
        text[2 * i] = hex[out[i] >> 4];
        text[2 * i + 1] = hex[out[i] & 15];
    }
    return PyUnicode_FromStringAndSize(text, 32);
}

static PyObject *Md5_copy(Md5Object *self, PyObject *unused) {
    Md5Object *other = (Md5Object *)Md5Type.tp_alloc(&Md5Type, 0);
    if (other) other->ctx = self->ctx;
    return (PyObject *)other;
}

static PyObject *Md5_get_length(Md5Object *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->ctx.length);
}

static PyMethodDef Md5_methods[] = {
    {"update", (PyCFunction)Md5_update, METH_O, "Hash more data."},
    {"digest", (PyCFunction)Md5_digest, METH_NOARGS, "The digest of the data so far (16 bytes)."},
    {"hexdigest", (PyCFunction)Md5_hexdigest, METH_NOARGS, "The digest of the data so far (32 hex digits)."},
    {"copy", (PyCFunction)Md5_copy, METH_NOARGS, "An independent copy of this state."},
    {"resume", (PyCFunction)Md5_resume, METH_VARARGS | METH_CLASS,
     "resume(chain, length): the state of a stream whose first ``length`` bytes (a multiple of 64) led to the "
     "16-byte chaining value ``chain``."},
    {"chain", (PyCFunction)Md5_chain, METH_NOARGS, "The 16-byte chaining value (at a 64-byte boundary only)."},
    {"checkpoints", (PyCFunction)Md5_checkpoints, METH_NOARGS,
     "The chaining values recorded every ``checkpoint`` bytes so far, 16 bytes each (at most 15)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Md5_getset[] = {
    {"length", (getter)Md5_get_length, NULL, "Bytes hashed so far.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject Md5Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "keepstore._md5mb.Md5",
    .tp_basicsize = sizeof(Md5Object),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An MD5 state that update_many() can advance together with others.",
    .tp_new = Md5_new,
    .tp_methods = Md5_methods,
    .tp_getset = Md5_getset,
};

/* update_many(states, buffers): one call, GIL released while hashing. */
static PyObject *update_many(PyObject *module, PyObject *args) {
    PyObject *states, *buffers;
    if (!PyArg_ParseTuple(args, "OO", &states, &buffers)) return NULL;
    PyObject *sseq = PySequence_Fast(states, "states must be a sequence");
    if (!sseq) return NULL;
    PyObject *bseq = PySequence_Fast(buffers, "buffers must be a sequence");
    if (!bseq) {
        Py_DECREF(sseq);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(sseq);
    PyObject *result = NULL;
    lane_job *jobs = NULL;
    Py_buffer *views = NULL;
    Py_ssize_t got = 0;
    if (PySequence_Fast_GET_SIZE(bseq) != n) {
        PyErr_SetString(PyExc_ValueError, "states and buffers differ in length");
        goto done;
    }
    jobs = PyMem_Calloc((size_t)n + 1, sizeof(lane_job));
    views = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    if (!jobs || !views) {
        PyErr_NoMemory();
        goto done;
    }
    size_t total = 0;
    for (; got < n; got++) {
        PyObject *s = PySequence_Fast_GET_ITEM(sseq, got);
        if (!PyObject_TypeCheck(s, &Md5Type)) {
            PyErr_SetString(PyExc_TypeError, "states must be Md5 objects");
            goto done;
        }
        for (Py_ssize_t k = 0; k < got; k++) {
            if (jobs[k].ctx == &((Md5Object *)s)->ctx) {
                PyErr_SetString(PyExc_ValueError, "the same state appears twice");
                goto done;
            }
        }
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(bseq, got), &views[got], PyBUF_SIMPLE) < 0) goto done;
        jobs[got].ctx = &((Md5Object *)s)->ctx;
        jobs[got].data = views[got].buf;
        jobs[got].len = (size_t)views[got].len;
        total += jobs[got].len;
    }
    if (total > RELEASE_GIL_ABOVE) {
        Py_BEGIN_ALLOW_THREADS
        update_jobs(jobs, (size_t)n);
        Py_END_ALLOW_THREADS
    } else {
        update_jobs(jobs, (size_t)n);
    }
    result = Py_None;
    Py_INCREF(result);
done:
    for (Py_ssize_t k = 0; k < got; k++) PyBuffer_Release(&views[k]);
    PyMem_Free(views);
    PyMem_Free(jobs);
    Py_DECREF(sseq);
    Py_DECREF(bseq);
    return result;
}

/* ---- a stored block's digest from its checkpoints ------------------------------------------------------------- */

#define FILE_SEGMENTS_MAX 64
/* Bytes of each segment read per round: eight of them (256 KiB) fit in the L2 cache of the CPUs seen here, so MD5
 * reads what pread has just written there rather than memory. 1 MiB GETs at 8 connections, four interleaved runs
 * on an AMD EPYC: 1,071-1,194 req/s with 32 KiB against 948-1,091 with 128 KiB, 32 KiB ahead in every round. */
#define FILE_STRIPE (32 * 1024)

/* digest_file(fd, size, interval, chains, scratch, keep) -> 16-byte digest or None
 *
 * The block of ``size`` bytes in ``fd`` hashed as keepstore/hashing.py's digest_segments does it (segment i starts
 * from checkpoint i, all segments advance together in the vector lanes), in one call with the GIL released: no
 * hash-engine thread, no futures, no Python per stripe. Returns the MD5 of the block when every segment ends on the
 * next checkpoint, None when one does not (a stale hint or corrupt data: the caller hashes from the start) or when
 * ``scratch`` has no room for a round of stripes. With ``keep`` every byte is read to its own offset in ``scratch``
 * (which must hold ``size`` bytes), which then holds the block. Raises OSError on a read error and EOFError when the
 * file is shorter than ``size``. */
static PyObject *digest_file(PyObject *module, PyObject *args) {
    int fd, keep;
    unsigned long long size, interval;
    Py_buffer chains, scratch;
    if (!PyArg_ParseTuple(args, "iKKy*w*p", &fd, &size, &interval, &chains, &scratch, &keep)) return NULL;
    PyObject *result = NULL;
    size_t n = (size_t)chains.len / 16 + 1;
    if (chains.len % 16 || interval == 0 || interval % 64 || interval > UINT32_MAX || n > FILE_SEGMENTS_MAX ||
        (unsigned long long)(n - 1) * interval >= size || (unsigned long long)n * interval < size) {
        PyErr_SetString(PyExc_ValueError, "chains, interval and size do not describe a checkpointed block");
        goto done;
    }
    if (keep && (unsigned long long)scratch.len < size) {
        PyErr_SetString(PyExc_ValueError, "scratch is smaller than the block");
        goto done;
    }
    size_t stripe = interval < FILE_STRIPE ? (size_t)interval : FILE_STRIPE;
    if (!keep) {
        size_t room = (size_t)scratch.len / n / 64 * 64;
        if (room < stripe) stripe = room;
        if (stripe == 0) {
            result = Py_None;
            Py_INCREF(result);
            goto done;
        }
    }
    md5_ctx ctx[FILE_SEGMENTS_MAX];
    lane_job jobs[FILE_SEGMENTS_MAX];
    for (size_t i = 0; i < n; i++) {
        md5_init(&ctx[i]);
        if (i) {
            memcpy(ctx[i].h, (const uint8_t *)chains.buf + 16 * (i - 1), 16);
            ctx[i].length = ctx[i].compressed = (uint64_t)i * interval;
        }
    }
    uint8_t *buf = scratch.buf;
    int err = 0, short_read = 0;
    Py_BEGIN_ALLOW_THREADS
    for (unsigned long long offset = 0; offset < interval && !err && !short_read; offset += stripe) {
        size_t count = 0;
        for (size_t i = 0; i < n; i++) {
            unsigned long long start = i * interval + offset;
            unsigned long long end = (i + 1) * interval < size ? (i + 1) * interval : size;
            if (start >= end) continue;
            size_t len = end - start < stripe ? (size_t)(end - start) : stripe;
            uint8_t *dst = keep ? buf + start : buf + i * stripe;
            size_t got = 0;
            while (got < len) {
                ssize_t r = pread(fd, dst + got, len - got, (off_t)(start + got));
                if (r < 0) {
                    if (errno == EINTR) continue;
                    err = errno;
                    break;
                }
                if (r == 0) {
                    short_read = 1;
                    break;
                }
                got += (size_t)r;
            }
            if (err || short_read) break;
            jobs[count].ctx = &ctx[i];
            jobs[count].data = dst;
            jobs[count].len = len;
            count++;
        }
        if (!err && !short_read) update_jobs(jobs, count);
    }
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    if (short_read) {
        PyErr_Format(PyExc_EOFError, "the file ends before %llu bytes", size);
        goto done;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        if (ctx[i].tail_len || memcmp(ctx[i].h, (const uint8_t *)chains.buf + 16 * i, 16)) {
            result = Py_None;
            Py_INCREF(result);
            goto done;
        }
    }
    uint8_t out[16];
    md5_final(&ctx[n - 1], out);
    result = PyBytes_FromStringAndSize((const char *)out, 16);
done:
    PyBuffer_Release(&chains);
    PyBuffer_Release(&scratch);
    return result;
}

/* ---- read_cached ------------------------------------------------------------------------------------------------
 *
 * read_cached(path, into, max_size) -> (size, md5 hex) | None
 *
 * The block stored at ``path`` read into ``into`` and hashed, in one call: open, fstat, one preadv2 with
 * RWF_NOWAIT (which fails rather than wait for the disk), MD5, close. It is the event loop's path for small cached
 * blocks (keepstore/volumes/directory.py, read_cached): each of those steps costs less than the Python around it.
 * Raises FileNotFoundError when nothing is at ``path`` (ENOENT, ENOTDIR). Returns None for anything else that keeps
 * it from answering at once: a block larger than ``max_size`` or ``into``, data not in the page cache, a file
 * system without RWF_NOWAIT, or any other error, which the caller's general path then meets and reports. The
 * digest is computed, not compared: the caller decides what a mismatch means. */
static PyObject *read_cached(PyObject *module, PyObject *args) {
    const char *path;
    Py_buffer into;
    Py_ssize_t max_size;
    if (!PyArg_ParseTuple(args, "sw*n", &path, &into, &max_size)) return NULL;
    int open_err = 0, ok = 0;
    ssize_t size = 0;
    uint8_t out[16];
    Py_BEGIN_ALLOW_THREADS
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        open_err = errno;
    } else {
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size <= max_size && st.st_size <= into.len) {
            size = (ssize_t)st.st_size;
            ssize_t got = 0;
#ifdef RWF_NOWAIT
            if (size > 0) {
                struct iovec iov = {into.buf, (size_t)size};
                got = preadv2(fd, &iov, 1, 0, RWF_NOWAIT);
            }
#else
            got = -1;
#endif
            if (got == size) {
                md5_ctx ctx;
                md5_init(&ctx);
                size_t whole = (size_t)size / 64 * 64;
                md5_blocks(ctx.h, into.buf, whole / 64);
                ctx.length = (uint64_t)size;
                ctx.compressed = whole;
                ctx.tail_len = (uint32_t)(size - whole);
                memcpy(ctx.tail, (const uint8_t *)into.buf + whole, ctx.tail_len);
                md5_final(&ctx, out);
                ok = 1;
            }
        }
        close(fd);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&into);
    if (open_err == ENOENT || open_err == ENOTDIR) {
        errno = open_err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    if (!ok) Py_RETURN_NONE;
    static const char hexdigits[] = "0123456789abcdef";
    char hex[32];
    for (int i = 0; i < 16; i++) {
        hex[2 * i] = hexdigits[out[i] >> 4];
        hex[2 * i + 1] = hexdigits[out[i] & 15];
    }
    return Py_BuildValue("(ns#)", size, hex, (Py_ssize_t)32);
}

static PyObject *simd_lanes(PyObject *module, PyObject *unused) { return PyLong_FromLong(have_avx2 ? LANES : 1); }

static PyObject *set_simd(PyObject *module, PyObject *arg) {
    /* For tests: force the scalar path (False) or go back to what the CPU offers (True). */
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
#if HAVE_X86
    have_avx2 = on && __builtin_cpu_supports("avx2");
#endif
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"update_many", update_many, METH_VARARGS, "update_many(states, buffers): states[i].update(buffers[i]) for all i."},
    {"digest_file", digest_file, METH_VARARGS,
     "digest_file(fd, size, interval, chains, scratch, keep): a checkpointed block's MD5, or None."},
    {"read_cached", read_cached, METH_VARARGS,
     "read_cached(path, into, max_size): (size, md5 hex) of a small block read from the page cache, or None."},
    {"simd_lanes", simd_lanes, METH_NOARGS, "How many streams one instruction advances (8 with AVX2, else 1)."},
    {"set_simd", set_simd, METH_O, "Use the vector code if the CPU has it (True) or never (False)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "keepstore._md5mb", "Multi-buffer MD5 (see the C source for the contract).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__md5mb(void) {
    const uint16_t probe = 1;
    if (*(const uint8_t *)&probe != 1) {
        PyErr_SetString(PyExc_ImportError, "keepstore._md5mb supports little-endian CPUs only");
        return NULL;
    }
#if HAVE_X86
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2");
#endif
    if (PyType_Ready(&Md5Type) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&Md5Type);
    if (PyModule_AddObject(m, "Md5", (PyObject *)&Md5Type) < 0) {
        Py_DECREF(&Md5Type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
