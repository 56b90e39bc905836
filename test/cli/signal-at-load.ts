/**
 * Preloaded with `--import` by usage.test.ts: sends $BAM_TEST_SIGNAL to the
 * process when the CLI starts loading its commands, the moment when, before
 * issue 17, no handler was installed yet (143 for SIGTERM, 129 for SIGHUP).
 */
import { register } from "node:module";

register("./signal-at-load-hooks.js", import.meta.url);
