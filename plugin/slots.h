/* slots.h: the proxy's table of backend slots.
 *
 * For every slot of every backend the table keeps what the proxy believes
 * the server holds (the prompt tokens of the last request served there: the
 * server holds those plus the generated tokens, so this is a safe
 * under-estimate; GET /slots does not show cached tokens), when it was last
 * chosen, and who owns it. A slot is owned by one request or one save at a
 * time; others wait in FIFO order. A request that ends with a save hands the
 * slot straight to the save, so the save completes before anyone else (a
 * restore in particular) uses the slot.
 *
 * One mutex guards the whole table; it is never held across I/O.
 */
#ifndef KVTIER_PLUGIN_SLOTS_H
#define KVTIER_PLUGIN_SLOTS_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define SLOTS_MAX_BACKENDS 16
#define SLOTS_MAX_PER_BACKEND 256
#define SLOTS_NO_TASK INT64_MIN /* id_task not known */

struct slot_waiter {
	struct slot_waiter *next;
	int granted;
};

struct slot {
	int32_t *tokens; /* what the server holds (a prefix of it); NULL = nothing known */
	size_t n_tokens;
	int32_t *expect; /* what it will hold once the requests queued on it have run */
	size_t n_expect;
	uint64_t last_used;              /* table clock when last chosen; 0 = never */
	int held;                        /* a request or a save owns it */
	int saving;                      /* the owner is a save */
	unsigned requests;               /* requests owning or waiting for it */
	struct slot_waiter *head, *tail; /* FIFO of waiters */
	int64_t id_task; /* /slots id_task after our last request, SLOTS_NO_TASK if unknown */
	double set_at;   /* CLOCK_MONOTONIC seconds of the last slots_set_tokens */
};

struct slot_backend {
	char url[512];       /* base URL, no trailing '/' */
	int up;              /* answering, slots known */
	char ns[256];        /* kvtier namespace; "" = never share blobs */
	unsigned n_slots;    /* usable slots: [0, n_slots) */
	uint32_t n_ctx;      /* context of one slot, tokens; 0 = unknown */
	int has_slots_api;   /* GET /slots answers */
	uint32_t mem_kind;   /* enum slot_state_kind of its slot files (layout probe) */
	int swa;             /* sliding-window model: its state has two KV sections */
	unsigned ignored_streak;    /* restores in a row the server did not use */
	double restores_off_until;  /* monotonic s: no restores before (see engine.c) */
	int retry_probe;            /* the layout probe failed: discover again */
	int server_cache;           /* it has llama-server's RAM prompt cache (promptcache.h) */
	int clears_idle;            /* ...and clears idle slots when a task starts */
	unsigned generation; /* bumped whenever the backend came (back) up */
	struct slot *slots;  /* SLOTS_MAX_PER_BACKEND entries */
};

struct slot_table {
	pthread_mutex_t lock;
	pthread_cond_t cond; /* broadcast whenever a slot is granted */
	unsigned n_backends;
	struct slot_backend b[SLOTS_MAX_BACKENDS];
	uint64_t clock; /* choice counter, for LRU */
	int stopping;   /* set by slots_stop(): waits end */
};

/* What a request asks for: per backend the tokens its slot will hold (the
 * same pointer for backends of one namespace; NULL to leave a backend out). */
struct slot_query {
	const int32_t *tokens[SLOTS_MAX_BACKENDS];
	size_t n_tokens[SLOTS_MAX_BACKENDS];
	size_t break_even; /* a tracked prefix this long is worth going to */
};

/* A place in a slot's queue; lives in the caller's frame between
 * slots_choose() and slots_release(). */
struct slot_ticket {
	unsigned b, s;        /* backend and slot chosen */
	size_t expect_common; /* prefix shared with the slot's expected contents when chosen */
	int queued;           /* had to wait behind other requests */
	int finishing;        /* slots_finishing() was called */
	struct slot_waiter w;
};

/* Sets up a table for n backends (urls copied). Returns 0 or -ENOMEM. */
int slots_init(struct slot_table *t, const char *const *urls, unsigned n);
void slots_destroy(struct slot_table *t);

/* Longest common prefix of a[0..na) and b[0..nb). */
size_t slots_common_prefix(const int32_t *a, size_t na, const int32_t *b, size_t nb);

/* Chooses a slot for q among the up backends that q gives tokens for, and
 * queues tk on it: the slot whose expected contents share the longest prefix
 * (at least q->break_even) among slots no request holds or waits for; else
 * the least recently used slot nobody holds; else one only a save holds;
 * else, all being busy, the longest expected prefix or the least recently
 * used with the fewest waiters. Returns 0, or -ENOENT when no up backend
 * with slots is left in q. */
int slots_choose(struct slot_table *t, const struct slot_query *q, struct slot_ticket *tk);

/* Waits until tk owns its slot, at most timeout_ms. Returns 0, or -ETIMEDOUT
 * or -ECANCELED after slots_stop() (tk is then off the queue; do not
 * release it). */
int slots_wait(struct slot_table *t, struct slot_ticket *tk, unsigned timeout_ms);

/* Ends every wait in slots_wait() with -ECANCELED, now and later. */
void slots_stop(struct slot_table *t);

/* The request owning tk has answered its client and only reports and saves
 * now: the slot stops counting it as a request, so slots_choose takes the
 * slot as holding its expected tokens and queues a next turn there (as for
 * a slot that is saving), but tk still owns it until slots_release. */
void slots_finishing(struct slot_table *t, struct slot_ticket *tk);

/* Gives up tk's slot. With to_save the slot passes to a save job, which
 * must call slots_save_done(); otherwise the next waiter gets it. */
void slots_release(struct slot_table *t, struct slot_ticket *tk, int to_save);

/* Ends the save that owns slot s of backend b. */
void slots_save_done(struct slot_table *t, unsigned b, unsigned s);

/* Records what the owner left in its slot: a copy of tokens[0..n) (n == 0
 * or tokens == NULL: nothing known) and the task id /slots showed. */
void slots_set_tokens(struct slot_table *t, unsigned b, unsigned s, const int32_t *tokens, size_t n,
                      int64_t id_task);

/* The prefix of tokens[0..n) slot s of backend b is believed to hold, its
 * recorded task id in *id_task and the seconds since it was recorded in
 * *age_s (either may be NULL). */
size_t slots_tracked_prefix(struct slot_table *t, unsigned b, unsigned s, const int32_t *tokens,
                            size_t n, int64_t *id_task, double *age_s);

/* Forgets what every slot of backend b holds (it restarted or went away).
 * Owners keep their slots. Returns how many slots held something. */
unsigned slots_forget_backend(struct slot_table *t, unsigned b);

/* Slots of backend b that a request or a save owns now. */
unsigned slots_held(struct slot_table *t, unsigned b);

/* A malloc'd copy of what slot si of backend b holds (NULL, 0 when nothing
 * is known). Returns 0 or -ENOMEM. */
int slots_copy_tokens(struct slot_table *t, unsigned b, unsigned si, int32_t **tokens, size_t *n);

/* Calls cb with the tokens of every slot of backend b other than `except`
 * that nothing owns or waits for and that holds something, and, when forget
 * is set, forgets them: what llama-server does to its idle slots when a task
 * starts (--cache-idle-slots). cb runs under the table's lock. Returns the
 * number of such slots. */
unsigned slots_idle_each(struct slot_table *t, unsigned b, unsigned except, int forget,
                         void (*cb)(void *ctx, const int32_t *tokens, size_t n), void *ctx);

/* Waits until no slot of backend b but `except` is being saved. Returns 0,
 * or -ETIMEDOUT after timeout_ms. */
int slots_wait_saves(struct slot_table *t, unsigned b, unsigned except, unsigned timeout_ms);

#endif /* KVTIER_PLUGIN_SLOTS_H */
