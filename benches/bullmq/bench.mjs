// BullMQ side of benches/redis_compare.py: one process, one job, JSON on stdout.
//
//   node bench.mjs --modules DIR --port P --queue Q --mode add|addBulk|fill|work --count N
//                  [--concurrency C] [--start-at EPOCH_MS]
//
// add      N × queue.add with C calls in flight (no-op payload, removeOnComplete)
// addBulk  N jobs through queue.addBulk, 100 per call
// fill     like addBulk, before a work run
// work     a Worker with concurrency C and a no-op processor, until the queue is empty
//
// --start-at lets the parent start several processes at one instant. Prints
// {"mode", "count", "seconds", "started", "finished"} (epoch ms for the last two).
import { createRequire } from "node:module";
import path from "node:path";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => (arg.startsWith("--") ? [...pairs, [arg.slice(2), all[i + 1]]] : pairs), []),
);
const require = createRequire(path.join(args.modules, "noop.js"));
const { Queue, Worker } = require("bullmq");

const connection = { host: "127.0.0.1", port: Number(args.port), maxRetriesPerRequest: null };
const count = Number(args.count);
const concurrency = Number(args.concurrency ?? 50);
const jobOptions = { removeOnComplete: true, removeOnFail: true };
const payload = { messages: [{ role: "user", content: "hi" }] };

async function waitForStart() {
  const delay = Number(args["start-at"] ?? 0) - Date.now();
  if (delay > 0) await new Promise((resolve) => setTimeout(resolve, delay));
}

async function main() {
  const queue = new Queue(args.queue, { connection });
  await queue.waitUntilReady();
  let done = 0;
  await waitForStart();
  const started = Date.now();
  const t0 = process.hrtime.bigint();
  if (args.mode === "add") {
    let next = 0;
    const lane = async () => {
      while (next < count) {
        const i = next++;
        await queue.add("job", payload, { ...jobOptions, jobId: `${args.queue}-${process.pid}-${i}` });
        done++;
      }
    };
    await Promise.all(Array.from({ length: concurrency }, lane));
  } else if (args.mode === "addBulk" || args.mode === "fill") {
    for (let i = 0; i < count; i += 100) {
      const jobs = [];
      for (let j = i; j < Math.min(count, i + 100); j++) {
        jobs.push({ name: "job", data: payload, opts: { ...jobOptions, jobId: `${args.queue}-${process.pid}-${j}` } });
      }
      await queue.addBulk(jobs);
      done += jobs.length;
    }
  } else if (args.mode === "work") {
    const worker = new Worker(args.queue, async () => null, { connection, concurrency, autorun: false });
    worker.on("completed", () => done++);
    const running = worker.run();
    for (;;) {
      await new Promise((resolve) => setTimeout(resolve, 20));
      const counts = await queue.getJobCounts("wait", "active", "delayed", "prioritized");
      if (Object.values(counts).every((n) => n === 0)) break;
    }
    await worker.close();
    await running;
  } else {
    throw new Error(`unknown mode ${args.mode}`);
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const finished = Date.now();
  await queue.close();
  process.stdout.write(JSON.stringify({ mode: args.mode, count: done, seconds, started, finished }) + "\n");
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
