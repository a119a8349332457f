// Drives the published TypeScript library for benches/compare.py; prints one JSON line.
//
//   node --expose-gc bench.mjs --modules <node_modules> --depth N --rounds R --warmup W --seed S
//
// Same workload as compare.py's `workload()` (mulberry32, four draws per item); the fingerprint of
// the fill is printed so the Python side can check both streams agree.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith("--")) throw new Error(`bad argument ${argv[i]}`);
    args[argv[i].slice(2)] = argv[i + 1];
  }
  for (const key of ["modules", "depth", "rounds", "warmup", "seed"]) {
    if (args[key] === undefined) throw new Error(`missing --${key}`);
  }
  return args;
}

async function importPackage(modules, name) {
  const dir = join(modules, ...name.split("/"));
  const manifest = JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));
  const entry = manifest.exports?.["."]?.import ?? manifest.module ?? manifest.main;
  return import(pathToFileURL(join(dir, entry)).href);
}

// mulberry32 by Tommy Ettinger (public domain).
function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const PRIORITY_CUMULATIVE = [0.1, 0.3, 0.8, 1.0];
const MIN_TOKENS = 50;
const MAX_TOKENS = 4000;
const EXPLICIT_TIME_SHARE = 0.25;

function* workload(seed) {
  const next = mulberry32(seed);
  for (let index = 0; ; index++) {
    const rPriority = next();
    const rTokens = next();
    const rHasTime = next();
    const rTime = next();
    const priority = PRIORITY_CUMULATIVE.findIndex((bound) => rPriority < bound);
    const tokens = MIN_TOKENS + Math.floor(rTokens * (MAX_TOKENS - MIN_TOKENS + 1));
    const expected = rHasTime < EXPLICIT_TIME_SHARE ? 0.5 + rTime * 39.5 : null;
    yield { id: `w${index}`, priority, tokens, expected };
  }
}

function take(stream, count) {
  const items = new Array(count);
  for (let i = 0; i < count; i++) items[i] = stream.next().value;
  return items;
}

// Same text as compare.py's fingerprint(): Python prints floats with "%.6f" and lists as "[a, b]".
function fingerprint(items) {
  const byPriority = [0, 0, 0, 0];
  let tokenSum = 0;
  let timed = 0;
  let timeSum = 0;
  for (const item of items) {
    byPriority[item.priority]++;
    tokenSum += item.tokens;
    if (item.expected !== null) {
      timed++;
      timeSum += item.expected;
    }
  }
  return `n=${items.length} p=[${byPriority.join(", ")}] tokens=${tokenSum} timed=${timed} time_sum=${timeSum.toFixed(6)}`;
}

const PAYLOAD = { prompt: "benchmark" }; // one shared payload: measure the queue, not the payloads

function toRequest(item) {
  const request = {
    id: item.id,
    payload: PAYLOAD,
    priority: item.priority,
    tokenInfo: { estimated: item.tokens },
    createdAt: new Date(),
  };
  // The library takes milliseconds; the contract (and the workload) seconds.
  if (item.expected !== null) request.expectedProcessingTime = item.expected * 1000;
  return request;
}

const silent = { debug() {}, info() {}, warn() {}, error() {}, log() {} };
const LIMIT = 1e9; // as compare.py: no limiter ever blocks

function heapUsed() {
  globalThis.gc();
  globalThis.gc();
  return process.memoryUsage().heapUsed;
}

async function main() {
  if (typeof globalThis.gc !== "function") throw new Error("run node with --expose-gc");
  const args = parseArgs(process.argv.slice(2));
  const depth = Number(args.depth);
  const rounds = Number(args.rounds);
  const warmup = Number(args.warmup);
  const seed = Number(args.seed);
  const { createInMemoryLLMQueueDispatcher } = await importPackage(args.modules, "@aid-on/llm-queue-dispatcher");
  const { createLLMThrottle } = await importPackage(args.modules, "@aid-on/llm-throttle");

  const stream = workload(seed);
  const fillItems = take(stream, depth);
  const print = fingerprint(fillItems);
  const refillItems = take(stream, rounds + warmup);
  const dispatcher = createInMemoryLLMQueueDispatcher({ logger: silent });
  const throttle = createLLMThrottle({ rpm: LIMIT, tpm: LIMIT, logger: silent });

  const before = heapUsed();
  const requests = fillItems.map(toRequest);
  const start = process.hrtime.bigint();
  await dispatcher.batchEnqueue(requests);
  const fillNs = process.hrtime.bigint() - start;
  requests.length = 0;
  const after = heapUsed();

  const refills = refillItems.map(toRequest);
  const roundsNs = [];
  const enqueueNs = [];
  let nulls = 0;
  for (const refill of refills) {
    const t0 = process.hrtime.bigint();
    const job = await dispatcher.dequeue(throttle);
    if (job) await job.markAsProcessed();
    const t1 = process.hrtime.bigint();
    await dispatcher.enqueue(refill);
    const t2 = process.hrtime.bigint();
    if (!job) nulls++;
    roundsNs.push(Number(t1 - t0));
    enqueueNs.push(Number(t2 - t1));
  }
  dispatcher.stop();
  process.stdout.write(
    JSON.stringify({
      fingerprint: print,
      depth,
      rounds_ns: roundsNs.slice(warmup),
      enqueue_ns: enqueueNs.slice(warmup),
      fill_seconds: Number(fillNs) / 1e9,
      heap_delta_bytes: after - before,
      nulls,
      node: process.version,
    }) + "\n",
  );
}

main().catch((error) => {
  process.stderr.write(`${error?.stack ?? error}\n`);
  process.exit(1);
});
