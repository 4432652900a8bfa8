// npm run reliability: run the fault-injection and hostile-input suites for real and write
// RELIABILITY.md, one row per hook × fault: what was checked and the result.
//
//   node scripts/reliability.mjs [--host-only] [--guest-only] [--out FILE]
//
// Host tier: test/host/hostile-*.test.ts under tap (each check appends a JSON row to the file
// named by XEN_BLOCKHOOKS_RELIABILITY_OUT). Guest tier: test/guest/fault-*.test.ts in one QEMU
// guest boot (rows come back as `# reliability {json}` lines in each file's TAP). A file whose
// test points failed, or a guest file that did not finish, adds a fail row of its own, so a
// crash cannot leave a table that looks green. Exit status: 0 when every row passed (todo rows
// are listed, and do not fail the run), 1 otherwise.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const outFile = args.includes('--out') ? args[args.indexOf('--out') + 1] : join(ROOT, 'RELIABILITY.md');
const doHost = !args.includes('--guest-only');
const doGuest = !args.includes('--host-only');

function parseRows(text, source) {
  const rows = [];
  for (const line of text.split('\n')) {
    const m = /^\s*# reliability (\{.*\})\s*$/.exec(line);
    if (!m) continue;
    try {
      rows.push({ ...JSON.parse(m[1]), source });
    } catch {
      // a torn line: the file's own result still counts
    }
  }
  return rows;
}

const rows = [];
const runs = [];

const build = spawnSync('npm', ['run', '-s', 'build'], { cwd: ROOT, stdio: 'inherit' });
if (build.status !== 0) {
  console.error('reliability: npm run build failed');
  process.exitCode = 1;
}

if (doHost) {
  const files = readdirSync(join(ROOT, 'test', 'host'))
    .filter((f) => /^hostile-.*\.test\.ts$/.test(f))
    .sort();
  for (const f of files) {
    const dir = mkdtempSync(join(tmpdir(), 'xbh-reliability-'));
    const rowsFile = join(dir, 'rows.jsonl');
    writeFileSync(rowsFile, '');
    const t0 = Date.now();
    const r = spawnSync('npx', ['tap', '--reporter=terse', join('test', 'host', f)], {
      cwd: ROOT,
      encoding: 'utf8',
      env: { ...process.env, XEN_BLOCKHOOKS_RELIABILITY_OUT: rowsFile },
      maxBuffer: 64 << 20,
    });
    const got = readFileSync(rowsFile, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => ({ ...JSON.parse(l), source: `test/host/${f}` }));
    rmSync(dir, { recursive: true, force: true });
    rows.push(...got);
    runs.push({ file: `test/host/${f}`, ok: r.status === 0, ms: Date.now() - t0 });
    if (r.status !== 0) {
      rows.push({
        hook: '(suite)',
        fault: f,
        checked: 'the test file passes',
        result: 'fail',
        detail: (r.stdout + r.stderr)
          .split('\n')
          .filter((l) => /✖|not ok/.test(l))
          .slice(0, 3)
          .join(' / '),
        source: `test/host/${f}`,
      });
      process.stderr.write(r.stdout + r.stderr);
    }
  }
}

if (doGuest) {
  const { guestMemoryMb, runGuestTests } = await import('./vm/run-guest-tests.mjs');
  const concurrency = process.env.XBH_FAULT_CONCURRENCY ?? '64';
  // Full size: fault-concurrency runs 64 block-cow hooks at once (~12 minutes under TCG).
  const run = await runGuestTests({
    filters: ['fault-'],
    timeoutMs: 2_700_000,
    fileTimeoutMs: 1_500_000,
    log: (m) => console.error(m),
    env: { XBH_FAULT_CONCURRENCY: concurrency },
    memoryMb: guestMemoryMb(Number(concurrency)),
  });
  for (const r of run.results) {
    const source = `test/guest/${basename(r.source)}`;
    rows.push(...parseRows(r.stdout, source));
    const failed = r.points.filter((p) => !p.ok && !p.todo);
    runs.push({ file: source, ok: r.ok && failed.length === 0, ms: r.durationMs ?? 0 });
    if (!r.ok || failed.length) {
      const why = failed
        .map((p) => p.name)
        .concat(
          r.timedOut ? ['timed out'] : [],
          r.finished ? [] : ['did not finish'],
          r.leftovers.length ? [`left ${r.leftovers.join(', ')}`] : [],
        );
      rows.push({
        hook: '(suite)',
        fault: basename(r.source),
        checked: 'the guest test file passes and leaves no device',
        result: 'fail',
        detail: why.join(' / ').slice(0, 300),
        source,
      });
    }
  }
  if (!run.done)
    rows.push({
      hook: '(suite)',
      fault: 'guest boot',
      checked: 'the guest ran every file',
      result: 'fail',
      detail: run.consoleTail.split('\n').slice(-3).join(' / '),
      source: 'guest',
    });
}

const esc = (s) =>
  String(s ?? '')
    .replace(/\|/g, '\\|')
    .replace(/\n/g, ' ');

/**
 * What proved a row: a row may name its tier; otherwise it follows from where it ran. The host
 * tier's block-cow rows run the hook against FakeDeviceRunner (losetup and dmsetup played in
 * memory, test/lib/fault-lib.ts); its qcow rows and the block hook's run real tools and loops.
 */
function tierOf(r) {
  if (r.tier) return r.tier;
  if (String(r.source).startsWith('test/guest/') || r.source === 'guest') return 'real kernel (QEMU)';
  if (/shell injection/.test(r.fault)) return 'static scan';
  if (String(r.source).endsWith('hostile-block.test.ts')) return 'host: real loop devices';
  if (r.hook === 'block-qcow') return 'host: real qemu-img';
  if (r.hook === 'block-cow') return 'fake runner';
  return 'host';
}
const mark = { pass: 'pass', fail: '**FAIL**', todo: 'todo (known gap)' };
const byHook = [...new Set(rows.map((r) => r.hook))].sort();
const counts = { pass: 0, fail: 0, todo: 0 };
for (const r of rows) counts[r.result] = (counts[r.result] ?? 0) + 1;

const lines = [
  '# Reliability',
  '',
  'Generated by `npm run reliability` from a real run of the fault-injection and hostile-input suites',
  '(host tier: `test/host/hostile-*.test.ts`; guest tier, a real kernel under QEMU: `test/guest/fault-*.test.ts`).',
  'Each row is one check; "checked" says what had to hold for it to pass, "tier" what proved it: a real',
  'kernel under QEMU, real tools and loop devices on the host, or the fake runner (losetup and dmsetup',
  "played in memory: the hook's own logic, not the kernel's). Do not edit by hand.",
  '',
  `Run: ${new Date().toISOString()} — ${counts.pass} passed, ${counts.fail} failed, ${counts.todo} known gaps (todo).`,
  '',
  '| file | result | time |',
  '|---|---|---|',
  ...runs.map((r) => `| ${r.file} | ${r.ok ? 'pass' : '**FAIL**'} | ${(r.ms / 1000).toFixed(1)} s |`),
  '',
];
for (const hook of byHook) {
  lines.push(`## ${hook}`, '', '| fault | checked | tier | result |', '|---|---|---|---|');
  for (const r of rows.filter((x) => x.hook === hook)) {
    lines.push(
      `| ${esc(r.fault)} | ${esc(r.checked)} | ${esc(tierOf(r))} | ${mark[r.result] ?? esc(r.result)}${r.detail ? `: ${esc(r.detail)}` : ''} |`,
    );
  }
  lines.push('');
}
const missing = [];
if (!doHost) missing.push('host tier not run (--guest-only)');
if (!doGuest) missing.push('guest tier not run (--host-only)');
if (missing.length) lines.push(`Partial run: ${missing.join('; ')}.`, '');
writeFileSync(outFile, lines.join('\n'));
console.log(`reliability: ${counts.pass} passed, ${counts.fail} failed, ${counts.todo} todo; wrote ${outFile}`);
if (counts.fail > 0 || runs.some((r) => !r.ok)) process.exitCode = 1;
