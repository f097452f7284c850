/* fuzz_codec.c: libFuzzer target for the stored form of a blob part
 * (tiers/codec.c): the LZ4 decoder on hostile streams, and encode -> decode
 * round trips.
 *
 * Input: byte 0 selects the mode and the kind (bit 7: round trip; kind =
 * low bits % 3), bytes 1..4 a little-endian u32, byte 5 the seed of the
 * read and write sizes, the rest the payload.
 *  - decode: the payload is a stored stream claimed to hold (u32 % 8 MiB)
 *    raw bytes. It is read through a source giving short reads (and, for
 *    some seeds, -EIO at one read) into buffers of varying sizes. The codec's
 *    contract (codec.h) is asserted: never more than raw_size bytes out, 0
 *    (the end) only after exactly raw_size, every error KVTIER_E_CORRUPT or
 *    the source's own, and sticky.
 *  - round trip: the payload, repeated to (u32 % (1 MiB + 64 KiB + 1)) bytes when that is
 *    longer (frames of 1 MiB need more than libFuzzer's inputs), is encoded
 *    in writes of varying sizes and decoded back: the bytes and the counts
 *    must be equal.
 * A broken contract abort()s (a crash for libFuzzer); ASan and UBSan
 * findings stop the run too (-fno-sanitize-recover).
 *
 * KVTIER_FUZZ_SEEDS=DIR writes seed inputs (encoded streams of both LZ4
 * kinds around the frame boundaries, and round trip inputs) into DIR and
 * exits: scripts/fuzz seeds the corpus with them. fuzz_canary.h plants the
 * bug scripts/fuzz proves a crash with. Build and run: scripts/fuzz codec.
 */
#include "codec.h"
#include "kvtier.h"
#include "fuzz_canary.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MODE_ROUND_TRIP 0x80
#define HEAD 6
#define MAX_DECODE_RAW (8u << 20)
#define MAX_ROUND_TRIP (CODEC_FRAME_RAW + 65537) /* across one frame boundary */

struct rng {
	uint64_t s;
};

static uint32_t rng_next(struct rng *r)
{
	r->s = r->s * 6364136223846793005ull + 1442695040888963407ull;
	return (uint32_t)(r->s >> 33);
}

struct src {
	const uint8_t *p;
	size_t len, pos;
	struct rng *rng;
	unsigned fail_at; /* > 0: that call (1-based) returns -EIO */
	unsigned calls;
};

static ssize_t src_read(void *ctx, void *buf, size_t len)
{
	struct src *s = ctx;
	size_t n = s->len - s->pos;

	s->calls++;
	if (s->fail_at && s->calls == s->fail_at)
		return -EIO;
	if (n > len)
		n = len;
	if (!n) /* end of input; s->p is NULL for an empty round trip */
		return 0;
	if (n > 1 && rng_next(s->rng) % 3 == 0)
		n = 1 + rng_next(s->rng) % n; /* a short read */
	memcpy(buf, s->p + s->pos, n);
	s->pos += n;
	return (ssize_t)n;
}

static void broken(const char *what, long long a, long long b)
{
	fprintf(stderr, "fuzz_codec: contract broken: %s (%lld, %lld)\n", what, a, b);
	abort();
}

/* Decodes `len` stored bytes of `kind` claimed to hold raw_size bytes; when
 * want is not NULL the decode must succeed and equal want. Returns 0 or the
 * decoder's error. */
static int decode(int kind, uint64_t raw_size, const uint8_t *p, size_t len, struct rng *rng,
		  unsigned fail_at, const uint8_t *want)
{
	static uint8_t *buf; /* one 2 MiB buffer for the whole run: a fresh one per
			      * input costs ASan an mmap, page faults and an munmap */
	struct src s = { p, len, 0, rng, fail_at, 0 };
	struct codec_dec *d = NULL;
	uint64_t got = 0;
	size_t cap = 2 * CODEC_FRAME_RAW + 7;
	ssize_t r = 0;
	int rounds = 0;

	if (!buf)
		buf = malloc(cap);
	if (!buf || codec_dec_new(kind, raw_size, src_read, &s, &d) != 0)
		broken("decoder setup", kind, (long long)raw_size);
	for (;;) {
		size_t n = rng_next(rng) % 4 == 0 ? cap : 1 + rng_next(rng) % 70000;
		r = codec_dec_read(d, buf, n);
		if (r < 0)
			break;
		if ((size_t)r > n)
			broken("returned more than asked", r, (long long)n);
		if (r == 0)
			break;
		if (want && memcmp(buf, want + got, (size_t)r) != 0)
			broken("round trip bytes differ at", (long long)got, r);
		got += (uint64_t)r;
		if (got > raw_size)
			broken("more raw bytes than raw_size", (long long)got, (long long)raw_size);
		if (++rounds > 1000000)
			broken("no end after a million reads", (long long)got, (long long)raw_size);
	}
	if (r == 0 && got != raw_size)
		broken("end before raw_size bytes", (long long)got, (long long)raw_size);
	if (r < 0) {
		if (r != KVTIER_E_CORRUPT && !(fail_at && r == -EIO))
			broken("error is KVTIER_E_CORRUPT or the source's", r, 0);
		if (codec_dec_read(d, buf, 1) != r)
			broken("errors are sticky", r, 0);
	}
	if (want && r != 0)
		broken("round trip decode failed", r, (long long)got);
	codec_dec_free(d);
	return r < 0 ? (int)r : 0;
}

struct sink {
	uint8_t *p;
	size_t len, cap;
};

static int sink_emit(void *ctx, const void *buf, size_t len)
{
	struct sink *k = ctx;

	if (k->cap - k->len < len) {
		size_t cap = (k->cap + len) * 2;
		uint8_t *np = realloc(k->p, cap);
		if (!np)
			return -ENOMEM;
		k->p = np;
		k->cap = cap;
	}
	memcpy(k->p + k->len, buf, len);
	k->len += len;
	return 0;
}

/* Encodes raw (n bytes) as kind in writes of varying sizes into *out. */
static void encode(int kind, const uint8_t *raw, size_t n, struct rng *rng, struct sink *out)
{
	struct codec_enc *e = NULL;
	size_t at = 0;

	if (codec_enc_new(kind, &e) != 0)
		broken("encoder setup", kind, 0);
	while (at < n) {
		size_t w = rng_next(rng) % 4 == 0 ? n - at : 1 + rng_next(rng) % 300000;
		if (w > n - at)
			w = n - at;
		if (codec_enc_write(e, raw + at, w, sink_emit, out) != 0)
			broken("encoder write", (long long)at, (long long)w);
		at += w;
	}
	if (codec_enc_finish(e, sink_emit, out) != 0)
		broken("encoder finish", (long long)n, 0);
	if (codec_enc_raw_bytes(e) != n || codec_enc_out_bytes(e) != out->len)
		broken("encoder counts", (long long)codec_enc_raw_bytes(e), (long long)n);
	codec_enc_free(e);
}

static void round_trip(int kind, uint32_t want_len, const uint8_t *p, size_t len,
		       struct rng *rng)
{
	static uint8_t *raw; /* MAX_ROUND_TRIP bytes for the whole run (see decode) */
	struct sink out = { NULL, 0, 0 };
	size_t n = len, i;

	if (len && want_len % MAX_ROUND_TRIP > len)
		n = want_len % MAX_ROUND_TRIP;
	if (n > MAX_ROUND_TRIP)
		return; /* libFuzzer's -max_len keeps inputs far below this */
	if (!raw)
		raw = malloc(MAX_ROUND_TRIP);
	if (!raw)
		broken("out of memory", (long long)n, 0);
	for (i = 0; i < n; i += len)
		memcpy(raw + i, p, n - i < len ? n - i : len);
	encode(kind, raw, n, rng, &out);
	if (kind == CODEC_RAW && (out.len != n || (n && memcmp(out.p, raw, n) != 0)))
		broken("raw kind passes bytes through", (long long)out.len, (long long)n);
	decode(kind, n, out.p, out.len, rng, 0, raw);
	free(out.p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct rng rng;
	uint32_t u32;
	int kind;

	if (fuzz_canary(data, size) || size < HEAD)
		return 0;
	kind = (data[0] & 0x7f) % 3;
	u32 = (uint32_t)data[1] | (uint32_t)data[2] << 8 | (uint32_t)data[3] << 16 |
	      (uint32_t)data[4] << 24;
	rng.s = data[5] * 0x9e3779b97f4a7c15ull + size;
	if (data[0] & MODE_ROUND_TRIP) {
		round_trip(kind, u32, data + HEAD, size - HEAD, &rng);
	} else {
		unsigned fail_at = data[5] % 8 == 7 ? 1 + data[5] / 8 : 0;
		decode(kind, u32 % MAX_DECODE_RAW, data + HEAD, size - HEAD, &rng, fail_at, NULL);
	}
	return 0;
}

/* ---- seeds (KVTIER_FUZZ_SEEDS=DIR) ---- */

static void seed_write(const char *dir, const char *name, uint8_t mode, uint32_t u32,
		       const uint8_t *p, size_t len)
{
	char path[4096];
	uint8_t head[HEAD] = { mode, (uint8_t)u32, (uint8_t)(u32 >> 8), (uint8_t)(u32 >> 16),
			       (uint8_t)(u32 >> 24), 1 };
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "wb");
	if (!f || fwrite(head, 1, HEAD, f) != HEAD || (len && fwrite(p, 1, len, f) != len) ||
	    fclose(f) != 0) {
		fprintf(stderr, "fuzz_codec: cannot write seed %s\n", path);
		exit(1);
	}
}

static void write_seeds(const char *dir)
{
	static const size_t sizes[] = { 0, 1, 100, 65536 + 3, CODEC_FRAME_RAW,
					CODEC_FRAME_RAW + 17 };
	struct rng rng = { 42 };
	size_t max = CODEC_FRAME_RAW + 17, i, s;
	uint8_t *raw = malloc(max);
	char name[64];
	int kind;

	if (!raw)
		exit(1);
	for (i = 0; i < max; i++) /* f16-like and compressible: small seeds */
		raw[i] = (i & 1) ? (uint8_t)(0x3c + (i >> 18)) : (uint8_t)(i >> 7);
	for (kind = CODEC_RAW; kind <= CODEC_LZ4_SHUFFLE; kind++) {
		for (s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
			struct sink out = { NULL, 0, 0 };
			if (kind == CODEC_RAW && sizes[s] > 65536)
				continue; /* stored as is: 1 MiB seeds would slow every run */
			encode(kind, raw, sizes[s], &rng, &out);
			snprintf(name, sizeof(name), "dec-%s-%zu", codec_name(kind), sizes[s]);
			seed_write(dir, name, (uint8_t)kind, (uint32_t)sizes[s], out.p, out.len);
			free(out.p);
		}
		snprintf(name, sizeof(name), "rt-%s", codec_name(kind));
		seed_write(dir, name, (uint8_t)(MODE_ROUND_TRIP | kind),
			   (uint32_t)CODEC_FRAME_RAW + 5, raw, 4096);
	}
	free(raw);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const char *dir = getenv("KVTIER_FUZZ_SEEDS");

	fuzz_canary_init();
	if (dir && *dir) {
		write_seeds(dir);
		exit(0);
	}
	return 0;
}
