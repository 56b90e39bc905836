/**
 * The element types of a flat token-id file (little-endian ids, the layout
 * scripts/data writes and scripts/finetune.py reads). No imports, so the
 * CLI's --bin-dtype choices come from here without loading the engine.
 */
export const BIN_DTYPES = ["uint16", "uint32"] as const;
/** Element type of a flat token-id file. */
export type BinDType = (typeof BIN_DTYPES)[number];
