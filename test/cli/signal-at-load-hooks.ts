/** Module hooks of signal-at-load.ts: a signal when the upcycle command module is first resolved. */
let sent = false;

export async function resolve(
  specifier: string,
  context: unknown,
  next: (specifier: string, context: unknown) => Promise<unknown>,
): Promise<unknown> {
  if (!sent && specifier.endsWith("commands/upcycle.js")) {
    sent = true;
    process.kill(process.pid, process.env.BAM_TEST_SIGNAL as NodeJS.Signals);
  }
  return next(specifier, context);
}
