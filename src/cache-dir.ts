/**
 * The user's cache folder for bam-upcycle: $BAM_CACHE_DIR, else
 * $XDG_CACHE_HOME/bam-upcycle, else ~/.cache/bam-upcycle. It holds ONNX
 * exports of read-only models and the seed-file hash cache; deleting it
 * only costs time.
 */
import { homedir } from "node:os";
import { join } from "node:path";

export function userCacheDir(): string {
  return process.env.BAM_CACHE_DIR || join(process.env.XDG_CACHE_HOME || join(homedir(), ".cache"), "bam-upcycle");
}
