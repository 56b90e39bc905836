/** The summary statistics the benchmarks report over repeated runs. */

/** The middle value (of an even count, the upper of the two middle ones). */
export const median = (values: readonly number[]): number =>
  [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
