/* main.c: kvtierd, the kvtier storage daemon: options, start-up, signals.
 *
 * Options come from one table (options[]) that drives parsing, --help and
 * the configuration reference in docs/ (kvtierd --help-markdown prints it;
 * a test checks docs/configuration.md against it). Start-up order: lock the
 * data directory, open the store (which reconciles after a crash), start the
 * RPC server, then the metrics endpoint. SIGTERM/SIGINT stop them in reverse
 * order, letting calls in flight finish first.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <grpc/grpc.h>

#include "codec.h"
#include "kvtier.h"
#include "log.h"
#include "options.h"
#include "metrics.h"
#include "rpc.h"
#include "store.h"
#include "tlsfile.h"

#ifndef KVTIER_VERSION
#define KVTIER_VERSION "0.0.0"
#endif

enum opt_id {
	OPT_DATA = 1000,
	OPT_SOCKET,
	OPT_TIER,
	OPT_SLOT_DIR,
	OPT_LISTEN,
	OPT_AUTH_TOKEN_FILE,
	OPT_TLS_CERT,
	OPT_TLS_KEY,
	OPT_METRICS,
	OPT_BLOCK_SIZE,
	OPT_NO_SUPERSEDE,
	OPT_MAX_BLOB_SIZE,
	OPT_LEASE_SECONDS,
	OPT_LEASE_MAX_SECONDS,
	OPT_WORKERS,
	OPT_IO_TIMEOUT_MS,
	OPT_MAX_CONNECTIONS,
	OPT_HANDSHAKE_TIMEOUT_MS,
	OPT_CONNECTION_IDLE_MS,
	OPT_MAP_SIZE,
	OPT_LOG_LEVEL,
	OPT_HIGH_WATERMARK,
	OPT_LOW_WATERMARK,
	OPT_COMPRESS_MIN_SAVING,
	OPT_SHUFFLE,
	OPT_ASSUME_PREFILL_TPS,
	OPT_PROBE_SIZE,
	OPT_IO_MODE,
	OPT_IO_DEPTH,
	OPT_IO_REQUEST_SIZE,
	OPT_VERIFY_ON_START,
	OPT_HELP,
	OPT_HELP_MARKDOWN,
	OPT_VERSION,
};

static const struct option_def options[] = {
	{"data", OPT_DATA, "DIR", "./kvtier-data",
	 "Data directory: the LMDB index and the lock file. Created if missing."},
	{"socket", OPT_SOCKET, "PATH", "DATA/kvtierd.sock",
	 "Unix socket to serve on (mode 0660). Clients need no token here."},
	{"tier", OPT_TIER, "KIND:PATH:SIZE[,high=F,low=F]", "tmpfs:/dev/shm/kvtier:2G",
	 "A storage tier, fastest first; repeat for more (at most 4). KIND is tmpfs (RAM; blobs "
	 "are hard-linked into slot dirs) or disk (NVMe/SSD: io_uring, O_DIRECT, LZ4). SIZE takes "
	 "K, M, G, T (powers of 1024). high/low override the watermarks for this tier. New blobs "
	 "land on the first tier and move down when they go cold (docs/policy.md)."},
	{"slot-dir", OPT_SLOT_DIR, "DIR", "(none)",
	 "A llama-server --slot-save-path that Stage may link blobs into and Adopt may take files "
	 "from; repeat for several servers. Nothing outside these directories is ever touched."},
	{"listen", OPT_LISTEN, "HOST:PORT", "(none)",
	 "Also serve gRPC over TCP. Requires --auth-token-file. Give --tls-cert and --tls-key "
	 "too: without them the token and every blob cross the network in clear (a warning is "
	 "logged at start)."},
	{"auth-token-file", OPT_AUTH_TOKEN_FILE, "FILE", "(none)",
	 "File whose first line is the bearer token TCP clients must send."},
	{"tls-cert", OPT_TLS_CERT, "FILE", "(none)",
	 "PEM certificate (chain: the server's own first) that --listen presents: TCP is then "
	 "served over TLS only. Needs --tls-key. Clients check it against the CA that signed it "
	 "(kvtier --tls-ca, kvtier-llama --kvtier-tls-ca), so it must name the host they "
	 "connect to (subjectAltName DNS or IP). Checked at start; read once (restart to renew)."},
	{"tls-key", OPT_TLS_KEY, "FILE", "(none)",
	 "PEM private key of --tls-cert, unencrypted; keep it mode 0600 (a warning is logged "
	 "otherwise)."},
	{"metrics", OPT_METRICS, "HOST:PORT", "(off)",
	 "Serve Prometheus metrics at http://HOST:PORT/metrics (use a loopback address)."},
	{"block-size", OPT_BLOCK_SIZE, "N", "64",
	 "Tokens per prefix block (16..4096). Fixed when the data directory is created."},
	{"no-supersede", OPT_NO_SUPERSEDE, NULL, "supersede on",
	 "Keep blobs whose tokens are a strict prefix of a newer blob in the same namespace."},
	{"max-blob-size", OPT_MAX_BLOB_SIZE, "SIZE", "64G",
	 "Largest slot file (or sidecar) accepted. Uploads land on the first tier: a file "
	 "larger than that tier's SIZE is refused as well, before anything is evicted."},
	{"lease-seconds", OPT_LEASE_SECONDS, "N", "300",
	 "Lease of a staged file when the client asks for none."},
	{"lease-max-seconds", OPT_LEASE_MAX_SECONDS, "N", "3600",
	 "Longest lease a client may ask for."},
	{"workers", OPT_WORKERS, "N", "16",
	 "Threads serving Fetch and Put streams (1..96); short calls (Lookup, Stage, ...) get "
	 "max(4, N/4) threads of their own. Calls beyond 16 per thread waiting are refused "
	 "with RESOURCE_EXHAUSTED."},
	{"io-timeout-ms", OPT_IO_TIMEOUT_MS, "MS", "60000",
	 "A stream that makes no progress for this long is cancelled."},
	{"max-connections", OPT_MAX_CONNECTIONS, "N", "1000",
	 "Client connections (Unix socket and --listen together) kept open at most; more are "
	 "accepted and closed at once, logged as event=connection_refused. Also capped by the "
	 "open-file limit (raised to the hard limit at start) minus descriptors kept for the "
	 "daemon's own files (64 + 4 per --workers thread + 2 per short-call thread); with "
	 "--listen, half go to each."},
	{"handshake-timeout-ms", OPT_HANDSHAKE_TIMEOUT_MS, "MS", "10000",
	 "A new connection that sends nothing for this long is closed unread (a client "
	 "sends its first bytes at once)."},
	{"connection-idle-ms", OPT_CONNECTION_IDLE_MS, "MS", "120000",
	 "A connection with no call in progress for this long is closed (gRPC GOAWAY); "
	 "clients reconnect on their next call."},
	{"map-size", OPT_MAP_SIZE, "SIZE", "64G",
	 "LMDB map size (address space reserved for the index; sparse)."},
	{"log-level", OPT_LOG_LEVEL, "LEVEL", "info", "error, warn, info or debug."},
	{"high-watermark", OPT_HIGH_WATERMARK, "F", "0.9",
	 "Share of a tier's capacity above which its lowest-value blobs move down a tier (or "
	 "are deleted from the last one)."},
	{"low-watermark", OPT_LOW_WATERMARK, "F", "0.75",
	 "Share of a tier's capacity that eviction brings it back under (below --high-watermark)."},
	{"compress-min-saving", OPT_COMPRESS_MIN_SAVING, "F", "0.10",
	 "Blobs moved to a disk tier are LZ4-compressed only when that saves at least this share "
	 "of their bytes (measured on samples of each blob); 1 turns compression off."},
	{"shuffle", OPT_SHUFFLE, "auto|on|off", "auto",
	 "Byte-shuffle 16-bit values before LZ4 (helps f16 KV): auto tries both per blob."},
	{"assume-prefill-tps", OPT_ASSUME_PREFILL_TPS, "N", "500",
	 "Prefill tokens/s assumed for a namespace no prefill was reported for yet (the plugin "
	 "reports llama-server's timings); used to rank blobs, never to refuse them."},
	{"probe-size", OPT_PROBE_SIZE, "SIZE", "8M",
	 "Bytes written and read back per tier at start to measure its restore cost; 0 skips "
	 "the probe (the model then starts from a guess and learns from real reads)."},
	{"io-mode", OPT_IO_MODE, "auto|pread", "auto",
	 "auto: disk tiers use io_uring with O_DIRECT when the kernel allows, else pread/pwrite "
	 "(the log and Info say which and why). pread forces the fallback, as does "
	 "KVTIER_NO_IO_URING=1 in the environment."},
	{"io-depth", OPT_IO_DEPTH, "N", "8",
	 "Disk requests in flight per stream (1..64)."},
	{"verify-on-start", OPT_VERIFY_ON_START, NULL, "after a crash only",
	 "Check every blob's files against the index at start even after a clean stop (which is "
	 "otherwise trusted: a start after SIGTERM on the same boot skips the per-file check, "
	 "seconds at 10^6 blobs). A crash or a reboot always checks."},
	{"io-request-size", OPT_IO_REQUEST_SIZE, "SIZE", "1M",
	 "Bytes per disk request (64K..16M)."},
	{"help", OPT_HELP, NULL, NULL, "Show this help and exit."},
	{"help-markdown", OPT_HELP_MARKDOWN, NULL, NULL,
	 "Print the option table in Markdown (the configuration reference) and exit."},
	{"version", OPT_VERSION, NULL, NULL, "Print the version and exit."},
};
#define N_OPTIONS (sizeof(options) / sizeof(options[0]))

static void usage(FILE *f)
{
	fprintf(f, "Usage: kvtierd [OPTION]...\n"
		   "kvtier storage daemon: keeps llama-server slot files keyed by token prefix and "
		   "serves them over gRPC.\n\nOptions:\n");
	options_usage(f, options, N_OPTIONS, 34);
	fprintf(f, "\nExample:\n  kvtierd --data /var/lib/kvtier --tier tmpfs:/dev/shm/kvtier:8G "
		   "--tier disk:/srv/nvme/kvtier-disk:200G\n"
		   "          --slot-dir /srv/llama/slots --metrics 127.0.0.1:9477\n"
		   "Stop with SIGTERM or SIGINT: calls in flight finish first.\n");
}

static int parse_share(const char *s, double lo, double hi, double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || !(v >= lo && v <= hi))
		return -1;
	*out = v;
	return 0;
}

/* KIND:PATH:SIZE[,high=F,low=F]; PATH may hold ':' (split at the first and
 * the last). Returns 0, -1 (malformed) or -2 (unknown kind). */
static int parse_tier(const char *s, struct store_tier_config *t)
{
	const char *c1 = strchr(s, ':'), *c2 = strrchr(s, ':');
	char size[64], *opt, *save = NULL;

	if (!c1 || c1 == c2 || (size_t)(c1 - s) >= sizeof(t->kind) ||
	    (size_t)(c2 - c1 - 1) >= sizeof(t->path) || c2 == c1 + 1)
		return -1;
	memcpy(t->kind, s, (size_t)(c1 - s));
	t->kind[c1 - s] = '\0';
	memcpy(t->path, c1 + 1, (size_t)(c2 - c1 - 1));
	t->path[c2 - c1 - 1] = '\0';
	if (strcmp(t->kind, "tmpfs") != 0 && strcmp(t->kind, "disk") != 0)
		return -2;
	if (strlen(c2 + 1) >= sizeof(size))
		return -1;
	snprintf(size, sizeof(size), "%s", c2 + 1);
	opt = strchr(size, ',');
	if (opt)
		*opt++ = '\0';
	if (options_parse_size(size, &t->capacity) || t->capacity == 0)
		return -1;
	for (char *o = opt ? strtok_r(opt, ",", &save) : NULL; o; o = strtok_r(NULL, ",", &save)) {
		if (strncmp(o, "high=", 5) == 0 && parse_share(o + 5, 0.01, 1, &t->high) == 0)
			continue;
		if (strncmp(o, "low=", 4) == 0 && parse_share(o + 4, 0.01, 0.99, &t->low) == 0)
			continue;
		return -1;
	}
	if (t->high > 0 && t->low > 0 && t->low >= t->high)
		return -1;
	return 0;
}

static int read_token(const char *path, char *out, size_t cap)
{
	FILE *f = fopen(path, "re");
	struct stat st;

	if (!f)
		return -errno;
	if (fstat(fileno(f), &st) == 0 && (st.st_mode & 077))
		klog(LOG_WARN, "event=token_file_permissions path=%s mode=%o hint=\"chmod 600\"",
		     path, (unsigned)(st.st_mode & 0777));
	if (!fgets(out, (int)cap, f)) {
		fclose(f);
		return -ENODATA;
	}
	fclose(f);
	out[strcspn(out, "\r\n")] = '\0';
	return strlen(out) >= 16 ? 0 : -EINVAL;
}

static int die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Prints "kvtierd: <message>" and returns the exit status for bad usage. */
static int die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "kvtierd: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return 2;
}

/* Raises the soft open-file limit to the hard one: the soft default (1024)
 * is what a thousand idle connections exhausted (review D1). The listener
 * caps connections below whatever limit results. */
static void raise_fd_limit(void)
{
	struct rlimit rl;
	rlim_t was;

	if (getrlimit(RLIMIT_NOFILE, &rl))
		return;
	was = rl.rlim_cur;
	if (rl.rlim_cur == rl.rlim_max)
		return;
	rl.rlim_cur = rl.rlim_max;
	if (setrlimit(RLIMIT_NOFILE, &rl)) /* e.g. an unlimited hard limit above fs.nr_open */
		klog(LOG_WARN, "event=fd_limit_raise_failed soft=%llu hard=%llu error=\"%s\"",
		     (unsigned long long)was, (unsigned long long)rl.rlim_max, strerror(errno));
	else
		klog(LOG_INFO, "event=fd_limit_raised soft_was=%llu soft=%llu",
		     (unsigned long long)was, (unsigned long long)rl.rlim_cur);
}

/* Checks the TLS options and reads the key pair for --listen into
 * *cert_pem and *key_pem (both NULL without TLS); says at start, before
 * anything listens, what is wrong with them. Without TLS on --listen it
 * warns that the token travels in clear. Returns 0 or the exit status. */
static int tls_setup(const char *listen, const char *cert, const char *key, char **cert_pem,
		     char **key_pem)
{
	struct tlsfile_cert_info info;
	char err[1024];

	*cert_pem = *key_pem = NULL;
	if (!cert != !key)
		return die("--tls-cert and --tls-key go together: give the certificate and its "
			   "private key, or neither (plaintext TCP)");
	if (cert && !listen)
		return die("--tls-cert and --tls-key secure --listen, which is not given: add "
			   "--listen HOST:PORT (the Unix socket needs no TLS)");
	if (!listen)
		return 0;
	if (!cert) {
		klog(LOG_WARN, "event=listen_plaintext listen=%s hint=\"TCP is served without TLS: "
		     "the bearer token and every blob cross the network in clear and can be read "
		     "or replayed by anyone on the path; give --tls-cert and --tls-key "
		     "(docs/operations.md, remote setup) unless this network is trusted\"", listen);
		return 0;
	}
	if (tlsfile_read_key_pair(cert, key, cert_pem, key_pem, &info, err, sizeof(err)))
		return die("TLS for --listen: %s", err);
	if (info.key_mode & 077)
		klog(LOG_WARN, "event=tls_key_permissions path=%s mode=%o hint=\"chmod 600: the "
		     "private key must be readable by kvtierd's user only\"", key, info.key_mode);
	if (info.expired || info.not_yet_valid)
		klog(LOG_WARN, "event=tls_cert_%s path=%s subject=\"%s\" not_after=\"%s\" "
		     "hint=\"clients will refuse the connection: renew the certificate and "
		     "restart\"", info.expired ? "expired" : "not_yet_valid", cert, info.subject,
		     info.not_after);
	klog(LOG_INFO, "event=tls_ready listen=%s cert=%s subject=\"%s\" not_after=\"%s\"", listen,
	     cert, info.subject, info.not_after);
	return 0;
}

int main(int argc, char **argv)
{
	struct store_config cfg;
	struct rpc_config rcfg = {0};
	struct option longopts[N_OPTIONS + 1];
	char socket_path[4096 + 32] = "", token[256] = "", lock_path[4096 + 32], err[1024] = "";
	const char *metrics_addr = NULL, *token_file = NULL, *tls_cert = NULL, *tls_key = NULL;
	char *cert_pem = NULL, *key_pem = NULL;
	unsigned workers = 16, io_timeout = 60000, lease = 300, lease_max = 3600;
	struct store *store = NULL;
	struct rpc_server *rpc = NULL;
	struct metrics *metrics = NULL;
	sigset_t sigs;
	int rc, lock_fd = -1, sig;

	memset(&cfg, 0, sizeof(cfg));
	snprintf(cfg.data_dir, sizeof(cfg.data_dir), "./kvtier-data");
	cfg.supersede = 1;
	cfg.max_blob_bytes = 64ull << 30;
	cfg.high_watermark = 0.9;
	cfg.low_watermark = 0.75;
	cfg.compress_min_saving = 0.10;
	cfg.shuffle = CODEC_SHUFFLE_AUTO;
	cfg.assumed_prefill_tps = 500;
	cfg.probe_bytes = 8u << 20;
	cfg.io_depth = 8;
	cfg.io_request_bytes = 1u << 20;
	rcfg.max_connections = 1000;
	options_longopts(options, N_OPTIONS, longopts);

	while ((rc = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (rc) {
		case OPT_DATA:
			if (strlen(optarg) >= sizeof(cfg.data_dir))
				return die("--data: path too long: %s", optarg);
			snprintf(cfg.data_dir, sizeof(cfg.data_dir), "%s", optarg);
			break;
		case OPT_SOCKET:
			snprintf(socket_path, sizeof(socket_path), "%s", optarg);
			break;
		case OPT_TIER: {
			if (cfg.n_tiers == STORE_MAX_TIERS)
				return die("--tier: at most 4 tiers");
			int t = parse_tier(optarg, &cfg.tiers[cfg.n_tiers]);
			if (t == -2)
				return die("--tier %s: unknown kind (known: tmpfs, disk)", optarg);
			if (t)
				return die("--tier %s: expected KIND:PATH:SIZE[,high=F,low=F] with "
					   "0 <= low < high <= 1, e.g. tmpfs:/dev/shm/kvtier:8G or "
					   "disk:/var/lib/kvtier:200G,high=0.95,low=0.85", optarg);
			cfg.n_tiers++;
			break;
		}
		case OPT_SLOT_DIR:
			if (cfg.n_slot_dirs == STORE_MAX_SLOT_DIRS)
				return die("--slot-dir: at most 8 directories");
			snprintf(cfg.slot_dirs[cfg.n_slot_dirs++], sizeof(cfg.slot_dirs[0]), "%s",
				 optarg);
			break;
		case OPT_LISTEN:
			rcfg.listen = optarg;
			break;
		case OPT_AUTH_TOKEN_FILE:
			token_file = optarg;
			break;
		case OPT_TLS_CERT:
			tls_cert = optarg;
			break;
		case OPT_TLS_KEY:
			tls_key = optarg;
			break;
		case OPT_METRICS:
			metrics_addr = optarg;
			break;
		case OPT_BLOCK_SIZE:
			if (options_parse_uint(optarg, 16, 4096, &cfg.block_size))
				return die("--block-size %s: expected 16..4096", optarg);
			break;
		case OPT_NO_SUPERSEDE:
			cfg.supersede = 0;
			break;
		case OPT_MAX_BLOB_SIZE:
			if (options_parse_size(optarg, &cfg.max_blob_bytes) || cfg.max_blob_bytes < 1024)
				return die("--max-blob-size %s: expected a size such as 64G", optarg);
			break;
		case OPT_LEASE_SECONDS:
			if (options_parse_uint(optarg, 1, 86400, &lease))
				return die("--lease-seconds %s: expected 1..86400", optarg);
			break;
		case OPT_LEASE_MAX_SECONDS:
			if (options_parse_uint(optarg, 1, 7 * 86400, &lease_max))
				return die("--lease-max-seconds %s: expected 1..604800", optarg);
			break;
		case OPT_WORKERS:
			/* Bounded by LMDB's 126 reader slots: every worker may hold one. */
			if (options_parse_uint(optarg, 1, 96, &workers))
				return die("--workers %s: expected 1..96", optarg);
			break;
		case OPT_MAX_CONNECTIONS:
			if (options_parse_uint(optarg, 1, 1000000, &rcfg.max_connections))
				return die("--max-connections %s: expected 1..1000000", optarg);
			break;
		case OPT_HANDSHAKE_TIMEOUT_MS:
			if (options_parse_uint(optarg, 100, 600000, &rcfg.handshake_timeout_ms))
				return die("--handshake-timeout-ms %s: expected 100..600000", optarg);
			break;
		case OPT_CONNECTION_IDLE_MS:
			if (options_parse_uint(optarg, 1000, 86400000, &rcfg.connection_idle_ms))
				return die("--connection-idle-ms %s: expected 1000..86400000", optarg);
			break;
		case OPT_IO_TIMEOUT_MS:
			if (options_parse_uint(optarg, 100, 3600000, &io_timeout))
				return die("--io-timeout-ms %s: expected 100..3600000", optarg);
			break;
		case OPT_MAP_SIZE:
			if (options_parse_size(optarg, &cfg.map_size) || cfg.map_size < (1u << 20))
				return die("--map-size %s: expected a size such as 64G", optarg);
			break;
		case OPT_LOG_LEVEL:
			if (log_level_parse(optarg) < 0)
				return die("--log-level %s: expected error, warn, info or debug", optarg);
			log_threshold = log_level_parse(optarg);
			break;
		case OPT_HIGH_WATERMARK:
			if (parse_share(optarg, 0.01, 1, &cfg.high_watermark))
				return die("--high-watermark %s: expected a share in 0.01..1", optarg);
			break;
		case OPT_LOW_WATERMARK:
			if (parse_share(optarg, 0.01, 0.99, &cfg.low_watermark))
				return die("--low-watermark %s: expected a share in 0.01..0.99", optarg);
			break;
		case OPT_COMPRESS_MIN_SAVING:
			if (parse_share(optarg, 0, 1, &cfg.compress_min_saving))
				return die("--compress-min-saving %s: expected a share in 0..1", optarg);
			break;
		case OPT_SHUFFLE:
			if (strcmp(optarg, "auto") == 0)
				cfg.shuffle = CODEC_SHUFFLE_AUTO;
			else if (strcmp(optarg, "on") == 0)
				cfg.shuffle = CODEC_SHUFFLE_ALWAYS;
			else if (strcmp(optarg, "off") == 0)
				cfg.shuffle = CODEC_SHUFFLE_NEVER;
			else
				return die("--shuffle %s: expected auto, on or off", optarg);
			break;
		case OPT_ASSUME_PREFILL_TPS:
			if (parse_share(optarg, 1, 1e9, &cfg.assumed_prefill_tps))
				return die("--assume-prefill-tps %s: expected tokens/s in 1..1e9", optarg);
			break;
		case OPT_PROBE_SIZE:
			if (options_parse_size(optarg, &cfg.probe_bytes) || cfg.probe_bytes > (1ull << 30))
				return die("--probe-size %s: expected a size up to 1G (0: no probe)",
					   optarg);
			break;
		case OPT_IO_MODE:
			if (strcmp(optarg, "auto") == 0)
				cfg.io_mode = TIER_IO_AUTO;
			else if (strcmp(optarg, "pread") == 0)
				cfg.io_mode = TIER_IO_PREAD;
			else
				return die("--io-mode %s: expected auto or pread", optarg);
			break;
		case OPT_IO_DEPTH:
			if (options_parse_uint(optarg, 1, 64, &cfg.io_depth))
				return die("--io-depth %s: expected 1..64", optarg);
			break;
		case OPT_VERIFY_ON_START:
			cfg.verify_on_start = 1;
			break;
		case OPT_IO_REQUEST_SIZE:
			if (options_parse_size(optarg, &cfg.io_request_bytes) ||
			    cfg.io_request_bytes < (64u << 10) || cfg.io_request_bytes > (16u << 20))
				return die("--io-request-size %s: expected 64K..16M", optarg);
			break;
		case OPT_HELP:
			usage(stdout);
			return 0;
		case OPT_HELP_MARKDOWN:
			options_markdown(stdout, options, N_OPTIONS);
			return 0;
		case OPT_VERSION:
			printf("kvtierd %s\n", KVTIER_VERSION);
			return 0;
		default:
			fprintf(stderr, "Try 'kvtierd --help'.\n");
			return 2;
		}
	}
	if (optind < argc)
		return die("unexpected argument: %s (options start with --; see --help)",
			   argv[optind]);
	if (cfg.n_tiers == 0) {
		parse_tier("tmpfs:/dev/shm/kvtier:2G", &cfg.tiers[0]);
		cfg.n_tiers = 1;
	}
	if (lease > lease_max)
		return die("--lease-seconds is larger than --lease-max-seconds");
	if (cfg.low_watermark >= cfg.high_watermark)
		return die("--low-watermark %g must be below --high-watermark %g", cfg.low_watermark,
			   cfg.high_watermark);
	cfg.lease_default_s = lease;
	cfg.lease_max_s = lease_max;
	if (rcfg.listen && !token_file)
		return die("--listen %s needs --auth-token-file: TCP is never served without a "
			   "token", rcfg.listen);
	if (token_file) {
		rc = read_token(token_file, token, sizeof(token));
		if (rc)
			return die("--auth-token-file %s: %s (the first line must be a token of at "
				   "least 16 characters)", token_file, strerror(-rc));
	}
	rc = tls_setup(rcfg.listen, tls_cert, tls_key, &cert_pem, &key_pem);
	if (rc)
		return rc;
	rcfg.tls_cert_pem = cert_pem;
	rcfg.tls_key_pem = key_pem;
	if (!socket_path[0])
		snprintf(socket_path, sizeof(socket_path), "%s/kvtierd.sock", cfg.data_dir);

	/* Anonymous memory that comes back after a burst (review D15: 650 MB
	 * under 64 clients, kept for good). glibc gives every thread that
	 * allocates an arena of its own (up to 8 per core): the messages gRPC's
	 * threads receive and the workers free, and the workers' buffers, were
	 * spread over ~20 arenas, each keeping its freed top (the former 256M
	 * trim threshold and 64M top pad). So: two arenas (measured at 64
	 * clients: as many calls per second as with ~20, half the peak);
	 * 1 MiB buffers still from the heap, not mmapped (a threshold of 256K
	 * cost a third of the calls per second: page faults and munmap's TLB
	 * shootdowns on every message), the threshold fixed so glibc never
	 * moves it; freed tops above 16 MiB trimmed; and once the daemon has
	 * been idle for a second after calls a worker gives every free page
	 * back with malloc_trim (rpc.c, worker_idle_trim_locked). */
	mallopt(M_ARENA_MAX, 2);
	mallopt(M_MMAP_THRESHOLD, 4 << 20);
	mallopt(M_TRIM_THRESHOLD, 16 << 20);

	/* Signals are taken by sigwait() in this thread only. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);
	/* Adopt holds a read lease for an instant to prove nobody writes the
	 * inode it links (tier_writer_from_file): a lease break sends SIGIO,
	 * whose default action would end the daemon. */
	signal(SIGIO, SIG_IGN);

	if (mkdir(cfg.data_dir, 0700) && errno != EEXIST)
		return die("cannot create data directory %s: %s", cfg.data_dir, strerror(errno));
	snprintf(lock_path, sizeof(lock_path), "%s/kvtierd.lock", cfg.data_dir);
	lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (lock_fd < 0)
		return die("cannot open %s: %s", lock_path, strerror(errno));
	if (flock(lock_fd, LOCK_EX | LOCK_NB)) {
		char pid[32] = "?";
		ssize_t n = pread(lock_fd, pid, sizeof(pid) - 1, 0);
		pid[n > 0 ? n : 1] = '\0';
		pid[strcspn(pid, "\n")] = '\0';
		return die("another kvtierd (pid %s) is running on data directory %s", pid,
			   cfg.data_dir);
	}
	{
		char pid[32];
		int n = snprintf(pid, sizeof(pid), "%d\n", (int)getpid());
		if (ftruncate(lock_fd, 0) || pwrite(lock_fd, pid, (size_t)n, 0) != n)
			klog(LOG_WARN, "event=lock_write_failed path=%s", lock_path);
	}

	raise_fd_limit();
	grpc_init();
	rc = store_open(&cfg, &store, err, sizeof(err));
	if (rc) {
		fprintf(stderr, "kvtierd: %s\n", err[0] ? err : kvtier_strerror(rc));
		rc = 1;
		goto out;
	}
	rcfg.unix_path = socket_path;
	rcfg.auth_token = token[0] ? token : NULL;
	rcfg.workers = workers;
	rcfg.io_timeout_ms = io_timeout;
	rc = rpc_start(store, &rcfg, &rpc, err, sizeof(err));
	if (rc) {
		fprintf(stderr, "kvtierd: %s\n", err[0] ? err : kvtier_strerror(rc));
		rc = 1;
		goto out;
	}
	if (metrics_addr) {
		rc = metrics_start(metrics_addr, store, &metrics, err, sizeof(err));
		if (rc) {
			fprintf(stderr, "kvtierd: --metrics %s: %s\n", metrics_addr,
				err[0] ? err : kvtier_strerror(rc));
			rc = 1;
			goto out;
		}
	}
	klog(LOG_INFO, "event=ready version=%s pid=%d data=%s socket=%s listen=%s tls=%s metrics=%s "
	     "block_size=%u tiers=%u slot_dirs=%u supersede=%d",
	     KVTIER_VERSION, (int)getpid(), cfg.data_dir, socket_path,
	     rcfg.listen ? rcfg.listen : "-", !rcfg.listen ? "-" : cert_pem ? "on" : "off",
	     metrics_addr ? metrics_addr : "-",
	     store_block_size(store), cfg.n_tiers, cfg.n_slot_dirs, cfg.supersede);
	for (;;) {
		if (sigwait(&sigs, &sig))
			continue;
		if (sig == SIGHUP) {
			klog(LOG_INFO, "event=sighup action=none hint=\"restart to change options\"");
			continue;
		}
		break;
	}
	klog(LOG_INFO, "event=stopping signal=%d", sig);
	rc = 0;
out:
	metrics_stop(metrics);
	rpc_stop(rpc, 5000);
	if (rpc || rc == 0)
		unlink(socket_path);
	store_close(store);
	grpc_shutdown();
	if (lock_fd >= 0)
		close(lock_fd);
	free(cert_pem);
	if (key_pem) {
		explicit_bzero(key_pem, strlen(key_pem));
		free(key_pem);
	}
	if (rc == 0)
		klog(LOG_INFO, "event=stopped");
	return rc;
}
