#!/usr/bin/env node
// `npm run bench [-- PART...] [--runs N] [--native-only|--guest-only]`: the benchmarks of
// BENCHMARKS.md. PARTs: latency, concurrency, scaling, datapath, space, origin, startup, dom0 (default: all).
// Native parts run on this machine; guest parts (block-cow, -qcow, -thin need device-mapper/nbd)
// run in one boot of the QEMU guest tier; dom0 runs stock and our `block` in a real Xen dom0 (the
// Xen tier), after the guest parts. Everything of a run (hook bundles, helpers, results.json,
// report.md) goes to .cache/bench/run-<time>/; the report is printed at the end.
// Not part of `npm test`: nothing here asserts a target.
import { build } from 'esbuild';
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { log, machine, loadNow } from './common.mjs';
import { nativeConcurrency, nativeLatency, nativeScaling, nativeWorld, startup } from './native.mjs';
import { render } from './report.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = join(HERE, '..', '..');
const PARTS = ['latency', 'concurrency', 'scaling', 'datapath', 'space', 'origin', 'startup', 'dom0'];
// Guest parts in the order they are dealt to boots with --guest-boots N (heaviest first).
const GUEST_PARTS = ['latency', 'datapath', 'space', 'concurrency', 'origin'];

function usage() {
  return `usage: npm run bench [-- [PART...] [--runs N] [--guest-runs N] [--guest-boots N] [--dom0-runs N] [--native-only|--guest-only]]\n  PARTs: ${PARTS.join(', ')} (default: all; dom0 counts as a guest part)`;
}

function parse(argv) {
  const o = { parts: [], runs: 30, guestRuns: 20, guestBoots: 2, dom0Runs: 10, native: true, guest: true };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--runs') o.runs = Number(argv[++i]);
    else if (a === '--guest-runs') o.guestRuns = Number(argv[++i]);
    else if (a === '--guest-boots') o.guestBoots = Number(argv[++i]);
    else if (a === '--dom0-runs') o.dom0Runs = Number(argv[++i]);
    else if (a === '--native-only') o.guest = false;
    else if (a === '--guest-only') o.native = false;
    else if (a === '-h' || a === '--help') return { help: true };
    else if (PARTS.includes(a)) o.parts.push(a);
    else throw new Error(`unknown argument ${a}\n${usage()}`);
  }
  if (!(o.runs >= 1) || !(o.guestRuns >= 1)) throw new Error('--runs and --guest-runs take a positive number');
  if (o.parts.length === 0) o.parts = [...PARTS];
  return o;
}

/** Copy the bundles and helpers this run uses, so a rebuild by someone else mid-run changes nothing. */
async function prepare(runDir) {
  const dist = join(ROOT, 'dist');
  if (!existsSync(join(dist, 'block.mjs'))) throw new Error('dist/ has no bundles: run "npm run build" first');
  mkdirSync(join(runDir, 'dist'), { recursive: true });
  const hooks = {};
  // Each program (.mjs), its bundle (.cjs) and the bundle's code cache (.v8cache).
  for (const f of readdirSync(dist).filter((f) => /\.(mjs|cjs|v8cache)$/.test(f))) {
    copyFileSync(join(dist, f), join(runDir, 'dist', f));
    if (f.startsWith('block') && f.endsWith('.mjs')) hooks[f.replace(/\.mjs$/, '')] = join(runDir, 'dist', f);
  }
  for (const f of ['probe.mjs', 'common.mjs', 'guest.mjs']) copyFileSync(join(HERE, f), join(runDir, f));
  // Each hook as the installer leaves it, from an install under the run's folder (PREFIX,
  // SYSCONFDIR and XEN_SCRIPT_DIR there, nothing outside): the wrapper in scripts/, starting the
  // hook from the startup snapshot the installer made with this Node.
  const prefix = join(runDir, 'install');
  const inst = spawnSync(join(ROOT, 'install'), ['--replace-block'], {
    encoding: 'utf8',
    env: {
      ...process.env,
      DESTDIR: '',
      NODE: process.execPath,
      PREFIX: prefix,
      SYSCONFDIR: join(prefix, 'etc'),
      XEN_SCRIPT_DIR: join(prefix, 'scripts'),
    },
  });
  if (inst.status !== 0) throw new Error(`install into ${prefix} failed: ${inst.stderr.trim()}`);
  for (const line of inst.stderr.split('\n').filter((l) => /snapshot/i.test(l))) log(line);
  const wrappers = Object.fromEntries(Object.keys(hooks).map((name) => [name, join(prefix, 'scripts', name)]));
  await build({
    entryPoints: [join(HERE, 'lib.mjs')],
    bundle: true,
    platform: 'node',
    target: 'node18',
    format: 'esm',
    // Two folders below the project root, as test/lib/ is: stock-scripts.ts finds .cache/stock from there.
    outfile: libFile(runDir),
    logLevel: 'warning',
    banner: {
      js: "import { createRequire as __xbhCreateRequire } from 'node:module'; const require = __xbhCreateRequire(import.meta.url);",
    },
  });
  const lib = await import(pathToFileURL(libFile(runDir)).href);
  return { hooks, wrappers, lib };
}

const libFile = (runDir) => join(ROOT, '.cache', 'bench', `lib-${basename(runDir)}.mjs`);

async function runGuest(runDir, parts, o) {
  const { runInGuest } = await import(pathToFileURL(join(ROOT, 'scripts', 'vm', 'run-guest.mjs')).href);
  const stockDir = await (await import(pathToFileURL(libFile(runDir)).href)).stockScriptsDir();
  const commands = parts.map((p) => [
    process.execPath,
    join(runDir, 'guest.mjs'),
    p,
    '--runs',
    String(o.guestRuns),
    '--stock',
    join(stockDir, 'block'),
    '--lib',
    libFile(runDir),
  ]);
  log(`guest: one boot for ${parts.join(', ')} (streaming its console below)`);
  const run = await runInGuest({
    commands,
    timeoutMs: 2_700_000,
    fileTimeoutMs: 1_800_000,
    memoryMb: 3072,
    env: Object.fromEntries(Object.entries(process.env).filter(([k]) => k.startsWith('XBH_BENCH_'))),
    onConsole: (s) => process.stderr.write(s),
    log,
  });
  const out = {};
  run.results.forEach((r, i) => {
    const part = parts[i];
    const line = r.stdout.split('\n').find((l) => l.startsWith('XBH-BENCH-RESULT '));
    if (line) out[part] = JSON.parse(line.slice('XBH-BENCH-RESULT '.length));
    else
      out[part] = {
        error: `no result (exit ${r.exitCode}${r.timedOut ? ', timed out' : ''}): ${r.stderr.split('\n').slice(-8).join('\n')}`,
      };
    if (r.leftovers.length) out[part].leftovers = r.leftovers;
  });
  out.bootMs = run.readyMs;
  out.totalMs = run.totalMs;
  return out;
}

async function main(argv) {
  let o;
  try {
    o = parse(argv);
  } catch (e) {
    console.error(e.message);
    return 2;
  }
  if (o.help) {
    console.log(usage());
    return 0;
  }
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  const runDir = join(ROOT, '.cache', 'bench', `run-${stamp}`);
  mkdirSync(runDir, { recursive: true });
  const results = {
    machine: machine(),
    command: `npm run bench${argv.length ? ` -- ${argv.join(' ')}` : ''}`,
    parts: o.parts,
    native: {},
    guest: {},
  };
  log(`machine: ${JSON.stringify(results.machine)}`);
  const t0 = Date.now();
  const { hooks, wrappers, lib } = await prepare(runDir);
  const save = () => writeFileSync(join(runDir, 'results.json'), `${JSON.stringify(results, null, 1)}\n`);

  if (o.native && ['latency', 'concurrency', 'scaling'].some((p) => o.parts.includes(p))) {
    const w = await nativeWorld(lib, { hooks, wrappers, runDir });
    try {
      if (o.parts.includes('latency')) {
        const load = loadNow();
        results.native.latency = {
          loadStart: load,
          ...(await nativeLatency(lib, w, { runs: o.runs })),
          loadEnd: loadNow(),
        };
        save();
      }
      if (o.parts.includes('concurrency')) {
        const load = loadNow();
        results.native.concurrency = {
          loadStart: load,
          ...(await nativeConcurrency(lib, w, { n: 10, trials: Math.max(20, Math.round(o.runs / 1.5)) })),
          loadEnd: loadNow(),
        };
        save();
      }
      // Last: the other vbds it writes stay in this world's xenstore.
      if (o.parts.includes('scaling')) {
        const load = loadNow();
        results.native.scaling = {
          loadStart: load,
          ...(await nativeScaling(lib, w, { runs: Math.max(5, Math.round(o.runs / 3)) })),
          loadEnd: loadNow(),
        };
        save();
      }
    } finally {
      await w.close();
    }
  }
  if (o.native && o.parts.includes('startup')) {
    const load = loadNow();
    results.native.startup = {
      loadStart: load,
      ...(await startup({ block: hooks.block, 'block-cow': hooks['block-cow'] }, wrappers, { runs: o.runs })),
      loadEnd: loadNow(),
    };
    save();
  }
  const guestParts = GUEST_PARTS.filter((p) => o.parts.includes(p));
  if (o.guest && guestParts.length) {
    // Parts that must be compared side by side (hooks vs stock, devices vs raw) are each inside one
    // part, so each part keeps its one boot; --guest-boots only spreads whole parts over boots.
    const boots = Math.max(1, Math.min(o.guestBoots, guestParts.length));
    const groups = Array.from({ length: boots }, (_, b) => guestParts.filter((_, i) => i % boots === b));
    const loadStart = loadNow();
    const runs = await Promise.all(groups.map((g) => runGuest(runDir, g, o)));
    results.guest = {
      loadStart,
      boots: groups,
      bootMs: runs.map((r) => r.bootMs),
      totalMs: Math.max(...runs.map((r) => r.totalMs)),
      loadEnd: loadNow(),
    };
    for (const r of runs) for (const p of guestParts) if (r[p]) results.guest[p] = r[p];
    save();
  }
  if (o.guest && o.parts.includes('dom0')) {
    const { dom0Bench } = await import(pathToFileURL(join(HERE, 'dom0.mjs')).href);
    log('dom0: one boot of the Xen tier (streaming its console below)');
    const loadStart = loadNow();
    results.dom0 = {
      loadStart,
      ...(await dom0Bench({ rounds: o.dom0Runs, log, onConsole: (s) => process.stderr.write(s) })),
      loadEnd: loadNow(),
    };
    save();
  }
  results.wallMs = Date.now() - t0;
  save();
  const md = render(results);
  writeFileSync(join(runDir, 'report.md'), md);
  process.stdout.write(md);
  log(`done in ${(results.wallMs / 1000).toFixed(0)} s; results in ${runDir}`);
  return 0;
}

process.exitCode = await main(process.argv.slice(2)).catch((e) => {
  console.error(`bench: ${e instanceof Error ? e.stack : e}`);
  return 1;
});
