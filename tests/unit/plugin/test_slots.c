/* test_slots.c: the slot table's choice, FIFO queues, save hand-over and stop.
 * Exit 0 pass, 1 fail. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "slots.h"

static int failures;

#define CHECK(cond)                                                                                \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
			failures++;                                                                \
		}                                                                                  \
	} while (0)

static const char *const urls[] = {"http://a", "http://b"};

static void table(struct slot_table *t, unsigned slots_a, unsigned slots_b)
{
	if (slots_init(t, urls, 2) != 0) {
		fprintf(stderr, "slots_init failed\n");
		exit(1);
	}
	t->b[0].up = t->b[1].up = 1;
	t->b[0].n_slots = slots_a;
	t->b[1].n_slots = slots_b;
}

static void query(struct slot_query *q, const int32_t *tok, size_t n, size_t be)
{
	memset(q, 0, sizeof(*q));
	for (int i = 0; i < 2; i++) {
		q->tokens[i] = tok;
		q->n_tokens[i] = n;
	}
	q->break_even = be;
}

static void test_choice(void)
{
	struct slot_table t;
	struct slot_query q;
	struct slot_ticket a, b, c, d;
	int32_t x[200], y[200];

	for (int i = 0; i < 200; i++) {
		x[i] = i;
		y[i] = 1000 + i;
	}
	table(&t, 1, 2);
	query(&q, x, 100, 64);
	/* All idle and empty: the least recently used, the first on a tie. */
	CHECK(slots_choose(&t, &q, &a) == 0 && a.b == 0 && a.s == 0 && a.w.granted);
	query(&q, y, 100, 64);
	CHECK(slots_choose(&t, &q, &b) == 0 && b.b == 1 && b.s == 0 && b.w.granted);
	slots_set_tokens(&t, 0, 0, x, 100, 7);
	slots_release(&t, &a, 0);
	slots_set_tokens(&t, 1, 0, y, 100, SLOTS_NO_TASK);
	slots_release(&t, &b, 0);
	/* x extended: the slot holding x's prefix, though it is not the LRU. */
	query(&q, x, 150, 64);
	CHECK(slots_choose(&t, &q, &c) == 0 && c.b == 0 && c.s == 0 && c.expect_common == 100);
	{
		int64_t task;
		double age = -1;

		CHECK(slots_tracked_prefix(&t, 0, 0, x, 150, &task, &age) == 100 && task == 7);
		CHECK(age >= 0 && age < 60); /* seconds since slots_set_tokens */
	}
	slots_release(&t, &c, 0);
	/* A prefix under the break-even does not count: the LRU idle slot (b1 s1). */
	query(&q, x, 150, 120);
	CHECK(slots_choose(&t, &q, &d) == 0 && d.b == 1 && d.s == 1);
	slots_release(&t, &d, 0);
	/* A backend that is down, or given no tokens, is never chosen. */
	t.b[0].up = 0;
	query(&q, x, 150, 64);
	CHECK(slots_choose(&t, &q, &c) == 0 && c.b == 1);
	slots_release(&t, &c, 0);
	t.b[1].up = 0;
	CHECK(slots_choose(&t, &q, &c) == -ENOENT);
	/* Forgetting a backend drops what its slots hold. */
	CHECK(slots_forget_backend(&t, 0) == 1);
	CHECK(slots_tracked_prefix(&t, 0, 0, x, 150, NULL, NULL) == 0);
	CHECK(slots_common_prefix(x, 10, x, 5) == 5 && slots_common_prefix(x, 10, y, 10) == 0 &&
	      slots_common_prefix(NULL, 0, x, 3) == 0);
	slots_destroy(&t);
}

struct waiter_arg {
	struct slot_table *t;
	struct slot_ticket tk;
	int rc;
	int order;
	int *counter;
	pthread_mutex_t *m;
};

static void *waiter(void *p)
{
	struct waiter_arg *w = p;

	w->rc = slots_wait(w->t, &w->tk, 5000);
	pthread_mutex_lock(w->m);
	w->order = ++*w->counter;
	pthread_mutex_unlock(w->m);
	if (w->rc == 0)
		slots_release(w->t, &w->tk, 0);
	return NULL;
}

static void test_queue_and_save(void)
{
	struct slot_table t;
	struct slot_query q;
	struct slot_ticket a, late;
	struct waiter_arg w1 = {0}, w2 = {0};
	pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
	pthread_t th1, th2;
	int32_t x[100];
	int counter = 0;

	for (int i = 0; i < 100; i++)
		x[i] = i;
	table(&t, 1, 0);
	query(&q, x, 100, 64);
	CHECK(slots_choose(&t, &q, &a) == 0 && a.w.granted);
	/* Busy: the next ones queue, and a wait can time out (and leaves the queue). */
	CHECK(slots_choose(&t, &q, &late) == 0 && late.queued && !late.w.granted);
	CHECK(slots_wait(&t, &late, 50) == -ETIMEDOUT);
	CHECK(t.b[0].slots[0].requests == 1 && t.b[0].slots[0].head == NULL);
	w1.t = w2.t = &t;
	w1.counter = w2.counter = &counter;
	w1.m = w2.m = &m;
	CHECK(slots_choose(&t, &q, &w1.tk) == 0 && w1.tk.queued);
	CHECK(slots_choose(&t, &q, &w2.tk) == 0 && w2.tk.queued);
	pthread_create(&th1, NULL, waiter, &w1);
	pthread_create(&th2, NULL, waiter, &w2);
	usleep(50000);
	/* The request ends with a save: the slot passes to the save, not to w1. */
	slots_release(&t, &a, 1);
	usleep(50000);
	CHECK(!w1.tk.w.granted && t.b[0].slots[0].saving && t.b[0].slots[0].held);
	slots_save_done(&t, 0, 0);
	pthread_join(th1, NULL);
	pthread_join(th2, NULL);
	CHECK(w1.rc == 0 && w2.rc == 0 && w1.order == 1 && w2.order == 2); /* FIFO */
	CHECK(!t.b[0].slots[0].held && t.b[0].slots[0].requests == 0);
	/* A slot only a save holds is chosen for its prefix over nothing at all. */
	slots_set_tokens(&t, 0, 0, x, 100, SLOTS_NO_TASK);
	CHECK(slots_choose(&t, &q, &a) == 0);
	slots_release(&t, &a, 1);
	CHECK(slots_choose(&t, &q, &late) == 0 && late.queued && late.expect_common == 100);
	/* Stopping ends waits at once. */
	slots_stop(&t);
	CHECK(slots_wait(&t, &late, 5000) == -ECANCELED);
	slots_save_done(&t, 0, 0);
	slots_destroy(&t);
}

/* A request that answered its client and only reports and saves now: the
 * next turn of its conversation queues on its slot although another slot is
 * idle, and gets it when the request releases it. */
static void test_finishing(void)
{
	struct slot_table t;
	struct slot_query q;
	struct slot_ticket a, next, other;
	int32_t x[200], y[200];

	for (int i = 0; i < 200; i++) {
		x[i] = i;
		y[i] = 5000 + i;
	}
	table(&t, 2, 0);
	query(&q, x, 100, 64);
	CHECK(slots_choose(&t, &q, &a) == 0 && a.w.granted);
	slots_finishing(&t, &a);
	slots_finishing(&t, &a); /* once only */
	CHECK(t.b[0].slots[a.s].requests == 0 && t.b[0].slots[a.s].held);
	query(&q, x, 150, 64);
	CHECK(slots_choose(&t, &q, &next) == 0 && next.s == a.s && next.queued &&
	      next.expect_common == 100);
	/* Another conversation takes the idle slot, not the finishing one. */
	query(&q, y, 100, 64);
	CHECK(slots_choose(&t, &q, &other) == 0 && other.s != a.s && other.w.granted);
	slots_set_tokens(&t, 0, a.s, x, 100, SLOTS_NO_TASK);
	slots_release(&t, &a, 0);
	CHECK(next.w.granted && slots_wait(&t, &next, 1000) == 0);
	CHECK(t.b[0].slots[a.s].requests == 1);
	slots_release(&t, &next, 0);
	slots_release(&t, &other, 0);
	CHECK(t.b[0].slots[0].requests == 0 && t.b[0].slots[1].requests == 0);
	CHECK(!t.b[0].slots[0].held && !t.b[0].slots[1].held);
	slots_destroy(&t);
}

int main(void)
{
	test_choice();
	test_queue_and_save();
	test_finishing();
	if (failures) {
		fprintf(stderr, "%d check(s) failed\n", failures);
		return 1;
	}
	printf("test_slots: ok\n");
	return 0;
}
