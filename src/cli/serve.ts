/**
 * `xen-blockhooks serve`: the one resident daemon. It serves hook events that the installed
 * wrappers hand over (src/serve) and runs the watcher's loop (watch.ts) in the same process.
 */
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { HOOKS } from '../backends/index.js';
import type { Logger } from '../log/logger.js';
import { DEFAULT_SERVE_DIR, Service } from '../serve/service.js';
import { watch } from './watch.js';

export const SERVE_HELP = `Usage: xen-blockhooks serve [--dir DIR] [--no-watch] [--interval MS]

Run the resident service: the hook wrappers Xen runs hand their events to it, and it runs each
event exactly as the hook would on its own (same journal, xenstore writes, log lines and locks),
without starting Node for every event. When the service is not running, is stopped, or stops
answering, a wrapper runs the hook itself: only the speed differs. The service also does what
"xen-blockhooks watch" does, so one daemon grows stores before they overflow.
The installer ships a systemd unit, xen-blockhooks.service, that runs this command
(not enabled: systemctl enable --now xen-blockhooks).

Options:
  --dir DIR       the channel directory the wrappers use (default ${DEFAULT_SERVE_DIR},
                  or XEN_BLOCKHOOKS_SERVE_DIR); made 0700, only root may hand over events
  --no-watch      serve hook events only, without the watcher's loop
  --interval MS   time between the watcher's passes, 100 ms to a day (default watch.interval_ms)
  -h, --help      this text

Exit status: 0 stopped by SIGTERM or SIGINT (events in flight are finished first),
1 the channel or the watcher could not start, 2 bad usage.`;

export interface ServeOptions {
  dir?: string;
  watch: boolean;
  intervalMs?: number;
}

export interface ServeCliDeps {
  config: Config;
  run: Runner;
  log: Logger;
  out: (s: string) => void;
  err: (s: string) => void;
  env: NodeJS.ProcessEnv;
  version: string;
  stop?: Promise<void>;
}

export async function serve(opts: ServeOptions, deps: ServeCliDeps): Promise<number> {
  const stop =
    deps.stop ??
    new Promise<void>((res) => {
      process.once('SIGINT', () => res());
      process.once('SIGTERM', () => res());
    });
  const dir = opts.dir ?? (deps.env['XEN_BLOCKHOOKS_SERVE_DIR'] || DEFAULT_SERVE_DIR);
  // One stop for both halves: a signal, or either half failing to start (another watcher runs).
  let stopNow: () => void = () => {};
  const stopAll = new Promise<void>((res) => (stopNow = res));
  void stop.then(() => stopNow());
  const watching = opts.watch
    ? watch(
        { once: false, ...(opts.intervalMs !== undefined ? { intervalMs: opts.intervalMs } : {}) },
        { config: deps.config, run: deps.run, log: deps.log, out: deps.out, err: deps.err, stop: stopAll },
      )
    : Promise.resolve(0);
  watching.catch(() => stopNow());
  const serving = new Service({
    dir,
    hooks: (name) => (Object.prototype.hasOwnProperty.call(HOOKS, name) ? HOOKS[name] : undefined),
    run: deps.run,
    log: deps.log,
    version: `${deps.version} (serve)`,
    stop: stopAll,
  }).run();
  serving.catch(() => stopNow());
  const [served, watched] = await Promise.allSettled([serving, watching]);
  if (served.status === 'rejected') throw served.reason;
  if (watched.status === 'rejected') throw watched.reason;
  return watched.value;
}
