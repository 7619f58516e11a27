/* Per-row nonzero and N:M block counts, and per-input activity, of many weights in one pass.
 *
 * Built and loaded by wtcore/native.py (see its docstring for why). Plain C that gcc/clang vectorize at
 * -O3: each row of a weight [o, c, k] is read ONCE as unsigned bit patterns; an element counts as nonzero
 * when its magnitude bits `a` satisfy lo <= a <= hi (lo = 1, hi = all magnitude bits: x != 0, NaN
 * included; or lo = the first pattern above the tolerance, hi = +inf: |x| > tol, NaN excluded). The 0/1
 * bytes of the row go to a buffer in L1; block sums, row counts and column activity are byte arithmetic
 * on that buffer, so nothing the size of a weight is ever written. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const void *data;  /* contiguous [o, c, k] elements of `width` bytes */
    int64_t o, c, k;
    int64_t row_off;   /* first entry of this weight in rows[3][total_rows] */
    int64_t col_off;   /* first byte of this weight in a thread's [sum c * k] column buffer */
    uint64_t lo, hi;   /* nonzero iff lo <= (bits & magnitude mask) <= hi */
    const uint8_t *first; /* [c * k]: 1 at the first k entries of every block of m * k (k > 1 or m != 4) */
    int64_t out_col;   /* first entry of this weight in cols[sum c] */
    int32_t width;     /* 2, 4 or 8 */
    int32_t pad;
} wt_weight;

typedef struct {
    int64_t w, r0, r1;  /* rows [r0, r1) of weight w */
} wt_task;

typedef struct {
    const wt_weight *ws;
    const wt_task *tasks;
    int64_t n_tasks, total_rows, m, keep;
    int64_t *rows;        /* [3, total_rows]: nonzeros, m-blocks with exactly keep, with at most keep */
    uint8_t *col_bufs;    /* [threads, col_len] */
    int64_t col_len, row_max;
    int64_t next;
} wt_job;

#define ROW_MAX 65536 /* the longest row (c * k) the kernel takes; wtcore/native.py sends longer ones to torch */

#define INDICATOR(T, MASK)                                                                       \
    static int64_t ind_##T(const T *x, int64_t n, T lo, T span, uint8_t *e, uint8_t *acc) {      \
        int32_t nnz = 0; /* rows hold at most ROW_MAX entries: narrow sums vectorize better */  \
        for (int64_t j = 0; j < n; j++) {                                                        \
            uint8_t v = (T)((x[j] & (T)(MASK)) - lo) <= span;                                    \
            e[j] = v;                                                                            \
            acc[j] |= v;                                                                         \
            nnz += v;                                                                            \
        }                                                                                        \
        return nnz;                                                                              \
    }
INDICATOR(uint16_t, 0x7FFFu)
INDICATOR(uint32_t, 0x7FFFFFFFu)
INDICATOR(uint64_t, 0x7FFFFFFFFFFFFFFFull)

/* blocks of 4 consecutive entries (k == 1): one 32-bit word each, its byte sum in the top byte */
static void blocks_k1(const uint8_t *e, int64_t nb, int64_t keep, int64_t *eq, int64_t *le) {
    int32_t a = 0, b = 0;
    for (int64_t i = 0; i < nb; i++) {
        uint32_t w;
        memcpy(&w, e + 4 * i, 4);
        uint32_t s = (w * 0x01010101u) >> 24;
        a += s == (uint32_t)keep;
        b += s <= (uint32_t)keep;
    }
    *eq = a;
    *le = b;
}

/* blocks of m entries k apart (k kernel positions): s[i] = e[i] + e[i+k] + ... + e[i+(m-1)k] over every
 * i, one vector-wide pass per block entry, kept where i is among the first k of its block (`first`): m
 * times the needed adds, all vector-wide (a loop over the k positions of one block would not be) */
static void blocks_mk(const uint8_t *e, const uint8_t *first, int64_t nb, int64_t m, int64_t k, int64_t keep,
                      uint8_t *s, int64_t *eq, int64_t *le) {
    int64_t n = (nb * m - (m - 1)) * k;
    int32_t a = 0, b = 0;
    uint8_t kp = (uint8_t)keep;
    if (m == 4) { /* the common case in one pass */
        for (int64_t i = 0; i < n; i++) {
            uint8_t v = e[i] + e[i + k] + e[i + 2 * k] + e[i + 3 * k];
            a += (v == kp) & first[i];
            b += (v <= kp) & first[i];
        }
    } else {
        for (int64_t i = 0; i < n; i++) s[i] = e[i];
        for (int64_t j = 1; j < m; j++) {
            const uint8_t *ej = e + j * k;
            for (int64_t i = 0; i < n; i++) s[i] += ej[i];
        }
        for (int64_t i = 0; i < n; i++) {
            a += (s[i] == kp) & first[i];
            b += (s[i] <= kp) & first[i];
        }
    }
    *eq = a;
    *le = b;
}

static void run_task(const wt_job *job, const wt_task *t, uint8_t *cols, uint8_t *e, uint8_t *sums) {
    const wt_weight *w = &job->ws[t->w];
    int64_t len = w->c * w->k, total = job->total_rows;
    uint8_t *acc = cols + w->col_off;
    int64_t nb = w->c / job->m;
    for (int64_t r = t->r0; r < t->r1; r++) {
        int64_t nnz, eq = 0, le = 0;
        const char *row = (const char *)w->data + r * len * w->width;
        if (w->width == 4)
            nnz = ind_uint32_t((const uint32_t *)row, len, (uint32_t)w->lo, (uint32_t)(w->hi - w->lo), e, acc);
        else if (w->width == 2)
            nnz = ind_uint16_t((const uint16_t *)row, len, (uint16_t)w->lo, (uint16_t)(w->hi - w->lo), e, acc);
        else
            nnz = ind_uint64_t((const uint64_t *)row, len, w->lo, w->hi - w->lo, e, acc);
        if (nb > 0) {
            if (w->k == 1 && job->m == 4)
                blocks_k1(e, nb, job->keep, &eq, &le);
            else
                blocks_mk(e, w->first, nb, job->m, w->k, job->keep, sums, &eq, &le);
        }
        int64_t i = w->row_off + r;
        job->rows[i] = nnz;
        job->rows[total + i] = eq;
        job->rows[2 * total + i] = le;
    }
}

typedef struct {
    wt_job *job;
    int64_t thread;
} wt_worker;

static void *work(void *arg) {
    wt_worker *me = (wt_worker *)arg;
    wt_job *job = me->job;
    uint8_t *cols = job->col_bufs + me->thread * job->col_len;
    /* one row's indicator and block sums, on the heap: thread stacks can be small (musl: 128 KiB) */
    uint8_t *e = malloc(2 * (size_t)job->row_max + 1);
    if (!e) return 0; /* the other workers take its tasks; the caller checks that all were taken */
    for (;;) {
        int64_t i = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (i >= job->n_tasks) break;
        run_task(job, &job->tasks[i], cols, e, e + job->row_max);
    }
    free(e);
    return 0;
}

/* Counts of `n_weights` weights (rows of `tasks`, any order): rows [3, total_rows] (nonzeros, m-blocks with
 * exactly keep / at most keep nonzeros, per row), cols [sum c] (1 where an input has a nonzero over every
 * row and kernel position). Returns 0; -1 when a row is longer than ROW_MAX or m > 255 (nothing written),
 * -2 when memory cannot be allocated. */
int wt_nonzero_stats(const wt_weight *ws, int64_t n_weights, const wt_task *tasks, int64_t n_tasks,
                     int64_t total_rows, int64_t m, int64_t keep, int64_t *rows, uint8_t *cols, int threads) {
    int64_t col_len = 0, row_max = 0;
    if (m < 1 || m > 255) return -1;
    for (int64_t i = 0; i < n_weights; i++) {
        if (ws[i].c * ws[i].k > ROW_MAX) return -1;
        row_max = ws[i].c * ws[i].k > row_max ? ws[i].c * ws[i].k : row_max;
        col_len = ws[i].col_off + ws[i].c * ws[i].k > col_len ? ws[i].col_off + ws[i].c * ws[i].k : col_len;
    }
    if (threads > 64) threads = 64;
    if (threads > n_tasks) threads = (int)n_tasks;
    if (threads < 1) threads = 1;
    uint8_t *bufs = calloc((size_t)(threads * col_len + 1), 1);
    if (!bufs) return -2;
    wt_job job = {ws, tasks, n_tasks, total_rows, m, keep, rows, bufs, col_len, row_max, 0};
    wt_worker me[64];
    pthread_t th[64];
    int started = 0;
    for (int i = 0; i < threads; i++) me[i] = (wt_worker){&job, i};
    for (int i = 1; i < threads; i++)
        if (pthread_create(&th[started], 0, work, &me[i]) == 0) started++;
    work(&me[0]);
    for (int i = 0; i < started; i++) pthread_join(th[i], 0);
    if (job.next < n_tasks) { /* no worker could allocate its row buffers */
        free(bufs);
        return -2;
    }
    /* the threads' buffers OR-ed, then over the kernel positions of every input */
    for (int t = 1; t < threads; t++) {
        const uint8_t *src = bufs + t * col_len;
        for (int64_t j = 0; j < col_len; j++) bufs[j] |= src[j];
    }
    for (int64_t i = 0; i < n_weights; i++) {
        const uint8_t *src = bufs + ws[i].col_off;
        for (int64_t ci = 0; ci < ws[i].c; ci++) {
            uint8_t any = 0;
            for (int64_t q = 0; q < ws[i].k; q++) any |= src[ci * ws[i].k + q];
            cols[ws[i].out_col + ci] = any;
        }
    }
    free(bufs);
    return 0;
}
