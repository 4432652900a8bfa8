/**
 * `xen-blockhooks COMMAND …`: the operator's tool. Each command parses its own options, returns
 * an exit code (nothing here calls process.exit) and reports an error as one sentence on stderr.
 *
 * Exit codes (all commands): 0 success, 1 the operation failed (the message says what and why),
 * 2 bad usage, 3 `gc` found something to collect and --apply was not given, 70 internal error.
 */
import { ConfigError, loadConfig, type Config } from '../config/config.js';
import { execRunner } from '../devices/exec.js';
import type { Runner } from '../devices/runner.js';
import { UsageError } from '../disk/errors.js';
import { createLogger, memoryLogger, type Logger } from '../log/logger.js';
import { connectXenstore } from '../xenstore/client.js';
import { startXenstoreServer } from '../xenstore/server.js';
import type { XenstoreClient } from '../xenstore/types.js';
import { HOOKS } from '../backends/index.js';
import { flag, int, parseOptions, str, strs, type OptionSpec } from './args.js';
import { CHECK_HELP, renderCheck, runCheck } from './check.js';
import { DeniedError, deniedInText, permissionSentence, runningAsRoot } from './permission.js';
import { DiskSpecError, parseDisk } from './diskspec.js';
import { GC_HELP, applyGc, gcPlan } from './gc.js';
import { GROW_HELP, GrowError, grow, parseGrowSize } from './grow.js';
import { isDiskSpec, RESIZE_HELP, resize } from './resize.js';
import { takeInventory } from './inventory.js';
import {
  CLOSE_HELP,
  OPEN_HELP,
  OpenError,
  closeTarget,
  openTarget,
  parseOpenTarget,
  renderOpened,
  type OpenTarget,
} from './open.js';
import { SIMULATE_HELP, simulate } from './simulate.js';
import { STATUS_HELP, renderStatus, rowJson, statusPlan, statusWarnings, type StatusOptions } from './status.js';
import { VdevError, vdevToDevid } from './vdev.js';
import { WATCH_HELP, watch } from './watch.js';
import { SERVE_HELP, serve } from './serve.js';
import { ServeSetupError } from '../serve/service.js';
import { AlreadyRunningError } from '../lock/instance.js';

export const MAIN_HELP = `Usage: xen-blockhooks COMMAND [options]

Commands:
  simulate DISKSPEC      play the domain builder for one disk without Xen: write the nodes,
                         run the hook's add, show what it built, run remove, show nothing is left
  status [-o F] [-S C]   every device the hooks built, like lvs: domain, vdev, device, usage, state
  gc [--apply]           find (and with --apply remove) what belongs to domains that are gone
  grow DOMAIN VDEV +SIZE enlarge a copy-on-write store, thin pool or snapshot while the guest runs
  resize DOMAIN VDEV SIZE change the size the guest sees of one disk (online where the hook can)
  watch [--once]         grow stores before they overflow; report devices the kernel dropped
  serve                  the resident service: run the hooks' events without starting Node
                         for each, and watch as above
  open DOMAIN VDEV|IMAGE map a disk's partitions in dom0 (read-only unless --rw) and print them
  close DOMAIN VDEV|IMAGE
                         take away what open made
  check [--root DIR]     check the configuration, directories, tools, kernel and Xen: list problems
  xenstored --socket P   run the embedded xenstore server in the foreground (for simulate and
                         hook tests on a machine without Xen)
  version                print the version

Run "xen-blockhooks COMMAND --help" for a command's options.
Hooks known to this build: ${Object.keys(HOOKS).join(', ') || '(none)'}.
Configuration: /etc/xen/blockhooks.conf (XEN_BLOCKHOOKS_CONF names another file).
Exit status: 0 success, 1 failure (one sentence on stderr says why), 2 bad usage,
3 gc found something and --apply was not given, 70 internal error.`;

const XENSTORED_HELP = `Usage: xen-blockhooks xenstored --socket PATH

Run an in-memory xenstore server on the unix socket PATH until interrupted (SIGINT/SIGTERM).
Point hooks and tools at it with XENSTORED_PATH=PATH (Debian's xenstore-* clients work too).
Relative paths resolve under /local/domain/0, as in dom0.

Exit status: 0 stopped by a signal, 1 could not listen, 2 bad usage.`;

export interface CliDeps {
  out?: (s: string) => void;
  err?: (s: string) => void;
  run?: Runner;
  config?: Config;
  connect?: () => Promise<XenstoreClient>;
  logger?: Logger;
  version?: string;
  bundleDir?: string;
  /** Resolves when the foreground server should stop (tests); default SIGINT/SIGTERM. */
  stopSignal?: Promise<void>;
  /** check: where this machine's /dev, /proc, /sys, /lib/modules and tools are read (tests), and its kernel release. */
  machine?: { root: string; kernelRelease: string };
  /** Whether this runs as root (tests); default: the effective uid is 0. */
  isRoot?: boolean;
}

/** Print `label…` if `fn` takes longer than a second. */
export async function withProgress<T>(label: string, err: (s: string) => void, fn: () => Promise<T>): Promise<T> {
  const t = setTimeout(() => err(`${label}…`), 1000);
  try {
    return await fn();
  } finally {
    clearTimeout(t);
  }
}

/** Actions go to the hotplug log (not the terminal: the command prints its own lines). */
function cliLogger(config: Config): Logger {
  return config.logFile ? createLogger({ tag: 'xen-blockhooks', file: config.logFile, stderr: false }) : memoryLogger();
}

const HELP: OptionSpec = { name: 'help', short: 'h', type: 'flag' };

export async function cliMain(argv: readonly string[], env: NodeJS.ProcessEnv, deps: CliDeps = {}): Promise<number> {
  const out = deps.out ?? ((s: string) => process.stdout.write(`${s}\n`));
  const err = deps.err ?? ((s: string) => process.stderr.write(`${s}\n`));
  const [cmd, ...rest] = argv;
  const usage = (m: string, c?: string) => {
    err(`xen-blockhooks${c ? ` ${c}` : ''}: ${m}; run "xen-blockhooks ${c ? `${c} ` : ''}--help" for usage`);
    return 2;
  };
  if (cmd === undefined) return usage('no command given');
  if (cmd === 'help' && rest[0] !== undefined && !rest[0].startsWith('-'))
    return cliMain([rest[0], '--help'], env, deps);
  if (cmd === '-h' || cmd === '--help' || cmd === 'help') {
    out(MAIN_HELP);
    return 0;
  }
  if (cmd === '-V' || cmd === '--version' || cmd === 'version') {
    out(`xen-blockhooks ${deps.version ?? 'development'}`);
    return 0;
  }
  const commands: Record<string, { help: string; specs: OptionSpec[] }> = {
    simulate: {
      help: SIMULATE_HELP,
      // 32751: the last domain id before Xen's reserved ones (DOMID_FIRST_RESERVED 0x7FF0).
      specs: [
        HELP,
        { name: 'domid', type: 'int', max: 32751 },
        { name: 'name', type: 'string' },
        { name: 'xl', type: 'flag' },
        { name: 'xm', type: 'flag' },
        { name: 'action', type: 'string' },
        { name: 'keep', type: 'flag' },
        { name: 'real-xenstore', type: 'flag' },
        { name: 'script-dir', type: 'string' },
        { name: 'timeout', type: 'int', min: 1, max: 3600, unit: 'seconds' },
      ],
    },
    status: {
      help: STATUS_HELP,
      specs: [
        HELP,
        { name: 'json', type: 'flag' },
        { name: 'options', short: 'o', type: 'string', repeat: true },
        { name: 'select', short: 'S', type: 'string', repeat: true },
        { name: 'units', type: 'string' },
        { name: 'noheadings', type: 'flag' },
        { name: 'separator', type: 'string' },
      ],
    },
    gc: {
      help: GC_HELP,
      specs: [
        HELP,
        { name: 'apply', type: 'flag' },
        { name: 'without-xenstore', type: 'flag' },
        { name: 'json', type: 'flag' },
      ],
    },
    grow: { help: GROW_HELP, specs: [HELP, { name: 'metadata', type: 'flag' }] },
    resize: { help: RESIZE_HELP, specs: [HELP, { name: 'shrink', type: 'flag' }] },
    // At most a day: a longer timer overflows Node's 32-bit delay and fires at once.
    watch: {
      help: WATCH_HELP,
      specs: [
        HELP,
        { name: 'once', type: 'flag' },
        { name: 'interval', type: 'int', min: 100, max: 86_400_000, unit: 'ms' },
      ],
    },
    serve: {
      help: SERVE_HELP,
      specs: [
        HELP,
        { name: 'dir', type: 'string' },
        { name: 'no-watch', type: 'flag' },
        { name: 'interval', type: 'int', min: 100, max: 86_400_000, unit: 'ms' },
      ],
    },
    xenstored: { help: XENSTORED_HELP, specs: [HELP, { name: 'socket', type: 'string' }] },
    check: { help: CHECK_HELP, specs: [HELP, { name: 'root', type: 'string' }] },
    open: { help: OPEN_HELP, specs: [HELP, { name: 'rw', type: 'flag' }] },
    close: { help: CLOSE_HELP, specs: [HELP] },
  };
  const c = commands[cmd];
  if (!c) return usage(`unknown command "${cmd}" (${[...Object.keys(commands), 'version'].join(', ')})`);
  let p;
  try {
    p = parseOptions(rest, c.specs);
  } catch (e) {
    if (e instanceof UsageError) return usage(e.message, cmd);
    throw e;
  }
  if (flag(p, 'help')) {
    out(c.help);
    return 0;
  }
  if (cmd === 'check') {
    // Before the configuration is loaded: reporting what is wrong with it is part of the job.
    if (p.positional.length) return usage(`unexpected argument "${p.positional[0]}"`, cmd);
    const root = str(p, 'root');
    if (root !== undefined && !root.startsWith('/')) return usage(`--root needs an absolute path, not "${root}"`, cmd);
    const report = runCheck({
      env,
      ...(root !== undefined ? { root } : {}),
      ...(deps.machine ? { machineRoot: deps.machine.root, kernelRelease: deps.machine.kernelRelease } : {}),
    });
    for (const l of renderCheck(report)) out(l);
    return report.problems.length ? 1 : 0;
  }
  // A configuration that does not load is reported (exit 1) only by needConfig(), which each
  // command calls after its own usage checks: bad usage exits 2 whatever the file says.
  let config!: Config;
  let configError: ConfigError | undefined;
  try {
    config = deps.config ?? loadConfig(env);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    configError = e;
  }
  const needConfig = () => {
    if (configError) throw configError;
  };
  const run = deps.run ?? execRunner(env);
  const connect = deps.connect ?? (() => connectXenstore({ env, timeoutMs: 5000 }));
  const tryConnect = async () => {
    try {
      return await connect();
    } catch {
      return undefined;
    }
  };
  const isRoot = deps.isRoot ?? runningAsRoot();
  // Not root, and a record the journal could not read for want of permission: the whole picture is
  // unknown, so status and gc stop there instead of showing (or collecting) the rest. (Root keeps
  // the warning status prints for an unreadable record.)
  const inventory = async (label: string, xs: XenstoreClient | undefined) => {
    const inv = await withProgress(label, err, () => takeInventory({ config, run, xs }));
    const u = inv.unreadable.find((x) => /^E(?:ACCES|PERM)\b/.test(x.error));
    if (u && !isRoot)
      throw new DeniedError(
        `open ${u.file}`,
        u.error.startsWith('EPERM') ? 'operation not permitted' : 'permission denied',
      );
    return inv;
  };
  const fail = (m: string) => {
    err(`xen-blockhooks ${cmd}: ${m}`);
    return 1;
  };

  try {
    switch (cmd) {
      case 'simulate': {
        const spec = p.positional.join(' ').trim();
        if (spec === '') return usage('no disk spec given', cmd);
        if (flag(p, 'xl') && flag(p, 'xm')) return usage('--xl and --xm exclude each other', cmd);
        const actionArg = str(p, 'action');
        if (actionArg !== undefined && actionArg !== 'add' && actionArg !== 'remove')
          return usage(`--action must be add or remove, not "${actionArg}"`, cmd);
        if (actionArg === 'remove' && flag(p, 'keep')) return usage('--keep makes no sense with --action remove', cmd);
        const domid = int(p, 'domid') ?? 1;
        if (domid === 0) return usage('--domid 0 is dom0 itself; give the guest a domain id of 1 or more', cmd);
        // The disk spec is an argument: one xl (or xm) would refuse is bad usage, found before anything runs.
        try {
          parseDisk(spec, flag(p, 'xm') ? 'xm' : flag(p, 'xl') ? 'xl' : 'auto');
        } catch (e) {
          if (e instanceof DiskSpecError || e instanceof VdevError) return usage(e.message, cmd);
          throw e;
        }
        needConfig();
        return await simulate(
          {
            spec,
            syntax: flag(p, 'xm') ? 'xm' : flag(p, 'xl') ? 'xl' : 'auto',
            domid,
            name: str(p, 'name') ?? `sim${domid}`,
            action: actionArg === 'remove' ? 'remove' : actionArg === 'add' || flag(p, 'keep') ? 'add' : 'both',
            realXenstore: flag(p, 'real-xenstore'),
            scriptDir: str(p, 'script-dir'),
            timeoutMs: (int(p, 'timeout') ?? 40) * 1000,
          },
          { config, run, env, out, err, ...(deps.bundleDir ? { bundleDir: deps.bundleDir } : {}) },
        );
      }
      case 'status': {
        if (p.positional.length) return usage(`unexpected argument "${p.positional[0]}"`, cmd);
        const units = str(p, 'units');
        const separator = str(p, 'separator');
        const so: StatusOptions = {
          json: flag(p, 'json'),
          fields: strs(p, 'options'),
          select: strs(p, 'select'),
          noHeadings: flag(p, 'noheadings'),
          ...(units !== undefined ? { units } : {}),
          ...(separator !== undefined ? { separator } : {}),
        };
        try {
          statusPlan(so);
        } catch (e) {
          if (e instanceof UsageError) return usage(e.message, cmd);
          throw e;
        }
        needConfig();
        const xs = await tryConnect();
        try {
          const inv = await inventory('status: reading the journal, xenstore and the kernel', xs);
          const text = renderStatus(inv, so);
          if (text !== '') out(text);
          if (so.noHeadings) for (const w of statusWarnings(inv)) err(w);
          return 0;
        } finally {
          await xs?.close().catch(() => {});
        }
      }
      case 'gc': {
        if (p.positional.length) return usage(`unexpected argument "${p.positional[0]}"`, cmd);
        needConfig();
        const xs = await tryConnect();
        // Only --apply logs (and so may create the log file): a plan changes nothing on the machine.
        let log: Logger | undefined;
        try {
          const inv = await inventory('gc: reading the journal, xenstore and the kernel', xs);
          const withoutXenstore = flag(p, 'without-xenstore');
          const plan = gcPlan(inv, { withoutXenstore });
          const json = flag(p, 'json');
          const undecided = !inv.xenstore && !withoutXenstore && inv.rows.some((r) => r.kind === 'record');
          if (!flag(p, 'apply')) {
            if (json)
              out(
                JSON.stringify(
                  { xenstore: inv.xenstore, plan: plan.map((i) => ({ action: i.action, ...rowJson(i.row) })) },
                  null,
                  2,
                ),
              );
            else {
              if (plan.length === 0) out('Nothing to collect.');
              else {
                out(`Plan (${plan.length}; run "xen-blockhooks gc --apply" to carry it out):`);
                for (const i of plan) out(`  ${i.action}`);
              }
              if (undecided)
                out(
                  'Note: xenstore is not reachable, so records were not judged; if Xen is not running, use --without-xenstore.',
                );
            }
            return plan.length ? 3 : 0;
          }
          log = deps.logger ?? cliLogger(config);
          const raw = await applyGc(plan, { config, run, log, xs, progress: (s) => err(`gc: ${s}`) });
          const denials = raw.map((r) => (r.error === undefined ? undefined : deniedInText(r.error)));
          const results = raw.map((r, i) => ({ ...r, error: denials[i]?.text ?? r.error }));
          const failed = results.filter((r) => !r.ok);
          if (json)
            out(
              JSON.stringify(
                { results: results.map((r) => ({ action: r.item.action, ok: r.ok, error: r.error ?? null })) },
                null,
                2,
              ),
            );
          else {
            if (results.length === 0) out('Nothing to collect.');
            for (const r of results)
              out(`${r.ok ? 'done' : 'FAILED'}: ${r.item.action}${r.error ? `: ${r.error}` : ''}`);
            if (undecided)
              out(
                'Note: xenstore is not reachable, so records were not judged; if Xen is not running, use --without-xenstore.',
              );
          }
          const count = `${failed.length} of ${results.length} removal${results.length === 1 ? '' : 's'} failed`;
          const denied = isRoot ? undefined : denials.find((d) => d !== undefined);
          if (denied) return fail(`--apply must run as root (${denied.denied}; ${count})`);
          if (failed.length) return fail(`${count}: ${failed.map((f) => f.error).join('; ')}`);
          return 0;
        } finally {
          await xs?.close().catch(() => {});
          if (log && !deps.logger) await log.close();
        }
      }
      case 'resize':
      case 'grow': {
        if (p.positional.length !== 3) return usage(`expected DOMAIN VDEV SIZE, e.g. "${cmd} web xvda +1G"`, cmd);
        const [domain, vdev, size] = p.positional as [string, string, string];
        try {
          parseGrowSize(size);
          if (cmd === 'resize' && isDiskSpec(vdev)) parseDisk(vdev);
          else vdevToDevid(vdev);
        } catch (e) {
          if (e instanceof GrowError || e instanceof VdevError || e instanceof DiskSpecError)
            return usage(e.message, cmd);
          throw e;
        }
        needConfig();
        const log = deps.logger ?? cliLogger(config);
        const d = { config, run, log, out };
        try {
          if (cmd === 'resize')
            await withProgress(`resize: resizing ${domain}/${vdev}`, err, () =>
              resize(domain, vdev, size, d, { shrink: flag(p, 'shrink') }),
            );
          else
            await withProgress(`grow: growing ${domain}/${vdev}`, err, () =>
              grow(domain, vdev, size, d, { metadata: flag(p, 'metadata') }),
            );
          return 0;
        } finally {
          if (!deps.logger) await log.close();
        }
      }
      case 'watch': {
        if (p.positional.length) return usage(`unexpected argument "${p.positional[0]}"`, cmd);
        needConfig();
        const interval = int(p, 'interval');
        const log = deps.logger ?? createLogger({ tag: 'xen-blockhooks', file: config.logFile, stderr: false });
        try {
          return await watch(
            { once: flag(p, 'once'), ...(interval !== undefined ? { intervalMs: interval } : {}) },
            { config, run, log, out, err, ...(deps.stopSignal ? { stop: deps.stopSignal } : {}) },
          );
        } finally {
          if (!deps.logger) await log.close();
        }
      }
      case 'serve': {
        if (p.positional.length) return usage(`unexpected argument "${p.positional[0]}"`, cmd);
        const dir = str(p, 'dir');
        if (dir !== undefined && !dir.startsWith('/')) return usage(`--dir needs an absolute path, not "${dir}"`, cmd);
        const interval = int(p, 'interval');
        needConfig();
        const log = deps.logger ?? createLogger({ tag: 'xen-blockhooks', file: config.logFile, stderr: false });
        try {
          return await serve(
            {
              ...(dir !== undefined ? { dir } : {}),
              watch: !flag(p, 'no-watch'),
              ...(interval !== undefined ? { intervalMs: interval } : {}),
            },
            {
              config,
              run,
              log,
              out,
              err,
              env,
              version: deps.version ?? 'development',
              ...(deps.stopSignal ? { stop: deps.stopSignal } : {}),
            },
          );
        } finally {
          if (!deps.logger) await log.close();
        }
      }
      case 'open':
      case 'close': {
        let target: OpenTarget;
        try {
          target = parseOpenTarget(p.positional);
        } catch (e) {
          if (e instanceof OpenError || e instanceof VdevError) return usage(e.message, cmd);
          throw e;
        }
        needConfig();
        // Only --rw asks xenstore (whether a domain has the disk).
        const xs = cmd === 'open' && flag(p, 'rw') ? await tryConnect() : undefined;
        const log = deps.logger ?? cliLogger(config);
        try {
          if (cmd === 'open') {
            const opened = await withProgress(`open: mapping the partitions of ${p.positional.join(' ')}`, err, () =>
              openTarget(target, { rw: flag(p, 'rw') }, { config, run, log, xs }),
            );
            for (const l of renderOpened(opened)) out(l);
          } else {
            const closed = await withProgress(
              `close: removing the partition maps of ${p.positional.join(' ')}`,
              err,
              () => closeTarget(target, { config, run, log, xs: undefined }),
            );
            out(`closed ${closed.what}${closed.removed.length ? `: removed ${closed.removed.join(', ')}` : ''}`);
          }
          return 0;
        } finally {
          await xs?.close().catch(() => {});
          if (!deps.logger) await log.close();
        }
      }
      case 'xenstored': {
        const socketPath = str(p, 'socket');
        if (!socketPath) return usage('--socket PATH is required', cmd);
        if (p.positional.length) return usage(`unexpected argument "${p.positional[0]}"`, cmd);
        const server = await startXenstoreServer({ socketPath });
        out(`xenstore server listening on ${socketPath}; XENSTORED_PATH=${socketPath}`);
        await (deps.stopSignal ??
          new Promise<void>((res) => {
            process.once('SIGINT', () => res());
            process.once('SIGTERM', () => res());
          }));
        await server.close();
        return 0;
      }
    }
  } catch (e) {
    if (e instanceof ConfigError) {
      err(`xen-blockhooks: configuration error: ${e.message}`);
      return 1;
    }
    const denied = permissionSentence(e, isRoot);
    if (denied) return fail(denied);
    if (
      e instanceof DiskSpecError ||
      e instanceof VdevError ||
      e instanceof GrowError ||
      e instanceof AlreadyRunningError ||
      e instanceof ServeSetupError ||
      e instanceof OpenError
    )
      return fail(e.message);
    if (
      e instanceof Error &&
      (e.name === 'XsError' || e.name === 'LockTimeoutError' || (e as NodeJS.ErrnoException).code !== undefined)
    )
      return fail(e.message);
    throw e;
  }
  return 0;
}
