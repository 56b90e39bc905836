/**
 * Runs the bam CLI in this process and, at exit, writes its peak resident
 * memory (worker threads included) to `<output>.rss`, where <output> follows -o.
 * Usage: node peak-rss.js <cli.js> <cli args...>
 */
import { writeFileSync } from "node:fs";

const [cli, ...cliArgs] = process.argv.slice(2);
const output = cliArgs[cliArgs.indexOf("-o") + 1];
process.argv = [process.argv[0]!, cli!, ...cliArgs];
process.on("exit", () => {
  writeFileSync(`${output}.rss`, JSON.stringify({ maxRssBytes: process.resourceUsage().maxRSS * 1024 }));
});
await import(cli!);
