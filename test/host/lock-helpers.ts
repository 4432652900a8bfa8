/**
 * Helpers for the lock tests: a locking.sh-compatible shell holder, a bundled Node holder that
 * uses src/lock/flock.ts in a separate process, and a way to see that a process is queued on a
 * flock (the "->" lines of /proc/locks), so tests wait for facts rather than for time.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, readFileSync, statSync, writeFileSync, constants as fsc } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, '..', '..');

/**
 * locking.sh's claim_lock/release_lock as Debian's Xen 4.17 ships them (flock on fd 200+i, then
 * compare `stat -L -c %D.%i` of the fd, through /dev/stdin, with the path), driven by arguments:
 *   lockshell.sh LOCK_BASEDIR NAME GOFILE
 * prints "locked" once it holds the lock, waits until GOFILE exists, releases, prints "released".
 */
export const LOCKING_SH = String.raw`#!/bin/bash
LOCK_BASEDIR="$1"
_setlockfd()
{
    local i
    for ((i = 0; i < ${'$'}{#_lockdict}; i++))
    do [ -z "${'$'}{_lockdict[$i]}" -o "${'$'}{_lockdict[$i]}" = "$1" ] && break
    done
    _lockdict[$i]="$1"
    let _lockfd=200+i
    _lockfile="$LOCK_BASEDIR/$1"
}
claim_lock()
{
    mkdir -p "$LOCK_BASEDIR"
    _setlockfd $1
    while true; do
        eval "exec $_lockfd<>$_lockfile"
        flock -x $_lockfd || return $?
        if stat=$( stat -L -c '%D.%i' /dev/stdin $_lockfile 0<&$_lockfd 2>/dev/null )
        then
            local file_stat
            local fd_stat
            fd_stat=$( echo "$stat" | sed -n 1p )
            file_stat=$( echo "$stat" | sed -n 2p )
            if [ "$fd_stat" = "$file_stat" ] ; then break; fi
        fi
        eval "exec $_lockfd<&-"
    done
}
release_lock()
{
    _setlockfd $1
    rm "$_lockfile"
}
claim_lock "$2"
echo locked
while [ ! -e "$3" ]; do sleep 0.02; done
release_lock "$2"
echo released
`;

export function writeLockingSh(dir: string): string {
  const p = join(dir, 'lockshell.sh');
  writeFileSync(p, LOCKING_SH, { mode: 0o755 });
  return p;
}

/**
 * A Node program that uses the real acquireFlock in another process:
 *   holder.mjs hold PATH            acquire, print "locked", hold until killed or stdin closes
 *   holder.mjs count PATH COUNTER LOG N   N times: lock, read-sleep-write COUNTER, log enter/exit
 */
const HOLDER_SRC = `
import { acquireFlock } from './flock.js';
import { appendFileSync, readFileSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
const [mode, path, ...rest] = process.argv.slice(2);
if (mode === 'hold') {
  const lock = await acquireFlock(path, { timeoutMs: 60000 });
  process.stdout.write('locked\\n');
  process.stdin.resume();
  process.stdin.on('end', async () => { await lock.release(); process.stdout.write('released\\n'); process.exitCode = 0; process.stdin.pause(); });
} else if (mode === 'count') {
  const [counter, log, n] = rest;
  for (let i = 0; i < Number(n); i++) {
    const lock = await acquireFlock(path, { timeoutMs: 60000 });
    appendFileSync(log, 'enter ' + process.pid + '\\n');
    const v = Number(readFileSync(counter, 'utf8'));
    await sleep(3);
    writeFileSync(counter, String(v + 1));
    appendFileSync(log, 'exit ' + process.pid + '\\n');
    await lock.release();
  }
}
`;

/** Bundle the holder into `dir` (inside the repository, so node_modules resolves). */
export async function buildHolder(dir: string): Promise<string> {
  const outfile = join(dir, 'holder.mjs');
  await build({
    stdin: { contents: HOLDER_SRC, resolveDir: join(repoRoot, 'src', 'lock'), loader: 'ts', sourcefile: 'holder.ts' },
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node18',
    packages: 'external',
    outfile,
    logLevel: 'error',
  });
  return outfile;
}

/** Spawn a process and resolve once a line equal to `line` appears on its stdout. */
export function spawnUntil(
  cmd: string,
  args: string[],
  line: string,
  timeoutMs = 30_000,
): Promise<{ child: ChildProcess; out: () => string }> {
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'inherit'] });
  let buf = '';
  return new Promise((res, rej) => {
    const timer = setTimeout(
      () => rej(new Error(`${cmd} ${args.join(' ')}: no "${line}" after ${timeoutMs} ms; output: ${buf}`)),
      timeoutMs,
    );
    child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      if (buf.split('\n').includes(line)) {
        clearTimeout(timer);
        res({ child, out: () => buf });
      }
    });
    child.on('exit', (code, sig) => {
      if (!buf.split('\n').includes(line)) {
        clearTimeout(timer);
        rej(new Error(`${cmd} exited (${code ?? sig}) before "${line}"; output: ${buf}`));
      }
    });
  });
}

/** Resolve when `child` prints `line` (it may have printed it already). */
export function waitLine(child: ChildProcess, line: string, already: () => string, timeoutMs = 30_000): Promise<void> {
  return new Promise((res, rej) => {
    if (already().split('\n').includes(line)) return res();
    let buf = already();
    const timer = setTimeout(() => rej(new Error(`no "${line}" after ${timeoutMs} ms`)), timeoutMs);
    child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      if (buf.split('\n').includes(line)) {
        clearTimeout(timer);
        res();
      }
    });
  });
}

/** Number of flock waiters ("->" lines of /proc/locks) queued on the file now at `path`. */
export function flockWaiters(path: string): number {
  let ino: number;
  try {
    ino = statSync(path).ino;
  } catch {
    return 0;
  }
  return readFileSync('/proc/locks', 'utf8')
    .split('\n')
    .filter((l) => l.includes('->') && / FLOCK /.test(l) && new RegExp(`:${ino} `).test(l)).length;
}

/** Poll until `cond()` holds; reject after `timeoutMs`. */
export async function until(cond: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** True if a plain `flock -n` on the path would fail right now (someone holds that file). */
export function pathIsLocked(path: string): boolean {
  return spawnSync('flock', ['-n', path, 'true']).status === 1;
}

/** A raw flock on `path` outside the protocol, step by step (for inode-swap scenarios). */
export function rawLock(path: string): number {
  const fd = openSync(path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_APPEND, 0o644);
  const r = spawnSync('flock', ['-x', '3'], { stdio: ['ignore', 'inherit', 'inherit', fd] });
  if (r.status !== 0) throw new Error(`flock failed: ${r.status}`);
  return fd;
}

export function rawClose(fd: number): void {
  closeSync(fd);
}

/** Promise state without awaiting it. */
export function tracked<T>(p: Promise<T>): { p: Promise<T>; settled: () => boolean } {
  let done = false;
  p.then(
    () => {
      done = true;
    },
    () => {
      done = true;
    },
  );
  return { p, settled: () => done };
}
