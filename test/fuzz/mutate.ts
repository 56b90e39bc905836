/**
 * Mutations shared by the format fuzzers: JSON and text edits, byte edits,
 * and odd files (links out of the folder, links to devices, FIFOs, folders
 * where a file is expected, link loops).
 */
import { execFileSync } from "node:child_process";
import { mkdir, rm, symlink, writeFile } from "node:fs/promises";
import { dirname, join, relative } from "node:path";
import type { Rng } from "./rng.js";

export const encoder = new TextEncoder();

/** Values of every JSON type, including ones that break naive code: huge, negative, deep, long. */
export function oddJsonValue(rng: Rng): unknown {
  return rng.pick<() => unknown>([
    () => null,
    () => true,
    () => false,
    () => 0,
    () => -1,
    () => -0,
    () => 1,
    () => 2,
    () => 3,
    () => 0.5,
    () => 1.5,
    () => 1e12,
    () => 1e308,
    () => -1e12,
    () => 2 ** 31,
    () => 2 ** 32,
    () => 2 ** 53,
    () => 2 ** 53 + 2,
    () => Number.MAX_SAFE_INTEGER,
    () => "",
    () => "32",
    () => "x".repeat(rng.int(1, 5000)),
    () => "\n\u001b[31mred\u0007",
    () => "silu",
    () => "llama",
    () => [],
    () => [1, 2],
    () => ["a"],
    () => ({}),
    () => ({ a: 1 }),
    () => deepArray(rng.int(10, 3000)),
    () => deepObject(rng.int(10, 3000)),
  ])();
}

export function deepArray(depth: number): unknown {
  let value: unknown = [];
  for (let i = 0; i < depth; i++) value = [value];
  return value;
}

export function deepObject(depth: number): unknown {
  let value: unknown = {};
  for (let i = 0; i < depth; i++) value = { a: value };
  return value;
}

/** Deeper than JSON.stringify can recurse, as raw text. */
export function deepJsonText(depth: number, kind: "array" | "object" = "array"): string {
  return kind === "array" ? "[".repeat(depth) + "]".repeat(depth) : `${'{"a":'.repeat(depth)}{}${"}".repeat(depth)}`;
}

/** One to three mutateText edits in a row, each one's note added to `notes`. */
export function mutateTextRepeatedly(rng: Rng, text: string, notes: string[], alphabet?: string): string {
  const edits = rng.int(1, 3);
  for (let i = 0; i < edits; i++) {
    const [edited, note] = mutateText(rng, text, alphabet);
    text = edited;
    notes.push(note);
  }
  return text;
}

/** With the given probability, invalid UTF-8 inserted at a random place (noted). */
export function maybeInvalidUtf8(rng: Rng, bytes: Uint8Array, probability: number, notes: string[]): Uint8Array {
  if (!rng.chance(probability)) return bytes;
  notes.push("non-UTF-8 bytes");
  return splice(bytes, rng.int(0, bytes.length), 0, invalidUtf8(rng));
}

/** Text-level edits of a JSON or YAML document (they usually break its syntax). */
export function mutateText(
  rng: Rng,
  text: string,
  alphabet = '{}[]:,"\\ \t\n0123456789aez-.\u0000\u00e9\ud83d\ude00',
): [string, string] {
  const at = rng.int(0, text.length);
  switch (rng.int(0, 9)) {
    case 0:
      return [text.slice(0, at) + text.slice(at + 1), `delete char at ${at}`];
    case 1: {
      const char = rng.pick([...alphabet]);
      return [text.slice(0, at) + char + text.slice(at), `insert ${JSON.stringify(char)} at ${at}`];
    }
    case 2: {
      const length = rng.int(1, 40);
      return [
        text.slice(0, at) + text.slice(at, at + length).repeat(rng.int(2, 5)) + text.slice(at + length),
        `repeat ${length} chars at ${at}`,
      ];
    }
    case 3:
      return [text.slice(0, at), `truncate at ${at}`];
    case 4: {
      const b = rng.int(0, text.length);
      const [i, j] = at < b ? [at, b] : [b, at];
      return [text.slice(0, i) + text.slice(j), `delete ${i}..${j}`];
    }
    case 5:
      return [`\ufeff${text}`, "byte-order mark"];
    case 6: {
      const numbers = [...text.matchAll(/-?\d+(\.\d+)?([eE][-+]?\d+)?/g)];
      if (numbers.length === 0) return [text + rng.pick([",", "}", "]", "{"]), "append a bracket"];
      const m = rng.pick(numbers);
      const replacement = rng.pick([
        "1e400",
        "-1e400",
        "-0",
        "01",
        "1.",
        ".5",
        "NaN",
        "Infinity",
        "99999999999999999999999",
        "0x10",
        "-5",
        "1e-400",
        "4294967296",
        "1.0",
      ]);
      return [
        text.slice(0, m.index) + replacement + text.slice(m.index! + m[0].length),
        `number ${m[0]} -> ${replacement}`,
      ];
    }
    case 7: {
      const strings = [...text.matchAll(/"([^"\\]|\\.)*"/g)];
      if (strings.length === 0) return [`${text}\u0000`, "append NUL"];
      const m = rng.pick(strings);
      const replacement = rng.pick([
        '"\\ud800"',
        '"\\u0000"',
        '"a\\nb"',
        '"\\u001b[2J"',
        '""',
        '"../../x"',
        '"/etc/passwd"',
        '"\u2028"',
        `"${"y".repeat(rng.int(100, 100_000))}"`,
      ]);
      return [
        text.slice(0, m.index) + replacement + text.slice(m.index! + m[0].length),
        `string ${m[0].slice(0, 30)} -> ${replacement.slice(0, 30)}`,
      ];
    }
    case 8:
      return [text.replace(/\n/g, "\r\n"), "CRLF line ends"];
    default:
      return [text + rng.pick([",", "}", "]", "{", "\n//comment", "\n#", "\n---\n", " x"]), "append junk"];
  }
}

/** Byte-level edits: bit flips, invalid UTF-8, random insertions. */
export function mutateBytes(rng: Rng, bytes: Uint8Array, from = 0, to = bytes.length): [Uint8Array, string] {
  const at = from + rng.int(0, Math.max(0, to - from - 1));
  const out = bytes.slice();
  switch (rng.int(0, 3)) {
    case 0: {
      const flips = rng.int(1, 8);
      for (let i = 0; i < flips; i++) {
        const p = from + rng.int(0, Math.max(0, to - from - 1));
        if (p < out.length) out[p] = out[p]! ^ (1 << rng.int(0, 7));
      }
      return [out, `${flips} bit flips in ${from}..${to}`];
    }
    case 1: {
      const bad = invalidUtf8(rng);
      return [splice(bytes, at, 0, bad), `invalid UTF-8 ${hex(bad)} inserted at ${at}`];
    }
    case 2: {
      const bad = invalidUtf8(rng);
      return [splice(bytes, at, bad.length, bad), `invalid UTF-8 ${hex(bad)} written at ${at}`];
    }
    default: {
      const junk = rng.bytes(rng.int(1, 16));
      return [splice(bytes, at, 0, junk), `${junk.length} random bytes inserted at ${at}`];
    }
  }
}

export function invalidUtf8(rng: Rng): Uint8Array {
  return Uint8Array.from(
    rng.pick([
      [0xff],
      [0xfe],
      [0x80],
      [0xc0, 0x80],
      [0xed, 0xa0, 0x80],
      [0xe2, 0x82],
      [0xf5, 0x80, 0x80, 0x80],
      [0xf0, 0x9f, 0x98],
      [0xc3],
    ]),
  );
}

export function splice(bytes: Uint8Array, at: number, remove: number, insert: Uint8Array): Uint8Array {
  const out = new Uint8Array(bytes.length - Math.min(remove, bytes.length - at) + insert.length);
  out.set(bytes.subarray(0, at), 0);
  out.set(insert, at);
  out.set(bytes.subarray(Math.min(at + remove, bytes.length)), at + insert.length);
  return out;
}

export function hex(bytes: Uint8Array): string {
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

let fifoSupported: boolean | undefined;

/** Makes a FIFO at `path`; false where the platform has no mkfifo. */
export function makeFifo(path: string): boolean {
  if (fifoSupported === false) return false;
  try {
    execFileSync("mkfifo", [path], { stdio: "ignore" });
    fifoSupported = true;
    return true;
  } catch {
    fifoSupported = false;
    return false;
  }
}

export type OddFile =
  | "missing"
  | "folder"
  | "fifo"
  | "dev-zero"
  | "dev-urandom"
  | "link-outside"
  | "link-loop"
  | "dangling-link"
  | "empty"
  | "relative-link-outside";

export const ODD_FILES: readonly OddFile[] = [
  "missing",
  "folder",
  "fifo",
  "dev-zero",
  "dev-urandom",
  "link-outside",
  "link-loop",
  "dangling-link",
  "empty",
  "relative-link-outside",
];

/**
 * Replaces `path` by an odd file. `outside` is a file beyond the seed
 * folder that a link may point at. Returns FIFOs made (to unblock later).
 */
export async function makeOddFile(path: string, kind: OddFile, outside: string): Promise<string[]> {
  await rm(path, { recursive: true, force: true });
  switch (kind) {
    case "missing":
      return [];
    case "folder":
      await mkdir(path);
      await writeFile(join(path, "inner"), "x");
      return [];
    case "fifo":
      return makeFifo(path) ? [path] : [];
    case "dev-zero":
      await symlink("/dev/zero", path);
      return [];
    case "dev-urandom":
      await symlink("/dev/urandom", path);
      return [];
    case "link-outside":
      await symlink(outside, path);
      return [];
    case "relative-link-outside":
      await symlink(relative(dirname(path), outside), path);
      return [];
    case "link-loop":
      await rm(`${path}.loop`, { force: true }); // left by an earlier loop at the same path
      await symlink(`${path}.loop`, path);
      await symlink(path, `${path}.loop`);
      return [];
    case "dangling-link":
      await symlink(`${path}.nowhere`, path);
      return [];
    case "empty":
      await writeFile(path, "");
      return [];
  }
}

/** JSON.stringify without recursion, for values nested deeper than the stack allows. */
export function stringifyDeep(value: unknown): string {
  const out: string[] = [];
  const stack: unknown[] = [value];
  const CLOSE = Symbol("close");
  while (stack.length > 0) {
    const item = stack.pop();
    if (typeof item === "object" && item !== null && (item as { [CLOSE]?: string })[CLOSE] !== undefined) {
      out.push((item as { [CLOSE]: string })[CLOSE]);
    } else if (Array.isArray(item)) {
      out.push("[");
      stack.push({ [CLOSE]: "]" });
      for (let i = item.length - 1; i >= 0; i--) {
        stack.push(item[i]);
        if (i > 0) stack.push({ [CLOSE]: "," });
      }
    } else if (typeof item === "object" && item !== null) {
      out.push("{");
      stack.push({ [CLOSE]: "}" });
      const entries = Object.entries(item);
      for (let i = entries.length - 1; i >= 0; i--) {
        stack.push(entries[i]![1]);
        stack.push({ [CLOSE]: `${JSON.stringify(entries[i]![0])}:` });
        if (i > 0) stack.push({ [CLOSE]: "," });
      }
    } else {
      out.push(JSON.stringify(item) ?? "null");
    }
  }
  return out.join("");
}
