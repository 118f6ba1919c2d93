/* The LLM decoder's matrix products Y = A @ W as ONNX Runtime custom operators (domain "mmgpt"), for a float
   A (..., K) and constant weights stored in the order the kernels read them: one sequential stream per block
   of 16 output columns.

   Why: a decode step is a product of 1-8 rows with every weight, so its speed is the rate the weights stream
   from memory. On a 2-core AVX512 machine ONNX Runtime's int8 kernels (MatMulInteger, 8-bit MatMulNBits)
   stream weights at ~0.8 of its fp32 GEMV's rate, and its fp32 GEMM at 8 rows at ~0.75; these kernels keep
   the stream going (sequential blocks, software prefetch) while the multiply-adds run.

   MatMulPacked (fp32): inputs A float (..., K); W float (N / 16, K, 16): W[k, n] at [n / 16, k, n % 16], N a
   multiple of 16. Output Y float (..., N).

   MatMulInt8 inputs (the export writes 1-3 as initializers, see export/llm.py `pack_int8`):
     0  A       float  (..., K)
     1  W       int8   (N16 / 16, K4 / 4, 16, 4): W[k, n] at [n / 16, k / 4, n % 16, k % 4], zero padded to
                       N16 = 16 * ceil(N / 16) columns and K4 = 4 * ceil(K / 4) rows
     2  scale   float  (N,)  per output column: W[k, n] ~ scale[n] * Wq[k, n] (symmetric, |Wq| <= 127)
     3  colsum  int32  (N,)  sum over k of Wq[k, n] (for the activations' zero point)
   Output:
     0  Y       float  (..., N)
   Each row of A is quantized on the fly to uint8 with its own scale and zero point (ONNX Runtime's
   DynamicQuantizeLinear uses one pair per call), so Y = sa * scale[n] * (sum_k Aq[k] Wq[k, n] - za * colsum[n]).

   Only ONNX Runtime's stable C ABI is used: the OrtApi function table is append-only, so the few entries this
   file calls are addressed by their index in it (the numbers below, from ONNX Runtime's public C API), and
   OrtCustomOp is declared field by field. The work is split over ONNX Runtime's own intra-op threads
   (KernelContext_ParallelFor), so no second thread pool competes with them for the cores. */
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <limits.h>
#include <immintrin.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtShape;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef void (*Fn)(void);

typedef struct { const Fn *(*GetApi)(uint32_t version); const char *(*GetVersionString)(void); } OrtApiBase;

/* entries of the OrtApi table (0-based) */
enum {
    API_CreateStatus = 0,
    API_CreateCustomOpDomain = 26, API_CustomOpDomain_Add = 27, API_AddCustomOpDomain = 28,
    API_GetTensorMutableData = 51,
    API_GetDimensionsCount = 61, API_GetDimensions = 62, API_GetTensorTypeAndShape = 65,
    API_KernelContext_GetInput = 90, API_KernelContext_GetOutput = 91,
    API_ReleaseTensorTypeAndShapeInfo = 99,
    API_KernelContext_ParallelFor = 274,
};
#define API_VERSION 17 /* ONNX Runtime 1.17 or later: the table up to KernelContext_ParallelFor */
#ifndef PF
#define PF 4096 /* bytes ahead of the weight stream to prefetch (measured: 2-4 KB beat none) */
#endif
#ifndef HINT
#define HINT _MM_HINT_T0
#endif
#ifndef NBATCH
#define NBATCH 8 /* contiguous ranges of column blocks, shared out among ONNX Runtime's threads (no API tells a kernel how many there are) */
#endif
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { T_FLOAT = 1, T_INT8 = 3, T_INT32 = 6 };
#define AVX512 __attribute__((target("avx512f")))
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define AVX2 __attribute__((target("avx2,fma")))
/* The kernels this CPU runs, read when a session registers the operators: AVX512 (fp32 on AVX512F, int8 on
   AVX512-VNNI), AVX2 + FMA, or the plain C loops. MMGPT_ORTOPS_ISA=avx2 or portable caps it (tests run each). */
enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_VNNI = 3 };
/* The least level at which the export uses each operator (mmgpt_ortops_kernels): where its kernel beat ONNX
   Runtime's own. The AVX2 kernels did not, on an AMD EPYC at Phi-2 width (4 layers, 2 threads, alternated):
   fp32 tied at 1 row (0.80 against 0.81 of the bandwidth bound), won a little at 8 rows (0.56 against 0.54),
   and a 113-row prefill took 1.3x as long; int8 read 0.70 of the bound at 1 row against MatMulInteger's 0.61,
   but its prefill took 1.6x as long (exact int16 products, half the multiplies per instruction of the
   saturating vpmaddubsw ONNX Runtime uses). They serve graphs exported on an AVX512 machine, and
   MMGPT_ORTOPS=1, instead of the plain C loops. */
#define F32_FAST ISA_AVX512
#define INT8_FAST ISA_VNNI
static int isa;

static const Fn *api;
#define CALL(idx, type) ((type)api[idx])
static OrtStatus *status(int code, const char *msg) { return CALL(API_CreateStatus, OrtStatus *(*)(int, const char *))(code, msg); }

typedef struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *, const Fn *, const OrtKernelInfo *);
    const char *(*GetName)(const struct OrtCustomOp *);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
    int (*GetInputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
    int (*GetOutputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
    void (*KernelCompute)(void *, OrtKernelContext *);
    void (*KernelDestroy)(void *);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *, const Fn *, const OrtKernelInfo *, void **);
    OrtStatus *(*KernelComputeV2)(void *, OrtKernelContext *);
    OrtStatus *(*InferOutputShapeFn)(const struct OrtCustomOp *, void *);
    int (*GetStartVersion)(const struct OrtCustomOp *);
    int (*GetEndVersion)(const struct OrtCustomOp *);
    size_t (*GetMayInplace)(int **, int **);
    void (*ReleaseMayInplace)(int *, int *);
    size_t (*GetAliasMap)(int **, int **);
    void (*ReleaseAliasMap)(int *, int *);
} OrtCustomOp;

/* ---- kernels ------------------------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *aq;      /* (M, K4) quantized rows */
    const int16_t *aw;      /* (M, K4) the same as int16, for the AVX2 kernel (NULL elsewhere) */
    const float *sa;        /* (M,) row scales */
    const int32_t *za;      /* (M,) row zero points */
    const int8_t *w;        /* packed weights */
    const float *scale;     /* (N,) */
    const int32_t *colsum;  /* (N,) */
    float *y;               /* (M, N) */
    int64_t M, K4, N;
} Job;

static void finish(const Job *j, int64_t m, int64_t n0, const int32_t *acc16) {
    int64_t n_end = n0 + 16 < j->N ? n0 + 16 : j->N;
    float sa = j->sa[m];
    int32_t za = j->za[m];
    float *y = j->y + m * j->N;
    for (int64_t n = n0; n < n_end; n++) y[n] = sa * j->scale[n] * (float)(acc16[n - n0] - za * j->colsum[n]);
}

/* one block of 16 columns, every row: portable C, for CPUs without AVX512-VNNI */
static void block_scalar(const Job *j, int64_t nb) {
    const int8_t *wb = j->w + nb * j->K4 * 16;
    for (int64_t m = 0; m < j->M; m++) {
        int32_t acc[16] = {0};
        const uint8_t *a = j->aq + m * j->K4;
        for (int64_t k4 = 0; k4 < j->K4 / 4; k4++)
            for (int c = 0; c < 16; c++)
                for (int i = 0; i < 4; i++) acc[c] += (int32_t)a[4 * k4 + i] * (int32_t)wb[(k4 * 16 + c) * 4 + i];
        finish(j, m, nb * 16, acc);
    }
}

/* one row: four accumulators over consecutive groups of k, so the adds do not wait on each other */
VNNI static void row1_vnni(const Job *j, int64_t nb, int64_t m) {
    const int8_t *p = j->w + nb * j->K4 * 16;
    const int32_t *a = (const int32_t *)(j->aq + m * j->K4);
    int64_t g = j->K4 / 4, k = 0;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    for (; k + 4 <= g; k += 4, p += 256) {
        _mm_prefetch((const char *)p + PF, HINT);
        _mm_prefetch((const char *)p + PF + 64, HINT);
        _mm_prefetch((const char *)p + PF + 128, HINT);
        _mm_prefetch((const char *)p + PF + 192, HINT);
        s0 = _mm512_dpbusd_epi32(s0, _mm512_set1_epi32(a[k]), _mm512_loadu_si512(p));
        s1 = _mm512_dpbusd_epi32(s1, _mm512_set1_epi32(a[k + 1]), _mm512_loadu_si512(p + 64));
        s2 = _mm512_dpbusd_epi32(s2, _mm512_set1_epi32(a[k + 2]), _mm512_loadu_si512(p + 128));
        s3 = _mm512_dpbusd_epi32(s3, _mm512_set1_epi32(a[k + 3]), _mm512_loadu_si512(p + 192));
    }
    for (; k < g; k++, p += 64) s0 = _mm512_dpbusd_epi32(s0, _mm512_set1_epi32(a[k]), _mm512_loadu_si512(p));
    int32_t acc[16];
    _mm512_storeu_si512(acc, _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)));
    finish(j, m, nb * 16, acc);
}

/* R rows at once (R <= 8): each 64-byte load of weights feeds R multiply-adds */
#define ROWS_VNNI(R)                                                                                   \
    VNNI static void rows##R##_vnni(const Job *j, int64_t nb, int64_t m0) {                            \
        const int8_t *p = j->w + nb * j->K4 * 16;                                                      \
        const int32_t *a[R];                                                                           \
        __m512i s[R];                                                                                  \
        for (int r = 0; r < R; r++) a[r] = (const int32_t *)(j->aq + (m0 + r) * j->K4), s[r] = _mm512_setzero_si512(); \
        for (int64_t k = 0, g = j->K4 / 4; k < g; k++, p += 64) {                                      \
            _mm_prefetch((const char *)p + PF, HINT);                                                  \
            __m512i w = _mm512_loadu_si512(p);                                                         \
            for (int r = 0; r < R; r++) s[r] = _mm512_dpbusd_epi32(s[r], _mm512_set1_epi32(a[r][k]), w); \
        }                                                                                              \
        for (int r = 0; r < R; r++) {                                                                  \
            int32_t acc[16];                                                                           \
            _mm512_storeu_si512(acc, s[r]);                                                            \
            finish(j, m0 + r, nb * 16, acc);                                                           \
        }                                                                                              \
    }
ROWS_VNNI(2) ROWS_VNNI(3) ROWS_VNNI(4) ROWS_VNNI(5) ROWS_VNNI(6) ROWS_VNNI(7) ROWS_VNNI(8)

/* the kernel for each count of rows left over after blocks of 8 */
static void (*const rows_vnni[8])(const Job *, int64_t, int64_t) = {
    NULL, row1_vnni, rows2_vnni, rows3_vnni, rows4_vnni, rows5_vnni, rows6_vnni, rows7_vnni};

VNNI static void block_vnni(const Job *j, int64_t nb) {
    int64_t m = 0;
    for (; m + 8 <= j->M; m += 8) rows8_vnni(j, nb, m);
    if (j->M > m) rows_vnni[j->M - m](j, nb, m);
}

/* AVX2: 16 weights sign-extended to int16 (vpmovsxbw) times the row's activations as int16, pairs added into
   int32 (vpmaddwd). Exact, unlike vpmaddubsw, whose int16 pair sums saturate (255 * 127 * 2 > 32767). A 64-byte
   group (16 columns x 4 of k) is four such products; each 32-bit lane then holds half of one column's sum,
   added at the end (column_sums_avx2). Two rows fill 13 of the 16
   registers, so more rows take passes over chunks of the block (the fp32 kernel's reason), their int32 sums
   kept in y between chunks. */
#ifndef KC4
#define KC4 256 /* groups of 4 k per chunk: 16 KB of weights */
#endif
/* The four pair-sum registers of one row's 16 columns (lanes 2c and 2c + 1 hold halves of a column's sum) ->
   16 int32 column sums in order: hadd pairs within 128-bit lanes gives [c0 c1 c4 c5 | c2 c3 c6 c7], then
   the 64-bit quarters are put back in order */
AVX2 static inline void column_sums_avx2(__m256i s0, __m256i s1, __m256i s2, __m256i s3, int32_t *acc) {
    _mm256_storeu_si256((__m256i *)acc, _mm256_permute4x64_epi64(_mm256_hadd_epi32(s0, s1), 0xD8));
    _mm256_storeu_si256((__m256i *)(acc + 8), _mm256_permute4x64_epi64(_mm256_hadd_epi32(s2, s3), 0xD8));
}

__attribute__((always_inline, target("avx2,fma"))) static inline void rows_i8_avx2(
    const Job *j, int64_t nb, int64_t m0, int64_t g0, int64_t g1, const int R) {
    const int64_t G4 = j->K4 / 4;
    const int8_t *p = j->w + (nb * G4 + g0) * 64;
    const int64_t *a = (const int64_t *)(j->aw + m0 * j->K4); /* one row's 4 activations of a group: 8 bytes */
    __m256i x0 = _mm256_setzero_si256(), x1 = x0, x2 = x0, x3 = x0, y0 = x0, y1 = x0, y2 = x0, y3 = x0;
    for (int64_t g = g0; g < g1; g++, p += 64) {
        _mm_prefetch((const char *)p + PF, HINT);
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
        __m256i w2 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 32)));
        __m256i w3 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 48)));
        __m256i v = _mm256_set1_epi64x(a[g]);
        x0 = _mm256_add_epi32(x0, _mm256_madd_epi16(w0, v));
        x1 = _mm256_add_epi32(x1, _mm256_madd_epi16(w1, v));
        x2 = _mm256_add_epi32(x2, _mm256_madd_epi16(w2, v));
        x3 = _mm256_add_epi32(x3, _mm256_madd_epi16(w3, v));
        if (R > 1) {
            v = _mm256_set1_epi64x(a[G4 + g]);
            y0 = _mm256_add_epi32(y0, _mm256_madd_epi16(w0, v));
            y1 = _mm256_add_epi32(y1, _mm256_madd_epi16(w1, v));
            y2 = _mm256_add_epi32(y2, _mm256_madd_epi16(w2, v));
            y3 = _mm256_add_epi32(y3, _mm256_madd_epi16(w3, v));
        }
    }
    for (int r = 0; r < R; r++) {
        int32_t acc[16], *part = (int32_t *)(j->y + (m0 + r) * j->N + nb * 16); /* int32 sums so far, in y's place */
        int64_t n = j->N - nb * 16 < 16 ? j->N - nb * 16 : 16; /* the last block may be narrower */
        if (r) column_sums_avx2(y0, y1, y2, y3, acc);
        else column_sums_avx2(x0, x1, x2, x3, acc);
        if (g0) for (int64_t c = 0; c < n; c++) acc[c] += part[c];
        if (g1 == G4) finish(j, m0 + r, nb * 16, acc);
        else memcpy(part, acc, (size_t)n * sizeof(int32_t));
    }
}
AVX2 static void row1_i8_avx2(const Job *j, int64_t nb, int64_t m0, int64_t g0, int64_t g1) { rows_i8_avx2(j, nb, m0, g0, g1, 1); }
AVX2 static void rows2_i8_avx2(const Job *j, int64_t nb, int64_t m0, int64_t g0, int64_t g1) { rows_i8_avx2(j, nb, m0, g0, g1, 2); }

/* One row, up to STREAMS8 column blocks at once (more weight streams in flight per core, as rowf1g_avx2) */
#define STREAMS8 3
AVX2 static void row1g_i8_avx2(const Job *j, int64_t nb, int64_t nblocks) {
    const int64_t G4 = j->K4 / 4;
    const int8_t *base = j->w + nb * G4 * 64;
    const int64_t *a = (const int64_t *)j->aw;
#define ST(b) const int8_t *p##b = nblocks > b ? base + b * G4 * 64 : base; \
    __m256i s##b##0 = _mm256_setzero_si256(), s##b##1 = s##b##0, s##b##2 = s##b##0, s##b##3 = s##b##0;
    ST(0) ST(1) ST(2)
#undef ST
    for (int64_t g = 0; g < G4; g++) {
        __m256i v = _mm256_set1_epi64x(a[g]);
#define ST(b) if (STREAMS8 > b) {                                                                                      \
        _mm_prefetch((const char *)p##b + PF, HINT);                                                                  \
        s##b##0 = _mm256_add_epi32(s##b##0, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p##b)), v));        \
        s##b##1 = _mm256_add_epi32(s##b##1, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p##b + 16))), v)); \
        s##b##2 = _mm256_add_epi32(s##b##2, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p##b + 32))), v)); \
        s##b##3 = _mm256_add_epi32(s##b##3, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p##b + 48))), v)); \
        p##b += 64; }
        ST(0) ST(1) ST(2)
#undef ST
    }
#define ST(b) if (STREAMS8 > b && nblocks > b) {                                                                       \
        int32_t acc[16];                                                                                              \
        column_sums_avx2(s##b##0, s##b##1, s##b##2, s##b##3, acc);                                                     \
        finish(j, 0, (nb + b) * 16, acc); }
    ST(0) ST(1) ST(2)
#undef ST
}

static void block_i8_avx2(const Job *j, int64_t nb) {
    int64_t G4 = j->K4 / 4;
    if (j->M <= 2) { (j->M == 1 ? row1_i8_avx2 : rows2_i8_avx2)(j, nb, 0, 0, G4); return; }
    for (int64_t g0 = 0; g0 < G4; g0 += KC4) {
        int64_t g1 = g0 + KC4 < G4 ? g0 + KC4 : G4, m = 0;
        for (; m + 2 <= j->M; m += 2) rows2_i8_avx2(j, nb, m, g0, g1);
        if (m < j->M) row1_i8_avx2(j, nb, m, g0, g1);
    }
}

static void run_block(const Job *j, int64_t nb) {
    if (isa == ISA_VNNI) block_vnni(j, nb);
    else if (isa >= ISA_AVX2) block_i8_avx2(j, nb);
    else block_scalar(j, nb);
}

/* ONNX Runtime's threads share out groups of STREAMS8 column blocks */
static void run_group(void *job, size_t g) {
    const Job *j = job;
    int64_t nb = (int64_t)g * STREAMS8, n = (j->N + 15) / 16 - nb;
    if ((isa == ISA_AVX2 || isa == ISA_AVX512) && j->M == 1) { row1g_i8_avx2(j, nb, n < STREAMS8 ? n : STREAMS8); return; }
    for (int64_t b = nb; b < nb + STREAMS8 && b < (j->N + 15) / 16; b++) run_block(j, b);
}

/* per-row asymmetric uint8 quantization; the range always holds 0 so zero stays exact */
static void quantize_rows(const float *a, int64_t M, int64_t K, int64_t K4, uint8_t *aq, float *sa, int32_t *za) {
    for (int64_t m = 0; m < M; m++) {
        const float *x = a + m * K;
        float lo = 0.f, hi = 0.f;
        for (int64_t k = 0; k < K; k++) { lo = x[k] < lo ? x[k] : lo; hi = x[k] > hi ? x[k] : hi; }
        float s = (hi - lo) / 255.f;
        if (!(s > 0.f) || !isfinite(s)) s = 1.f;
        int32_t z = (int32_t)lrintf(-lo / s);
        z = z < 0 ? 0 : (z > 255 ? 255 : z);
        float inv = 1.f / s;
        uint8_t *q = aq + m * K4;
        for (int64_t k = 0; k < K; k++) {
            long v = lrintf(x[k] * inv) + z;
            q[k] = (uint8_t)(v < 0 ? 0 : (v > 255 ? 255 : v));
        }
        for (int64_t k = K; k < K4; k++) q[k] = (uint8_t)z; /* padded weights are 0 */
        sa[m] = s;
        za[m] = z;
    }
}

/* ---- fp32 ------------------------------------------------------------------------------------------------ */

typedef struct {
    const float *a, *w;
    float *y;
    int64_t M, K, N;
} JobF;

static void blockf_scalar(const JobF *j, int64_t nb) {
    const float *wb = j->w + nb * j->K * 16;
    for (int64_t m = 0; m < j->M; m++) {
        float acc[16] = {0};
        const float *a = j->a + m * j->K;
        for (int64_t k = 0; k < j->K; k++)
            for (int c = 0; c < 16; c++) acc[c] += a[k] * wb[k * 16 + c];
        memcpy(j->y + m * j->N + nb * 16, acc, sizeof acc);
    }
}

AVX512 static void rowf1(const JobF *j, int64_t nb, int64_t m) {
    const float *p = j->w + nb * j->K * 16, *a = j->a + m * j->K;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t k = 0;
    for (; k + 4 <= j->K; k += 4, p += 64) {
        _mm_prefetch((const char *)p + PF, HINT);
        _mm_prefetch((const char *)p + PF + 64, HINT);
        _mm_prefetch((const char *)p + PF + 128, HINT);
        _mm_prefetch((const char *)p + PF + 192, HINT);
        s0 = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), _mm512_loadu_ps(p), s0);
        s1 = _mm512_fmadd_ps(_mm512_set1_ps(a[k + 1]), _mm512_loadu_ps(p + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_set1_ps(a[k + 2]), _mm512_loadu_ps(p + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_set1_ps(a[k + 3]), _mm512_loadu_ps(p + 48), s3);
    }
    for (; k < j->K; k++, p += 16) s0 = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), _mm512_loadu_ps(p), s0);
    _mm512_storeu_ps(j->y + m * j->N + nb * 16, _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

/* R rows at once (R <= 8): each 64-byte line of weights feeds R multiply-adds */
#define ROWSF(R)                                                                                         \
    AVX512 static void rowsf##R(const JobF *j, int64_t nb, int64_t m0) {                                 \
        const float *p = j->w + nb * j->K * 16, *a = j->a + m0 * j->K;                                   \
        __m512 s[R];                                                                                     \
        for (int r = 0; r < R; r++) s[r] = _mm512_setzero_ps();                                          \
        for (int64_t k = 0; k < j->K; k++, p += 16) {                                                    \
            _mm_prefetch((const char *)p + PF, HINT);                                                    \
            __m512 w = _mm512_loadu_ps(p);                                                               \
            for (int r = 0; r < R; r++) s[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * j->K + k]), w, s[r]); \
        }                                                                                                \
        for (int r = 0; r < R; r++) _mm512_storeu_ps(j->y + (m0 + r) * j->N + nb * 16, s[r]);           \
    }
ROWSF(2) ROWSF(3) ROWSF(4) ROWSF(5) ROWSF(6) ROWSF(7) ROWSF(8)

static void (*const rows_f[8])(const JobF *, int64_t, int64_t) = {
    NULL, rowf1, rowsf2, rowsf3, rowsf4, rowsf5, rowsf6, rowsf7};

AVX512 static void blockf_avx512(const JobF *j, int64_t nb) {
    int64_t m = 0;
    for (; m + 8 <= j->M; m += 8) rowsf8(j, nb, m);
    if (j->M > m) rows_f[j->M - m](j, nb, m);
}

/* AVX2 + FMA: a block's 16 columns are two 8-float registers, so 16 registers hold at most 6 rows' sums. Rows
   beyond 6 take several passes over the block, so the block is then walked in chunks of KC rows of k (KC x 64
   bytes stay in L1/L2 for the next group of rows) instead of once from memory per group: a 16-column block of
   the MLP's second product is 640 KB. Each call adds k0..k1 into y (or starts it at zero when k0 is 0). */
#ifndef KC
#define KC 256
#endif

/* R rows (R <= 6) in named registers: with arrays of them GCC kept every sum in memory */
__attribute__((always_inline, target("avx2,fma"))) static inline void rowsf_avx2(
    const JobF *j, int64_t nb, int64_t m0, int64_t k0, int64_t k1, const int R) {
    const int64_t K = j->K, N = j->N;
    const float *p = j->w + (nb * K + k0) * 16, *a = j->a + m0 * K;
    float *y = j->y + m0 * N + nb * 16;
    __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0, l3 = l0, h3 = l0, l4 = l0, h4 = l0, l5 = l0, h5 = l0;
    for (int64_t k = k0; k < k1; k++, p += 16) {
        _mm_prefetch((const char *)p + PF, HINT);
        __m256 w0 = _mm256_loadu_ps(p), w1 = _mm256_loadu_ps(p + 8), x;
#define ROW(r) if (R > r) x = _mm256_broadcast_ss(a + r * K + k), l##r = _mm256_fmadd_ps(x, w0, l##r), h##r = _mm256_fmadd_ps(x, w1, h##r);
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
#define ROW(r)                                                                                               \
    if (R > r) {                                                                                             \
        if (k0) l##r = _mm256_add_ps(l##r, _mm256_loadu_ps(y + r * N)), h##r = _mm256_add_ps(h##r, _mm256_loadu_ps(y + r * N + 8)); \
        _mm256_storeu_ps(y + r * N, l##r), _mm256_storeu_ps(y + r * N + 8, h##r);                           \
    }
    ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
}
/* One row, STREAMS column blocks at once: four sequential weight streams per core instead of one. With one,
   a core kept too few reads in flight on an AMD EPYC (~17 GB/s where ONNX Runtime's GEMV, which reads many rows
   of W at a time, reached ~28); with four both were at ~25-30, 10-90% apart run to run on that machine. */
#define STREAMS 4
AVX2 static void rowf1g_avx2(const JobF *j, int64_t nb, int64_t nblocks) {
    const int64_t K = j->K;
    const float *a = j->a, *base = j->w + nb * K * 16;
    float *y = j->y + nb * 16;
    /* blocks past the last are read again from the first (their sums are not stored): one loop for every count */
#define ST(b) const float *p##b = nblocks > b ? base + b * K * 16 : base; __m256 l##b = _mm256_setzero_ps(), h##b = l##b;
    ST(0) ST(1) ST(2) ST(3)
#undef ST
    for (int64_t k = 0; k < K; k++) {
        __m256 x = _mm256_broadcast_ss(a + k);
#define ST(b) _mm_prefetch((const char *)p##b + PF, HINT), l##b = _mm256_fmadd_ps(x, _mm256_loadu_ps(p##b), l##b), \
              h##b = _mm256_fmadd_ps(x, _mm256_loadu_ps(p##b + 8), h##b), p##b += 16;
        ST(0) ST(1) ST(2) ST(3)
#undef ST
    }
#define ST(b) if (nblocks > b) _mm256_storeu_ps(y + b * 16, l##b), _mm256_storeu_ps(y + b * 16 + 8, h##b);
    ST(0) ST(1) ST(2) ST(3)
#undef ST
}

#define ROWSF_AVX2(R) \
    AVX2 static void rowsf##R##_avx2(const JobF *j, int64_t nb, int64_t m0, int64_t k0, int64_t k1) { rowsf_avx2(j, nb, m0, k0, k1, R); }
ROWSF_AVX2(1) ROWSF_AVX2(2) ROWSF_AVX2(3) ROWSF_AVX2(4) ROWSF_AVX2(5) ROWSF_AVX2(6)

static void (*const rows_f_avx2[7])(const JobF *, int64_t, int64_t, int64_t, int64_t) = {
    NULL, rowsf1_avx2, rowsf2_avx2, rowsf3_avx2, rowsf4_avx2, rowsf5_avx2, rowsf6_avx2};

static void run_blockf(void *job, size_t nb);
static void blockf_avx2(const JobF *j, int64_t nb) {
    if (j->M <= 6) { rows_f_avx2[j->M](j, nb, 0, 0, j->K); return; } /* decoding: one pass, from memory */
    /* groups as even as they can be (8 rows: 4 + 4, not 6 + 2): a group of R rows has 2R independent sums, and
       below 4 rows their multiply-adds wait on each other's latency instead of filling both FMA units */
    int64_t groups = (j->M + 5) / 6;
    for (int64_t k0 = 0; k0 < j->K; k0 += KC) {
        int64_t k1 = k0 + KC < j->K ? k0 + KC : j->K;
        for (int64_t g = 0, m = 0; g < groups; g++) {
            int64_t r = (j->M - m) / (groups - g); /* the rows left, shared out among the groups left */
            rows_f_avx2[r](j, nb, m, k0, k1);
            m += r;
        }
    }
}

/* ONNX Runtime's threads share out groups of STREAMS column blocks */
static void run_groupf(void *job, size_t g) {
    const JobF *j = job;
    int64_t nb = (int64_t)g * STREAMS, n = j->N / 16 - nb;
    if (isa == ISA_AVX2 && j->M == 1) { rowf1g_avx2(j, nb, n < STREAMS ? n : STREAMS); return; }
    for (int64_t b = nb; b < nb + STREAMS && b < j->N / 16; b++) run_blockf(job, (size_t)b);
}

static void run_blockf(void *job, size_t nb) {
    if (isa >= ISA_AVX512) blockf_avx512((const JobF *)job, (int64_t)nb);
    else if (isa == ISA_AVX2) blockf_avx2((const JobF *)job, (int64_t)nb);
    else blockf_scalar((const JobF *)job, (int64_t)nb);
}

/* ---- the ops --------------------------------------------------------------------------------------------- */

static const OrtValue *input(OrtKernelContext *c, size_t i) {
    const OrtValue *v = NULL;
    OrtStatus *st = CALL(API_KernelContext_GetInput, OrtStatus *(*)(const OrtKernelContext *, size_t, const OrtValue **))(c, i, &v);
    return st ? NULL : v; /* an error here can only be a missing input, reported below */
}
static OrtStatus *data(const OrtValue *v, void **out) {
    return CALL(API_GetTensorMutableData, OrtStatus *(*)(const OrtValue *, void **))(v, out);
}
static OrtStatus *dims(const OrtValue *v, int64_t *d, size_t *n) {
    OrtShape *info;
    OrtStatus *st = CALL(API_GetTensorTypeAndShape, OrtStatus *(*)(const OrtValue *, OrtShape **))(v, &info);
    if (st) return st;
    st = CALL(API_GetDimensionsCount, OrtStatus *(*)(const OrtShape *, size_t *))(info, n);
    if (!st && *n > 8) st = status(ORT_INVALID_ARGUMENT, "MatMulInt8: more than 8 dimensions");
    if (!st) st = CALL(API_GetDimensions, OrtStatus *(*)(const OrtShape *, int64_t *, size_t))(info, d, *n);
    CALL(API_ReleaseTensorTypeAndShapeInfo, void (*)(OrtShape *))(info);
    return st;
}

#define TRY(x) do { OrtStatus *st_ = (x); if (st_) return st_; } while (0)

/* the leading dimensions of A, times each other, and Y's shape: A's with the last replaced by N */
static int64_t rows_of(const int64_t *ad, size_t an, int64_t N, int64_t *yd) {
    int64_t M = 1;
    for (size_t i = 0; i + 1 < an; i++) M *= ad[i], yd[i] = ad[i];
    yd[an - 1] = N;
    return M;
}

typedef OrtStatus *(*ParallelFor)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *);
typedef OrtStatus *(*GetOutput)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **);

static OrtStatus *compute_int8(void *kernel, OrtKernelContext *ctx) {
    (void)kernel;
    int64_t ad[8], wd[8], sd[8], cd[8], yd[8];
    size_t an, wn, sn, cn;
    const OrtValue *A = input(ctx, 0), *W = input(ctx, 1), *S = input(ctx, 2), *C = input(ctx, 3);
    if (!A || !W || !S || !C) return status(ORT_INVALID_ARGUMENT, "MatMulInt8: expected 4 inputs");
    TRY(dims(A, ad, &an)); TRY(dims(W, wd, &wn)); TRY(dims(S, sd, &sn)); TRY(dims(C, cd, &cn));
    if (an < 1 || wn != 4 || sn != 1 || cn != 1 || wd[2] != 16 || wd[3] != 4 || cd[0] != sd[0])
        return status(ORT_INVALID_ARGUMENT, "MatMulInt8: expected A (..., K), W (N16/16, K4/4, 16, 4), scale (N,), colsum (N,)");
    int64_t K = ad[an - 1], K4 = wd[1] * 4, N = sd[0];
    if (K4 != (K + 3) / 4 * 4 || wd[0] != (N + 15) / 16)
        return status(ORT_INVALID_ARGUMENT, "MatMulInt8: the packed weights do not match A's last dimension and scale's length");
    int64_t M = rows_of(ad, an, N, yd);
    OrtValue *Y = NULL;
    TRY(CALL(API_KernelContext_GetOutput, GetOutput)(ctx, 0, yd, an, &Y));
    void *a, *w, *s, *c, *y;
    TRY(data(A, &a)); TRY(data(W, &w)); TRY(data(S, &s)); TRY(data(C, &c)); TRY(data(Y, &y));
    if (M == 0 || N == 0) return NULL;
    uint8_t *aq = aligned_alloc(64, (size_t)((M * K4 + 63) / 64 * 64));
    float *sa = malloc((size_t)M * sizeof(float));
    int32_t *za = malloc((size_t)M * sizeof(int32_t));
    if (!aq || !sa || !za) { free(aq); free(sa); free(za); return status(ORT_FAIL, "MatMulInt8: out of memory"); }
    quantize_rows(a, M, K, K4, aq, sa, za);
    int16_t *aw = NULL;
    if (isa == ISA_AVX2 || isa == ISA_AVX512) {
        if (!(aw = malloc((size_t)(M * K4) * sizeof(int16_t)))) { free(aq); free(sa); free(za); return status(ORT_FAIL, "MatMulInt8: out of memory"); }
        for (int64_t i = 0; i < M * K4; i++) aw[i] = aq[i];
    }
    Job job = {aq, aw, sa, za, w, s, c, y, M, K4, N};
    OrtStatus *st = CALL(API_KernelContext_ParallelFor, ParallelFor)(ctx, run_group, (size_t)(wd[0] + STREAMS8 - 1) / STREAMS8, NBATCH, &job);
    free(aq); free(aw); free(sa); free(za);
    return st;
}

static OrtStatus *compute_f32(void *kernel, OrtKernelContext *ctx) {
    (void)kernel;
    int64_t ad[8], wd[8], yd[8];
    size_t an, wn;
    const OrtValue *A = input(ctx, 0), *W = input(ctx, 1);
    if (!A || !W) return status(ORT_INVALID_ARGUMENT, "MatMulPacked: expected 2 inputs");
    TRY(dims(A, ad, &an)); TRY(dims(W, wd, &wn));
    if (an < 1 || wn != 3 || wd[2] != 16 || wd[1] != ad[an - 1])
        return status(ORT_INVALID_ARGUMENT, "MatMulPacked: expected A (..., K) and W (N/16, K, 16) of the same K");
    int64_t K = wd[1], N = wd[0] * 16;
    int64_t M = rows_of(ad, an, N, yd);
    OrtValue *Y = NULL;
    TRY(CALL(API_KernelContext_GetOutput, GetOutput)(ctx, 0, yd, an, &Y));
    void *a, *w, *y;
    TRY(data(A, &a)); TRY(data(W, &w)); TRY(data(Y, &y));
    if (M == 0 || N == 0) return NULL;
    JobF job = {a, w, y, M, K, N};
    return CALL(API_KernelContext_ParallelFor, ParallelFor)(ctx, run_groupf, (size_t)(wd[0] + STREAMS - 1) / STREAMS, NBATCH, &job);
}

static void compute_int8_v1(void *kernel, OrtKernelContext *ctx) { (void)compute_int8(kernel, ctx); }
static void compute_f32_v1(void *kernel, OrtKernelContext *ctx) { (void)compute_f32(kernel, ctx); }
static const char *name_int8(const OrtCustomOp *op);
/* Once per operator while the library is loaded: a graph exported where the operator's fast kernel ran, opened
   on a CPU without it, says so in the log instead of being silently slower (not when MMGPT_ORTOPS_ISA asked). */
static void warn_if_slow(const OrtCustomOp *op) {
    static int warned[2];
    int int8 = op->GetName == name_int8;
    if (isa >= (int8 ? INT8_FAST : F32_FAST) || warned[int8] || getenv("MMGPT_ORTOPS_ISA")) return;
    warned[int8] = 1;
    const char *name = int8 ? "MatMulInt8" : "MatMulPacked";
    if (isa >= ISA_AVX2)
        fprintf(stderr, "mmgpt: this CPU lacks %s, so the decoder's mmgpt.%s runs its AVX2 kernel, whose prefill is "
                "~1.3-1.6x slower than ONNX Runtime's own kernels: export again on this machine (make export), "
                "which then keeps those\n", int8 ? "AVX512-VNNI" : "AVX512F", name);
    else
        fprintf(stderr, "mmgpt: this CPU lacks AVX2 and FMA, so the decoder's mmgpt.%s runs plain C loops, several "
                "times slower than ONNX Runtime's own kernels: export again on this machine (make export), which "
                "then keeps those\n", name);
}
static void *create_v1(const OrtCustomOp *op, const Fn *a, const OrtKernelInfo *info) { (void)a; (void)info; warn_if_slow(op); return (void *)1; }
static OrtStatus *create_v2(const OrtCustomOp *op, const Fn *a, const OrtKernelInfo *info, void **k) { (void)a; (void)info; warn_if_slow(op); *k = (void *)1; return NULL; }
static void destroy(void *k) { (void)k; }
static const char *name_int8(const OrtCustomOp *op) { (void)op; return "MatMulInt8"; }
static const char *name_f32(const OrtCustomOp *op) { (void)op; return "MatMulPacked"; }
static const char *provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int in_type_int8(const OrtCustomOp *op, size_t i) { (void)op; return i == 1 ? T_INT8 : (i == 3 ? T_INT32 : T_FLOAT); }
static size_t in_count_int8(const OrtCustomOp *op) { (void)op; return 4; }
static int in_type_f32(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return T_FLOAT; }
static size_t in_count_f32(const OrtCustomOp *op) { (void)op; return 2; }
static int out_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return T_FLOAT; }
static size_t out_count(const OrtCustomOp *op) { (void)op; return 1; }
static int required(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int mem_default(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int one(const OrtCustomOp *op) { (void)op; return 1; }
static int start_version(const OrtCustomOp *op) { (void)op; return 1; }
static int end_version(const OrtCustomOp *op) { (void)op; return INT_MAX; }
static size_t no_pairs(int **i, int **o) { *i = NULL; *o = NULL; return 0; }
static void release_pairs(int *i, int *o) { (void)i; (void)o; }

static OrtCustomOp ops[] = {
    {API_VERSION, create_v1, name_int8, provider, in_type_int8, in_count_int8, out_type, out_count, compute_int8_v1, destroy,
     required, required, mem_default, one, one, one, one, create_v2, compute_int8, NULL, start_version, end_version,
     no_pairs, release_pairs, no_pairs, release_pairs},
    {API_VERSION, create_v1, name_f32, provider, in_type_f32, in_count_f32, out_type, out_count, compute_f32_v1, destroy,
     required, required, mem_default, one, one, one, one, create_v2, compute_f32, NULL, start_version, end_version,
     no_pairs, release_pairs, no_pairs, release_pairs},
};

static int detect_isa(void) {
    __builtin_cpu_init();
    int level = ISA_PORTABLE;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = ISA_AVX2;
    if (level == ISA_AVX2 && __builtin_cpu_supports("avx512f")) level = ISA_AVX512;
    if (level == ISA_AVX512 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) level = ISA_VNNI;
    const char *cap = getenv("MMGPT_ORTOPS_ISA"); /* tests: the AVX2 kernels or the plain C loops on any CPU */
    if (cap && !strcmp(cap, "portable")) level = ISA_PORTABLE;
    if (cap && !strcmp(cap, "avx2") && level > ISA_AVX2) level = ISA_AVX2;
    return level;
}

/* Which operators run their fast kernel on this CPU (bit 0: fp32, bit 1: int8; F32_FAST, INT8_FAST): without
   it, an operator runs its AVX2 kernel or the plain C loops, slower than ONNX Runtime's own kernels (the export
   then keeps those: mmgpt.ortops.fast). */
__attribute__((visibility("default"))) int mmgpt_ortops_kernels(void) {
    int level = detect_isa();
    return (level >= F32_FAST) | ((level >= INT8_FAST) << 1);
}

/* The kernels the operators run here: 0 the plain C loops, 1 AVX2 + FMA, 2 AVX512F (fp32; int8 then on AVX2),
   3 AVX512F + AVX512-VNNI. */
__attribute__((visibility("default"))) int mmgpt_ortops_isa(void) { return detect_isa(); }

/* the entry ONNX Runtime calls from SessionOptions.register_custom_ops_library */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    api = base->GetApi(API_VERSION);
    if (!api) return NULL; /* cannot even make a status: ONNX Runtime older than 1.17 */
    isa = detect_isa();
    static OrtCustomOpDomain *domain;
    if (!domain) {
        TRY(CALL(API_CreateCustomOpDomain, OrtStatus *(*)(const char *, OrtCustomOpDomain **))("mmgpt", &domain));
        for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
            TRY(CALL(API_CustomOpDomain_Add, OrtStatus *(*)(OrtCustomOpDomain *, const OrtCustomOp *))(domain, &ops[i]));
    }
    return CALL(API_AddCustomOpDomain, OrtStatus *(*)(OrtSessionOptions *, OrtCustomOpDomain *))(options, domain);
}
