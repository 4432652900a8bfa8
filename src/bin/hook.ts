/**
 * The shared body of every hook entry point: run, set the exit code, let the event loop drain so
 * every log line reaches its file. An exception that escapes the runtime is a bug: it is printed
 * with its stack and exits 70 (EX_SOFTWARE).
 *
 * Two ways in. Started as a script (dist/<name>.mjs), the hook runs at once on argv[2...]. When a
 * startup snapshot is being built (scripts/snapshot.cjs puts a `__xbhSnapshot` host on
 * globalThis), the bundle's modules are loaded into the snapshot and the run becomes the
 * snapshot's main function instead: `node --snapshot-blob <name>.snapshot -- ARGS` then starts
 * with everything loaded and argv[1...] holding ARGS.
 */
import type { Backend } from '../backends/types.js';
import { runHook, type RuntimeDeps } from '../hotplug/main.js';
import { VERSION } from '../version.js';

/** What scripts/snapshot.cjs provides while it builds a snapshot. */
export interface SnapshotHost {
  setMain(main: () => void): void;
}

export function hookMain(backend: Backend, deps: RuntimeDeps = {}): void {
  const host = (globalThis as { __xbhSnapshot?: SnapshotHost }).__xbhSnapshot;
  const run = (argv: string[], version: string): void => {
    runHook(backend, argv, process.env, { version, ...deps }).then(
      (code) => {
        process.exitCode = code;
      },
      (e: unknown) => {
        process.stderr.write(
          `${backend.script}: internal error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`,
        );
        process.exitCode = 70;
      },
    );
  };
  if (host) host.setMain(() => run(process.argv.slice(1), `${VERSION} (startup snapshot)`));
  else run(process.argv.slice(2), VERSION);
}
