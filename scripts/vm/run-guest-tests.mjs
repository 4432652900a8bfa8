// The guest tier: bundles test/guest/*.test.ts (node:test) with esbuild into .cache/guest-tests/,
// runs them all in one guest boot, and prints their TAP folded into one stream.
//
//   node scripts/vm/run-guest-tests.mjs [--shell] [NAME...]     (npm run test:guest -- NAME...)
//
// NAMEs filter the files by substring of their file name. --shell opens bash on the guest's
// serial console after the files ran (their bundles are still in place then).
// XBH_FAULT_CONCURRENCY is passed on to the guest as `npm test` passes it (npmTestEnv).
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { PROJECT_ROOT } from './build-guest.mjs';
import { describeJobFailure, runInGuest } from './run-guest.mjs';
import { assertionPoints, parseTap } from './tap.mjs';

export const GUEST_TEST_DIR = join(PROJECT_ROOT, 'test', 'guest');
export const BUNDLE_DIR = join(PROJECT_ROOT, '.cache', 'guest-tests');

const BANNER =
  "import { createRequire as __guestCreateRequire } from 'node:module';\n" +
  'const require = __guestCreateRequire(import.meta.url);';

/**
 * test/guest/*.test.ts, optionally only those whose name contains one of `filters`, or (for the
 * shards of the host run) starts with one of `prefixes`.
 */
export function guestTestFiles(filters = [], prefixes = []) {
  return readdirSync(GUEST_TEST_DIR)
    .filter((f) => f.endsWith('.test.ts'))
    .filter((f) => filters.length === 0 || filters.some((n) => f.includes(n)))
    .filter((f) => prefixes.length === 0 || prefixes.some((n) => f.startsWith(n)))
    .sort()
    .map((f) => join(GUEST_TEST_DIR, f));
}

/**
 * Bundles each file (src/ and dependencies included) to OUTDIR/NAME.mjs. Each run uses its own
 * OUTDIR under .cache/guest-tests/: a guest caches the host's files (9p cache=loose), so
 * another run must not rewrite a bundle that a running guest is reading.
 */
export async function bundleGuestTests(files, outDir) {
  const { build } = await import('esbuild');
  mkdirSync(outDir, { recursive: true });
  const out = [];
  for (const file of files) {
    const outfile = join(outDir, basename(file).replace(/\.ts$/, '.mjs'));
    await build({
      entryPoints: [file],
      outfile,
      bundle: true,
      platform: 'node',
      target: 'node18',
      format: 'esm',
      banner: { js: BANNER },
      logLevel: 'warning',
    });
    out.push(outfile);
  }
  return out;
}

/**
 * Bundles and runs the guest tests in one boot. Resolves to the runInGuest result, each job
 * result carrying `source` (the .ts file) and `points` (its parsed TAP).
 */
export async function runGuestTests({
  filters = [],
  prefixes = [],
  timeoutMs = 540_000,
  fileTimeoutMs,
  onConsole,
  log,
  shell = false,
  env = {},
  memoryMb,
} = {}) {
  const sources = guestTestFiles(filters, prefixes);
  if (sources.length === 0)
    throw new Error(
      `no guest test files in ${GUEST_TEST_DIR} match ${[...filters, ...prefixes.map((p) => `${p}*`)].join(' ') || '*'}`,
    );
  mkdirSync(BUNDLE_DIR, { recursive: true });
  const outDir = mkdtempSync(join(BUNDLE_DIR, 'run-'));
  try {
    const bundles = await bundleGuestTests(sources, outDir);
    const run = await runInGuest({
      files: bundles,
      shell,
      timeoutMs,
      fileTimeoutMs: fileTimeoutMs ?? Math.min(timeoutMs, 300_000),
      onConsole,
      log,
      env,
      ...(memoryMb ? { memoryMb } : {}),
    });
    run.results.forEach((r, i) => {
      r.source = sources[i];
      r.points = parseTap(r.stdout);
    });
    return run;
  } finally {
    rmSync(outDir, { recursive: true, force: true });
  }
}

/**
 * Memory for a guest that runs fault-concurrency with `concurrency` block-cow hooks, each a node
 * process of its own (~60 MiB each under TCG) besides the test and the stock scripts.
 */
export function guestMemoryMb(concurrency) {
  return Math.max(2048, 1536 + 64 * concurrency);
}

/**
 * The guest variables `npm test` runs with, also used here when run by hand: fault-concurrency at
 * 16 hooks unless XBH_FAULT_CONCURRENCY says otherwise (64, the file's own default, is for
 * `npm run reliability`, which gives it longer limits than the 300 s per file here).
 */
export function npmTestEnv() {
  return { XBH_FAULT_CONCURRENCY: process.env.XBH_FAULT_CONCURRENCY ?? '16' };
}

function indent(text, by = '    ') {
  return text
    .split('\n')
    .map((l) => (l ? by + l : l))
    .join('\n');
}

async function main(argv) {
  const shell = argv.includes('--shell');
  const filters = argv.filter((a) => a !== '--shell');
  const run = await runGuestTests({
    filters,
    shell,
    timeoutMs: shell ? 3_600_000 : undefined,
    log: (m) => console.error(m),
    env: npmTestEnv(),
    memoryMb: guestMemoryMb(Number(npmTestEnv().XBH_FAULT_CONCURRENCY)),
  });
  console.log('TAP version 13');
  let n = 0;
  let failed = 0;
  for (const r of run.results) {
    const name = basename(r.source);
    const why = describeJobFailure(r, run);
    const points = assertionPoints(r.points);
    const bad = points.filter((p) => !p.ok && !p.todo).length;
    const ok = !why && bad === 0 && points.length > 0;
    if (!ok) failed++;
    console.log(`# Subtest: ${name}`);
    console.log(indent(r.stdout.trimEnd()));
    console.log(`${ok ? 'ok' : 'not ok'} ${++n} - ${name}`);
    const notes = [
      why,
      points.length === 0 ? 'no test points in its output' : '',
      r.stderr.trim() && !ok ? `stderr:\n${r.stderr.trim().split('\n').slice(-30).join('\n')}` : '',
    ]
      .filter(Boolean)
      .join('\n');
    if (notes) console.log(indent(notes, '  # ').replace(/^ {2}# $/gm, '  #'));
  }
  console.log(`1..${n}`);
  if (!run.done)
    console.log(
      `# the guest did not finish${run.timedOut ? ' (time limit, QEMU killed)' : ''}; console tail:\n${indent(run.consoleTail, '# ')}`,
    );
  console.log(`# guest: ${run.totalMs} ms in all, agent ready after ${run.readyMs ?? '?'} ms`);
  console.log(`# ${n - failed} passed, ${failed} failed`);
  return failed === 0 && run.done ? 0 : 1;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  process.exitCode = await main(process.argv.slice(2)).catch((e) => {
    console.error(`run-guest-tests: ${e.message}`);
    return 1;
  });
}
