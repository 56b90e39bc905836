export {
  type DType, DTYPE_SIZE, isDType, isShape, tensorByteLength,
  type FloatDType, isFloatDType, toFloat32, fromFloat32, convertFloats,
} from "./dtype.js";
export { type TensorInfo, SafetensorsReader } from "./reader.js";
export { CheckpointFiles } from "./checkpoint.js";
export {
  type TensorToWrite, type WriteOptions, type ShardPlan,
  safetensorsHeader, writeSafetensors, planShards, writeShardedSafetensors, shardedFileBytes, parseSize,
} from "./writer.js";
