/* slotfile.h: reading llama-server slot files.
 *
 * A slot file is what llama-server writes on POST /slots/{id}?action=save
 * (llama_state_seq_save_file): little-endian u32 magic 0x67677371 ("qsgg" on
 * disk), u32 version, u32 n_token_count, n_token_count x i32 words (the token
 * payload), then the state of the slot's sequence.
 *
 * The token payload is always understood; the state when its layout is one
 * kvtier knows. Versions read: 2 and 3 (llama.cpp; 3 since its autumn 2026
 * releases), 4 (ik_llama.cpp, and a llama.cpp pull request that would reuse
 * the number). The token payload is either
 *  - plain: the slot's tokens (prompt + generated - 1), or
 *  - packed (llama-server since mid-August 2026, server_tokens::serialize):
 *    words -1 (marker), 1 (format version), n, the n tokens (a media
 *    position is -1), u32 media-key count, the keys, per key a u32 byte
 *    count and the media chunk, zero padding to 4 bytes.
 * The tokens handed back (and counted in n_tokens) are the ones a lookup
 * keys on: all of them, or the text before the first media position.
 *
 * The state layouts walked (docs/architecture.md, "Slot files" has the
 * evidence for each):
 *  - SLOT_STATE_KV_2025: llama.cpp of early 2025: u32 cell_count, cells of
 *    (i32 pos, u32 n_seq_id, n_seq_id x i32), u32 v_trans, u32 n_layer,
 *    per layer K (i32 type, u64 row bytes, rows), per layer V;
 *  - SLOT_STATE_KV: llama.cpp since July 2025: u32 n_stream, then per
 *    stream u32 cell_count and, when not 0, the cells (optionally with 8
 *    bytes of M-RoPE position after n_seq_id), v_trans, n_layer, K, V (V
 *    entries absent in a V-less cache); sliding-window models write two
 *    such sections (base layers, then sliding-window layers);
 *  - SLOT_STATE_RECURRENT: u32 cell_count, cells, u32 s_trans, u32 n_layer,
 *    R entries then S entries of the recurrent layers;
 *  - hybrid models: a KV section then a recurrent one.
 * A file whose payload parses but whose state matches none of these (a
 * format kvtier does not know yet, ik_llama.cpp's) is SLOT_STATE_OPAQUE: it
 * is not refused; its layout signature then says only "opaque, version V,
 * token form F", and the namespace and the size the server reported guard
 * it. Refused: a bad magic, an unknown version, a token payload that does
 * not parse, 0 tokens, a size past the limits.
 *
 * This module only reads; it never allocates more than the token array
 * (plus a digest context), and every count is bounded before it is used.
 */
#ifndef KVTIER_SLOTFILE_H
#define KVTIER_SLOTFILE_H

#include <stddef.h>
#include <stdint.h>

#define SLOT_MAGIC 0x67677371u
#define SLOT_MAX_TOKENS (1u << 22)   /* 4M tokens: far beyond any context */
#define SLOT_MAX_LAYERS 1024u
#define SLOT_MAX_STREAMS 256u
#define SLOT_MAX_MEDIA 4096u         /* media chunks in one packed payload */
#define SLOT_MAX_SECTIONS 4
#define SLOT_LAYOUT_MAX 64          /* bytes of a layout signature */
#define SLOT_HEADER_BYTES 12u

enum slot_token_form {
	SLOT_TOKENS_PLAIN = 0,
	SLOT_TOKENS_PACKED = 1,
};

enum slot_state_kind {
	SLOT_STATE_OPAQUE = 0,      /* not walked: stored as it is */
	SLOT_STATE_KV_2025 = 1,     /* one KV section without n_stream */
	SLOT_STATE_KV = 2,          /* one or two KV sections with n_stream (sliding window: 2) */
	SLOT_STATE_RECURRENT = 3,   /* one recurrent section */
	SLOT_STATE_HYBRID = 4,      /* KV section(s), then a recurrent one */
};

enum slot_section_kind { SLOT_SEC_KV = 'K', SLOT_SEC_RECURRENT = 'R' };

/* One section of a walked state. */
struct slot_section {
	uint8_t kind;               /* enum slot_section_kind */
	uint8_t cell_ext;           /* KV: 8 bytes of M-RoPE position per cell */
	uint8_t v_less;             /* KV: no V entries (V-less cache) */
	uint32_t n_stream;          /* KV with n_stream: streams; else 1 */
	uint32_t n_cells;           /* cells of every stream together */
	uint32_t v_trans;           /* KV: v_trans; recurrent: s_trans */
	uint32_t n_layer;           /* the section's n_layer field (0 when it holds no cells) */
	uint32_t n_k;               /* K (R) entries, V (S) entries */
	uint32_t n_v;
};

struct slot_info {
	uint32_t version;          /* header version: 2, 3 or 4 */
	uint32_t n_words;          /* the header's n_token_count: words of the token payload */
	uint32_t token_form;       /* enum slot_token_form */
	uint32_t n_tokens_all;     /* tokens in the payload, media positions included */
	uint32_t n_tokens;         /* tokens indexed (before the first media position); > 0 on success */
	uint32_t n_media;          /* media chunks (packed form), or media positions (plain) */
	uint64_t file_size;
	uint64_t state_offset;     /* 12 + 4 * n_words */
	uint32_t state_kind;       /* enum slot_state_kind */
	uint32_t n_sections;
	struct slot_section sec[SLOT_MAX_SECTIONS];
	/* Layout signature: always filled on success (also for an opaque state). */
	int has_layout;
	uint32_t n_cells;          /* of the first section (compatibility) */
	uint32_t v_trans;
	uint32_t n_layer;
	uint8_t layout[SLOT_LAYOUT_MAX]; /* canonical signature, compared bytewise */
	size_t layout_len;
};

/* Reads exactly `len` bytes at `off` into buf. Returns 0, or a negative errno
 * (-EIO, ...). Short reads past the end of the file return -ENODATA. */
typedef int (*slot_read_fn)(void *ctx, void *buf, size_t len, uint64_t off);

/* Checks the 12-byte fixed header of a file of file_size bytes (magic,
 * version, count, the count's words fit): the early test of a streamed
 * upload. Fills version, n_words and state_offset of *info. Returns 0 or
 * KVTIER_E_INVALID with the reason in err (the same reasons as slot_parse).
 * A count of 0 words is refused here ("empty slot file (0 tokens)"). */
int slot_check_header(const uint8_t h[SLOT_HEADER_BYTES], uint64_t file_size,
		      struct slot_info *info, char *err, size_t errlen);

/* Parses a slot file of `file_size` bytes read through `rd`.
 * On success fills *info and, when tokens_out is not NULL, sets *tokens_out
 * to a malloc'd array of info->n_tokens token ids (caller frees).
 * Returns 0, or KVTIER_E_INVALID with a one-line reason in err (what is
 * wrong: "empty slot file (0 tokens): ...", "truncated: ...", "bad magic
 * ...", "oversized: ...", "unsupported version ...", "malformed token
 * payload: ..."), or a negative errno from rd (err says so too).
 * A file that is well formed but holds 0 tokens is refused with
 * KVTIER_E_INVALID ("empty slot file (0 tokens): ..."); *info is then filled
 * all the same (n_tokens == 0, the state's sections as far as they walk), so
 * a caller can report what it refused, and a plugin can read the shape of an
 * empty save. After any other failure *info is unspecified.
 * *tokens_out is set to NULL on every failure. */
int slot_parse(slot_read_fn rd, void *ctx, uint64_t file_size, struct slot_info *info,
	       int32_t **tokens_out, char *err, size_t errlen);

/* slot_parse() on an open file descriptor (uses pread, any offset). */
int slot_parse_fd(int fd, struct slot_info *info, int32_t **tokens_out, char *err,
		  size_t errlen);

/* Whether llama-server can use a prefix of this state: one KV section (the
 * early-2025 layout, today's kv, ik's). Not a sliding-window file (it holds
 * only the window's last positions), a recurrent or hybrid state (its last
 * position only), nor an opaque one (unknown). A blob of such a state must
 * not stand in for a shorter one whose tokens it extends. */
int slot_prefix_restorable(const struct slot_info *info);

/* "opaque", "kv-2025", "kv", "recurrent" or "hybrid". */
const char *slot_state_kind_name(uint32_t kind);

/* 1 when the signature is that of an opaque state (layout not walked). */
int slot_layout_is_opaque(const uint8_t *layout, size_t len);

/* Writes a human-readable form of a layout signature into buf, truncated to
 * buflen, e.g. "kv-2025 n_layer=2 v_trans=1 k=f16 64B/row v=f16 2B x 32" or
 * "v2 plain kv streams=2 n_layer=2 v_trans=0 k=f16 64B/row v=f16 64B/row"
 * (plus " mixed digest=<hex>" when layers or sections differ) or
 * "v3 packed opaque". Returns buf. */
char *slot_layout_describe(const uint8_t *layout, size_t len, char *buf, size_t buflen);

#endif /* KVTIER_SLOTFILE_H */
