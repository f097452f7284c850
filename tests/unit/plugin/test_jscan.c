/* test_jscan.c: the in-place JSON reader of kvtier-llama (plugin/jscan.c):
 * what it accepts and refuses (jansson's refusals kept), lookups (last
 * duplicate wins, escaped keys refused), decoding and quoting.
 */
#include "check.h"
#include "jscan.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static int ok(const char *s)
{
	struct jspan r;

	return jscan_check(s, strlen(s), &r) == 0;
}

int main(void)
{
	struct jspan root, v, k;
	size_t pos = 0, n = 0;
	char *str, buf[64], *deep;
	int64_t x;

	/* Accepted. */
	CHECK(ok("{}") && ok(" [ ] ") && ok("\"a\"") && ok("-0.5e+3") && ok("true"));
	CHECK(ok("{\"a\":[1,{\"b\":null}],\"c\":\"\\u00e9\\ud83d\\ude00\"}"));
	CHECK(ok("\"\xc3\xa9\xf0\x9f\x98\x80\""));
	/* Refused, as jansson refuses them. */
	CHECK(!ok("") && !ok("{") && !ok("{\"a\"}") && !ok("[1,]") && !ok("{\"a\":1,}"));
	CHECK(!ok("01") && !ok("1.") && !ok("1e") && !ok("tru") && !ok("{} x"));
	CHECK(!ok("\"\\u0000\"") && !ok("\"\\ud800\"") && !ok("\"\\udc00\"") && !ok("\"\\x\""));
	CHECK(!ok("\"\xed\xa0\x80\"") && !ok("\"\xc0\xaf\"") && !ok("\"\x01\""));
	/* Nesting: the limit holds, and past it is refused without a crash. */
	deep = malloc(2 * 100000 + 1);
	CHECK(deep);
	memset(deep, '[', 100000);
	memset(deep + 100000, ']', 100000);
	deep[200000] = '\0';
	CHECK(!ok(deep));
	deep[JSCAN_MAX_DEPTH] = '\0';
	memset(deep, '[', JSCAN_MAX_DEPTH);
	CHECK(!ok(deep)); /* unterminated */
	free(deep);

	/* Lookups: the last duplicate, as llama-server reads it. */
	const char *doc = " {\"prompt\":\"one\", \"n\" : 5 ,\"prompt\":[1, 2,3],\"e\":{}} ";
	CHECK(jscan_check(doc, strlen(doc), &root) == 0);
	CHECK_EQ_INT(jscan_type(root), '{');
	CHECK_EQ_INT(jscan_get(root, "prompt", &v), 1);
	CHECK(v.len == 8 && memcmp(v.p, "[1, 2,3]", 8) == 0);
	while (jscan_element_next(v, &pos, &k))
		n++;
	CHECK_EQ_INT(n, 3);
	CHECK_EQ_INT(jscan_get(root, "n", &v), 1);
	CHECK(jscan_int(v, 0, 10, &x) == 0 && x == 5);
	CHECK(jscan_int(v, 0, 4, &x) == -EINVAL);
	CHECK_EQ_INT(jscan_get(root, "missing", &v), 0);
	const char *esc = "{\"pro\\u006dpt\":1}";
	CHECK(jscan_check(esc, strlen(esc), &root) == 0);
	CHECK_EQ_INT(jscan_get(root, "prompt", &v), -EINVAL);

	/* Decoding. */
	const char *s = "\"a\\\"b\\\\c\\/\\n\\u00e9\\ud83d\\ude00\"";
	CHECK(jscan_check(s, strlen(s), &v) == 0);
	CHECK(jscan_string_dup(v, 100, &str) == 0);
	CHECK(strcmp(str, "a\"b\\c/\n\xc3\xa9\xf0\x9f\x98\x80") == 0);
	free(str);
	CHECK(jscan_string_dup(v, 3, &str) == -E2BIG && !str);
	CHECK(jscan_check("1.5", 3, &v) == 0 && jscan_int(v, 0, 10, &x) == -EINVAL);

	/* Quoting: what it writes reads back the same. */
	n = jscan_quote("x\"y\\z\n\x01", buf, sizeof(buf));
	CHECK(n == strlen("\"x\\\"y\\\\z\\u000a\\u0001\"") &&
	      memcmp(buf, "\"x\\\"y\\\\z\\u000a\\u0001\"", n) == 0);
	CHECK(jscan_check(buf, n, &v) == 0 && jscan_string_dup(v, 100, &str) == 0);
	CHECK(strcmp(str, "x\"y\\z\n\x01") == 0);
	free(str);
	CHECK_EQ_INT(jscan_quote("abc", NULL, 0), 5);
	printf("jscan: ok\n");
	return 0;
}
