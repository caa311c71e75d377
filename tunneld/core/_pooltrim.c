/* Give the empty pools of CPython's small-object allocator back to the OS.
 *
 * CPython (3.11, 3.12) allocates objects of up to 512 bytes from 16 KiB pools carved out of
 * 1 MiB arenas, and returns an arena to the OS only when every pool in it is empty.  After
 * thousands of agent sessions end, most of their pools are empty, but their arenas also hold a
 * few long-lived objects allocated meanwhile, so the empty pools stay resident: ~26 MB after
 * 1,500 sessions left (``sys._debugmallocstats``: "unused pools").
 *
 * release_free_pools(objects) walks the arenas that hold ``objects`` (gc.get_objects()) and
 * what they refer to (one level, through tp_traverse: that reaches the strings, numbers and
 * tuples the collector does not track) and, for every empty pool, marks its header as never
 * used (size class DUMMY_SIZE_IDX, as a freshly carved pool has) and drops the pool's pages
 * after the first with madvise(MADV_DONTNEED).  The allocator then treats that pool as a new
 * one when it next takes it from the arena's free list: it rewrites the header and carves
 * blocks afresh, from pages that read as zeros.  The first page keeps the header, whose
 * ``nextpool`` links the arena's free list.
 *
 * It all runs with the GIL held and without calling back into Python, so no allocation can
 * change a pool between the check and the release.  Nothing here is a public CPython API: the
 * module checks the layout it relies on against real allocations first (self_check) and does
 * nothing where it does not match (another allocator, debug hooks, another version's layout).
 * Every pool header is read with process_vm_readv, which fails instead of faulting on an
 * unmapped page, and counts as a pool of the arena only if every field is consistent with one;
 * memory is written only there.  Linux only: elsewhere self_check fails and nothing is done.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/uio.h>
#endif

#define POOL_SIZE ((uintptr_t)16384)
#define ARENA_SIZE ((uintptr_t)1 << 20)
#define NB_CLASSES 32
#define DUMMY_SIZE_IDX 0xffffu

/* CPython's struct pool_header (Objects/obmalloc.c), unchanged from 3.8 to 3.13. */
struct pool_header {
    union { void *padding; unsigned int count; } ref;
    void *freeblock;
    struct pool_header *nextpool;
    struct pool_header *prevpool;
    unsigned int arenaindex;
    unsigned int szidx;
    unsigned int nextoffset;
    unsigned int maxnextoffset;
};

#define POOL_OVERHEAD ((uintptr_t)sizeof(struct pool_header))

static int supported = -1;  /* -1 not checked yet, 0 no, 1 yes */
static long page_size;

/* Copy the header at ``addr`` into ``out`` without faulting; 0 on success.  Elsewhere than
 * on Linux there is no such read here, and so no release either (self_check fails). */
static int
safe_read(uintptr_t addr, struct pool_header *out)
{
#ifdef __linux__
    struct iovec local = {out, sizeof *out};
    struct iovec remote = {(void *)addr, sizeof *out};
    ssize_t n = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
    return n == (ssize_t)sizeof *out ? 0 : -1;
#else
    (void)addr;
    (void)out;
    return -1;
#endif
}

/* Whether ``h`` (read from ``pool``) is the header of a carved pool of arena ``arena``. */
static int
is_pool(const struct pool_header *h, uintptr_t pool, unsigned int arena)
{
    if (h->arenaindex != arena)
        return 0;
    if (h->szidx == DUMMY_SIZE_IDX)
        /* One this module released earlier: empty, and otherwise as it left it. */
        return h->ref.count == 0;
    if (h->szidx >= NB_CLASSES)
        return 0;
    uintptr_t size = ((uintptr_t)h->szidx + 1) * 16;
    if (h->maxnextoffset != POOL_SIZE - size)
        return 0;
    if (h->nextoffset < POOL_OVERHEAD + size || h->nextoffset > POOL_SIZE
            || (h->nextoffset - POOL_OVERHEAD) % size != 0)
        return 0;
    if (h->ref.count > (POOL_SIZE - POOL_OVERHEAD) / size)
        return 0;
    if (h->freeblock != NULL) {
        uintptr_t fb = (uintptr_t)h->freeblock;
        if (fb < pool + POOL_OVERHEAD || fb >= pool + POOL_SIZE || (fb - pool - POOL_OVERHEAD) % size != 0)
            return 0;
    }
    return 1;
}

/* Whether an empty pool's free-list link is one the allocator could have written. */
static int
plausible_link(const struct pool_header *h, uintptr_t pool)
{
    uintptr_t next = (uintptr_t)h->nextpool;
    if (next == 0)
        return 1;
    if (next % POOL_SIZE != 0)
        return 0;
    return next + ARENA_SIZE > pool && next < pool + ARENA_SIZE;
}

/* Does the allocator lay out blocks the way this module assumes? */
static int
self_check(void)
{
    static const size_t sizes[] = {8, 24, 100, 200, 500};
    void *blocks[sizeof sizes / sizeof sizes[0]];
    int ok = 1;
    size_t i;
    if (sizeof(void *) != 8)
        return 0;
    for (i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        blocks[i] = PyObject_Malloc(sizes[i]);
    for (i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        uintptr_t addr = (uintptr_t)blocks[i];
        uintptr_t pool = addr & ~(POOL_SIZE - 1);
        struct pool_header h;
        if (addr == 0 || safe_read(pool, &h) != 0) {
            ok = 0;
            continue;
        }
        if (h.szidx != (sizes[i] - 1) / 16 || h.ref.count == 0 || !is_pool(&h, pool, h.arenaindex)
                || (addr - pool - POOL_OVERHEAD) % (((uintptr_t)h.szidx + 1) * 16) != 0)
            ok = 0;
    }
    for (i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        PyObject_Free(blocks[i]);
    return ok;
}

static int
check_supported(void)
{
    if (supported < 0) {
        page_size = sysconf(_SC_PAGESIZE);
        supported = page_size > 0 && POOL_SIZE % (uintptr_t)page_size == 0
                    && (uintptr_t)page_size < POOL_SIZE && self_check();
    }
    return supported;
}

struct arena_span { unsigned int index; uintptr_t lo, hi; };

static int
cmp_span(const void *a, const void *b)
{
    unsigned int x = ((const struct arena_span *)a)->index, y = ((const struct arena_span *)b)->index;
    return x < y ? -1 : x > y;
}

/* Release the empty pools of the arena whose known in-use pools span [span->lo, span->hi]. */
static void
release_arena(const struct arena_span *span, Py_ssize_t *pools, Py_ssize_t *bytes)
{
    /* All of an arena's pools lie within one ARENA_SIZE mapping that holds lo and hi. */
    uintptr_t floor = span->hi + POOL_SIZE > ARENA_SIZE ? span->hi + POOL_SIZE - ARENA_SIZE : 0;
    uintptr_t ceil = span->lo + ARENA_SIZE - POOL_SIZE;
    uintptr_t p = span->lo;
    struct pool_header h;
    /* Pools are carved in address order, so every pool below a carved one is carved too. */
    while (p >= floor + POOL_SIZE && safe_read(p - POOL_SIZE, &h) == 0 && is_pool(&h, p - POOL_SIZE, span->index))
        p -= POOL_SIZE;
    for (; p <= ceil; p += POOL_SIZE) {
        /* Every header is read safely and checked, inside the known span too: memory is
         * written only where it proved to be an empty pool of this arena. */
        if (safe_read(p, &h) != 0 || !is_pool(&h, p, span->index)) {
            if (p > span->hi)
                break;  /* past the pools carved so far, or past the arena */
            continue;
        }
        if (h.ref.count != 0 || h.szidx == DUMMY_SIZE_IDX || !plausible_link(&h, p))
            continue;
        ((struct pool_header *)p)->szidx = DUMMY_SIZE_IDX;
        if (madvise((void *)(p + (uintptr_t)page_size), POOL_SIZE - (uintptr_t)page_size, MADV_DONTNEED) == 0) {
            *pools += 1;
            *bytes += (Py_ssize_t)(POOL_SIZE - (uintptr_t)page_size);
        }
    }
}

/* The pools of the objects seen, one object of each kept: an open-addressing hash set keyed
 * by pool address (0 marks a free slot).  An edge may hold millions of objects in a few
 * thousand pools; the set grows with the pools, not the objects. */
struct seeds { uintptr_t *v; size_t used, cap; int failed; };

/* Put ``obj`` in the set unless an object of its pool is there; 1 if it was put. */
static int
put_seed(uintptr_t *v, size_t cap, uintptr_t obj)
{
    uintptr_t pool = obj & ~(POOL_SIZE - 1);
    size_t i = (size_t)((pool >> 14) * 0x9E3779B97F4A7C15u) & (cap - 1);
    while (v[i] != 0) {
        if ((v[i] & ~(POOL_SIZE - 1)) == pool)
            return 0;
        i = (i + 1) & (cap - 1);
    }
    v[i] = obj;
    return 1;
}

static void
add_seed(struct seeds *s, uintptr_t obj)
{
    if (s->failed || obj < POOL_SIZE)
        return;
    if ((s->used + 1) * 2 > s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 65536, i;
        uintptr_t *v = PyMem_RawCalloc(cap, sizeof *v);
        if (v == NULL) {
            s->failed = 1;  /* walk the pools seen so far */
            return;
        }
        for (i = 0; i < s->cap; i++)
            if (s->v[i] != 0)
                put_seed(v, cap, s->v[i]);
        PyMem_RawFree(s->v);
        s->v = v;
        s->cap = cap;
    }
    s->used += put_seed(s->v, s->cap, obj);
}

static int
visit(PyObject *o, void *arg)
{
    /* Referents include what the collector does not track (strings, numbers, tuples of
     * them): they fill pools of their own, often whole arenas. */
    if (Py_TYPE(o)->tp_basicsize <= 512)
        add_seed(arg, (uintptr_t)o);
    return 0;
}

/* Whether ``obj`` sits where a block of the pool at ``pool`` (header ``h``) starts, after a
 * pre-header of 0, 16 (GC) or 32 bytes (GC and managed dict). */
static int
on_block(uintptr_t obj, uintptr_t pool, const struct pool_header *h)
{
    uintptr_t size = ((uintptr_t)h->szidx + 1) * 16, pre;
    for (pre = 0; pre <= 32; pre += 16) {
        if (obj >= pool + POOL_OVERHEAD + pre && (obj - pre - pool - POOL_OVERHEAD) % size == 0)
            return 1;
    }
    return 0;
}

static PyObject *
release_free_pools(PyObject *module, PyObject *objects)
{
    if (!PyList_Check(objects)) {
        PyErr_SetString(PyExc_TypeError, "release_free_pools() takes a list (gc.get_objects())");
        return NULL;
    }
    if (!check_supported())
        Py_RETURN_NONE;
    struct seeds seeds = {NULL, 0, 0, 0};
    Py_ssize_t n = PyList_GET_SIZE(objects), i;
    /* The list holds every object passed, and they hold their referents: all stay alive,
     * and no allocation happens until the walk is over (the GIL is held throughout). */
    for (i = 0; i < n; i++) {
        PyObject *o = PyList_GET_ITEM(objects, i);
        visit(o, &seeds);
        traverseproc traverse = Py_TYPE(o)->tp_traverse;
        if (traverse != NULL && PyObject_IS_GC(o))
            traverse(o, visit, &seeds);
    }
    struct arena_span *spans = NULL;
    Py_ssize_t count = 0, merged = 0, pools = 0, bytes = 0;
    if (seeds.used)
        spans = PyMem_RawMalloc(seeds.used * sizeof *spans);
    if (spans != NULL) {
        for (size_t k = 0; k < seeds.cap; k++) {
            uintptr_t obj = seeds.v[k], pool = obj & ~(POOL_SIZE - 1);
            struct pool_header h;
            /* A live object is in it, so the pool is in use: its header must say so, and
             * the object must sit where one of its blocks starts. */
            if (obj == 0 || safe_read(pool, &h) != 0 || h.ref.count == 0 || h.szidx == DUMMY_SIZE_IDX
                    || !is_pool(&h, pool, h.arenaindex) || !on_block(obj, pool, &h))
                continue;
            spans[count].index = h.arenaindex;
            spans[count].lo = spans[count].hi = pool;
            count++;
        }
        qsort(spans, (size_t)count, sizeof *spans, cmp_span);
        for (i = 0; i < count; i++) {
            if (merged && spans[merged - 1].index == spans[i].index) {
                if (spans[i].lo < spans[merged - 1].lo)
                    spans[merged - 1].lo = spans[i].lo;
                if (spans[i].hi > spans[merged - 1].hi)
                    spans[merged - 1].hi = spans[i].hi;
            }
            else {
                spans[merged++] = spans[i];
            }
        }
        for (i = 0; i < merged; i++) {
            /* Pools of one arena further apart than an arena: something is not what it seems. */
            if (spans[i].hi - spans[i].lo < ARENA_SIZE)
                release_arena(&spans[i], &pools, &bytes);
        }
        PyMem_RawFree(spans);
    }
    PyMem_RawFree(seeds.v);
    return Py_BuildValue("(nnn)", merged, pools, bytes);
}

static PyObject *
is_supported(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(check_supported());
}

static PyMethodDef methods[] = {
    {"release_free_pools", release_free_pools, METH_O,
     "release_free_pools(objects) -> (arenas, pools, bytes) released, or None where the\n"
     "allocator's layout is not the one this module knows."},
    {"supported", is_supported, METH_NOARGS,
     "supported() -> whether release_free_pools can work in this interpreter."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_pooltrim",
    "Give the empty pools of CPython's small-object allocator back to the OS (see _pooltrim.c).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__pooltrim(void)
{
    return PyModule_Create(&module_def);
}
