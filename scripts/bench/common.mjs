// Shared helpers of the benchmarks: timing child processes (argument arrays, no shell), order
// rotation for interleaved A/B runs, percentiles, the machine description every table carries.
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { cpus, loadavg, release } from 'node:os';

const GNU_TIME = '/usr/bin/time';
let cpuSeq = 0;

/**
 * Run `file args` and time it from spawn to exit (ms). stdin is /dev/null, as libxl gives hooks.
 * With `cpuDir`, GNU time (when installed) wraps the command and `cpuMs` is the user+sys time of
 * the command and every process it waited for: far less sensitive to other load than wall time.
 */
export function timed(file, args, { env = process.env, cwd, timeoutMs = 300_000, cpuDir } = {}) {
  if (cpuDir && existsSync(GNU_TIME)) {
    const out = join(cpuDir, `cpu-${process.pid}-${cpuSeq++}.txt`);
    return timedRaw(GNU_TIME, ['-f', '%U %S', '-o', out, '--', file, ...args], { env, cwd, timeoutMs }).then((r) => {
      try {
        const [u, s] = readFileSync(out, 'utf8').trim().split('\n').pop().split(' ').map(Number);
        rmSync(out, { force: true });
        return { ...r, cpuMs: (u + s) * 1000 };
      } catch {
        return r;
      }
    });
  }
  return timedRaw(file, args, { env, cwd, timeoutMs });
}

function timedRaw(file, args, { env, cwd, timeoutMs }) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const startEpoch = performance.timeOrigin + t0;
    let child;
    try {
      child = spawn(file, args, { env, cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (e) {
      resolve({ code: null, signal: null, ms: 0, stdout: '', stderr: String(e), startEpoch });
      return;
    }
    let stdout = '';
    let stderr = '';
    let ms;
    let exit;
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.stdout.setEncoding('utf8').on('data', (s) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s) => (stderr += s));
    child.on('error', (e) => (stderr += String(e)));
    child.on('exit', (code, signal) => {
      ms = performance.now() - t0;
      exit = { code, signal, endEpoch: performance.timeOrigin + performance.now() };
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        code: exit?.code ?? code,
        signal: exit?.signal ?? signal,
        ms: ms ?? performance.now() - t0,
        stdout,
        stderr,
        startEpoch,
        endEpoch: exit?.endEpoch,
      });
    });
  });
}

/** Rotate `items` by `round`, so each variant takes each position equally often. */
export function rotation(items, round) {
  const k = round % items.length;
  return [...items.slice(k), ...items.slice(0, k)];
}

export function percentile(values, p) {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return NaN;
  const idx = (p / 100) * (v.length - 1);
  const lo = Math.floor(idx);
  const hi = Math.ceil(idx);
  return v[lo] + (v[hi] - v[lo]) * (idx - lo);
}

export function summary(values) {
  return {
    n: values.length,
    p50: percentile(values, 50),
    p95: percentile(values, 95),
    min: Math.min(...values),
    max: Math.max(...values),
  };
}

function firstLine(file, args) {
  try {
    return execFileSync(file, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] })
      .split('\n')[0]
      .trim();
  } catch {
    return 'unknown';
  }
}

/** What the tables must name: cores, CPU, kernel, node, load average now. */
export function machine() {
  let model = cpus()[0]?.model ?? 'unknown';
  try {
    const m = /model name\s*:\s*(.*)/.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    if (m) model = m[1].trim();
  } catch {
    // keep os.cpus()
  }
  return {
    nproc: Number(firstLine('nproc', [])) || cpus().length,
    cpu: model,
    kernel: release(),
    node: process.version,
    loadavg: loadavg()
      .map((x) => x.toFixed(2))
      .join(' '),
    date: new Date().toISOString(),
  };
}

export function loadNow() {
  return loadavg()
    .map((x) => x.toFixed(2))
    .join(' ');
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function log(msg) {
  process.stderr.write(`bench: ${msg}\n`);
}

/** Where a probed run's time went (ms). */
export function breakdown(run, probeFile) {
  const p = JSON.parse(readFileSync(probeFile, 'utf8'));
  const byCat = { lock: 0, commands: 0 };
  const cmds = {};
  for (const c of p.children) {
    const ms = c.end - c.start;
    if (c.cmd === 'flock') byCat.lock += ms;
    else {
      byCat.commands += ms;
      cmds[c.cmd] = (cmds[c.cmd] ?? 0) + ms;
    }
  }
  const spawnToOrigin = p.timeOrigin - run.startEpoch;
  const exitToParent = run.endEpoch - p.exitEpoch;
  const nodeStart = spawnToOrigin + p.bootstrapMs;
  const xenstore = p.xenstore.busyMs + p.xenstore.connectMs;
  const load = p.firstActivityMs - p.bootstrapMs;
  const inProcess = p.exitMs - p.firstActivityMs;
  return {
    total: run.ms,
    nodeStart,
    load,
    exit: exitToParent,
    xenstore,
    xsRequests: p.xenstore.requests,
    lock: byCat.lock,
    commands: byCat.commands,
    commandCount: p.children.filter((c) => c.cmd !== 'flock').length,
    cmds,
    jsOther: inProcess - xenstore - byCat.lock - byCat.commands,
  };
}

/** `node` arguments that load the timing probe (probe.mjs next to this file) for one run. */
export function probeArgs() {
  return ['--import', pathToFileURL(new URL('./probe.mjs', import.meta.url).pathname).href];
}
