/**
 * The hook runtime: one code path for every hook and both dialects.
 *
 *   add:    parse → connect to xenstore → lock the backend path (or Xen's block lock, for a
 *           backend whose lockScope says so) → physical-device already there?
 *           done (exit 0) → read the disk spec → plan → journal + build step by step → report
 *           success in one transaction. Any failure: undo what was built, report hotplug-error +
 *           hotplug-status in one transaction, exit 1.
 *   remove: parse → connect (optional: the journal alone is enough) → lock → undo the journal's
 *           steps newest first, gathering every failure → exit 0, or 1 with all failures reported.
 *
 * Exit codes: 0 success (also: nothing to do), 1 the hotplug failed (hotplug-error says why),
 * 2 bad command line. `main()` returns the code; nothing here calls process.exit().
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { ConfigError, loadConfig, type Config } from '../config/config.js';
import { CommandError, type Runner } from '../devices/runner.js';
import { shortageOf } from '../devices/shortage.js';
import { execRunner } from '../devices/exec.js';
import { Journal, processAlive, type JournalEntry } from '../journal/journal.js';
import { Build, BuildStopped, undoAll } from '../journal/steps.js';
import { acquireFlock, type HeldLock } from '../lock/flock.js';
import { createLogger, type Logger } from '../log/logger.js';
import { connectXenstore } from '../xenstore/client.js';
import type { XenstoreClient } from '../xenstore/types.js';
import type { Backend, BuiltDevice } from '../backends/types.js';
import { readDisk } from '../disk/spec.js';
import { dispatchTarget, runScript } from './dispatch.js';
import { HotplugError, TeardownError, UsageError, messageOf } from '../disk/errors.js';
import { eventAgeMs, takeXenBlockLock } from '../lock/xen-lock.js';
import { adoptSaved, claimedStores, holdReason, holdRecord, keepClaims, markLost, savingReason } from './lifecycle.js';
import { isIncoming } from '../disk/migration.js';
import { reportFailure, reportSuccess } from './report.js';
import { checkBackendPath, parseArgs, type HotplugRequest } from './request.js';
import { helpText } from './help.js';
import { lockOptions, pathLockPath } from '../lock/paths.js';

export interface RuntimeDeps {
  connect?: () => Promise<XenstoreClient>;
  run?: Runner;
  config?: Config;
  logger?: Logger;
  out?: (s: string) => void;
  err?: (s: string) => void;
  /** The drop-in `block` sets this: xend `type` values it does not handle go to block-<type>. */
  typeDispatch?: boolean;
  version?: string;
  /**
   * True once whoever asked for the event is gone (the service's wrapper, killed as libxl kills a
   * script at its timeout); asked before each step of an add. The add then stops, undoes what it
   * built and writes nothing to xenstore: what a killed hook leaves, minus the record (libxl's
   * remove that follows finds nothing to do). A remove goes on to its end.
   */
  abandoned?: () => boolean;
  /**
   * The process that started the hook, when this process is not it (the service runs the event
   * its wrapper handed over: the wrapper's parent, xl when xl ran it). Default: our parent.
   */
  parentPid?: number;
}

interface Env {
  req: HotplugRequest;
  backend: Backend;
  config: Config;
  run: Runner;
  log: Logger;
  journal: Journal;
  env: NodeJS.ProcessEnv;
  abandoned: (() => boolean) | undefined;
  parentPid: number | undefined;
}

export async function runHook(
  backend: Backend,
  argv: readonly string[],
  env: NodeJS.ProcessEnv,
  deps: RuntimeDeps = {},
): Promise<number> {
  const out = deps.out ?? ((s: string) => process.stdout.write(`${s}\n`));
  const err = deps.err ?? ((s: string) => process.stderr.write(`${s}\n`));
  let req: HotplugRequest;
  try {
    const parsed = parseArgs(backend.script, argv, env);
    if (parsed.kind === 'help') {
      out(helpText(backend));
      return 0;
    }
    if (parsed.kind === 'version') {
      out(`${backend.script} (xen-blockhooks) ${deps.version ?? 'development'}`);
      return 0;
    }
    req = parsed.request;
  } catch (e) {
    if (e instanceof UsageError) {
      err(`${backend.script}: ${e.message}; run "${backend.script} --help" for usage`);
      return 2;
    }
    throw e;
  }
  const bad = checkBackendPath(req.xenbusPath);
  if (bad) {
    // Nothing is written: a path we refuse is not a place to write an error either.
    err(`${backend.script}: ${bad}; refusing to touch xenstore`);
    return 1;
  }
  let config: Config;
  try {
    config = deps.config ?? loadConfig(env);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    err(`${backend.script}: configuration error: ${e.message}`);
    return 1;
  }
  const log =
    deps.logger ??
    createLogger({
      tag: backend.script,
      file: config.logFile,
      verbose: req.verbose,
      ...(deps.err ? { stderrLine: err } : {}),
    });
  const started = process.hrtime.bigint(); // not performance.now(): that loads perf_hooks on first use
  const ctx: Env = {
    req,
    backend,
    config,
    run: deps.run ?? execRunner(env),
    log,
    journal: new Journal(config.stateDir),
    env,
    abandoned: deps.abandoned,
    parentPid: deps.parentPid,
  };
  let xs: XenstoreClient | undefined;
  try {
    try {
      xs = await (deps.connect ?? (() => connectXenstore({ env })))();
    } catch (e) {
      if (req.action === 'add') {
        log.error(`${req.action} ${req.xenbusPath}: cannot reach xenstore: ${messageOf(e)}`, { outcome: 'error' });
        return 1;
      }
      log.warn(
        `remove ${req.xenbusPath}: cannot reach xenstore (${messageOf(e)}); tearing down from the journal alone`,
      );
    }
    if (deps.typeDispatch && xs) {
      const target = dispatchTarget(await xs.tryRead(`${req.xenbusPath}/type`), config.xenScriptDir);
      if (target) {
        log.info(`${req.action} ${req.xenbusPath}: type dispatch to ${target}`);
        return await runScript(target, argv, env, deps.out && deps.err ? { out, err } : undefined);
      }
    }
    const code = req.action === 'add' ? await add(ctx, xs as XenstoreClient) : await remove(ctx, xs);
    log.info(`${req.action} ${req.xenbusPath}: ${code === 0 ? 'done' : 'failed'}`, {
      ms: Math.round(Number(process.hrtime.bigint() - started) / 1e6),
      dialect: req.dialect,
    });
    return code;
  } finally {
    await xs?.close().catch(() => {});
    if (!deps.logger) await log.close();
  }
}

/** The lock held around the whole add or remove (Backend.lockScope). */
async function lockPath(e: Env): Promise<HeldLock> {
  if (e.backend.lockScope === 'xen-block')
    return takeXenBlockLock(e.req.xenbusPath, e.config, e.run, eventAgeMs(e.env));
  mkdirSync(join(e.config.stateDir, 'locks'), { recursive: true, mode: 0o700 });
  return acquireFlock(pathLockPath(e.config.stateDir, e.req.xenbusPath), lockOptions(e.config, e.run));
}

async function fail(e: Env, xs: XenstoreClient, error: unknown): Promise<number> {
  const status = error instanceof HotplugError ? error.status : 'error';
  const message = error instanceof HotplugError ? error.message : describeUnplanned(e, error);
  e.log.error(`${e.req.action} ${e.req.xenbusPath}: ${message}`, { outcome: status });
  if (!(error instanceof HotplugError) && error instanceof Error && error.stack) e.log.debug(error.stack);
  try {
    await reportFailure(xs, e.req.xenbusPath, message, status);
  } catch (w) {
    e.log.error(`could not write hotplug-error to ${e.req.xenbusPath}: ${messageOf(w)}`);
  }
  return 1;
}

/**
 * A failure no backend turned into a HotplugError. A device command that failed because something
 * ran out says what ran out (devices/shortage.ts); another failed command says which and why; only
 * anything else reads as unexpected.
 */
function describeUnplanned(e: Env, error: unknown): string {
  if (error instanceof CommandError) {
    const what = `${e.backend.script} could not ${e.req.action === 'remove' ? 'take down' : 'set up'} ${e.req.xenbusPath}`;
    const shortage = shortageOf(error.result);
    return shortage ? `${what}: ${shortage} (${error.message}).` : `${what}: ${error.message}`;
  }
  return `${e.backend.script} failed unexpectedly on ${e.req.xenbusPath}: ${messageOf(error)}`;
}

/** Undo every step of `entry` with this hook's undoers; the failures gathered. */
function undoRecord(e: Env, xs: XenstoreClient | undefined, entry: JournalEntry): ReturnType<typeof undoAll> {
  return undoAll(entry, e.backend.undo, { run: e.run, config: e.config, log: e.log, journal: e.journal, xs });
}

/** Take away what an earlier, unfinished or forgotten record built before building again. */
async function clearStale(e: Env, xs: XenstoreClient | undefined, entry: JournalEntry): Promise<void> {
  e.log.warn(
    `${e.req.xenbusPath}: found a ${entry.phase} record from pid ${entry.pid}; undoing it before building again`,
  );
  const failures = await undoRecord(e, xs, entry);
  if (failures.length)
    throw new TeardownError(`${e.req.xenbusPath}: could not clear what an earlier attempt left`, failures);
}

async function add(e: Env, xs: XenstoreClient): Promise<number> {
  let lock: HeldLock | undefined;
  let built: JournalEntry | undefined;
  let held: (() => Promise<void>) | undefined;
  const releaseHeld = async (): Promise<void> => {
    const r = held;
    held = undefined;
    if (r)
      await r().catch((w: unknown) =>
        e.log.warn(`${e.req.xenbusPath}: releasing the backend's lock failed: ${messageOf(w)}`),
      );
  };
  try {
    lock = await lockPath(e);
    // Both asked at once (one round trip to xenstored); the spec matters only when there is no
    // device yet, and so does any complaint about it.
    const reading = readDisk(xs, e.req.xenbusPath);
    reading.catch(() => {});
    const existing = await xs.tryRead(`${e.req.xenbusPath}/physical-device`);
    if (existing !== undefined) {
      e.log.info(`add ${e.req.xenbusPath}: physical-device ${existing} already written; nothing to do`);
      return 0;
    }
    const disk = await reading;
    if (disk.state !== undefined && disk.state >= 5) {
      throw new HotplugError(
        `${e.req.xenbusPath} is closing (backend state ${disk.state}): the device was removed while it was being added; nothing was built.`,
      );
    }
    const previous = e.journal.load(e.req.xenbusPath);
    if (previous) {
      if (previous.phase === 'adding' && previous.pid !== process.pid && processAlive(previous.pid)) {
        throw new HotplugError(
          `${e.req.xenbusPath} is being added by process ${previous.pid} already; wait for it or run remove.`,
          'busy',
        );
      }
      await clearStale(e, xs, previous);
    }
    // A restore: what the saved domain's remove held is handed back, or the add is refused.
    const adopted = adoptSaved({ ...e, script: e.backend.script }, e.req.xenbusPath, disk);
    if (adopted?.device) {
      await reportSuccess(xs, e.req.xenbusPath, adopted.device);
      e.log.info(`add ${e.req.xenbusPath}: connected ${adopted.device.path} (kept since the save)`, {
        dev: `${adopted.device.major}:${adopted.device.minor}`,
        params: disk.params,
        mode: disk.mode,
        outcome: 'connected',
      });
      return 0;
    }
    const plan = await e.backend.plan(disk, { config: e.config, env: e.env, xenbusPath: e.req.xenbusPath });
    const transient = e.backend.transient?.(plan);
    if (transient && isIncoming(disk.domainName) && !e.backend.migrates) {
      throw new HotplugError(
        `${e.backend.script}: domain ${disk.domainName} is the receiving end of a live migration, and this disk's ${transient.replace(/ \/.*$/, '')} lives only in the sending domain's devices; a new one would hand the guest a disk without the blocks it wrote, so nothing was built and the migration fails (the sending domain resumes). Migrate domains whose disks keep their writes (a persistent store on storage both hosts share), or shut the domain down and start it where it should run.`,
      );
    }
    const entry = Journal.begin(e.backend.script, e.req.xenbusPath, {
      params: disk.params,
      mode: disk.mode,
      frontendId: disk.frontendId,
      vdev: disk.vdev,
      domainName: disk.domainName,
      ...(disk.domainUuid ? { domainUuid: disk.domainUuid } : {}),
    });
    if (transient) entry.transient = transient;
    e.journal.save(entry);
    built = entry;
    const build = new Build(entry, e.journal, undefined, e.abandoned);
    const dev: BuiltDevice = await e.backend.add(
      {
        request: e.req,
        disk,
        config: e.config,
        run: e.run,
        log: e.log,
        xs,
        journal: e.journal,
        build,
        env: e.env,
        xenBlockLockHeld: e.backend.lockScope === 'xen-block',
      },
      plan,
    );
    held = dev.release;
    if (e.abandoned?.()) throw new BuildStopped('the report');
    entry.phase = 'ready';
    entry.device = { path: dev.path, major: dev.major, minor: dev.minor };
    e.journal.save(entry);
    await reportSuccess(xs, e.req.xenbusPath, dev);
    await releaseHeld();
    e.log.info(`add ${e.req.xenbusPath}: connected ${dev.path}`, {
      dev: `${dev.major}:${dev.minor}`,
      params: disk.params,
      mode: disk.mode,
      outcome: 'connected',
    });
    return 0;
  } catch (error) {
    await releaseHeld();
    let reported = error;
    if (built) {
      const failures = await undoRecord(e, xs, built);
      if (error instanceof BuildStopped) {
        e.log.warn(
          `add ${e.req.xenbusPath}: ${error.message} (killed at libxl's timeout?); undid what was built${failures.length ? `, but not all (${failures.map((f) => f.message).join('; ')}; the record stays for "xen-blockhooks gc")` : ''}; nothing written to xenstore`,
          { outcome: 'abandoned' },
        );
        return 1;
      }
      if (failures.length) {
        const extra = new TeardownError('and undoing the partial device also failed', failures);
        e.log.error(`${e.req.xenbusPath}: ${extra.message}; the record stays for "xen-blockhooks gc"`);
        if (error instanceof HotplugError)
          reported = new HotplugError(
            `${error.message} (cleanup also failed: ${extra.message}; run "xen-blockhooks gc")`,
            error.status,
          );
      }
    }
    return await fail(e, xs, reported);
  } finally {
    await releaseHeld();
    await lock?.release();
  }
}

async function remove(e: Env, xs: XenstoreClient | undefined): Promise<number> {
  let lock: HeldLock | undefined;
  try {
    lock = await lockPath(e);
    const entry = e.journal.load(e.req.xenbusPath);
    if (!entry) {
      if (xs && e.backend.removeUnrecorded) {
        await e.backend.removeUnrecorded({
          xenbusPath: e.req.xenbusPath,
          xs,
          config: e.config,
          run: e.run,
          log: e.log,
          xenBlockLockHeld: e.backend.lockScope === 'xen-block',
        });
        return 0;
      }
      e.log.info(`remove ${e.req.xenbusPath}: nothing recorded; nothing to undo`);
      return 0;
    }
    // A domain being saved keeps what its restore needs (src/hotplug/lifecycle.ts).
    const hold = xs ? await holdReason(e, xs, entry) : undefined;
    if (hold && xs) {
      try {
        await holdRecord({ ...e, undo: e.backend.undo }, xs, entry, hold);
        return 0;
      } catch (err) {
        // Never a fresh disk for this domain's restore: mark the saved disk lost (its restore is
        // refused), then take the devices down as at any remove. Without a marker, keep them.
        await markLost(e, xs, entry);
        e.log.error(
          `remove ${e.req.xenbusPath}: ${hold}, but its devices could not be kept (${messageOf(err)}); its restore will be refused, taking them down`,
        );
      }
    }
    // A persistent disk of a domain being saved: its devices go, its claims stay for the restore.
    if (!hold && xs && claimedStores(entry).length > 0) {
      const saving = await savingReason(e, xs, entry);
      if (saving) {
        try {
          await keepClaims(e, xs, entry, saving);
        } catch (err) {
          e.log.warn(
            `remove ${e.req.xenbusPath}: ${saving}, but its claims cannot be kept (${messageOf(err)}); releasing them as at any remove`,
          );
        }
      }
    }
    const failures = await undoRecord(e, xs, entry);
    if (failures.length === 0) return 0;
    const error = new TeardownError(
      `${e.backend.script} remove ${e.req.xenbusPath} left devices behind (the record stays for "xen-blockhooks gc")`,
      failures,
    );
    if (xs) return await fail(e, xs, error);
    e.log.error(error.message);
    return 1;
  } catch (error) {
    if (xs) return await fail(e, xs, error);
    e.log.error(`remove ${e.req.xenbusPath}: ${messageOf(error)}`);
    return 1;
  } finally {
    await lock?.release();
  }
}
