/* codec.c: the compressed stored form of a blob part (codec.h).
 *
 * The encoder stages raw bytes until a frame of CODEC_FRAME_RAW is complete
 * (a whole frame already in the caller's buffer is encoded from there),
 * shuffles it when asked, and compresses it with a reused LZ4F context into
 * one frame: content size set, one independent block whose maximum size is
 * the smallest LZ4F size that holds the frame, autoFlush so LZ4F never copies
 * the input, no checksums.
 *
 * The decoder pulls from the caller's read callback exactly what LZ4F says it
 * needs next (a frame header, then a compressed block and the end mark), so
 * a block is decompressed straight from the input buffer, and straight into
 * the caller's buffer when that has room for a block (plain LZ4) or into one
 * frame buffer that is unshuffled into the caller's buffer (shuffle). It
 * checks each frame header before LZ4F allocates anything for it and counts
 * every output byte against the frame's expected size, so a hostile stream
 * can neither make it write out of bounds nor make it allocate more than
 * a 1 MiB block's buffers.
 *
 * This module must never depend on the rest of kvtier beyond the error codes
 * of kvtier.h, never hold more than a few frames, and never return bytes
 * past raw_size.
 */
#include "codec.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <lz4frame.h>

#include "kvtier.h"

/* LZ4F compression level: 0, 1 and 2 are the same fast mode (acceleration
 * 1); a negative level trades ratio for speed (acceleration 1 - level); 3 and
 * up are LZ4HC, far slower. Overridable at build time for measurements. */
#ifndef CODEC_LZ4_LEVEL
#define CODEC_LZ4_LEVEL 0
#endif

#define CODEC_HEADER_SIZE 15 /* magic, FLG, BD, 8-byte content size, HC: what we write */
/* Read at the start of a frame: its header and the block header. Every frame
 * the encoder writes is longer (a 1-byte block and the end mark follow), so
 * this never reads past the end of a valid stream. */
#define CODEC_FRAME_START (CODEC_HEADER_SIZE + LZ4F_BLOCK_HEADER_SIZE)
#define CODEC_SHUFFLE_BLOCK 64 /* fixed inner trip count: lets gcc -O2 vectorize */
#define CODEC_SCRATCH 64       /* dst for driving a frame to its end mark */

struct codec_enc {
	int kind;
	int state;       /* 0 open, 1 finished, < 0 the error that stopped it */
	LZ4F_cctx *cctx; /* reused for every frame */
	LZ4F_preferences_t prefs;
	uint8_t *stage; /* partial frame not yet encoded (fill bytes) */
	size_t fill;
	uint8_t *shuf;      /* one shuffled frame (CODEC_LZ4_SHUFFLE) */
	uint8_t *out;       /* one encoded frame */
	size_t out_cap;     /* codec_frame_bound(CODEC_FRAME_RAW) */
	uint64_t raw_bytes; /* taken from the caller */
	uint64_t out_bytes; /* given to emit */
};

struct codec_dec {
	int kind;
	int err;    /* sticky error, 0 while healthy */
	int at_end; /* the end of the stream was verified */
	codec_read_fn read;
	void *ctx;
	uint64_t raw_size;
	uint64_t done;    /* raw bytes returned to the caller */
	uint64_t decoded; /* raw bytes out of LZ4F, frames begun included */
	LZ4F_dctx *dctx;
	size_t hint; /* input LZ4F expects next; 0 between frames */
	uint8_t *in; /* encoded bytes read, in[in_pos..in_end) unconsumed */
	size_t in_cap, in_pos, in_end;
	int in_frame;      /* a frame header was taken, its end mark not yet */
	size_t frame_size; /* raw bytes of the current frame */
	size_t frame_out;  /* bytes of it out of LZ4F so far */
	uint8_t *frame;    /* CODEC_LZ4_SHUFFLE: the decoded (shuffled) frame */
	size_t frame_pos;  /* bytes of it returned to the caller */
};

const char *codec_name(int kind)
{
	switch (kind) {
	case CODEC_RAW:
		return "none";
	case CODEC_LZ4:
		return "lz4";
	case CODEC_LZ4_SHUFFLE:
		return "lz4+shuffle";
	}
	return "unknown";
}

/* The smallest LZ4F block size holding n bytes, so a frame is one block and
 * the decoder's LZ4F buffers are no larger than the frame needs. */
static LZ4F_blockSizeID_t codec_block_id(size_t n)
{
	if (n <= (64u << 10))
		return LZ4F_max64KB;
	if (n <= (256u << 10))
		return LZ4F_max256KB;
	return LZ4F_max1MB;
}

static void codec_prefs(LZ4F_preferences_t *p, size_t n)
{
	memset(p, 0, sizeof(*p));
	p->frameInfo.blockSizeID = codec_block_id(n);
	p->frameInfo.blockMode = LZ4F_blockIndependent;
	p->frameInfo.contentChecksumFlag = LZ4F_noContentChecksum;
	p->frameInfo.blockChecksumFlag = LZ4F_noBlockChecksum;
	p->frameInfo.frameType = LZ4F_frame;
	p->frameInfo.contentSize = n;
	p->compressionLevel = CODEC_LZ4_LEVEL;
	p->autoFlush = 1;
}

size_t codec_frame_bound(size_t n)
{
	LZ4F_preferences_t p;

	codec_prefs(&p, n);
	return LZ4F_compressFrameBound(n, &p);
}

/* ---- shuffle ---- */

/* Splits pairs: lo[i] = s[2i], hi[i] = s[2i + 1] for i < pairs. Separate
 * restrict parameters: gcc needs them to vectorize without alias checks. */
static void codec_deinterleave(uint8_t *restrict lo, uint8_t *restrict hi,
                               const uint8_t *restrict s, size_t pairs)
{
	size_t i = 0;

	for (; i + CODEC_SHUFFLE_BLOCK <= pairs; i += CODEC_SHUFFLE_BLOCK) {
		const uint8_t *restrict sb = s + 2 * i;
		uint8_t *restrict lb = lo + i, *restrict hb = hi + i;

		for (size_t k = 0; k < CODEC_SHUFFLE_BLOCK; k++) {
			lb[k] = sb[2 * k];
			hb[k] = sb[2 * k + 1];
		}
	}
	/* A walking pointer, not s[2 * i]: gcc -O3 warns that 2 * i could wrap. */
	for (const uint8_t *sp = s + 2 * i; i < pairs; i++, sp += 2) {
		lo[i] = sp[0];
		hi[i] = sp[1];
	}
}

void codec_shuffle(void *dst, const void *src, size_t n)
{
	uint8_t *d = dst;
	const uint8_t *s = src;

	codec_deinterleave(d, d + n / 2, s, n / 2);
	if (n & 1)
		d[n - 1] = s[n - 1];
}

/* Interleaves pairs: d[2i] = lo[i], d[2i + 1] = hi[i] for i < pairs. */
static void codec_interleave(uint8_t *restrict d, const uint8_t *restrict lo,
                             const uint8_t *restrict hi, size_t pairs)
{
	size_t i = 0;

	for (; i + CODEC_SHUFFLE_BLOCK <= pairs; i += CODEC_SHUFFLE_BLOCK) {
		uint8_t *restrict db = d + 2 * i;
		const uint8_t *restrict lb = lo + i, *restrict hb = hi + i;

		for (size_t k = 0; k < CODEC_SHUFFLE_BLOCK; k++) {
			db[2 * k] = lb[k];
			db[2 * k + 1] = hb[k];
		}
	}
	for (uint8_t *dp = d + 2 * i; i < pairs; i++, dp += 2) {
		dp[0] = lo[i];
		dp[1] = hi[i];
	}
}

/* Writes raw bytes [pos, pos + len) of a frame of n bytes whose shuffled
 * form is s into dst. */
static void codec_unshuffle_range(uint8_t *dst, const uint8_t *s, size_t n, size_t pos, size_t len)
{
	size_t h = n / 2, end = pos + len, pairs;

	if (pos < end && pos < 2 * h && (pos & 1)) {
		*dst++ = s[h + pos / 2];
		pos++;
	}
	pairs = ((end < 2 * h ? end : 2 * h) - (pos < 2 * h ? pos : 2 * h)) / 2;
	codec_interleave(dst, s + pos / 2, s + h + pos / 2, pairs);
	dst += 2 * pairs;
	pos += 2 * pairs;
	if (pos < end && pos < 2 * h) {
		*dst++ = s[pos / 2]; /* even: a low byte; its high byte is past end */
		pos++;
	}
	if (pos < end) /* pos == n - 1, n odd */
		*dst = s[n - 1];
}

void codec_unshuffle(void *dst, const void *src, size_t n)
{
	codec_unshuffle_range(dst, src, n, 0, n);
}

/* ---- encoder ---- */

int codec_enc_new(int kind, struct codec_enc **out)
{
	struct codec_enc *e;
	int rc = -ENOMEM;

	*out = NULL;
	if (kind != CODEC_RAW && kind != CODEC_LZ4 && kind != CODEC_LZ4_SHUFFLE)
		return KVTIER_E_INVALID;
	e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->kind = kind;
	if (kind == CODEC_RAW)
		goto done;
	if (LZ4F_isError(LZ4F_createCompressionContext(&e->cctx, LZ4F_VERSION)))
		goto out;
	e->out_cap = codec_frame_bound(CODEC_FRAME_RAW);
	e->stage = malloc(CODEC_FRAME_RAW);
	e->out = malloc(e->out_cap);
	if (!e->stage || !e->out)
		goto out;
	if (kind == CODEC_LZ4_SHUFFLE) {
		e->shuf = malloc(CODEC_FRAME_RAW);
		if (!e->shuf)
			goto out;
	}
done:
	*out = e;
	e = NULL;
	rc = 0;
out:
	codec_enc_free(e);
	return rc;
}

/* Encodes the n raw bytes at src (1 <= n <= CODEC_FRAME_RAW) as one frame
 * and emits it. */
static int codec_enc_frame(struct codec_enc *e, const uint8_t *src, size_t n, codec_emit_fn emit,
                           void *ctx)
{
	size_t len, r;
	int rc;

	if (e->kind == CODEC_LZ4_SHUFFLE) {
		codec_shuffle(e->shuf, src, n);
		src = e->shuf;
	}
	codec_prefs(&e->prefs, n);
	r = LZ4F_compressBegin(e->cctx, e->out, e->out_cap, &e->prefs);
	if (LZ4F_isError(r))
		return KVTIER_E_INTERNAL;
	len = r;
	r = LZ4F_compressUpdate(e->cctx, e->out + len, e->out_cap - len, src, n, NULL);
	if (LZ4F_isError(r))
		return KVTIER_E_INTERNAL;
	len += r;
	r = LZ4F_compressEnd(e->cctx, e->out + len, e->out_cap - len, NULL);
	if (LZ4F_isError(r))
		return KVTIER_E_INTERNAL;
	len += r;
	rc = emit(ctx, e->out, len);
	if (rc < 0)
		return rc;
	e->out_bytes += len;
	return 0;
}

int codec_enc_write(struct codec_enc *e, const void *buf, size_t len, codec_emit_fn emit, void *ctx)
{
	const uint8_t *p = buf;
	int rc = 0;

	if (e->state)
		return e->state < 0 ? e->state : KVTIER_E_INVALID;
	if (!emit || (!buf && len))
		return KVTIER_E_INVALID;
	if (e->kind == CODEC_RAW) {
		if (len) {
			rc = emit(ctx, buf, len);
			if (rc < 0)
				goto out;
		}
		e->raw_bytes += len;
		e->out_bytes += len;
		goto out;
	}
	while (len > 0) {
		size_t take;

		if (e->fill == 0 && len >= CODEC_FRAME_RAW) {
			rc = codec_enc_frame(e, p, CODEC_FRAME_RAW, emit, ctx);
			if (rc < 0)
				goto out;
			p += CODEC_FRAME_RAW;
			len -= CODEC_FRAME_RAW;
			e->raw_bytes += CODEC_FRAME_RAW;
			continue;
		}
		take = CODEC_FRAME_RAW - e->fill;
		if (take > len)
			take = len;
		memcpy(e->stage + e->fill, p, take);
		e->fill += take;
		e->raw_bytes += take;
		p += take;
		len -= take;
		if (e->fill == CODEC_FRAME_RAW) {
			e->fill = 0;
			rc = codec_enc_frame(e, e->stage, CODEC_FRAME_RAW, emit, ctx);
			if (rc < 0)
				goto out;
		}
	}
out:
	if (rc < 0)
		e->state = rc;
	return rc;
}

int codec_enc_finish(struct codec_enc *e, codec_emit_fn emit, void *ctx)
{
	int rc = 0;

	if (e->state)
		return e->state < 0 ? e->state : KVTIER_E_INVALID;
	if (!emit)
		return KVTIER_E_INVALID;
	if (e->fill > 0) {
		rc = codec_enc_frame(e, e->stage, e->fill, emit, ctx);
		e->fill = 0;
	}
	e->state = rc < 0 ? rc : 1;
	return rc;
}

uint64_t codec_enc_raw_bytes(const struct codec_enc *e)
{
	return e->raw_bytes;
}

uint64_t codec_enc_out_bytes(const struct codec_enc *e)
{
	return e->out_bytes;
}

void codec_enc_free(struct codec_enc *e)
{
	if (!e)
		return;
	LZ4F_freeCompressionContext(e->cctx); /* NULL is fine */
	free(e->stage);
	free(e->shuf);
	free(e->out);
	free(e);
}

/* ---- decoder ---- */

int codec_dec_new(int kind, uint64_t raw_size, codec_read_fn read, void *ctx,
                  struct codec_dec **out)
{
	struct codec_dec *d;
	int rc = -ENOMEM;

	*out = NULL;
	if ((kind != CODEC_RAW && kind != CODEC_LZ4 && kind != CODEC_LZ4_SHUFFLE) || !read)
		return KVTIER_E_INVALID;
	d = calloc(1, sizeof(*d));
	if (!d)
		return -ENOMEM;
	d->kind = kind;
	d->read = read;
	d->ctx = ctx;
	d->raw_size = raw_size;
	if (kind == CODEC_RAW)
		goto done;
	if (LZ4F_isError(LZ4F_createDecompressionContext(&d->dctx, LZ4F_VERSION)))
		goto out;
	/* A whole compressed block, its header and the end mark fit. */
	d->in_cap = codec_frame_bound(CODEC_FRAME_RAW);
	d->in = malloc(d->in_cap);
	if (!d->in)
		goto out;
	if (kind == CODEC_LZ4_SHUFFLE) {
		d->frame = malloc(CODEC_FRAME_RAW);
		if (!d->frame)
			goto out;
	}
done:
	*out = d;
	d = NULL;
	rc = 0;
out:
	codec_dec_free(d);
	return rc;
}

void codec_dec_free(struct codec_dec *d)
{
	if (!d)
		return;
	if (d->dctx)
		LZ4F_freeDecompressionContext(d->dctx);
	free(d->in);
	free(d->frame);
	free(d);
}

/* Calls the read callback until len bytes are in buf or it reports the end.
 * Returns the count (< len only at the end) or its error. */
static ssize_t codec_dec_pull(struct codec_dec *d, void *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t r = d->read(d->ctx, (uint8_t *)buf + got, len - got);

		if (r < 0)
			return r;
		if (r == 0)
			break;
		if ((size_t)r > len - got)
			return KVTIER_E_INTERNAL; /* the callback overran our buffer */
		got += (size_t)r;
	}
	return (ssize_t)got;
}

/* Appends up to `want` bytes (at least 1) to the input buffer, moving the
 * unconsumed bytes to its start when the tail is too short. Returns the
 * count, KVTIER_E_CORRUPT at the end of the stream (a frame is unfinished),
 * or the read error. */
static ssize_t codec_dec_fill(struct codec_dec *d, size_t want)
{
	ssize_t r;

	if (want == 0)
		want = 1;
	if (d->in_pos == d->in_end) {
		d->in_pos = 0;
		d->in_end = 0;
	}
	if (want > d->in_cap - d->in_end && d->in_pos > 0) {
		memmove(d->in, d->in + d->in_pos, d->in_end - d->in_pos);
		d->in_end -= d->in_pos;
		d->in_pos = 0;
	}
	if (want > d->in_cap - d->in_end)
		want = d->in_cap - d->in_end;
	if (want == 0)
		return KVTIER_E_INTERNAL; /* callers never ask with a full buffer */
	r = codec_dec_pull(d, d->in + d->in_end, want);
	if (r < 0)
		return r;
	if (r == 0)
		return KVTIER_E_CORRUPT; /* truncated */
	d->in_end += (size_t)r;
	return r;
}

/* Makes at least `need` (<= in_cap) unconsumed input bytes available. */
static int codec_dec_need(struct codec_dec *d, size_t need)
{
	while (d->in_end - d->in_pos < need) {
		ssize_t r = codec_dec_fill(d, need - (d->in_end - d->in_pos));

		if (r < 0)
			return (int)r;
	}
	return 0;
}

/* Takes the header of the next frame, which must hold exactly the next
 * min(CODEC_FRAME_RAW, raw bytes left) bytes. */
static int codec_dec_frame_begin(struct codec_dec *d)
{
	uint64_t left = d->raw_size - d->decoded;
	LZ4F_frameInfo_t info;
	size_t hsize, used, r;
	int rc;

	rc = codec_dec_need(d, CODEC_FRAME_START);
	if (rc < 0)
		return rc;
	hsize = LZ4F_headerSize(d->in + d->in_pos, d->in_end - d->in_pos);
	if (LZ4F_isError(hsize) || hsize > LZ4F_HEADER_SIZE_MAX)
		return KVTIER_E_CORRUPT;
	rc = codec_dec_need(d, hsize);
	if (rc < 0)
		return rc;
	used = d->in_end - d->in_pos;
	r = LZ4F_getFrameInfo(d->dctx, &info, d->in + d->in_pos, &used);
	if (LZ4F_isError(r))
		return KVTIER_E_CORRUPT;
	d->in_pos += used;
	d->hint = r;
	d->frame_size = left < CODEC_FRAME_RAW ? (size_t)left : CODEC_FRAME_RAW;
	d->frame_out = 0;
	d->in_frame = 1;
	/* Checked before the first LZ4F_decompress(), which sizes its buffers
	 * from the block size: nothing is allocated for a frame refused here. */
	if (info.frameType != LZ4F_frame || info.contentSize != d->frame_size ||
	    info.blockSizeID < LZ4F_max64KB || info.blockSizeID > LZ4F_max1MB)
		return KVTIER_E_CORRUPT;
	return 0;
}

/* One LZ4F_decompress() call on the buffered input (read first when there is
 * none, as much as LZ4F hinted) into dst of cap bytes. Returns the bytes
 * written to dst (0 is fine: input only was consumed), or an error. */
static ssize_t codec_dec_step(struct codec_dec *d, void *dst, size_t cap)
{
	size_t dsz = cap, ssz, r;

	if (d->in_pos == d->in_end) {
		ssize_t n = codec_dec_fill(d, d->hint);

		if (n < 0)
			return n;
	}
	ssz = d->in_end - d->in_pos;
	r = LZ4F_decompress(d->dctx, dst, &dsz, d->in + d->in_pos, &ssz, NULL);
	if (LZ4F_isError(r))
		return KVTIER_E_CORRUPT;
	if (dsz == 0 && ssz == 0 && r != 0)
		return KVTIER_E_CORRUPT; /* no progress: never loop on a stalled stream */
	d->in_pos += ssz;
	d->hint = r;
	return (ssize_t)dsz;
}

/* Decodes the current frame into dst (cap bytes, the rest of the caller's
 * buffer or the frame buffer): returns the bytes of the frame written (> 0),
 * or an error when it yields more or fewer bytes than its content size. */
static ssize_t codec_dec_frame_some(struct codec_dec *d, uint8_t *dst, size_t cap)
{
	for (;;) {
		ssize_t n = codec_dec_step(d, dst, cap);

		if (n < 0)
			return n;
		if ((size_t)n > d->frame_size - d->frame_out)
			return KVTIER_E_CORRUPT; /* more bytes than the header said */
		d->frame_out += (size_t)n;
		d->decoded += (size_t)n;
		if (d->hint == 0 && d->frame_out < d->frame_size)
			return KVTIER_E_CORRUPT; /* the frame ended early */
		if (n > 0)
			return n;
	}
}

/* After the last byte of the current frame: drives LZ4F to the frame's end
 * (the end mark, a checksum if any), which must yield nothing more; then,
 * after the last frame, checks that the stream ends there. */
static int codec_dec_frame_end(struct codec_dec *d)
{
	uint8_t scratch[CODEC_SCRATCH];

	while (d->hint != 0) {
		ssize_t n = codec_dec_step(d, scratch, sizeof(scratch));

		if (n < 0)
			return (int)n;
		if (n > 0)
			return KVTIER_E_CORRUPT;
	}
	d->in_frame = 0;
	return 0;
}

/* The stream must end after the last frame: no buffered byte, and the read
 * callback reports the end. */
static int codec_dec_check_end(struct codec_dec *d)
{
	uint8_t b;
	ssize_t r;

	if (d->in_pos != d->in_end)
		return KVTIER_E_CORRUPT;
	r = codec_dec_pull(d, &b, 1);
	if (r < 0)
		return (int)r;
	if (r > 0)
		return KVTIER_E_CORRUPT; /* trailing bytes */
	d->at_end = 1;
	return 0;
}

static ssize_t codec_dec_read_raw(struct codec_dec *d, uint8_t *buf, size_t len)
{
	uint64_t left = d->raw_size - d->done;
	ssize_t r;
	int rc;

	if (len > left)
		len = (size_t)left;
	r = codec_dec_pull(d, buf, len);
	if (r < 0)
		return r;
	if ((size_t)r < len)
		return KVTIER_E_CORRUPT; /* shorter than raw_size */
	d->done += (size_t)r;
	if (d->done == d->raw_size) {
		rc = codec_dec_check_end(d);
		if (rc < 0)
			return rc;
	}
	return r;
}

static ssize_t codec_dec_read_lz4(struct codec_dec *d, uint8_t *buf, size_t len)
{
	size_t total = 0;
	ssize_t n;
	int rc;

	while (total < len && d->done < d->raw_size) {
		if (!d->in_frame) {
			rc = codec_dec_frame_begin(d);
			if (rc < 0)
				return rc;
		}
		n = codec_dec_frame_some(d, buf + total, len - total);
		if (n < 0)
			return n;
		total += (size_t)n;
		d->done += (size_t)n;
		if (d->frame_out < d->frame_size)
			continue;
		rc = codec_dec_frame_end(d);
		if (rc == 0 && d->done == d->raw_size)
			rc = codec_dec_check_end(d);
		if (rc < 0)
			return rc;
	}
	return (ssize_t)total;
}

static ssize_t codec_dec_read_shuffle(struct codec_dec *d, uint8_t *buf, size_t len)
{
	size_t total = 0, n;
	ssize_t r;
	int rc;

	while (total < len && d->done < d->raw_size) {
		if (d->frame_pos == d->frame_size) {
			/* The whole next frame, then unshuffle from it. */
			rc = codec_dec_frame_begin(d);
			if (rc < 0)
				return rc;
			while (d->frame_out < d->frame_size) {
				r = codec_dec_frame_some(d, d->frame + d->frame_out,
				                         CODEC_FRAME_RAW - d->frame_out);
				if (r < 0)
					return r;
			}
			rc = codec_dec_frame_end(d);
			if (rc == 0 && d->decoded == d->raw_size)
				rc = codec_dec_check_end(d);
			if (rc < 0)
				return rc;
			d->frame_pos = 0;
		}
		n = d->frame_size - d->frame_pos;
		if (n > len - total)
			n = len - total;
		codec_unshuffle_range(buf + total, d->frame, d->frame_size, d->frame_pos, n);
		d->frame_pos += n;
		d->done += n;
		total += n;
	}
	return (ssize_t)total;
}

ssize_t codec_dec_read(struct codec_dec *d, void *buf, size_t len)
{
	ssize_t r;

	if (d->err)
		return d->err;
	if (len > SSIZE_MAX)
		len = SSIZE_MAX;
	if (len == 0 && d->done < d->raw_size)
		return 0;
	if (!buf && len)
		return KVTIER_E_INVALID;
	if (d->done == d->raw_size) {
		/* A part of 0 bytes: nothing was read yet. */
		r = d->at_end ? 0 : codec_dec_check_end(d);
		goto out;
	}
	switch (d->kind) {
	case CODEC_RAW:
		r = codec_dec_read_raw(d, buf, len);
		break;
	case CODEC_LZ4:
		r = codec_dec_read_lz4(d, buf, len);
		break;
	default:
		r = codec_dec_read_shuffle(d, buf, len);
		break;
	}
out:
	if (r < 0)
		d->err = (int)r;
	return r;
}

/* ---- decision ---- */

static int codec_count_emit(void *ctx, const void *buf, size_t len)
{
	(void)buf;
	*(uint64_t *)ctx += len;
	return 0;
}

/* Encoded size of the sample as `kind`, in *size. */
static int codec_try(int kind, const void *sample, size_t n, uint64_t *size)
{
	struct codec_enc *e = NULL;
	int rc;

	*size = 0;
	rc = codec_enc_new(kind, &e);
	if (rc < 0)
		goto out;
	rc = codec_enc_write(e, sample, n, codec_count_emit, size);
	if (rc < 0)
		goto out;
	rc = codec_enc_finish(e, codec_count_emit, size);
out:
	codec_enc_free(e);
	return rc;
}

int codec_choose(const void *sample, size_t n, double min_saving, int shuffle_mode, int *kind,
                 double *ratio)
{
	uint64_t plain = 0, shuf = 0, best;
	int best_kind, rc = 0;

	if (!kind || (!sample && n) || isnan(min_saving) ||
	    (shuffle_mode != CODEC_SHUFFLE_NEVER && shuffle_mode != CODEC_SHUFFLE_ALWAYS &&
	     shuffle_mode != CODEC_SHUFFLE_AUTO))
		return KVTIER_E_INVALID;
	*kind = CODEC_RAW;
	if (ratio)
		*ratio = 1.0;
	if (n == 0)
		return 0;
	if (shuffle_mode != CODEC_SHUFFLE_ALWAYS) {
		rc = codec_try(CODEC_LZ4, sample, n, &plain);
		if (rc < 0)
			return rc;
	}
	if (shuffle_mode != CODEC_SHUFFLE_NEVER) {
		rc = codec_try(CODEC_LZ4_SHUFFLE, sample, n, &shuf);
		if (rc < 0)
			return rc;
	}
	if (shuffle_mode == CODEC_SHUFFLE_ALWAYS ||
	    (shuffle_mode == CODEC_SHUFFLE_AUTO && shuf < plain)) {
		best = shuf;
		best_kind = CODEC_LZ4_SHUFFLE;
	} else {
		best = plain;
		best_kind = CODEC_LZ4;
	}
	if (1.0 - (double)best / (double)n < min_saving)
		return 0;
	*kind = best_kind;
	if (ratio)
		*ratio = (double)n / (double)best;
	return 0;
}
