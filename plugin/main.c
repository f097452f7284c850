/* main.c: kvtier-llama, the llama-server sidecar proxy: options, start-up,
 * signals.
 *
 * Options come from one table (options[]) that drives parsing, --help and
 * the option reference (kvtier-llama --help-markdown prints it). Start-up
 * order: libcurl, the engine (kvtierd client, model fingerprint, one look at
 * every backend), then the HTTP server. SIGTERM/SIGINT stop them in reverse
 * order: transfers in flight are aborted, queued saves finish (each bounded
 * by --slot-timeout-ms).
 *
 * This file must never do request work: it only configures and starts.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "engine.h"
#include "log.h"
#include "options.h"
#include "proxy.h"
#include "slots.h"

#ifndef KVTIER_VERSION
#define KVTIER_VERSION "0.0.0"
#endif

enum opt_id {
	OPT_LISTEN = 1000,
	OPT_BACKEND,
	OPT_KVTIER,
	OPT_KVTIER_TOKEN_FILE,
	OPT_KVTIER_TLS_CA,
	OPT_KVTIER_TLS_NAME,
	OPT_API_KEY_FILE,
	OPT_BACKEND_API_KEY_FILE,
	OPT_KVTIER_MODE,
	OPT_SLOT_DIR,
	OPT_MODEL_FILE,
	OPT_CACHE_TYPE_K,
	OPT_CACHE_TYPE_V,
	OPT_FLASH_ATTN,
	OPT_NAMESPACE,
	OPT_BREAK_EVEN,
	OPT_TIMEOUT_MS,
	OPT_SLOT_TIMEOUT_MS,
	OPT_HEALTH_MS,
	OPT_SLOT_CHECK_MS,
	OPT_SAVE_WORKERS,
	OPT_MAX_REQUEST_SIZE,
	OPT_MAX_INFLIGHT_BODY,
	OPT_MAX_CONNECTIONS,
	OPT_SERVER_CACHE_RAM,
	OPT_SERVER_CACHE_IDLE,
	OPT_IDLE_TIMEOUT,
	OPT_REQUEST_TIMEOUT,
	OPT_MAX_CONNECTIONS_PER_IP,
	OPT_LOG_LEVEL,
	OPT_HELP,
	OPT_HELP_MARKDOWN,
	OPT_VERSION,
};

static const struct option_def options[] = {
    {"listen", OPT_LISTEN, "HOST:PORT", "127.0.0.1:8081",
     "Where clients connect instead of llama-server ([ADDR]:PORT for IPv6)."},
    {"backend", OPT_BACKEND, "URL", "(required)",
     "A llama-server (or ik_llama.cpp server), e.g. http://127.0.0.1:8080; repeat for several "
     "instances. All must share --slot-dir. URL#MODEL is model MODEL of a llama-server in "
     "router mode (--models-dir): requests naming that model go there."},
    {"kvtier", OPT_KVTIER, "ADDRESS", "(required)",
     "kvtierd's address: unix:PATH (same host) or HOST:PORT (needs --kvtier-token-file, and "
     "--kvtier-tls-ca unless the network is trusted)."},
    {"kvtier-token-file", OPT_KVTIER_TOKEN_FILE, "FILE", "(none)",
     "File whose first line is kvtierd's bearer token (for a HOST:PORT address)."},
    {"kvtier-tls-ca", OPT_KVTIER_TLS_CA, "FILE", "(none: plaintext)",
     "Talk TLS to a HOST:PORT kvtierd (its --tls-cert) and trust only the CA certificate(s) "
     "in PEM file FILE: kvtierd must show a certificate of that CA for HOST, or no call (and "
     "no token) is sent."},
    {"kvtier-tls-server-name", OPT_KVTIER_TLS_NAME, "NAME", "(HOST)",
     "With --kvtier-tls-ca: the name kvtierd's certificate carries when it is not the HOST "
     "of --kvtier (an IP address, a tunnel)."},
    {"api-key-file", OPT_API_KEY_FILE, "FILE", "(none)",
     "File whose first line is the key clients must send (Authorization: Bearer KEY, or "
     "X-Api-Key: KEY), as llama-server's --api-key; /health stays open. Without it the plugin "
     "takes every request on its --listen address."},
    {"backend-api-key-file", OPT_BACKEND_API_KEY_FILE, "FILE", "(none)",
     "File whose first line is the backends' --api-key: the plugin sends it on every call to "
     "them (and in place of the client's key on forwarded requests)."},
    {"kvtier-mode", OPT_KVTIER_MODE, "MODE", "auto",
     "auto, local or remote. local: kvtierd stages blobs into --slot-dir and adopts saves "
     "(zero copy); remote: blobs are streamed in and out. auto probes which one works."},
    {"slot-dir", OPT_SLOT_DIR, "DIR", "(required)",
     "The backends' --slot-save-path, as this host sees it."},
    {"model-file", OPT_MODEL_FILE, "PATH", "(none)",
     "The backends' GGUF model file: the namespace is then a fingerprint of its header, size "
     "and sampled data. Without it, of /props and /v1/models."},
    {"cache-type-k", OPT_CACHE_TYPE_K, "TYPE", "f16",
     "The backends' --cache-type-k (part of the namespace: llama-server does not report it)."},
    {"cache-type-v", OPT_CACHE_TYPE_V, "TYPE", "f16", "The backends' --cache-type-v."},
    {"flash-attn", OPT_FLASH_ATTN, NULL, "off",
     "The backends run with flash attention (-fa): its slot files have another KV layout."},
    {"namespace", OPT_NAMESPACE, "NAME", "(derived)",
     "Use this namespace for every backend instead of a fingerprint (1..255 bytes). Only for "
     "backends that certainly run the same model with the same KV settings."},
    {"break-even-tokens", OPT_BREAK_EVEN, "N", "64",
     "Smallest gain in tokens worth a restore, and smallest slot worth a save. Raised "
     "automatically when kvtierd's restore estimate and the measured prefill speed say so."},
    {"timeout-ms", OPT_TIMEOUT_MS, "MS", "600000",
     "Longest a forwarded request may take (and longest it may wait for a busy slot)."},
    {"slot-timeout-ms", OPT_SLOT_TIMEOUT_MS, "MS", "30000",
     "Longest a slot save or restore may take; also bounds tokenize, apply-template and other "
     "short calls (at most 10000 for those). A restore that times out falls back to prefill."},
    {"health-interval-ms", OPT_HEALTH_MS, "MS", "1000",
     "How often backends are checked; a backend that stops answering has its slots forgotten."},
    {"slot-check-ms", OPT_SLOT_CHECK_MS, "MS", "1000",
     "Before relying on what a slot holds, read its task id with GET /slots (it changes when "
     "another client or a restart used the slot) if the plugin last used the slot at least MS "
     "ago; 0 checks before every request. A back-to-back turn skips the call, which waits for "
     "the server's decode loop."},
    {"save-workers", OPT_SAVE_WORKERS, "N", "2", "Threads running slot saves (1..8)."},
    {"server-cache-ram", OPT_SERVER_CACHE_RAM, "MIB", "8192",
     "The backends' --cache-ram: llama-server's own RAM prompt cache (on by default since late "
     "2025). The plugin models it and skips a restore the server would take from there itself. "
     "0 when the backends run with --cache-ram 0. Not used for ik_llama.cpp and older servers "
     "(found from their slot files)."},
    {"server-cache-idle-slots", OPT_SERVER_CACHE_IDLE, "on|off", "on",
     "The backends' --cache-idle-slots: when a task starts, llama-server copies every idle slot "
     "into its RAM cache and, with unified KV (the default with --parallel auto), clears it. "
     "The plugin then knows those slots are empty, and delays a request while a save of that "
     "backend runs (the save would find its slot cleared)."},
    {"max-request-size", OPT_MAX_REQUEST_SIZE, "SIZE", "64M",
     "Largest request body accepted (K, M, G suffixes); a larger one is refused with 413 "
     "before it is read."},
    {"max-inflight-body-bytes", OPT_MAX_INFLIGHT_BODY, "SIZE", "256M",
     "Most bytes of request bodies held at once, over all connections (each body is held "
     "once, until its backend call ends). A request whose body would pass it is answered "
     "503 with Retry-After. At least --max-request-size."},
    {"max-connections", OPT_MAX_CONNECTIONS, "N", "256",
     "Client connections served at once; further ones are refused (reset) until one closes."},
    {"max-connections-per-ip", OPT_MAX_CONNECTIONS_PER_IP, "N", "64",
     "Client connections one IP address may hold at once, so that one client cannot take "
     "every connection; 0: no limit (for clients that all come through one reverse proxy)."},
    {"idle-timeout-s", OPT_IDLE_TIMEOUT, "N", "60",
     "A client connection that sends nothing for this many seconds (between requests, or "
     "while sending one) is closed. Not while the plugin works on its answer: that is "
     "bounded by --timeout-ms."},
    {"request-timeout-s", OPT_REQUEST_TIMEOUT, "N", "30",
     "A client must send a request's headers and body within this many seconds (counted "
     "from its connection, or from its previous answer plus --idle-timeout-s), else its "
     "connection is closed: a client trickling bytes cannot hold a connection. Raise it "
     "for clients that upload large prompts over slow links."},
    {"log-level", OPT_LOG_LEVEL, "LEVEL", "info", "error, warn, info or debug."},
    {"help", OPT_HELP, NULL, NULL, "Show this help and exit."},
    {"help-markdown", OPT_HELP_MARKDOWN, NULL, NULL,
     "Print the option table in Markdown (the option reference) and exit."},
    {"version", OPT_VERSION, NULL, NULL, "Print the version and exit."},
};
#define N_OPTIONS (sizeof(options) / sizeof(options[0]))

/* --help: the option table as text. */
static void usage(FILE *f)
{
	fprintf(f, "Usage: kvtier-llama --backend URL --kvtier ADDRESS --slot-dir DIR [OPTION]...\n"
	           "A proxy in front of llama-server that restores and saves slots through kvtierd "
	           "automatically.\n\nOptions:\n");
	options_usage(f, options, N_OPTIONS, 30);
	fprintf(
	    f, "\nExample:\n  kvtier-llama --listen 127.0.0.1:8081 --backend http://127.0.0.1:8080 "
	       "--kvtier unix:/var/lib/kvtier/kvtierd.sock --slot-dir /srv/llama/slots\n"
	       "Clients then use http://127.0.0.1:8081 exactly as they used llama-server.\n"
	       "Stop with SIGTERM or SIGINT.\n");
}

/* A KV cache type name as llama-server spells them (f16, q8_0, ...). */
static int type_ok(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > 16)
		return 0;
	for (; *s; s++)
		if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_'))
			return 0;
	return 1;
}

/* Reads the first line of a token file into out. Returns 0 or -errno
 * (-ENODATA for an empty file, -EINVAL for an empty first line). */
static int read_token(const char *path, char *out, size_t cap)
{
	FILE *f = fopen(path, "re");

	if (!f)
		return -errno;
	if (!fgets(out, (int)cap, f)) {
		fclose(f);
		return -ENODATA;
	}
	fclose(f);
	out[strcspn(out, "\r\n")] = '\0';
	return out[0] ? 0 : -EINVAL;
}

static int die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Prints "kvtier-llama: <message>" and returns the exit status for bad usage. */
static int die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "kvtier-llama: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return 2;
}

int main(int argc, char **argv)
{
	static char backends[SLOTS_MAX_BACKENDS][512];
	const char *backend_ptrs[SLOTS_MAX_BACKENDS];
	struct option longopts[N_OPTIONS + 1];
	uint64_t size;
	struct engine_config ec = {0};
	struct proxy_config pc = {0};
	struct engine *engine = NULL;
	struct proxy *proxy = NULL;
	const char *token_file = NULL, *mode = "auto", *api_key_file = NULL,
		   *backend_key_file = NULL, *tls_ca = NULL, *tls_name = NULL;
	static char api_key[BACKEND_KEY_MAX + 2], backend_key[BACKEND_KEY_MAX + 2];
	char token[512] = "", err[1024] = "";
	unsigned n_backends = 0;
	struct stat st;
	sigset_t sigs;
	int rc, sig, is_tcp;

	ec.kv.type_k = "f16";
	ec.kv.type_v = "f16";
	ec.break_even = 64;
	ec.timeout_ms = 600000;
	ec.slot_timeout_ms = 30000;
	ec.health_ms = 1000;
	ec.slot_check_ms = 1000;
	ec.save_workers = 2;
	ec.server_cache_ram_mib = 8192;
	ec.server_cache_idle_slots = 1;
	pc.listen = "127.0.0.1:8081";
	pc.max_request_bytes = 64u << 20;
	pc.max_inflight_body_bytes = 256u << 20;
	pc.max_connections = 256;
	pc.idle_timeout_s = 60;
	pc.request_timeout_s = 30;
	pc.max_connections_per_ip = 64;
	options_longopts(options, N_OPTIONS, longopts);

	while ((rc = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (rc) {
		case OPT_LISTEN:
			pc.listen = optarg;
			break;
		case OPT_BACKEND: {
			size_t len = strlen(optarg);

			if (n_backends == SLOTS_MAX_BACKENDS)
				return die("--backend: at most %d backends", SLOTS_MAX_BACKENDS);
			if (strncmp(optarg, "http://", 7) != 0 &&
			    strncmp(optarg, "https://", 8) != 0)
				return die(
				    "--backend %s: expected a URL such as http://127.0.0.1:8080",
				    optarg);
			while (len > 8 && optarg[len - 1] == '/')
				len--;
			if (len >= sizeof(backends[0]))
				return die("--backend %s: URL too long", optarg);
			memcpy(backends[n_backends], optarg, len);
			backends[n_backends][len] = '\0';
			for (unsigned i = 0; i < n_backends; i++)
				if (strcmp(backends[i], backends[n_backends]) == 0)
					return die("--backend %s given twice", optarg);
			backend_ptrs[n_backends] = backends[n_backends];
			n_backends++;
			break;
		}
		case OPT_KVTIER:
			ec.kvtier_address = optarg;
			break;
		case OPT_KVTIER_TOKEN_FILE:
			token_file = optarg;
			break;
		case OPT_KVTIER_TLS_CA:
			if (strlen(optarg) >= PATH_MAX)
				return die("--kvtier-tls-ca: path too long");
			tls_ca = optarg;
			break;
		case OPT_KVTIER_TLS_NAME:
			if (!optarg[0] || strlen(optarg) > 253)
				return die("--kvtier-tls-server-name: 1 to 253 bytes (a host name or "
					   "an IP address)");
			tls_name = optarg;
			break;
		case OPT_API_KEY_FILE:
			api_key_file = optarg;
			break;
		case OPT_BACKEND_API_KEY_FILE:
			backend_key_file = optarg;
			break;
		case OPT_KVTIER_MODE:
			mode = optarg;
			if (strcmp(mode, "auto") == 0)
				ec.kvtier_mode = KVCLIENT_AUTO;
			else if (strcmp(mode, "local") == 0)
				ec.kvtier_mode = KVCLIENT_LOCAL;
			else if (strcmp(mode, "remote") == 0)
				ec.kvtier_mode = KVCLIENT_REMOTE;
			else
				return die("--kvtier-mode %s: expected auto, local or remote",
				           optarg);
			break;
		case OPT_SLOT_DIR:
			ec.slot_dir = optarg;
			break;
		case OPT_MODEL_FILE:
			ec.model_file = optarg;
			break;
		case OPT_CACHE_TYPE_K:
		case OPT_CACHE_TYPE_V:
			if (!type_ok(optarg))
				return die("--%s %s: expected a type name such as f16 or q8_0",
				           rc == OPT_CACHE_TYPE_K ? "cache-type-k" : "cache-type-v",
				           optarg);
			if (rc == OPT_CACHE_TYPE_K)
				ec.kv.type_k = optarg;
			else
				ec.kv.type_v = optarg;
			break;
		case OPT_FLASH_ATTN:
			ec.kv.flash_attn = 1;
			break;
		case OPT_NAMESPACE:
			if (!optarg[0] || strlen(optarg) > 255)
				return die("--namespace: 1 to 255 bytes");
			ec.ns_override = optarg;
			break;
		case OPT_BREAK_EVEN:
			if (options_parse_uint(optarg, 1, 1000000, &ec.break_even))
				return die("--break-even-tokens %s: expected 1..1000000", optarg);
			break;
		case OPT_TIMEOUT_MS:
			if (options_parse_uint(optarg, 1000, 86400000, &ec.timeout_ms))
				return die("--timeout-ms %s: expected 1000..86400000", optarg);
			break;
		case OPT_SLOT_TIMEOUT_MS:
			if (options_parse_uint(optarg, 100, 3600000, &ec.slot_timeout_ms))
				return die("--slot-timeout-ms %s: expected 100..3600000", optarg);
			break;
		case OPT_HEALTH_MS:
			if (options_parse_uint(optarg, 100, 60000, &ec.health_ms))
				return die("--health-interval-ms %s: expected 100..60000", optarg);
			break;
		case OPT_SLOT_CHECK_MS:
			if (options_parse_uint(optarg, 0, 3600000, &ec.slot_check_ms))
				return die("--slot-check-ms %s: expected 0..3600000", optarg);
			break;
		case OPT_SERVER_CACHE_RAM:
			if (options_parse_uint(optarg, 0, 16u << 20, &ec.server_cache_ram_mib))
				return die("--server-cache-ram %s: expected 0..16777216 (MiB)", optarg);
			break;
		case OPT_SERVER_CACHE_IDLE:
			if (!strcmp(optarg, "on"))
				ec.server_cache_idle_slots = 1;
			else if (!strcmp(optarg, "off"))
				ec.server_cache_idle_slots = 0;
			else
				return die("--server-cache-idle-slots %s: expected on or off", optarg);
			break;
		case OPT_SAVE_WORKERS:
			if (options_parse_uint(optarg, 1, 8, &ec.save_workers))
				return die("--save-workers %s: expected 1..8", optarg);
			break;
		case OPT_MAX_REQUEST_SIZE:
			if (options_parse_size(optarg, &size) || size < 1024 || size > SIZE_MAX ||
			    (pc.max_request_bytes = (size_t)size) == 0)
				return die("--max-request-size %s: expected a size such as 64M",
				           optarg);
			break;
		case OPT_MAX_INFLIGHT_BODY:
			if (options_parse_size(optarg, &size) || size < 1024 || size > SIZE_MAX / 2)
				return die("--max-inflight-body-bytes %s: expected a size such as 256M",
				           optarg);
			pc.max_inflight_body_bytes = (size_t)size;
			break;
		case OPT_MAX_CONNECTIONS:
			if (options_parse_uint(optarg, 1, 65536, &pc.max_connections))
				return die("--max-connections %s: expected 1..65536", optarg);
			break;
		case OPT_IDLE_TIMEOUT:
			if (options_parse_uint(optarg, 1, 86400, &pc.idle_timeout_s))
				return die("--idle-timeout-s %s: expected 1..86400", optarg);
			break;
		case OPT_REQUEST_TIMEOUT:
			if (options_parse_uint(optarg, 1, 86400, &pc.request_timeout_s))
				return die("--request-timeout-s %s: expected 1..86400", optarg);
			break;
		case OPT_MAX_CONNECTIONS_PER_IP:
			if (options_parse_uint(optarg, 0, 65536, &pc.max_connections_per_ip))
				return die("--max-connections-per-ip %s: expected 0..65536", optarg);
			break;
		case OPT_LOG_LEVEL:
			if (log_level_parse(optarg) < 0)
				return die("--log-level %s: expected error, warn, info or debug",
				           optarg);
			log_threshold = log_level_parse(optarg);
			break;
		case OPT_HELP:
			usage(stdout);
			return 0;
		case OPT_HELP_MARKDOWN:
			options_markdown(stdout, options, N_OPTIONS);
			return 0;
		case OPT_VERSION:
			printf("kvtier-llama %s\n", KVTIER_VERSION);
			return 0;
		default:
			fprintf(stderr, "Try 'kvtier-llama --help'.\n");
			return 2;
		}
	}
	if (optind < argc)
		return die("unexpected argument: %s (options start with --; see --help)",
		           argv[optind]);
	if (n_backends == 0)
		return die("give at least one --backend URL (a llama-server)");
	if (pc.max_inflight_body_bytes < pc.max_request_bytes + 1)
		return die("--max-inflight-body-bytes %zu is smaller than --max-request-size %zu: "
		           "no request of the largest size could ever be taken; raise it",
		           pc.max_inflight_body_bytes, pc.max_request_bytes);
	if (!ec.kvtier_address)
		return die("give --kvtier ADDRESS: unix:PATH of kvtierd's socket, or HOST:PORT");
	if (!ec.slot_dir)
		return die("give --slot-dir DIR: the backends' --slot-save-path");
	if (stat(ec.slot_dir, &st) < 0 || !S_ISDIR(st.st_mode))
		return die("--slot-dir %s: not a directory", ec.slot_dir);
	if (access(ec.slot_dir, R_OK | W_OK | X_OK) < 0)
		return die("--slot-dir %s: need read and write access: %s", ec.slot_dir,
		           strerror(errno));
	is_tcp = strncmp(ec.kvtier_address, "unix:", 5) != 0 && ec.kvtier_address[0] != '/';
	if (tls_name && !tls_ca)
		return die("--kvtier-tls-server-name goes with --kvtier-tls-ca (the CA file that "
			   "signed kvtierd's certificate)");
	if (tls_ca && !is_tcp)
		return die("--kvtier-tls-ca is for a HOST:PORT --kvtier address (kvtierd --listen "
			   "with --tls-cert); the Unix socket %s needs neither TLS nor a token",
			   ec.kvtier_address);
	if (is_tcp && !token_file)
		klog(LOG_WARN,
		     "event=kvtier_no_token address=%s hint=\"kvtierd refuses TCP calls "
		     "without a token: give --kvtier-token-file\"",
		     ec.kvtier_address);
	if (is_tcp && !tls_ca)
		klog(LOG_WARN,
		     "event=kvtier_plaintext address=%s hint=\"kvtierd is reached without TLS: "
		     "the token and every blob cross the network in clear; serve kvtierd's --listen "
		     "with --tls-cert and give --kvtier-tls-ca (docs/kvtier-llama.md, remote "
		     "setup) unless this network is trusted\"",
		     ec.kvtier_address);
	ec.kvtier_tls_ca = tls_ca;
	ec.kvtier_tls_name = tls_name;
	if (token_file) {
		rc = read_token(token_file, token, sizeof(token));
		if (rc)
			return die("--kvtier-token-file %s: %s (the first line must be the token)",
			           token_file, strerror(-rc));
		ec.kvtier_token = token;
	}
	if (api_key_file) {
		rc = read_token(api_key_file, api_key, sizeof(api_key));
		if (rc)
			return die("--api-key-file %s: %s (the first line must be the key)",
			           api_key_file, strerror(-rc));
		pc.api_key = api_key;
	}
	if (backend_key_file) {
		rc = read_token(backend_key_file, backend_key, sizeof(backend_key));
		if (rc == 0 && backend_set_api_key(backend_key) != 0)
			rc = -EINVAL;
		if (rc)
			return die("--backend-api-key-file %s: %s (the first line must be the key: "
			           "printable ASCII, at most %u bytes)",
			           backend_key_file, strerror(-rc), BACKEND_KEY_MAX);
	}
	ec.backends = backend_ptrs;
	ec.n_backends = n_backends;

	/* Signals are taken by sigwait() in this thread only; every thread
	 * started from here on inherits the mask. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);

	if (backend_global_init() != 0)
		return die("libcurl failed to start");
	rc = engine_start(&ec, &engine, err, sizeof(err));
	if (rc) {
		fprintf(stderr, "kvtier-llama: %s\n", err);
		rc = 1;
		goto out;
	}
	rc = proxy_start(&pc, engine, &proxy, err, sizeof(err));
	if (rc) {
		fprintf(stderr, "kvtier-llama: %s\n", err);
		rc = 1;
		goto out;
	}
	klog(LOG_INFO,
	     "event=ready version=%s pid=%d listen=%s backends=%u kvtier=%s kvtier_tls=%s "
	     "slot_dir=%s break_even=%u timeout_ms=%u slot_timeout_ms=%u",
	     KVTIER_VERSION, (int)getpid(), pc.listen, n_backends, ec.kvtier_address,
	     tls_ca ? "on" : "off", ec.slot_dir,
	     ec.break_even, ec.timeout_ms, ec.slot_timeout_ms);
	for (;;) {
		if (sigwait(&sigs, &sig))
			continue;
		if (sig == SIGHUP) {
			klog(LOG_INFO,
			     "event=sighup action=none hint=\"restart to change options\"");
			continue;
		}
		break;
	}
	klog(LOG_INFO, "event=stopping signal=%d", sig);
	rc = 0;
out:
	if (engine)
		engine_begin_stop(engine);
	proxy_stop(proxy);
	engine_stop(engine);
	backend_global_cleanup();
	if (rc == 0)
		klog(LOG_INFO, "event=stopped");
	return rc;
}
