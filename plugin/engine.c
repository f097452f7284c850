/* engine.c: slot management around each request, backend health, saves.
 *
 * A managed request goes through these steps, all on the caller's thread:
 *  1. tokens: per namespace (backends of one namespace share a tokenizer),
 *     /apply-template for chat, then /tokenize with add_special; a prompt of
 *     token ids is taken as is;
 *  2. a slot (slots_choose), waiting in its queue if it is busy;
 *  3. if the slot holds a tracked prefix, the backend has GET /slots and the
 *     slot was last used --slot-check-ms ago or more, the slot's task id is
 *     checked: another id means someone else (or a restart) changed the
 *     slot, and the tracked prefix is dropped;
 *  4. kvtier's best match; a restore when it beats the slot's prefix by the
 *     break-even and its header passes (0 < n_tokens <= n_ctx);
 *  5. the forward, with id_slot and cache_prompt, streamed into the sink
 *     while the timings are picked out of the answer on the side; the
 *     client's answer ends with the backend's (sink on_end), so step 6 is
 *     not on its path;
 *  6. verification, Report, the slot's new tokens, and a save job queued on
 *     the slot (the slot passes to the save, so it completes before anyone
 *     else uses the slot).
 * Anything the engine cannot manage (other paths, arrays of prompts,
 * multimodal input, a prompt longer than the slot context) is forwarded
 * untouched to a backend that is up.
 *
 * The request body is read in place (jscan.h) and forwarded from its own
 * bytes: the engine never builds a parse tree of it nor copies it, and holds
 * at most n_ctx token ids of its prompt.
 *
 * This module must never fail a user's request because of kvtier: every
 * restore and save problem ends in plain prefill and a counter. It must never
 * send a backend an empty slot action, an unchecked file name, a 0-token or
 * oversized blob, or an id_slot the backend does not have.
 */
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "backend.h"
#include "log.h"
#include "promptcache.h"
#include "slotfile.h"
#include "slots.h"

#define SAVE_QUEUE_MAX 1024
#define SAVERS_MAX 8
#define SIDE_BODY_MAX (32u << 20) /* non-streamed answers parsed for timings */
#define SSE_LINE_MAX (8u << 20)
#define SHORT_CALL_MAX_MS 10000u /* tokenize, apply-template, props, slots */
#define HEALTH_TIMEOUT_MS 3000u
#define SWEEP_EVERY_S 60
#define VERIFY_SLACK_MIN 32 /* prompt_n may exceed the expectation by this much */
#define IGNORED_STREAK_MAX 3 /* ignored restores in a row that stop restores... */
#define IGNORED_BACKOFF_S 600 /* ...for this long, then one is tried again */
#define PROBE_RETRY_S 30       /* a failed layout probe is tried again this often */

struct save_job {
	struct save_job *next;
	unsigned b, s;
	char url[512];
	char ns[256];
	size_t n_tokens;
};

struct engine {
	struct engine_config cfg;
	struct slot_table t;
	struct kvclient *kv;
	struct gguf_summary gguf;
	int have_gguf;
	atomic_int stopping;
	pthread_mutex_t lock;      /* the save queue and the health thread's sleep */
	pthread_mutex_t disc_lock; /* one discover() at a time */
	pthread_cond_t cond;
	struct save_job *sq_head, *sq_tail;
	unsigned sq_len;
	pthread_t health;
	int health_started;
	pthread_t savers[SAVERS_MAX];
	unsigned n_savers;
	atomic_uint rr;                              /* round robin for pass-through */
	atomic_uint health_fail[SLOTS_MAX_BACKENDS]; /* failed health checks in a row */
	double probe_next[SLOTS_MAX_BACKENDS];       /* next layout probe retry, monotonic s */
	pthread_mutex_t pc_lock; /* the models of the backends' prompt caches; after t.lock */
	struct pcache pc[SLOTS_MAX_BACKENDS];
};

/* A backend's state copied out of the table. */
struct bsnap {
	char url[512];
	char ns[256];
	int up;
	unsigned n_slots;
	uint32_t n_ctx;
	int has_slots_api;
	uint32_t mem_kind;
	int swa;
	double restores_off_until;
	int retry_probe;
	int server_cache;
	int clears_idle;
};

/* Timings picked out of an answer on its way to the client. */
struct side {
	int sse; /* Content-Type text/event-stream */
	int enabled;
	char *buf; /* non-SSE: the body; SSE: the current line */
	size_t len, cap;
	int overflow;
	int have_timings;
	double prompt_n, prompt_ms, per_token_ms;
	double t_first; /* first body byte, monotonic s */
};

/* Tokens of one namespace's tokenizer. */
struct group {
	char key[272];
	int32_t *tokens;
	size_t n;
	int state; /* 0 untried, 1 tokens known, -1 failed */
};

struct job {
	struct engine *e;
	const struct engine_request *rq;
	const struct engine_sink *sink;
	struct side side;
	long status;
	int headers_passed;
	int broken; /* the transfer broke after the headers went out */
	/* Where the request's time went, in seconds (the request_timing log line). */
	double t_tokenize, t_wait, t_check, t_lookup, t_restore, t_forward;
	struct group groups[SLOTS_MAX_BACKENDS];
	unsigned n_groups;
	int group_of[SLOTS_MAX_BACKENDS];
};

enum run_result { RUN_DONE, RUN_RETRY };

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Timeout of the short calls: --slot-timeout-ms, at most SHORT_CALL_MAX_MS. */
static unsigned short_ms(const struct engine *e)
{
	return e->cfg.slot_timeout_ms < SHORT_CALL_MAX_MS ? e->cfg.slot_timeout_ms
	                                                  : SHORT_CALL_MAX_MS;
}

/* Copies backend bi's state out of the table (under its lock). */
static void snap(struct engine *e, unsigned bi, struct bsnap *o)
{
	const struct slot_backend *b = &e->t.b[bi];

	pthread_mutex_lock(&e->t.lock);
	memcpy(o->url, b->url, sizeof(o->url));
	memcpy(o->ns, b->ns, sizeof(o->ns));
	o->up = b->up;
	o->n_slots = b->n_slots;
	o->n_ctx = b->n_ctx;
	o->has_slots_api = b->has_slots_api;
	o->mem_kind = b->mem_kind;
	o->swa = b->swa;
	o->restores_off_until = b->restores_off_until;
	o->retry_probe = b->retry_probe;
	o->server_cache = b->server_cache;
	o->clears_idle = b->clears_idle;
	pthread_mutex_unlock(&e->t.lock);
}

/* Marks backend bi down and forgets what its slots hold. */
static void mark_down(struct engine *e, unsigned bi, const char *why)
{
	int was_up;
	unsigned n;

	pthread_mutex_lock(&e->t.lock);
	was_up = e->t.b[bi].up;
	e->t.b[bi].up = 0;
	pthread_mutex_unlock(&e->t.lock);
	n = slots_forget_backend(&e->t, bi);
	for (unsigned i = 0; i < n; i++)
		metrics_slot_reset(METRICS_RESET_BACKEND_DOWN);
	metrics_backend_up(bi, 0);
	if (was_up)
		klog(LOG_WARN, "event=backend_down url=%s reason=\"%s\" slots_forgotten=%u",
		     e->t.b[bi].url, why, n);
}

/* ---- backend examination ---- */

/* The namespace of backend `url` from its /props and /v1/models. */
static void namespace_of(struct engine *e, const json_t *props, const json_t *models,
                         struct fingerprint *fp)
{
	char why[256];

	if (e->cfg.ns_override) {
		memset(fp, 0, sizeof(*fp));
		snprintf(fp->ns, sizeof(fp->ns), "%s", e->cfg.ns_override);
		fp->source = "override";
		snprintf(fp->why, sizeof(fp->why), "--namespace given");
		return;
	}
	if (e->have_gguf) {
		if (fingerprint_gguf_matches(&e->gguf, models, why, sizeof(why))) {
			fingerprint_from_gguf(&e->gguf, &e->cfg.kv, fp);
			return;
		}
		if (fingerprint_from_props(props, models, &e->cfg.kv, fp) == 0) {
			char tmp[sizeof(fp->why)];

			/* Truncation only shortens a log line. */
			if (snprintf(tmp, sizeof(tmp),
			             "--model-file does not match this server (%s); %s", why,
			             fp->why) < 0)
				tmp[0] = '\0';
			memcpy(fp->why, tmp, sizeof(fp->why));
		}
		return;
	}
	fingerprint_from_props(props, models, &e->cfg.kv, fp);
}

/* The probe of a save (backend_probe): the file is there, parses as a slot
 * file with tokens, and has the size it had at the previous look. */
struct save_probe {
	const char *path;
	long long last_size; /* -1: not seen yet */
};

static int save_seen(void *ctx)
{
	struct save_probe *p = ctx;
	struct slot_info si;
	char why[256];
	struct stat st;
	int fd, ok = 0;

	fd = open(p->path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	/* An empty slot's file is complete too (refused as empty by contract). */
	if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0 &&
	    (slot_parse_fd(fd, &si, NULL, why, sizeof(why)) == 0 ||
	     strncmp(why, "empty slot file", 15) == 0)) {
		ok = (long long)st.st_size == p->last_size;
		p->last_size = (long long)st.st_size;
	}
	close(fd);
	return ok;
}

/* ---- layout probe ----
 *
 * Whether a slot file loads into a server depends on the model, the KV types,
 * flash attention (which -fa auto turns on by itself on many builds), the
 * number of KV streams (--parallel without -kvu writes one per slot, and a
 * file loads only where n_stream is the same), the memory's sections
 * (sliding-window, recurrent, hybrid) and the server's state format: none of
 * which llama-server reports. A failed restore clears the slot and can leave
 * corrupt KV behind (llama.cpp #27068), so a blob must never reach a server
 * it does not fit. At discovery the plugin therefore saves a slot and reads
 * the layout from the file itself (common/slotfile.c): an idle slot as it
 * is; when that save shows no layer headers (an empty slot of a KV cache), a
 * three-token completion first, then the save, then the slot is erased. The
 * layout's signature becomes part of the namespace. */

/* Saves slot s of url into a probe file and parses it. Returns 0 when the
 * file parsed (*si filled; an empty slot's file too), else -1 with why. */
static int probe_save(struct engine *e, const char *url, unsigned s, struct slot_info *si,
                      char *why, size_t whylen)
{
	struct backend_reply r = {0};
	char name[96], path[4096 + 100], err[256] = "";
	struct save_probe sp = {.path = path, .last_size = -1};
	const struct backend_probe lost = {.done = save_seen, .ctx = &sp};
	const json_t *nw;
	json_int_t n_written;
	struct stat st;
	int rc, fd;

	kvclient_new_name("probe", name, sizeof(name));
	snprintf(path, sizeof(path), "%s/%s", kvclient_slot_dir(e->kv), name);
	/* A save carried out but never answered (ik_llama.cpp) is seen from its file. */
	rc = backend_slot_action(url, s, "save", name, e->cfg.slot_timeout_ms, &lost, &r);
	nw = json_object_get(r.json, "n_written");
	n_written = json_is_integer(nw) ? json_integer_value(nw) : 0;
	if (rc == -EALREADY) {
		rc = 0;
		r.status = 200;
		n_written = sp.last_size;
	}
	if (rc || r.status != 200 || n_written <= 0) {
		snprintf(why, whylen, "saving slot %u failed: %.160s", s,
		         rc || r.status != 200 ? r.err : "n_written 0");
		rc = -1;
		goto out;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0 || fstat(fd, &st) < 0 || st.st_size != (off_t)n_written) {
		snprintf(why, whylen, "the saved file %.160s is not in --slot-dir as the server "
		         "reported it", path);
		if (fd >= 0)
			close(fd);
		rc = -1;
		goto out;
	}
	rc = slot_parse_fd(fd, si, NULL, err, sizeof(err));
	close(fd);
	/* An empty slot's file is refused as such (slotfile.h), its shape filled. */
	if (rc && !(rc == KVTIER_E_INVALID && strncmp(err, "empty slot file", 15) == 0)) {
		snprintf(why, whylen, "the saved file does not parse: %.160s", err);
		rc = -1;
		goto out;
	}
	rc = 0;
out:
	kvclient_discard(e->kv, name);
	backend_reply_free(&r);
	return rc;
}

/* Does the probe show the whole layout: every section with its layer
 * headers, and tokens enough to tell a recurrent state from a KV one? */
static int probe_complete(const struct slot_info *si)
{
	if (si->state_kind == SLOT_STATE_OPAQUE)
		return si->n_tokens >= 2;
	if (si->n_tokens < 2 || si->n_sections == 0)
		return 0;
	for (uint32_t i = 0; i < si->n_sections; i++)
		if (si->sec[i].n_layer == 0)
			return 0;
	return 1;
}

/* The layout of backend url's slot files, as a namespace suffix in tag.
 * Returns 0, or -1 with why. */
static int probe_layout(struct engine *e, const char *url, const json_t *slots_json,
                        unsigned n_slots, const json_t *props, struct slot_info *si,
                        char *tag, size_t taglen, char *why, size_t whylen)
{
	unsigned s = 0;
	uint8_t md[32];
	char hex[21];
	int rc;

	/* An idle slot (the save waits for a busy one). */
	for (unsigned i = 0; json_is_array(slots_json) && i < json_array_size(slots_json); i++) {
		const json_t *sj = json_array_get(slots_json, i);

		if (!json_is_true(json_object_get(sj, "is_processing")) && i < n_slots) {
			s = i;
			break;
		}
	}
	rc = probe_save(e, url, s, si, why, whylen);
	if (rc)
		return -1;
	if (!probe_complete(si)) {
		struct backend_reply tr = {0}, cr = {0}, er = {0};
		int32_t *tok = NULL;
		size_t n = 0;
		json_t *q = NULL, *arr;

		rc = backend_tokenize(url, "kvtier layout probe", short_ms(e), &tok, &n, &tr);
		if (rc || n < 3) {
			snprintf(why, whylen, "tokenizing the probe prompt failed: %.160s",
			         rc ? tr.err : "fewer than 3 tokens");
			rc = -1;
			goto done;
		}
		arr = json_array();
		for (size_t i = 0; arr && i < n; i++)
			json_array_append_new(arr, json_integer(tok[i]));
		q = json_pack("{s:o,s:i,s:i,s:b,s:f}", "prompt", arr, "n_predict", 1, "id_slot",
		              (int)s, "cache_prompt", 1, "temperature", 0.0);
		rc = q ? backend_post_json(url, "/completion", q, e->cfg.slot_timeout_ms, &cr)
		       : -ENOMEM;
		if (rc || cr.status != 200) {
			snprintf(why, whylen, "the probe completion failed: %.160s",
			         rc ? cr.err : "HTTP error");
			rc = -1;
			goto done;
		}
		rc = probe_save(e, url, s, si, why, whylen);
		/* The slot held nothing before: leave it so. */
		backend_slot_action(url, s, "erase", "kvtier-llama-probe.bin",
		                    e->cfg.slot_timeout_ms, NULL, &er);
		if (rc == 0 && !probe_complete(si)) {
			snprintf(why, whylen, "the probe's save holds %u tokens and %u sections",
			         si->n_tokens, si->n_sections);
			rc = -1;
		}
	done:
		json_decref(q);
		free(tok);
		backend_reply_free(&tr);
		backend_reply_free(&cr);
		backend_reply_free(&er);
		if (rc)
			return -1;
	}
	/* The tag: kind, header version, token form and a digest of the
	 * signature; for an opaque state also the server's build, since
	 * nothing else tells two builds' formats apart. */
	{
		EVP_MD_CTX *c = EVP_MD_CTX_new();
		unsigned int len = 0;

		if (!c || !EVP_DigestInit_ex(c, EVP_sha256(), NULL) ||
		    !EVP_DigestUpdate(c, si->layout, si->layout_len) ||
		    !EVP_DigestFinal_ex(c, md, &len)) {
			EVP_MD_CTX_free(c);
			snprintf(why, whylen, "out of memory");
			return -1;
		}
		EVP_MD_CTX_free(c);
		for (int i = 0; i < 10; i++)
			snprintf(hex + 2 * i, 3, "%02x", md[i]);
	}
	if (si->state_kind == SLOT_STATE_OPAQUE) {
		const json_t *bi = json_object_get(props, "build_info");
		char build[48] = "unknown";

		if (json_is_string(bi)) {
			size_t k = 0;
			for (const char *p = json_string_value(bi); *p && k + 1 < sizeof(build); p++)
				if ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z') ||
				    (*p >= 'A' && *p <= 'Z') || *p == '-' || *p == '.')
					build[k++] = *p;
			build[k] = '\0';
		}
		snprintf(tag, taglen, "L=opaque-v%u-%s-%s-%s", si->version,
		         si->token_form == SLOT_TOKENS_PACKED ? "packed" : "plain", build, hex);
	} else {
		snprintf(tag, taglen, "L=%s%s-v%u-%s-%s", slot_state_kind_name(si->state_kind),
		         si->n_sections == 2 && si->state_kind == SLOT_STATE_KV ? "+swa" : "",
		         si->version, si->token_form == SLOT_TOKENS_PACKED ? "packed" : "plain",
		         hex);
	}
	return 0;
}

/* Asks backend bi for /props, /v1/models and /slots and, when it answers,
 * puts it (back) into service with a fresh slot table row. Returns 0 or the
 * error of the /props call. */
static int discover(struct engine *e, unsigned bi, int log_failure)
{
	struct backend_reply props = {0}, models = {0}, slots = {0};
	struct fingerprint fp;
	struct slot_info si;
	char layout[200] = "-";
	int probe_failed = 0, server_cache = 0, clears_idle = 0;
	const char *url = e->t.b[bi].url;
	unsigned n_slots = 0;
	uint32_t n_ctx = 0;
	int has_slots = 0, rc;

	rc = backend_get_json(url, "/props", short_ms(e), &props);
	if (rc == 0 && (props.status != 200 || !json_is_object(props.json)))
		rc = -EPROTO;
	if (rc) {
		if (log_failure)
			klog(LOG_WARN,
			     "event=backend url=%s up=0 error=\"%s\" "
			     "hint=\"retried every %u ms; requests go to the other backends\"",
			     url, props.err[0] ? props.err : "bad /props answer", e->cfg.health_ms);
		goto out;
	}
	backend_get_json(url, "/v1/models", short_ms(e), &models);
	if (backend_get_json(url, "/slots", short_ms(e), &slots) == 0 && slots.status == 200 &&
	    json_is_array(slots.json) && json_array_size(slots.json) > 0) {
		const json_t *s0 = json_array_get(slots.json, 0);

		has_slots = 1;
		n_slots = (unsigned)json_array_size(slots.json);
		if (json_is_integer(json_object_get(s0, "n_ctx")))
			n_ctx = (uint32_t)json_integer_value(json_object_get(s0, "n_ctx"));
	}
	if (!has_slots) {
		const json_t *ts = json_object_get(props.json, "total_slots");

		if (json_is_integer(ts) && json_integer_value(ts) > 0)
			n_slots = (unsigned)json_integer_value(ts);
	}
	if (!n_ctx) {
		const json_t *dgs = json_object_get(props.json, "default_generation_settings");
		const json_t *nc = json_object_get(dgs, "n_ctx");

		if (json_is_integer(nc) && json_integer_value(nc) > 0)
			n_ctx = (uint32_t)json_integer_value(nc);
	}
	if (n_slots == 0) {
		rc = -EPROTO;
		if (log_failure)
			klog(LOG_WARN,
			     "event=backend url=%s up=0 error=\"neither GET /slots nor /props "
			     "total_slots gives the number of slots\"",
			     url);
		goto out;
	}
	if (n_slots > SLOTS_MAX_PER_BACKEND) {
		klog(LOG_WARN, "event=backend_slots_capped url=%s n_slots=%u used=%u", url, n_slots,
		     SLOTS_MAX_PER_BACKEND);
		n_slots = SLOTS_MAX_PER_BACKEND;
	}
	namespace_of(e, props.json, models.json, &fp);
	if (fp.ns[0] && !e->cfg.ns_override && backend_model(url)) {
		/* One model of a router: the router's name for it is part of its
		 * identity (its /props may describe another file under one name). */
		size_t l = strlen(fp.ns);
		if (snprintf(fp.ns + l, sizeof(fp.ns) - l, "/M=%s", backend_model(url)) >=
		    (int)(sizeof(fp.ns) - l))
			fp.ns[l] = '\0';
	}
	memset(&si, 0, sizeof(si));
	if (fp.ns[0] && !e->cfg.ns_override) {
		char tag[128], why[256];

		if (probe_layout(e, url, slots.json, n_slots, props.json, &si, tag, sizeof(tag), why,
		                 sizeof(why)) == 0 &&
		    strlen(fp.ns) + 1 + strlen(tag) < sizeof(fp.ns)) {
			size_t l = strlen(fp.ns);
			snprintf(fp.ns + l, sizeof(fp.ns) - l, "/%s", tag);
			slot_layout_describe(si.layout, si.layout_len, layout, sizeof(layout));
		} else {
			/* Retried every health round: warn once. */
			klog(e->t.b[bi].retry_probe ? LOG_DEBUG : LOG_WARN,
			     "event=layout_probe_failed url=%s reason=\"%s\" "
			     "hint=\"without the layout of its slot files no blob is restored or "
			     "saved for this backend; retried every 30 s\"",
			     url, why);
			fp.ns[0] = '\0';
			probe_failed = 1;
		}
	}
	/* The file does not say whether the server runs with --swa-full (its
	 * window section is the same either way): the ignored restores will. */
	if (si.state_kind == SLOT_STATE_KV && si.n_sections == 2)
		klog(LOG_INFO,
		     "event=sliding_window_model url=%s hint=\"a sliding-window model: llama-server "
		     "uses a restored slot only when started with --swa-full (ik_llama.cpp has "
		     "none). If this one runs without it, every restore is ignored, and the plugin "
		     "stops restoring into it after %u ignored restores in a row (then tries one "
		     "every %u s)\"",
		     url, IGNORED_STREAK_MAX, IGNORED_BACKOFF_S);
	if (si.state_kind == SLOT_STATE_RECURRENT || si.state_kind == SLOT_STATE_HYBRID)
		klog(LOG_INFO,
		     "event=recurrent_model url=%s kind=%s hint=\"a recurrent state cannot be "
		     "rolled back: a blob is restored only when the prompt extends its tokens "
		     "exactly\"",
		     url, slot_state_kind_name(si.state_kind));
	/* llama-server's own RAM prompt cache: a server whose slot files have
	 * today's layouts has one (since late 2025; ik_llama.cpp and older
	 * servers write the early-2025 layout). With unified KV (one stream for
	 * several slots, the default) it clears idle slots when a task starts. */
	{
		int today = si.state_kind == SLOT_STATE_KV || si.state_kind == SLOT_STATE_RECURRENT ||
		            si.state_kind == SLOT_STATE_HYBRID;
		int unified = si.state_kind == SLOT_STATE_RECURRENT ||
		              (si.n_sections && si.sec[0].n_stream == 1);
		double bpt = si.n_tokens_all && si.file_size > si.state_offset
		                 ? (double)(si.file_size - si.state_offset) / si.n_tokens_all
		                 : 1;

		server_cache = today && e->cfg.server_cache_ram_mib > 0;
		clears_idle = server_cache && e->cfg.server_cache_idle_slots && unified && n_slots > 1;
		pthread_mutex_lock(&e->pc_lock);
		pcache_clear(&e->pc[bi]);
		pcache_init(&e->pc[bi], server_cache ? (uint64_t)e->cfg.server_cache_ram_mib << 20 : 0,
		            bpt);
		pthread_mutex_unlock(&e->pc_lock);
	}
	slots_forget_backend(&e->t, bi);
	pthread_mutex_lock(&e->t.lock);
	{
		struct slot_backend *b = &e->t.b[bi];

		snprintf(b->ns, sizeof(b->ns), "%s", fp.ns);
		b->server_cache = server_cache;
		b->clears_idle = clears_idle;
		b->retry_probe = probe_failed;
		b->mem_kind = si.state_kind;
		b->swa = si.state_kind == SLOT_STATE_KV && si.n_sections == 2;
		b->ignored_streak = 0;
		b->restores_off_until = 0;
		b->n_slots = n_slots;
		b->n_ctx = n_ctx;
		b->has_slots_api = has_slots;
		b->generation++;
		b->up = 1;
	}
	pthread_mutex_unlock(&e->t.lock);
	e->health_fail[bi] = 0;
	metrics_backend_up(bi, 1);
	klog(fp.ns[0] ? LOG_INFO : LOG_WARN,
	     "event=backend url=%s up=1 namespace=%s source=%s n_slots=%u n_ctx=%u slots_api=%s "
	     "layout=\"%s\" server_cache=%s why=\"%s\"%s",
	     url, fp.ns[0] ? fp.ns : "-", fp.source, n_slots, n_ctx, has_slots ? "yes" : "no",
	     layout, clears_idle ? "clears-idle-slots" : server_cache ? "on" : "off", fp.why,
	     fp.ns[0] ? "" : " hint=\"no blobs are restored or saved for this backend\"");
out:
	backend_reply_free(&props);
	backend_reply_free(&models);
	backend_reply_free(&slots);
	return rc;
}

/* When no backend is up, examines the down ones at once instead of waiting
 * for the health thread (a restart is often over by the time a request
 * comes). Returns the number of backends up. */
static unsigned revive(struct engine *e)
{
	unsigned up = 0;
	struct bsnap b;

	for (unsigned bi = 0; bi < e->t.n_backends; bi++) {
		snap(e, bi, &b);
		up += b.up != 0;
	}
	if (up || atomic_load(&e->stopping))
		return up;
	pthread_mutex_lock(&e->disc_lock);
	for (unsigned bi = 0; bi < e->t.n_backends; bi++) {
		snap(e, bi, &b);
		if (b.up || discover(e, bi, 0) == 0)
			up++;
	}
	pthread_mutex_unlock(&e->disc_lock);
	return up;
}

/* One health round: up backends are pinged, down ones examined again. */
static void health_round(struct engine *e)
{
	for (unsigned bi = 0; bi < e->t.n_backends && !atomic_load(&e->stopping); bi++) {
		struct backend_reply r = {0};
		struct bsnap b;
		int rc;

		snap(e, bi, &b);
		if (!b.up) {
			pthread_mutex_lock(&e->disc_lock);
			snap(e, bi, &b);
			if (!b.up)
				discover(e, bi, 0);
			pthread_mutex_unlock(&e->disc_lock);
			continue;
		}
		if (b.retry_probe && now_s() >= e->probe_next[bi]) {
			/* The layout probe failed at discovery: try it again, now and
			 * then (each try may hold one of an ik_llama.cpp server's HTTP
			 * threads for ever). */
			e->probe_next[bi] = now_s() + PROBE_RETRY_S;
			pthread_mutex_lock(&e->disc_lock);
			discover(e, bi, 0);
			pthread_mutex_unlock(&e->disc_lock);
			continue;
		}
		rc = backend_get_json(b.url, "/health", HEALTH_TIMEOUT_MS, &r);
		if (rc == -ECONNREFUSED) {
			mark_down(e, bi, r.err);
		} else if (rc == -ETIMEDOUT && slots_held(&e->t, bi) > 0) {
			/* A server busy with our own requests may be slow to answer
			 * (ik_llama.cpp's /health timed out during a 4K-token prefill);
			 * a restart refuses connections or changes its slots' task ids,
			 * and that is seen. */
			klog(LOG_DEBUG, "event=health_slow url=%s busy_slots=%u", b.url,
			     slots_held(&e->t, bi));
		} else if (rc || r.status != 200) {
			/* One slow answer is not a restart; two in a row is trouble. */
			if (++e->health_fail[bi] >= 2)
				mark_down(e, bi, r.err[0] ? r.err : "health check failed");
		} else {
			e->health_fail[bi] = 0;
		}
		backend_reply_free(&r);
	}
}

/* The health thread: a round every --health-interval-ms, the slot directory
 * swept of orphans every minute, until engine_begin_stop(). */
static void *health_main(void *arg)
{
	struct engine *e = arg;
	double last_sweep = now_s();
	unsigned max_age = e->cfg.slot_timeout_ms / 1000 * 2 + 600;

	pthread_mutex_lock(&e->lock);
	while (!atomic_load(&e->stopping)) {
		struct timespec dl;

		clock_gettime(CLOCK_MONOTONIC, &dl);
		dl.tv_sec += e->cfg.health_ms / 1000;
		dl.tv_nsec += (long)(e->cfg.health_ms % 1000) * 1000000L;
		if (dl.tv_nsec >= 1000000000L) {
			dl.tv_sec++;
			dl.tv_nsec -= 1000000000L;
		}
		pthread_cond_timedwait(&e->cond, &e->lock, &dl);
		if (atomic_load(&e->stopping))
			break;
		pthread_mutex_unlock(&e->lock);
		health_round(e);
		if (now_s() - last_sweep >= SWEEP_EVERY_S) {
			kvclient_sweep(e->kv, max_age);
			last_sweep = now_s();
		}
		pthread_mutex_lock(&e->lock);
	}
	pthread_mutex_unlock(&e->lock);
	return NULL;
}

/* ---- saves ---- */

static void run_save(struct engine *e, struct save_job *j)
{
	struct backend_reply r = {0};
	struct kvtier_put_result pr;
	char name[96], path[4096 + 100], err[512] = "";
	struct save_probe sp = {.path = path, .last_size = -1};
	const struct backend_probe probe = {.done = save_seen, .ctx = &sp};
	const json_t *nw;
	json_int_t n_written;
	double t0 = now_s();
	uint64_t bytes = 0;
	struct stat st;
	int rc, lost = 0;

	kvclient_new_name("save", name, sizeof(name));
	snprintf(path, sizeof(path), "%s/%s", kvclient_slot_dir(e->kv), name);
	rc = backend_slot_action(j->url, j->s, "save", name, e->cfg.slot_timeout_ms, &probe, &r);
	if (rc == -EALREADY) {
		/* Written, never answered: ik_llama.cpp's lost result. */
		lost = 1;
		rc = 0;
		r.status = 200;
		klog(LOG_WARN,
		     "event=save_answer_lost url=%s slot=%u file=%s waited_ms=%.0f "
		     "reason=\"the server wrote the file but never answered; one of its HTTP "
		     "threads now waits forever (ik_llama.cpp: see docs/kvtier-llama.md)\"",
		     j->url, j->s, name, (now_s() - t0) * 1000);
	}
	if (rc == -ETIMEDOUT) {
		/* The server may still write the file later: the sweep removes it. */
		metrics_save(METRICS_SAVE_TIMEOUT);
		klog(LOG_WARN, "event=save outcome=timeout url=%s slot=%u timeout_ms=%u", j->url,
		     j->s, e->cfg.slot_timeout_ms);
		goto out;
	}
	nw = json_object_get(r.json, "n_written");
	n_written = json_is_integer(nw) ? json_integer_value(nw) : 0;
	if (lost)
		n_written = sp.last_size;
	if (rc || r.status != 200 || n_written <= 0) {
		metrics_save(METRICS_SAVE_FAILED);
		klog(LOG_WARN, "event=save outcome=failed url=%s slot=%u reason=\"%s\"", j->url,
		     j->s, rc || r.status != 200 ? r.err : "the server answered n_written 0");
		kvclient_discard(e->kv, name);
		goto out;
	}
	if (stat(path, &st) < 0 || !S_ISREG(st.st_mode) || (json_int_t)st.st_size != n_written) {
		metrics_save(METRICS_SAVE_FAILED);
		klog(LOG_WARN,
		     "event=save outcome=failed url=%s slot=%u reason=\"%s\" "
		     "n_written=%" JSON_INTEGER_FORMAT " size=%lld",
		     j->url, j->s,
		     errno == ENOENT ? "the saved file is not in --slot-dir"
		                     : "the saved file's size is not n_written",
		     n_written, (long long)(S_ISREG(st.st_mode) ? st.st_size : -1));
		kvclient_discard(e->kv, name);
		goto out;
	}
	rc = kvclient_ingest(e->kv, j->ns, name, (uint64_t)n_written, &pr, &bytes, err, sizeof(err));
	if (rc) {
		metrics_save(METRICS_SAVE_FAILED);
		klog(LOG_WARN, "event=save outcome=failed url=%s slot=%u ns=%s reason=\"%s\"",
		     j->url, j->s, j->ns, err);
		goto out;
	}
	metrics_save(lost ? METRICS_SAVE_ANSWER_LOST : METRICS_SAVE_OK);
	metrics_bytes(METRICS_DIR_SAVE, bytes);
	klog(LOG_INFO,
	     "event=save outcome=ok url=%s slot=%u ns=%s blob=%s n_tokens=%u bytes=%" PRIu64
	     " superseded=%u dedup=%d ms=%.1f",
	     j->url, j->s, j->ns, pr.blob, pr.n_tokens, bytes, pr.n_superseded, pr.deduplicated,
	     (now_s() - t0) * 1000);
out:
	backend_reply_free(&r);
	slots_save_done(&e->t, j->b, j->s);
}

/* A save thread: runs queued saves in order; when stopping, drains the queue
 * first (each save is bounded by --slot-timeout-ms), then returns. */
static void *saver_main(void *arg)
{
	struct engine *e = arg;

	for (;;) {
		struct save_job *j;

		pthread_mutex_lock(&e->lock);
		while (!e->sq_head && !atomic_load(&e->stopping))
			pthread_cond_wait(&e->cond, &e->lock);
		j = e->sq_head;
		if (j) {
			e->sq_head = j->next;
			if (!e->sq_head)
				e->sq_tail = NULL;
			e->sq_len--;
		}
		pthread_mutex_unlock(&e->lock);
		if (!j)
			break; /* stopping and the queue is drained */
		run_save(e, j);
		free(j);
	}
	return NULL;
}

/* Queues a save of slot s of backend b, which the caller hands over with
 * slots_release(..., 1). Returns 0, or -1 when it could not be queued (the
 * caller then releases the slot normally). */
static int queue_save(struct engine *e, unsigned b, unsigned s, const struct bsnap *bs,
                      size_t n_tokens)
{
	struct save_job *j = calloc(1, sizeof(*j));

	if (!j)
		return -1;
	j->b = b;
	j->s = s;
	memcpy(j->url, bs->url, sizeof(j->url));
	memcpy(j->ns, bs->ns, sizeof(j->ns));
	j->n_tokens = n_tokens;
	pthread_mutex_lock(&e->lock);
	if (e->sq_len >= SAVE_QUEUE_MAX || atomic_load(&e->stopping)) {
		pthread_mutex_unlock(&e->lock);
		free(j);
		return -1;
	}
	if (e->sq_tail)
		e->sq_tail->next = j;
	else
		e->sq_head = j;
	e->sq_tail = j;
	e->sq_len++;
	pthread_cond_broadcast(&e->cond);
	pthread_mutex_unlock(&e->lock);
	return 0;
}

/* ---- the answer, on its way through ---- */

static void side_timings(struct side *sd, const json_t *root)
{
	const json_t *t = json_object_get(root, "timings");

	if (!json_is_object(t) || !json_is_number(json_object_get(t, "prompt_n")))
		return;
	sd->have_timings = 1;
	sd->prompt_n = json_number_value(json_object_get(t, "prompt_n"));
	sd->prompt_ms = json_number_value(json_object_get(t, "prompt_ms"));
	sd->per_token_ms = json_number_value(json_object_get(t, "predicted_per_token_ms"));
}

/* One SSE line: "data: {json}" lines that mention timings are parsed. */
static void side_line(struct side *sd, const char *line, size_t len)
{
	json_t *root;

	while (len && line[len - 1] == '\r')
		len--;
	if (len < 5 || memcmp(line, "data:", 5) != 0)
		return;
	line += 5;
	len -= 5;
	if (!memmem(line, len, "\"timings\"", 9))
		return;
	root = json_loadb(line, len, 0, NULL);
	if (json_is_object(root))
		side_timings(sd, root);
	json_decref(root);
}

/* Appends to the side buffer, at most max bytes in all; past that the
 * buffer is marked overflowed and nothing more is kept. */
static int side_append(struct side *sd, const char *data, size_t n, size_t max)
{
	if (sd->overflow || n > max - sd->len) {
		sd->overflow = 1;
		return -1;
	}
	if (sd->len + n + 1 > sd->cap) {
		size_t cap = sd->cap ? sd->cap : 4096;
		char *p;

		while (cap < sd->len + n + 1)
			cap *= 2;
		p = realloc(sd->buf, cap);
		if (!p) {
			sd->overflow = 1;
			return -1;
		}
		sd->buf = p;
		sd->cap = cap;
	}
	memcpy(sd->buf + sd->len, data, n);
	sd->len += n;
	return 0;
}

/* Feeds answer bytes to the side parser: a non-SSE body is kept (bounded)
 * for the end, SSE is cut into lines and each complete line looked at. */
static void side_feed(struct side *sd, const char *data, size_t n)
{
	if (!sd->enabled)
		return;
	if (!sd->sse) {
		side_append(sd, data, n, SIDE_BODY_MAX);
		return;
	}
	while (n) {
		const char *nl = memchr(data, '\n', n);
		size_t k = nl ? (size_t)(nl - data) : n;

		side_append(sd, data, k, SSE_LINE_MAX);
		if (!nl)
			break;
		if (!sd->overflow)
			side_line(sd, sd->buf, sd->len);
		sd->len = 0;
		sd->overflow = 0;
		data += k + 1;
		n -= k + 1;
	}
}

/* The answer is complete: parses what side_feed kept for the timings. */
static void side_end(struct side *sd)
{
	json_t *root;

	if (!sd->enabled || sd->overflow || !sd->len)
		return;
	if (sd->sse) {
		side_line(sd, sd->buf, sd->len);
		return;
	}
	root = json_loadb(sd->buf, sd->len, 0, NULL);
	if (json_is_object(root))
		side_timings(sd, root);
	json_decref(root);
}

/* The wrapper between the backend transfer and the proxy's sink: notes the
 * content type, the status and the first byte, feeds the side parser, and
 * passes everything on unchanged. */
static int w_header(void *ctx, const char *line, size_t len)
{
	struct job *j = ctx;

	if (len >= 13 && strncasecmp(line, "Content-Type:", 13) == 0) {
		const char *v = line + 13;

		while (*v == ' ' || *v == '\t')
			v++;
		j->side.sse = strncasecmp(v, "text/event-stream", 17) == 0;
	}
	return j->sink->on_header ? j->sink->on_header(j->sink->ctx, line, len) : 0;
}

static int w_headers_done(void *ctx, long status, int64_t content_length)
{
	struct job *j = ctx;

	j->status = status;
	j->headers_passed = 1;
	return j->sink->on_headers_done(j->sink->ctx, status, content_length);
}

static int w_data(void *ctx, const char *data, size_t len)
{
	struct job *j = ctx;

	if (j->side.t_first == 0)
		j->side.t_first = now_s();
	side_feed(&j->side, data, len);
	return j->sink->on_data(j->sink->ctx, data, len);
}

static int w_abort(void *ctx)
{
	struct job *j = ctx;

	if (atomic_load(&j->e->stopping))
		return 1;
	return j->sink->should_abort ? j->sink->should_abort(j->sink->ctx) : 0;
}

/* Answers the client with the proxy's own error, unless the backend's
 * headers already went out (then the client sees the broken answer). */
static void job_error(struct job *j, int status, const char *type, const char *msg)
{
	metrics_request_failed();
	if (!j->headers_passed && j->sink->on_error)
		j->sink->on_error(j->sink->ctx, status, type, msg);
}

/* At most this many members named id_slot or cache_prompt in a managed
 * body (each splits the forwarded body into one more piece). */
#define FWD_DROP_MAX 8

/* A managed request's body as forwarded: the client's own bytes without its
 * id_slot and cache_prompt members, then ours. Pieces point into the body
 * and into `tail`: nothing is copied or serialized again. */
struct fwd_body {
	struct backend_piece pieces[2 * FWD_DROP_MAX + 6];
	unsigned n;
	char tail[64];
};

/* Builds the forwarded body for slot s. The runs of the client's members
 * that are kept are sent as they are, joined by commas. */
static void fwd_body_make(struct fwd_body *f, struct jspan body, unsigned s)
{
	struct jspan k, v;
	const char *run = NULL, *run_end = NULL;
	size_t pos = 0;
	int any = 0;

	f->n = 0;
	f->pieces[f->n++] = (struct backend_piece){"{", 1};
	while (jscan_member_next(body, &pos, &k, &v)) {
		const char *start = k.p - 1; /* the key's opening quote */

		if (jscan_key_is(k, "id_slot") || jscan_key_is(k, "cache_prompt")) {
			if (run) {
				if (any)
					f->pieces[f->n++] = (struct backend_piece){",", 1};
				f->pieces[f->n++] =
				    (struct backend_piece){run, (size_t)(run_end - run)};
				any = 1;
			}
			run = NULL;
			continue;
		}
		if (!run)
			run = start;
		run_end = v.p + v.len;
	}
	if (run) {
		if (any)
			f->pieces[f->n++] = (struct backend_piece){",", 1};
		f->pieces[f->n++] = (struct backend_piece){run, (size_t)(run_end - run)};
		any = 1;
	}
	snprintf(f->tail, sizeof(f->tail), "%s\"id_slot\":%u,\"cache_prompt\":true}",
	         any ? "," : "", s);
	f->pieces[f->n++] = (struct backend_piece){f->tail, strlen(f->tail)};
}

/* How many members fwd_body_make() would drop. */
static unsigned fwd_body_drops(struct jspan body)
{
	struct jspan k, v;
	size_t pos = 0;
	unsigned n = 0;

	while (jscan_member_next(body, &pos, &k, &v))
		n += jscan_key_is(k, "id_slot") || jscan_key_is(k, "cache_prompt");
	return n;
}

static int forward_pieces(struct job *j, const char *url, const struct backend_piece *pieces,
                          unsigned n_pieces, struct backend_result *res);

/* Forwards body (or the client's own) to backend url; the answer goes to the
 * sink. Returns backend_forward's code; res is filled. */
static int forward(struct job *j, const char *url, const char *body, size_t body_len,
                   struct backend_result *res)
{
	struct backend_piece one = {body, body_len};

	return forward_pieces(j, url, body ? &one : NULL, body ? 1 : 0, res);
}

static int forward_pieces(struct job *j, const char *url, const struct backend_piece *pieces,
                          unsigned n_pieces, struct backend_result *res)
{
	const struct engine_request *rq = j->rq;
	struct backend_sink s = {.ctx = j,
	                         .on_header = w_header,
	                         .on_headers_done = w_headers_done,
	                         .on_data = w_data,
	                         .should_abort = w_abort};
	struct backend_request q = {.method = rq->method,
	                            .base = url,
	                            .uri = rq->uri,
	                            .headers = (char **)rq->headers,
	                            .pieces = pieces,
	                            .n_pieces = n_pieces,
	                            .timeout_ms = j->e->cfg.timeout_ms};

	int rc = backend_forward(&q, &s, res);

	if (rc && res->headers_done)
		j->broken = 1;
	return rc;
}

/* Answers the client when a forward produced no response headers. */
static void forward_failed(struct job *j, int rc, const struct backend_result *res)
{
	char msg[400];

	if (j->headers_passed || res->aborted)
		return;
	if (rc == -ETIMEDOUT) {
		snprintf(msg, sizeof(msg), "the backend did not answer within --timeout-ms %u (%s)",
		         j->e->cfg.timeout_ms, res->err);
		job_error(j, 504, "unavailable_error", msg);
	} else {
		snprintf(msg, sizeof(msg), "the backend failed: %s", res->err);
		job_error(j, 502, "unavailable_error", msg);
	}
}

/* ---- pass-through ---- */

static int passthrough(struct engine *e, const struct engine_request *rq,
                       const struct engine_sink *sink)
{
	struct job *j = calloc(1, sizeof(*j));
	unsigned n = e->t.n_backends, start = atomic_fetch_add(&e->rr, 1);
	int broken = 0;

	metrics_request(rq->endpoint, METRICS_HANDLING_PASSTHROUGH);
	revive(e);
	if (!j) {
		metrics_request_failed();
		sink->on_error(sink->ctx, 500, "server_error", "out of memory");
		return 0;
	}
	j->e = e;
	j->rq = rq;
	j->sink = sink;
	for (unsigned i = 0; i < n; i++) {
		unsigned bi = (start + i) % n;
		struct backend_result res;
		struct bsnap b;
		int rc;

		snap(e, bi, &b);
		if (!b.up)
			continue;
		rc = forward(j, b.url, rq->body, rq->body_len, &res);
		if (rc == -ECONNREFUSED && !res.headers_done) {
			mark_down(e, bi, res.err);
			continue;
		}
		if (rc && !res.headers_done)
			forward_failed(j, rc, &res);
		goto out;
	}
	job_error(j, 503, "unavailable_error", "no llama-server backend is available");
out:
	broken = j->broken;
	free(j);
	return broken ? -1 : 0;
}

/* ---- managed requests ---- */

/* 1 when a chat message carries anything but text (images, audio): those
 * are passed through without slot management. */
static int chat_is_multimodal(struct jspan messages)
{
	struct jspan m, c, part, type;
	size_t i = 0, k;
	int got;

	while (jscan_element_next(messages, &i, &m)) {
		if (jscan_type(m) != '{')
			continue;
		got = jscan_get(m, "content", &c);
		if (got < 0)
			return 1; /* an escaped key: cannot tell */
		if (got == 0 || jscan_type(c) != '[')
			continue;
		for (k = 0; jscan_element_next(c, &k, &part);) {
			if (jscan_type(part) != '{' || jscan_get(part, "type", &type) != 1 ||
			    !(type.len == 6 && memcmp(type.p, "\"text\"", 6) == 0))
				return 1;
		}
	}
	return 0;
}

/* What the prompt of a request is: views into the request body. */
struct prompt {
	struct jspan text; /* a string prompt (a JSON string, quotes included), or len 0 */
	struct jspan ids;  /* an array of token ids, or len 0 */
	struct jspan chat; /* the chat body, or len 0 */
};

/* Classifies the request body (a checked JSON object). Returns 0 when the
 * engine can manage it. */
static int prompt_of(const struct engine_request *rq, struct jspan body, struct prompt *p)
{
	struct jspan v, first;
	size_t pos = 0;
	int64_t id;

	memset(p, 0, sizeof(*p));
	if (jscan_get(body, "multimodal_data", &v) != 0)
		return -1; /* present, or an escaped key that could spell it */
	if (rq->endpoint == METRICS_EP_V1_CHAT) {
		if (jscan_get(body, "messages", &v) != 1 || jscan_type(v) != '[' ||
		    !jscan_element_next(v, &pos, &first) || chat_is_multimodal(v))
			return -1;
		p->chat = body;
		return 0;
	}
	if (jscan_get(body, "prompt", &v) != 1)
		return -1;
	if (jscan_type(v) == '[' && jscan_element_next(v, &pos, &first) &&
	    jscan_type(first) == '"' && !jscan_element_next(v, &pos, &first)) {
		pos = 0;
		jscan_element_next(v, &pos, &v); /* ["text"] is "text" */
	}
	if (jscan_type(v) == '"') {
		p->text = v;
		return v.len > 2 ? 0 : -1;
	}
	if (jscan_type(v) != '[')
		return -1;
	for (pos = 0; jscan_element_next(v, &pos, &first);)
		if (jscan_int(first, 0, INT32_MAX, &id))
			return -1;
	if (pos == 0)
		return -1; /* [] */
	p->ids = v;
	return 0;
}

/* The most prompt tokens backend b's slots can hold: a longer prompt is
 * not managed (llama-server refuses or truncates it), and its tokens are
 * never held. */
static size_t max_tokens_of(const struct bsnap *b)
{
	return b->n_ctx ? b->n_ctx : BACKEND_MAX_TOKENS;
}

/* Token ids given in the request, at most max of them. */
static int ids_of(struct jspan ids, size_t max, int32_t **tokens, size_t *n)
{
	struct jspan v;
	size_t pos = 0, count = 0, i = 0;
	int64_t x;

	while (jscan_element_next(ids, &pos, &v))
		if (++count > max)
			return -E2BIG;
	*tokens = malloc(count * sizeof(**tokens));
	if (!*tokens)
		return -ENOMEM;
	for (pos = 0; jscan_element_next(ids, &pos, &v); i++) {
		jscan_int(v, 0, INT32_MAX, &x); /* checked by prompt_of */
		(*tokens)[i] = (int32_t)x;
	}
	*n = count;
	return 0;
}

/* Tokenizes the prompt for group g through one of its up backends. */
static int tokenize_group(struct job *j, struct group *g, const struct prompt *p)
{
	struct engine *e = j->e;
	int rc = -ENOENT;

	for (unsigned bi = 0; bi < e->t.n_backends; bi++) {
		struct backend_reply r = {0};
		struct bsnap b;
		char *templated = NULL;
		struct jspan text = p->text;

		if (j->group_of[bi] != (int)(g - j->groups))
			continue;
		snap(e, bi, &b);
		if (!b.up)
			continue;
		if (p->ids.len) {
			rc = ids_of(p->ids, max_tokens_of(&b), &g->tokens, &g->n);
			if (rc == -E2BIG)
				klog(LOG_DEBUG,
				     "event=prompt_too_long url=%s n_ctx=%u action=passthrough",
				     b.url, b.n_ctx);
			break;
		}
		rc = 0;
		if (p->chat.len) {
			rc = backend_apply_template(b.url, p->chat.p, p->chat.len, short_ms(e),
			                            &templated, &text, &r);
			if (rc)
				klog(LOG_DEBUG, "event=apply_template_failed url=%s error=\"%s\"",
				     b.url, r.err);
			backend_reply_free(&r);
		}
		if (rc == 0) {
			rc = backend_tokenize_json(b.url, text.p, text.len, max_tokens_of(&b),
			                           short_ms(e), &g->tokens, &g->n, &r);
			if (rc)
				klog(LOG_DEBUG, "event=tokenize_failed url=%s error=\"%s\"", b.url,
				     r.err);
			backend_reply_free(&r);
		}
		free(templated);
		if (rc == -ECONNREFUSED) {
			mark_down(e, bi, "connection refused");
			continue;
		}
		break;
	}
	return rc;
}

/* Groups the up backends by namespace and tokenizes once per group. A
 * backend that is one model of a router ("URL#MODEL") serves only requests
 * naming that model. Returns the number of groups whose tokens are known. */
static unsigned tokenize_all(struct job *j, const struct prompt *p, const char *model)
{
	struct engine *e = j->e;
	unsigned ok = 0;

	for (unsigned bi = 0; bi < e->t.n_backends; bi++) {
		struct bsnap b;
		char key[272];
		unsigned gi;

		j->group_of[bi] = -1;
		snap(e, bi, &b);
		if (!b.up)
			continue;
		if (backend_model(b.url) && (!model || strcmp(backend_model(b.url), model) != 0))
			continue;
		/* Backends without a namespace are each their own group: nothing
		 * says they share a tokenizer. */
		if (b.ns[0])
			snprintf(key, sizeof(key), "ns:%s", b.ns);
		else
			snprintf(key, sizeof(key), "backend:%u", bi);
		for (gi = 0; gi < j->n_groups; gi++)
			if (strcmp(j->groups[gi].key, key) == 0)
				break;
		if (gi == j->n_groups) {
			memcpy(j->groups[gi].key, key, sizeof(key));
			j->n_groups++;
		}
		j->group_of[bi] = (int)gi;
	}
	for (unsigned gi = 0; gi < j->n_groups; gi++) {
		struct group *g = &j->groups[gi];

		g->state = tokenize_group(j, g, p) == 0 && g->n > 0 ? 1 : -1;
		ok += g->state == 1;
	}
	return ok;
}

/* Checks the slot's task id against the one recorded after our last request
 * there. Returns 1 when the slot is as we left it or nothing can be told. */
static int slot_unchanged(struct engine *e, const struct bsnap *b, unsigned s, int64_t recorded,
                          int64_t *now_task)
{
	struct backend_reply r = {0};
	const json_t *e0;
	size_t i;
	int same = 1;

	*now_task = SLOTS_NO_TASK;
	if (backend_get_json(b->url, "/slots", short_ms(e), &r) != 0 || r.status != 200 ||
	    !json_is_array(r.json))
		goto out;
	json_array_foreach(r.json, i, e0)
	{
		const json_t *id = json_object_get(e0, "id"),
		             *task = json_object_get(e0, "id_task");

		if (!json_is_integer(id) || json_integer_value(id) != (json_int_t)s)
			continue;
		if (!json_is_integer(task)) {
			/* Today's llama-server shows id_task only for a slot that ran a
			 * task since it started: a slot we used without one restarted. */
			if (recorded != SLOTS_NO_TASK && json_object_get(e0, "n_ctx"))
				same = 0;
			break;
		}
		*now_task = json_integer_value(task);
		if (recorded != SLOTS_NO_TASK && *now_task != recorded)
			same = 0;
		break;
	}
out:
	backend_reply_free(&r);
	return same;
}

/* The task id slot s of backend b shows now, or SLOTS_NO_TASK. */
static int64_t slot_task(struct engine *e, const struct bsnap *b, unsigned s)
{
	int64_t t;

	if (!b->has_slots_api)
		return SLOTS_NO_TASK;
	slot_unchanged(e, b, s, SLOTS_NO_TASK, &t);
	return t;
}

/* What happened to the restore of one request. */
struct restore {
	int tried; /* a slot action was sent */
	int ok;    /* the server said it restored */
	char blob[KVTIER_BLOB_ID_LEN + 1];
	uint32_t matched; /* prompt tokens the blob covers */
	double ms;        /* the server's restore_ms, else the call's wall time */
	uint64_t bytes;
};

/* Restores match m into slot s of backend b if it is worth it and safe.
 * *tracked is the slot's known prefix, updated to what it holds after. */
static void maybe_restore(struct engine *e, unsigned bi, unsigned s, const struct bsnap *b,
                          const int32_t *tokens, size_t n, const struct kvtier_match *m, size_t be,
                          size_t own, size_t *tracked, struct restore *rs)
{
	struct backend_reply r = {0};
	struct kvclient_file f;
	char err[512] = "";
	double t0;
	int rc;

	memset(rs, 0, sizeof(*rs));
	if (!m->found || m->matched_tokens <= *tracked)
		return;
	if (m->matched_tokens - *tracked < be) {
		/* The server's own RAM cache brings what the slot lacks: no restore. */
		int cache = *tracked > own && m->matched_tokens - own >= be;

		metrics_restore(cache ? METRICS_RESTORE_SKIPPED_SERVER_CACHE
		                      : METRICS_RESTORE_SKIPPED_SMALL);
		klog(LOG_DEBUG,
		     "event=restore outcome=%s url=%s slot=%u matched=%u "
		     "tracked=%zu server_cache=%zu break_even=%zu",
		     cache ? "skipped_server_cache" : "skipped_small", b->url, s, m->matched_tokens,
		     own, *tracked, be);
		return;
	}
	if ((b->mem_kind == SLOT_STATE_RECURRENT || b->mem_kind == SLOT_STATE_HYBRID || b->swa) &&
	    (m->matched_tokens != m->n_tokens || n <= m->n_tokens)) {
		/* A recurrent state holds its last position only: llama-server uses it
		 * when the prompt extends the saved tokens exactly (no rollback
		 * without checkpoints), and prefills in full otherwise. A
		 * sliding-window file holds only the window's last n_swa positions:
		 * with --swa-full the server takes any prefix of it, and a prefix
		 * that ends inside the window decodes without the positions the
		 * window then needs (wrong tokens, measured on b9749); one that
		 * ends before it is prefilled in full. Only the whole blob, then
		 * more tokens, is safe. */
		metrics_restore(METRICS_RESTORE_SKIPPED_ROLLBACK);
		klog(LOG_DEBUG,
		     "event=restore outcome=skipped_rollback url=%s slot=%u blob=%s matched=%u "
		     "n_tokens=%u n_prompt=%zu",
		     b->url, s, m->blob, m->matched_tokens, m->n_tokens, n);
		return;
	}
	if (b->restores_off_until > 0 && now_s() < b->restores_off_until) {
		metrics_restore(METRICS_RESTORE_SKIPPED_IGNORED);
		klog(LOG_DEBUG,
		     "event=restore outcome=skipped_ignored url=%s slot=%u blob=%s "
		     "retry_in_s=%.0f",
		     b->url, s, m->blob, b->restores_off_until - now_s());
		return;
	}
	if (m->n_tokens == 0 || (b->n_ctx && m->n_tokens > b->n_ctx)) {
		metrics_restore(METRICS_RESTORE_SKIPPED_INVALID);
		klog(LOG_WARN,
		     "event=restore outcome=skipped_invalid url=%s slot=%u blob=%s "
		     "n_tokens=%u n_ctx=%u reason=\"%s\"",
		     b->url, s, m->blob, m->n_tokens, b->n_ctx,
		     m->n_tokens ? "more tokens than the slot's context" : "0-token blob");
		return;
	}
	rc = kvclient_stage(e->kv, m, b->n_ctx, &f, err, sizeof(err));
	if (rc) {
		metrics_restore(rc == KVTIER_E_INVALID ? METRICS_RESTORE_SKIPPED_INVALID
		                                       : METRICS_RESTORE_FAILED);
		klog(LOG_WARN, "event=restore outcome=%s url=%s slot=%u blob=%s reason=\"%s\"",
		     rc == KVTIER_E_INVALID ? "skipped_invalid" : "failed", b->url, s, m->blob,
		     err);
		return;
	}
	rs->tried = 1;
	memcpy(rs->blob, m->blob, sizeof(rs->blob));
	rs->matched = m->matched_tokens;
	rs->bytes = f.bytes;
	t0 = now_s();
	rc = backend_slot_action(b->url, s, "restore", f.name, e->cfg.slot_timeout_ms, NULL, &r);
	kvclient_unstage(e->kv, &f);
	if (rc == 0 && r.status == 200) {
		const json_t *nr = json_object_get(r.json, "n_restored");
		const json_t *ms =
		    json_object_get(json_object_get(r.json, "timings"), "restore_ms");

		if (json_is_integer(nr) && json_integer_value(nr) > 0) {
			rs->ok = 1;
			rs->ms = json_is_number(ms) ? json_number_value(ms) : r.seconds * 1000;
			if (json_integer_value(nr) != (json_int_t)f.n_tokens)
				klog(LOG_WARN,
				     "event=restore_count_mismatch url=%s slot=%u blob=%s "
				     "n_restored=%" JSON_INTEGER_FORMAT " n_tokens=%u",
				     b->url, s, m->blob, json_integer_value(nr), f.n_tokens);
		}
	}
	if (!rs->ok) {
		/* A failed restore leaves the slot empty (and a timed-out one in an
		 * unknown state): the request prefills in full. */
		int timeout = rc == -ETIMEDOUT;

		metrics_restore(timeout ? METRICS_RESTORE_TIMEOUT : METRICS_RESTORE_FAILED);
		klog(LOG_WARN, "event=restore outcome=%s url=%s slot=%u blob=%s reason=\"%s\"",
		     timeout ? "timeout" : "failed", b->url, s, m->blob,
		     rc || r.status != 200 ? r.err : "the server answered n_restored 0");
		slots_set_tokens(&e->t, bi, s, NULL, 0, SLOTS_NO_TASK);
		*tracked = 0;
		goto out;
	}
	metrics_bytes(METRICS_DIR_RESTORE, f.bytes);
	klog(LOG_INFO,
	     "event=restore outcome=sent url=%s slot=%u blob=%s matched=%u n_tokens=%u "
	     "tracked=%zu break_even=%zu est_restore_ms=%.1f bytes=%" PRIu64 " restore_ms=%.1f "
	     "wall_ms=%.1f",
	     b->url, s, m->blob, m->matched_tokens, f.n_tokens, *tracked, be,
	     m->est_restore_s * 1000, f.bytes, rs->ms, (now_s() - t0) * 1000);
	slots_set_tokens(&e->t, bi, s, tokens, m->matched_tokens < n ? m->matched_tokens : n,
	                 SLOTS_NO_TASK);
	*tracked = m->matched_tokens;
out:
	backend_reply_free(&r);
}

/* ---- llama-server's own prompt cache (promptcache.h) ---- */

/* The prefix of the prompt the server will hold on slot s before prefill
 * when nothing is restored: `tracked`, or what its RAM cache loads there. */
static size_t server_cache_predict(struct engine *e, unsigned bi, unsigned s,
                                   const int32_t *tokens, size_t n, size_t tracked)
{
	int32_t *st = NULL;
	size_t sn = 0, lcp = 0;
	int idx;

	if (slots_copy_tokens(&e->t, bi, s, &st, &sn))
		return tracked;
	pthread_mutex_lock(&e->pc_lock);
	idx = pcache_choose(&e->pc[bi], tokens, n, st, sn, &lcp);
	pthread_mutex_unlock(&e->pc_lock);
	free(st);
	return idx >= 0 && lcp > tracked ? lcp : tracked;
}

struct pcache_ctx {
	struct engine *e;
	unsigned bi;
};

/* Runs under the slot table's lock: pc_lock is taken after it. */
static void pcache_save_cb(void *ctx, const int32_t *tokens, size_t n)
{
	struct pcache_ctx *c = ctx;

	pthread_mutex_lock(&c->e->pc_lock);
	pcache_save(&c->e->pc[c->bi], tokens, n);
	pthread_mutex_unlock(&c->e->pc_lock);
}

/* A task starts on slot s: the server's get_available_slot saves the slot
 * into its cache and loads a better entry when the slot holds little of the
 * prompt; then every idle slot is copied into the cache and, with unified
 * KV, cleared (--cache-idle-slots). A save of another slot waiting in the
 * server's queue would then find its slot empty: the task waits for it. */
static void server_cache_task(struct engine *e, unsigned bi, unsigned s, const struct bsnap *b,
                              const int32_t *tokens, size_t n)
{
	struct pcache_ctx c = {e, bi};
	int32_t *st = NULL;
	size_t sn = 0, lcp;
	int idx;

	if (b->clears_idle &&
	    slots_wait_saves(&e->t, bi, s, e->cfg.slot_timeout_ms) == -ETIMEDOUT)
		klog(LOG_WARN, "event=save_wait_timeout url=%s slot=%u", b->url, s);
	if (slots_copy_tokens(&e->t, bi, s, &st, &sn) == 0) {
		pthread_mutex_lock(&e->pc_lock);
		if (pcache_consults(&e->pc[bi], tokens, n, st, sn)) {
			pcache_save(&e->pc[bi], st, sn);
			idx = pcache_choose(&e->pc[bi], tokens, n, st, sn, &lcp);
			pcache_remove(&e->pc[bi], idx);
		}
		pthread_mutex_unlock(&e->pc_lock);
		free(st);
	}
	slots_idle_each(&e->t, bi, s, b->clears_idle, pcache_save_cb, &c);
}

static void server_cache_off(struct engine *e, unsigned bi, const struct bsnap *b, double pn,
                             size_t expected)
{
	pthread_mutex_lock(&e->t.lock);
	e->t.b[bi].server_cache = 0;
	e->t.b[bi].clears_idle = 0;
	pthread_mutex_unlock(&e->t.lock);
	pthread_mutex_lock(&e->pc_lock);
	pcache_clear(&e->pc[bi]);
	pcache_init(&e->pc[bi], 0, 1);
	pthread_mutex_unlock(&e->pc_lock);
	klog(LOG_WARN,
	     "event=server_cache_off url=%s prompt_n=%.0f expected=%zu "
	     "hint=\"the server did not load a prompt its RAM cache should hold: taken as "
	     "running with --cache-ram 0 until it restarts (give --server-cache-ram 0 to say "
	     "so)\"",
	     b->url, pn, expected);
}

/* Counts restores the server did not use, per backend: after
 * IGNORED_STREAK_MAX in a row (a sliding-window model without --swa-full
 * ignores every one), restores stop for IGNORED_BACKOFF_S, then one is tried
 * again; a used one resets the count. */
static void note_ignored(struct engine *e, unsigned bi, const struct bsnap *b, int ignored)
{
	int stop = 0;
	unsigned streak;

	pthread_mutex_lock(&e->t.lock);
	if (!ignored) {
		e->t.b[bi].ignored_streak = 0;
		e->t.b[bi].restores_off_until = 0;
	} else if (++e->t.b[bi].ignored_streak >= IGNORED_STREAK_MAX) {
		e->t.b[bi].restores_off_until = now_s() + IGNORED_BACKOFF_S;
		stop = 1;
	}
	streak = e->t.b[bi].ignored_streak;
	pthread_mutex_unlock(&e->t.lock);
	if (stop)
		klog(LOG_WARN,
		     "event=restores_paused url=%s ignored_in_a_row=%u retry_in_s=%u%s", b->url,
		     streak, IGNORED_BACKOFF_S,
		     b->swa ? " hint=\"a sliding-window model: start llama-server with --swa-full, "
		              "or restores are never used\""
		            : "");
}

/* Serves the request on the slot tk owns. Returns RUN_RETRY when the
 * backend could not be reached and nothing was sent to the client. */
static enum run_result run_on_slot(struct job *j, struct jspan body, struct slot_ticket *tk,
                                   const int32_t *tokens, size_t n)
{
	struct engine *e = j->e;
	const unsigned bi = tk->b, s = tk->s;
	struct kvtier_match m;
	struct restore rs = {0};
	struct backend_result res;
	struct bsnap b;
	size_t tracked, be = e->cfg.break_even, tracked_before, own;
	int64_t recorded, task;
	struct fwd_body fwd;
	double t_forward, t0, t1, age_s;
	int rc, ok, to_save = 0;
	enum run_result rr = RUN_DONE;

	memset(&m, 0, sizeof(m));
	snap(e, bi, &b);
	if (!b.up || s >= b.n_slots) {
		slots_release(&e->t, tk, 0);
		return RUN_RETRY;
	}
	tracked = slots_tracked_prefix(&e->t, bi, s, tokens, n, &recorded, &age_s);
	t0 = now_s();
	/* A slot we used less than --slot-check-ms ago is taken as we left it:
	 * the check waits for the server's decode loop, and a restart (seconds
	 * of model loading) is seen by the health check. */
	if (tracked && b.has_slots_api && recorded != SLOTS_NO_TASK &&
	    age_s * 1000 >= e->cfg.slot_check_ms && !slot_unchanged(e, &b, s, recorded, &task)) {
		klog(LOG_INFO,
		     "event=slot_changed url=%s slot=%u recorded_task=%" PRId64 " now_task=%" PRId64
		     " action=forget",
		     b.url, s, recorded, task);
		metrics_slot_reset(METRICS_RESET_FOREIGN);
		slots_set_tokens(&e->t, bi, s, NULL, 0, SLOTS_NO_TASK);
		tracked = 0;
	}
	t1 = now_s();
	j->t_check += t1 - t0;
	/* What the server will hold without a restore: the slot's own prefix,
	 * or what its RAM cache would load into the slot. */
	own = tracked;
	if (b.server_cache)
		tracked = server_cache_predict(e, bi, s, tokens, n, tracked);
	tracked_before = tracked;
	if (b.ns[0] && n >= e->cfg.break_even) {
		if (kvclient_lookup(e->kv, b.ns, tokens, n, &m) == 0)
			be = kvclient_break_even(e->kv, b.ns, m.est_restore_s);
		else
			be = kvclient_break_even(e->kv, b.ns, -1);
		t0 = now_s();
		j->t_lookup += t0 - t1;
		maybe_restore(e, bi, s, &b, tokens, n, &m, be, own, &tracked, &rs);
		j->t_restore += now_s() - t0;
	}
	if (b.server_cache)
		server_cache_task(e, bi, s, &b, tokens, n);

	/* The forward: the client's body with our slot and prompt caching. */
	fwd_body_make(&fwd, body, s);
	t_forward = now_s();
	j->side.enabled = 1;
	rc = forward_pieces(j, b.url, fwd.pieces, fwd.n, &res);
	t1 = now_s(); /* the forward's end: what follows is after_ms */
	j->t_forward += t1 - t_forward;
	if (rc == -ECONNREFUSED && !res.headers_done) {
		mark_down(e, bi, res.err);
		slots_release(&e->t, tk, 0);
		return RUN_RETRY;
	}
	if (rc && !res.headers_done)
		forward_failed(j, rc, &res);
	side_end(&j->side);
	if (j->headers_passed) {
		/* The client's answer ends here (on_end), and its next turn may
		 * come at once: it must find this slot, not another idle one. */
		slots_finishing(&e->t, tk);
		if (j->sink->on_end)
			j->sink->on_end(j->sink->ctx, j->broken);
	}
	/* A stream that ended without its final timings ended in an error event. */
	ok = rc == 0 && j->status == 200 && (!j->side.sse || j->side.have_timings);

	/* Verification and report. */
	if (ok && j->side.have_timings) {
		double pn = j->side.prompt_n,
		       slack = n / 10.0 > VERIFY_SLACK_MIN ? n / 10.0 : VERIFY_SLACK_MIN;
		struct kvtier_report rep = {.ns = b.ns,
		                            .prompt_tokens = pn > 0 ? (uint32_t)pn : 0,
		                            .prompt_ms = j->side.prompt_ms,
		                            .cached_tokens = pn > 0 && (double)n > pn
		                                                 ? (uint32_t)((double)n - pn)
		                                                 : 0};
		int ignored = 0;

		if (rs.ok) {
			double expected = (double)n - rs.matched;
			double gain = (double)rs.matched - (double)tracked_before;

			/* An ignored restore prefills its gain again: a slack of 10 % of
			 * a long prompt could hide a small gain, so half the gain bounds
			 * it too (a used restore misses by 0 or 1 token). */
			if (gain / 2 > VERIFY_SLACK_MIN && gain / 2 < slack)
				slack = gain / 2;
			else if (gain / 2 <= VERIFY_SLACK_MIN)
				slack = VERIFY_SLACK_MIN;
			ignored = pn > expected + slack;
			rep.blob = rs.blob;
			rep.restore_ms = rs.ms;
			rep.restored_tokens = rs.matched;
			rep.restore_ignored = ignored;
			note_ignored(e, bi, &b, ignored);
			if (ignored) {
				metrics_restore(METRICS_RESTORE_IGNORED);
				klog(LOG_WARN,
				     "event=restore outcome=ignored url=%s slot=%u blob=%s "
				     "prompt_n=%.0f expected=%.0f action=quarantine",
				     b.url, s, rs.blob, pn, expected);
			} else {
				metrics_restore(METRICS_RESTORE_OK);
				metrics_restored_tokens(rs.matched - tracked_before);
			}
		} else if (tracked_before > own && pn > (double)(n - tracked_before) + slack) {
			/* The model of the server's RAM cache promised a prefix the
			 * server did not have: it runs without that cache (--cache-ram
			 * 0), or the model is wrong. Stop trusting it for this backend. */
			server_cache_off(e, bi, &b, pn, n - tracked_before);
		} else if (tracked >= be && pn > (double)(n - tracked) + slack) {
			/* The server did not hold what we tracked (a restart we did not
			 * see, or another client): the slot now holds this prompt. */
			metrics_slot_reset(METRICS_RESET_UNEXPECTED);
			klog(
			    LOG_INFO,
			    "event=slot_changed url=%s slot=%u tracked=%zu prompt_n=%.0f "
			    "n_prompt=%zu reason=\"prefilled more than the tracked prefix allows\"",
			    b.url, s, tracked, pn, n);
		}
		metrics_prefill_tokens(pn > 0 ? (uint64_t)pn : 0);
		if (b.ns[0]) {
			kvclient_observe_prefill(e->kv, b.ns, rep.prompt_tokens, j->side.prompt_ms);
			if (rep.prompt_tokens > 0 || rep.blob)
				kvclient_report(e->kv, &rep);
		}
		metrics_ttft(rs.ok, j->side.sse && j->side.t_first > 0
		                        ? j->side.t_first - j->rq->t_arrival
		                        : t_forward - j->rq->t_arrival +
		                              (j->side.prompt_ms + j->side.per_token_ms) / 1000);
	} else if (ok) {
		if (rs.ok)
			metrics_restore(METRICS_RESTORE_OK); /* used or not: no timings to tell */
		metrics_ttft(rs.ok, j->side.t_first > 0 ? j->side.t_first - j->rq->t_arrival
		                                        : now_s() - j->rq->t_arrival);
	} else if (rs.ok) {
		metrics_restore(METRICS_RESTORE_OK); /* restored; the completion itself failed */
	}

	/* What the slot holds now, and the save. */
	if (ok) {
		size_t save_be = b.ns[0] ? kvclient_break_even(e->kv, b.ns, -1) : 0;

		slots_set_tokens(&e->t, bi, s, tokens, n, slot_task(e, &b, s));
		to_save = b.ns[0] && n > save_be;
		if (b.ns[0] && !to_save && n > e->cfg.break_even) {
			/* Longer than the floor, shorter than the measured break-even:
			 * recomputing it is cheaper than restoring it. */
			metrics_save(METRICS_SAVE_SKIPPED);
			klog(LOG_DEBUG,
			     "event=save outcome=skipped url=%s slot=%u n_tokens=%zu "
			     "break_even=%zu",
			     b.url, s, n, save_be);
		}
	} else {
		slots_set_tokens(&e->t, bi, s, NULL, 0, SLOTS_NO_TASK);
	}
	klog(LOG_DEBUG,
	     "event=request_timing url=%s slot=%u n_prompt=%zu tokenize_ms=%.2f wait_ms=%.2f "
	     "slot_check_ms=%.2f lookup_ms=%.2f restore_ms=%.2f forward_ms=%.2f after_ms=%.2f",
	     b.url, s, n, j->t_tokenize * 1e3, j->t_wait * 1e3, j->t_check * 1e3,
	     j->t_lookup * 1e3, j->t_restore * 1e3, j->t_forward * 1e3, (now_s() - t1) * 1e3);
	/* The slot passes to the save before the save can run and hand it on. */
	slots_release(&e->t, tk, to_save);
	if (to_save && queue_save(e, bi, s, &b, n) != 0) {
		metrics_save(METRICS_SAVE_SKIPPED);
		slots_save_done(&e->t, bi, s);
	}
	return rr;
}

/* Serves a request the engine can manage. Returns 0 when it was served
 * (successfully or with an error answer), -1 to pass it through instead
 * (nothing has been sent). */
static int managed(struct engine *e, const struct engine_request *rq,
                   const struct engine_sink *sink, struct jspan body, int *broken)
{
	struct job *j = NULL;
	struct prompt p;
	struct jspan mv;
	char *model = NULL;
	unsigned n_tok;
	double t0;
	int rc = -1;

	if (prompt_of(rq, body, &p) || fwd_body_drops(body) > FWD_DROP_MAX)
		return -1;
	if (jscan_get(body, "model", &mv) == 1 && jscan_type(mv) == '"' &&
	    jscan_string_dup(mv, 1024, &model) != 0)
		return -1;
	j = calloc(1, sizeof(*j));
	if (!j) {
		free(model);
		return -1;
	}
	j->e = e;
	j->rq = rq;
	j->sink = sink;
	revive(e);
	t0 = now_s();
	n_tok = tokenize_all(j, &p, model);
	j->t_tokenize = now_s() - t0;
	if (n_tok == 0)
		goto out; /* no backend could tokenize it: let one answer as it would */
	metrics_request(rq->endpoint, METRICS_HANDLING_SLOT);
	rc = 0;
	for (unsigned attempt = 0; attempt <= e->t.n_backends; attempt++) {
		struct slot_query q;
		struct slot_ticket tk;
		struct bsnap b;
		size_t be = e->cfg.break_even;
		int r;

		memset(&q, 0, sizeof(q));
		for (unsigned bi = 0; bi < e->t.n_backends; bi++) {
			const struct group *g =
			    j->group_of[bi] >= 0 ? &j->groups[j->group_of[bi]] : NULL;

			if (!g || g->state != 1)
				continue;
			q.tokens[bi] = g->tokens;
			q.n_tokens[bi] = g->n;
			snap(e, bi, &b);
			if (b.ns[0]) {
				size_t x = kvclient_break_even(e->kv, b.ns, -1);

				be = x > be ? x : be;
			}
		}
		q.break_even = be;
		r = slots_choose(&e->t, &q, &tk);
		if (r) {
			job_error(j, 503, "unavailable_error",
			          "no llama-server backend is available");
			break;
		}
		t0 = now_s();
		r = slots_wait(&e->t, &tk, e->cfg.timeout_ms);
		j->t_wait += now_s() - t0;
		if (r) {
			job_error(j, 503, "unavailable_error",
			          r == -ECANCELED
			              ? "kvtier-llama is stopping"
			              : "every slot stayed busy for --timeout-ms; try again later");
			break;
		}
		if (run_on_slot(j, body, &tk, q.tokens[tk.b], q.n_tokens[tk.b]) == RUN_DONE)
			break;
		if (attempt == e->t.n_backends)
			job_error(j, 503, "unavailable_error",
			          "no llama-server backend is available");
	}
out:
	*broken = j->broken;
	for (unsigned gi = 0; gi < j->n_groups; gi++)
		free(j->groups[gi].tokens);
	free(j->side.buf);
	free(j);
	free(model);
	return rc;
}

int engine_handle(struct engine *e, const struct engine_request *rq, const struct engine_sink *sink)
{
	struct jspan body;
	int broken = 0;

	/* The body is read in place: no parse tree, no second copy. */
	if (rq->endpoint != METRICS_EP_OTHER && strcmp(rq->method, "POST") == 0 && rq->body_len &&
	    jscan_check(rq->body, rq->body_len, &body) == 0 && jscan_type(body) == '{' &&
	    managed(e, rq, sink, body, &broken) == 0)
		return broken ? -1 : 0;
	return passthrough(e, rq, sink);
}

/* ---- start and stop ---- */

int engine_start(const struct engine_config *cfg, struct engine **out, char *err, size_t errlen)
{
	struct kvclient_config kc = {0};
	struct engine *e = calloc(1, sizeof(*e));
	pthread_condattr_t ca;
	int rc = 0;

	*out = NULL;
	if (!e) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	e->cfg = *cfg;
	pthread_mutex_init(&e->lock, NULL);
	pthread_mutex_init(&e->disc_lock, NULL);
	pthread_mutex_init(&e->pc_lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&e->cond, &ca);
	pthread_condattr_destroy(&ca);
	rc = slots_init(&e->t, cfg->backends, cfg->n_backends);
	if (rc) {
		snprintf(err, errlen, "out of memory");
		goto fail_slots;
	}
	metrics_set_backends(cfg->backends, cfg->n_backends);
	if (cfg->model_file) {
		rc = fingerprint_gguf(cfg->model_file, &e->gguf, err, errlen);
		if (rc)
			goto fail;
		e->have_gguf = 1;
		klog(LOG_INFO,
		     "event=model_file path=%s gguf_version=%u arch=%s name=\"%s\" size=%" PRIu64
		     " n_layer=%" PRId64 " n_embd=%" PRId64 " n_ctx_train=%" PRId64,
		     cfg->model_file, e->gguf.version, e->gguf.arch, e->gguf.name,
		     e->gguf.file_size, e->gguf.n_layer, e->gguf.n_embd, e->gguf.n_ctx_train);
	}
	kc.address = cfg->kvtier_address;
	kc.token = cfg->kvtier_token;
	kc.tls_ca = cfg->kvtier_tls_ca;
	kc.tls_name = cfg->kvtier_tls_name;
	kc.slot_dir = cfg->slot_dir;
	kc.timeout_ms = cfg->slot_timeout_ms;
	kc.break_even_floor = cfg->break_even;
	kc.mode = cfg->kvtier_mode;
	rc = kvclient_open(&kc, &e->kv, err, errlen);
	if (rc)
		goto fail;
	kvclient_sweep(e->kv, cfg->slot_timeout_ms / 1000 * 2 + 600);
	for (unsigned bi = 0; bi < cfg->n_backends; bi++)
		discover(e, bi, 1);
	{
		unsigned n = cfg->save_workers ? cfg->save_workers : 2;

		if (n > SAVERS_MAX)
			n = SAVERS_MAX;
		for (unsigned i = 0; i < n; i++) {
			if (pthread_create(&e->savers[i], NULL, saver_main, e) != 0) {
				rc = -EAGAIN;
				snprintf(err, errlen, "cannot start the save threads");
				goto fail;
			}
			e->n_savers++;
		}
	}
	if (pthread_create(&e->health, NULL, health_main, e) != 0) {
		rc = -EAGAIN;
		snprintf(err, errlen, "cannot start the health thread");
		goto fail;
	}
	e->health_started = 1;
	*out = e;
	return 0;
fail:
	engine_stop(e);
	return rc;
fail_slots:
	pthread_cond_destroy(&e->cond);
	pthread_mutex_destroy(&e->disc_lock);
	pthread_mutex_destroy(&e->pc_lock);
	pthread_mutex_destroy(&e->lock);
	free(e);
	return rc;
}

void engine_begin_stop(struct engine *e)
{
	pthread_mutex_lock(&e->lock);
	atomic_store(&e->stopping, 1);
	pthread_cond_broadcast(&e->cond);
	pthread_mutex_unlock(&e->lock);
	slots_stop(&e->t);
}

void engine_stop(struct engine *e)
{
	if (!e)
		return;
	pthread_mutex_lock(&e->lock);
	atomic_store(&e->stopping, 1);
	pthread_cond_broadcast(&e->cond);
	pthread_mutex_unlock(&e->lock);
	if (e->health_started)
		pthread_join(e->health, NULL);
	for (unsigned i = 0; i < e->n_savers; i++)
		pthread_join(e->savers[i], NULL);
	kvclient_close(e->kv);
	slots_destroy(&e->t);
	for (unsigned i = 0; i < SLOTS_MAX_BACKENDS; i++)
		pcache_clear(&e->pc[i]);
	pthread_cond_destroy(&e->cond);
	pthread_mutex_destroy(&e->disc_lock);
	pthread_mutex_destroy(&e->pc_lock);
	pthread_mutex_destroy(&e->lock);
	free(e);
}
