/**
 * Progress on stderr, only when stderr is a terminal: a single line redrawn
 * in place with done/total, rate and ETA. Silent otherwise, so logs and
 * `--json` output stay clean.
 */
export interface ProgressBar {
  update(done: number, total: number): void;
  finish(): void;
}

export function formatBytes(bytes: number): string {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return "?";
  const s = Math.round(seconds);
  return s < 60 ? `${s}s` : `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
}

/** `unit` "bytes" formats sizes; "items" formats plain counts. */
export function progressBar(
  label: string,
  unit: "bytes" | "items",
  stream: NodeJS.WriteStream = process.stderr,
): ProgressBar {
  if (!stream.isTTY) return { update() {}, finish() {} };
  const start = performance.now();
  let lastDraw = 0;
  const format = unit === "bytes" ? formatBytes : (n: number) => String(n);
  const draw = (done: number, total: number) => {
    const elapsed = (performance.now() - start) / 1000;
    const rate = done / Math.max(elapsed, 1e-9);
    const eta = rate > 0 ? (total - done) / rate : Infinity;
    const pct = total > 0 ? Math.floor((100 * done) / total) : 100;
    const width = 24;
    const filled = Math.round((width * pct) / 100);
    const bar = "#".repeat(filled) + "-".repeat(width - filled);
    const rateText = unit === "bytes" ? `${formatBytes(rate)}/s` : `${rate.toFixed(1)}/s`;
    stream.write(
      `\r${label} [${bar}] ${pct}% ${format(done)}/${format(total)} ${rateText} ETA ${formatDuration(eta)}\x1b[K`,
    );
  };
  let last: [number, number] = [0, 0];
  return {
    update(done, total) {
      last = [done, total];
      const now = performance.now();
      if (now - lastDraw < 100 && done < total) return;
      lastDraw = now;
      draw(done, total);
    },
    finish() {
      draw(last[1], last[1]);
      stream.write("\n");
    },
  };
}
