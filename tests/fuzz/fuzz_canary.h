/* fuzz_canary.h: a planted bug that proves a fuzz run can fail.
 *
 * With KVTIER_FUZZ_CANARY=1 in the environment, an input that starts with
 * "KVTIER-FUZZ-CANARY" makes the target read one byte past the end of its
 * input (libFuzzer hands it an exact-size heap copy): ASan must report a
 * heap-buffer-overflow and the run must exit non-zero. scripts/fuzz checks
 * that before fuzzing; without the variable the canary never fires.
 */
#ifndef KVTIER_FUZZ_CANARY_H
#define KVTIER_FUZZ_CANARY_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_CANARY "KVTIER-FUZZ-CANARY"

static int fuzz_canary_on;

static inline void fuzz_canary_init(void)
{
	const char *c = getenv("KVTIER_FUZZ_CANARY");

	fuzz_canary_on = c && strcmp(c, "1") == 0;
}

/* Reads data[size] (out of bounds) for a canary input; returns what it read. */
static inline int fuzz_canary(const uint8_t *data, size_t size)
{
	size_t n = sizeof(FUZZ_CANARY) - 1;

	if (!fuzz_canary_on || size < n || memcmp(data, FUZZ_CANARY, n) != 0)
		return 0;
	return *(volatile const uint8_t *)(data + size);
}

#endif /* KVTIER_FUZZ_CANARY_H */
