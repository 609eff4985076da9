/* y = x @ w.T for bf16 weights and a few tokens, summed in float32: the CPU expert's matrix products at a few
   tokens, where they are bounded by how fast the host reads the weights (cpugemv.py builds and loads this).

   Each step loads 32 consecutive bf16 weights as 16 32-bit words: shifted left by 16 bits a word is its even
   element as a float32, masked its odd one, so no other conversion is needed; the token's values are split the
   same way (even and odd elements) once per call. Every output is summed in one order whatever block or thread
   computes it: the products of elements 32j + 2i and 32j + 2i + 1 go to lane i of the even and the odd
   accumulator, in order of j; then the two accumulators are added, then the 16 lanes by halving (lane i + 8 into
   lane i, and so on), then the elements past the last whole step one by one. So the value of an output does not
   depend on the thread count. */

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the even/odd split of a word assumes a little-endian CPU (the build fails; the engine then uses F.linear)"
#endif

#define LANES 16
#define STEP (2 * LANES)

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));

static inline vu load_words(const uint16_t *p) {
    vu v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vf load_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch rounds */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float hsum(vf v) {
    float a[LANES];
    memcpy(a, &v, sizeof a);
    for (int s = LANES / 2; s > 0; s /= 2)
        for (int j = 0; j < s; j++) a[j] += a[j + s];
    return a[0];
}

/* R weight rows against T tokens: each weight step loaded once for the T tokens, each token's step once for
   the R rows. xs: per token, its even elements then its odd ones (kv / 2 each); x: the tokens as given. */
#define BLOCK(R, T)                                                                                              \
    static inline void block_##R##_##T(const uint16_t *w, long ldw, const float *xs, const float *x, long k,    \
                                       long kv, uint16_t *y, long ldy) {                                         \
        const long half = kv / 2;                                                                                \
        vf even[R][T], odd[R][T];                                                                                \
        for (int r = 0; r < R; r++)                                                                              \
            for (int t = 0; t < T; t++) even[r][t] = odd[r][t] = (vf){0};                                        \
        for (long i = 0; i < kv; i += STEP) {                                                                    \
            vf xe[T], xo[T];                                                                                     \
            for (int t = 0; t < T; t++) {                                                                        \
                xe[t] = load_f32(xs + t * kv + i / 2);                                                           \
                xo[t] = load_f32(xs + t * kv + half + i / 2);                                                    \
            }                                                                                                    \
            for (int r = 0; r < R; r++) {                                                                        \
                vu words = load_words(w + r * ldw + i);                                                          \
                vf we = (vf)(words << 16), wo = (vf)(words & 0xffff0000u);                                       \
                for (int t = 0; t < T; t++) {                                                                    \
                    even[r][t] += we * xe[t];                                                                    \
                    odd[r][t] += wo * xo[t];                                                                     \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        for (int r = 0; r < R; r++)                                                                              \
            for (int t = 0; t < T; t++) {                                                                        \
                float s = hsum(even[r][t] + odd[r][t]);                                                          \
                for (long i = kv; i < k; i++) s += bf16_to_f32(w[r * ldw + i]) * x[t * k + i];                   \
                y[t * ldy + r] = f32_to_bf16(s);                                                                 \
            }                                                                                                    \
    }
BLOCK(4, 1)
BLOCK(4, 2)
BLOCK(1, 1)
BLOCK(1, 2)

/* Rows [r0, r1) for n tokens: blocks of 4 rows against pairs of tokens and a last lone token, then the rows left
   over one at a time. Blocks at one token too: a token of the down projection (14336 floats) does not stay in a
   core's first-level cache, and a block reads it once for four rows (on an H200 host's Xeon one expert took
   3.4-4.5 ms at one token in blocks against 4.2-4.5 one row at a time, 3.2-3.8 against 4.3-4.5 while the link
   copied: benchmarks/NOTES.md). */
static void rows(const uint16_t *w, long ldw, const float *xs, const float *x, long k, int n, uint16_t *y, long ldy,
                 long r0, long r1) {
    const long kv = k - k % STEP;
    long r = r0;
    for (; r + 4 <= r1; r += 4) {
        int t = 0;
        for (; t + 2 <= n; t += 2) block_4_2(w + r * ldw, ldw, xs + t * kv, x + t * k, k, kv, y + t * ldy + r, ldy);
        if (t < n) block_4_1(w + r * ldw, ldw, xs + t * kv, x + t * k, k, kv, y + t * ldy + r, ldy);
    }
    for (; r < r1; r++) {
        int t = 0;
        for (; t + 2 <= n; t += 2) block_1_2(w + r * ldw, ldw, xs + t * kv, x + t * k, k, kv, y + t * ldy + r, ldy);
        if (t < n) block_1_1(w + r * ldw, ldw, xs + t * kv, x + t * k, k, kv, y + t * ldy + r, ldy);
    }
}

/* Rows a thread takes at a time (a multiple of the 4-row blocks): threads take the next chunk as they finish one,
   so a thread that runs slower (its core shared with another thread, its memory traffic behind the link's copies)
   holds up only its own chunk, where a fixed share of the rows per thread made every product wait for the slowest
   thread. A Mixtral expert's up projection is 448 chunks of 512 KB, its down projection 64 of 1.8 MB. On an H200
   host's Xeon one expert at one token took 2.8-3.2 ms against 3.2-3.3 with fixed shares, 2.8-3.0 against 3.4-3.5
   while the link copied; in a decode run 1.23-1.29x faster (benchmarks/NOTES.md). No size stood out: 16 to 256
   rows took 2.3-2.8 ms in one probe, and 32 rows against 64 ran decode at 0.93x and beam search at 1.06x. */
#define CHUNK 64

/* The tokens x [n, k] split for `rows`: per token, its even elements then its odd ones (the kv = k - k % STEP of
   them that whole steps read). NULL when the memory could not be had. */
static float *split_tokens(const float *x, int n, long k) {
    const long kv = k - k % STEP, half = kv / 2;
    float *xs = malloc(sizeof(float) * (size_t)(n * kv + 1));
    if (xs == NULL) return NULL;
    for (int t = 0; t < n; t++)
        for (long i = 0; i < half; i++) {
            xs[t * kv + i] = x[t * k + 2 * i];
            xs[t * kv + half + i] = x[t * k + 2 * i + 1];
        }
    return xs;
}

/* y[t, r] = bf16(sum_i x[t, i] * w[r, i]) for t < n, r < m: w bf16 [m, k] with row stride ldw, x float32 [n, k]
   contiguous, y bf16 [n, ldy]. Returns 0, or -1 when memory for the split tokens could not be had. */
int fb_gemv_bf16(const uint16_t *w, long m, long k, long ldw, const float *x, int n, uint16_t *y, long ldy,
                 int threads) {
    float *xs = split_tokens(x, n, k);
    if (xs == NULL) return -1;
    const long chunks = (m + CHUNK - 1) / CHUNK;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (long c = 0; c < chunks; c++) {
        const long r0 = c * CHUNK, r1 = r0 + CHUNK < m ? r0 + CHUNK : m;
        rows(w, ldw, xs, x, k, n, y, ldy, r0, r1);
    }
    free(xs);
    return 0;
}

/* Products started ahead, and joined: the caller queues products (fb_gemv_bf16_start) that a helper thread of this
   library and its OpenMP team compute in order while the caller goes on, and later computes their rows beside them
   until none is left (fb_gemv_bf16_join): the team has one thread fewer than asked for, and the caller is the last.
   The executor starts a CPU share's first product this way before it queues the layer's GPU work, which would
   otherwise hold the CPU's start back by the host's launch time, and every other product the same way, started and
   joined at once, so that one team computes them all (cpugemv.py). The rows are handed out in chunks as in
   fb_gemv_bf16, each computed by one thread as there, so the values are the same. The helper is started on first
   use, and again in a child process after a fork (which copies no threads). Products are started and joined by one
   thread at a time. When the queue runs empty the helper watches it for a while (fb_gemv_bf16_watch) before it
   sleeps on a condition variable: a layer call's products come back to back, tens of microseconds apart, and a
   sleeping helper must first be woken by the kernel, while the caller computes alone. */

#define QUEUED 8

struct product {
    const uint16_t *w;
    long m, k, ldw;
    const float *x;
    int n;
    uint16_t *y;
    long ldy;
    float *xs;
    long chunks;
    atomic_long claimed, done;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queued = PTHREAD_COND_INITIALIZER;
static struct product queue[QUEUED];
static long first;         /* products [first, next) are not retired; queue[i % QUEUED] holds product i */
static atomic_long next;   /* changed with the lock held; the helper also watches it without (watch) */
static long active = -1;  /* the product the helper's team is computing, which stays unretired until it is done */
static int team, helper_running, fork_handler;
static atomic_long watch_ns; /* how long the helper watches an empty queue before it sleeps (cpugemv.WATCH_US) */

void fb_gemv_bf16_watch(long nanoseconds) {
    atomic_store_explicit(&watch_ns, nanoseconds, memory_order_relaxed);
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Without the lock: return once a product after the first `seen` is queued, or after watch_ns. */
static void watch(long seen) {
    const long limit = atomic_load_explicit(&watch_ns, memory_order_relaxed);
    if (limit <= 0) return;
    const long until = now_ns() + limit;
    for (long i = 1; atomic_load_explicit(&next, memory_order_acquire) == seen; i++) {
        cpu_relax();
        if (i % 64 == 0 && now_ns() >= until) return;
    }
}

/* Compute chunks of p until none is left to claim. Nobody computes a product after it is retired: the caller returns
   from fb_gemv_bf16_join after its last claim, and the helper's team ends its parallel region before `active` lets
   its product be retired. */
static void compute_chunks(struct product *p) {
    long c;
    while ((c = atomic_fetch_add_explicit(&p->claimed, 1, memory_order_acquire)) < p->chunks) {
        const long r0 = c * CHUNK, r1 = r0 + CHUNK < p->m ? r0 + CHUNK : p->m;
        rows(p->w, p->ldw, p->xs, p->x, p->k, p->n, p->y, p->ldy, r0, r1);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
    }
}

static int finished(struct product *p) {
    return atomic_load_explicit(&p->done, memory_order_acquire) >= p->chunks;
}

/* With the lock held: retire the finished products at the front of the queue (their slots may be reused), but for
   the one the helper's team is still in. */
static void retire(void) {
    while (first < next && first != active && finished(&queue[first % QUEUED])) {
        free(queue[first % QUEUED].xs);
        first++;
    }
}

static void *helper(void *unused) {
    (void)unused;
    pthread_mutex_lock(&lock);
    for (;;) {
        retire();
        if (first == next) {
            const long seen = next;
            pthread_mutex_unlock(&lock);
            watch(seen);
            pthread_mutex_lock(&lock);
            if (first == next) pthread_cond_wait(&queued, &lock);
            continue;
        }
        struct product *p = &queue[first % QUEUED];
        const int threads = team;
        const int left = atomic_load_explicit(&p->claimed, memory_order_relaxed) < p->chunks;
        if (left) active = first;
        pthread_mutex_unlock(&lock);
        if (left) {
            #pragma omp parallel num_threads(threads)
            compute_chunks(p);
        } else {
            sched_yield(); /* its last chunks are being computed by the caller */
        }
        pthread_mutex_lock(&lock);
        active = -1;
    }
    return NULL;
}

static void after_fork_in_child(void) {
    pthread_mutex_init(&lock, NULL);
    pthread_cond_init(&queued, NULL);
    first = next = 0;
    active = -1;
    helper_running = 0;
}

/* Queue y = x @ w.T (as fb_gemv_bf16, with `threads` threads: the helper's team and the joining caller); x and y
   must stay valid until fb_gemv_bf16_join returns. Returns 0; -1 when memory for the split tokens could not be had,
   -2 when QUEUED products are not finished yet, -3 when the helper could not be started, -4 for fewer than two
   threads (nothing is queued then). */
int fb_gemv_bf16_start(const uint16_t *w, long m, long k, long ldw, const float *x, int n, uint16_t *y, long ldy,
                       int threads) {
    if (threads < 2) return -4;
    float *xs = split_tokens(x, n, k);
    if (xs == NULL) return -1;
    pthread_mutex_lock(&lock);
    if (!fork_handler) fork_handler = pthread_atfork(NULL, NULL, after_fork_in_child) == 0;
    retire();
    if (next - first >= QUEUED) {
        pthread_mutex_unlock(&lock);
        free(xs);
        return -2;
    }
    if (!helper_running) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper, NULL) != 0) {
            pthread_mutex_unlock(&lock);
            free(xs);
            return -3;
        }
        pthread_detach(thread);
        helper_running = 1;
    }
    struct product *p = &queue[next % QUEUED];
    p->w = w, p->m = m, p->k = k, p->ldw = ldw, p->x = x, p->n = n, p->y = y, p->ldy = ldy, p->xs = xs;
    p->chunks = (m + CHUNK - 1) / CHUNK;
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    atomic_store_explicit(&p->claimed, 0, memory_order_release);
    team = threads - 1;
    next++;
    pthread_cond_signal(&queued);
    pthread_mutex_unlock(&lock);
    return 0;
}

/* Products the queue holds: not finished, or finished but behind one the helper's team is still inside (they take
   slots until the team leaves it). */
long fb_gemv_bf16_held(void) {
    pthread_mutex_lock(&lock);
    retire();
    const long held = next - first;
    pthread_mutex_unlock(&lock);
    return held;
}

/* Compute rows of every product queued so far beside the helper's team until none is left, then wait until all
   their outputs are written, and retire them. Returns the number of products joined. */
long fb_gemv_bf16_join(void) {
    pthread_mutex_lock(&lock);
    const long from = first, to = next;
    pthread_mutex_unlock(&lock);
    for (long i = from; i < to; i++) compute_chunks(&queue[i % QUEUED]);
    for (long i = from; i < to; i++)
        while (!finished(&queue[i % QUEUED])) sched_yield();
    pthread_mutex_lock(&lock);
    retire();
    pthread_mutex_unlock(&lock);
    return to - from;
}
