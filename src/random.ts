/**
 * Deterministic random numbers for router init, Drop-Upcycling and
 * generation's sampling: every stream is keyed by (a seed, a name), so a
 * tensor's values depend on nothing but its key, whatever order or process
 * computes it.
 */
import { createHash } from "node:crypto";

/** xoshiro128** seeded from sha256(key): fast, 32-bit, good enough for init. */
export class RandomStream {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;
  private spareNormal: number | null = null;

  constructor(seed: number, key: string) {
    const digest = createHash("sha256").update(`${seed}\0${key}`).digest();
    this.s0 = digest.readUInt32LE(0);
    this.s1 = digest.readUInt32LE(4);
    this.s2 = digest.readUInt32LE(8);
    this.s3 = digest.readUInt32LE(12) | 1; // never the all-zero state
  }

  /** Uniform 32-bit unsigned integer. */
  nextUint32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** Uniform in (0, 1). */
  nextUniform(): number {
    return (this.nextUint32() + 0.5) / 4294967296;
  }

  /** Standard normal (Box-Muller, pairs cached). */
  nextNormal(): number {
    if (this.spareNormal !== null) {
      const value = this.spareNormal;
      this.spareNormal = null;
      return value;
    }
    const radius = Math.sqrt(-2 * Math.log(this.nextUniform()));
    const angle = 2 * Math.PI * this.nextUniform();
    this.spareNormal = radius * Math.sin(angle);
    return radius * Math.cos(angle);
  }

  /** Standard normal truncated to [-2, 2] by resampling (as Switch's truncated-normal init). */
  nextTruncatedNormal(): number {
    for (;;) {
      const value = this.nextNormal();
      if (value >= -2 && value <= 2) return value;
    }
  }

  /** `count` distinct indices from [0, n), sorted (partial Fisher-Yates). */
  sampleIndices(n: number, count: number): Uint32Array {
    const pool = new Uint32Array(n);
    for (let i = 0; i < n; i++) pool[i] = i;
    for (let i = 0; i < count; i++) {
      const j = i + (this.nextUint32() % (n - i));
      const swap = pool[i]!;
      pool[i] = pool[j]!;
      pool[j] = swap;
    }
    return pool.slice(0, count).sort();
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}
