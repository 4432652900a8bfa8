/**
 * `xen-blockhooks watch`: grow copy-on-write stores, thin pools and LVM snapshots before they
 * overflow. Every watch.interval_ms it makes one pass (src/grow/watch.ts): usage from the kernel,
 * growth by watch.step percent past watch.threshold percent, and every device the kernel already
 * dropped (Invalid, a full or failed pool) reported on stderr and in the log once, then again only
 * when its state changes; a device whose problem went away is reported as recovered, once.
 * One watcher per host: a second one exits at once, naming the first.
 */
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { WatchMemory, watchOnce, type WatchReport } from '../grow/index.js';
import { claimSingleInstance } from '../lock/instance.js';
import type { Logger } from '../log/logger.js';
import { humanBytes } from './format.js';
import { watchLockPath } from '../lock/paths.js';

export const WATCH_HELP = `Usage: xen-blockhooks watch [--once] [--interval MS]

Watch every device the hooks built and grow what backs it before it fills up, like LVM's
snapshot_autoextend: once usage reaches watch.threshold percent (default 80) it grows by
watch.step percent (default 25) — block-cow store files (online, losetup -c), the block-thin
pool (data or metadata, reload), block-lvsnap snapshots (lvextend). A device the kernel has
already dropped (Invalid snapshot, full pool) is reported once, and again only when its state
changes: growing cannot save it. A device whose problem is gone is reported as recovered, once.
The resident service (xen-blockhooks serve, unit xen-blockhooks.service) runs this loop too.

Options:
  --once          one pass, then exit (1 when a device needs a person, 0 otherwise)
  --interval MS   time between passes, 100 ms to a day (default watch.interval_ms, 2000)
  -h, --help      this text

Exit status: 0 stopped by a signal (or --once found nothing wrong), 1 a problem (--once) or
another watcher is running, 2 bad usage.`;

export interface WatchDeps {
  config: Config;
  run: Runner;
  log: Logger;
  out: (s: string) => void;
  err: (s: string) => void;
  /** Resolves when the loop should stop (tests); default SIGINT/SIGTERM. */
  stop?: Promise<void>;
}

function describe(r: WatchReport, out: (s: string) => void, err: (s: string) => void): void {
  for (const g of r.grown)
    out(`grew ${g.backendPath} (${g.script}): ${g.target} ${humanBytes(g.beforeBytes)} → ${humanBytes(g.afterBytes)}`);
  for (const p of r.news) err(`${p.state.toUpperCase()}: ${p.backendPath} ${p.device}: ${p.message}`);
  for (const { finding: f, was } of r.recovered)
    out(`RECOVERED: ${f.backendPath} ${f.device}: was ${was}, now ${f.state}: ${f.message}`);
}

export async function watch(opts: { once: boolean; intervalMs?: number }, deps: WatchDeps): Promise<number> {
  const lock = await claimSingleInstance(watchLockPath(deps.config.stateDir), 'xen-blockhooks watch', {
    runner: deps.run,
  });
  try {
    if (opts.once) {
      const r = await watchOnce(deps.config, deps.run, deps.log);
      describe(r, deps.out, deps.err);
      deps.out(
        `checked ${r.checked} disk${r.checked === 1 ? '' : 's'}, grew ${r.grown.length}, ${r.problems.length} problem${r.problems.length === 1 ? '' : 's'}`,
      );
      return r.problems.length ? 1 : 0;
    }
    const interval = opts.intervalMs ?? deps.config.watch.intervalMs;
    let stopped = false;
    const stop =
      deps.stop ??
      new Promise<void>((res) => {
        process.once('SIGINT', () => res());
        process.once('SIGTERM', () => res());
      });
    void stop.then(() => {
      stopped = true;
    });
    deps.log.info(
      `watch: started, threshold ${deps.config.watch.thresholdPercent}%, step ${deps.config.watch.stepPercent}%, every ${interval} ms`,
    );
    const memory = new WatchMemory();
    while (!stopped) {
      describe(await watchOnce(deps.config, deps.run, deps.log, { memory }), deps.out, deps.err);
      await Promise.race([stop, new Promise((res) => setTimeout(res, interval).unref())]);
    }
    deps.log.info('watch: stopped');
    return 0;
  } finally {
    await lock.release();
  }
}
