/* slotfile.h: parsing llama-server slot file headers.
 *
 * A slot file is what llama-server writes on POST /slots/{id}?action=save:
 * little-endian u32 magic 0x67677371 ("qsgg" on disk), u32 version,
 * u32 n_token_count, n_token_count x i32 token ids, then the KV state.
 * Version 2 (mainline llama.cpp) state is parsed far enough to check that the
 * file size is exactly what its layout implies and to extract the layout
 * signature (n_layer, K/V types and row sizes, v_trans). Version 4
 * (ik_llama.cpp) is parsed up to the tokens only.
 *
 * This module only reads; it never allocates more than the token array, and
 * every count is bounded before anything is allocated.
 */
#ifndef KVTIER_SLOTFILE_H
#define KVTIER_SLOTFILE_H

#include <stddef.h>
#include <stdint.h>

#define SLOT_MAGIC 0x67677371u
#define SLOT_MAX_TOKENS (1u << 22)   /* 4M tokens: far beyond any context */
#define SLOT_MAX_LAYERS 1024u
#define SLOT_LAYOUT_MAX 64          /* bytes of a layout signature */

struct slot_info {
	uint32_t version;          /* 2 or 4 */
	uint32_t n_tokens;         /* > 0 on success */
	uint64_t file_size;
	uint64_t state_offset;     /* 12 + 4 * n_tokens */
	/* version 2 only (has_layout != 0): */
	int has_layout;
	uint32_t n_cells;          /* cell_count of the state */
	uint32_t v_trans;
	uint32_t n_layer;
	uint8_t layout[SLOT_LAYOUT_MAX]; /* canonical signature, compared bytewise */
	size_t layout_len;
};

/* Reads exactly `len` bytes at `off` into buf. Returns 0, or a negative errno
 * (-EIO, ...). Short reads past the end of the file return -ENODATA. */
typedef int (*slot_read_fn)(void *ctx, void *buf, size_t len, uint64_t off);

/* Parses the header of a slot file of `file_size` bytes read through `rd`.
 * On success fills *info and, when tokens_out is not NULL, sets *tokens_out
 * to a malloc'd array of info->n_tokens token ids (caller frees).
 * Returns 0, or KVTIER_E_INVALID with a one-line reason in err (what is
 * wrong: "empty slot file (0 tokens): ...", "truncated: ...", "bad magic
 * ...", "oversized: ...", "unsupported version ...", "malformed state: ..."),
 * or a negative errno from rd (err says so too).
 * A file that is well formed but holds 0 tokens is refused with
 * KVTIER_E_INVALID ("empty slot file (0 tokens): ..."); *info is then filled
 * all the same (n_tokens == 0, and the layout for version 2), so a caller can
 * report what it refused. After any other failure *info is unspecified.
 * *tokens_out is set to NULL on every failure. */
int slot_parse(slot_read_fn rd, void *ctx, uint64_t file_size, struct slot_info *info,
	       int32_t **tokens_out, char *err, size_t errlen);

/* slot_parse() on an open file descriptor (uses pread, any offset). */
int slot_parse_fd(int fd, struct slot_info *info, int32_t **tokens_out, char *err,
		  size_t errlen);

/* Writes a human-readable form of a layout signature ("n_layer=2 v_trans=1
 * k=f16 64B/row v=f16 2B x 32", plus " mixed=k|v|kv digest=<hex>" when the
 * layers differ) into buf, truncated to buflen. Returns buf. */
char *slot_layout_describe(const uint8_t *layout, size_t len, char *buf, size_t buflen);

#endif /* KVTIER_SLOTFILE_H */
