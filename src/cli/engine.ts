/**
 * The CPU engine (ONNX graphs through protobufjs, onnxruntime, tokenizers),
 * loaded by the commands that run it and only when they run: `bam upcycle`
 * and `bam inspect` start without it. Its packages are optional dependencies:
 * a command that needs a missing one says which to install before any work.
 */
import { requireEngine } from "../onnx/optional.js";

export const onnxEngine = () => {
  requireEngine();
  return import("../onnx/index.js");
};
