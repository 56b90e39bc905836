export {
  type DType,
  DTYPE_SIZE,
  isDType,
  isShape,
  tensorByteLength,
  elementsOf,
  concat,
  type FloatDType,
  isFloatDType,
  firstNonFinite,
  toFloat32,
  fromFloat32,
  decodeFloatsInto,
  encodeFloatsInto,
  convertFloats,
} from "./dtype.js";
export { type TensorInfo, SafetensorsReader, MAX_TENSORS_PER_FILE, TENSOR_ENTRY_BYTES } from "./reader.js";
export { CheckpointFiles, checkInsideFolder, MAX_CHECKPOINT_TENSORS } from "./checkpoint.js";
export { openRegularFile, readTextFile } from "./input-file.js";
export {
  type TensorToWrite,
  type WriteOptions,
  type ShardPlan,
  safetensorsHeader,
  writeSafetensors,
  planShards,
  writeShardedSafetensors,
  shardedFileBytes,
  parseSize,
  WRITE_BATCH_BYTES,
  BATCHES_IN_FLIGHT,
  EARLY_BATCHES_IN_FLIGHT,
  SharedBufferPool,
} from "./writer.js";
