/**
 * `xen-blockhooks`: the operator's command (simulate, status, gc, grow, xenstored). Returns its
 * exit code through process.exitCode; an exception that escapes is a bug: stack, exit 70.
 */
import { cliMain } from '../cli/main.js';
import { VERSION } from '../version.js';

cliMain(process.argv.slice(2), process.env, { version: VERSION }).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    process.stderr.write(
      `xen-blockhooks: internal error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`,
    );
    process.exitCode = 70;
  },
);
