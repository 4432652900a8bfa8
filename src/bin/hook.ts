/**
 * The shared body of every hook entry point: run, set the exit code, let the event loop drain so
 * every log line reaches its file. An exception that escapes the runtime is a bug: it is printed
 * with its stack and exits 70 (EX_SOFTWARE).
 */
import type { Backend } from '../backends/types.js';
import { runHook, type RuntimeDeps } from '../hotplug/main.js';
import { VERSION } from '../version.js';

export function hookMain(backend: Backend, deps: RuntimeDeps = {}): void {
  runHook(backend, process.argv.slice(2), process.env, { version: VERSION, ...deps }).then(
    (code) => {
      process.exitCode = code;
    },
    (e: unknown) => {
      process.stderr.write(`${backend.script}: internal error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
      process.exitCode = 70;
    },
  );
}
