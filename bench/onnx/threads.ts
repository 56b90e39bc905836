/**
 * One score.onnx at several onnxruntime intra-op thread counts, with and
 * without spinning (issue 19): 512-token windows, sessions interleaved, 12
 * windows each with the first two dropped. Not a test:
 * `npm run build && node dist/bench/onnx/threads.js DIR/onnx/score.onnx 4 8 16`.
 */
import { cpus } from "node:os";
import * as ort from "onnxruntime-node";
import { median } from "../stats.js";

const [file, ...counts] = process.argv.slice(2);
if (file === undefined) throw new Error("usage: threads.js SCORE.onnx THREADS...");
const T = 512;
const ids = BigInt64Array.from({ length: T }, (_, i) => BigInt(1 + ((i * 7919) % 300)));
const configs = counts.flatMap((n) => ["1", "0"].map((spin) => ({ threads: Number(n), spin })));
const sessions = await Promise.all(
  configs.map((c) =>
    ort.InferenceSession.create(file, {
      graphOptimizationLevel: "all",
      logSeverityLevel: 4,
      intraOpNumThreads: c.threads,
      extra: { session: { intra_op: { allow_spinning: c.spin } } },
    }),
  ),
);
const feeds = (names: readonly string[]) => {
  const all: Record<string, ort.Tensor> = {
    input_ids: new ort.Tensor("int64", ids, [1, T]),
    attention_mask: new ort.Tensor("int64", new BigInt64Array(T).fill(1n), [1, T]),
    position_ids: new ort.Tensor(
      "int64",
      BigInt64Array.from({ length: T }, (_, i) => BigInt(i)),
      [1, T],
    ),
  };
  return Object.fromEntries(names.map((name) => [name, all[name]!]));
};
const times: number[][] = configs.map(() => []);
for (let round = 0; round < 12; round++)
  for (const [i, session] of sessions.entries()) {
    const start = performance.now();
    await session.run(feeds(session.inputNames), ["logits"]);
    times[i]!.push(performance.now() - start);
  }
console.log(`cpus ${cpus().length}`);
for (const [i, c] of configs.entries()) {
  const kept = times[i]!.slice(2);
  console.log(
    `threads ${c.threads} spinning ${c.spin}: median ${median(kept).toFixed(1)} ms, min ${Math.min(...kept).toFixed(1)} ms per 512-token window`,
  );
}
