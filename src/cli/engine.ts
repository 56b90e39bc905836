/**
 * The CPU engine (ONNX graphs through protobufjs, onnxruntime, tokenizers),
 * loaded by the commands that run it and only when they run: `bam upcycle`
 * and `bam inspect` start without it.
 */
export const onnxEngine = () => import("../onnx/index.js");
