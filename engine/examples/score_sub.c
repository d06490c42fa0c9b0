/* score_sub.c: decode tickscore's Score messages in C (C99, no library but libzmq).
 *
 * A subscriber in C or C++ needs no MessagePack library for tickscore's Scores: the
 * layout is fixed (README, "Wire format (for subscribers)"), so ts_decode_score() below
 * reads one payload in place, bounds-checked, without allocating (the strings point into
 * the payload). Copy it into your program, or build this file as it is:
 *
 *   cc -O2 -std=c99 -DTS_WITH_ZMQ score_sub.c -lzmq -o score_sub
 *   ./score_sub ipc:///tmp/tickscore-replay-scores.ipc        # one line per Score
 *   ./score_sub -q -n 250000 ipc:///tmp/tickscore-replay-scores.ipc
 *
 * It subscribes to every instrument, checks that the topic frame equals the Score's
 * instrument, and keeps per shard (0-255) the epoch and the next seq, so it reports gaps
 * and restarts from the messages alone (README, "Gaps and restarts"). At the end (COUNT
 * Scores with -n, or no message for -t seconds after the first) it prints a summary on
 * stderr. Without TS_WITH_ZMQ the program is the decoder alone: it reads records
 * (uint32 little-endian length, then the payload) from stdin and prints one line per
 * record (the tests feed it real and malformed payloads this way).
 *
 * Output lines (-x, and the decoder-only program), fields separated by one space:
 *   ok SCHEMA INSTRUMENT_HEX SEQ TS_EVENT TS_IN TS_OUT SCORE_BITS_HEX VERSION_HEX FLAGS SHARD EPOCH
 *   err CODE NAME
 */
#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    TS_OK = 0,
    TS_ERR_TRUNCATED = -1, /* the payload ends inside an item */
    TS_ERR_NOT_ARRAY = -2, /* the payload is not a MessagePack array */
    TS_ERR_SCHEMA = -3,    /* the first element is not schema id 3 (Score) or 2 (Score v1) */
    TS_ERR_LENGTH = -4,    /* not 11 elements (schema 3) or 9 (schema 2) */
    TS_ERR_TYPE = -5,      /* an element of the wrong MessagePack type, or a str not UTF-8 */
    TS_ERR_RANGE = -6,     /* a negative seq/flags/shard/epoch, or a time beyond int64 */
    TS_ERR_TRAILING = -7,  /* bytes after the array */
};

static const char *ts_error_name(int e)
{
    static const char *names[] = {"ok", "truncated", "not_array", "schema", "length", "type", "range",
                                  "trailing"};
    return (e <= 0 && e >= TS_ERR_TRAILING) ? names[-e] : "unknown";
}

typedef struct {
    unsigned schema;     /* 3 (Score) or 2 (Score v1: shard and epoch read as 0) */
    const char *instrument; /* UTF-8, not NUL-terminated, inside the payload */
    size_t instrument_len;
    uint64_t seq;
    int64_t ts_event_ns, ts_in_ns, ts_out_ns;
    double score;
    const char *model_version;
    size_t model_version_len;
    uint64_t flags, shard, epoch;
} ts_score;

typedef struct {
    const uint8_t *p, *end;
} ts_reader;

static uint64_t ts_be(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

static int ts_take(ts_reader *r, size_t n, const uint8_t **out)
{
    if ((size_t)(r->end - r->p) < n)
        return TS_ERR_TRUNCATED;
    *out = r->p;
    r->p += n;
    return TS_OK;
}

/* An integer in any MessagePack int encoding: *neg = 0 and the value in *u, or *neg = 1
 * and the (negative) value in *i. */
static int ts_int(ts_reader *r, uint64_t *u, int64_t *i, int *neg)
{
    const uint8_t *b;
    int e = ts_take(r, 1, &b);
    if (e)
        return e;
    uint8_t tag = b[0];
    *neg = 0;
    if (tag <= 0x7f) {
        *u = tag;
    } else if (tag >= 0xe0) {
        *i = (int8_t)tag;
        *neg = 1;
    } else if (tag >= 0xcc && tag <= 0xcf) { /* uint 8, 16, 32, 64 */
        unsigned n = 1u << (tag - 0xcc);
        if ((e = ts_take(r, n, &b)))
            return e;
        *u = ts_be(b, n);
    } else if (tag >= 0xd0 && tag <= 0xd3) { /* int 8, 16, 32, 64 */
        unsigned n = 1u << (tag - 0xd0);
        if ((e = ts_take(r, n, &b)))
            return e;
        uint64_t v = ts_be(b, n);
        int64_t s;
        if (n == 8)
            memcpy(&s, &v, 8);
        else if (v >> (8 * n - 1)) /* negative: sign-extend */
            s = (int64_t)v - (int64_t)(1ull << (8 * n));
        else
            s = (int64_t)v;
        if (s < 0) {
            *i = s;
            *neg = 1;
        } else {
            *u = (uint64_t)s;
        }
    } else {
        return TS_ERR_TYPE;
    }
    return TS_OK;
}

static int ts_uint(ts_reader *r, uint64_t *out)
{
    uint64_t u = 0;
    int64_t i = 0;
    int neg, e = ts_int(r, &u, &i, &neg);
    if (e)
        return e;
    if (neg)
        return TS_ERR_RANGE;
    *out = u;
    return TS_OK;
}

static int ts_int64(ts_reader *r, int64_t *out)
{
    uint64_t u = 0;
    int64_t i = 0;
    int neg, e = ts_int(r, &u, &i, &neg);
    if (e)
        return e;
    if (!neg && u > (uint64_t)INT64_MAX)
        return TS_ERR_RANGE;
    *out = neg ? i : (int64_t)u;
    return TS_OK;
}

/* Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF). */
static int ts_utf8_ok(const uint8_t *s, size_t n)
{
    size_t k = 0;
    while (k < n) {
        uint8_t c = s[k];
        unsigned len;
        uint32_t cp;
        if (c < 0x80) {
            k++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            len = 2, cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            len = 3, cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            len = 4, cp = c & 0x07;
        } else {
            return 0;
        }
        if (n - k < len)
            return 0;
        for (unsigned j = 1; j < len; j++) {
            if ((s[k + j] & 0xc0) != 0x80)
                return 0;
            cp = cp << 6 | (s[k + j] & 0x3f);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        k += len;
    }
    return 1;
}

static int ts_str(ts_reader *r, const char **s, size_t *len)
{
    const uint8_t *b;
    int e = ts_take(r, 1, &b);
    if (e)
        return e;
    uint8_t tag = b[0];
    size_t n;
    if (tag >= 0xa0 && tag <= 0xbf) {
        n = tag & 0x1f;
    } else if (tag >= 0xd9 && tag <= 0xdb) { /* str 8, 16, 32 */
        unsigned w = 1u << (tag - 0xd9);
        if ((e = ts_take(r, w, &b)))
            return e;
        n = (size_t)ts_be(b, w);
    } else {
        return TS_ERR_TYPE;
    }
    if ((e = ts_take(r, n, &b)))
        return e;
    if (!ts_utf8_ok(b, n))
        return TS_ERR_TYPE;
    *s = (const char *)b;
    *len = n;
    return TS_OK;
}

static int ts_float(ts_reader *r, double *out)
{
    const uint8_t *b;
    int e = ts_take(r, 1, &b);
    if (e)
        return e;
    if (b[0] == 0xcb) { /* float 64, what tickscore writes */
        if ((e = ts_take(r, 8, &b)))
            return e;
        uint64_t v = ts_be(b, 8);
        memcpy(out, &v, 8);
    } else if (b[0] == 0xca) { /* float 32, accepted as MessagePack allows it */
        if ((e = ts_take(r, 4, &b)))
            return e;
        uint32_t v = (uint32_t)ts_be(b, 4);
        float f;
        memcpy(&f, &v, 4);
        *out = f;
    } else {
        return TS_ERR_TYPE;
    }
    return TS_OK;
}

/* Decode the Score payload p[0:n] into *s; return TS_OK or a TS_ERR_* code. */
static int ts_decode_score(const uint8_t *p, size_t n, ts_score *s)
{
    ts_reader r = {p, p + n};
    const uint8_t *b;
    int e = ts_take(&r, 1, &b);
    if (e)
        return e;
    uint64_t count;
    if (b[0] >= 0x90 && b[0] <= 0x9f) {
        count = b[0] & 0x0f;
    } else if (b[0] == 0xdc || b[0] == 0xdd) { /* array 16, 32 */
        unsigned w = b[0] == 0xdc ? 2 : 4;
        if ((e = ts_take(&r, w, &b)))
            return e;
        count = ts_be(b, w);
    } else {
        return TS_ERR_NOT_ARRAY;
    }
    uint64_t schema;
    if (count == 0)
        return TS_ERR_LENGTH;
    if ((e = ts_uint(&r, &schema)))
        return e == TS_ERR_TRUNCATED ? e : TS_ERR_SCHEMA;
    if (schema != 3 && schema != 2)
        return TS_ERR_SCHEMA;
    if (count != (schema == 3 ? 11 : 9))
        return TS_ERR_LENGTH;
    s->schema = (unsigned)schema;
    s->shard = s->epoch = 0;
    if ((e = ts_str(&r, &s->instrument, &s->instrument_len)) || (e = ts_uint(&r, &s->seq)) ||
        (e = ts_int64(&r, &s->ts_event_ns)) || (e = ts_int64(&r, &s->ts_in_ns)) ||
        (e = ts_int64(&r, &s->ts_out_ns)) || (e = ts_float(&r, &s->score)) ||
        (e = ts_str(&r, &s->model_version, &s->model_version_len)) || (e = ts_uint(&r, &s->flags)))
        return e;
    if (schema == 3 && ((e = ts_uint(&r, &s->shard)) || (e = ts_uint(&r, &s->epoch))))
        return e;
    return r.p == r.end ? TS_OK : TS_ERR_TRAILING;
}

static void ts_print_hex(const char *s, size_t n)
{
    if (n == 0)
        fputs("-", stdout);
    for (size_t k = 0; k < n; k++)
        printf("%02x", (uint8_t)s[k]);
}

/* The machine-readable line of one decoded payload (see the header comment). */
static void ts_print_record(int e, const ts_score *s)
{
    if (e) {
        printf("err %d %s\n", e, ts_error_name(e));
        return;
    }
    uint64_t bits;
    memcpy(&bits, &s->score, 8);
    printf("ok %u ", s->schema);
    ts_print_hex(s->instrument, s->instrument_len);
    printf(" %" PRIu64 " %" PRId64 " %" PRId64 " %" PRId64 " %016" PRIx64 " ", s->seq, s->ts_event_ns,
           s->ts_in_ns, s->ts_out_ns, bits);
    ts_print_hex(s->model_version, s->model_version_len);
    printf(" %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", s->flags, s->shard, s->epoch);
}

#ifndef TS_WITH_ZMQ
/* Decoder only: records from stdin (uint32 little-endian length, payload), one line each. */
int main(void)
{
    uint8_t h[4];
    while (fread(h, 1, 4, stdin) == 4) {
        size_t n = (size_t)h[0] | (size_t)h[1] << 8 | (size_t)h[2] << 16 | (size_t)h[3] << 24;
        /* each payload in a buffer of exactly its size: under AddressSanitizer, a read past
           its end is an error, not a look at the next record */
        uint8_t *buf = malloc(n ? n : 1);
        if (!buf || fread(buf, 1, n, stdin) != n) {
            fprintf(stderr, "score_decode: bad record (length %zu)\n", n);
            return 2;
        }
        ts_score s;
        ts_print_record(ts_decode_score(buf, n, &s), &s);
        free(buf);
    }
    return 0;
}
#else
#include <zmq.h>

#define MAX_SHARDS 256

int main(int argc, char **argv)
{
    uint64_t want = 0;
    int quiet = 0, machine = 0, idle_s = 5;
    int a = 1;
    for (; a < argc && argv[a][0] == '-'; a++) {
        if (!strcmp(argv[a], "-q"))
            quiet = 1;
        else if (!strcmp(argv[a], "-x"))
            machine = 1;
        else if (!strcmp(argv[a], "-n") && a + 1 < argc)
            want = strtoull(argv[++a], NULL, 10);
        else if (!strcmp(argv[a], "-t") && a + 1 < argc)
            idle_s = atoi(argv[++a]);
        else
            break;
    }
    if (a != argc - 1) {
        fprintf(stderr, "usage: %s [-q] [-x] [-n COUNT] [-t IDLE_S] ENDPOINT\n", argv[0]);
        return 2;
    }
    void *ctx = zmq_ctx_new();
    void *sock = zmq_socket(ctx, ZMQ_SUB);
    int zero = 0, wait_ms = 120000;
    zmq_setsockopt(sock, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(sock, ZMQ_SUBSCRIBE, "", 0);
    zmq_setsockopt(sock, ZMQ_RCVTIMEO, &wait_ms, sizeof wait_ms); /* until the first message */
    if (zmq_connect(sock, argv[a]) != 0) {
        fprintf(stderr, "score_sub: cannot connect to %s: %s\n", argv[a], zmq_strerror(zmq_errno()));
        return 1;
    }
    fprintf(stderr, "score_sub: subscribed to %s\n", argv[a]);
    fflush(stderr);
    static uint8_t topic[256], payload[4096];
    uint64_t got = 0, malformed = 0, topic_bad = 0, gaps = 0, missing = 0, restarts = 0;
    uint64_t next_seq[MAX_SHARDS] = {0}, epoch[MAX_SHARDS] = {0};
    unsigned char seen[MAX_SHARDS] = {0};
    while (!want || got < want) {
        int tn = zmq_recv(sock, topic, sizeof topic, 0);
        if (tn < 0) {
            if (zmq_errno() == EAGAIN)
                break; /* no message for the timeout */
            fprintf(stderr, "score_sub: zmq_recv: %s\n", zmq_strerror(zmq_errno()));
            return 1;
        }
        if (got + malformed == 0) {
            int idle_ms = idle_s * 1000;
            zmq_setsockopt(sock, ZMQ_RCVTIMEO, &idle_ms, sizeof idle_ms);
        }
        int more = 0;
        size_t more_len = sizeof more;
        zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &more_len);
        if (!more) { /* a Score message is exactly [topic, payload] */
            malformed++;
            continue;
        }
        int pn = zmq_recv(sock, payload, sizeof payload, 0);
        zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &more_len);
        while (more) { /* more than two frames: drain them, count the message as malformed */
            char skip[64];
            zmq_recv(sock, skip, sizeof skip, 0);
            zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &more_len);
            pn = -1;
        }
        ts_score s;
        int e = pn < 0 || (size_t)pn > sizeof payload ? TS_ERR_TRUNCATED : ts_decode_score(payload, (size_t)pn, &s);
        if (e) {
            malformed++;
            if (machine)
                ts_print_record(e, &s);
            continue;
        }
        got++;
        if ((size_t)tn != s.instrument_len || memcmp(topic, s.instrument, s.instrument_len))
            topic_bad++;
        if (s.shard < MAX_SHARDS) {
            unsigned k = (unsigned)s.shard;
            if (seen[k] && s.epoch != epoch[k]) {
                restarts++;
            } else if (seen[k] && s.seq != next_seq[k]) {
                gaps++;
                if (s.seq > next_seq[k])
                    missing += s.seq - next_seq[k];
            }
            seen[k] = 1, epoch[k] = s.epoch, next_seq[k] = s.seq + 1;
        }
        if (machine)
            ts_print_record(TS_OK, &s);
        else if (!quiet)
            printf("%.*s seq=%" PRIu64 " score=%.6f flags=%" PRIu64 " shard=%" PRIu64 " model=%.*s service_ns=%" PRId64
                   "\n",
                   (int)s.instrument_len, s.instrument, s.seq, s.score, s.flags, s.shard,
                   (int)s.model_version_len, s.model_version, s.ts_out_ns - s.ts_in_ns);
    }
    fflush(stdout);
    fprintf(stderr,
            "score_sub: %" PRIu64 " scores, %" PRIu64 " gaps (%" PRIu64 " missing), %" PRIu64 " restarts, %" PRIu64
            " malformed, %" PRIu64 " topic mismatches\n",
            got, gaps, missing, restarts, malformed, topic_bad);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return 0;
}
#endif
