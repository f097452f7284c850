/* codec.h: the compressed stored form of a blob part (disk tier).
 *
 * A part moved to the disk tier is stored either raw (CODEC_RAW: the bytes as
 * they are) or as a plain concatenation of standard LZ4 frames (LZ4F), one
 * frame per CODEC_FRAME_RAW raw bytes, the last frame holding the rest (a
 * part of 0 bytes is stored as 0 bytes, no frame). Every frame has its content
 * size set, one independent block (max block size 1 MiB), no content or block
 * checksum (kvtier checks a CRC-32C of the raw bytes itself), so a fetch
 * decompresses frame by frame as it streams, with a couple of frames of
 * memory, and `lz4 -dc file` prints the stored bytes.
 *
 * CODEC_LZ4_SHUFFLE byte-shuffles each frame before compressing it (f16 KV
 * compresses better): for a frame of n raw bytes, the n/2 low bytes of its
 * 16-bit little-endian values, then their n/2 high bytes, then the odd last
 * byte if n is odd. `lz4 -dc` of such a file prints these shuffled bytes,
 * frame after frame; unshuffle each CODEC_FRAME_RAW-byte piece to get the
 * raw bytes back.
 *
 * The decoder never trusts the stored stream: every frame must carry its
 * content size, which must be exactly CODEC_FRAME_RAW, or the rest of the part
 * for the last frame; the stream must end right after the frame that
 * completes raw_size bytes. LZ4 has no checksum here, so a damaged literal
 * may decode to wrong bytes of the right length: callers must verify the
 * raw bytes' CRC; the codec only guarantees it never writes out of bounds,
 * never allocates more than a few frames, and reports every structural
 * damage it sees as KVTIER_E_CORRUPT.
 *
 * Handles are not thread-safe: one thread at a time per handle. Errors are
 * negative: KVTIER_E_INVALID (bad argument), KVTIER_E_CORRUPT, -ENOMEM, and
 * whatever the caller's callbacks return.
 */
#ifndef KVTIER_CODEC_H
#define KVTIER_CODEC_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

enum codec_kind {
	CODEC_RAW = 0,         /* stored as is */
	CODEC_LZ4 = 1,         /* LZ4 frames */
	CODEC_LZ4_SHUFFLE = 2, /* LZ4 frames of byte-shuffled 16-bit values */
};

#define CODEC_FRAME_RAW (1u << 20) /* raw bytes per frame (the last frame may be shorter) */

/* "none", "lz4", "lz4+shuffle"; "unknown" for anything else. Static. */
const char *codec_name(int kind);

/* Upper bound of the encoded size of one frame of n raw bytes (the encoder
 * writes frames of at most CODEC_FRAME_RAW), header and end mark included. */
size_t codec_frame_bound(size_t n);

/* Writes `len` encoded bytes from buf (valid during the call only).
 * Returns 0 or a negative error, which the encoder returns unchanged. */
typedef int (*codec_emit_fn)(void *ctx, const void *buf, size_t len);

/* ---- encoder: the caller pushes raw bytes, the encoder emits encoded bytes ---- */

struct codec_enc;

/* Creates an encoder for `kind` (CODEC_RAW passes bytes through unchanged).
 * Holds up to three frames of buffers. Returns 0 and *out, KVTIER_E_INVALID
 * for an unknown kind, or -ENOMEM. */
int codec_enc_new(int kind, struct codec_enc **out);

/* Feeds len raw bytes (any sizes, any alignment). Each time a frame is
 * complete it is encoded and emit(ctx, ...) is called once with the whole
 * encoded frame; a whole frame available in buf is encoded without being
 * copied first. Returns 0, KVTIER_E_INVALID (NULL emit, NULL buf with len > 0,
 * or called after codec_enc_finish()), KVTIER_E_INTERNAL if LZ4 fails, or
 * emit's error. An error from LZ4 or emit is sticky: every later call
 * returns it, and the part must be written again from the start. */
int codec_enc_write(struct codec_enc *e, const void *buf, size_t len, codec_emit_fn emit,
                    void *ctx);

/* Encodes and emits the last partial frame, if any (nothing for a part of 0
 * bytes, or one that ends on a frame boundary). Afterwards only the byte
 * counts and codec_enc_free() are valid. Same errors as codec_enc_write(). */
int codec_enc_finish(struct codec_enc *e, codec_emit_fn emit, void *ctx);

/* Raw bytes taken and encoded bytes emitted so far. */
uint64_t codec_enc_raw_bytes(const struct codec_enc *e);
uint64_t codec_enc_out_bytes(const struct codec_enc *e);

/* Frees the encoder (NULL is fine). */
void codec_enc_free(struct codec_enc *e);

/* ---- decoder: the caller pulls raw bytes, the decoder pulls encoded bytes ---- */

/* Reads up to len encoded bytes into buf (the next ones in sequence).
 * Returns the count (short reads are fine), 0 at the end of the stored file,
 * or a negative error, which the decoder returns unchanged. The decoder asks
 * for exactly what it needs next, often a few bytes (a frame header) and then
 * a whole compressed frame: a callback over unaligned or slow storage should
 * buffer. */
typedef ssize_t (*codec_read_fn)(void *ctx, void *buf, size_t len);

struct codec_dec;

/* Creates a decoder for a part of raw_size raw bytes stored as `kind`
 * (CODEC_RAW reads through, checking the size). Nothing is read yet. The
 * decoder holds at most one frame of input and one of output (plus the LZ4F
 * context's block buffers). Returns 0 and *out, KVTIER_E_INVALID for an
 * unknown kind or a NULL callback, or -ENOMEM. */
int codec_dec_new(int kind, uint64_t raw_size, codec_read_fn read, void *ctx,
                  struct codec_dec **out);

/* Fills buf with up to len of the next raw bytes. Returns the count (> 0
 * while len > 0 and bytes remain), 0 once all raw_size bytes were returned
 * (or when len is 0), KVTIER_E_CORRUPT when the stored stream is malformed,
 * truncated, has bytes after the last frame, or decodes to a size other than
 * raw_size, or the read callback's error. The end of the stream is checked as
 * soon as the last frame is decoded, so the call that would return the last
 * raw bytes fails instead when bytes follow. buf's contents are unspecified
 * after an error. Errors are sticky: later calls return the same error. */
ssize_t codec_dec_read(struct codec_dec *d, void *buf, size_t len);

/* Frees the decoder (NULL is fine). */
void codec_dec_free(struct codec_dec *d);

/* ---- decision ---- */

/* Shuffle modes for codec_choose(). */
enum codec_shuffle_mode {
	CODEC_SHUFFLE_NEVER = 0,
	CODEC_SHUFFLE_ALWAYS = 1,
	CODEC_SHUFFLE_AUTO = 2, /* try both, keep the smaller (plain LZ4 on a tie) */
};

/* Picks how to store a part from `sample`, n raw bytes of it (the caller
 * passes a few frames' worth taken across the part). Encodes the sample as
 * the encoder would a part of n bytes, with LZ4 and/or LZ4+shuffle as
 * shuffle_mode says, and sets *kind to the kind giving the smaller output,
 * or to CODEC_RAW when that output saves less than min_saving (the fraction
 * 1 - encoded / raw, e.g. 0.10) or n is 0; and *ratio (may be NULL) to
 * raw / encoded of the chosen kind (1.0 for CODEC_RAW). Costs one or two
 * encodes of the sample. Returns 0, KVTIER_E_INVALID (unknown mode, NULL
 * kind, NULL sample with n > 0, NaN min_saving) or -ENOMEM. */
int codec_choose(const void *sample, size_t n, double min_saving, int shuffle_mode, int *kind,
                 double *ratio);

/* Byte-shuffles n bytes of src into dst as one frame (see above); the two
 * buffers must not overlap. codec_unshuffle() is its inverse. Exposed for
 * tests and for tools reading a stored file with `lz4 -dc`. */
void codec_shuffle(void *dst, const void *src, size_t n);
void codec_unshuffle(void *dst, const void *src, size_t n);

#endif /* KVTIER_CODEC_H */
