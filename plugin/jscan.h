/* jscan.h: reading a JSON request body in place, without a parse tree.
 *
 * kvtier-llama needs a few members of a request body (the prompt, the chat
 * messages, the model) and forwards the body itself. A parse tree costs a
 * multiple of the body (a copy of every string, tens of bytes per number),
 * so the body is checked once and then read through spans: views into the
 * caller's buffer, valid as long as that buffer is. Nothing here allocates
 * except jscan_string_dup().
 *
 * The grammar is RFC 8259, with jansson's refusals kept so that a body
 * jansson refused is refused here too: strict UTF-8, no \u0000, nesting at
 * most JSCAN_MAX_DEPTH. Duplicate keys: lookups take the last one, as
 * llama-server's parser (nlohmann::json) does.
 */
#ifndef KVTIER_PLUGIN_JSCAN_H
#define KVTIER_PLUGIN_JSCAN_H

#include <stddef.h>
#include <stdint.h>

#define JSCAN_MAX_DEPTH 2048

/* A view of one JSON value (or a key without its quotes) in a buffer. */
struct jspan {
	const char *p;
	size_t len;
};

/* Checks that s[0..len) is one JSON value with only whitespace around it.
 * Returns 0 with *root set to the value (whitespace trimmed), or -EINVAL. */
int jscan_check(const char *s, size_t len, struct jspan *root);

/* The type of a checked value: '{', '[', '"', 'n' (null), 't', 'f' or '0'
 * (a number); 0 for an empty span. */
char jscan_type(struct jspan v);

/* Iterates the members of a checked object: set *pos to 0 first. Returns 1
 * with the key (raw, quotes stripped, escapes kept) and the value, 0 after
 * the last member. */
int jscan_member_next(struct jspan obj, size_t *pos, struct jspan *key, struct jspan *val);

/* Iterates the elements of a checked array: set *pos to 0 first. Returns 1
 * with the element, 0 after the last one. */
int jscan_element_next(struct jspan arr, size_t *pos, struct jspan *val);

/* The last member of a checked object named name. Returns 1 with *val set,
 * 0 when there is none, -EINVAL when a key holds an escape (it could spell
 * name: the caller cannot tell what the backend will read). */
int jscan_get(struct jspan obj, const char *name, struct jspan *val);

/* 1 when key (from jscan_member_next) is exactly name. */
int jscan_key_is(struct jspan key, const char *name);

/* Decodes a checked string value into a malloc'd NUL-terminated string.
 * Returns 0, -EINVAL (not a string), -E2BIG (longer than max bytes) or
 * -ENOMEM. */
int jscan_string_dup(struct jspan v, size_t max, char **out);

/* A checked value that is an integer (no fraction, no exponent) within
 * [lo, hi]. Returns 0 with *out set, or -EINVAL. */
int jscan_int(struct jspan v, int64_t lo, int64_t hi, int64_t *out);

/* Writes s as a JSON string (quotes included) into out, which has room for
 * cap bytes. Returns the length it needs (write again with a larger buffer
 * when that exceeds cap). s must be valid UTF-8. */
size_t jscan_quote(const char *s, char *out, size_t cap);

#endif /* KVTIER_PLUGIN_JSCAN_H */
