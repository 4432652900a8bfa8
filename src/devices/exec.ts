/**
 * The production Runner: execa with argument arrays, a clean environment and bounded time.
 *
 * Test-only fault point: when XEN_BLOCKHOOKS_FAULT_KILL_AFTER=N is set, the process SIGKILLs
 * itself right after its N-th external command has finished, the way libxl's timeout kills a
 * hook. Nothing sets it in production; the fault-injection suite uses it to stop a hook after
 * every step in turn.
 */
import { execa } from 'execa';
import { CommandError, DEFAULT_TIMEOUT_MS, type RunOptions, type RunResult, type Runner } from './runner.js';

const PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/** Variables passed on to device tools; everything else from xl's environment is dropped. */
const PASSED_ENV = ['DM_DISABLE_UDEV', 'LVM_SYSTEM_DIR', 'XENSTORED_PATH'];

export function childEnv(env: NodeJS.ProcessEnv = process.env): Record<string, string> {
  const out: Record<string, string> = { PATH, LANG: 'C', LC_ALL: 'C' };
  for (const k of PASSED_ENV) {
    const v = env[k];
    if (v !== undefined) out[k] = v;
  }
  return out;
}

let commandsRun = 0;

function faultPoint(): void {
  commandsRun += 1;
  // Read at run time, not when the module loads: a startup snapshot would keep the value its builder had.
  const killAfter = Number(process.env.XEN_BLOCKHOOKS_FAULT_KILL_AFTER ?? 0);
  if (killAfter > 0 && commandsRun >= killAfter) process.kill(process.pid, 'SIGKILL');
}

export function execaRunner(env: NodeJS.ProcessEnv = process.env): Runner {
  const baseEnv = childEnv(env);
  async function exec(file: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
    const extra = opts.extraFds ?? [];
    const r = await execa(file, args, {
      reject: false,
      extendEnv: false,
      env: baseEnv,
      timeout: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      forceKillAfterDelay: 1000,
      ...(opts.input === undefined ? {} : { input: opts.input }),
      // execa passes a raw fd number through to child_process; its types only list streams.
      stdio: (opts.detached
        ? ['ignore', 'ignore', 'ignore', ...extra]
        : [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe', ...extra]) as unknown as ['ignore', 'pipe', 'pipe'],
      detached: opts.detached ?? false,
      cleanup: !opts.detached,
      stripFinalNewline: false,
    });
    faultPoint();
    return {
      command: r.escapedCommand,
      exitCode: r.exitCode,
      signal: r.signal,
      stdout: typeof r.stdout === 'string' ? r.stdout : '',
      stderr: typeof r.stderr === 'string' ? r.stderr : '',
      durationMs: r.durationMs,
      failed: r.failed,
      timedOut: r.timedOut,
    };
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
