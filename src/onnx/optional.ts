/**
 * The CPU engine's packages (onnxruntime-node, @huggingface/transformers) are
 * optional dependencies: upcycling and inspecting need neither, and
 * onnxruntime-node's install script downloads native files that an offline
 * or minimal install goes without. What needs them imports them here, and
 * a missing one is one line saying what to install.
 */
import { BamError } from "../errors.js";

/** What `npm install` needs for eval, generate, export-onnx and --router-init hidden. */
export const ENGINE_PACKAGES = ["onnxruntime-node", "@huggingface/transformers"] as const;
export type EnginePackage = (typeof ENGINE_PACKAGES)[number];

const missing = (name: EnginePackage, cause?: unknown) =>
  new BamError(
    "ENGINE_MISSING",
    `${name} is not installed: eval, generate, export-onnx and --router-init hidden need the CPU engine; run npm install ${ENGINE_PACKAGES.join(" ")}`,
    { cause },
  );

/** `load` is the package's own `import()` (kept literal so its types follow); a missing package becomes ENGINE_MISSING. */
export async function importEngine<T>(name: EnginePackage, load: () => Promise<T>): Promise<T> {
  try {
    return await load();
  } catch (error) {
    const code = (error as NodeJS.ErrnoException | undefined)?.code;
    if (code === "ERR_MODULE_NOT_FOUND" && String((error as Error).message).includes(`'${name}'`))
      throw missing(name, error);
    throw error;
  }
}

/** Fails fast, before any work, when a package of the engine cannot be found. */
export function requireEngine(): void {
  for (const name of ENGINE_PACKAGES) {
    try {
      import.meta.resolve(name);
    } catch (error) {
      throw missing(name, error);
    }
  }
}
