/**
 * Loaded with `node --import` into a process under measurement: at exit,
 * writes its peak resident memory (worker threads included; see
 * ../peak-rss.ts) to the file named by $BAM_TEST_RSS_FILE.
 */
import { writeFileSync } from "node:fs";
import { peakRssBytes } from "../peak-rss.js";

const file = process.env.BAM_TEST_RSS_FILE;
if (file) {
  process.on("exit", () => {
    writeFileSync(file, JSON.stringify({ maxRssBytes: peakRssBytes() }));
  });
}
