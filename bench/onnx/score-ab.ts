/**
 * score.onnx graphs against each other (issue 19): the same 512-token windows
 * through each file, interleaved, 14 windows each with the first two dropped;
 * prints the median and minimum time per window. Measures graph changes on one
 * machine in one process, e.g. an export by an older commit's build against
 * this one's. Not a test: `npm run build && node dist/bench/onnx/score-ab.js A/onnx/score.onnx B/onnx/score.onnx`.
 */
import { OnnxSession } from "../../src/onnx/session.js";
import { median } from "../stats.js";

const files = process.argv.slice(2);
const sessions = await Promise.all(files.map((file) => OnnxSession.open(file)));
const times: number[][] = files.map(() => []);
for (let round = 0; round < 14; round++)
  for (const [i, session] of sessions.entries()) {
    const window = Array.from({ length: 512 }, (_, j) => 1 + ((j * 7 + round) % 300));
    const start = performance.now();
    await session.score(window);
    times[i]!.push(performance.now() - start);
  }
for (const [i, file] of files.entries()) {
  const kept = times[i]!.slice(2);
  console.log(`${file}: median ${median(kept).toFixed(1)} ms, min ${Math.min(...kept).toFixed(1)} ms per window`);
}
await Promise.all(sessions.map((session) => session.close()));
