/**
 * Rotary inverse frequencies for every scaling type, as modeling_bam.py's
 * rope_inv_freq (itself transformers' modeling_rope_utils), in float32
 * arithmetic where torch uses it. "dynamic" and "longrope" depend on the
 * longest position of the call, so the graph computes them at run time from
 * the parameters given here.
 */
import { BamError } from "../errors.js";
import type { ArchFeatures, Rope } from "../arch/types.js";

const f32 = Math.fround;

export type RopeFrequencies =
  /** Fixed inverse frequencies [dim/2]; cos and sin are multiplied by `scale`. */
  | { kind: "fixed"; inv: Float32Array; scale: number }
  /** longrope: `long` when the longest position + 1 exceeds `original`, else `short`. */
  | { kind: "longrope"; short: Float32Array; long: Float32Array; original: number; scale: number }
  /** dynamic NTK: base grows with seq = max(longest position + 1, maxPositions). */
  | { kind: "dynamic"; base: number; factor: number; maxPositions: number; exponents: Float32Array };

/** exps[i] = (2i) / dim in float32. */
function exponents(dim: number): Float32Array {
  return Float32Array.from({ length: dim / 2 }, (_, i) => f32((2 * i) / dim));
}

/** 1 / base^exps in float32. */
export function inverseFrequencies(base: number, exps: Float32Array): Float32Array {
  return exps.map((e) => f32(1 / f32(f32(base) ** e)));
}

export function ropeFrequencies(features: ArchFeatures): RopeFrequencies {
  const rope = features.rope as Rope;
  const dim = rope.dim;
  const exps = exponents(dim);
  const inv = inverseFrequencies(rope.theta, exps);
  const sc = (rope.scaling ?? {}) as Record<string, unknown>;
  const kind = rope.scaling?.type ?? "default";
  const num = (key: string): number => {
    const v = sc[key];
    if (typeof v !== "number")
      throw new BamError("CONFIG_INVALID", `rope_scaling ${kind} needs a number "${key}", found ${JSON.stringify(v)}`);
    return v;
  };
  const opt = (key: string): number | undefined => (typeof sc[key] === "number" ? (sc[key] as number) : undefined);
  const maxPos = features.maxPositions;
  const orig = opt("original_max_position_embeddings") ?? maxPos;
  switch (kind) {
    case "default":
      return { kind: "fixed", inv, scale: 1 };
    case "linear":
      return { kind: "fixed", inv: inv.map((x) => f32(x / f32(num("factor")))), scale: 1 };
    case "dynamic":
      return { kind: "dynamic", base: rope.theta, factor: num("factor"), maxPositions: maxPos, exponents: exps };
    case "llama3": {
      const [f, lo, hi] = [num("factor"), num("low_freq_factor"), num("high_freq_factor")];
      const out = inv.map((x) => {
        const wavelen = f32(f32(2 * Math.PI) / x);
        const scaled = wavelen > orig / lo ? f32(x / f32(f)) : x;
        const smooth = f32(f32(f32(orig / wavelen) - lo) / (hi - lo));
        const smoothed = f32(f32(f32(f32(1 - smooth) * scaled) / f) + f32(smooth * scaled));
        const medium = !(wavelen < orig / hi) && !(wavelen > orig / lo);
        return medium ? smoothed : scaled;
      });
      return { kind: "fixed", inv: out, scale: 1 };
    }
    case "yarn": {
      const f = opt("factor") ?? maxPos / orig;
      const mscale = (s: number, m = 1) => (s <= 1 ? 1 : 0.1 * m * Math.log(s) + 1);
      let attention = opt("attention_factor");
      if (attention === undefined) {
        const [m, mAll] = [opt("mscale"), opt("mscale_all_dim")];
        attention = m && mAll ? mscale(f, m) / mscale(f, mAll) : mscale(f);
      }
      const fast = opt("beta_fast") || 32;
      const slow = opt("beta_slow") || 1;
      const correction = (rotations: number) =>
        (dim * Math.log(orig / (rotations * 2 * Math.PI))) / (2 * Math.log(rope.theta));
      let [low, high] = [correction(fast), correction(slow)];
      if (sc.truncate !== false) [low, high] = [Math.floor(low), Math.ceil(high)];
      low = Math.max(low, 0);
      high = Math.min(high, dim - 1);
      if (low === high) high += 0.001;
      const out = inv.map((x, i) => {
        const ramp = Math.min(1, Math.max(0, f32(f32(i - low) / f32(high - low))));
        const extrapolation = f32(1 - ramp);
        return f32(f32(f32(x / f32(f)) * f32(1 - extrapolation)) + f32(x * extrapolation));
      });
      return { kind: "fixed", inv: out, scale: attention };
    }
    case "longrope": {
      const f = opt("factor") ?? maxPos / orig;
      let attention = opt("attention_factor");
      if (attention === undefined) attention = f <= 1 ? 1 : Math.sqrt(1 + Math.log(f) / Math.log(orig));
      const factors = (key: string) => {
        const list = sc[key];
        if (!Array.isArray(list) || list.length !== dim / 2)
          throw new BamError("CONFIG_INVALID", `rope_scaling longrope needs "${key}" with ${dim / 2} numbers`);
        return inv.map((x, i) => f32(x / f32(Number(list[i]))));
      };
      return {
        kind: "longrope",
        short: factors("short_factor"),
        long: factors("long_factor"),
        original: orig,
        scale: attention,
      };
    }
    default:
      throw new BamError("FEATURE_UNSUPPORTED", `rope_scaling type "${kind}" is not supported by the ONNX engine`);
  }
}
