/* options.c: see options.h. */
#include "options.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

void options_longopts(const struct option_def *defs, size_t n, struct option *out)
{
	for (size_t i = 0; i < n; i++) {
		out[i].name = defs[i].name;
		out[i].has_arg = defs[i].arg ? required_argument : no_argument;
		out[i].flag = NULL;
		out[i].val = defs[i].id;
	}
	memset(&out[n], 0, sizeof(out[n]));
}

void options_usage(FILE *f, const struct option_def *defs, size_t n, int width)
{
	for (size_t i = 0; i < n; i++) {
		char lhs[96];
		snprintf(lhs, sizeof(lhs), "--%s%s%s", defs[i].name, defs[i].arg ? " " : "",
			 defs[i].arg ? defs[i].arg : "");
		fprintf(f, "  %-*s %s", width, lhs, defs[i].help);
		if (defs[i].def)
			fprintf(f, " [default: %s]", defs[i].def);
		fputc('\n', f);
	}
}

void options_markdown(FILE *f, const struct option_def *defs, size_t n)
{
	fprintf(f, "| option | argument | default | meaning |\n|---|---|---|---|\n");
	for (size_t i = 0; i < n; i++)
		fprintf(f, "| `--%s` | %s | %s | %s |\n", defs[i].name, defs[i].arg ? defs[i].arg : "",
			defs[i].def ? defs[i].def : "", defs[i].help);
}

int options_parse_uint(const char *s, unsigned lo, unsigned hi, unsigned *out)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi || s[0] == '-')
		return -1;
	*out = (unsigned)v;
	return 0;
}

int options_parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;
	unsigned shift = 0;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s || s[0] == '-')
		return -1;
	switch (*end) {
	case '\0':
		break;
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	case 't': case 'T': shift = 40; end++; break;
	default:
		return -1;
	}
	if (shift && *end == 'i' && end[1] == 'B')
		end += 2;
	else if (shift && *end == 'B')
		end++;
	if (*end || (shift && v > (UINT64_MAX >> shift)))
		return -1;
	*out = (uint64_t)v << shift;
	return 0;
}
