/* slots.c: slot choice, ownership and FIFO queues of the proxy's slot table.
 *
 * Everything here runs under the table mutex and does no I/O: the engine
 * asks for a slot, waits for it, does its HTTP and kvtier work without the
 * lock, and reports back. Waiters sleep on one condition variable
 * (CLOCK_MONOTONIC) that is broadcast when a slot changes hands.
 *
 * This module must never call a backend or kvtierd, and never let a slot
 * have two owners.
 */
#include "slots.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double mono_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int slots_init(struct slot_table *t, const char *const *urls, unsigned n)
{
	pthread_condattr_t ca;
	int rc = 0;

	memset(t, 0, sizeof(*t));
	if (n > SLOTS_MAX_BACKENDS)
		return -EINVAL;
	pthread_mutex_init(&t->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&t->cond, &ca);
	pthread_condattr_destroy(&ca);
	t->n_backends = n;
	for (unsigned i = 0; i < n; i++) {
		struct slot_backend *b = &t->b[i];

		snprintf(b->url, sizeof(b->url), "%s", urls[i]);
		b->slots = calloc(SLOTS_MAX_PER_BACKEND, sizeof(*b->slots));
		if (!b->slots) {
			rc = -ENOMEM;
			break;
		}
		for (unsigned s = 0; s < SLOTS_MAX_PER_BACKEND; s++)
			b->slots[s].id_task = SLOTS_NO_TASK;
	}
	if (rc)
		slots_destroy(t);
	return rc;
}

void slots_destroy(struct slot_table *t)
{
	for (unsigned i = 0; i < t->n_backends; i++) {
		struct slot_backend *b = &t->b[i];

		for (unsigned s = 0; b->slots && s < SLOTS_MAX_PER_BACKEND; s++) {
			free(b->slots[s].tokens);
			free(b->slots[s].expect);
		}
		free(b->slots);
		b->slots = NULL;
	}
	pthread_cond_destroy(&t->cond);
	pthread_mutex_destroy(&t->lock);
}

size_t slots_common_prefix(const int32_t *a, size_t na, const int32_t *b, size_t nb)
{
	size_t n = na < nb ? na : nb, i = 0;

	if (!a || !b)
		return 0;
	while (i < n && a[i] == b[i])
		i++;
	return i;
}

/* Replaces *dst with a copy of src[0..n). On allocation failure *dst is
 * left empty: knowing nothing is always safe. */
static void copy_tokens(int32_t **dst, size_t *dn, const int32_t *src, size_t n)
{
	free(*dst);
	*dst = NULL;
	*dn = 0;
	if (!src || n == 0)
		return;
	*dst = malloc(n * sizeof(**dst));
	if (*dst) {
		memcpy(*dst, src, n * sizeof(**dst));
		*dn = n;
	}
}

/* The CLOCK_MONOTONIC time timeout_ms from now (the table's condition
 * variable waits on that clock). */
static void deadline_after(unsigned timeout_ms, struct timespec *dl)
{
	clock_gettime(CLOCK_MONOTONIC, dl);
	dl->tv_sec += timeout_ms / 1000;
	dl->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (dl->tv_nsec >= 1000000000L) {
		dl->tv_sec++;
		dl->tv_nsec -= 1000000000L;
	}
}

/* Hands slot s to its first waiter, or marks it free. */
static void grant_next_locked(struct slot_table *t, struct slot *s)
{
	struct slot_waiter *w = s->head;

	s->saving = 0;
	if (!w) {
		s->held = 0;
		return;
	}
	s->head = w->next;
	if (!s->head)
		s->tail = NULL;
	w->next = NULL;
	w->granted = 1;
	s->held = 1;
	pthread_cond_broadcast(&t->cond);
}

/* When no request is left on the slot, its expected contents are its
 * tracked contents again. */
static void settle_expect_locked(struct slot *s)
{
	if (s->requests == 0)
		copy_tokens(&s->expect, &s->n_expect, s->tokens, s->n_tokens);
}

struct pick {
	int found;
	unsigned b, s;
	size_t common;
};

/* A candidate is better when it is found at all, then by `better`. */
static int older(const struct slot *a, const struct slot *b)
{
	return a->last_used < b->last_used;
}

int slots_choose(struct slot_table *t, const struct slot_query *q, struct slot_ticket *tk)
{
	struct pick prefix = {0}, idle = {0}, saving = {0}, busy_prefix = {0}, busy = {0};
	struct pick *p;
	struct slot *s;
	int rc = 0;

	memset(tk, 0, sizeof(*tk));
	pthread_mutex_lock(&t->lock);
	for (unsigned bi = 0; bi < t->n_backends; bi++) {
		struct slot_backend *b = &t->b[bi];

		if (!b->up || !q->tokens[bi])
			continue;
		for (unsigned si = 0; si < b->n_slots && si < SLOTS_MAX_PER_BACKEND; si++) {
			struct slot *x = &b->slots[si];
			size_t c = slots_common_prefix(x->expect, x->n_expect, q->tokens[bi],
			                               q->n_tokens[bi]);
			struct pick here = {1, bi, si, c};

			if (x->requests == 0) {
				const struct slot *cur =
				    prefix.found ? &t->b[prefix.b].slots[prefix.s] : NULL;

				/* Longest prefix; on a tie a free slot before one that
				 * is saving, then the least recently used. */
				if (!cur || c > prefix.common ||
				    (c == prefix.common &&
				     (cur->held > x->held ||
				      (cur->held == x->held && older(x, cur)))))
					prefix = here;
				if (!x->held) {
					if (!idle.found || older(x, &t->b[idle.b].slots[idle.s]))
						idle = here;
				} else if (!saving.found ||
				           older(x, &t->b[saving.b].slots[saving.s])) {
					saving = here;
				}
			} else {
				if (!busy_prefix.found || c > busy_prefix.common)
					busy_prefix = here;
				const struct slot *cur =
				    busy.found ? &t->b[busy.b].slots[busy.s] : NULL;
				if (!cur || x->requests < cur->requests ||
				    (x->requests == cur->requests && older(x, cur)))
					busy = here;
			}
		}
	}
	if (prefix.found && prefix.common > 0 && prefix.common >= q->break_even)
		p = &prefix;
	else if (idle.found)
		p = &idle;
	else if (saving.found)
		p = &saving;
	else if (busy_prefix.found && busy_prefix.common > 0 && busy_prefix.common >= q->break_even)
		p = &busy_prefix;
	else if (busy.found)
		p = &busy;
	else {
		rc = -ENOENT;
		goto out;
	}
	s = &t->b[p->b].slots[p->s];
	tk->b = p->b;
	tk->s = p->s;
	tk->expect_common = p->common;
	s->requests++;
	s->last_used = ++t->clock;
	copy_tokens(&s->expect, &s->n_expect, q->tokens[p->b], q->n_tokens[p->b]);
	if (!s->held && !s->head) {
		s->held = 1;
		tk->w.granted = 1;
	} else {
		tk->queued = 1;
		if (s->tail)
			s->tail->next = &tk->w;
		else
			s->head = &tk->w;
		s->tail = &tk->w;
	}
out:
	pthread_mutex_unlock(&t->lock);
	return rc;
}

int slots_wait(struct slot_table *t, struct slot_ticket *tk, unsigned timeout_ms)
{
	struct slot *s = &t->b[tk->b].slots[tk->s];
	struct timespec dl;
	int rc = 0;

	deadline_after(timeout_ms, &dl);
	pthread_mutex_lock(&t->lock);
	while (!tk->w.granted) {
		int stop = t->stopping;

		if ((stop || pthread_cond_timedwait(&t->cond, &t->lock, &dl) == ETIMEDOUT) &&
		    !tk->w.granted) {
			struct slot_waiter **pp = &s->head, *prev = NULL;

			while (*pp && *pp != &tk->w) {
				prev = *pp;
				pp = &(*pp)->next;
			}
			if (*pp) {
				*pp = tk->w.next;
				if (s->tail == &tk->w)
					s->tail = prev;
			}
			s->requests--;
			settle_expect_locked(s);
			rc = stop ? -ECANCELED : -ETIMEDOUT;
			break;
		}
	}
	pthread_mutex_unlock(&t->lock);
	return rc;
}

void slots_stop(struct slot_table *t)
{
	pthread_mutex_lock(&t->lock);
	t->stopping = 1;
	pthread_cond_broadcast(&t->cond);
	pthread_mutex_unlock(&t->lock);
}

void slots_finishing(struct slot_table *t, struct slot_ticket *tk)
{
	struct slot *s = &t->b[tk->b].slots[tk->s];

	pthread_mutex_lock(&t->lock);
	if (!tk->finishing) {
		tk->finishing = 1;
		s->requests--; /* expect keeps this request's tokens: not settled */
	}
	pthread_mutex_unlock(&t->lock);
}

void slots_release(struct slot_table *t, struct slot_ticket *tk, int to_save)
{
	struct slot *s = &t->b[tk->b].slots[tk->s];

	pthread_mutex_lock(&t->lock);
	if (!tk->finishing)
		s->requests--;
	if (to_save)
		s->saving = 1;
	else
		grant_next_locked(t, s);
	settle_expect_locked(s);
	pthread_mutex_unlock(&t->lock);
}

void slots_save_done(struct slot_table *t, unsigned b, unsigned si)
{
	struct slot *s = &t->b[b].slots[si];

	pthread_mutex_lock(&t->lock);
	grant_next_locked(t, s);
	pthread_cond_broadcast(&t->cond); /* slots_wait_saves() */
	pthread_mutex_unlock(&t->lock);
}

void slots_set_tokens(struct slot_table *t, unsigned b, unsigned si, const int32_t *tokens,
                      size_t n, int64_t id_task)
{
	struct slot *s = &t->b[b].slots[si];

	pthread_mutex_lock(&t->lock);
	copy_tokens(&s->tokens, &s->n_tokens, tokens, n);
	s->id_task = id_task;
	s->set_at = mono_s();
	settle_expect_locked(s);
	pthread_mutex_unlock(&t->lock);
}

size_t slots_tracked_prefix(struct slot_table *t, unsigned b, unsigned si, const int32_t *tokens,
                            size_t n, int64_t *id_task, double *age_s)
{
	struct slot *s = &t->b[b].slots[si];
	size_t c;

	pthread_mutex_lock(&t->lock);
	c = slots_common_prefix(s->tokens, s->n_tokens, tokens, n);
	if (id_task)
		*id_task = s->id_task;
	if (age_s)
		*age_s = mono_s() - s->set_at;
	pthread_mutex_unlock(&t->lock);
	return c;
}

unsigned slots_forget_backend(struct slot_table *t, unsigned b)
{
	unsigned n = 0;

	pthread_mutex_lock(&t->lock);
	for (unsigned si = 0; si < SLOTS_MAX_PER_BACKEND; si++) {
		struct slot *s = &t->b[b].slots[si];

		if (s->n_tokens)
			n++;
		copy_tokens(&s->tokens, &s->n_tokens, NULL, 0);
		s->id_task = SLOTS_NO_TASK;
		settle_expect_locked(s);
	}
	pthread_mutex_unlock(&t->lock);
	return n;
}

unsigned slots_held(struct slot_table *t, unsigned b)
{
	unsigned n = 0;

	pthread_mutex_lock(&t->lock);
	for (unsigned si = 0; si < t->b[b].n_slots && si < SLOTS_MAX_PER_BACKEND; si++)
		n += t->b[b].slots[si].held != 0;
	pthread_mutex_unlock(&t->lock);
	return n;
}

int slots_copy_tokens(struct slot_table *t, unsigned b, unsigned si, int32_t **tokens, size_t *n)
{
	struct slot *s = &t->b[b].slots[si];

	*tokens = NULL;
	*n = 0;
	pthread_mutex_lock(&t->lock);
	copy_tokens(tokens, n, s->tokens, s->n_tokens);
	pthread_mutex_unlock(&t->lock);
	return *n || !s->n_tokens ? 0 : -ENOMEM;
}

unsigned slots_idle_each(struct slot_table *t, unsigned b, unsigned except, int forget,
                         void (*cb)(void *ctx, const int32_t *tokens, size_t n), void *ctx)
{
	unsigned n = 0;

	pthread_mutex_lock(&t->lock);
	for (unsigned si = 0; si < t->b[b].n_slots && si < SLOTS_MAX_PER_BACKEND; si++) {
		struct slot *s = &t->b[b].slots[si];

		if (si == except || s->held || s->requests || !s->n_tokens)
			continue;
		cb(ctx, s->tokens, s->n_tokens);
		if (forget) {
			copy_tokens(&s->tokens, &s->n_tokens, NULL, 0);
			s->id_task = SLOTS_NO_TASK;
			settle_expect_locked(s);
		}
		n++;
	}
	pthread_mutex_unlock(&t->lock);
	return n;
}

int slots_wait_saves(struct slot_table *t, unsigned b, unsigned except, unsigned timeout_ms)
{
	struct timespec dl;
	int rc = 0;

	deadline_after(timeout_ms, &dl);
	pthread_mutex_lock(&t->lock);
	for (;;) {
		int saving = 0;

		for (unsigned si = 0; si < t->b[b].n_slots && si < SLOTS_MAX_PER_BACKEND; si++)
			saving |= si != except && t->b[b].slots[si].saving;
		if (!saving || t->stopping)
			break;
		if (pthread_cond_timedwait(&t->cond, &t->lock, &dl) == ETIMEDOUT) {
			rc = -ETIMEDOUT;
			break;
		}
	}
	pthread_mutex_unlock(&t->lock);
	return rc;
}
