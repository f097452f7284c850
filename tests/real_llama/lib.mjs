// lib.mjs: the real llama.cpp library (v0.4.0, as node-llama-cpp 3.21.1 ships it prebuilt)
// for kvtier's tests. tests/integration/test_real_llama.py drives it; it is usable by hand too.
//
// usage: node tests/real_llama/lib.mjs serve        one JSON request per stdin line, one JSON
//                                                   answer per stdout line, until EOF
//        node tests/real_llama/lib.mjs 'REQUEST'    one request, its answer on stdout
//
// Requests ({"op": ...}); every context is created for the request and disposed after it, so
// a restore always lands in a FRESH context; ctx = {contextSize, sequences, swaFull}:
//   probe                                -> {release}: the library loads (nothing else)
//   tokenize {model, text, bos}          -> {tokens}   (text as text; BOS first if bos)
//   converse {model, ctx, steps}         -> {steps: [{generated, n_context, file_size}]}
//        one context, one sequence, the steps in order: each evaluates its `eval` tokens
//        (after the previous step's last generated token when `pending`), then generates `gen`
//        greedy tokens (temperature 0; the last one is returned but not evaluated, as
//        llama-server leaves it), then saves the sequence to `save` if given. A step after a
//        save is the uninterrupted run that a restore of that file must reproduce.
//   restore {model, ctx, file, eval, gen} -> {loaded: true, context_tokens, generated} or
//        {loaded: false, refusal, log}: loadStateFromFile into a fresh context (the library's
//        refusal and its log lines are reported, not thrown), then as one converse step.
// Errors answer {error}. Never builds or downloads anything (build: "never"); one thread, so a
// busy 2-core machine neither slows it down by spinning nor changes its results.
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
import readline from "node:readline";

const logs = [];
const llama = await getLlama({
    gpu: false, build: "never", skipDownload: true, usePrebuiltBinaries: true, progressLogs: false,
    maxThreads: 1, logLevel: LlamaLogLevel.warn,
    // stdout carries the answers; the library's own messages go to stderr and to the answer
    // of the request that caused them (a refused restore says why).
    logger: (level, message) => {
        logs.push(String(message).trim());
        process.stderr.write(`llama: ${message}`);
    },
});
const models = new Map();

async function model(path) {
    if (!models.has(path))
        models.set(path, await llama.loadModel({modelPath: path, gpuLayers: 0}));
    return models.get(path);
}

async function context(m, ctx = {}) {
    return m.createContext({contextSize: ctx.contextSize ?? 2048, sequences: ctx.sequences ?? 2,
                            swaFullCache: !!ctx.swaFull, threads: 1, batchSize: 512});
}

async function step(seq, s, prev) {
    const out = {generated: []};
    const n = s.gen ?? 0;
    const tokens = [...(s.pending ? [prev.generated.at(-1)] : []), ...(s.eval ?? [])];
    if (tokens.some(t => !Number.isInteger(t)))
        throw new Error("no token to evaluate (`pending` needs a previous step that generated)");
    if (n > 0) {
        for await (const t of seq.evaluate(tokens, {temperature: 0}))
            if (out.generated.push(t) >= n)
                break;
    } else if (tokens.length) {
        await seq.evaluateWithoutGeneratingNewTokens(tokens);
    }
    out.n_context = seq.contextTokens.length;
    if (s.save)
        out.file_size = (await seq.saveStateToFile(s.save)).fileSize;
    return out;
}

const ops = {
    async probe() {
        return {release: llama.llamaCppRelease.release};
    },
    async tokenize(r) {
        const m = await model(r.model);
        const tokens = Array.from(m.tokenize(r.text, false));
        return {tokens: r.bos && m.tokens.bos != null ? [m.tokens.bos, ...tokens] : tokens};
    },
    async converse(r) {
        const c = await context(await model(r.model), r.ctx);
        try {
            const seq = c.getSequence();
            const steps = [];
            for (const s of r.steps)
                steps.push(await step(seq, s, steps.at(-1)));
            return {steps};
        } finally {
            await c.dispose();
        }
    },
    async restore(r) {
        const c = await context(await model(r.model), r.ctx);
        try {
            const seq = c.getSequence();
            logs.length = 0;
            try {
                await seq.loadStateFromFile(r.file, {acceptRisk: true});
            } catch (e) {
                // The library's log lines arrive asynchronously: wait a little for its reason.
                for (let i = 0; i < 40 && !logs.length; i++)
                    await new Promise(resolve => setTimeout(resolve, 25));
                return {loaded: false, refusal: String(e && e.message || e), log: logs.slice(-5)};
            }
            const context_tokens = seq.contextTokens.slice();
            const out = await step(seq, {eval: r.eval, gen: r.gen}, null);
            return {loaded: true, context_tokens, ...out};
        } finally {
            await c.dispose();
        }
    },
};

async function answer(line) {
    let r;
    try {
        r = JSON.parse(line);
        if (!ops[r.op])
            throw new Error(`unknown op ${r.op}`);
        return JSON.stringify(await ops[r.op](r));
    } catch (e) {
        return JSON.stringify({error: String(e && e.stack || e)});
    }
}

if (process.argv[2] === "serve") {
    for await (const line of readline.createInterface({input: process.stdin, terminal: false}))
        if (line.trim())
            process.stdout.write(await answer(line) + "\n");
} else {
    process.stdout.write(await answer(process.argv[2] ?? '{"op":"probe"}') + "\n");
}
for (const m of models.values())
    await m.dispose();
await llama.dispose();
