/* options.h: the option table behind kvtierd's and kvtier-llama's command
 * lines. One table (name, argument, default, help) drives getopt_long,
 * --help and --help-markdown (the configuration references in docs/ are
 * that Markdown, checked by tests), as Redis's config.c does.
 */
#ifndef KVTIER_OPTIONS_H
#define KVTIER_OPTIONS_H

#include <getopt.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

struct option_def {
	const char *name;  /* long option, without "--" */
	int id;            /* getopt_long's return value for it */
	const char *arg;   /* argument name; NULL: a flag */
	const char *def;   /* default as shown to users; NULL: none shown */
	const char *help;
};

/* Fills out[0..n] (n + 1 entries: the last is the zero terminator) for
 * getopt_long from defs[0..n). */
void options_longopts(const struct option_def *defs, size_t n, struct option *out);

/* Writes the "Options:" block of --help: one line per option, its help and
 * default, the left column `width` characters wide. */
void options_usage(FILE *f, const struct option_def *defs, size_t n, int width);

/* Prints the table as Markdown (option, argument, default, meaning). */
void options_markdown(FILE *f, const struct option_def *defs, size_t n);

/* Parses a decimal in [lo, hi]. Returns 0 or -1. */
int options_parse_uint(const char *s, unsigned lo, unsigned hi, unsigned *out);

/* Parses "123", "64K", "2G", "1TiB", ... (powers of 1024). Returns 0 or -1. */
int options_parse_size(const char *s, uint64_t *out);

#endif /* KVTIER_OPTIONS_H */
