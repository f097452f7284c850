/* fingerprint.h: the kvtier namespace of a llama-server backend.
 *
 * A blob is only valid for the model and KV layout it was saved with, and
 * llama-server does not check model identity on restore. The namespace is
 * therefore a fingerprint of the model plus the KV settings (cache types,
 * flash attention) that the plugin is told about, because the server does
 * not report them. Two sources, best first:
 *  - the model file (--model-file): the GGUF header (key/value metadata and
 *    tensor descriptions), the file size and 16 samples of 64 KiB of the
 *    tensor data, hashed with SHA-256; never the whole file;
 *  - the server's /props and /v1/models: model file name, chat template,
 *    vocabulary and shape numbers, model size and parameter count.
 */
#ifndef KVTIER_PLUGIN_FINGERPRINT_H
#define KVTIER_PLUGIN_FINGERPRINT_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

/* What the GGUF header says about a model file. */
struct gguf_summary {
	uint8_t digest[32]; /* SHA-256 over header, size and data samples */
	uint64_t file_size;
	uint32_t version; /* GGUF version: 2 or 3 */
	uint64_t n_tensors, n_kv;
	char arch[64];       /* general.architecture, "" if absent */
	char name[128];      /* general.name, else the file name without .gguf */
	int64_t n_embd;      /* <arch>.embedding_length, -1 if absent */
	int64_t n_ctx_train; /* <arch>.context_length, -1 if absent */
	int64_t n_layer;     /* <arch>.block_count, -1 if absent */
	int64_t n_vocab;     /* length of tokenizer.ggml.tokens, -1 if absent */
};

/* The KV settings the plugin was given (llama-server does not report them). */
struct fingerprint_kv {
	const char *type_k; /* --cache-type-k, e.g. "f16" */
	const char *type_v; /* --cache-type-v */
	int flash_attn;     /* --flash-attn given */
};

struct fingerprint {
	char ns[256];       /* the namespace; "" when none could be derived */
	const char *source; /* "model-file", "props", "override" or "none" (static) */
	char why[384];      /* one line for the start-up log: what the fingerprint rests on */
};

/* Reads the GGUF header of the model file at `path` (metadata key/values and
 * tensor descriptions, stopping before the tensor data) and 16 samples of the
 * data, and fills *out. Every count and length is bounded before it is used;
 * at most the header plus 1 MiB of data is read.
 * Returns 0; -errno when the file cannot be opened or read; -EINVAL when it is
 * not a GGUF file of version 2 or 3 or is malformed (err says what). */
int fingerprint_gguf(const char *path, struct gguf_summary *out, char *err, size_t errlen);

/* The namespace of a model file's summary with the KV settings kv. */
void fingerprint_from_gguf(const struct gguf_summary *g, const struct fingerprint_kv *kv,
                           struct fingerprint *out);

/* The namespace from a backend's /props and /v1/models answers (either may be
 * NULL). Returns 0, or -ENODATA when neither names the model (then out->ns is
 * "" and out->source "none": the backend must not share blobs). */
int fingerprint_from_props(const json_t *props, const json_t *models,
                           const struct fingerprint_kv *kv, struct fingerprint *out);

/* Checks that a backend's /v1/models meta agrees with the model file's
 * header (n_embd, n_ctx_train, n_vocab where both are known). Returns 1 when
 * nothing disagrees, 0 otherwise with the disagreement written into why. */
int fingerprint_gguf_matches(const struct gguf_summary *g, const json_t *models, char *why,
                             size_t whylen);

#endif /* KVTIER_PLUGIN_FINGERPRINT_H */
