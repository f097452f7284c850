/* kvtier.h: the one public header of libkvtier, the C client of kvtierd.
 *
 * A client handle is a gRPC channel to one kvtierd. Every call blocks until
 * the daemon answers or the handle's timeout passes. Handles are opaque; the
 * same handle may be used from several threads at once, but the "last error
 * message" (kvtier_errmsg) is per handle, so a multi-threaded caller that
 * wants the message should use one handle per thread.
 *
 * Errors: every function that can fail returns int: 0 on success, a negative
 * errno value for a local system failure (-ENOENT, -EIO, ...), or one of the
 * KVTIER_E_* codes below, which mirror the daemon's gRPC status codes.
 * kvtier_strerror() names both kinds. After a failure kvtier_errmsg() holds
 * the daemon's own message (what was wrong and what to do).
 *
 * Ownership: strings and structs passed in are only read during the call.
 * Structs filled out are owned by the caller; where they point into the
 * handle, the header says how long that stays valid.
 */
#ifndef KVTIER_KVTIER_H
#define KVTIER_KVTIER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(KVTIER_BUILDING) && defined(__GNUC__)
#define KVTIER_API __attribute__((visibility("default")))
#else
#define KVTIER_API
#endif

/* Error codes, in their own range below -errno values. */
enum kvtier_error {
	KVTIER_E_FIRST = -30999,
	KVTIER_E_INVALID = -30999,   /* bad input: malformed slot file, bad argument (INVALID_ARGUMENT) */
	KVTIER_E_LAYOUT,             /* KV layout disagrees with the namespace, or a tier needs an
				      * operator: directory removed, file system read-only
				      * (FAILED_PRECONDITION) */
	KVTIER_E_FULL,               /* no room: a tier or the index map is full (RESOURCE_EXHAUSTED) */
	KVTIER_E_NOTFOUND,           /* no such blob, lease or file (NOT_FOUND) */
	KVTIER_E_UNAUTH,             /* missing or wrong bearer token (UNAUTHENTICATED) */
	KVTIER_E_DENIED,             /* path outside the allowed slot directories (PERMISSION_DENIED) */
	KVTIER_E_CORRUPT,            /* stored bytes failed their checksum (DATA_LOSS) */
	KVTIER_E_EXISTS,             /* target already exists (ALREADY_EXISTS) */
	KVTIER_E_UNAVAILABLE,        /* daemon unreachable or shutting down (UNAVAILABLE) */
	KVTIER_E_TIMEOUT,            /* deadline passed (DEADLINE_EXCEEDED) */
	KVTIER_E_INTERNAL,           /* a bug or an unexpected state; see the message (INTERNAL) */
	KVTIER_E_LAST = KVTIER_E_INTERNAL
};

/* Names an error code (a KVTIER_E_* code or a negative errno). Never NULL;
 * the string is static. */
KVTIER_API const char *kvtier_strerror(int rc);

/* The gRPC status name a code corresponds to ("INVALID_ARGUMENT", "NOT_FOUND",
 * ...; "OK" for 0, "INTERNAL" for negative errno values). Static string. */
KVTIER_API const char *kvtier_status_name(int rc);

#define KVTIER_BLOB_ID_LEN 64 /* hex characters of a blob id, without the NUL */

typedef struct kvtier_client kvtier_client;

struct kvtier_options {
	const char *auth_token; /* bearer token for TCP addresses; NULL = none */
	unsigned timeout_ms;    /* per call (streams: per message); 0 = 60000 */
};

/* Opens a handle to the daemon at `address`: "unix:/path/to.sock",
 * "/path/to.sock" (same thing) or "host:port". Nothing is sent until the
 * first call, so an unreachable daemon shows up there as KVTIER_E_UNAVAILABLE.
 * `opt` may be NULL. On success *out is a handle to free with
 * kvtier_close(). Returns 0, -ENOMEM or KVTIER_E_INVALID. */
KVTIER_API int kvtier_open(kvtier_client **out, const char *address,
			   const struct kvtier_options *opt);

/* TLS to a kvtierd whose --listen has --tls-cert and --tls-key. Added after
 * 0.2.0 (a new function: kvtier_options keeps its size). */
struct kvtier_tls {
	const char *ca_file;     /* PEM file with the CA certificate(s) that signed
	                          * kvtierd's certificate (required) */
	const char *server_name; /* the name kvtierd's certificate must carry (a DNS
	                          * name or an IP address); NULL or "" = the host
	                          * of `address` */
};

/* kvtier_open() with TLS when tls is not NULL (NULL: exactly kvtier_open()).
 * The CA file is read and checked here, once. Every connection then checks
 * kvtierd's certificate against it and the name before any call is sent,
 * and never falls back to plaintext: the bearer token in opt never leaves
 * the process unencrypted. A daemon without TLS, or with a certificate of
 * another CA or for another name, fails every call with
 * KVTIER_E_UNAVAILABLE (kvtier_errmsg says why). `address` must be
 * host:port. err (may be NULL) receives a sentence on failure; errlen is
 * its size. Returns 0; KVTIER_E_INVALID (bad address, a Unix socket with
 * TLS, no ca_file, a bad server_name or token); -errno when ca_file cannot
 * be read; -EBADMSG when it holds no PEM certificate or a broken one;
 * -EFBIG when it is over 1 MiB; -ENOMEM. */
KVTIER_API int kvtier_open_tls(kvtier_client **out, const char *address,
			       const struct kvtier_options *opt, const struct kvtier_tls *tls,
			       char *err, size_t errlen);

/* Closes the handle. Calls in flight on other threads must have returned. */
KVTIER_API void kvtier_close(kvtier_client *c);

/* The message of the last failed call on this handle (the daemon's status
 * message, or a local description). Valid until the next call on the handle. */
KVTIER_API const char *kvtier_errmsg(const kvtier_client *c);

struct kvtier_tier {
	unsigned index;
	char kind[16];
	char path[256];
	uint64_t capacity_bytes, used_bytes, blobs;
	double read_bytes_per_s, read_fixed_s;
	char io[32];                   /* io_uring+O_DIRECT, pread+O_DIRECT, pread or memory */
	char io_fallback[160];         /* why not io_uring+O_DIRECT ("" when it is) */
	uint64_t model_samples;        /* real reads the restore model learned from */
	uint64_t high_watermark_bytes; /* above this the tier's lowest-value blobs move down */
	uint64_t low_watermark_bytes;  /* eviction brings the tier back under this */
	uint64_t raw_bytes;            /* its blobs' bytes as served */
	uint64_t stored_bytes;         /* their bytes on the tier; raw / stored = compression */
	uint64_t migrations_in;        /* blobs moved into this tier */
	uint64_t migrations_out;       /* blobs moved out of this tier */
	uint64_t evicted_capacity;     /* deleted from the last tier to make room */
	uint64_t evicted_not_worth;    /* not moved down: restore slower than prefill */
	uint64_t evicted_lower_full;   /* not moved down: the next tier could not take it */
	double gdsf_base;              /* GreedyDual inflation value L (docs/policy.md) */
};

/* One namespace's prefill model: seconds per token = a + b * depth, depth
 * being the tokens already in the context when the prefill starts. */
struct kvtier_ns_model {
	char ns[256];
	double prefill_tokens_per_s;        /* average of the reports (for display) */
	double prefill_s_per_token;         /* a: seconds per token at depth 0 */
	double prefill_s_per_token_per_ctx; /* b: extra seconds per token per token of depth */
	double samples;                     /* reports fitted (older ones decay) */
};

struct kvtier_info {
	char version[32];
	unsigned block_size;
	int supersede;
	uint64_t max_blob_bytes;
	unsigned n_tiers;
	struct kvtier_tier tiers[8];
	unsigned n_slot_dirs;
	char slot_dirs[8][256];
	double high_watermark;      /* share of a tier's capacity that starts eviction */
	double low_watermark;       /* share of a tier's capacity eviction brings it under */
	double compress_min_saving; /* share a blob must shrink by to be stored LZ4 (1 = off) */
	double assumed_prefill_tps; /* prefill tokens/s assumed for a namespace without reports */
	char shuffle[8];            /* byte-shuffle before LZ4: "auto", "on" or "off" */
	unsigned n_namespaces;      /* entries filled in namespaces[]; more than 32 are dropped */
	struct kvtier_ns_model namespaces[32];
};

/* Asks the daemon for its version, block size, tiers, slot directories,
 * placement settings and the namespaces' prefill models. The struct is about
 * 16 KiB: a caller short of stack should allocate it. */
KVTIER_API int kvtier_info(kvtier_client *c, struct kvtier_info *out);

struct kvtier_match {
	int found;                       /* 0 on a miss: the rest is zero */
	char blob[KVTIER_BLOB_ID_LEN + 1];
	uint32_t matched_tokens;         /* prefix of the query the blob holds */
	uint32_t n_tokens;               /* tokens in the blob */
	uint64_t size_bytes;
	unsigned tier;
	char tier_kind[16];
	double est_restore_s; /* the tier's restore model for this blob */
	double est_prefill_s; /* the namespace's prefill model for matched_tokens */
};

/* Finds the blob of namespace `ns` with the longest prefix in common with
 * tokens[0..n). A miss is success with out->found == 0. */
KVTIER_API int kvtier_lookup(kvtier_client *c, const char *ns, const int32_t *tokens,
			     size_t n, struct kvtier_match *out);

struct kvtier_put_result {
	char blob[KVTIER_BLOB_ID_LEN + 1];
	int deduplicated;
	uint32_t n_tokens;
	unsigned tier;
	unsigned n_superseded;           /* blobs this one made redundant (and dropped) */
};

/* Streams the slot file at `path` (and its sidecars `path`.tokens.json and
 * `path`.checkpoints when they exist) into namespace `ns`. The daemon parses
 * and checks the header; a refused file stores nothing. The same as
 * kvtier_put_file_sized() with reported_size 0. */
KVTIER_API int kvtier_put_file(kvtier_client *c, const char *ns, const char *path,
			       struct kvtier_put_result *out);

/* Asks the daemon to take the file at `path` (inside one of its --slot-dir
 * directories, same host) into namespace `ns` by rename or link, sidecars
 * included. Unless keep_source, the source name is gone afterwards. The same
 * as kvtier_adopt_sized() with reported_size 0. */
KVTIER_API int kvtier_adopt(kvtier_client *c, const char *ns, const char *path,
			    int keep_source, struct kvtier_put_result *out);

/* kvtier_put_file() and kvtier_adopt() with the size the server that wrote
 * the slot file reported for it (llama-server's n_written of a save), 0 for
 * none. llama-server writes slot files in place without fsync, so a crash
 * can leave a truncated file whose header is valid: with reported_size the
 * daemon refuses a slot file (not the sidecars) of any other size with
 * KVTIER_E_INVALID, kvtier_errmsg() naming both sizes, and stores nothing
 * (an adopted file stays where it is). Other errors as the functions without
 * _sized. A kvtierd of 0.2.0 or older does not know reported_size: it
 * ignores it and stores the file unchecked (upgrade the daemon first). */
KVTIER_API int kvtier_put_file_sized(kvtier_client *c, const char *ns, const char *path,
				     uint64_t reported_size, struct kvtier_put_result *out);
KVTIER_API int kvtier_adopt_sized(kvtier_client *c, const char *ns, const char *path,
				  int keep_source, uint64_t reported_size,
				  struct kvtier_put_result *out);

/* Streams blob `blob` into the file `path` (created or truncated) and its
 * sidecars into `path`.tokens.json etc. Written to temporary names and
 * renamed, so `path` never holds a partial blob. A `path` that exists and is
 * not a regular file or a directory (a device, a FIFO, a socket, a terminal)
 * is written to in place, never renamed over, and gets the slot file only
 * (as kvtier_fetch_fd). *size_out (may be NULL) receives the slot file's
 * size. */
KVTIER_API int kvtier_fetch_file(kvtier_client *c, const char *blob, const char *path,
				 uint64_t *size_out);

/* Streams the slot file of blob `blob` into the open descriptor fd as it
 * arrives (its sidecars are not written): standard output, a pipe, a
 * device. A stream that fails midway has written part of the file (the
 * return value says so). fd stays open. */
KVTIER_API int kvtier_fetch_fd(kvtier_client *c, const char *blob, int fd, uint64_t *size_out);

/* The parts of a blob, in the order kvtier_fetch delivers them. */
enum kvtier_part {
	KVTIER_PART_SLOT = 0,        /* the slot file */
	KVTIER_PART_TOKENS_JSON = 1, /* sidecar <slot file>.tokens.json (ik_llama.cpp) */
	KVTIER_PART_CHECKPOINTS = 2  /* sidecar <slot file>.checkpoints (ik_llama.cpp) */
};

/* Streams blob `blob` to the callback `cb` instead of a file, for a caller
 * that forwards, checks or discards the bytes and needs no temporary file.
 * The parts come in order, the slot file first (KVTIER_PART_SLOT), then the
 * sidecars the blob has. For each part cb is called once with buf NULL and
 * len 0 when the part begins (so an empty sidecar is seen too), then with the
 * part's bytes in order, in pieces of no fixed size and never of length 0.
 * `buf` points into gRPC's receive buffer (no copy is made) and is valid only
 * during that call of cb. `ctx` is passed to cb unchanged. cb runs on the
 * calling thread and must not close `c`.
 *
 * The library checks that each part gets exactly the bytes the daemon
 * announced for it. Returns 0 only when the daemon ended the stream with OK
 * after every byte; after any other return the bytes already given to cb are
 * not a whole blob and must be discarded. A non-zero return from cb cancels
 * the call and is returned as it is. Other errors: KVTIER_E_INVALID (c, blob
 * or cb missing), KVTIER_E_NOTFOUND (no such blob), KVTIER_E_CORRUPT (the
 * stored bytes failed their checksum; the daemon drops the blob),
 * KVTIER_E_TIMEOUT (no message for the handle's timeout), KVTIER_E_UNAVAILABLE,
 * KVTIER_E_INTERNAL (the daemon sent more or fewer bytes than it announced,
 * or an unknown part), -ENOMEM. */
KVTIER_API int kvtier_fetch(kvtier_client *c, const char *blob,
			    int (*cb)(void *ctx, int part, const void *buf, size_t len),
			    void *ctx);

struct kvtier_stage {
	char lease[64];
	char filename[256];   /* the name inside the directory */
	char path[4096];
	uint64_t expires_unix_ms;
	int copied;
	uint32_t n_tokens;
};

/* Makes blob `blob` appear in `directory` (one of the daemon's --slot-dir)
 * under a daemon-chosen name, with a lease of lease_seconds (0 = default).
 * The file stays until kvtier_release() or the lease expires. */
KVTIER_API int kvtier_stage(kvtier_client *c, const char *blob, const char *directory,
			    unsigned lease_seconds, struct kvtier_stage *out);

/* Ends a lease: the staged file is removed. */
KVTIER_API int kvtier_release(kvtier_client *c, const char *lease);

/* Deletes a blob (metadata first, then files). */
KVTIER_API int kvtier_delete(kvtier_client *c, const char *blob);

struct kvtier_blob_info {
	char blob[KVTIER_BLOB_ID_LEN + 1];
	char ns[256];
	uint32_t n_tokens;
	uint32_t version;
	uint64_t size_bytes, stored_bytes;
	unsigned tier;
	char tier_kind[16];
	char compression[16];     /* "none", "lz4" or "lz4+shuffle" */
	double compression_ratio; /* slot file bytes / stored bytes (1 when not compressed) */
	unsigned n_sidecars;
	char sidecars[2][16];
	int64_t created_unix_ms, last_access_unix_ms;
	uint64_t hits;
	uint32_t crc32c;
	/* Appended after 0.2.0. The library fills this struct and hands it to
	 * the kvtier_list callback by pointer, so a program built against an
	 * older header reads the fields it knows and never sees these: it keeps
	 * working unchanged, without a rebuild (same soname). From a kvtierd of
	 * 0.2.0 or older, and for blobs such a daemon recorded, state and
	 * token_form are "" and media_cut 0. */
	char state[16];      /* the slot file's state layout: "opaque" (kvtier does not
	                      * know it; stored as it is), "kv-2025", "kv", "recurrent",
	                      * "hybrid" */
	char token_form[8];  /* token payload: "plain" or "packed" */
	int media_cut;       /* 1: the payload holds media; the blob is indexed (n_tokens)
	                      * only up to the first media position */
};

/* Calls `cb` for every blob (of namespace `ns`, or all when ns is NULL or
 * empty), in blob id order, fetching pages from the daemon as needed. The
 * struct passed to cb is valid only during that call. A non-zero return from
 * cb stops the walk and is returned. */
KVTIER_API int kvtier_list(kvtier_client *c, const char *ns,
			   int (*cb)(void *ctx, const struct kvtier_blob_info *b), void *ctx);

struct kvtier_ns_stats {
	char ns[256];
	uint64_t blobs, bytes, lookups, hits;
	double prefill_tokens_per_s;
};

struct kvtier_stats {
	uint64_t blobs, bytes, lookups, hits, matched_tokens, puts, dedups, supersessions,
		stages, active_leases;
	unsigned n_tiers;
	struct kvtier_tier tiers[8];
	unsigned n_namespaces;             /* entries filled in namespaces[] */
	struct kvtier_ns_stats namespaces[32];
};

/* Asks the daemon for its counters. */
KVTIER_API int kvtier_stats(kvtier_client *c, struct kvtier_stats *out);

struct kvtier_report {
	const char *ns;
	uint32_t prompt_tokens; /* tokens prefilled (timings.prompt_n) */
	double prompt_ms;       /* timings.prompt_ms */
	const char *blob;       /* NULL unless reporting on a restore */
	double restore_ms;
	uint32_t restored_tokens;
	int restore_ignored;    /* the server did not use the restored blob */
	uint32_t cached_tokens; /* tokens in the context before the prefill (its depth) */
};

/* Tells the daemon measured prefill and restore timings. */
KVTIER_API int kvtier_report(kvtier_client *c, const struct kvtier_report *r);

#ifdef __cplusplus
}
#endif
#endif /* KVTIER_KVTIER_H */
