/**
 * `xen-blockhooks serve`: the resident service. It keeps Node, the bundled hooks and their
 * modules loaded, takes each hook event a wrapper hands over (protocol.ts) and runs it through
 * the same `runHook` a per-event hook runs: same journal, xenstore writes, log lines and locks.
 * Events run concurrently; what two of them share (a backend path, a base, a pool, Xen's block
 * lock) serialises them through those same flocks, whose owner is an open file description, so
 * two events of one process exclude each other as two processes do.
 *
 * Its contract with the wrapper: a taken request is answered with `a PID` at once, then `h` every
 * HEARTBEAT_MS until `x CODE`. A wrapper that hears nothing for 10 s takes the service
 * for dead or hung, kills it if it still runs, and runs the event itself, where the journal
 * record finishes or undoes what the service began. So the service never has to be trusted to
 * finish: it only has to be fast when it is up.
 *
 * An add whose wrapper dies (libxl kills a script at 40 s) is abandoned: checked before each of
 * its steps, it stops before the next one, undoes what it built and writes nothing to xenstore, so the remove libxl runs next does not wait behind an add nobody is waiting for. A
 * remove whose wrapper dies runs to its end.
 *
 * SIGTERM or SIGINT: no new event is taken (a wrapper waiting for `a` revokes its request and
 * runs the event itself), the events in flight finish, then the service exits 0.
 */
import { constants, lstatSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, unlinkSync } from 'node:fs';
import { closeSync, writeSync } from 'node:fs';
import { Socket } from 'node:net';
import { join } from 'node:path';
import type { Backend } from '../backends/types.js';
import type { Runner } from '../devices/runner.js';
import { messageOf } from '../disk/errors.js';
import { runHook } from '../hotplug/main.js';
import { parseArgs } from '../hotplug/request.js';
import { processAlive } from '../journal/journal.js';
import type { Logger } from '../log/logger.js';
import { claimSingleInstance } from '../lock/instance.js';
import { countFaultsFromHere, holdFaults } from '../devices/exec.js';
import type { HeldLock } from '../lock/flock.js';
import { HEARTBEAT_MS, outputLines, parseRequest, parseSlotLine, ProtocolError, SLOTS } from './protocol.js';

export const DEFAULT_SERVE_DIR = '/run/xen-blockhooks/serve';

/** The event is an add (in either dialect, whatever options come first). */
function isAdd(hook: string, argv: readonly string[], env: NodeJS.ProcessEnv): boolean {
  try {
    const p = parseArgs(hook, argv, env);
    return p.kind === 'request' && p.request.action === 'add';
  } catch {
    return false; // a usage error: refused by the hook itself, nothing built
  }
}

export interface ServeDeps {
  dir: string;
  hooks: (name: string) => Backend | undefined;
  run: Runner;
  log: Logger;
  version: string;
  /** Resolves when the service should stop. */
  stop: Promise<void>;
}

export class ServeSetupError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ServeSetupError';
  }
}

function isEnoent(e: unknown): boolean {
  return (e as NodeJS.ErrnoException)?.code === 'ENOENT';
}

/** The parent of process `pid` (from /proc/PID/stat), or undefined when it is gone. */
export function parentOf(pid: number, procRoot = '/proc'): number | undefined {
  try {
    const stat = readFileSync(`${procRoot}/${pid}/stat`, 'latin1');
    // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses; the last ")" ends it.
    const m = /^[A-Za-z] (\d+) /.exec(stat.slice(stat.lastIndexOf(')') + 2));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** Only the service's own user (root) may enter the channel directory; refuse to use one others can. */
export function prepareDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = lstatSync(dir);
  const uid = process.getuid?.() ?? 0;
  if (!st.isDirectory()) throw new ServeSetupError(`${dir} is not a directory`);
  if (st.uid !== uid) throw new ServeSetupError(`${dir} belongs to uid ${st.uid}, not to this service's uid ${uid}`);
  if ((st.mode & 0o077) !== 0)
    throw new ServeSetupError(
      `${dir} has mode ${(st.mode & 0o777).toString(8)}: others could hand over events; it must be 0700`,
    );
}

/** The FIFOs of the channel that are missing (an entry of another kind is removed first). */
function missingFifos(dir: string): string[] {
  const want = ['in', ...Array.from({ length: SLOTS }, (_, k) => `${k}.out`)];
  const out: string[] = [];
  for (const name of want) {
    const p = join(dir, name);
    try {
      if (lstatSync(p).isFIFO()) continue;
      unlinkSync(p);
    } catch (e) {
      if (!isEnoent(e)) throw e;
    }
    out.push(p);
  }
  return out;
}

/*
 * The slot helpers look before they touch: a slot is idle most of the time, and a failed read or
 * unlink builds an exception, which a 256-slot sweep on a slow dom0 pays for in CPU time.
 */
function claimPid(dir: string, slot: number): number | undefined {
  const p = join(dir, `${slot}.claim`);
  try {
    if (!lstatSync(p, { throwIfNoEntry: false })) return undefined;
    const s = readFileSync(p, 'utf8').trim();
    return /^\d+$/.test(s) ? Number(s) : undefined;
  } catch {
    return undefined;
  }
}

function unlinkQuiet(p: string): void {
  try {
    if (!lstatSync(p, { throwIfNoEntry: false })) return;
    unlinkSync(p);
  } catch {}
}

/** A slot is free again once its claim's wrapper has ended: claim, request and revoked copies go. */
function freeSlot(dir: string, slot: number): void {
  for (const s of ['req', 'taken', 'revoked', 'claim']) unlinkQuiet(join(dir, `${slot}.${s}`));
}

/**
 * Events run at once; more wait their turn, answered and sent heartbeats meanwhile. Starting a
 * child process holds Node's loop for a moment (100 ms and more in a slow dom0), so forty events
 * starting their commands together would hold back the heartbeats of all of them until wrappers
 * took the service for hung. What the events share serialises most of their work anyway.
 */
export const MAX_RUNNING_EVENTS = 6;

export class Service {
  private readonly inFlight = new Set<Promise<void>>();
  private running = 0;
  private readonly waiting: (() => void)[] = [];
  /** Slots whose event runs: never freed, whatever became of their wrapper. */
  private readonly busy = new Set<number>();
  private instance: HeldLock | undefined;
  private stopping = false;
  private sweepTimer: NodeJS.Timeout | undefined;

  constructor(private readonly d: ServeDeps) {}

  /** Make the channel and start taking events; returns when stopped and every event in flight ended. */
  async run(): Promise<void> {
    const { dir } = this.d;
    holdFaults();
    prepareDir(dir);
    // One service per channel: a second one would take the first one's events and its pid file.
    this.instance = await claimSingleInstance(join(dir, 'serve.lock'), 'xen-blockhooks serve', {
      runner: this.d.run,
    });
    try {
      await this.serve();
    } finally {
      await this.instance.release();
    }
  }

  private async serve(): Promise<void> {
    const { dir } = this.d;
    const fifos = missingFifos(dir);
    if (fifos.length) await this.d.run.run('mkfifo', ['-m', '0600', '--', ...fifos]);
    // A request left by a wrapper that is still waiting (handed over to a service that stopped)
    // is taken now; everything of a wrapper that has ended goes.
    const pending: number[] = [];
    for (let k = 0; k < SLOTS; k++) {
      const pid = claimPid(dir, k);
      if (pid === undefined || !processAlive(pid)) freeSlot(dir, k);
      else {
        unlinkQuiet(join(dir, `${k}.taken`));
        pending.push(k);
      }
    }
    for (const name of readdirSync(dir)) if (name.endsWith('.tmp')) unlinkQuiet(join(dir, name));
    const fd = openSync(join(dir, 'in'), constants.O_RDWR | constants.O_NONBLOCK | constants.O_NOFOLLOW);
    const input = new Socket({ fd, readable: true, writable: false });
    let buffered = '';
    input.setEncoding('latin1');
    input.on('data', (chunk: string) => {
      buffered += chunk;
      let nl: number;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        this.take(line);
      }
      if (buffered.length > 64) buffered = ''; // no line is this long: noise
    });
    input.on('error', (e) => this.d.log.warn(`serve: reading ${dir}/in: ${messageOf(e)}`));
    this.writePid();
    countFaultsFromHere();
    for (const k of pending) this.take(String(k));
    this.sweepTimer = setInterval(() => this.sweep(), 30_000);
    this.sweepTimer.unref();
    this.d.log.info(`serve: started, channel ${dir}`);
    await this.d.stop;
    this.stopping = true;
    input.destroy();
    clearInterval(this.sweepTimer);
    unlinkQuiet(join(dir, 'pid'));
    while (this.inFlight.size) await Promise.allSettled([...this.inFlight]);
    this.sweep();
    this.d.log.info('serve: stopped');
  }

  private writePid(): void {
    const tmp = join(this.d.dir, `pid.${process.pid}.tmp`);
    const fd = openSync(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW, 0o600);
    writeSync(fd, `${process.pid}\n`);
    closeSync(fd);
    renameSync(tmp, join(this.d.dir, 'pid'));
  }

  /** Free every slot whose wrapper has ended (a wrapper that fell back and ended, one that died). */
  private sweep(): void {
    for (let k = 0; k < SLOTS; k++) {
      if (this.busy.has(k)) continue;
      const pid = claimPid(this.d.dir, k);
      if (pid !== undefined && !processAlive(pid)) freeSlot(this.d.dir, k);
    }
  }

  private take(line: string): void {
    if (this.stopping) return;
    const slot = parseSlotLine(line);
    if (slot === undefined) {
      this.d.log.warn(`serve: refused a line on ${this.d.dir}/in that names no slot`);
      return;
    }
    const p = this.event(slot).catch((e: unknown) =>
      this.d.log.error(`serve: slot ${slot}: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`),
    );
    this.inFlight.add(p);
    void p.finally(() => this.inFlight.delete(p));
  }

  /** Wait for a free place among the MAX_RUNNING_EVENTS; the function given back frees it. */
  private async turn(): Promise<() => void> {
    while (this.running >= MAX_RUNNING_EVENTS) await new Promise<void>((r) => this.waiting.push(r));
    this.running += 1;
    let freed = false;
    return () => {
      if (freed) return;
      freed = true;
      this.running -= 1;
      this.waiting.shift()?.();
    };
  }

  private async event(slot: number): Promise<void> {
    if (this.busy.has(slot)) return; // a second line naming a slot whose event runs
    this.busy.add(slot);
    try {
      await this.eventIn(slot);
    } finally {
      this.busy.delete(slot);
    }
  }

  private async eventIn(slot: number): Promise<void> {
    const { dir } = this.d;
    const taken = join(dir, `${slot}.taken`);
    try {
      renameSync(join(dir, `${slot}.req`), taken);
    } catch (e) {
      if (isEnoent(e)) return; // revoked by its wrapper, or a line naming an idle slot
      throw e;
    }
    // Read only a plain file of ours: a link would make the service read what it points to.
    let bytes: Buffer | undefined;
    try {
      const st = lstatSync(taken);
      if (st.isFile() && st.uid === (process.getuid?.() ?? 0) && st.nlink === 1) bytes = readFileSync(taken);
    } finally {
      unlinkQuiet(taken);
    }
    const out = this.openReply(slot);
    if (out === undefined) return;
    // Replies are whole lines, written in order; what the FIFO cannot take now (a wrapper slow to
    // read a lot of output) waits and is retried, so no line is cut or lost. Nothing is written
    // after the fd is closed (its number may belong to something else by then).
    let pending = Buffer.alloc(0);
    let closed = false;
    let retry: NodeJS.Timeout | undefined;
    const flush = (): void => {
      retry = undefined;
      while (!closed && pending.length) {
        try {
          const n = writeSync(out, pending);
          pending = pending.subarray(n);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') pending = Buffer.alloc(0);
          break;
        }
      }
      if (!closed && pending.length && !retry) retry = setTimeout(flush, 20);
    };
    const say = (s: string): void => {
      if (closed) return;
      pending = Buffer.concat([pending, Buffer.from(s)]);
      flush();
    };
    /** Until every line is read, or its wrapper has ended (10 s at most). */
    const drained = async (pid: number | undefined): Promise<void> => {
      for (let i = 0; i < 500 && pending.length && (pid === undefined || processAlive(pid)); i++)
        await new Promise((r) => setTimeout(r, 20));
    };
    try {
      let req;
      try {
        if (!bytes) throw new ProtocolError('request is not a plain file of the service owner');
        req = parseRequest(bytes, slot, (n) => this.d.hooks(n) !== undefined);
        if (claimPid(dir, slot) !== req.pid) throw new ProtocolError(`the slot's claim is not pid ${req.pid}'s`);
      } catch (e) {
        if (!(e instanceof ProtocolError)) throw e;
        this.d.log.warn(`serve: refused the request on slot ${slot}: ${e.message}`);
        say(`r ${e.message}\n`);
        await drained(claimPid(dir, slot));
        return;
      }
      const backend = this.d.hooks(req.hook) as Backend;
      // Its pid: the wrapper watches this process from now on, not the one whose pid file it read.
      say(`a ${process.pid}\n`);
      const beat = setInterval(() => say('h\n'), HEARTBEAT_MS);
      // An add whose wrapper is gone (libxl kills a script at its timeout) is abandoned: it stops
      // before its next step and undoes itself, as the killed hook would have left it to be.
      const wrapperGone = isAdd(req.hook, req.argv, req.env) ? () => !processAlive(req.pid) : undefined;
      const caller = parentOf(req.pid);
      let code: number;
      const done = await this.turn();
      try {
        if (wrapperGone?.()) {
          // Its wrapper died while the event waited for its turn: nothing was begun.
          this.d.log.warn(
            `serve: ${req.hook} ${req.argv.join(' ')} ${req.env.XENBUS_PATH ?? ''}: its wrapper is gone before it began (killed at libxl's timeout?); not run`,
          );
          code = 1;
        } else
          code = await runHook(
            backend,
            req.argv,
            // The wrapper's own variables, and none of the service's: the event sees what the hook would.
            { ...req.env },
            {
              version: this.d.version,
              out: (s) => void say(outputLines('o', s)),
              err: (s) => void say(outputLines('e', s)),
              ...(backend.script === 'block' ? { typeDispatch: true } : {}),
              ...(wrapperGone ? { abandoned: wrapperGone } : {}),
              // Who ran the wrapper (xl save or xl destroy?) is what the hook asks its own parent.
              ...(caller !== undefined ? { parentPid: caller } : {}),
            },
          );
      } catch (e) {
        say(
          outputLines('e', `${req.hook}: internal error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`),
        );
        code = 70;
      } finally {
        done();
        clearInterval(beat);
      }
      say(`x ${code}\n`);
      await drained(req.pid);
      this.release(slot, req.pid);
    } finally {
      closed = true;
      if (retry) clearTimeout(retry);
      closeSync(out);
    }
  }

  /** The reply FIFO, opened without blocking whether or not its wrapper is there. */
  private openReply(slot: number): number | undefined {
    const p = join(this.d.dir, `${slot}.out`);
    try {
      if (!lstatSync(p).isFIFO()) throw new Error('not a FIFO');
      return openSync(p, constants.O_RDWR | constants.O_NONBLOCK | constants.O_NOFOLLOW);
    } catch (e) {
      this.d.log.warn(`serve: slot ${slot}: cannot open ${p}: ${messageOf(e)}`);
      return undefined;
    }
  }

  /** Free the slot once its wrapper has read its answer and ended. */
  private release(slot: number, pid: number): void {
    let tries = 0;
    const check = (): void => {
      if (this.busy.has(slot) || claimPid(this.d.dir, slot) !== pid) return; // taken again, or freed
      if (!processAlive(pid)) freeSlot(this.d.dir, slot);
      else if (++tries < 300) setTimeout(check, 20 + Math.min(tries * 10, 500)).unref();
      // beyond that the 30 s sweep frees it
    };
    setTimeout(check, 5).unref();
  }
}
