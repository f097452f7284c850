/* utf8.c: strict UTF-8 (see utf8.h). */
#include "utf8.h"

#include <stdint.h>

size_t utf8_seq_len(const unsigned char *s, size_t avail)
{
	unsigned c;
	uint32_t cp;
	size_t n;

	if (avail == 0)
		return 0;
	c = s[0];
	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf) {
		n = 2;
		cp = c & 0x1f;
	} else if (c >= 0xe0 && c <= 0xef) {
		n = 3;
		cp = c & 0x0f;
	} else if (c >= 0xf0 && c <= 0xf4) {
		n = 4;
		cp = c & 0x07;
	} else {
		return 0; /* continuation byte, C0/C1 (always overlong), F5..FF */
	}
	if (n > avail)
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80) /* also stops at a NUL terminator */
			return 0;
		cp = (cp << 6) | (s[i] & 0x3f);
	}
	if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
	    (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return n;
}

int utf8_name_check(const char *s, size_t n, size_t max, size_t *bad_off)
{
	const unsigned char *p = (const unsigned char *)s;

	if (!s || n == 0 || n > max) {
		*bad_off = n;
		return -1;
	}
	for (size_t i = 0; i < n;) {
		size_t len = utf8_seq_len(p + i, n - i);
		if (len == 0 || (len == 1 && (p[i] < 0x20 || p[i] == 0x7f))) {
			*bad_off = i;
			return -1;
		}
		i += len;
	}
	return 0;
}
