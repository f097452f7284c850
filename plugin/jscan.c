/* jscan.c: reading a JSON body in place (see jscan.h).
 *
 * One recursive-descent skipper both checks a document and finds the end of
 * a value; the readers walk checked spans with it. It must never allocate
 * for a value it only skips, and never read past a span.
 */
#include "jscan.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "utf8.h"

static size_t skip_ws(const char *s, size_t len, size_t i)
{
	while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
		i++;
	return i;
}

/* Four hex digits at s[i]. Returns 0 with *v set, or -1. */
static int hex4(const char *s, size_t len, size_t i, unsigned *v)
{
	*v = 0;
	if (i + 4 > len)
		return -1;
	for (size_t k = i; k < i + 4; k++) {
		char c = s[k];

		*v <<= 4;
		if (c >= '0' && c <= '9')
			*v |= (unsigned)(c - '0');
		else if (c >= 'a' && c <= 'f')
			*v |= (unsigned)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			*v |= (unsigned)(c - 'A' + 10);
		else
			return -1;
	}
	return 0;
}

/* The string that starts at s[i] (a quote): the index past its closing
 * quote, or 0 when it is not a valid string. */
static size_t skip_string(const char *s, size_t len, size_t i)
{
	for (i++; i < len;) {
		unsigned char c = (unsigned char)s[i];
		unsigned v, lo;
		size_t n;

		if (c == '"')
			return i + 1;
		if (c < 0x20)
			return 0;
		if (c < 0x80 && c != '\\') {
			i++;
			continue;
		}
		if (c != '\\') {
			n = utf8_seq_len((const unsigned char *)s + i, len - i);
			if (n == 0)
				return 0;
			i += n;
			continue;
		}
		if (i + 1 >= len)
			return 0;
		c = (unsigned char)s[i + 1];
		if (c != 'u') {
			if (!c || !strchr("\"\\/bfnrt", c))
				return 0;
			i += 2;
			continue;
		}
		if (hex4(s, len, i + 2, &v) || v == 0 || (v >= 0xDC00 && v <= 0xDFFF))
			return 0;
		if (v >= 0xD800 && v <= 0xDBFF) {
			if (i + 12 > len || s[i + 6] != '\\' || s[i + 7] != 'u' ||
			    hex4(s, len, i + 8, &lo) || lo < 0xDC00 || lo > 0xDFFF)
				return 0;
			i += 12;
		} else {
			i += 6;
		}
	}
	return 0;
}

static size_t skip_digits(const char *s, size_t len, size_t i)
{
	while (i < len && s[i] >= '0' && s[i] <= '9')
		i++;
	return i;
}

/* The number at s[i]: the index past it, or 0. */
static size_t skip_number(const char *s, size_t len, size_t i)
{
	size_t j;

	if (s[i] == '-')
		i++;
	if (i >= len || s[i] < '0' || s[i] > '9')
		return 0;
	i = s[i] == '0' ? i + 1 : skip_digits(s, len, i);
	if (i < len && s[i] == '.') {
		j = skip_digits(s, len, i + 1);
		if (j == i + 1)
			return 0;
		i = j;
	}
	if (i < len && (s[i] == 'e' || s[i] == 'E')) {
		i++;
		if (i < len && (s[i] == '+' || s[i] == '-'))
			i++;
		j = skip_digits(s, len, i);
		if (j == i)
			return 0;
		i = j;
	}
	return i;
}

static size_t skip_literal(const char *s, size_t len, size_t i, const char *lit)
{
	size_t n = strlen(lit);

	return i + n <= len && memcmp(s + i, lit, n) == 0 ? i + n : 0;
}

/* The value that starts at s[i] (no whitespace before it): the index past
 * it, or 0 when it is not valid JSON or nests deeper than the limit. */
static size_t skip_value(const char *s, size_t len, size_t i, unsigned depth)
{
	char close;

	if (i >= len)
		return 0;
	switch (s[i]) {
	case '"':
		return skip_string(s, len, i);
	case 't':
		return skip_literal(s, len, i, "true");
	case 'f':
		return skip_literal(s, len, i, "false");
	case 'n':
		return skip_literal(s, len, i, "null");
	case '{':
	case '[':
		break;
	default:
		return skip_number(s, len, i);
	}
	if (depth >= JSCAN_MAX_DEPTH)
		return 0;
	close = s[i] == '{' ? '}' : ']';
	i = skip_ws(s, len, i + 1);
	if (i < len && s[i] == close)
		return i + 1;
	for (;;) {
		if (close == '}') {
			if (i >= len || s[i] != '"' || !(i = skip_string(s, len, i)))
				return 0;
			i = skip_ws(s, len, i);
			if (i >= len || s[i] != ':')
				return 0;
			i = skip_ws(s, len, i + 1);
		}
		if (!(i = skip_value(s, len, i, depth + 1)))
			return 0;
		i = skip_ws(s, len, i);
		if (i >= len)
			return 0;
		if (s[i] == close)
			return i + 1;
		if (s[i] != ',')
			return 0;
		i = skip_ws(s, len, i + 1);
	}
}

int jscan_check(const char *s, size_t len, struct jspan *root)
{
	size_t i = skip_ws(s, len, 0), end;

	if (i >= len || !(end = skip_value(s, len, i, 0)) || skip_ws(s, len, end) != len)
		return -EINVAL;
	root->p = s + i;
	root->len = end - i;
	return 0;
}

char jscan_type(struct jspan v)
{
	if (v.len == 0)
		return 0;
	if (v.p[0] == '-' || (v.p[0] >= '0' && v.p[0] <= '9'))
		return '0';
	return v.p[0];
}

/* The next member or element of a checked container (with_key: object). */
static int next_in(struct jspan c, size_t *pos, int with_key, struct jspan *key,
                   struct jspan *val)
{
	size_t i = *pos ? *pos : 1, end;

	i = skip_ws(c.p, c.len, i);
	if (i < c.len && c.p[i] == ',')
		i = skip_ws(c.p, c.len, i + 1);
	if (i >= c.len || c.p[i] == '}' || c.p[i] == ']')
		return 0;
	if (with_key) {
		end = skip_string(c.p, c.len, i);
		if (!end)
			return 0;
		key->p = c.p + i + 1;
		key->len = end - i - 2;
		i = skip_ws(c.p, c.len, end);
		if (i >= c.len || c.p[i] != ':')
			return 0;
		i = skip_ws(c.p, c.len, i + 1);
	}
	end = skip_value(c.p, c.len, i, 0);
	if (!end)
		return 0;
	val->p = c.p + i;
	val->len = end - i;
	*pos = end;
	return 1;
}

int jscan_member_next(struct jspan obj, size_t *pos, struct jspan *key, struct jspan *val)
{
	if (jscan_type(obj) != '{')
		return 0;
	return next_in(obj, pos, 1, key, val);
}

int jscan_element_next(struct jspan arr, size_t *pos, struct jspan *val)
{
	if (jscan_type(arr) != '[')
		return 0;
	return next_in(arr, pos, 0, NULL, val);
}

int jscan_key_is(struct jspan key, const char *name)
{
	return key.len == strlen(name) && memcmp(key.p, name, key.len) == 0;
}

int jscan_get(struct jspan obj, const char *name, struct jspan *val)
{
	struct jspan k, v;
	size_t pos = 0;
	int found = 0;

	while (jscan_member_next(obj, &pos, &k, &v)) {
		if (memchr(k.p, '\\', k.len))
			return -EINVAL;
		if (jscan_key_is(k, name)) {
			*val = v;
			found = 1;
		}
	}
	return found;
}

/* Appends code point cp as UTF-8 at out. Returns the bytes written. */
static size_t put_utf8(unsigned cp, char *out)
{
	if (cp < 0x80) {
		out[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (char)(0xC0 | (cp >> 6));
		out[1] = (char)(0x80 | (cp & 0x3F));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (char)(0xE0 | (cp >> 12));
		out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
		out[2] = (char)(0x80 | (cp & 0x3F));
		return 3;
	}
	out[0] = (char)(0xF0 | (cp >> 18));
	out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
	out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
	out[3] = (char)(0x80 | (cp & 0x3F));
	return 4;
}

int jscan_string_dup(struct jspan v, size_t max, char **out)
{
	const char *s = v.p;
	size_t n = 0, i;
	char *d;

	*out = NULL;
	if (jscan_type(v) != '"' || v.len < 2)
		return -EINVAL;
	/* Decoded, a string is never longer than its quoted form. */
	d = malloc(v.len - 1);
	if (!d)
		return -ENOMEM;
	for (i = 1; i < v.len - 1;) {
		unsigned cp, lo;

		if (s[i] != '\\') {
			d[n++] = s[i++];
			continue;
		}
		switch (s[i + 1]) {
		case 'b': d[n++] = '\b'; break;
		case 'f': d[n++] = '\f'; break;
		case 'n': d[n++] = '\n'; break;
		case 'r': d[n++] = '\r'; break;
		case 't': d[n++] = '\t'; break;
		case 'u':
			hex4(s, v.len, i + 2, &cp);
			if (cp >= 0xD800 && cp <= 0xDBFF) {
				hex4(s, v.len, i + 8, &lo);
				cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
				i += 6;
			}
			n += put_utf8(cp, d + n);
			i += 6;
			continue;
		default: d[n++] = s[i + 1]; break; /* " \ / */
		}
		i += 2;
	}
	d[n] = '\0';
	if (n > max) {
		free(d);
		return -E2BIG;
	}
	*out = d;
	return 0;
}

int jscan_int(struct jspan v, int64_t lo, int64_t hi, int64_t *out)
{
	size_t i = 0;
	int neg = 0;
	int64_t x = 0;

	if (jscan_type(v) != '0')
		return -EINVAL;
	if (v.p[0] == '-') {
		neg = 1;
		i = 1;
	}
	if (i == v.len)
		return -EINVAL;
	for (; i < v.len; i++) {
		if (v.p[i] < '0' || v.p[i] > '9')
			return -EINVAL; /* a fraction or an exponent */
		if (x > (INT64_MAX - 9) / 10)
			return -EINVAL;
		x = x * 10 + (v.p[i] - '0');
	}
	if (neg)
		x = -x;
	if (x < lo || x > hi)
		return -EINVAL;
	*out = x;
	return 0;
}

size_t jscan_quote(const char *s, char *out, size_t cap)
{
	static const char hex[] = "0123456789abcdef";
	size_t n = 0;

#define PUT(c)                                                                                     \
	do {                                                                                       \
		if (n < cap)                                                                       \
			out[n] = (c);                                                              \
		n++;                                                                               \
	} while (0)
	PUT('"');
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\') {
			PUT('\\');
			PUT((char)c);
		} else if (c < 0x20) {
			PUT('\\');
			PUT('u');
			PUT('0');
			PUT('0');
			PUT(hex[c >> 4]);
			PUT(hex[c & 15]);
		} else {
			PUT((char)c);
		}
	}
	PUT('"');
#undef PUT
	return n;
}
