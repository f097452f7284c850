/* cli.c: `kvtier`, the command-line tool of kvtier.
 *
 * A thin shell over libkvtier: global options pick the daemon (Unix socket or
 * host:port) and the bearer token, then one subcommand runs one or a few
 * library calls and prints the result for a person, or as JSON (--json) for
 * a script. Each subcommand has its own option table (getopt_long) and
 * --help. `fsck` is the one command that does not talk to the daemon: it
 * reads the data directory itself (fsck_run), never changing it.
 *
 * Exit status: 0 success (a lookup miss included), 1 failure, 2 usage error
 * (fsck: 1 when it found problems, 2 when it could not run). Every failure
 * prints "kvtier: <command>: <message> (<error name>)" on stderr. This file
 * must never hold a blob in memory; blobs move through
 * kvtier_put_file/kvtier_fetch_file, which stream.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <malloc.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fsck.h"
#include "kvtier.h"
#include "slotfile.h"

#ifndef KVTIER_VERSION
#define KVTIER_VERSION "0.0.0"
#endif

#define CLI_DEFAULT_SOCKET "./kvtier-data/kvtierd.sock"
#define CLI_DEFAULT_DATA "./kvtier-data"
#define CLI_TOKEN_MAX 4096

enum { EXIT_OK = 0, EXIT_FAIL = 1, EXIT_USAGE = 2, EXIT_FSCK_NOT_RUN = 2 };

/* Global state of one run. */
struct cli {
	const char *cmd;     /* the subcommand's name, for messages */
	char *address;       /* what kvtier_open gets */
	char *token;         /* from --token-file, or NULL */
	unsigned timeout_ms; /* 0 = the library's default */
	kvtier_client *c;    /* opened before a command that needs the daemon */
};

struct command {
	const char *name;
	int (*run)(struct cli *g, int argc, char **argv);
	int needs_daemon;
	const char *usage;   /* the arguments after the command name */
	const char *summary; /* one line for `kvtier --help` */
	const char *help;    /* the rest of `kvtier COMMAND --help` */
};

static const struct command *find_command(const char *name);

/* ---- messages ---- */

static void warnx_cmd(const struct cli *g, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void warnx_cmd(const struct cli *g, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "kvtier: %s: ", g->cmd);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* Prints a failed call: the library's (usually the daemon's) message and the
 * error's name. Returns EXIT_FAIL. */
static int fail(const struct cli *g, int rc, const char *context)
{
	const char *msg = g->c ? kvtier_errmsg(g->c) : "";
	const char *name = kvtier_strerror(rc);

	fprintf(stderr, "kvtier: %s: ", g->cmd);
	if (context)
		fprintf(stderr, "%s: ", context);
	/* The status name (INVALID_ARGUMENT, NOT_FOUND, ...) is what scripts
	 * match on; the daemon's message is what a person reads. */
	const char *status = rc < 0 && rc >= KVTIER_E_FIRST ? kvtier_status_name(rc) : NULL;
	if (!msg[0])
		fprintf(stderr, "%s", name);
	else if (strstr(msg, name))
		fprintf(stderr, "%s", msg); /* a local message that already names it */
	else
		fprintf(stderr, "%s (%s)", msg, name);
	if (status)
		fprintf(stderr, " [%s]", status);
	fputc('\n', stderr);
	return EXIT_FAIL;
}

/* A usage error: message, pointer to --help, EXIT_USAGE. */
static int usage_error(const struct cli *g, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int usage_error(const struct cli *g, const char *fmt, ...)
{
	va_list ap;

	if (strcmp(g->cmd, "kvtier") == 0)
		fputs("kvtier: ", stderr);
	else
		fprintf(stderr, "kvtier: %s: ", g->cmd);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	if (strcmp(g->cmd, "kvtier") == 0)
		fprintf(stderr, "\nTry 'kvtier --help'.\n");
	else
		fprintf(stderr, "\nTry 'kvtier %s --help'.\n", g->cmd);
	return EXIT_USAGE;
}

static void command_help(const struct command *cmd)
{
	printf("Usage: kvtier [GLOBAL OPTIONS] %s %s\n\n%s\n\n%s", cmd->name, cmd->usage,
	       cmd->summary, cmd->help);
}

/* ---- parsing ---- */

/* Strict decimal parsing: the whole string, no sign, no blanks, in range.
 * Each returns 0, or -1 on a bad number. */
static int parse_u64(const char *s, uint64_t max, uint64_t *out)
{
	char *end = NULL;
	unsigned long long v = 0;
	int rc = -1;

	if (s && *s >= '0' && *s <= '9') {
		errno = 0;
		v = strtoull(s, &end, 10);
		if (!errno && !*end && v <= max) {
			*out = v;
			rc = 0;
		}
	}
	return rc;
}

static int parse_u32(const char *s, uint32_t *out)
{
	uint64_t v;
	int rc = parse_u64(s, UINT32_MAX, &v);

	if (rc == 0)
		*out = (uint32_t)v;
	return rc;
}

/* A finite, non-negative number (milliseconds). */
static int parse_ms(const char *s, double *out)
{
	char *end = NULL;
	double v;
	int rc = -1;

	if (s && *s && *s != ' ') {
		errno = 0;
		v = strtod(s, &end);
		if (!errno && !*end && isfinite(v) && v >= 0) {
			*out = v;
			rc = 0;
		}
	}
	return rc;
}

/* Parses "1,2,3" (blanks allowed around the commas) into a malloc'd array.
 * Returns 0, -EINVAL or -ENOMEM. */
static int parse_tokens(const char *s, int32_t **out, size_t *n)
{
	size_t cap = 1, k = 0;
	int32_t *t = NULL;
	const char *p = s;
	int rc = 0;

	for (const char *q = s; *q; q++)
		cap += *q == ',';
	t = malloc(cap * sizeof(*t));
	if (!t) {
		rc = -ENOMEM;
		goto out;
	}
	for (;;) {
		char *end;
		long v;

		p += strspn(p, " \t");
		errno = 0;
		v = strtol(p, &end, 10);
		if (end == p || errno || v < INT32_MIN || v > INT32_MAX) {
			rc = -EINVAL;
			goto out;
		}
		t[k++] = (int32_t)v;
		p = end + strspn(end, " \t");
		if (!*p)
			break;
		if (*p != ',') {
			rc = -EINVAL;
			goto out;
		}
		p++;
	}
	*out = t;
	*n = k;
	t = NULL;
out:
	free(t);
	return rc;
}

/* Makes a relative path absolute against the working directory (the daemon
 * resolves paths in its own directory, not ours). Does not resolve symlinks:
 * the daemon checks those itself. Trailing slashes are dropped. */
static char *absolute_path(const char *p)
{
	char *cwd = NULL, *out = NULL;
	size_t len;

	if (p[0] == '/') {
		out = strdup(p);
		goto trim;
	}
	cwd = getcwd(NULL, 0);
	if (!cwd)
		goto out;
	if (strcmp(p, ".") == 0)
		out = strdup(cwd);
	else if (asprintf(&out, "%s/%s", strcmp(cwd, "/") == 0 ? "" : cwd,
	                  strncmp(p, "./", 2) == 0 ? p + 2 : p) < 0)
		out = NULL;
trim:
	if (out) {
		len = strlen(out);
		while (len > 1 && out[len - 1] == '/')
			out[--len] = '\0';
	}
out:
	free(cwd);
	return out;
}

/* Reads the bearer token: the file's content without surrounding whitespace. */
static int read_token_file(const char *path, char **out, char *err, size_t errlen)
{
	char buf[CLI_TOKEN_MAX + 1];
	size_t len = 0, start;
	int fd, rc = 0;

	*out = NULL;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		rc = -errno;
		snprintf(err, errlen, "cannot open token file %s: %s", path, kvtier_strerror(rc));
		goto out;
	}
	while (len < sizeof(buf) - 1) {
		ssize_t r = read(fd, buf + len, sizeof(buf) - 1 - len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			rc = -errno;
			snprintf(err, errlen, "cannot read token file %s: %s", path,
			         kvtier_strerror(rc));
			goto out;
		}
		if (r == 0)
			break;
		len += (size_t)r;
	}
	if (len == sizeof(buf) - 1) {
		rc = -EFBIG;
		snprintf(err, errlen, "token file %s is larger than %d bytes", path, CLI_TOKEN_MAX);
		goto out;
	}
	buf[len] = '\0';
	while (len && strchr(" \t\r\n", buf[len - 1]))
		buf[--len] = '\0';
	start = strspn(buf, " \t\r\n");
	if (!buf[start]) {
		rc = -EINVAL;
		snprintf(err, errlen, "token file %s is empty", path);
		goto out;
	}
	/* It travels as an HTTP/2 header value: printable ASCII without blanks. */
	for (const char *q = buf + start; *q; q++)
		if ((unsigned char)*q < 0x21 || (unsigned char)*q > 0x7e) {
			rc = -EINVAL;
			snprintf(err, errlen,
			         "token file %s: the token may only hold printable ASCII "
			         "characters without blanks",
			         path);
			goto out;
		}
	*out = strdup(buf + start);
	if (!*out) {
		rc = -ENOMEM;
		snprintf(err, errlen, "out of memory");
	}
out:
	explicit_bzero(buf, sizeof(buf));
	if (fd >= 0)
		close(fd);
	return rc;
}

/* ---- output ---- */

/* Writes s as a JSON string: quotes, backslashes and control characters
 * escaped; valid UTF-8 passed through; each byte of an invalid sequence
 * written as U+FFFD, so the output is always valid JSON. */
static void json_str(FILE *f, const char *s)
{
	const unsigned char *p = (const unsigned char *)(s ? s : "");

	fputc('"', f);
	while (*p) {
		unsigned char ch = *p;
		size_t n = 0;

		if (ch == '"' || ch == '\\') {
			fputc('\\', f);
			fputc(ch, f);
			p++;
			continue;
		}
		if (ch < 0x20 || ch == 0x7f) {
			switch (ch) {
			case '\n':
				fputs("\\n", f);
				break;
			case '\r':
				fputs("\\r", f);
				break;
			case '\t':
				fputs("\\t", f);
				break;
			default:
				fprintf(f, "\\u%04x", ch);
			}
			p++;
			continue;
		}
		if (ch < 0x80) {
			fputc(ch, f);
			p++;
			continue;
		}
		/* A UTF-8 sequence: check its length, continuation bytes and range. */
		uint32_t cp = 0, min = 0;
		if ((ch & 0xe0) == 0xc0) {
			n = 2;
			cp = ch & 0x1f;
			min = 0x80;
		} else if ((ch & 0xf0) == 0xe0) {
			n = 3;
			cp = ch & 0x0f;
			min = 0x800;
		} else if ((ch & 0xf8) == 0xf0) {
			n = 4;
			cp = ch & 0x07;
			min = 0x10000;
		}
		size_t i = 1;
		for (; n && i < n; i++) {
			if ((p[i] & 0xc0) != 0x80)
				break;
			cp = (cp << 6) | (p[i] & 0x3f);
		}
		if (!n || i < n || cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
			fputs("\\ufffd", f);
			p++;
			continue;
		}
		fwrite(p, 1, n, f);
		p += n;
	}
	fputc('"', f);
}

/* A JSON number; JSON has no NaN or infinity, so those become 0. */
static void json_num(FILE *f, double v)
{
	if (!isfinite(v))
		v = 0;
	fprintf(f, "%.9g", v);
}

/* Writes s for a terminal: control characters as \xNN, the rest as is. */
static void print_safe(FILE *f, const char *s)
{
	for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			fprintf(f, "\\x%02x", *p);
		else
			fputc(*p, f);
}

static const char *human_bytes(uint64_t v, char *buf, size_t len)
{
	static const char *const unit[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
	double d = (double)v;
	unsigned u = 0;

	while (d >= 1024 && u < 5) {
		d /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(buf, len, "%" PRIu64 " B", v);
	else
		snprintf(buf, len, "%.1f %s", d, unit[u]);
	return buf;
}

static const char *human_time_ms(int64_t ms, char *buf, size_t len)
{
	time_t t = (time_t)(ms / 1000);
	struct tm tm;

	if (ms <= 0 || !localtime_r(&t, &tm) || !strftime(buf, len, "%Y-%m-%d %H:%M:%S", &tm))
		snprintf(buf, len, "-");
	return buf;
}

/* raw / stored bytes of a tier: 1 for an empty tier. */
static double tier_ratio(const struct kvtier_tier *t)
{
	return t->stored_bytes ? (double)t->raw_bytes / (double)t->stored_bytes : 1.0;
}

static void print_tier_human(const struct kvtier_tier *t)
{
	char cap[32], used[32], hi[32], lo[32];
	double pct =
	    t->capacity_bytes ? 100.0 * (double)t->used_bytes / (double)t->capacity_bytes : 0;

	printf("  tier %u  %-5s ", t->index, t->kind);
	print_safe(stdout, t->path);
	putchar('\n');
	printf("          %s of %s used (%.1f%%), %" PRIu64 " blobs\n",
	       human_bytes(t->used_bytes, used, sizeof(used)),
	       human_bytes(t->capacity_bytes, cap, sizeof(cap)), pct, t->blobs);
	fputs("          io: ", stdout);
	print_safe(stdout, t->io[0] ? t->io : "unknown");
	if (t->io_fallback[0]) {
		fputs(" (not io_uring+O_DIRECT: ", stdout);
		print_safe(stdout, t->io_fallback);
		putchar(')');
	}
	putchar('\n');
	if (t->read_bytes_per_s > 0 && t->model_samples)
		printf("          restore: %.2f GB/s + %.3f ms per read (learned from %" PRIu64
		       " real read%s)\n",
		       t->read_bytes_per_s / 1e9, t->read_fixed_s * 1e3, t->model_samples,
		       t->model_samples == 1 ? "" : "s");
	else if (t->read_bytes_per_s > 0)
		printf(
		    "          restore: %.2f GB/s + %.3f ms per read (start probe or default; no "
		    "real reads yet)\n",
		    t->read_bytes_per_s / 1e9, t->read_fixed_s * 1e3);
	else
		printf("          restore: not measured yet\n");
	printf("          watermarks: high %s, low %s\n",
	       human_bytes(t->high_watermark_bytes, hi, sizeof(hi)),
	       human_bytes(t->low_watermark_bytes, lo, sizeof(lo)));
	printf("          compression: %.2fx (%s as served, %s stored)\n", tier_ratio(t),
	       human_bytes(t->raw_bytes, used, sizeof(used)),
	       human_bytes(t->stored_bytes, cap, sizeof(cap)));
	printf("          migrations: %" PRIu64 " in, %" PRIu64 " out; GDSF base %.6g\n",
	       t->migrations_in, t->migrations_out, t->gdsf_base);
	printf("          evicted: %" PRIu64 " for capacity, %" PRIu64
	       " not worth keeping, %" PRIu64 " lower tier full\n",
	       t->evicted_capacity, t->evicted_not_worth, t->evicted_lower_full);
}

static void print_tier_json(FILE *f, const struct kvtier_tier *t)
{
	fprintf(f, "{\"index\": %u, \"kind\": ", t->index);
	json_str(f, t->kind);
	fputs(", \"path\": ", f);
	json_str(f, t->path);
	fprintf(f,
	        ", \"capacity_bytes\": %" PRIu64 ", \"used_bytes\": %" PRIu64
	        ", \"blobs\": %" PRIu64 ", \"read_bytes_per_s\": ",
	        t->capacity_bytes, t->used_bytes, t->blobs);
	json_num(f, t->read_bytes_per_s);
	fputs(", \"read_fixed_s\": ", f);
	json_num(f, t->read_fixed_s);
	fputs(", \"io\": ", f);
	json_str(f, t->io);
	fputs(", \"io_fallback\": ", f);
	json_str(f, t->io_fallback);
	fprintf(f,
	        ", \"model_samples\": %" PRIu64 ", \"high_watermark_bytes\": %" PRIu64
	        ", \"low_watermark_bytes\": %" PRIu64 ", \"raw_bytes\": %" PRIu64
	        ", \"stored_bytes\": %" PRIu64 ", \"compression_ratio\": ",
	        t->model_samples, t->high_watermark_bytes, t->low_watermark_bytes, t->raw_bytes,
	        t->stored_bytes);
	json_num(f, tier_ratio(t));
	fputs(", \"gdsf_base\": ", f);
	json_num(f, t->gdsf_base);
	fprintf(f,
	        ", \"migrations_in\": %" PRIu64 ", \"migrations_out\": %" PRIu64
	        ", \"evicted_capacity\": %" PRIu64 ", \"evicted_not_worth\": %" PRIu64
	        ", \"evicted_lower_full\": %" PRIu64 "}",
	        t->migrations_in, t->migrations_out, t->evicted_capacity, t->evicted_not_worth,
	        t->evicted_lower_full);
}

/* Prefill tokens/s of model m at a context depth: 1 / (a + b * depth), or 0
 * when the model has no a yet. */
static double ns_model_tps(const struct kvtier_ns_model *m, double depth)
{
	double s = m->prefill_s_per_token + m->prefill_s_per_token_per_ctx * depth;

	return m->prefill_s_per_token > 0 && s > 0 ? 1.0 / s : 0.0;
}

#define CLI_DEPTH_SHOWN 4096 /* the second depth the prefill models are shown at */

/* ---- option tables ---- */

/* Runs getopt_long over a subcommand's arguments (argv[0] is its name).
 * Returns the option, -1 at the end, '?' on an error (already reported by
 * getopt). */
static int next_opt(int argc, char **argv, const char *shortopts, const struct option *longopts)
{
	return getopt_long(argc, argv, shortopts, longopts, NULL);
}

enum {
	O_HELP = 'h',
	O_NAMESPACE = 'n',
	O_OUTPUT = 'o',
	O_JSON = 1000,
	O_KEEP_SOURCE,
	O_TOKENS,
	O_TOKENS_OF,
	O_DIR,
	O_LEASE_SECONDS,
	O_PROMPT_TOKENS,
	O_PROMPT_MS,
	O_BLOB,
	O_RESTORE_MS,
	O_RESTORED_TOKENS,
	O_CACHED_TOKENS,
	O_RESTORE_IGNORED,
	O_DATA,
	O_VERIFY,
	O_EXPECT_SIZE,
};

/* --expect-size N: the slot file's size as its server reported it. Returns
 * EXIT_OK, or the usage error's exit status. */
static int expect_size_opt(const struct cli *g, const char *arg, uint64_t *out)
{
	if (parse_u64(arg, UINT64_MAX, out) == 0 && *out > 0)
		return EXIT_OK;
	return usage_error(g, "--expect-size wants the slot file's size in bytes (more than 0), "
	                      "not \"%s\"", arg);
}

/* Handles what every command shares: --help and getopt's own errors.
 * Returns -1 to go on, or the exit status. */
static int common_opt(const struct cli *g, int opt)
{
	int ret = EXIT_OK;

	if (opt == O_HELP)
		command_help(find_command(g->cmd));
	else
		ret = usage_error(g, "%s",
		                  opt == '?' ? "bad option (see above)" : "unexpected option");
	return ret;
}

/* ---- commands ---- */

static void print_ns_model_json(const struct kvtier_ns_model *m)
{
	fputs("{\"namespace\": ", stdout);
	json_str(stdout, m->ns);
	fputs(", \"prefill_tokens_per_s\": ", stdout);
	json_num(stdout, m->prefill_tokens_per_s);
	fputs(", \"prefill_s_per_token\": ", stdout);
	json_num(stdout, m->prefill_s_per_token);
	fputs(", \"prefill_s_per_token_per_ctx\": ", stdout);
	json_num(stdout, m->prefill_s_per_token_per_ctx);
	fputs(", \"samples\": ", stdout);
	json_num(stdout, m->samples);
	fputs(", \"prefill_tokens_per_s_depth_0\": ", stdout);
	json_num(stdout, ns_model_tps(m, 0));
	printf(", \"prefill_tokens_per_s_depth_%d\": ", CLI_DEPTH_SHOWN);
	json_num(stdout, ns_model_tps(m, CLI_DEPTH_SHOWN));
	fputc('}', stdout);
}

static void print_info_json(const struct cli *g, const struct kvtier_info *in)
{
	printf("{\"version\": ");
	json_str(stdout, in->version);
	printf(", \"address\": ");
	json_str(stdout, g->address);
	printf(", \"block_size\": %u, \"supersede\": %s, \"max_blob_bytes\": %" PRIu64
	       ", \"tiers\": [",
	       in->block_size, in->supersede ? "true" : "false", in->max_blob_bytes);
	for (unsigned i = 0; i < in->n_tiers; i++) {
		if (i)
			fputs(", ", stdout);
		print_tier_json(stdout, &in->tiers[i]);
	}
	printf("], \"slot_dirs\": [");
	for (unsigned i = 0; i < in->n_slot_dirs; i++) {
		if (i)
			fputs(", ", stdout);
		json_str(stdout, in->slot_dirs[i]);
	}
	fputs("], \"high_watermark\": ", stdout);
	json_num(stdout, in->high_watermark);
	fputs(", \"low_watermark\": ", stdout);
	json_num(stdout, in->low_watermark);
	fputs(", \"compress_min_saving\": ", stdout);
	json_num(stdout, in->compress_min_saving);
	fputs(", \"shuffle\": ", stdout);
	json_str(stdout, in->shuffle);
	fputs(", \"assumed_prefill_tps\": ", stdout);
	json_num(stdout, in->assumed_prefill_tps);
	fputs(", \"namespaces\": [", stdout);
	for (unsigned i = 0; i < in->n_namespaces; i++) {
		if (i)
			fputs(", ", stdout);
		print_ns_model_json(&in->namespaces[i]);
	}
	printf("]}\n");
}

/* One namespace's prefill model; `assumed` is the daemon's tokens/s for a
 * namespace without reports. */
static void print_ns_model_human(const struct kvtier_ns_model *m, double assumed)
{
	fputs("  ", stdout);
	print_safe(stdout, m->ns);
	putchar('\n');
	if (m->prefill_s_per_token > 0) {
		printf("          prefill: %.1f tokens/s at depth 0, %.1f tokens/s at depth %d\n",
		       ns_model_tps(m, 0), ns_model_tps(m, CLI_DEPTH_SHOWN), CLI_DEPTH_SHOWN);
		printf("          fitted on %.3g report%s", m->samples, m->samples == 1 ? "" : "s");
		if (m->prefill_tokens_per_s > 0)
			printf(" (average %.1f tokens/s)", m->prefill_tokens_per_s);
		putchar('\n');
	} else {
		printf("          prefill: no model yet (%.1f tokens/s assumed)\n", assumed);
	}
}

static void print_info_human(const struct cli *g, const struct kvtier_info *in)
{
	char b[32];

	printf("kvtierd %s at %s\n", in->version, g->address);
	printf("block size:     %u tokens\n", in->block_size);
	printf("supersede:      %s\n",
	       in->supersede ? "on (a blob that extends an older one drops it)" : "off");
	printf("max blob size:  %s\n",
	       in->max_blob_bytes ? human_bytes(in->max_blob_bytes, b, sizeof(b)) : "unlimited");
	printf("watermarks:     a tier above %.0f%% of its capacity is brought back under %.0f%%\n",
	       in->high_watermark * 100, in->low_watermark * 100);
	if (in->compress_min_saving >= 1)
		printf("compression:    off\n");
	else
		printf("compression:    LZ4 on disk tiers when it saves at least %.0f%%, byte "
		       "shuffle %s\n",
		       in->compress_min_saving * 100, in->shuffle[0] ? in->shuffle : "?");
	printf("prefill guess:  %.1f tokens/s for a namespace nothing was reported for\n",
	       in->assumed_prefill_tps);
	printf("tiers (fastest first):\n");
	for (unsigned i = 0; i < in->n_tiers; i++)
		print_tier_human(&in->tiers[i]);
	printf("prefill models (seconds per token = a + b * depth):%s\n",
	       in->n_namespaces ? "" : " none reported yet");
	for (unsigned i = 0; i < in->n_namespaces; i++)
		print_ns_model_human(&in->namespaces[i], in->assumed_prefill_tps);
	if (in->n_namespaces == sizeof(in->namespaces) / sizeof(in->namespaces[0]))
		printf("  (the library returns at most %u namespaces)\n", in->n_namespaces);
	printf("slot directories (Stage and Adopt):%s\n", in->n_slot_dirs ? "" : " none");
	for (unsigned i = 0; i < in->n_slot_dirs; i++) {
		fputs("  ", stdout);
		print_safe(stdout, in->slot_dirs[i]);
		putchar('\n');
	}
}

static int cmd_info(struct cli *g, int argc, char **argv)
{
	static const struct option lo[] = {{"help", no_argument, NULL, O_HELP},
	                                   {"json", no_argument, NULL, O_JSON},
	                                   {NULL, 0, NULL, 0}};
	struct kvtier_info *in = NULL;
	int opt, json = 0, rc, ret = EXIT_OK;

	while ((opt = next_opt(argc, argv, "h", lo)) != -1) {
		if (opt != O_JSON) {
			ret = common_opt(g, opt);
			goto out;
		}
		json = 1;
	}
	if (optind != argc) {
		ret = usage_error(g, "unexpected argument \"%s\"", argv[optind]);
		goto out;
	}
	in = malloc(sizeof(*in)); /* about 16 KiB: not for the stack */
	if (!in) {
		warnx_cmd(g, "out of memory");
		ret = EXIT_FAIL;
		goto out;
	}
	rc = kvtier_info(g->c, in);
	if (rc) {
		ret = fail(g, rc, NULL);
		goto out;
	}
	if (json)
		print_info_json(g, in);
	else
		print_info_human(g, in);
out:
	free(in);
	return ret;
}

static void print_put_extras(const struct cli *g, const struct kvtier_put_result *r)
{
	if (r->deduplicated)
		fprintf(stderr, "kvtier: %s: deduplicated: identical content was already stored\n",
		        g->cmd);
	if (r->n_superseded)
		fprintf(stderr, "kvtier: %s: superseded %u older blob%s of this conversation\n",
		        g->cmd, r->n_superseded, r->n_superseded == 1 ? "" : "s");
}

static int cmd_put(struct cli *g, int argc, char **argv)
{
	static const struct option lo[] = {{"help", no_argument, NULL, O_HELP},
	                                   {"namespace", required_argument, NULL, O_NAMESPACE},
	                                   {"expect-size", required_argument, NULL, O_EXPECT_SIZE},
	                                   {NULL, 0, NULL, 0}};
	struct kvtier_put_result r;
	const char *ns = NULL;
	uint64_t expect = 0;
	int opt, rc, ret = EXIT_OK;

	while ((opt = next_opt(argc, argv, "hn:", lo)) != -1) {
		if (opt == O_NAMESPACE) {
			ns = optarg;
		} else if (opt == O_EXPECT_SIZE) {
			ret = expect_size_opt(g, optarg, &expect);
			if (ret != EXIT_OK)
				goto out;
		} else {
			ret = common_opt(g, opt);
			goto out;
		}
	}
	if (!ns || argc - optind != 1) {
		ret = usage_error(g, "%s",
		                  !ns ? "--namespace is required" : "expected exactly one FILE");
		goto out;
	}
	rc = kvtier_put_file_sized(g->c, ns, argv[optind], expect, &r);
	if (rc) {
		ret = fail(g, rc, NULL);
		goto out;
	}
	printf("%s\n", r.blob);
	print_put_extras(g, &r);
out:
	return ret;
}

static int cmd_adopt(struct cli *g, int argc, char **argv)
{
	static const struct option lo[] = {{"help", no_argument, NULL, O_HELP},
	                                   {"namespace", required_argument, NULL, O_NAMESPACE},
	                                   {"keep-source", no_argument, NULL, O_KEEP_SOURCE},
	                                   {"expect-size", required_argument, NULL, O_EXPECT_SIZE},
	                                   {NULL, 0, NULL, 0}};
	struct kvtier_put_result r;
	const char *ns = NULL;
	char *path = NULL;
	uint64_t expect = 0;
	int opt, rc, keep = 0, ret = EXIT_OK;

	while ((opt = next_opt(argc, argv, "hn:", lo)) != -1) {
		if (opt == O_NAMESPACE) {
			ns = optarg;
		} else if (opt == O_KEEP_SOURCE) {
			keep = 1;
		} else if (opt == O_EXPECT_SIZE) {
			ret = expect_size_opt(g, optarg, &expect);
			if (ret != EXIT_OK)
				goto out;
		} else {
			ret = common_opt(g, opt);
			goto out;
		}
	}
	if (!ns || argc - optind != 1) {
		ret = usage_error(g, "%s",
		                  !ns ? "--namespace is required" : "expected exactly one PATH");
		goto out;
	}
	path = absolute_path(argv[optind]);
	if (!path) {
		warnx_cmd(g, "cannot make %s absolute: %s", argv[optind], strerror(errno));
		ret = EXIT_FAIL;
		goto out;
	}
	rc = kvtier_adopt_sized(g->c, ns, path, keep, expect, &r);
	if (rc) {
		ret = fail(g, rc, NULL);
		goto out;
	}
	printf("%s\n", r.blob);
	print_put_extras(g, &r);
out:
	free(path);
	return ret;
}

/* Reads the token ids of slot file `file` (its header only). */
static int tokens_of_file(const struct cli *g, const char *file, int32_t **tokens, size_t *n)
{
	struct slot_info si;
	char err[512] = "";
	int fd, rc;

	fd = open(file, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		rc = -errno;
		warnx_cmd(g, "cannot open %s: %s", file, kvtier_strerror(rc));
		goto out;
	}
	rc = slot_parse_fd(fd, &si, tokens, err, sizeof(err));
	if (rc) {
		warnx_cmd(g, "%s: %s (%s)", file, err[0] ? err : "cannot parse the header",
		          kvtier_strerror(rc));
		goto out;
	}
	*n = si.n_tokens;
out:
	if (fd >= 0)
		close(fd);
	return rc;
}

static void print_match(const char *ns, size_t n, const struct kvtier_match *m, int json)
{
	char b[32];

	if (json) {
		fputs("{\"blob\": ", stdout);
		if (m->found)
			json_str(stdout, m->blob);
		else
			fputs("null", stdout);
		printf(", \"matched_tokens\": %" PRIu32 ", \"n_tokens\": %" PRIu32 ", \"tier\": ",
		       m->matched_tokens, m->n_tokens);
		if (m->found)
			json_str(stdout, m->tier_kind);
		else
			fputs("null", stdout);
		printf(", \"tier_index\": %u, \"size_bytes\": %" PRIu64 ", \"est_restore_s\": ",
		       m->found ? m->tier : 0, m->size_bytes);
		json_num(stdout, m->est_restore_s);
		fputs(", \"est_prefill_s\": ", stdout);
		json_num(stdout, m->est_prefill_s);
		fputs("}\n", stdout);
	} else if (m->found) {
		printf("hit: %s matches %" PRIu32 " of %zu tokens; the blob holds %" PRIu32
		       " tokens, %s on tier %u (%s), estimated restore %.3f ms, prefill of the "
		       "matched tokens %.3f ms\n",
		       m->blob, m->matched_tokens, n, m->n_tokens,
		       human_bytes(m->size_bytes, b, sizeof(b)), m->tier, m->tier_kind,
		       m->est_restore_s * 1e3, m->est_prefill_s * 1e3);
	} else {
		fputs("miss: no blob in namespace \"", stdout);
		print_safe(stdout, ns);
		printf("\" shares a prefix with these %zu tokens\n", n);
	}
}

static int cmd_lookup(struct cli *g, int argc, char **argv)
{
	static const struct option lo[] = {{"help", no_argument, NULL, O_HELP},
	                                   {"namespace", required_argument, NULL, O_NAMESPACE},
	                                   {"tokens", required_argument, NULL, O_TOKENS},
	                                   {"tokens-of", required_argument, NULL, O_TOKENS_OF},
	                                   {"json", no_argument, NULL, O_JSON},
	                                   {NULL, 0, NULL, 0}};
	const char *ns = NULL, *list = NULL, *file = NULL;
	struct kvtier_match m;
	int32_t *tokens = NULL;
	size_t n = 0;
	int opt, rc, json = 0, ret = EXIT_OK;

	while ((opt = next_opt(argc, argv, "hn:", lo)) != -1) {
		if (opt == O_NAMESPACE) {
			ns = optarg;
		} else if (opt == O_TOKENS) {
			list = optarg;
		} else if (opt == O_TOKENS_OF) {
			file = optarg;
		} else if (opt == O_JSON) {
			json = 1;
		} else {
			ret = common_opt(g, opt);
			goto out;
		}
	}
	if (!ns) {
		ret = usage_error(g, "--namespace is required");
		goto out;
	}
	if (!list == !file) {
		ret = usage_error(g, "give exactly one of --tokens and --tokens-of");
		goto out;
	}
	if (optind != argc) {
		ret = usage_error(g, "unexpected argument \"%s\"", argv[optind]);
		goto out;
	}
	if (list) {
		rc = parse_tokens(list, &tokens, &n);
		if (rc == -EINVAL) {
			ret =
			    usage_error(g, "--tokens wants comma-separated token ids, like 1,2,3");
			goto out;
		}
	} else {
		rc = tokens_of_file(g, file, &tokens, &n);
	}
	if (rc) {
		if (rc == -ENOMEM)
			warnx_cmd(g, "out of memory");
		ret = EXIT_FAIL;
		goto out;
	}
	rc = kvtier_lookup(g->c, ns, tokens, n, &m);
	if (rc) {
		ret = fail(g, rc, NULL);
		goto out;
	}
	print_match(ns, n, &m, json);
out:
	free(tokens);
	return ret;
}

static int cmd_get(struct cli *g, int argc, char **argv)
{
	static const struct option lo[] = {{"help", no_argument, NULL, O_HELP},
	                                   {"output", required_argument, NULL, O_OUTPUT},
	                                   {NULL, 0, NULL, 0}};
	const char *file = NULL;
	uint64_t size;
	int opt, rc, ret = EXIT_OK;

	while ((opt = next_opt(argc, argv, "ho:", lo)) != -1) {
		if (opt != O_OUTPUT) {
			ret = common_opt(g, opt);
			goto out;
		}
		file = optarg;
	}
	if (!file || argc - optind != 1) {
		ret = usage_error(g, "%s",
		                  !file ? "-o FILE is required" : "expected exactly one BLOB id");
		goto out;
	}
	if (strcmp(file, "-") == 0)
		rc = kvtier_fetch_fd(g->c, argv[optind], STDOUT_FILENO, &size);
	else
		rc = kvtier_fetch_file(g->c, argv[optind], file, &size);
	if (rc)
		ret = fail(g, rc, NULL);
out:
	return ret;
}

static void print_stage(const struct kvtier_stage *st, int json)
{
	char when[32];

	if (json) {
		fputs("{\"filename\": ", stdout);
		json_str(stdout, st->filename);
		fputs(", \"path\": ", stdout);
		json_str(stdout, st->path);
		fputs(", \"lease\": ", stdout);
		json_str(stdout, st->lease);
		printf(", \"expires_unix_ms\": %" PRIu64 ", \"copied\": %s, \"n_tokens\": %" PRIu32
		       "}\n",
		       st->expires_unix_ms, st->copied ? "true" : "false", st->n_tokens);
	} else {
		printf("filename: %s\n", st->filename);
		printf("path:     %s\n", st->path);
		printf("lease:    %s\n", st->lease);
		printf("expires:  %s%s\n",
		       human_time_ms((int64_t)st->expires_unix_ms, when, sizeof(when)),
		       st->copied ? " (copied: the slot directory is on another file system)" : "");
		printf("tokens:   %" PRIu32 "\n", st->n_tokens);
	}
}

static int cmd_stage(struct cli *g, int argc, char **argv)
{
	static const struct option lo[] = {
	    {"help", no_argument, NULL, O_HELP},
	    {"dir", required_argument, NULL, O_DIR},
	    {"lease-seconds", required_argument, NULL, O_LEASE_SECONDS},
	    {"json", no_argument, NULL, O_JSON},
	    {NULL, 0, NULL, 0}};
	struct kvtier_stage st;
	const char *dir_arg = NULL;
	char *dir = NULL;
	uint32_t lease = 0;
	int opt, rc, json = 0, ret = EXIT_OK;

	while ((opt = next_opt(argc, argv, "h", lo)) != -1) {
		if (opt == O_DIR) {
			dir_arg = optarg;
		} else if (opt == O_LEASE_SECONDS && parse_u32(optarg, &lease) == 0) {
			continue;
		} else if (opt == O_LEASE_SECONDS) {
			ret = usage_error(g, "--lease-seconds wants a number of seconds");
			goto out;
		} else if (opt == O_JSON) {
			json = 1;
		} else {
			ret = common_opt(g, opt);
			goto out;
		}
	}
	if (!dir_arg || argc - optind != 1) {
		ret = usage_error(g, "%s",
		                  !dir_arg ? "--dir is required" : "expected exactly one BLOB id");
		goto out;
	}
	dir = absolute_path(dir_arg);
	if (!dir) {
		warnx_cmd(g, "cannot make %s absolute: %s", dir_arg, strerror(errno));
		ret = EXIT_FAIL;
		goto out;
	}
	rc = kvtier_stage(g->c, argv[optind], dir, lease, &st);
	if (rc) {
		ret = fail(g, rc, NULL);
		goto out;
	}
	print_stage(&st, json);
out:
	free(dir);
	return ret;
}

static int cmd_release(struct cli *g, int argc, char **argv)
{
	static const struct option lo[] = {{"help", no_argument, NULL, O_HELP}, {NULL, 0, NULL, 0}};
	int opt, rc, ret = EXIT_OK;

	if ((opt = next_opt(argc, argv, "h", lo)) != -1) {
		ret = common_opt(g, opt);
		goto out;
	}
	if (argc - optind != 1) {
		ret = usage_error(g, "expected exactly one LEASE");
		goto out;
	}
	rc = kvtier_release(g->c, argv[optind]);
	if (rc)
		ret = fail(g, rc, NULL);
out:
	return ret;
}

static int cmd_rm(struct cli *g, int argc, char **argv)
{
	static const struct option lo[] = {{"help", no_argument, NULL, O_HELP}, {NULL, 0, NULL, 0}};
	int opt, rc, ret = EXIT_OK;

	if ((opt = next_opt(argc, argv, "h", lo)) != -1) {
		ret = common_opt(g, opt);
		goto out;
	}
	if (argc - optind < 1) {
		ret = usage_error(g, "expected a BLOB id");
		goto out;
	}
	for (int i = optind; i < argc; i++) {
		rc = kvtier_delete(g->c, argv[i]);
		if (rc) {
			ret = fail(g, rc, argv[i]);
			goto out;
		}
	}
out:
	return ret;
}

struct ls_ctx {
	int json;
	unsigned long n;
};

static void print_blob_json(const struct kvtier_blob_info *b)
{
	fputs("{\"blob\": ", stdout);
	json_str(stdout, b->blob);
	fputs(", \"namespace\": ", stdout);
	json_str(stdout, b->ns);
	printf(", \"n_tokens\": %" PRIu32 ", \"version\": %" PRIu32 ", \"size_bytes\": %" PRIu64
	       ", \"stored_bytes\": %" PRIu64 ", \"tier\": ",
	       b->n_tokens, b->version, b->size_bytes, b->stored_bytes);
	json_str(stdout, b->tier_kind);
	printf(", \"tier_index\": %u, \"compression\": ", b->tier);
	json_str(stdout, b->compression);
	fputs(", \"compression_ratio\": ", stdout);
	json_num(stdout, b->compression_ratio);
	fputs(", \"state\": ", stdout);
	if (b->state[0])
		json_str(stdout, b->state);
	else
		fputs("null", stdout);
	fputs(", \"token_form\": ", stdout);
	if (b->token_form[0])
		json_str(stdout, b->token_form);
	else
		fputs("null", stdout);
	printf(", \"media_cut\": %s", b->media_cut ? "true" : "false");
	fputs(", \"sidecars\": [", stdout);
	for (unsigned i = 0; i < b->n_sidecars; i++) {
		if (i)
			fputs(", ", stdout);
		json_str(stdout, b->sidecars[i]);
	}
	printf("], \"created_unix_ms\": %" PRId64 ", \"last_access_unix_ms\": %" PRId64
	       ", \"hits\": %" PRIu64 ", \"crc32c\": %" PRIu32 "}",
	       b->created_unix_ms, b->last_access_unix_ms, b->hits, b->crc32c);
}

static int ls_print(void *ctx, const struct kvtier_blob_info *b)
{
	struct ls_ctx *l = ctx;
	char size[32], stored[32], when[32], tier[32], comp[48], state[48];

	if (l->json) {
		fputs(l->n ? ",\n  " : "\n  ", stdout);
		print_blob_json(b);
	} else {
		if (l->n == 0)
			printf("%-64s %7s %-22s %10s %10s %-17s %-10s %6s %-19s %s\n", "BLOB",
			       "TOKENS", "STATE", "SIZE", "STORED", "COMPRESSION", "TIER", "HITS",
			       "LAST ACCESS", "NAMESPACE");
		snprintf(state, sizeof(state), "%s%s%s", b->state[0] ? b->state : "?",
		         strcmp(b->token_form, "packed") == 0 ? ",packed" : "",
		         b->media_cut ? ",media" : "");
		snprintf(tier, sizeof(tier), "%u:%s", b->tier, b->tier_kind);
		if (!b->compression[0] || strcmp(b->compression, "none") == 0)
			snprintf(comp, sizeof(comp), "-");
		else
			snprintf(comp, sizeof(comp), "%s %.2fx", b->compression,
			         b->compression_ratio);
		printf("%-64s %7" PRIu32 " %-22s %10s %10s %-17s %-10s %6" PRIu64 " %-19s ",
		       b->blob, b->n_tokens, state, human_bytes(b->size_bytes, size, sizeof(size)),
		       human_bytes(b->stored_bytes, stored, sizeof(stored)), comp, tier, b->hits,
		       human_time_ms(b->last_access_unix_ms, when, sizeof(when)));
		print_safe(stdout, b->ns);
		putchar('\n');
	}
	l->n++;
	return 0;
}

static int cmd_ls(struct cli *g, int argc, char **argv)
{
	static const struct option lo[] = {{"help", no_argument, NULL, O_HELP},
	                                   {"namespace", required_argument, NULL, O_NAMESPACE},
	                                   {"json", no_argument, NULL, O_JSON},
	                                   {NULL, 0, NULL, 0}};
	struct ls_ctx l = {0, 0};
	const char *ns = NULL;
	int opt, rc, ret = EXIT_OK;

	while ((opt = next_opt(argc, argv, "hn:", lo)) != -1) {
		if (opt == O_NAMESPACE) {
			ns = optarg;
		} else if (opt == O_JSON) {
			l.json = 1;
		} else {
			ret = common_opt(g, opt);
			goto out;
		}
	}
	if (optind != argc) {
		ret = usage_error(g, "unexpected argument \"%s\"", argv[optind]);
		goto out;
	}
	if (l.json)
		fputs("[", stdout);
	rc = kvtier_list(g->c, ns, ls_print, &l);
	if (l.json)
		fputs(l.n ? "\n]\n" : "]\n", stdout);
	if (rc) {
		ret = fail(g, rc, NULL);
		goto out;
	}
	if (!l.json && l.n == 0)
		fprintf(stderr, "kvtier: ls: no blobs%s\n", ns ? " in this namespace" : "");
out:
	return ret;
}

static void print_stats_json(const struct kvtier_stats *s)
{
	printf("{\"blobs\": %" PRIu64 ", \"bytes\": %" PRIu64 ", \"lookups\": %" PRIu64
	       ", \"hits\": %" PRIu64 ", \"matched_tokens\": %" PRIu64 ", \"puts\": %" PRIu64
	       ", \"dedups\": %" PRIu64 ", \"supersessions\": %" PRIu64 ", \"stages\": %" PRIu64
	       ", \"active_leases\": %" PRIu64 ", \"tiers\": [",
	       s->blobs, s->bytes, s->lookups, s->hits, s->matched_tokens, s->puts, s->dedups,
	       s->supersessions, s->stages, s->active_leases);
	for (unsigned i = 0; i < s->n_tiers; i++) {
		if (i)
			fputs(", ", stdout);
		print_tier_json(stdout, &s->tiers[i]);
	}
	fputs("], \"namespaces\": [", stdout);
	for (unsigned i = 0; i < s->n_namespaces; i++) {
		const struct kvtier_ns_stats *n = &s->namespaces[i];

		fputs(i ? ", {\"namespace\": " : "{\"namespace\": ", stdout);
		json_str(stdout, n->ns);
		printf(", \"blobs\": %" PRIu64 ", \"bytes\": %" PRIu64 ", \"lookups\": %" PRIu64
		       ", \"hits\": %" PRIu64 ", \"prefill_tokens_per_s\": ",
		       n->blobs, n->bytes, n->lookups, n->hits);
		json_num(stdout, n->prefill_tokens_per_s);
		fputc('}', stdout);
	}
	fputs("]}\n", stdout);
}

static void print_stats_human(const struct kvtier_stats *s)
{
	char b[32];

	printf("blobs:          %" PRIu64 " (%s)\n", s->blobs, human_bytes(s->bytes, b, sizeof(b)));
	printf("lookups:        %" PRIu64 ", hits %" PRIu64 " (%.1f%%), matched tokens %" PRIu64
	       "\n",
	       s->lookups, s->hits, s->lookups ? 100.0 * (double)s->hits / (double)s->lookups : 0.0,
	       s->matched_tokens);
	printf("puts:           %" PRIu64 ", deduplicated %" PRIu64 ", superseded %" PRIu64 "\n",
	       s->puts, s->dedups, s->supersessions);
	printf("stages:         %" PRIu64 ", active leases %" PRIu64 "\n", s->stages,
	       s->active_leases);
	printf("tiers (fastest first):\n");
	for (unsigned i = 0; i < s->n_tiers; i++)
		print_tier_human(&s->tiers[i]);
	printf("namespaces:%s\n", s->n_namespaces ? "" : " none");
	for (unsigned i = 0; i < s->n_namespaces; i++) {
		const struct kvtier_ns_stats *n = &s->namespaces[i];

		fputs("  ", stdout);
		print_safe(stdout, n->ns);
		printf("\n          %" PRIu64 " blobs, %s, %" PRIu64 " lookups, %" PRIu64 " hits",
		       n->blobs, human_bytes(n->bytes, b, sizeof(b)), n->lookups, n->hits);
		if (n->prefill_tokens_per_s > 0)
			printf(", prefill %.1f tokens/s", n->prefill_tokens_per_s);
		putchar('\n');
	}
	if (s->n_namespaces == sizeof(s->namespaces) / sizeof(s->namespaces[0]))
		printf("  (the library returns at most %u namespaces)\n", s->n_namespaces);
}

static int cmd_stats(struct cli *g, int argc, char **argv)
{
	static const struct option lo[] = {{"help", no_argument, NULL, O_HELP},
	                                   {"json", no_argument, NULL, O_JSON},
	                                   {NULL, 0, NULL, 0}};
	struct kvtier_stats *s = NULL;
	int opt, rc, json = 0, ret = EXIT_OK;

	while ((opt = next_opt(argc, argv, "h", lo)) != -1) {
		if (opt != O_JSON) {
			ret = common_opt(g, opt);
			goto out;
		}
		json = 1;
	}
	if (optind != argc) {
		ret = usage_error(g, "unexpected argument \"%s\"", argv[optind]);
		goto out;
	}
	s = malloc(sizeof(*s)); /* about 20 KiB: not for the stack */
	if (!s) {
		warnx_cmd(g, "out of memory");
		ret = EXIT_FAIL;
		goto out;
	}
	rc = kvtier_stats(g->c, s);
	if (rc) {
		ret = fail(g, rc, NULL);
		goto out;
	}
	if (json)
		print_stats_json(s);
	else
		print_stats_human(s);
out:
	free(s);
	return ret;
}

/* Parses one option of `report` into r. Returns NULL, or what was wrong. */
static const char *report_opt(struct kvtier_report *r, int opt, const char *arg, unsigned *seen)
{
	const char *bad = NULL;

	switch (opt) {
	case O_NAMESPACE:
		r->ns = arg;
		break;
	case O_PROMPT_TOKENS:
		if (parse_u32(arg, &r->prompt_tokens))
			bad = "--prompt-tokens wants a token count";
		*seen |= 1;
		break;
	case O_PROMPT_MS:
		if (parse_ms(arg, &r->prompt_ms))
			bad = "--prompt-ms wants milliseconds (like 1234.5)";
		*seen |= 2;
		break;
	case O_BLOB:
		r->blob = arg;
		break;
	case O_RESTORE_MS:
		if (parse_ms(arg, &r->restore_ms))
			bad = "--restore-ms wants milliseconds (like 12.5)";
		*seen |= 4;
		break;
	case O_RESTORED_TOKENS:
		if (parse_u32(arg, &r->restored_tokens))
			bad = "--restored-tokens wants a token count";
		*seen |= 4;
		break;
	case O_CACHED_TOKENS:
		if (parse_u32(arg, &r->cached_tokens))
			bad = "--cached-tokens wants a token count";
		break;
	case O_RESTORE_IGNORED:
		r->restore_ignored = 1;
		*seen |= 4;
		break;
	default:
		bad = "";
	}
	return bad;
}

static int cmd_report(struct cli *g, int argc, char **argv)
{
	static const struct option lo[] = {
	    {"help", no_argument, NULL, O_HELP},
	    {"namespace", required_argument, NULL, O_NAMESPACE},
	    {"prompt-tokens", required_argument, NULL, O_PROMPT_TOKENS},
	    {"prompt-ms", required_argument, NULL, O_PROMPT_MS},
	    {"blob", required_argument, NULL, O_BLOB},
	    {"restore-ms", required_argument, NULL, O_RESTORE_MS},
	    {"restored-tokens", required_argument, NULL, O_RESTORED_TOKENS},
	    {"restore-ignored", no_argument, NULL, O_RESTORE_IGNORED},
	    {"cached-tokens", required_argument, NULL, O_CACHED_TOKENS},
	    {NULL, 0, NULL, 0}};
	struct kvtier_report r;
	const char *bad;
	unsigned seen = 0; /* 1: prompt tokens, 2: prompt ms, 4: a restore option */
	int opt, rc, ret = EXIT_OK;

	memset(&r, 0, sizeof(r));
	while ((opt = next_opt(argc, argv, "hn:", lo)) != -1) {
		bad = report_opt(&r, opt, optarg, &seen);
		if (bad && !bad[0]) {
			ret = common_opt(g, opt);
			goto out;
		}
		if (bad) {
			ret = usage_error(g, "%s", bad);
			goto out;
		}
	}
	if (!r.ns || (seen & 3) != 3) {
		ret = usage_error(g, "--namespace, --prompt-tokens and --prompt-ms are required");
		goto out;
	}
	if ((seen & 4) && !r.blob) {
		ret = usage_error(g, "--restore-ms, --restored-tokens and --restore-ignored "
		                     "describe a restore: they need --blob");
		goto out;
	}
	if (optind != argc) {
		ret = usage_error(g, "unexpected argument \"%s\"", argv[optind]);
		goto out;
	}
	rc = kvtier_report(g->c, &r);
	if (rc)
		ret = fail(g, rc, NULL);
out:
	return ret;
}

static int cmd_fsck(struct cli *g, int argc, char **argv)
{
	static const struct option lo[] = {{"help", no_argument, NULL, O_HELP},
	                                   {"data", required_argument, NULL, O_DATA},
	                                   {"verify", no_argument, NULL, O_VERIFY},
	                                   {NULL, 0, NULL, 0}};
	const char *data = CLI_DEFAULT_DATA;
	unsigned long problems = 0;
	int opt, rc, verify = 0, ret = EXIT_OK;

	while ((opt = next_opt(argc, argv, "h", lo)) != -1) {
		if (opt == O_DATA) {
			data = optarg;
		} else if (opt == O_VERIFY) {
			verify = 1;
		} else {
			ret = common_opt(g, opt);
			goto out;
		}
	}
	if (optind != argc) {
		ret = usage_error(g, "unexpected argument \"%s\"", argv[optind]);
		goto out;
	}
	rc = fsck_run(data, verify, stdout, &problems);
	if (fflush(stdout) != 0) {
		warnx_cmd(g, "writing the report failed: %s", strerror(errno));
		ret = EXIT_FSCK_NOT_RUN;
	} else if (rc) {
		warnx_cmd(g, "could not check %s (%s)", data, kvtier_strerror(rc));
		ret = EXIT_FSCK_NOT_RUN;
	} else if (problems) {
		ret = EXIT_FAIL;
	}
out:
	return ret;
}

/* ---- the command table ---- */

static const struct command commands[] = {
    {"info", cmd_info, 1, "[--json]",
     "Show the daemon's settings, tiers, prefill models and slot directories.",
     "Each tier shows its capacity, use and blob count; its I/O mode (and why it is not\n"
     "io_uring+O_DIRECT, when it is not); the restore model the daemon measured on it\n"
     "(GB/s + fixed ms per read, and how many real reads it learned from); its\n"
     "watermarks; its compression ratio (bytes as served / bytes stored); migrations in\n"
     "and out; evictions by reason; and its GDSF base (docs/policy.md). Each namespace\n"
     "shows its prefill model, seconds per token = a + b * depth, as tokens/s at depth 0\n"
     "(1/a) and 4096 (1/(a + b*4096)), with the reports it was fitted on. The placement\n"
     "settings (watermarks, compression, shuffle, assumed prefill speed) come first.\n"
     "Slot directories are where `stage` and `adopt` may work.\n\n"
     "  --json    one JSON object: version, address, block_size, supersede,\n"
     "            max_blob_bytes, tiers (as in `stats --json`), slot_dirs,\n"
     "            high_watermark, low_watermark, compress_min_saving, shuffle,\n"
     "            assumed_prefill_tps, namespaces (namespace, prefill_tokens_per_s,\n"
     "            prefill_s_per_token, prefill_s_per_token_per_ctx, samples,\n"
     "            prefill_tokens_per_s_depth_0, prefill_tokens_per_s_depth_4096)\n"},
    {"put", cmd_put, 1, "--namespace NS [--expect-size N] FILE",
     "Upload a llama-server slot file (and its sidecars) into namespace NS.",
     "Streams FILE, plus FILE.tokens.json and FILE.checkpoints when they exist, to the\n"
     "daemon, which checks the header and stores the blob. Prints the blob id on stdout;\n"
     "\"deduplicated\" and the number of older blobs superseded go to stderr. Works with a\n"
     "remote daemon too. A refused file stores nothing. A slot file whose state layout\n"
     "kvtier does not know is stored as it is (`ls` shows its state as opaque).\n\n"
     "  -n, --namespace NS   model and KV-layout fingerprint the blob belongs to (required)\n"
     "  --expect-size N      the slot file's size in bytes as the server reported it\n"
     "                       (llama-server's n_written): a file of another size, cut\n"
     "                       short by a crash during the save, is refused\n"},
    {"adopt", cmd_adopt, 1, "--namespace NS PATH [--keep-source] [--expect-size N]",
     "Take a slot file from a slot directory into namespace NS without copying it.",
     "PATH must be a regular file directly inside one of the daemon's --slot-dir\n"
     "directories (same host; see `kvtier info`), owned by that directory's owner,\n"
     "with no other name (hard link): anything else is refused and left as it is.\n"
     "The daemon links it in, or copies it when it cannot make the file its own\n"
     "(another process has it open for writing), sidecars included. Prints the\n"
     "blob id.\n\n"
     "  -n, --namespace NS   namespace of the blob (required)\n"
     "  --keep-source        leave PATH in place (default: its name is removed)\n"
     "  --expect-size N      the slot file's size in bytes as the server reported it:\n"
     "                       a file of another size is refused and left in place\n"},
    {"lookup", cmd_lookup, 1, "--namespace NS (--tokens-of FILE | --tokens 1,2,3) [--json]",
     "Find the blob with the longest prefix in common with some tokens.",
     "The tokens come from a slot file's header (--tokens-of) or a list (--tokens).\n"
     "A miss is not an error: it exits 0.\n\n"
     "  -n, --namespace NS   namespace to search (required)\n"
     "  --tokens-of FILE     use the token ids in the header of slot file FILE\n"
     "  --tokens LIST        comma-separated token ids\n"
     "  --json               print one JSON object:\n"
     "                       {\"blob\": ID or null, \"matched_tokens\": N, \"n_tokens\": N,\n"
     "                        \"tier\": KIND or null, \"tier_index\": N, \"size_bytes\": N,\n"
     "                        \"est_restore_s\": X, \"est_prefill_s\": X}\n"
     "                       (a miss: null and zeros); est_prefill_s is the namespace's\n"
     "                       prefill model for the matched tokens\n"},
    {"get", cmd_get, 1, "BLOB -o FILE", "Download a blob into FILE (and its sidecars beside it).",
     "Writes FILE, FILE.tokens.json and FILE.checkpoints as the blob has them, through\n"
     "temporary files renamed into place only when the whole blob arrived intact, so FILE\n"
     "never holds a partial blob. A sidecar left at FILE from an earlier file that this\n"
     "blob does not have is removed. FILE - is standard output; a FILE that is a device,\n"
     "a FIFO or a terminal is written to in place (never replaced), the slot file only.\n\n"
     "  -o, --output FILE    where to write (required; - for standard output)\n"},
    {"stage", cmd_stage, 1, "BLOB --dir DIR [--lease-seconds N] [--json]",
     "Make a blob appear in a llama-server slot directory, under a lease.",
     "DIR must be one of the daemon's --slot-dir directories (same host). The blob is\n"
     "hard-linked there (copied across file systems) under a name the daemon chooses;\n"
     "pass that filename to llama-server's POST /slots/ID?action=restore. The file stays\n"
     "until `kvtier release LEASE` or the lease expires. Prints filename, path and lease.\n\n"
     "  --dir DIR            the slot directory (required)\n"
     "  --lease-seconds N    lease length (default: the daemon's)\n"
     "  --json               one JSON object: filename, path, lease, expires_unix_ms,\n"
     "                       copied, n_tokens\n"},
    {"release", cmd_release, 1, "LEASE", "End a lease from `stage`: the staged file is removed.",
     ""},
    {"rm", cmd_rm, 1, "BLOB...", "Delete blobs (metadata first, then their files).", ""},
    {"ls", cmd_ls, 1, "[--namespace NS] [--json]", "List blobs, in blob id order.",
     "STATE is the slot file's state layout: kv, kv-2025, recurrent, hybrid, or opaque\n"
     "(a layout kvtier does not know, stored as it is); \",packed\" when its tokens are\n"
     "in llama-server's packed form; \",media\" when it holds media and is indexed only up\n"
     "to the first media position; \"?\" for a blob recorded before kvtier recorded it.\n"
     "COMPRESSION is \"-\" for a blob stored as is, else the codec (lz4, lz4+shuffle)\n"
     "and the ratio of slot file bytes to stored bytes.\n\n"
     "  -n, --namespace NS   only this namespace\n"
     "  --json               a JSON array of objects with blob, namespace, n_tokens,\n"
     "                       version, size_bytes, stored_bytes, tier, tier_index,\n"
     "                       compression, compression_ratio, state, token_form\n"
     "                       (\"plain\" or \"packed\"; both null when not recorded),\n"
     "                       media_cut, sidecars, created_unix_ms,\n"
     "                       last_access_unix_ms, hits, crc32c\n"},
    {"stats", cmd_stats, 1, "[--json]", "Show the daemon's counters, per tier and per namespace.",
     "Each tier shows what `kvtier info` shows for it: use, I/O mode, restore model,\n"
     "watermarks, compression ratio, migrations in and out, evictions by reason.\n\n"
     "  --json    one JSON object: blobs, bytes, lookups, hits, matched_tokens, puts,\n"
     "            dedups, supersessions, stages, active_leases, tiers, namespaces.\n"
     "            Each tier: index, kind, path, capacity_bytes, used_bytes, blobs,\n"
     "            read_bytes_per_s, read_fixed_s, io, io_fallback, model_samples,\n"
     "            high_watermark_bytes, low_watermark_bytes, raw_bytes, stored_bytes,\n"
     "            compression_ratio, gdsf_base, migrations_in, migrations_out,\n"
     "            evicted_capacity, evicted_not_worth, evicted_lower_full.\n"
     "            Each namespace: namespace, blobs, bytes, lookups, hits,\n"
     "            prefill_tokens_per_s\n"},
    {"report", cmd_report, 1,
     "--namespace NS --prompt-tokens N --prompt-ms X [--cached-tokens N]\n"
     "           [--blob B [--restore-ms X] [--restored-tokens N] [--restore-ignored]]",
     "Tell the daemon measured prefill (and restore) timings.",
     "The daemon learns each namespace's prefill speed from these reports, and so which\n"
     "blobs are worth keeping. The numbers are llama-server's `timings` of a completion.\n\n"
     "  -n, --namespace NS     namespace of the model (required)\n"
     "  --prompt-tokens N      tokens prefilled (timings.prompt_n; required)\n"
     "  --prompt-ms X          milliseconds they took (timings.prompt_ms; required)\n"
     "  --cached-tokens N      tokens already in the context before them (default 0):\n"
     "                         prefill slows as the context grows, the model fits that\n"
     "  --blob B               the report is about a restore of blob B:\n"
     "  --restore-ms X         how long the restore took\n"
     "  --restored-tokens N    tokens it restored\n"
     "  --restore-ignored      the server did not use the restore: quarantine the blob\n"},
    {"fsck", cmd_fsck, 0, "[--data DIR] [--verify]",
     "Check a data directory offline (does not talk to the daemon).",
     "Compares the index with the tier directories and reports one line per problem and a\n"
     "summary; never changes anything. While kvtierd runs, uploads in progress show as\n"
     "temporaries: stop the daemon for a clean verdict. Exits 0 when clean, 1 when it\n"
     "found problems, 2 when it could not run.\n\n"
     "  --data DIR   the daemon's data directory (default " CLI_DEFAULT_DATA ")\n"
     "  --verify     also read every stored byte back and check its CRC-32C\n"},
};

#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

static const struct command *find_command(const char *name)
{
	const struct command *found = NULL;

	for (size_t i = 0; i < N_COMMANDS && !found; i++)
		if (strcmp(commands[i].name, name) == 0)
			found = &commands[i];
	return found;
}

static void main_help(void)
{
	printf("Usage: kvtier [GLOBAL OPTIONS] COMMAND [ARGS]\n\n"
	       "The command-line client of kvtierd, the tiered KV-cache store for llama-server.\n\n"
	       "Commands:\n");
	for (size_t i = 0; i < N_COMMANDS; i++)
		printf("  %-8s %s\n", commands[i].name, commands[i].summary);
	printf("\n`kvtier COMMAND --help` (or `kvtier help COMMAND`) explains a command.\n\n"
	       "Global options (before COMMAND):\n"
	       "  --socket PATH      the daemon's Unix socket (default: $KVTIER_SOCKET, else\n"
	       "                     " CLI_DEFAULT_SOCKET ", kvtierd's default)\n"
	       "  --address ADDR     the daemon's address instead of --socket:\n"
	       "                       unix:/path/to.sock   a Unix socket (same as --socket)\n"
	       "                       /path/to.sock        the same (./rel.sock: relative)\n"
	       "                       host:port            TCP (kvtierd --listen); needs a token\n"
	       "  --token-file F     file holding the bearer token for TCP (kvtierd\n"
	       "                     --auth-token-file); Unix sockets need none\n"
	       "  --tls-ca FILE      talk TLS to --address HOST:PORT (kvtierd --tls-cert) and\n"
	       "                     trust only the CA certificate(s) in PEM file FILE: the\n"
	       "                     connection fails, and the token is never sent, unless\n"
	       "                     kvtierd shows a certificate of that CA for HOST\n"
	       "  --tls-server-name NAME\n"
	       "                     with --tls-ca: the name kvtierd's certificate must carry\n"
	       "                     when it is not HOST (e.g. connecting through an IP\n"
	       "                     address or a tunnel)\n"
	       "  --timeout-ms N     give up on a call, or on one message of a transfer, after\n"
	       "                     N ms (default 60000)\n"
	       "  -h, --help         this text\n"
	       "  --version          print the version\n\n"
	       "Exit status: 0 success (a lookup miss too), 1 failure, 2 usage error;\n"
	       "fsck: 1 when it found problems, 2 when it could not run.\n"
	       "Errors print \"kvtier: COMMAND: MESSAGE (ERROR) [STATUS]\" on stderr,\n"
	       "STATUS being the gRPC status name (INVALID_ARGUMENT, NOT_FOUND, ...).\n");
}

/* The global options that say how to reach the daemon. */
struct cli_conn {
	const char *sock, *addr, *token_file;
	const char *tls_ca, *tls_name; /* --tls-ca, --tls-server-name; NULL: none */
};

/* Opens the client handle for a command that talks to the daemon: the
 * address from --address, else --socket, $KVTIER_SOCKET or the default
 * socket; the token from --token-file; TLS with --tls-ca. Returns an exit
 * status. */
static int cli_connect(struct cli *g, const struct cli_conn *cn)
{
	const char *sock = cn->sock, *addr = cn->addr, *token_file = cn->token_file;
	struct kvtier_options o;
	struct kvtier_tls tls;
	char err[1024];
	int rc, ret = EXIT_OK;

	if (addr) {
		g->address = strdup(addr);
	} else {
		if (!sock)
			sock = getenv("KVTIER_SOCKET");
		if (!sock || !sock[0])
			sock = CLI_DEFAULT_SOCKET;
		if (strncmp(sock, "unix:", 5) == 0)
			g->address = strdup(sock);
		else if (asprintf(&g->address, "unix:%s", sock) < 0)
			g->address = NULL;
	}
	if (!g->address) {
		warnx_cmd(g, "out of memory");
		ret = EXIT_FAIL;
		goto out;
	}
	if (token_file) {
		rc = read_token_file(token_file, &g->token, err, sizeof(err));
		if (rc) {
			warnx_cmd(g, "%s", err);
			ret = EXIT_FAIL;
			goto out;
		}
	}
	memset(&o, 0, sizeof(o));
	o.auth_token = g->token;
	o.timeout_ms = g->timeout_ms;
	memset(&tls, 0, sizeof(tls));
	tls.ca_file = cn->tls_ca;
	tls.server_name = cn->tls_name;
	rc = kvtier_open_tls(&g->c, g->address, &o, cn->tls_ca ? &tls : NULL, err, sizeof(err));
	if (rc == KVTIER_E_INVALID && !cn->tls_ca)
		ret = usage_error(g, "bad daemon address \"%s\" (see kvtier --help)",
		                  addr ? addr : sock);
	else if (rc == KVTIER_E_INVALID)
		ret = usage_error(g, "%s", err);
	else if (rc && cn->tls_ca) {
		warnx_cmd(g, "--tls-ca: %s", err);
		ret = EXIT_FAIL;
	} else if (rc)
		ret = fail(g, rc, "cannot open a client");
out:
	return ret;
}

int main(int argc, char **argv)
{
	static const struct option lo[] = {{"socket", required_argument, NULL, 's'},
	                                   {"address", required_argument, NULL, 'a'},
	                                   {"token-file", required_argument, NULL, 't'},
	                                   {"tls-ca", required_argument, NULL, 'C'},
	                                   {"tls-server-name", required_argument, NULL, 'N'},
	                                   {"timeout-ms", required_argument, NULL, 'T'},
	                                   {"help", no_argument, NULL, 'h'},
	                                   {"version", no_argument, NULL, 'V'},
	                                   {NULL, 0, NULL, 0}};
	struct cli g;
	const struct command *cmd;
	struct cli_conn cn = {0};
	uint32_t t32;
	int opt, ret = EXIT_USAGE;

	memset(&g, 0, sizeof(g));
	g.cmd = "kvtier";
	/* Bulk transfers: keep glibc from trimming and regrowing the heap under
	 * gRPC's 1 MiB buffers, and from mmapping each one (DESIGN.md measured
	 * ~20x fewer page faults per GiB this way). */
	(void)mallopt(M_MMAP_THRESHOLD, 8 << 20); /* hints: failing costs only speed */
	(void)mallopt(M_TRIM_THRESHOLD, 64 << 20);

	while ((opt = getopt_long(argc, argv, "+h", lo, NULL)) != -1) {
		switch (opt) {
		case 's':
			cn.sock = optarg;
			break;
		case 'a':
			cn.addr = optarg;
			break;
		case 't':
			cn.token_file = optarg;
			break;
		case 'C':
			cn.tls_ca = optarg;
			break;
		case 'N':
			cn.tls_name = optarg;
			break;
		case 'T':
			if (parse_u32(optarg, &t32) || t32 == 0) {
				ret = usage_error(&g, "--timeout-ms wants a positive number of ms");
				goto out;
			}
			g.timeout_ms = t32;
			break;
		case 'h':
			main_help();
			ret = EXIT_OK;
			goto out;
		case 'V':
			printf("kvtier %s\n", KVTIER_VERSION);
			ret = EXIT_OK;
			goto out;
		default:
			ret = usage_error(&g, "bad global option (see above)");
			goto out;
		}
	}
	if (optind >= argc) {
		ret = usage_error(&g, "no command given");
		goto out;
	}
	if (strcmp(argv[optind], "help") == 0) {
		if (optind + 1 >= argc) {
			main_help();
			ret = EXIT_OK;
		} else if ((cmd = find_command(argv[optind + 1]))) {
			command_help(cmd);
			ret = EXIT_OK;
		} else {
			ret = usage_error(&g, "no command \"%s\"", argv[optind + 1]);
		}
		goto out;
	}
	cmd = find_command(argv[optind]);
	if (!cmd) {
		ret = usage_error(&g, "no command \"%s\"", argv[optind]);
		goto out;
	}
	if (cn.sock && cn.addr) {
		ret = usage_error(&g, "give --socket or --address, not both");
		goto out;
	}
	if (cn.tls_name && !cn.tls_ca) {
		ret = usage_error(&g, "--tls-server-name goes with --tls-ca (the CA file that "
		                      "signed kvtierd's certificate)");
		goto out;
	}
	if (cn.tls_ca && !cn.addr) {
		ret = usage_error(&g, "--tls-ca is for --address HOST:PORT (kvtierd --listen with "
		                      "--tls-cert); the Unix socket needs neither TLS nor a token");
		goto out;
	}
	g.cmd = cmd->name;
	argc -= optind;
	argv += optind;
	optind = 0; /* glibc: restart getopt on the subcommand's arguments */

	/* A --help anywhere in the subcommand's arguments is answered without
	 * a daemon. */
	for (int i = 1; i < argc && strcmp(argv[i], "--") != 0; i++)
		if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
			command_help(cmd);
			ret = EXIT_OK;
			goto out;
		}

	if (cmd->needs_daemon) {
		ret = cli_connect(&g, &cn);
		if (ret != EXIT_OK)
			goto out;
	}
	ret = cmd->run(&g, argc, argv);
	if (fflush(stdout) != 0 || ferror(stdout)) {
		warnx_cmd(&g, "writing the output failed: %s", strerror(errno));
		if (ret == EXIT_OK)
			ret = EXIT_FAIL;
	}
out:
	kvtier_close(g.c);
	if (g.token) {
		explicit_bzero(g.token, strlen(g.token));
		free(g.token);
	}
	free(g.address);
	return ret;
}
