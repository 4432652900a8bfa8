/**
 * The production Runner: node:child_process.spawn with argument arrays (never a shell), a clean
 * environment and bounded time (SIGTERM, then SIGKILL). Errors are values: a command that fails,
 * cannot start or times out gives a RunResult with `failed: true`; `run` turns that into a
 * CommandError. spawn rather than execa: a hook runs a few short commands, so the first call's
 * cost is most of the cost (BENCHMARKS.md).
 *
 * A command ends when its output streams close, so everything it printed is in; if something it
 * left running still holds them (a daemon), it ends OUTPUT_GRACE_MS after the command exited, with
 * the output so far. The grace is counted in GRACE_TICKS interval ticks, not one timer: libuv may
 * reap a child before polling its pipes, and a long turn would let a single timer fire before
 * output already written is read.
 * Commands still running when this process exits (a thrown error mid-command) are killed.
 *
 * Test-only fault point: XEN_BLOCKHOOKS_FAULT_KILL_AFTER=N makes the process SIGKILL itself right
 * after its N-th external command, as libxl's timeout kills a hook. Nothing sets it in production.
 */
import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import { DEFAULT_TIMEOUT_MS, type RunOptions, type RunResult, type Runner, CommandError } from './runner.js';

const PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/** Variables passed on to device tools; everything else from xl's environment is dropped. */
const PASSED_ENV = ['DM_DISABLE_UDEV', 'LVM_SYSTEM_DIR', 'XENSTORED_PATH'];

/** After a timeout's SIGTERM, SIGKILL follows this much later. */
export const KILL_GRACE_MS = 1000;

/** A command's output streams are closed this long after it exited, if they have not closed by then. */
export const OUTPUT_GRACE_MS = 1000;

/** That time is counted in this many ticks of OUTPUT_GRACE_MS / GRACE_TICKS, each after a poll of the pipes. */
export const GRACE_TICKS = 10;

/** More output than this from one command is an error (device tools print a few kilobytes). */
export const MAX_OUTPUT_BYTES = 64 * 1024 * 1024;

export function childEnv(env: NodeJS.ProcessEnv = process.env): Record<string, string> {
  const out: Record<string, string> = { PATH, LANG: 'C', LC_ALL: 'C' };
  for (const k of PASSED_ENV) {
    const v = env[k];
    if (v !== undefined) out[k] = v;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// the command line as a person would type it (POSIX shell quoting, control characters escaped)

const PLAIN = /^[\w./-]+$/;
const COMMON_ESCAPES: Record<string, string> = { '\b': '\\b', '\f': '\\f', '\n': '\\n', '\r': '\\r', '\t': '\\t' };
// Control characters, and separators other than the plain space, are shown escaped.
// eslint-disable-next-line no-control-regex
const SPECIAL = /[\u0000-\u001f\u007f-\u009f\u00ad\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]/g;

function escapeControl(s: string): string {
  return s.replace(SPECIAL, (c) => COMMON_ESCAPES[c] ?? `\\u${c.codePointAt(0)!.toString(16).padStart(4, '0')}`);
}

/** One argument quoted for a POSIX shell: bare when harmless, else in single quotes. */
export function quoteArg(arg: string): string {
  const s = escapeControl(arg);
  return PLAIN.test(s) ? s : `'${s.replaceAll("'", "'\\''")}'`;
}

export function commandLine(file: string, args: readonly string[]): string {
  return [file, ...args].map(quoteArg).join(' ');
}

// ---------------------------------------------------------------------------------------------
// children still running when the process exits

const running = new Set<ChildProcess>();
let exitHook = false;

function track(child: ChildProcess): void {
  running.add(child);
  if (!exitHook) {
    exitHook = true;
    process.once('exit', () => {
      for (const c of running) c.kill('SIGKILL');
    });
  }
}

// ---------------------------------------------------------------------------------------------

let commandsRun = 0;
let faultsHeld = false;

/** No fault point fires until countFaultsFromHere(): a long-running process's own start. */
export function holdFaults(): void {
  faultsHeld = true;
}

/** The fault points count from here: a long-running process counts its events' commands only. */
export function countFaultsFromHere(): void {
  commandsRun = 0;
  faultsHeld = false;
}

function faultPoint(): void {
  if (faultsHeld) return;
  commandsRun += 1;
  // Read at run time, not when the module loads: a startup snapshot would keep the value its builder had.
  const killAfter = Number(process.env.XEN_BLOCKHOOKS_FAULT_KILL_AFTER ?? 0);
  if (killAfter > 0 && commandsRun >= killAfter) process.kill(process.pid, 'SIGKILL');
  // A process that hangs instead (stopped: alive, holding its locks, answering nothing).
  const stopAfter = Number(process.env.XEN_BLOCKHOOKS_FAULT_STOP_AFTER ?? 0);
  if (stopAfter > 0 && commandsRun >= stopAfter) process.kill(process.pid, 'SIGSTOP');
}

/** Run one command to its end; never throws, never rejects. */
function spawnCommand(
  file: string,
  args: readonly string[],
  opts: RunOptions & { env: Record<string, string> },
): Promise<RunResult> {
  const command = commandLine(file, args);
  const started = process.hrtime.bigint(); // not performance.now(): that loads perf_hooks on first use
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const stdio: StdioOptions = [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe', ...(opts.extraFds ?? [])];

  const result = (r: Omit<RunResult, 'command' | 'durationMs'>): RunResult => ({
    command,
    durationMs: Number(process.hrtime.bigint() - started) / 1e6,
    ...r,
  });

  let child: ChildProcess;
  try {
    child = spawn(file, args, { env: opts.env, stdio, windowsHide: true });
  } catch (e) {
    // Synchronous failures (a NUL in an argument, a bad fd): the command never started.
    return Promise.resolve(
      result({
        exitCode: undefined,
        signal: undefined,
        stdout: '',
        stderr: (e as Error).message,
        failed: true,
        timedOut: false,
      }),
    );
  }
  track(child);

  return new Promise<RunResult>((resolveResult) => {
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let bytes = 0;
    let timedOut = false;
    let tooMuch = false;
    let spawnError: Error | undefined;
    let done = false;
    let killTimer: NodeJS.Timeout | undefined;
    let drainTimer: NodeJS.Timeout | undefined;

    const stop = (): void => {
      child.kill('SIGTERM');
      killTimer = setTimeout(() => child.kill('SIGKILL'), KILL_GRACE_MS);
      killTimer.unref();
    };
    const timer = setTimeout(() => {
      timedOut = true;
      stop();
    }, timeoutMs);

    const finish = (code: number | null, signal: NodeJS.Signals | null): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      clearTimeout(killTimer);
      clearInterval(drainTimer);
      running.delete(child);
      let stderr = Buffer.concat(err).toString('utf8');
      if (spawnError) stderr = stderr === '' ? spawnError.message : `${stderr}\n${spawnError.message}`;
      if (tooMuch) stderr = `${stderr}\n${command} printed more than ${MAX_OUTPUT_BYTES} bytes`.trimStart();
      const exitCode = spawnError || code === null ? undefined : code;
      resolveResult(
        result({
          exitCode,
          signal: signal ?? undefined,
          stdout: Buffer.concat(out).toString('utf8'),
          stderr,
          failed: timedOut || tooMuch || spawnError !== undefined || signal !== null || exitCode !== 0,
          timedOut,
        }),
      );
    };

    const collect = (into: Buffer[]) => (chunk: Buffer) => {
      bytes += chunk.length;
      if (bytes > MAX_OUTPUT_BYTES) {
        if (!tooMuch) {
          tooMuch = true;
          stop();
        }
        return;
      }
      into.push(chunk);
    };
    child.stdout?.on('data', collect(out));
    child.stderr?.on('data', collect(err));
    child.on('error', (e) => {
      spawnError ??= e;
      // A child that never started emits no 'close' when it has no streams.
      if (child.pid === undefined) finish(null, null);
    });
    child.on('close', (code, signal) => finish(code, signal));
    child.on('exit', (code, signal) => {
      // Normally 'close' comes first. An interval never fires twice in one loop turn, so the pipes
      // are polled between any two ticks (see the header).
      let ticks = 0;
      drainTimer = setInterval(() => {
        if (++ticks < GRACE_TICKS) return;
        child.stdout?.destroy();
        child.stderr?.destroy();
        finish(code, signal);
      }, OUTPUT_GRACE_MS / GRACE_TICKS);
    });
    if (child.stdin) {
      child.stdin.on('error', () => {}); // the command may exit without reading all of it
      child.stdin.end(opts.input);
    }
  });
}

export function execRunner(env: NodeJS.ProcessEnv = process.env): Runner {
  const baseEnv = childEnv(env);
  async function exec(file: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
    const r = await spawnCommand(file, args, { ...opts, env: baseEnv });
    faultPoint();
    return r;
  }
  return {
    async run(file, args, opts) {
      const r = await exec(file, args, opts);
      if (r.failed) throw new CommandError(r);
      return r;
    },
    probe: exec,
  };
}
