/**
 * Generation's settings and result, and their defaults: no imports, so the
 * CLI's flags take their defaults from here without loading the engine.
 */
export interface GenerationSettings {
  /** Tokens to generate at most (default 64). */
  maxNewTokens: number;
  /** 0 = greedy (default); above 0 samples. */
  temperature: number;
  /** Sampling keeps the k most probable tokens; 0 keeps all (default 50, transformers' default). */
  topK: number;
  /** Nucleus sampling: keep the smallest set of tokens with this much probability (default 1), after top-k. */
  topP: number;
  /** Seeds the sampler (the same seed gives the same tokens); null (default) leaves it seeded from the OS. */
  seed: number | null;
  /** Each piece of text as soon as it decodes. */
  onText?: (text: string) => void;
  /** Checked between tokens: generation stops and throws ABORTED. */
  signal?: AbortSignal;
}

export interface Generation {
  /** The prompt's token ids. */
  promptIds: number[];
  /** The generated token ids. */
  newIds: number[];
  /** The generated text, special tokens skipped. */
  text: string;
  /** Seconds spent generating (tokenising and loading excluded). */
  seconds: number;
  /** The settings it ran with: those given, then the model's generation_config.json, then DEFAULT_GENERATION. */
  settings: Omit<GenerationSettings, "onText" | "signal">;
  /** The settings taken from the model's generation_config.json (do_sample's temperature, top_k, top_p; max_new_tokens). */
  modelSettings: Array<"maxNewTokens" | "temperature" | "topK" | "topP">;
}

/**
 * The settings `bam generate` and generateText use where neither the caller nor
 * the model's generation_config.json (do_sample with its temperature, top_k and
 * top_p; max_new_tokens) gives one: greedy, as transformers without do_sample.
 */
export const DEFAULT_GENERATION: Readonly<GenerationSettings> = {
  maxNewTokens: 64,
  temperature: 0,
  topK: 50,
  topP: 1,
  seed: null,
};
