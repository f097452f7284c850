#!/usr/bin/env node
// llama_real.mjs: the llama-server test double on the real llama.cpp library.
//
// llama-server's HTTP API (the parts kvtier-llama uses, in the shapes of
// ../llama_double.py) in front of the llama.cpp library v0.4.0 that npm's
// node-llama-cpp 3.21.1 ships prebuilt: tokenization, chat template (llama.cpp's
// own Jinja engine), prefill, sampling, the slots' KV cache (one sequence per
// slot in one context), context checkpoints and the slot files
// (llama_state_seq_save_file / llama_state_seq_load_file) are the library's.
// What is llama-server's own logic (tools/server/server-context.cpp of the
// v0.4.0 tree) is written out here: slot choice, prompt reuse (common prefix,
// the pos_min rule of sliding-window and recurrent memories, checkpoints),
// the batch loop, the slot actions and their answers. See ../README.md,
// "The real-engine mode".
//
// Usage: node llama_real.mjs -m MODEL.gguf --host 127.0.0.1 --port 0
//            --slot-save-path DIR [-np N] [-c CTX] [--swa-full] [-fa on|off|auto] ...
//        node llama_real.mjs --check [-m MODEL.gguf]   (can the library run here?)
// Prints "listening on http://HOST:PORT" when ready. Listens on loopback only.
// Stop it with SIGTERM to its PID.

import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import crypto from "node:crypto";
import {fileURLToPath} from "node:url";

// ---------------------------------------------------------------------------
// constants of the real server

const LLAMA_STATE_SEQ_MAGIC = 0x67677371;
const LLAMA_TOKEN_NULL = -1;
const SERVER_TOKENS_STATE_VERSION = 1;      // server-common.cpp
const DEFAULT_OAICOMPAT_MODEL = "gpt-3.5-turbo";
const RESTORE_FAILED = "Unable to restore slot: ";
const RESTORE_NO_SPACE = "No available space in KV cache or invalid slot save file";
const CTX_EXCEEDED = "request (%d tokens) exceeds the available context size (%d tokens), try increasing it";
const EMPTY_JSON = "[json.exception.parse_error.101] parse error at line 1, column 1: attempting to " +
    "parse an empty input; check that your input string or stream contains the expected JSON";
const PUBLIC_PATHS = new Set(["/health", "/v1/health"]);  // v0.4.0 server-http.cpp
// llama.h token attributes
const ATTR_UNKNOWN = 1 << 0, ATTR_NORMAL = 1 << 2, ATTR_CONTROL = 1 << 3,
    ATTR_USER_DEFINED = 1 << 4, ATTR_BYTE = 1 << 5;
const GGML_TYPES = {f32: 0, f16: 1, q4_0: 2, q4_1: 3, q5_0: 6, q5_1: 7, q8_0: 8, bf16: 30};

// bounds
const MAX_BODY = 64 << 20;
const MAX_SLOTS = 64;
const MAX_QUEUE = 4096;
const MAX_CTX = 1 << 20;

const STATE = {IDLE: 0, STARTED: 1, PROCESSING_PROMPT: 2, DONE_PROMPT: 3, GENERATING: 4};
const STOP = {NONE: "none", EOS: "eos", WORD: "word", LIMIT: "limit"};

// ---------------------------------------------------------------------------
// options

function usage(msg) {
  if (msg) process.stderr.write("llama_real: " + msg + "\n");
  process.stderr.write(
      "usage: node llama_real.mjs -m MODEL.gguf [--host 127.0.0.1] [--port N] [--slot-save-path DIR]\n" +
      "  [-np N] [-c CTX] [-b N] [-ub N] [-fa on|off|auto] [--swa-full] [-ctk T] [-ctv T]\n" +
      "  [-ctxcp N] [-cms N] [-sps F] [-n N] [--temp T] [-s SEED] [-t THREADS]\n" +
      "  [--token-form packed|plain] [--cache-ram 0] [--slots|--no-slots] [--api-key K[,K]]\n" +
      "  [-a ALIAS] [--verbose]\n" +
      "       node llama_real.mjs --check [-m MODEL.gguf]\n");
  process.exit(2);
}

function parseArgs(argv) {
  const o = {
    host: "127.0.0.1", port: 8080, slotSavePath: null, model: null, alias: null,
    parallel: 1, ctx: 4096, batch: 2048, ubatch: 512, flashAttn: "auto", swaFull: false,
    ctk: null, ctv: null, ctxCheckpoints: 32, checkpointMinStep: 8192, similarity: 0.1,
    nPredict: -1, temp: 0.8, seed: -1, threads: 1, tokenForm: "packed", slots: true,
    apiKeys: [], verbose: false, check: false,
  };
  const num = (v, name, lo, hi) => {
    const x = Number(v);
    if (v === undefined || !Number.isFinite(x) || x < lo || x > hi) usage(`${name}: expected a number in ${lo}..${hi}`);
    return x;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    switch (a) {
      case "--host": o.host = next(); break;
      case "--port": o.port = num(next(), a, 0, 65535); break;
      case "--slot-save-path": o.slotSavePath = next(); break;
      case "-m": case "--model": o.model = next(); break;
      case "-a": case "--alias": case "--model-name": o.alias = next(); break;
      case "-np": case "--parallel": o.parallel = num(next(), a, -1, MAX_SLOTS); break;
      case "-c": case "--ctx-size": o.ctx = num(next(), a, 0, MAX_CTX); break;
      case "-b": case "--batch-size": o.batch = num(next(), a, 32, 1 << 16); break;
      case "-ub": case "--ubatch-size": o.ubatch = num(next(), a, 32, 1 << 16); break;
      case "-fa": case "--flash-attn": {
        const v = i + 1 < argv.length && !argv[i + 1].startsWith("-") ? next() : "on";
        if (!["on", "off", "auto"].includes(v)) usage("-fa: on, off or auto");
        o.flashAttn = v;
        break;
      }
      case "--no-flash-attn": o.flashAttn = "off"; break;
      case "--swa-full": o.swaFull = true; break;
      case "-ctk": case "--cache-type-k": o.ctk = next(); break;
      case "-ctv": case "--cache-type-v": o.ctv = next(); break;
      case "-ctxcp": case "--ctx-checkpoints": case "--swa-checkpoints": o.ctxCheckpoints = num(next(), a, 0, 1024); break;
      case "-cms": case "--checkpoint-min-step": o.checkpointMinStep = num(next(), a, 0, 1 << 30); break;
      case "-sps": case "--slot-prompt-similarity": o.similarity = num(next(), a, 0, 1); break;
      case "-n": case "--n-predict": o.nPredict = num(next(), a, -1, 1 << 30); break;
      case "--temp": o.temp = num(next(), a, -10, 100); break;
      case "-s": case "--seed": o.seed = num(next(), a, -1, 4294967295); break;
      case "-t": case "--threads": o.threads = num(next(), a, 1, 1024); break;
      case "--token-form": o.tokenForm = next(); if (!["packed", "plain"].includes(o.tokenForm)) usage("--token-form: packed or plain"); break;
      case "-cram": case "--cache-ram": {
        const v = num(next(), a, -1, 1 << 30);
        if (v !== 0) usage("--cache-ram: only 0 (the RAM prompt cache is not modelled on the real engine; the simulated double has it)");
        break;
      }
      case "--no-cache-idle-slots": case "--cache-idle-slots": break;  // needs the RAM cache: off
      case "-kvu": case "--kv-unified":
        usage("-kvu: a unified KV cache is not reachable through node-llama-cpp's context (kv_unified is always false): use the simulated double");
        break;
      case "-no-kvu": case "--no-kv-unified": break;
      case "--slots": case "--slots-endpoint": o.slots = true; break;
      case "--no-slots": o.slots = false; break;
      case "--api-key": o.apiKeys = next().split(",").filter((k) => k); break;
      case "--no-context-shift": break;  // the default
      case "--jinja": break;              // the default
      case "--verbose": case "-v": o.verbose = true; break;
      case "--check": o.check = true; break;
      case "-h": case "--help": usage();
      default: usage(`unknown option ${a}`);
    }
  }
  if (o.parallel === -1 || o.parallel === 0) {
    usage("-np: auto slots (4 slots, unified KV) are not reachable through node-llama-cpp: give -np N");
  }
  if (!["127.0.0.1", "::1", "localhost"].includes(o.host)) usage("--host: loopback only (127.0.0.1, ::1, localhost)");
  if (o.ctx === 0) usage("-c 0 (the model's training context) is not supported here: give -c N");
  for (const t of [o.ctk, o.ctv]) if (t !== null && !(t in GGML_TYPES)) usage(`cache type ${t}: one of ${Object.keys(GGML_TYPES).join(", ")}`);
  if (!o.check && !o.model) usage("-m MODEL.gguf is required");
  return o;
}

const opts = parseArgs(process.argv.slice(2));
const log = (...a) => { if (opts.verbose) process.stderr.write("llama_real: " + a.join(" ") + "\n"); };

// ---------------------------------------------------------------------------
// the library

let llama, model, am, B;
try {
  const nlc = await import("node-llama-cpp");
  llama = await nlc.getLlama({gpu: false, build: "never", logLevel: opts.verbose ? "warn" : "error",
                              progressLogs: false});
  B = llama._bindings;
  if (!B || typeof B.AddonContext !== "function") throw new Error("node-llama-cpp has no AddonContext binding");
  if (opts.model) {
    model = await llama.loadModel({modelPath: opts.model});
    am = model._model;
  }
} catch (e) {
  process.stderr.write(`llama_real: the llama.cpp library cannot run here: ${e && e.message || e}\n`);
  process.exit(3);
}
let NLC_VERSION = "?";
try {
  NLC_VERSION = JSON.parse(fs.readFileSync(path.join(path.dirname(
      fileURLToPath(import.meta.resolve("node-llama-cpp"))), "..", "package.json"), "utf8")).version;
} catch { /* only a label */ }
const LIB = `llama.cpp ${llama.llamaCppRelease?.release ?? "?"} (node-llama-cpp ${NLC_VERSION})`;
if (opts.check) {
  if (model) {
    const c = new B.AddonContext(am, {contextSize: 256, batchSize: 32, sequences: 1});
    if (!await c.init()) { process.stderr.write("llama_real: cannot create a context\n"); process.exit(3); }
    await c.dispose();
  }
  process.stdout.write(`ok: ${LIB}\n`);
  process.exit(0);
}

// The build_info of the llama-server built from the same tree: the v0.4.0 bundle is
// one squashed commit (80fb11a), so its build number is 1 (common/build-info.cpp.in).
const BUILD_INFO = llama.llamaCppRelease?.release === "v0.4.0" ? "b1-80fb11a" : "b1-unknown";

const meta = model.fileInfo.metadata;
const arch = meta.general.architecture;
const N_VOCAB = (meta.tokenizer?.ggml?.tokens ?? []).length || 32000;
const N_SWA_MODEL = model.fileInsights.swaSize ?? 0;
// server_context_meta::model_name: the alias, else the -m path as given
const MODEL_NAME = opts.alias ?? opts.model;
const CHAT_TEMPLATE = meta.tokenizer?.chat_template ?? "";
const BOS = am.tokenBos(), EOS = am.tokenEos();
const VOCAB_TYPE = am.getVocabularyType();   // 1: SPM
const IS_SPM = VOCAB_TYPE === 1;

let ctx;
{
  const p = {contextSize: opts.ctx, batchSize: opts.ubatch, sequences: opts.parallel,
             flashAttention: opts.flashAttn === "auto" ? "auto" : opts.flashAttn === "on",
             swaFullCache: opts.swaFull};
  p.threads = opts.threads;
  if (opts.ctk) p.kvCacheKeyType = GGML_TYPES[opts.ctk];
  if (opts.ctv) p.kvCacheValueType = GGML_TYPES[opts.ctv];
  ctx = new B.AddonContext(am, p);
  if (!await ctx.init()) {
    process.stderr.write("llama_real: llama_init_from_model failed\n");
    process.exit(1);
  }
}
// llama_context: n_ctx padded to 256; without kv_unified each sequence gets n_ctx / n_seq_max
const N_CTX = ctx.getContextSize();
const N_CTX_SLOT = Math.min(Math.floor(N_CTX / opts.parallel), model.trainContextSize ?? Infinity);
// the physical batch is n_ubatch (the addon makes n_batch = n_ubatch); the server's
// logical batch (-b) is cut into physical ones as llama_decode would
const N_UBATCH = Math.min(opts.ubatch, N_CTX);
const N_BATCH = Math.max(N_UBATCH, Math.min(opts.batch, N_CTX));
// server_context::load_model: n_swa = swa_full ? 0 : llama_model_n_swa
const N_SWA = opts.swaFull ? 0 : N_SWA_MODEL;

// common_context_can_seq_rm: decode 2 tokens, try to remove the last one
let SEQ_RM_TYPE = "part";
{
  ctx.initBatch(2);
  ctx.addToBatch(0, 0, Uint32Array.from([0, 0]), Uint32Array.from([]));
  await ctx.decodeBatch();
  if (!ctx.removeTokenCellsFromSequence(0, 1, -1)) SEQ_RM_TYPE = "full";
  ctx.removeTokenCellsFromSequence(0, -1, -1);
}

// ---------------------------------------------------------------------------
// tokens and text

function tokenize(text, addSpecial, parseSpecial) {
  // common_tokenize(vocab, text, add_special, parse_special): for the SPM and BPE
  // vocabularies add_special only adds BOS (and EOS) around the same tokens
  const t = Array.from(am.tokenize(text, parseSpecial));
  if (addSpecial && am.shouldPrependBosToken()) t.unshift(BOS);
  if (addSpecial && am.shouldAppendEosToken()) t.push(EOS);
  return t;
}

const pieceCache = new Map();
// common_token_to_piece(vocab, token, special) as bytes (llama_vocab::token_to_piece)
function pieceBytes(tok, special) {
  const key = tok * 2 + (special ? 1 : 0);
  let b = pieceCache.get(key);
  if (b) return b;
  if (IS_SPM) {
    const attr = am.getTokenAttributes(tok);
    const text = am.getTokenString(tok);
    if (attr & ATTR_NORMAL) b = Buffer.from(text.replaceAll("\u2581", " "), "utf8");
    else if (attr & ATTR_BYTE) b = Buffer.from([parseInt(text.slice(3, 5), 16)]);
    else if (attr & ATTR_UNKNOWN) b = Buffer.from("\u2585", "utf8");
    else if (attr & ATTR_CONTROL) b = special ? Buffer.from(text, "utf8") : Buffer.alloc(0);
    else if (attr & ATTR_USER_DEFINED) b = Buffer.from(text, "utf8");
    else b = Buffer.alloc(0);
  } else {
    // other vocabularies: the library's detokenizer, after a token that leaves no text
    b = Buffer.from(am.detokenize(Uint32Array.from([tok]), special), "utf8");
  }
  if (pieceCache.size < 200000) pieceCache.set(key, b);
  return b;
}

function piecesText(tokens, special) {
  return Buffer.concat(tokens.map((t) => pieceBytes(t, special))).toString("utf8");
}

// the longest prefix of buf that is complete UTF-8 (validate_utf8 of server-common.cpp)
function utf8Complete(buf) {
  const n = buf.length;
  for (let k = 1; k <= Math.min(4, n); k++) {
    const c = buf[n - k];
    if ((c & 0xc0) === 0x80) continue;           // continuation byte
    const need = (c & 0x80) === 0 ? 1 : (c & 0xe0) === 0xc0 ? 2 : (c & 0xf0) === 0xe0 ? 3 : (c & 0xf8) === 0xf0 ? 4 : 1;
    return need > k ? n - k : n;
  }
  return n;
}

// tokenize_mixed (server-common.cpp): a string, or ids and strings
function promptTokens(prompt, addSpecial) {
  if (typeof prompt === "string") return tokenize(prompt, addSpecial, true);
  if (Array.isArray(prompt)) {
    const out = [];
    let first = true;
    for (const p of prompt) {
      if (typeof p === "string") out.push(...tokenize(p, addSpecial && first, true));
      else if (Number.isInteger(p)) out.push(p);
      else throw new HttpError(400, "\"prompt\" must be a string, an list of tokens, a list of mixed strings & tokens, or a list of prompts");
      first = false;
    }
    return out;
  }
  throw new HttpError(400, "\"prompt\" must be a string, an list of tokens, a list of mixed strings & tokens, or a list of prompts");
}

let jinja = null;
function applyTemplate(messages) {
  if (!Array.isArray(messages)) throw new HttpError(500, "Expected 'messages' to be an array");
  const msgs = messages.map((m) => {
    if (m === null || typeof m !== "object") throw new HttpError(500, "Invalid message");
    if (!("content" in m)) throw new HttpError(500, "Missing 'content' (ref: https://github.com/ggml-org/llama.cpp/issues/8367)");
    let c = m.content;
    if (Array.isArray(c)) c = c.filter((p) => p && typeof p === "object" && "text" in p).map((p) => "\n" + p.text).join("");
    else if (c === null) c = "";
    else if (typeof c !== "string") throw new HttpError(500, "Invalid 'content' type (ref: https://github.com/ggml-org/llama.cpp/issues/8367)");
    return {role: String(m.role ?? ""), content: c};
  });
  if (!jinja) jinja = new B.AddonJinjaRenderer(CHAT_TEMPLATE);
  return jinja.render({messages: msgs, add_generation_prompt: true,
                       bos_token: piecesText([BOS], true), eos_token: piecesText([EOS], true)});
}

// the message spans of a chat prompt (common_chat_msg_delimiters::split), from the
// user and assistant starts the autoparser finds in a ChatML template
const DELIMS = [["assistant", "<|im_start|>assistant"], ["user", "<|im_start|>user"]]
    .map(([role, d]) => ({role, tokens: tokenize(d, false, true)}));
function messageSpans(tokens) {
  const starts = [];
  for (let i = 0; i < tokens.length; i++) {
    for (const d of DELIMS) {
      if (i + d.tokens.length > tokens.length) continue;
      let ok = true;
      for (let k = 0; k < d.tokens.length && ok; k++) ok = tokens[i + k] === d.tokens[k];
      if (ok) { starts.push({role: d.role, pos: i}); break; }
    }
  }
  return starts;
}

function commonPrefix(a, b) {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

// ---------------------------------------------------------------------------
// errors and JSON

class HttpError extends Error {
  constructor(code, message, type, extra) {
    super(message);
    this.code = code;
    this.type = type ?? ({400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                          500: "server_error", 501: "not_supported_error", 503: "unavailable_error"}[code] ?? "server_error");
    this.extra = extra ?? {};
  }
  body() { return {error: {code: this.code, message: this.message, type: this.type, ...this.extra}}; }
}

const nan = (x) => (Number.isFinite(x) ? x : null);   // nlohmann writes NaN as null

function timingsJson(st) {
  const div = (a, b) => (b ? a / b : NaN);
  return {
    cache_n: st.nCached,
    prompt_n: st.nProcessed,
    prompt_ms: st.promptMs,
    prompt_per_token_ms: nan(div(st.promptMs, st.nProcessed)),
    prompt_per_second: nan(div(1e3, st.promptMs) * st.nProcessed),
    predicted_n: st.nDecoded,
    predicted_ms: st.genMs,
    predicted_per_token_ms: nan(div(st.genMs, st.nDecoded)),
    predicted_per_second: nan(div(1e3, st.genMs) * st.nDecoded),
  };
}

function paramsJson(p) {
  p = p ?? {};
  return {
    n_predict: p.n_predict ?? -1, seed: p.seed ?? 4294967295, temperature: p.temperature ?? opts.temp,
    dynatemp_range: 0.0, dynatemp_exponent: 1.0, top_k: p.top_k ?? 40, top_p: p.top_p ?? 0.95,
    min_p: p.min_p ?? 0.05, xtc_probability: 0.0, xtc_threshold: 0.1, typical_p: 1.0,
    repeat_last_n: p.repeat_last_n ?? 64, repeat_penalty: p.repeat_penalty ?? 1.0,
    presence_penalty: p.presence_penalty ?? 0.0, frequency_penalty: p.frequency_penalty ?? 0.0,
    dry_multiplier: 0.0, dry_base: 1.75, dry_allowed_length: 2, dry_penalty_last_n: N_CTX_SLOT,
    mirostat: 0, mirostat_tau: 5.0, mirostat_eta: 0.1, stop: p.stop ?? [], max_tokens: p.n_predict ?? -1,
    n_keep: 0, n_discard: 0, ignore_eos: !!p.ignore_eos, stream: !!p.stream, n_probs: 0, min_keep: 0,
    chat_format: "peg-native", samplers: ["penalties", "dry", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"],
    "speculative.n_max": 16, "speculative.n_min": 0, "speculative.p_min": 0.75,
    timings_per_token: false, post_sampling_probs: false, lora: [],
  };
}

function validateFilename(name) {
  // common/common.cpp fs_validate_filename (allow_subdirs false)
  if (typeof name !== "string" || name.length === 0) return false;
  if (Buffer.byteLength(name, "utf8") > 255) return false;
  for (const ch of name) {
    const c = ch.codePointAt(0);
    if (c <= 0x1f || c === 0x7f || (c >= 0x80 && c <= 0x9f) || c === 0xff0e || c === 0x2215 || c === 0x2216 ||
        (c >= 0xd800 && c <= 0xdfff) || c === 0xfffd || c === 0xfeff || '/\\:*?"<>|'.includes(ch)) return false;
  }
  if (name[0] === " " || name.endsWith(" ") || name.endsWith(".")) return false;
  if (name.includes("..") || name === ".") return false;
  return true;
}

// ---------------------------------------------------------------------------
// slots and the task loop (server_context)

const counters = {
  requests: 0, completions: 0, prefilled_tokens: 0, generated_tokens: 0, saves: 0, saves_failed: 0,
  restores: 0, restores_failed: 0, erases: 0, slots_reads: 0, checkpoints_created: 0,
  checkpoints_used: 0, full_reprocess: 0, decode_errors: 0,
};

class Slot {
  constructor(id) {
    this.id = id;
    this.nCtx = N_CTX_SLOT;
    this.state = STATE.IDLE;
    this.tokens = [];          // slot.prompt.tokens: what the sequence's memory holds
    this.checkpoints = [];     // {idTask, nTokens, posMin, posMax, cp}
    this.task = null;
    this.taskPrev = null;
    this.tLastUsed = -1;
    this.iBatch = -1;
    this.sampled = 0;
    this.lastPromptN = 0;
    this.lastTokensEvaluated = 0;
    this.lastCacheN = 0;
    this.lastGenerated = [];
  }
  processing() { return this.state !== STATE.IDLE; }
}

const slots = Array.from({length: opts.parallel}, (_, i) => new Slot(i));
let nextTaskId = 0;
const queue = [];
const deferred = [];
let wakeLoop = null;
let stopping = false;

function post(task, front = false) {
  task.id = nextTaskId++;
  if (queue.length + deferred.length >= MAX_QUEUE) throw new HttpError(503, "too many pending tasks");
  if (front) queue.unshift(task); else queue.push(task);
  if (wakeLoop) { const w = wakeLoop; wakeLoop = null; w(); }
  return task;
}

function popDeferred(idSlot) {
  if (!deferred.length) return;
  let i = deferred.findIndex((t) => t.idSlot === idSlot);
  if (i < 0) i = 0;
  queue.unshift(deferred.splice(i, 1)[0]);
}

async function promptClear(s) {
  // server_slot::prompt_clear: memory, tokens and checkpoints
  ctx.removeTokenCellsFromSequence(s.id, -1, -1);
  s.tokens = [];
  dropCheckpoints(s, () => true);
}

function dropCheckpoints(s, pred) {
  const keep = [];
  for (const c of s.checkpoints) {
    if (pred(c)) c.cp.dispose(); else keep.push(c);
  }
  s.checkpoints = keep;
}

function release(s) {
  if (!s.processing()) return;
  s.tLastUsed = process.hrtime.bigint();
  s.state = STATE.IDLE;
  if (s.sampler) { s.sampler.dispose(); s.sampler = null; }
  s.taskPrev = s.task;
  s.task = null;
  popDeferred(s.id);
}

// get_available_slot (no RAM prompt cache: --cache-ram 0)
function getAvailableSlot(task) {
  let ret = null;
  if (task.idSlot !== -1) ret = slotById(task.idSlot);
  if (opts.similarity !== 0) {
    let best = 0;
    for (const s of slots) {
      if (task.idSlot !== -1 && s.id !== task.idSlot) continue;
      if (s.processing() || !s.tokens.length) continue;
      const f = commonPrefix(s.tokens, task.tokens) / task.tokens.length;
      if (f > best && f > opts.similarity) { best = f; ret = s; }
    }
  }
  if (ret === null) {
    let tLast = -1n;
    for (const s of slots) {
      if (s.processing()) continue;
      const t = BigInt(s.tLastUsed);
      if (ret === null || t <= tLast) { tLast = t; ret = s; }
    }
  }
  return ret;
}

function slotById(id) {
  // get_slot_by_id: `id_slot % slots.size()` converts the int to size_t, so every id
  // maps to a slot: 5 is slot 1 of 4, -1 is slot 3 of 4 (2^64 - 1 mod 4)
  const k = Number(((BigInt(id) % 2n ** 64n) + 2n ** 64n) % 2n ** 64n % BigInt(slots.length));
  return slots[k];
}

async function processTask(t) {
  if (t.cancelled) return;
  switch (t.type) {
    case "completion": {
      const s = getAvailableSlot(t);
      if (!s || s.processing()) { deferred.push(t); return; }
      launch(s, t);
      return;
    }
    case "save": case "restore": case "erase": {
      const s = slotById(t.idSlotAction);
      if (!s) { t.reject(new HttpError(400, "Invalid slot ID")); return; }
      if (s.processing()) { deferred.push(t); return; }
      try {
        t.resolve(await slotAction(s, t));
      } catch (e) {
        t.reject(e);
      }
      return;
    }
  }
}

function launch(s, t) {
  s.task = t;
  s.state = STATE.STARTED;
  s.nDecoded = 0;
  s.generated = [];
  s.genBytes = Buffer.alloc(0);
  s.sentBytes = 0;
  s.stop = STOP.NONE;
  s.stoppingWord = "";
  s.truncated = false;
  s.hasNextToken = true;
  s.stats = {nCached: 0, nProcessed: 0, nDecoded: 0, promptMs: 0, genMs: 0, tStart: performance.now(), tPromptEnd: 0};
  counters.completions++;
}

async function slotAction(s, t) {
  const t0 = performance.now();
  if (t.type === "erase") {
    const n = s.tokens.length;
    await promptClear(s);
    counters.erases++;
    return {id_slot: t.idSlotAsked, n_erased: n};
  }
  const filepath = path.join(opts.slotSavePath, t.filename);
  if (t.type === "save") {
    // SERVER_TASK_TYPE_SLOT_SAVE: the serialized server_tokens as the "tokens"
    const words = opts.tokenForm === "packed" ? [LLAMA_TOKEN_NULL, SERVER_TOKENS_STATE_VERSION, s.tokens.length, ...s.tokens, 0] : s.tokens;
    let nwrite = 0;
    try {
      nwrite = await ctx.saveSequenceStateToFile(filepath, s.id, Uint32Array.from(words, (w) => w >>> 0));
    } catch (e) {
      log("save failed:", e.message);
      nwrite = 0;
    }
    if (!nwrite) {
      counters.saves_failed++;
      throw new HttpError(500, "Unable to save slot");
    }
    counters.saves++;
    return {id_slot: t.idSlotAsked, filename: t.filename, n_saved: s.tokens.length, n_written: nwrite,
            timings: {save_ms: performance.now() - t0}};
  }
  // SERVER_TASK_TYPE_SLOT_RESTORE
  counters.restores++;
  let restored, nread;
  try {
    // llama_state_seq_load_file(..., NULL, 0, &n): the header, the count against the file size
    const head = readHeader(filepath);
    if (!head) throw new Error(RESTORE_NO_SPACE);
    let words;
    try {
      words = Array.from(await ctx.loadSequenceStateFromFile(filepath, s.id, Math.max(1, head.n)), (w) => w | 0);
    } catch (e) {
      log("restore: the library refused", t.filename + ":", e.message);
      throw new Error(RESTORE_NO_SPACE);
    }
    nread = head.size;   // the addon does not return n_read: the whole file, for any file the library wrote
    restored = deserializeTokens(words);
    if (restored.length > s.nCtx) throw new Error("Restored prompt does not fit in the slot context");
    if (restored.some((x) => x < 0 || x >= N_VOCAB)) throw new Error("Invalid tokens in slot save file");
  } catch (e) {
    await promptClear(s);
    counters.restores_failed++;
    throw new HttpError(400, RESTORE_FAILED + e.message);
  }
  // slot->prompt.clear(); slot->prompt.tokens = restored
  dropCheckpoints(s, () => true);
  s.tokens = restored;
  return {id_slot: t.idSlotAsked, filename: t.filename, n_restored: restored.length, n_read: nread,
          timings: {restore_ms: performance.now() - t0}};
}

function readHeader(file) {
  let fd;
  try {
    fd = fs.openSync(file, "r");
    const size = fs.fstatSync(fd).size;
    const b = Buffer.alloc(12);
    if (fs.readSync(fd, b, 0, 12, 0) !== 12) return null;
    // the library checks magic and version itself (and logs it); the count against the size here
    const n = b.readUInt32LE(8);
    if (n > Math.floor((size - 12) / 4)) return null;
    return {n, size};
  } catch {
    return null;
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}

// server_tokens::deserialize: a plain list, or the packed form (first word -1)
function deserializeTokens(w) {
  if (!w.length || w[0] !== LLAMA_TOKEN_NULL) return w;
  let i = 1;
  const need = (k) => { if (i + k > w.length) throw new Error("Unexpected end of server tokens state"); };
  need(1);
  if ((w[i++] >>> 0) !== SERVER_TOKENS_STATE_VERSION) throw new Error("Unsupported server tokens state version");
  need(1);
  const n = w[i++] >>> 0;
  need(n);
  const tokens = w.slice(i, i + n);
  i += n;
  need(1);
  const m = w[i++] >>> 0;
  if (m) throw new Error("Cannot restore media tokens without an mmproj");
  if (w.length - i >= 1) throw new Error("Trailing data in server tokens state");
  return tokens;
}

// ---- update_slots -------------------------------------------------------

async function createCheckpoint(s, nTokensCur, posMin, posMax) {
  const idTask = s.task.id;
  let last = -1;
  dropCheckpoints(s, (c) => {
    if (c.idTask !== idTask && last >= 0 && c.nTokens <= last + opts.checkpointMinStep) return true;
    last = c.nTokens;
    return false;
  });
  while (s.checkpoints.length >= opts.ctxCheckpoints) s.checkpoints.shift().cp.dispose();
  const cp = new B.AddonContextSequenceCheckpoint();
  await cp.init(ctx, s.id);   // llama_state_seq_get_data_ext(..., LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)
  s.checkpoints.push({idTask, nTokens: s.tokens.length - nTokensCur, posMin, posMax, cp});
  counters.checkpoints_created++;
  log(`slot ${s.id}: checkpoint n_tokens=${s.tokens.length - nTokensCur} pos=[${posMin},${posMax}] size=${cp.size}`);
}

function sendError(s, err) {
  s.task.sink.error(err);
}

// SLOT_STATE_STARTED: how much of the slot's memory the prompt keeps
async function startPrompt(s) {
  const t = s.task;
  const input = t.tokens;
  s.state = STATE.PROCESSING_PROMPT;
  s.stats.tStart = performance.now();
  if (!input.length) {
    s.lastPromptN = 0;
    s.lastTokensEvaluated = 0;
    finish(s);
    return false;
  }
  if (input.length >= s.nCtx) {
    sendError(s, new HttpError(400, CTX_EXCEEDED.replace("%d", input.length).replace("%d", s.nCtx),
                               "exceed_context_size_error", {n_prompt_tokens: input.length, n_ctx: s.nCtx}));
    release(s);
    return false;
  }
  let nPast = t.cachePrompt ? commonPrefix(s.tokens, input) : 0;
  let posNext = nPast;
  const hasNew = nPast < input.length;
  const thold = Math.max(0, posNext - N_SWA - (hasNew ? 0 : 1));
  if (nPast > 0 && nPast <= s.tokens.length) {
    const posMin = ctx.getSequenceKvCacheMinPosition(s.id);
    if (posMin === -1) {
      process.stderr.write(`llama_real: slot ${s.id}: n_past = ${nPast}, pos_min = -1: ` +
          "GGML_ABORT(\"pos_min == -1, but n_past > 0 - should not happen\"): llama-server aborts here; exiting 134\n");
      process.exit(134);
    }
    if (posMin >= thold) {
      let found = null;
      for (let i = s.checkpoints.length - 1; i >= 0; i--) {
        const c = s.checkpoints[i];
        if (c.posMax > posNext) continue;
        if (c.posMin < thold || c.posMin === 0) { found = c; break; }
      }
      if (found) {
        posNext = Math.min(posNext, Math.max(found.posMin + 1, found.posMax));
        nPast = Math.min(posNext, found.nTokens);
        // load_tgt: llama_state_seq_set_data_ext(PARTIAL_ONLY), then the memory after n_past goes
        const ok = await ctx.restoreCheckpoint(found.cp, nPast - 1);
        if (!ok) log(`slot ${s.id}: checkpoint restore reported a mismatch (continuing, as the server does)`);
        counters.checkpoints_used++;
        log(`slot ${s.id}: restored checkpoint pos=[${found.posMin},${found.posMax}] n_tokens=${found.nTokens} n_past=${nPast}`);
      } else {
        log(`slot ${s.id}: forcing full prompt re-processing (pos_min ${posMin} >= ${thold}, no checkpoint)`);
        counters.full_reprocess++;
        posNext = 0;
        nPast = 0;
      }
    }
  }
  dropCheckpoints(s, (c) => c.posMax > posNext);
  if (nPast === input.length && nPast > 0) nPast--;   // [TAG_PROMPT_LOGITS]
  s.stats.nCached = nPast;
  s.stats.nProcessed = 0;
  s.tokens.length = nPast;
  s.lastPromptN = input.length - nPast;
  s.lastTokensEvaluated = input.length;
  s.lastCacheN = nPast;
  t.sink.start();
  return true;
}

// one iteration of update_slots: build the batch, decode it, sample
async function updateSlots() {
  for (const s of slots) {
    if (s.processing() && s.task.cancelled) release(s);
  }
  if (!slots.some((s) => s.processing())) return;
  const batch = [];   // {seq, tok, pos, out}
  for (const s of slots) {
    if (s.state !== STATE.GENERATING) continue;
    s.iBatch = batch.length;
    batch.push({seq: s.id, tok: s.sampled, pos: s.tokens.length, out: true});
    s.tokens.push(s.sampled);
  }
  for (const s of slots) {
    if (batch.length >= N_BATCH) break;
    if (s.state !== STATE.STARTED && s.state !== STATE.PROCESSING_PROMPT) continue;
    if (s.state === STATE.STARTED && !await startPrompt(s)) continue;
    const t = s.task;
    const input = t.tokens;
    ctx.removeTokenCellsFromSequence(s.id, s.tokens.length, -1);
    let doCheckpoint = opts.ctxCheckpoints > 0 && (SEQ_RM_TYPE === "full" || N_SWA > 0);
    const spans = t.spans;
    const userStarts = spans.filter((x) => x.role === "user").map((x) => x.pos);
    const lastUser = userStarts.length ? userStarts[userStarts.length - 1] : -1;
    const isUserStart = (p) => userStarts.includes(p);
    const nPrev = batch.length;
    while (s.tokens.length < input.length && batch.length < N_BATCH) {
      const tok = input[s.tokens.length];
      batch.push({seq: s.id, tok, pos: s.tokens.length, out: false});
      s.tokens.push(tok);
      if (doCheckpoint && isUserStart(s.tokens.length)) {
        const p = s.tokens.length, cps = s.checkpoints;
        if (p === lastUser || !cps.length || p > cps[cps.length - 1].nTokens + opts.checkpointMinStep) break;
      }
      if (doCheckpoint && [4 + N_UBATCH, 4].some((off) => input.length === s.tokens.length + Math.min(N_BATCH, off))) break;
    }
    const nCur = batch.length - nPrev;
    const nStart = s.tokens.length - nCur;
    const nearEnd = input.length < s.tokens.length + N_UBATCH;
    if (s.tokens.length === input.length) {
      s.state = STATE.DONE_PROMPT;
      batch[batch.length - 1].out = true;
      s.iBatch = batch.length - 1;
    } else if (!isUserStart(nStart) && !nearEnd) {
      doCheckpoint = false;
    }
    const posMin = ctx.getSequenceKvCacheMinPosition(s.id);
    const posMax = ctx.getSequenceKvCacheMaxPosition(s.id);
    if (doCheckpoint && posMin < 0) doCheckpoint = false;
    const cps = s.checkpoints;
    doCheckpoint = doCheckpoint && (!cps.length || nStart === lastUser || nearEnd ||
                                    nStart > cps[cps.length - 1].nTokens + opts.checkpointMinStep);
    if (doCheckpoint) await createCheckpoint(s, nCur, posMin, posMax);
    s.stats.nProcessed += nCur;
    counters.prefilled_tokens += nCur;
  }
  if (!batch.length) return;
  // llama_decode cuts the batch into ubatches; the addon's batch is one ubatch
  for (let off = 0; off < batch.length; off += N_UBATCH) {
    const chunk = batch.slice(off, off + N_UBATCH);
    ctx.initBatch(chunk.length);
    const outIdx = new Map();   // batch index -> logit index
    for (let i = 0; i < chunk.length;) {
      let j = i + 1;
      while (j < chunk.length && chunk[j].seq === chunk[i].seq && chunk[j].pos === chunk[j - 1].pos + 1) j++;
      const run = chunk.slice(i, j);
      const outs = [];
      run.forEach((e, k) => { if (e.out) outs.push(k); });
      const li = ctx.addToBatch(chunk[i].seq, chunk[i].pos, Uint32Array.from(run, (e) => e.tok), Uint32Array.from(outs));
      outs.forEach((k, q) => outIdx.set(off + i + k, li[q]));
      i = j;
    }
    try {
      await ctx.decodeBatch();
    } catch (e) {
      // decode(): a failed decode fails every processing slot and clears its memory
      counters.decode_errors++;
      process.stderr.write(`llama_real: llama_decode failed: ${e.message}\n`);
      for (const s of slots) {
        if (!s.processing()) continue;
        sendError(s, new HttpError(500, "Context size has been exceeded."));
        release(s);
        await promptClear(s);
      }
      return;
    }
    for (const s of slots) {
      if (!s.processing() || s.iBatch < off || s.iBatch >= off + chunk.length) continue;
      if (s.state === STATE.DONE_PROMPT) {
        s.state = STATE.GENERATING;
        s.stats.promptMs = performance.now() - s.stats.tStart;
        s.stats.tPromptEnd = performance.now();
        s.sampler = makeSampler(s.task.params);
      } else if (s.state !== STATE.GENERATING) {
        continue;
      }
      const tok = await ctx.sampleToken(outIdx.get(s.iBatch), s.sampler);
      s.iBatch = -1;
      processToken(s, tok);
    }
  }
}

function makeSampler(p) {
  const sm = new B.AddonSampler(am);
  const cfg = {temperature: p.temperature};
  if (p.temperature > 0) {
    if (p.top_k > 0) cfg.topK = p.top_k;
    if (p.top_p < 1) cfg.topP = p.top_p;
    if (p.min_p > 0) cfg.minP = p.min_p;
    cfg.seed = p.seed >= 0 && p.seed !== 4294967295 ? p.seed : crypto.randomInt(0, 2 ** 31);
  }
  sm.applyConfig(cfg);
  return sm;
}

// process_token
function processToken(s, tok) {
  const t = s.task;
  s.sampled = tok;
  s.nDecoded++;
  s.stats.nDecoded = s.nDecoded;
  s.generated.push(tok);
  counters.generated_tokens++;
  const eog = am.isEogToken(tok);
  if (!eog || t.params.ignore_eos) s.genBytes = Buffer.concat([s.genBytes, pieceBytes(tok, false)]);
  // stop strings: the full stop at the end of the text
  const complete = utf8Complete(s.genBytes);
  let text = s.genBytes.subarray(0, complete).toString("utf8");
  if (t.params.stop.length) {
    for (const w of t.params.stop) {
      const k = w ? text.indexOf(w) : -1;
      if (k >= 0) {
        s.stop = STOP.WORD;
        s.stoppingWord = w;
        s.hasNextToken = false;
        text = text.slice(0, k);
        s.genBytes = Buffer.from(text, "utf8");
        break;
      }
    }
  }
  if (s.hasNextToken && t.params.n_predict !== -1 && s.nDecoded >= Math.max(1, t.params.n_predict)) {
    s.stop = STOP.LIMIT;
    s.hasNextToken = false;
  }
  if (s.hasNextToken && s.tokens.length + 1 >= s.nCtx) {
    s.truncated = true;
    s.stop = STOP.LIMIT;
    s.hasNextToken = false;
  }
  if (s.hasNextToken && eog && !t.params.ignore_eos) {
    s.stop = STOP.EOS;
    s.hasNextToken = false;
  }
  // partial result: the complete UTF-8 text not sent yet
  if (t.params.stream) {
    const bytes = Buffer.from(text, "utf8");
    if (bytes.length > s.sentBytes || !s.hasNextToken) {
      const piece = bytes.subarray(Math.min(s.sentBytes, bytes.length)).toString("utf8");
      s.sentBytes = Math.max(s.sentBytes, bytes.length);
      if (piece.length || s.hasNextToken) t.sink.partial(s, piece, tok);
    }
  }
  s.text = text;
  if (!s.hasNextToken) finish(s);
}

function finish(s) {
  const st = s.stats;
  if (st.tPromptEnd) st.genMs = performance.now() - st.tPromptEnd;
  s.lastGenerated = s.generated.slice();
  s.task.sink.final(s);
  release(s);
}

async function loop() {
  while (!stopping) {
    while (queue.length && !stopping) await processTask(queue.shift());
    if (stopping) break;
    if (slots.some((s) => s.processing())) {
      await updateSlots();
      await new Promise((r) => setImmediate(r));   // let the HTTP side run between batches
      continue;
    }
    if (!queue.length) await new Promise((r) => { wakeLoop = r; });
  }
}

// ---------------------------------------------------------------------------
// HTTP

function slotJson(s) {
  // server_slot::to_json: the task fields once the slot has had a task
  const out = {id: s.id, n_ctx: s.nCtx, speculative: false, is_processing: s.processing()};
  const pt = s.task ?? s.taskPrev;
  if (pt) {
    Object.assign(out, {
      id_task: pt.id, n_prompt_tokens: s.tokens.length, n_prompt_tokens_processed: s.stats?.nProcessed ?? 0,
      n_prompt_tokens_cache: s.stats?.nCached ?? 0, params: paramsJson(pt.params),
      next_token: [{has_next_token: s.processing() ? s.hasNextToken : false, has_new_line: false,
                    n_remain: pt.params.n_predict === -1 ? -1 : pt.params.n_predict - (s.nDecoded ?? 0),
                    n_decoded: s.nDecoded ?? 0}],
      prompt: pt.promptText ?? "", generated: s.text ?? "",
    });
  }
  return out;
}

function modelMeta() {
  return {vocab_type: VOCAB_TYPE, n_vocab: N_VOCAB, n_ctx: N_CTX_SLOT, n_ctx_train: model.trainContextSize,
          n_embd: am.getEmbeddingVectorSize(), n_params: am.getTotalParameters(), size: am.getModelSize(),
          ftype: meta.general.file_type ?? 0};
}

function sendJson(res, code, obj) {
  const body = Buffer.from(JSON.stringify(obj), "utf8");
  res.writeHead(code, {"Content-Type": "application/json; charset=utf-8", "Content-Length": body.length,
                       "Server": "llama.cpp", "Access-Control-Allow-Origin": ""});
  res.end(body);
}

function parseJson(body) {
  if (!body.length) throw new HttpError(500, EMPTY_JSON);
  try {
    return JSON.parse(body.toString("utf8"));
  } catch (e) {
    throw new HttpError(500, "[json.exception.parse_error.101] parse error: " + e.message);
  }
}

function apiKeyOk(req, p) {
  if (!opts.apiKeys.length || PUBLIC_PATHS.has(p) || p.startsWith("/__double/")) return true;
  let k = req.headers["authorization"] || "";
  if (!k) k = req.headers["x-api-key"] || "";
  if (k.startsWith("Bearer ")) k = k.slice(7);
  return opts.apiKeys.includes(k);
}

function randomId() {
  const a = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
  let s = "chatcmpl-";
  for (let i = 0; i < 32; i++) s += a[crypto.randomInt(0, a.length)];
  return s;
}

async function handleCompletion(req, res, body, oai) {
  if (body === null || typeof body !== "object" || Array.isArray(body)) throw new HttpError(400, "invalid request");
  let promptJson, spans = [];
  if (oai === "chat") {
    if (!("messages" in body)) throw new HttpError(500, "[json.exception.out_of_range.403] key 'messages' not found");
    promptJson = applyTemplate(body.messages);
  } else {
    if (!("prompt" in body)) throw new HttpError(oai === "none" ? 400 : 500, "\"prompt\" is required");
    promptJson = body.prompt;
  }
  if ((body.n ?? 1) !== 1 && oai !== "none") throw new HttpError(500, "Only one completion choice is allowed");
  if (Array.isArray(promptJson) && promptJson.length === 1 && typeof promptJson[0] === "string") promptJson = promptJson[0];
  if (Array.isArray(promptJson) && (promptJson.some((p) => Array.isArray(p)) ||
      (promptJson.length && promptJson.every((p) => typeof p === "string")))) {
    throw new HttpError(400, "llama_real: one prompt per request (multi-prompt requests are not modelled)");
  }
  const tokens = promptTokens(promptJson, true);
  if (tokens.some((x) => x < 0 || x >= N_VOCAB)) throw new HttpError(400, "Prompt contains invalid tokens");
  if (oai === "chat") spans = messageSpans(tokens);
  let nPredict = body.n_predict ?? body.max_tokens ?? body.max_completion_tokens ?? opts.nPredict;
  nPredict = nPredict === null ? -1 : Math.trunc(Number(nPredict));
  if (!Number.isFinite(nPredict) || nPredict < -1) nPredict = -1;
  if (opts.nPredict > 0 && (nPredict === -1 || nPredict > opts.nPredict)) nPredict = opts.nPredict;
  const stop = body.stop === undefined || body.stop === null ? [] : Array.isArray(body.stop) ? body.stop.filter((x) => typeof x === "string") : [String(body.stop)];
  const num = (v, d) => (typeof v === "number" && Number.isFinite(v) ? v : d);
  const params = {
    n_predict: nPredict, stream: !!body.stream, stop, ignore_eos: !!body.ignore_eos,
    temperature: num(body.temperature, opts.temp), top_k: num(body.top_k, 40), top_p: num(body.top_p, 0.95),
    min_p: num(body.min_p, 0.05), seed: num(body.seed, opts.seed >= 0 ? opts.seed : 4294967295),
    return_tokens: !!body.return_tokens,
  };
  const cachePrompt = body.cache_prompt === undefined || body.cache_prompt === null ? true : !!body.cache_prompt;
  let idSlot = body.id_slot ?? -1;
  idSlot = Number.isInteger(idSlot) ? idSlot : -1;
  const modelName = oai === "none" ? (body.model ?? MODEL_NAME) : MODEL_NAME;
  const cmplId = randomId();
  const created = () => Math.floor(Date.now() / 1000);
  const stream = params.stream;
  let headersSent = false;
  let done = false;

  const usage = (s) => ({completion_tokens: s.nDecoded, prompt_tokens: s.task.tokens.length,
                         total_tokens: s.nDecoded + s.task.tokens.length,
                         prompt_tokens_details: {cached_tokens: s.stats.nCached}});
  const includeUsage = !!(body.stream_options && body.stream_options.include_usage);
  const finishReason = (s) => (s.stop === STOP.LIMIT ? "length" : "stop");
  const sse = (obj) => res.write("data: " + JSON.stringify(obj) + "\n\n");

  return new Promise((resolve) => {
    const sink = {
      start() {
        if (stream && !headersSent) {
          headersSent = true;
          res.writeHead(200, {"Content-Type": "text/event-stream", "Server": "llama.cpp",
                              "Access-Control-Allow-Origin": ""});
          res.flushHeaders();
        }
      },
      roleSent: false,
      partial(s, piece, tok) {
        if (done || res.destroyed) return;
        if (!headersSent) this.start();
        if (oai === "none") {
          sse({index: 0, content: piece, tokens: [tok], stop: false, id_slot: -1,
               tokens_predicted: s.nDecoded, tokens_evaluated: s.task.tokens.length});
        } else if (oai === "completion") {
          sse({choices: [{text: piece, index: 0, logprobs: null, finish_reason: null}], created: created(),
               model: modelName, system_fingerprint: BUILD_INFO, object: "text_completion", id: cmplId});
        } else {
          if (!this.roleSent) {
            // the first chat chunk carries the role (server_chat_msg_diff_to_json_oaicompat)
            this.roleSent = true;
            sse({choices: [{finish_reason: null, index: 0, delta: {role: "assistant", content: null}}], created: created(),
                 id: cmplId, model: modelName, system_fingerprint: BUILD_INFO, object: "chat.completion.chunk"});
          }
          sse({choices: [{finish_reason: null, index: 0, delta: {content: piece}}], created: created(),
               id: cmplId, model: modelName, system_fingerprint: BUILD_INFO, object: "chat.completion.chunk"});
        }
      },
      final(s) {
        if (done) return;
        done = true;
        const timings = timingsJson(s.stats);
        const content = s.text ?? "";
        let obj;
        if (oai === "none") {
          obj = {index: 0, content: stream ? "" : content, tokens: params.return_tokens ? s.generated.slice() : [],
                 id_slot: s.id, stop: true, model: modelName, tokens_predicted: s.nDecoded,
                 tokens_evaluated: s.task.tokens.length, generation_settings: paramsJson(params),
                 prompt: s.task.promptText, has_new_line: content.includes("\n"), truncated: s.truncated,
                 stop_type: s.stop === STOP.NONE ? "none" : s.stop, stopping_word: s.stoppingWord,
                 tokens_cached: s.tokens.length, timings};
        } else if (oai === "completion") {
          obj = {choices: [{text: stream ? "" : content, index: 0, logprobs: null, finish_reason: finishReason(s)}],
                 created: created(), model: modelName, system_fingerprint: BUILD_INFO, object: "text_completion",
                 usage: usage(s), id: cmplId, timings};
        } else if (stream) {
          obj = {choices: [{finish_reason: finishReason(s), index: 0, delta: {}}], created: created(), id: cmplId,
                 model: modelName, system_fingerprint: BUILD_INFO, object: "chat.completion.chunk"};
          this.start();
          if (!this.roleSent) {
            this.roleSent = true;
            sse({choices: [{finish_reason: null, index: 0, delta: {role: "assistant", content: null}}], created: created(),
                 id: cmplId, model: modelName, system_fingerprint: BUILD_INFO, object: "chat.completion.chunk"});
          }
          if (includeUsage) {
            sse(obj);
            obj = {choices: [], created: created(), id: cmplId, model: modelName, system_fingerprint: BUILD_INFO,
                   object: "chat.completion.chunk", usage: usage(s)};
          }
          obj.timings = timings;
        } else {
          obj = {choices: [{finish_reason: finishReason(s), index: 0, message: {role: "assistant", content}}],
                 created: created(), model: modelName, system_fingerprint: BUILD_INFO, object: "chat.completion",
                 usage: usage(s), id: cmplId, timings};
        }
        if (!stream) sendJson(res, 200, obj);
        else {
          this.start();
          sse(obj);
          if (oai !== "none") res.write("data: [DONE]\n\n");
          res.end();
        }
        resolve();
      },
      error(err) {
        if (done) return;
        done = true;
        if (!headersSent) sendJson(res, err.code, err.body());
        else {
          res.write("error: " + JSON.stringify(err.body().error) + "\n\n");
          if (oai !== "none") res.write("data: [DONE]\n\n");
          res.end();
        }
        resolve();
      },
    };
    const task = {type: "completion", tokens, spans, params, cachePrompt, idSlot, sink,
                  promptText: piecesText(tokens, true), cancelled: false};
    res.on("close", () => {
      if (!done) {
        task.cancelled = true;   // SERVER_TASK_TYPE_CANCEL: the slot is released, its memory kept
        done = true;
        const i = deferred.indexOf(task);
        if (i >= 0) deferred.splice(i, 1);
        if (wakeLoop) { const w = wakeLoop; wakeLoop = null; w(); }
        resolve();
      }
    });
    post(task);
  });
}

async function handleSlotAction(req, res, idStr, query, body) {
  if (!opts.slotSavePath) throw new HttpError(501, "This server does not support slots action. Start it with `--slot-save-path`");
  // std::stoi: leading blanks, a sign, digits; anything after them is ignored
  const m = /^\s*[+-]?\d+/.exec(idStr);
  const idSlot = m ? parseInt(m[0], 10) : NaN;
  if (!Number.isFinite(idSlot) || idSlot < -(2 ** 31) || idSlot >= 2 ** 31) throw new HttpError(400, "Invalid slot ID");
  const action = query.get("action") ?? "";
  let filename = null;
  if (action === "save" || action === "restore") {
    const r = parseJson(body);
    if (r === null || typeof r !== "object" || !("filename" in r)) throw new HttpError(500, "[json.exception.out_of_range.403] key 'filename' not found");
    filename = r.filename;
    if (typeof filename !== "string") throw new HttpError(500, "[json.exception.type_error.302] type must be string");
    if (!validateFilename(filename)) throw new HttpError(400, "Invalid filename");
  } else if (action !== "erase") {
    throw new HttpError(400, "Invalid action");
  }
  let task;
  const result = await new Promise((resolve, reject) => {
    task = {type: action, idSlot: -1, idSlotAction: idSlot, idSlotAsked: idSlot, filename, resolve, reject};
    // a client that goes away takes its task out of the queue (cleanup_pending_task);
    // one already running completes
    res.on("close", () => {
      if (res.writableEnded) return;
      task.cancelled = true;
      const i = deferred.indexOf(task);
      if (i >= 0) deferred.splice(i, 1);
      resolve(null);
    });
    post(task);
  });
  if (result !== null && !res.destroyed) sendJson(res, 200, result);
}

function doubleState(withTokens) {
  return {
    engine: "real", library: LIB, pid: process.pid, model: opts.model, arch, n_ctx: N_CTX, n_ctx_slot: N_CTX_SLOT,
    n_batch: N_BATCH, n_ubatch: N_UBATCH, n_swa: N_SWA, n_swa_model: N_SWA_MODEL, swa_full: opts.swaFull,
    seq_rm: SEQ_RM_TYPE, kv_unified: false, n_stream: opts.parallel, token_form: opts.tokenForm,
    counters: {...counters},
    slots: slots.map((s) => {
      const e = {id: s.id, n_ctx: s.nCtx, n_tokens: s.tokens.length, is_processing: s.processing(),
                 last_prompt_n: s.lastPromptN, last_tokens_evaluated: s.lastTokensEvaluated,
                 last_cache_n: s.lastCacheN, last_generated: s.lastGenerated,
                 pos_min: ctx.getSequenceKvCacheMinPosition(s.id), pos_max: ctx.getSequenceKvCacheMaxPosition(s.id),
                 checkpoints: s.checkpoints.map((c) => ({n_tokens: c.nTokens, pos_min: c.posMin, pos_max: c.posMax, size: c.cp.size}))};
      if (withTokens) e.tokens = s.tokens.slice();
      return e;
    }),
  };
}

async function route(req, res, method, p, query, body) {
  const get = method === "GET", postM = method === "POST";
  if (get && (p === "/health" || p === "/v1/health")) return sendJson(res, 200, {status: "ok"});
  if (get && p === "/props") {
    return sendJson(res, 200, {
      default_generation_settings: {params: paramsJson({}), n_ctx: N_CTX_SLOT},
      total_slots: slots.length, model_alias: MODEL_NAME, model_path: opts.model,
      modalities: {vision: false, video: false, audio: false}, endpoint_slots: opts.slots,
      endpoint_props: false, endpoint_metrics: false, chat_template: CHAT_TEMPLATE,
      bos_token: piecesText([BOS], true), eos_token: piecesText([EOS], true), build_info: BUILD_INFO,
      is_sleeping: false,
    });
  }
  if (get && (p === "/models" || p === "/v1/models")) {
    return sendJson(res, 200, {
      models: [{name: MODEL_NAME, model: MODEL_NAME, modified_at: "", size: "", digest: "", type: "model",
                description: "", tags: [""], capabilities: ["completion"], parameters: "",
                details: {parent_model: "", format: "gguf", family: "", families: [""], parameter_size: "",
                          quantization_level: ""}}],
      object: "list",
      data: [{id: MODEL_NAME, aliases: opts.alias ? [opts.alias] : [], tags: [], object: "model",
              created: Math.floor(Date.now() / 1000), owned_by: "llamacpp", meta: modelMeta()}],
    });
  }
  if (get && p === "/slots") {
    if (!opts.slots) throw new HttpError(501, "This server does not support slots endpoint. Start it with `--slots`");
    nextTaskId++;   // SERVER_TASK_TYPE_SLOT_GET takes a task id too
    counters.slots_reads++;
    const data = slots.map(slotJson);
    if (query.has("fail_on_no_slot") && !slots.some((s) => !s.processing())) throw new HttpError(503, "no slot available");
    return sendJson(res, 200, data);
  }
  if (get && p === "/metrics") throw new HttpError(501, "This server does not support metrics endpoint. Start it with `--metrics`");
  if (postM && p === "/tokenize") {
    const r = parseJson(body);
    let out = [];
    if (r && typeof r === "object" && "content" in r) {
      const toks = r.content === undefined ? [] : (typeof r.content === "string"
          ? tokenize(r.content, !!r.add_special, r.parse_special ?? true) : promptTokens(r.content, !!r.add_special));
      if (r.with_pieces) {
        out = toks.map((t) => {
          const b = pieceBytes(t, true);
          const s = b.toString("utf8");
          return {id: t, piece: Buffer.from(s, "utf8").equals(b) ? s : Array.from(b)};
        });
      } else out = toks;
    }
    return sendJson(res, 200, {tokens: out});
  }
  if (postM && p === "/detokenize") {
    const r = parseJson(body);
    let content = "";
    if (r && typeof r === "object" && Array.isArray(r.tokens)) {
      const toks = r.tokens.map((x) => Number(x));
      if (toks.some((x) => !Number.isInteger(x) || x < 0 || x >= N_VOCAB)) throw new HttpError(500, "invalid token");
      content = piecesText(toks, true);
    }
    return sendJson(res, 200, {content});
  }
  if (postM && p === "/apply-template") {
    const r = parseJson(body);
    return sendJson(res, 200, {prompt: applyTemplate(r?.messages)});
  }
  if (postM && (p === "/completion" || p === "/completions")) return handleCompletion(req, res, parseJson(body), "none");
  if (postM && p === "/v1/completions") return handleCompletion(req, res, parseJson(body), "completion");
  if (postM && (p === "/chat/completions" || p === "/v1/chat/completions")) return handleCompletion(req, res, parseJson(body), "chat");
  const m = /^\/slots\/([^/]+)$/.exec(p);
  if (postM && m) return handleSlotAction(req, res, decodeURIComponent(m[1]), query, body);
  if (get && p === "/__double/state") return sendJson(res, 200, doubleState(query.has("tokens")));
  throw new HttpError(404, "File Not Found");
}

const server = http.createServer({maxHeaderSize: 65536, requestTimeout: 300000, headersTimeout: 60000, keepAliveTimeout: 5000}, (req, res) => {
  res.on("error", (e) => log("response error:", e.message));   // a client gone mid-answer
  req.on("error", (e) => log("request error:", e.message));
  let u;
  try {
    u = new URL(req.url.startsWith("/") ? "http://x" + req.url : "http://x/" + req.url);
  } catch {
    return sendJson(res, 404, new HttpError(404, "File Not Found").body());
  }
  const p = u.pathname;
  if (!p.startsWith("/__double/")) counters.requests++;
  if (req.method === "OPTIONS") {
    res.writeHead(200, {"Access-Control-Allow-Origin": req.headers.origin ?? "", "Access-Control-Allow-Credentials": "true",
                        "Access-Control-Allow-Methods": "GET, POST", "Access-Control-Allow-Headers": "*",
                        "Content-Length": "0", "Server": "llama.cpp"});
    return res.end();
  }
  const chunks = [];
  let size = 0, tooBig = false;
  req.on("data", (c) => {
    size += c.length;
    if (size > MAX_BODY) { tooBig = true; req.destroy(); return; }
    chunks.push(c);
  });
  req.on("end", async () => {
    if (tooBig) return;
    const body = Buffer.concat(chunks);
    try {
      if (!apiKeyOk(req, p)) throw new HttpError(401, "Invalid API Key");
      await route(req, res, req.method, p, u.searchParams, body);
    } catch (e) {
      const err = e instanceof HttpError ? e : new HttpError(500, String(e && e.message || e));
      if (!(e instanceof HttpError)) log("error:", e && e.stack || e);
      if (!res.headersSent) sendJson(res, err.code, err.body());
      else res.end();
    }
  });
});
server.maxConnections = 512;
server.on("connection", (sock) => sock.setNoDelay(true));

async function shutdown() {
  if (stopping) return;
  stopping = true;
  if (wakeLoop) wakeLoop();
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);

loop().catch((e) => {
  process.stderr.write(`llama_real: the task loop failed: ${e && e.stack || e}\n`);
  process.exit(1);
});
server.listen(opts.port, opts.host, () => {
  const a = server.address();
  log(`${LIB}; model ${opts.model} (${arch}); n_ctx ${N_CTX}, ${slots.length} slots of ${N_CTX_SLOT}; ` +
      `n_batch ${N_BATCH}, n_ubatch ${N_UBATCH}; n_swa ${N_SWA}; seq_rm ${SEQ_RM_TYPE}`);
  process.stdout.write(`listening on http://${opts.host.includes(":") ? "[" + opts.host + "]" : opts.host}:${a.port}\n`);
});
