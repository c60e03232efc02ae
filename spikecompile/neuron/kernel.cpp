#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_STEPS 64

template <typename F, typename I, int L> struct Vec {
    typedef F f __attribute__((vector_size(sizeof(F) * L)));
    typedef I i __attribute__((vector_size(sizeof(I) * L)));
    typedef uint8_t b __attribute__((vector_size(L)));
};

template <typename F> struct Args {
    const F* x; int64_t sites, inner; int32_t T;
    const F* thr; const F* reset; const F* weight; const int64_t* budget;
    F* out; F* events; uint8_t* planes; void* code; int32_t code_bytes; uint8_t* popcount;
    int64_t* per_step; int64_t* rows; int64_t row_len; int32_t threads; int32_t signed_digits; int32_t mask_steps;
};

template <typename V, typename T> static inline void store(T* to, const V& v, int64_t len, int64_t full) {
    if (len == full) memcpy(to, &v, sizeof(V)); else if (len > 0) memcpy(to, &v, (size_t)len * sizeof(T));
}

// One thread's share: items begin..end, an item being U vectors of L elements (U·L elements of one site), so
// that U independent dependency chains (r: compare → subtract → compare ...) keep the core busy.
template <typename F, typename I, int L, int U>
static void fire_range(const Args<F>& a, int64_t begin, int64_t end) {
    typedef typename Vec<F, I, L>::f vf;
    typedef typename Vec<F, I, L>::i vi;
    typedef typename Vec<F, I, L>::b vb;
    const int64_t G = (int64_t)L * U;
    // every argument in a local, so that no store through an output pointer can force a reload
    const F* __restrict const xs = a.x;
    F* __restrict const out = a.out;
    F* __restrict const events = a.events;
    uint8_t* __restrict const planes = a.planes;
    uint8_t* __restrict const popcount = a.popcount;
    void* const codes = a.code;
    int64_t* const rows = a.rows;
    const int code_bytes = a.code_bytes;
    const bool signed_digits = a.signed_digits != 0;
    const I mask = (I)(a.mask_steps > 0 ? a.mask_steps : 0);  // late-spike masking: keep steps < t0 + mask
    const int64_t inner = a.inner, per_site = (inner + G - 1) / G, n = a.sites * inner, row_len = a.row_len;
    const int T = a.T;
    vi totals[MAX_STEPS];
    int64_t row = -1, row_end = 0, row_sum = 0, row_chunks = 0;
    vi row_counts = vi{};
    vi lanes;
    for (int k = 0; k < L; ++k) lanes[k] = (I)k;
    const vf zero = vf{}, one = zero + (F)1;
    int64_t s = begin / per_site, j0 = (begin % per_site) * G;
    for (int t = 0; t < T; ++t) totals[t] = vi{};
    for (int64_t item = begin; item < end; ++item) {
        const F* __restrict thr = a.thr + s * T;
        const F* __restrict reset = a.reset + s * T;
        const F* __restrict weight = a.weight + s * T;
        const int64_t budget_raw = a.budget[s];
        const I budget = (I)(budget_raw <= 0 ? 0 : (budget_raw > T ? T + 1 : budget_raw));
        const int64_t len = inner - j0 < G ? inner - j0 : G;
        const int64_t g0 = s * inner + j0;
        int64_t lens[U];
        vf sign[U], r[U], acc[U];
        vi count[U], code[U], valid[U], encoded[U], first[U];
        #pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
            lens[u] = len - u * L > L ? L : (len - u * L > 0 ? len - u * L : 0);
            vf x = zero;
            if (lens[u] == L) memcpy(&x, xs + g0 + u * L, sizeof(vf));
            else if (lens[u] > 0) memcpy(&x, xs + g0 + u * L, (size_t)lens[u] * sizeof(F));
            valid[u] = lanes < (I)lens[u];
            if (signed_digits) {  // the potential keeps its sign; each digit carries its own (σ = 1)
                sign[u] = one;
                r[u] = x;
            } else {
                sign[u] = ((zero < x) ? one : zero) - ((x < zero) ? one : zero);
                r[u] = x < zero ? -x : x;
            }
            acc[u] = zero;
            count[u] = vi{};
            code[u] = vi{};
            encoded[u] = vi{};
            first[u] = vi{} + (I)T;
        }
        if (signed_digits) {  // s_t = [r > θ(t)] − [−r > θ(t)] (masked once K digits were nonzero), r ← r − h(t)·s_t
            for (int t = 0; t < T; ++t) {
                const F th = thr[t], h = reset[t], d = weight[t];
                vi step = vi{};
                #pragma GCC unroll 8
                for (int u = 0; u < U; ++u) {
                    vi up = r[u] > th, down = -r[u] > th;
                    vi fired = up ^ down;  // both only below a negative threshold: the reference's 1 − 1 = 0
                    if (budget) fired &= (mask ? encoded[u] : count[u]) < budget;
                    if (len != G) fired &= valid[u];
                    up &= fired;
                    down &= fired;
                    vf digit = (up ? one : zero) - (down ? one : zero);
                    r[u] = r[u] - h * digit;  // h·s_t is exact: one rounding, as the reference's addcmul
                    if (mask) {  // the potential moved on every digit; only the output drops the late ones
                        encoded[u] -= fired;
                        first[u] = (fired & (first[u] == (I)T)) ? vi{} + (I)t : first[u];
                        fired &= (I)t < first[u] + mask;
                        up &= fired;
                        down &= fired;
                        digit = (up ? one : zero) - (down ? one : zero);
                    }
                    acc[u] = acc[u] + d * digit;
                    count[u] -= fired;
                    step -= fired;
                    if (planes) {  // int8 digits: up (−1 mask) → +1, down → −1
                        vb bits = __builtin_convertvector(down - up, vb);
                        store<vb, uint8_t>(planes + t * n + g0 + u * L, bits, lens[u], L);
                    }
                    if (events) {
                        vf y = d * digit;
                        store<vf, F>(events + t * n + g0 + u * L, y, lens[u], L);
                    }
                }
                totals[t] += step;
            }
        } else if (budget == 0 && len == G && !planes && !events && !codes && !mask) {  // the common case
            for (int t = 0; t < T; ++t) {
                const F th = thr[t], h = reset[t], d = weight[t];
                vi step = vi{};
                #pragma GCC unroll 8
                for (int u = 0; u < U; ++u) {
                    const vi fired = r[u] > th;
                    r[u] = fired ? r[u] - h : r[u];
                    acc[u] = fired ? acc[u] + d : acc[u];
                    count[u] -= fired;
                    step -= fired;
                }
                totals[t] += step;
            }
        } else {
            for (int t = 0; t < T; ++t) {
                const F th = thr[t], h = reset[t], d = weight[t];
                vi step = vi{};
                #pragma GCC unroll 8
                for (int u = 0; u < U; ++u) {
                    vi fired = r[u] > th;
                    if (budget) fired &= (mask ? encoded[u] : count[u]) < budget;
                    if (len != G) fired &= valid[u];
                    r[u] = fired ? r[u] - h : r[u];
                    if (mask) {  // the potential moved on every spike; only the output drops the late ones
                        encoded[u] -= fired;
                        first[u] = (fired & (first[u] == (I)T)) ? vi{} + (I)t : first[u];
                        fired &= (I)t < first[u] + mask;
                    }
                    acc[u] = fired ? acc[u] + d : acc[u];
                    count[u] -= fired;
                    step -= fired;
                    if (codes) code[u] |= fired & (I)((I)1 << t);
                    if (planes) {
                        vb bits = __builtin_convertvector(fired & (I)1, vb);
                        store<vb, uint8_t>(planes + t * n + g0 + u * L, bits, lens[u], L);
                    }
                    if (events) {
                        vf y = (sign[u] * d) * (fired ? one : zero);
                        store<vf, F>(events + t * n + g0 + u * L, y, lens[u], L);
                    }
                }
                totals[t] += step;
            }
        }
        #pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
            const int64_t at = g0 + u * L;
            if (out) {
                vf o = sign[u] * acc[u];
                store<vf, F>(out + at, o, lens[u], L);
            }
            if (popcount) {
                vb bits = __builtin_convertvector(count[u], vb);
                store<vb, uint8_t>(popcount + at, bits, lens[u], L);
            }
            if (codes) {
                for (int64_t k = 0; k < lens[u]; ++k) {
                    const int64_t c = (int64_t)code[u][k];
                    if (code_bytes == 1) ((uint8_t*)codes)[at + k] = (uint8_t)c;
                    else if (code_bytes == 2) ((int16_t*)codes)[at + k] = (int16_t)c;
                    else ((int32_t*)codes)[at + k] = (int32_t)c;
                }
            }
            if (rows && lens[u] > 0) {
                if (row < 0) { row = at / row_len; row_end = (row + 1) * row_len; }
                if (at + lens[u] <= row_end && row_chunks < (1 << 20)) {  // the vector lies in the current row
                    row_counts += count[u];
                    ++row_chunks;
                } else {
                    for (int64_t k = 0; k < lens[u]; ++k) {
                        if (at + k >= row_end) {
                            for (int q = 0; q < L; ++q) row_sum += row_counts[q];
#pragma omp atomic
                            rows[row] += row_sum;
                            row = (at + k) / row_len; row_end = (row + 1) * row_len;
                            row_sum = 0; row_counts = vi{}; row_chunks = 0;
                        }
                        row_sum += count[u][k];
                    }
                }
            }
        }
        j0 += G;
        if (j0 >= inner || item + 1 == end) {  // the site's last item (or the range's): its step totals
            for (int t = 0; t < T; ++t) {
                int64_t sum = 0;
                for (int k = 0; k < L; ++k) sum += totals[t][k];
                totals[t] = vi{};
#pragma omp atomic
                a.per_step[s * T + t] += sum;
            }
            if (j0 >= inner) { ++s; j0 = 0; }
        }
    }
    if (row >= 0) {
        for (int q = 0; q < L; ++q) row_sum += row_counts[q];
#pragma omp atomic
        rows[row] += row_sum;
    }
}

template <typename F, typename I, int L, int U> static void fire(const Args<F> a) {
    const int64_t items = a.sites * ((a.inner + (int64_t)L * U - 1) / ((int64_t)L * U));
    const int threads = a.sites * a.inner < 65536 ? 1 : (a.threads > 0 ? a.threads : 1);
#pragma omp parallel num_threads(threads)
    {
        int64_t count = threads, id = 0;
#ifdef _OPENMP
        count = omp_get_num_threads(); id = omp_get_thread_num();
#endif
        const int64_t begin = items * id / count, end = items * (id + 1) / count;
        if (begin < end) fire_range<F, I, L, U>(a, begin, end);
    }
}

#define ENTRY(NAME, F, I, L, U)                                                                                         \
    extern "C" int NAME(const F* x, int64_t sites, int64_t inner, int32_t T, const F* thr, const F* reset,           \
                        const F* weight, const int64_t* budget, F* out, F* events, uint8_t* planes, void* code,      \
                        int32_t code_bytes, uint8_t* popcount, int64_t* per_step, int64_t* rows, int64_t row_len,    \
                        int32_t threads, int32_t signed_digits, int32_t mask_steps) {                                \
        if (T < 1 || T > MAX_STEPS || (signed_digits && code) || mask_steps < 0) return 1;                           \
        Args<F> a = {x, sites, inner, T, thr, reset, weight, budget, out, events, planes, code, code_bytes,          \
                     popcount, per_step, rows, row_len, threads, signed_digits, mask_steps};                         \
        fire<F, I, L, U>(a);                                                                                            \
        return 0;                                                                                                    \
    }

// Lanes per vector: the widest registers the target has. A wider vector type than the ISA's is lowered piecewise, and
// GCC lowers the selects and compares of such a type badly (16 float lanes on an AVX2-only CPU ran 55x slower).
// The lane count changes no result: every operation is elementwise, and the counts are integers.
// -DVECTOR_BYTES=N sets it (the tests and bench/neuron_kernel.py build every width).
#ifndef VECTOR_BYTES
#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#elif defined(__AVX__)
#define VECTOR_BYTES 32
#else
#define VECTOR_BYTES 16
#endif
#endif

// Two int64 lanes are no fewer than four: GCC 12 stops with an internal error on their selects without SSE4.2.
ENTRY(spikecompile_fire_f32, float, int32_t, VECTOR_BYTES / 4, 4)
ENTRY(spikecompile_fire_f64, double, int64_t, VECTOR_BYTES >= 32 ? VECTOR_BYTES / 8 : 4, 4)

// ---- the integer neuron of the Loihi 2 fixed-point run (passes/fixed_point.py) --------------------------------------
// Per element, in one pass: u = rint(x·g) (g per position in the last dim, or one g), saturated to ±limit (counted);
// k = the interval of u in the site's firing table (the last k with low[k] ≤ u); code = codes[k], value = code·delta.
// The same float64 operations, one rounding each, as the torch path: x·g, rint half to even, code·delta.
// The interval: a bucket table over [−limit, limit] (first[b], b = (u + limit) >> shift, the interval of bucket b's
// first value, built once per site by neuron.kernel.bucket_table) bounds u's interval to [first[b], first[b + 1]],
// and a branchless binary search finds it there (low[] holds integers, so a bucket's first value is an integer too).

template <typename In>
static int fire_fixed(const In* x, int64_t n, int64_t inner, const double* gain, int64_t gain_len, int64_t limit,
                      const double* low, const double* codes, int64_t intervals, const int64_t* first, int64_t shift,
                      double delta, double* value, double* code, int64_t* interval, int64_t* saturated,
                      int32_t threads, int64_t digit_count, const int8_t* code_digits, int8_t* digits) {
    // digits (when digit_count > 0): digit plane d of each neuron's code, digits[d·n + i] = code_digits[d·intervals + k]
    // (the int8 operands of the integer synapse GEMM, passes.fixed_point.synapse_sums). code, value, interval: each
    // written only where not null.
    if (intervals < 1 || inner < 1 || n % inner || limit < 0 || shift < 0 || (gain_len != 1 && gain_len != inner))
        return 1;
    const double top = (double)limit;
    const int64_t rows = n / inner;  // row-major [rows, inner]: the gain indexed by position, no modulo per element
    int64_t total = 0;
    const int count = n < 65536 ? 1 : (threads > 0 ? threads : 1);
#pragma omp parallel for num_threads(count) reduction(+ : total) schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
        for (int64_t j = 0, i = row * inner; j < inner; ++j, ++i) {
            double u = nearbyint((double)x[i] * gain[gain_len == 1 ? 0 : j]);  // int32 x: exact in double
            int64_t k;
            if (u != u) {
                k = intervals - 1;  // NaN: past every low, as torch.searchsorted places it
            } else {
                if (u > top) { u = top; ++total; } else if (u < -top) { u = -top; ++total; }
                const int64_t bucket = ((int64_t)u + limit) >> shift;
                k = first[bucket];
                for (int64_t count = first[bucket + 1] - k + 1; count > 1;) {  // the last k with low[k] ≤ u
                    const int64_t half = count >> 1;
                    k = low[k + half] <= u ? k + half : k;
                    count -= half;
                }
            }
            if (code) code[i] = codes[k];
            if (value) value[i] = codes[k] * delta;
            if (interval) interval[i] = k;
            for (int64_t d = 0; d < digit_count; ++d) digits[d * n + i] = code_digits[d * intervals + k];
        }
    }
    *saturated = total;
    return 0;
}

// x float64 (an op's value) or int32 (a synapse's exact integer window sums, passes.fixed_point.synapse_sums).
#define FIXED_ENTRY(NAME, IN)                                                                                          \
    extern "C" int NAME(const IN* x, int64_t n, int64_t inner, const double* gain, int64_t gain_len, int64_t limit,   \
                        const double* low, const double* codes, int64_t intervals, const int64_t* first,             \
                        int64_t shift, double delta, double* value, double* code, int64_t* interval,                 \
                        int64_t* saturated, int32_t threads, int64_t digit_count, const int8_t* code_digits,         \
                        int8_t* digits) {                                                                            \
        return fire_fixed<IN>(x, n, inner, gain, gain_len, limit, low, codes, intervals, first, shift, delta, value, \
                              code, interval, saturated, threads, digit_count, code_digits, digits);                 \
    }

FIXED_ENTRY(spikecompile_fire_fixed, double)
FIXED_ENTRY(spikecompile_fire_fixed_i32, int32_t)
