/**
 * The resident service in tests, for both tiers: the wrapper as ./install writes it (from
 * packaging/wrapper.sh.in, running a bundle of dist/ with this node), `xen-blockhooks serve`
 * started as a child process on a channel directory of the test's own, and a hook event run
 * through the wrapper the way libxl execs a script.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { projectRoot } from './project-root.js';
import type { HookRun } from './backend-nodes.js';

/** Write `<dir>/<name>`: the installed wrapper of hook `name`, running dist/<name>.mjs with this node. */
export function writeWrapper(dir: string, name: string): string {
  const root = projectRoot();
  const lib = join(dir, 'lib');
  mkdirSync(lib, { recursive: true });
  writeFileSync(join(lib, 'node'), `${process.execPath}\n`);
  const text = readFileSync(join(root, 'packaging/wrapper.sh.in'), 'utf8')
    .replaceAll('@NAME@', name)
    .replaceAll('@LIBDIR@', lib)
    .replace('@BUNDLE@', join(root, 'dist', `${name}.mjs`))
    .replace('@SNAPSHOT@', '')
    .replace('@CONF@', '');
  const path = join(dir, name);
  writeFileSync(path, text, { mode: 0o755 });
  return path;
}

export interface Served {
  child: ChildProcess;
  dir: string;
  pid: number;
  exited: Promise<number | null>;
  stderr: () => string;
  /** SIGTERM (unless it already ended) and its exit code. */
  stop(): Promise<number | null>;
}

/** `xen-blockhooks serve --no-watch --dir DIR` with `env`, ready once its pid file names it. */
export async function startServe(dir: string, env: NodeJS.ProcessEnv): Promise<Served> {
  const cli = join(projectRoot(), 'dist', 'xen-blockhooks.mjs');
  const child = spawn(process.execPath, [cli, 'serve', '--no-watch', '--dir', dir], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  child.stderr?.on('data', (b: Buffer) => (err += b.toString()));
  child.stdout?.resume();
  const exited = new Promise<number | null>((res) => child.on('exit', (code) => res(code)));
  const pid = child.pid as number;
  for (let i = 0; i < 600; i++) {
    try {
      if (readFileSync(join(dir, 'pid'), 'utf8').trim() === String(pid)) break;
    } catch {}
    if (child.exitCode !== null) throw new Error(`serve exited ${child.exitCode}: ${err}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  if (!existsSync(join(dir, 'pid'))) throw new Error(`serve did not start: ${err}`);
  return {
    child,
    dir,
    pid,
    exited,
    stderr: () => err,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      return exited;
    },
  };
}

/** Run the wrapper `wrapper action` with XENBUS_PATH set, as libxl execs a block script. */
export function runWrapper(
  wrapper: string,
  action: string,
  xenbusPath: string,
  env: NodeJS.ProcessEnv,
): Promise<HookRun> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const child = spawn(wrapper, [action], {
      env: { ...env, XENBUS_PATH: xenbusPath, XENBUS_TYPE: 'vbd', XENBUS_BASE_PATH: 'backend', script: wrapper },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('error', reject);
    child.on('close', (code, signal) =>
      resolve({ code, signal, stdout, stderr, ms: Math.round(performance.now() - t0) }),
    );
  });
}
