// The merge API, runnable from the repository after `npm run build`:
//   node examples/merge.mjs [output-folder]
import { executePlan, planUpcycle, isBamError } from "bam-upcycle";

const options = {
  seeds: ["fixtures/qwen3/base", "fixtures/qwen3/code", "fixtures/qwen3/math"],
  output: process.argv[2] ?? "example-bam",
  attention: "shared-kv",
  expertsPerToken: 1,
  force: true,
};

try {
  const plan = await planUpcycle(options); // reads configs and headers only
  console.log(`${plan.summary.experts} experts, ${(plan.summary.totalParameters / 1e3).toFixed(0)}K parameters, ` +
    `${plan.summary.flopsPerTokenRatio.toFixed(2)}x the FLOPs of one seed`);
  const result = await executePlan(plan, { // checks the plan against the seeds as they are now, then writes
    onProgress: ({ bytesWritten, totalBytes }) => process.stderr.write(`\r${bytesWritten}/${totalBytes} bytes`),
  });
  console.log(`\nwrote ${result.output} (${result.files.length} file(s)) in ${result.seconds.toFixed(2)} s`);
} catch (error) {
  if (!isBamError(error)) throw error;
  console.error(`failed (${error.code}): ${error.message}`);
  process.exit(1);
}
