/* kvclient.h: kvtier-llama's use of kvtierd (through libkvtier).
 *
 * Moves blobs between kvtierd and the llama-server slot directory, and keeps
 * the per-namespace numbers the break-even needs. Two ways to move a blob:
 *  - local (kvtierd on this host and allowed in the slot directory): Stage
 *    hard-links the blob into the directory under a lease, Adopt takes a
 *    saved file by rename or link; no bytes are copied;
 *  - remote: Fetch streams the blob into a file the plugin names, Put streams
 *    a saved file out; the plugin deletes its files afterwards.
 * Which one is decided at start from Info (is the slot directory one of the
 * daemon's?) and a probe (does the daemon see a file the plugin just made
 * there?), unless forced with --kvtier-mode.
 *
 * Handles come from a small pool, so each call's error message stays with
 * its caller. After kvtierd fails to answer, calls are skipped for a short
 * back-off instead of making every request wait for the timeout.
 *
 * This module never talks to llama-server and never reads a blob into memory.
 */
#ifndef KVTIER_PLUGIN_KVCLIENT_H
#define KVTIER_PLUGIN_KVCLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "kvtier.h"

enum kvclient_mode {
	KVCLIENT_AUTO,   /* decide from Info and a probe */
	KVCLIENT_LOCAL,  /* Stage/Adopt */
	KVCLIENT_REMOTE, /* Fetch/Put */
};

struct kvclient_config {
	const char *address;       /* "unix:PATH" or "HOST:PORT" */
	const char *token;         /* bearer token for TCP, or NULL */
	const char *tls_ca;        /* TLS to a HOST:PORT address: the CA file, or NULL */
	const char *tls_name;      /* with tls_ca: the name kvtierd's certificate carries
				    * when not the address's host; NULL */
	const char *slot_dir;      /* the llama-servers' --slot-save-path, as seen here */
	unsigned timeout_ms;       /* per call (streams: per message) */
	unsigned break_even_floor; /* --break-even-tokens */
	enum kvclient_mode mode;
};

struct kvclient;

/* Opens the pool and asks kvtierd for Info to settle the mode (when kvtierd
 * does not answer yet, the mode is settled on the first call that reaches
 * it). With tls_ca every handle speaks TLS (kvtier_open_tls). Returns 0,
 * -ENOMEM, KVTIER_E_INVALID for a bad address or TLS setting, or the
 * errors of kvtier_open_tls for the CA file (err says which). */
int kvclient_open(const struct kvclient_config *cfg, struct kvclient **out, char *err,
                  size_t errlen);
void kvclient_close(struct kvclient *k);

/* "local", "remote" or "unknown" (kvtierd not reached yet). Static string. */
const char *kvclient_mode_name(struct kvclient *k);

/* The longest match of tokens[0..n) in namespace ns (see kvtier_lookup).
 * Returns 0 (a miss is 0 with m->found == 0), or a libkvtier error; during
 * the back-off after a failure, KVTIER_E_UNAVAILABLE at once. */
int kvclient_lookup(struct kvclient *k, const char *ns, const int32_t *tokens, size_t n,
                    struct kvtier_match *m);

/* A blob made visible in the slot directory for a restore. */
struct kvclient_file {
	char name[256];    /* file name inside the slot directory */
	char lease[64];    /* local: the lease to release; "" otherwise */
	int fetched;       /* remote: the plugin's own files, to delete */
	uint64_t bytes;    /* slot file size */
	uint32_t n_tokens; /* from the file's header */
	uint32_t version;  /* header version (2 or 4) */
};

/* Makes blob m->blob appear in the slot directory (stage or fetch) and
 * checks its header: version 2 or 4, 0 < n_tokens <= max_tokens (0: no
 * bound), and n_tokens equal to m->n_tokens. Returns 0 (then call
 * kvclient_unstage), KVTIER_E_INVALID when the header check refused it (the
 * file is already removed; never restore it), or another error (err says
 * what). */
int kvclient_stage(struct kvclient *k, const struct kvtier_match *m, uint32_t max_tokens,
                   struct kvclient_file *f, char *err, size_t errlen);

/* Removes a staged or fetched blob from the slot directory. */
void kvclient_unstage(struct kvclient *k, struct kvclient_file *f);

/* Hands the slot file `name` (inside the slot directory, just saved by
 * llama-server, sidecars beside it) to kvtierd in namespace ns: Adopt
 * locally, else Put and delete the local files. reported_size is the
 * server's n_written: kvtierd refuses a file of another size (a save cut
 * short; llama-server writes in place without fsync). On failure the local files
 * are deleted too: nothing is left behind. *bytes receives the size moved. */
int kvclient_ingest(struct kvclient *k, const char *ns, const char *name, uint64_t reported_size,
                    struct kvtier_put_result *r, uint64_t *bytes, char *err, size_t errlen);

/* Deletes slot_dir/name and its sidecars (a failed save's leftovers). */
void kvclient_discard(struct kvclient *k, const char *name);

/* Sends a Report (best effort: failures are counted and logged at debug). */
void kvclient_report(struct kvclient *k, const struct kvtier_report *r);

/* Feeds the namespace's prefill speed (exponential moving average) with a
 * measured prefill of `tokens` in `ms`. Small prefills are ignored. */
void kvclient_observe_prefill(struct kvclient *k, const char *ns, uint32_t tokens, double ms);

/* The break-even in tokens for namespace ns: the floor, or, when both
 * est_restore_s (> 0) and the measured prefill speed are known,
 * max(floor, est_restore_s x tokens/s). With est_restore_s <= 0 the last
 * estimate computed for ns is used. */
size_t kvclient_break_even(struct kvclient *k, const char *ns, double est_restore_s);

/* Deletes files in the slot directory that the plugin created ("kvtier-llama-"
 * names: saves whose slot action timed out and that the server wrote later)
 * and libkvtier fetch temporaries (".kvtier-*.tmp", left by a crash), when
 * older than max_age_s. Returns the count. */
unsigned kvclient_sweep(struct kvclient *k, unsigned max_age_s);

/* Fills buf with a fresh file name "kvtier-llama-<what>-<16 hex>.bin". */
void kvclient_new_name(const char *what, char *buf, size_t len);

/* The slot directory as seen by the plugin (the configured path). */
const char *kvclient_slot_dir(struct kvclient *k);

#endif /* KVTIER_PLUGIN_KVCLIENT_H */
