/* test_utf8.c: the strict UTF-8 checker (common/utf8.c) that the namespace
 * rule (store_ns_valid, every RPC with a namespace) and the metrics label
 * escaping share (reliability review D5).
 *
 * Edge cases on both sides of every boundary (overlong forms, surrogates,
 * U+10FFFF, F5..FF leads, truncation, stray continuations), then exhaustive
 * sweeps: every code point encoded correctly is accepted with its length,
 * and of all 2- and 3-byte sequences exactly the valid ones are.
 */
#include "check.h"
#include "index.h"
#include "kvtier.h"
#include "store.h"
#include "utf8.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

static size_t len_of(const char *s)
{
	return utf8_seq_len((const unsigned char *)s, strlen(s) ? strlen(s) : 1);
}

static size_t encode(uint32_t cp, unsigned char *b)
{
	if (cp < 0x80) {
		b[0] = cp;
		return 1;
	}
	if (cp < 0x800) {
		b[0] = 0xc0 | cp >> 6;
		b[1] = 0x80 | (cp & 0x3f);
		return 2;
	}
	if (cp < 0x10000) {
		b[0] = 0xe0 | cp >> 12;
		b[1] = 0x80 | ((cp >> 6) & 0x3f);
		b[2] = 0x80 | (cp & 0x3f);
		return 3;
	}
	b[0] = 0xf0 | cp >> 18;
	b[1] = 0x80 | ((cp >> 12) & 0x3f);
	b[2] = 0x80 | ((cp >> 6) & 0x3f);
	b[3] = 0x80 | (cp & 0x3f);
	return 4;
}

static int ns_ok(const char *ns)
{
	char err[512] = "";
	int rc = store_ns_valid(ns, err, sizeof(err));
	CHECK(rc == 0 || rc == KVTIER_E_INVALID);
	CHECK(rc == 0 || strstr(err, "namespace"));
	return rc == 0;
}

int main(void)
{
	/* boundaries of each length */
	CHECK_EQ_INT(len_of("\x7f"), 1);
	CHECK_EQ_INT(len_of("\xc2\x80"), 2);          /* U+0080 */
	CHECK_EQ_INT(len_of("\xdf\xbf"), 2);          /* U+07FF */
	CHECK_EQ_INT(len_of("\xe0\xa0\x80"), 3);      /* U+0800 */
	CHECK_EQ_INT(len_of("\xed\x9f\xbf"), 3);      /* U+D7FF */
	CHECK_EQ_INT(len_of("\xee\x80\x80"), 3);      /* U+E000 */
	CHECK_EQ_INT(len_of("\xef\xbf\xbf"), 3);      /* U+FFFF */
	CHECK_EQ_INT(len_of("\xf0\x90\x80\x80"), 4);  /* U+10000 */
	CHECK_EQ_INT(len_of("\xf4\x8f\xbf\xbf"), 4);  /* U+10FFFF */
	/* refused: the review's cases and their neighbours */
	CHECK_EQ_INT(len_of("\xed\xa0\x80"), 0);      /* U+D800, high surrogate */
	CHECK_EQ_INT(len_of("\xed\xbf\xbf"), 0);      /* U+DFFF, low surrogate */
	CHECK_EQ_INT(len_of("\xf4\x90\x80\x80"), 0);  /* U+110000 */
	CHECK_EQ_INT(len_of("\xc0\xaf"), 0);          /* overlong '/' */
	CHECK_EQ_INT(len_of("\xc1\xbf"), 0);          /* overlong U+007F */
	CHECK_EQ_INT(len_of("\xe0\x80\xaf"), 0);      /* overlong 3-byte '/' */
	CHECK_EQ_INT(len_of("\xe0\x9f\xbf"), 0);      /* overlong U+07FF */
	CHECK_EQ_INT(len_of("\xf0\x80\x80\xaf"), 0);  /* overlong 4-byte '/' */
	CHECK_EQ_INT(len_of("\xf0\x8f\xbf\xbf"), 0);  /* overlong U+FFFF */
	CHECK_EQ_INT(len_of("\xf5\x80\x80\x80"), 0);  /* F5 lead */
	CHECK_EQ_INT(len_of("\xf7\xbf\xbf\xbf"), 0);  /* F7 lead */
	CHECK_EQ_INT(len_of("\xf8\x88\x80\x80\x80"), 0);
	CHECK_EQ_INT(len_of("\xff"), 0);
	CHECK_EQ_INT(len_of("\x80"), 0);              /* stray continuation */
	CHECK_EQ_INT(len_of("\xe2\x82"), 0);          /* truncated at the NUL */
	CHECK_EQ_INT(utf8_seq_len((const unsigned char *)"\xe2\x82\xac", 2), 0); /* avail */
	CHECK_EQ_INT(utf8_seq_len((const unsigned char *)"\xe2\x82\xac", 3), 3);
	CHECK_EQ_INT(utf8_seq_len((const unsigned char *)"a", 0), 0);
	CHECK_EQ_INT(len_of("\xe2\x28\xa1"), 0);      /* bad continuation */

	/* every code point, correctly encoded, is accepted (surrogates are not) */
	for (uint32_t cp = 0; cp <= 0x10ffff; cp++) {
		unsigned char b[4];
		size_t n = encode(cp, b);
		size_t want = cp >= 0xd800 && cp <= 0xdfff ? 0 : n;
		if (utf8_seq_len(b, n) != want) {
			fprintf(stderr, "U+%04X: got %zu, want %zu\n", cp, utf8_seq_len(b, n), want);
			return 1;
		}
	}
	/* of all 2- and 3-byte sequences, exactly the valid characters pass */
	size_t ok2 = 0, ok3 = 0;
	for (unsigned a = 0x80; a < 0x100; a++)
		for (unsigned b = 0; b < 0x100; b++) {
			unsigned char s[2] = {a, b};
			ok2 += utf8_seq_len(s, 2) == 2;
			for (unsigned c = 0; c < 0x100; c++) {
				unsigned char t[3] = {a, b, c};
				ok3 += utf8_seq_len(t, 3) == 3;
			}
		}
	CHECK_EQ_INT(ok2, 0x800 - 0x80);
	CHECK_EQ_INT(ok3, 0x10000 - 0x800 - 0x800); /* minus the 2048 surrogates */

	/* the name rule */
	size_t bad = 99;
	CHECK_EQ_INT(utf8_name_check("model-A", 7, 255, &bad), 0);
	CHECK_EQ_INT(utf8_name_check("", 0, 255, &bad), -1);
	CHECK_EQ_INT(bad, 0);
	CHECK_EQ_INT(utf8_name_check("abc", 3, 2, &bad), -1);
	CHECK_EQ_INT(utf8_name_check("a\x1f" "b", 3, 255, &bad), -1);
	CHECK_EQ_INT(bad, 1);
	CHECK_EQ_INT(utf8_name_check("ab\x7f", 3, 255, &bad), -1);
	CHECK_EQ_INT(bad, 2);
	CHECK_EQ_INT(utf8_name_check("model-A\0fp", 10, 255, &bad), -1); /* NUL */
	CHECK_EQ_INT(bad, 7);
	CHECK_EQ_INT(utf8_name_check("ab\xed\xa0\x80", 5, 255, &bad), -1);
	CHECK_EQ_INT(bad, 2);
	CHECK_EQ_INT(utf8_name_check("\xc2\x85", 2, 255, &bad), 0); /* U+0085 is not C0 */

	/* store_ns_valid: the daemon's rule, with its message */
	char err[512] = "";
	CHECK(ns_ok("model-A"));
	CHECK(ns_ok("mod\xc3\xa8le-\xe2\x82\xac-\xf0\x9f\x98\x80-\xf4\x8f\xbf\xbf"));
	CHECK(!ns_ok(""));
	CHECK(!ns_ok("a\xed\xa0\x80" "b"));
	CHECK(!ns_ok("a\xf4\x90\x80\x80" "b"));
	CHECK(!ns_ok("a\xc0\xaf" "b"));
	CHECK(!ns_ok("a\xe0\x80\xaf" "b"));
	CHECK(!ns_ok("a\xf5\x80\x80\x80" "b"));
	CHECK(!ns_ok("a\xf7\xbf\xbf\xbf" "b"));
	CHECK(!ns_ok("tab\there"));
	CHECK(!ns_ok("a\xe2\x82")); /* truncated at the end */
	CHECK_EQ_INT(store_ns_valid("a\xed\xa0\x80" "b", err, sizeof(err)), KVTIER_E_INVALID);
	CHECK(strstr(err, "byte 0xed at offset 1"));
	CHECK(strstr(err, "surrogates"));
	char name[INDEX_NS_MAX + 2];
	memset(name, 'x', sizeof(name));
	name[INDEX_NS_MAX] = 0;
	CHECK(ns_ok(name));
	name[INDEX_NS_MAX] = 'x';
	name[INDEX_NS_MAX + 1] = 0;
	CHECK(!ns_ok(name));
	/* a multi-byte character cut by the length limit is refused, not split */
	memset(name, 'x', sizeof(name));
	memcpy(name + INDEX_NS_MAX - 2, "\xe2\x82\xac", 3);
	name[INDEX_NS_MAX + 1] = 0;
	CHECK(!ns_ok(name));
	printf("test_utf8: ok\n");
	return 0;
}
