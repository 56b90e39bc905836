/** Worker thread of AveragePool: averages into shared buffers, one task at a time. */
import { parentPort } from "node:worker_threads";
import { averageInto, type AverageTask } from "./average.js";

parentPort!.on("message", (task: AverageTask) => {
  try {
    averageInto(task);
    parentPort!.postMessage({});
  } catch (error) {
    parentPort!.postMessage({ error: (error as Error).message });
  }
});
