/* check.h: minimal assertions for unit tests (exit 1 on failure, 77 to skip). */
#ifndef KVTIER_CHECK_H
#define KVTIER_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond)                                                                        \
	do {                                                                                \
		if (!(cond)) {                                                              \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
			exit(1);                                                            \
		}                                                                           \
	} while (0)

#define CHECK_EQ_INT(a, b)                                                                 \
	do {                                                                                \
		long long va_ = (long long)(a), vb_ = (long long)(b);                       \
		if (va_ != vb_) {                                                           \
			fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%lld != %lld)\n",   \
				__FILE__, __LINE__, #a, #b, va_, vb_);                      \
			exit(1);                                                            \
		}                                                                           \
	} while (0)

#define SKIP(...)                                                                          \
	do {                                                                                \
		fprintf(stderr, "SKIP: " __VA_ARGS__);                                      \
		fprintf(stderr, "\n");                                                      \
		exit(77);                                                                   \
	} while (0)

/* The fixtures directory (shared/fixtures/llama-slots), from the environment. */
static inline const char *fixtures_dir(void)
{
	const char *d = getenv("KVTIER_FIXTURES");
	return d ? d : "tests/fixtures/llama-slots";
}

#endif /* KVTIER_CHECK_H */
