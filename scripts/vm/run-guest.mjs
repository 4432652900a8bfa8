// Boots the test guest (QEMU TCG, Debian's kernel, this machine's / read-only over 9p with a
// tmpfs overlay) and runs already-compiled test files — or any commands — in one boot.
//
//   node scripts/vm/run-guest.mjs [--shell] [--timeout SECONDS] [FILE...] [-- COMMAND ARG...]
//
// FILEs run as `node FILE`; a COMMAND after `--` runs as given (argv, no shell), e.g.
// `node scripts/vm/run-guest.mjs -- dmsetup targets`. --shell opens bash on the serial console
// after the jobs (exit it to power off; Ctrl-A X quits QEMU).
import { execFileSync, spawn } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildGuest, PROJECT_ROOT } from './build-guest.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const QEMU = 'qemu-system-x86_64';
const CONSOLE_KEEP = 64 * 1024;

function qemuArgs(guest, share, memoryMb) {
  return [
    '-accel',
    'tcg,thread=multi',
    '-cpu',
    'max',
    '-smp',
    '1',
    '-m',
    String(memoryMb),
    '-machine',
    'q35',
    '-nodefaults',
    '-no-user-config',
    '-nographic',
    '-serial',
    'stdio',
    '-monitor',
    'none',
    '-no-reboot',
    '-kernel',
    guest.vmlinux,
    '-initrd',
    guest.initrd,
    '-append',
    'console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init',
    '-virtfs',
    'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
    '-virtfs',
    `local,path=${share},mount_tag=shared,security_model=none,multidevs=remap`,
  ];
}

function readIf(file) {
  return existsSync(file) ? readFileSync(file, 'utf8') : '';
}

/**
 * Runs `files` (each as `node FILE`) and `commands` (argv arrays) in one guest boot.
 * Resolves to { ok, timedOut, qemuExit, readyMs, totalMs, consoleTail, results }, where each
 * result is { label, argv, finished, exitCode, signal, timedOut, durationMs, stdout, stderr,
 * leftovers, resetFailed, scratchLeft, ok }. Rejects only when the guest cannot be built or
 * QEMU cannot be started.
 */
export async function runInGuest({
  files = [],
  commands = [],
  env = {},
  timeoutMs = 300_000,
  fileTimeoutMs,
  onConsole,
  shell = false,
  cwd = PROJECT_ROOT,
  memoryMb = 2048,
  log = () => {},
} = {}) {
  const t0 = Date.now();
  const guest = await buildGuest({ log });
  try {
    execFileSync(QEMU, ['--version'], { stdio: 'ignore' });
  } catch {
    throw new Error(`${QEMU} cannot be run: install qemu-system-x86 (the guest tier needs it)`);
  }
  if (!existsSync(guest.pvh)) throw new Error(`${guest.pvh} missing: install qemu-system-data (PVH boot of vmlinux)`);

  const jobs = [
    ...files.map((f) => ({ label: f, argv: [process.execPath, resolve(f)] })),
    ...commands.map((argv) => ({ label: argv.join(' '), argv })),
  ].map((j, i) => ({ ...j, id: String(i).padStart(3, '0') }));

  const share = mkdtempSync(join(tmpdir(), 'xbh-guest-'));
  try {
    mkdirSync(join(share, 'results'));
    copyFileSync(join(HERE, 'guest-agent.mjs'), join(share, 'agent.mjs'));
    writeFileSync(join(share, 'node'), process.execPath);
    writeFileSync(
      join(share, 'plan.json'),
      JSON.stringify({
        cwd,
        env,
        jobs,
        shell,
        echo: Boolean(onConsole) || shell,
        fileTimeoutMs: fileTimeoutMs ?? timeoutMs,
      }),
    );

    let consoleText = '';
    let readyMs;
    const qemu = spawn(QEMU, qemuArgs(guest, share, memoryMb), {
      stdio: shell ? 'inherit' : ['ignore', 'pipe', 'pipe'],
    });
    const onData = (d) => {
      const s = d.toString();
      consoleText = (consoleText + s).slice(-CONSOLE_KEEP);
      if (readyMs === undefined && consoleText.includes('xbh-agent: ready')) readyMs = Date.now() - t0;
      onConsole?.(s);
    };
    qemu.stdout?.on('data', onData);
    qemu.stderr?.on('data', onData);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      qemu.kill('SIGKILL');
    }, timeoutMs);
    const qemuExit = await new Promise((res) => {
      qemu.on('error', (e) => res({ error: String(e) }));
      qemu.on('close', (code, signal) => res({ code, signal }));
    });
    clearTimeout(timer);

    const results = jobs.map((job) => {
      const base = join(share, 'results', job.id);
      const meta = existsSync(`${base}.json`) ? JSON.parse(readFileSync(`${base}.json`, 'utf8')) : undefined;
      const r = {
        label: job.label,
        argv: job.argv,
        finished: Boolean(meta),
        exitCode: meta?.exitCode ?? null,
        signal: meta?.signal ?? null,
        error: meta?.error,
        timedOut: meta ? meta.timedOut : timedOut,
        durationMs: meta?.durationMs,
        stdout: readIf(`${base}.stdout`),
        stderr: readIf(`${base}.stderr`),
        leftovers: meta?.leftovers ?? [],
        resetFailed: meta?.resetFailed ?? [],
        scratchLeft: meta?.scratchLeft ?? [],
      };
      r.ok = r.finished && r.exitCode === 0 && !r.timedOut && r.leftovers.length === 0;
      return r;
    });
    const done = existsSync(join(share, 'done'));
    return {
      ok: done && !timedOut && results.every((r) => r.ok),
      done,
      timedOut,
      qemuExit,
      readyMs,
      totalMs: Date.now() - t0,
      consoleTail: consoleText.split('\n').slice(-40).join('\n'),
      results,
    };
  } finally {
    rmSync(share, { recursive: true, force: true });
  }
}

/** Why a job failed, in a few lines (empty when it passed). */
export function describeJobFailure(r, run) {
  const why = [];
  if (!r.finished)
    why.push(
      run.timedOut
        ? 'the guest hit its time limit before this job finished'
        : 'the guest stopped before this job finished',
    );
  else if (r.timedOut) why.push(`timed out after ${r.durationMs} ms`);
  else if (r.error) why.push(`could not start: ${r.error}`);
  else if (r.exitCode !== 0) why.push(`exited with ${r.exitCode ?? r.signal}`);
  if (r.leftovers.length) why.push(`left devices behind:\n${r.leftovers.join('\n')}`);
  if (r.resetFailed.length) why.push(`could not be cleaned up after it:\n${r.resetFailed.join('\n')}`);
  return why.join('\n');
}

async function main(argv) {
  const files = [];
  let command;
  let shell = false;
  let timeoutMs = 600_000;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--') {
      command = argv.slice(i + 1);
      break;
    }
    if (a === '--shell') shell = true;
    else if (a === '--timeout') timeoutMs = Number(argv[++i]) * 1000;
    else if (a === '-h' || a === '--help') {
      console.log('usage: node scripts/vm/run-guest.mjs [--shell] [--timeout SECONDS] [FILE...] [-- COMMAND ARG...]');
      return 0;
    } else if (a.startsWith('-')) {
      console.error(`unknown option ${a}`);
      return 2;
    } else files.push(a);
  }
  if (!files.length && !command?.length && !shell) {
    console.error('nothing to run (give FILEs, -- COMMAND, or --shell)');
    return 2;
  }
  const run = await runInGuest({
    files,
    commands: command?.length ? [command] : [],
    timeoutMs,
    shell,
    onConsole: (s) => process.stdout.write(s),
    log: (m) => console.error(m),
  });
  console.error(
    `\nguest: ${run.totalMs} ms total, agent ready after ${run.readyMs ?? '?'} ms${run.timedOut ? ', TIMED OUT (QEMU killed)' : ''}`,
  );
  for (const r of run.results) {
    const why = describeJobFailure(r, run);
    console.error(`${why ? 'FAIL' : 'ok  '} ${basename(r.label)}${why ? `: ${why}` : ''}`);
  }
  if (!run.done) console.error(`the guest did not finish; console tail:\n${run.consoleTail}`);
  return run.ok ? 0 : 1;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  process.exitCode = await main(process.argv.slice(2)).catch((e) => {
    console.error(`run-guest: ${e.message}`);
    return 1;
  });
}
