// Benchmark part "dom0": boots the Xen tier (scripts/xen/run.mjs: Debian's Xen 4.17, a PV dom0
// under QEMU TCG, Debian 12's node 18) with scripts/bench/dom0-block.sh as its one scenario, which
// installs the hooks with the project's installer (--replace-block keeps the stock script as
// block.stock) and times stock and ours side by side in that one dom0. Returns the samples.
// Ours also runs a second time under this machine's own Node (NodeSource's build of Node 20, one
// binary with Node's built-in snapshot), installed beside the first with the same installer: the
// dom0's /usr/bin/node is Debian's, so the bench copies this one where dom0 can read it.
import { chmodSync, copyFileSync, existsSync, mkdirSync, renameSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));

/** Parses the scenario's output: `sample V OP WALL CPU` and `concurrent V OP WALL FAILURES` lines. */
export function parseDom0(stdout) {
  const out = { samples: {}, concurrent: [], notes: [], failures: [] };
  for (const line of stdout.split('\n')) {
    let m = /^sample (\S+) (\S+) (\d+) (\d+)$/.exec(line);
    if (m) {
      const k = `${m[1]} ${m[2]}`;
      (out.samples[k] ??= { wall: [], cpu: [] }).wall.push(Number(m[3]));
      out.samples[k].cpu.push(Number(m[4]));
      continue;
    }
    m = /^concurrent (\S+) (\S+) (\d+) (\d+)$/.exec(line);
    if (m) {
      out.concurrent.push({ variant: m[1], op: m[2], wallMs: Number(m[3]), failures: Number(m[4]) });
      continue;
    }
    if (line.startsWith('not ok')) out.failures.push(line);
    else if (line.startsWith('# ')) out.notes.push(line.slice(2));
  }
  return out;
}

/** This machine's node binary, copied under .cache/bench (the project is visible in dom0). */
function hostNodeCopy() {
  const dir = join(HERE, '..', '..', '.cache', 'bench');
  const file = join(dir, `node-${process.version}-${process.arch}`);
  if (!existsSync(file) || statSync(file).size !== statSync(process.execPath).size) {
    mkdirSync(dir, { recursive: true });
    copyFileSync(process.execPath, `${file}.tmp`);
    chmodSync(`${file}.tmp`, 0o755);
    renameSync(`${file}.tmp`, file);
  }
  return file;
}

export async function dom0Bench({
  rounds = 10,
  concurrency = Number(process.env.XBH_BENCH_DOM0_CONCURRENCY ?? 10),
  log = () => {},
  onConsole,
} = {}) {
  const { runXenTier } = await import(pathToFileURL(join(HERE, '..', 'xen', 'run.mjs')).href);
  const run = await runXenTier({
    scenarios: [join(HERE, 'dom0-block.sh')],
    scenarioTimeoutS: 2400,
    timeoutMs: 3_300_000,
    log,
    onConsole,
    env: {
      XBH_BENCH_DOM0_ROUNDS: String(rounds),
      XBH_BENCH_DOM0_CONCURRENCY: String(concurrency),
      XBH_BENCH_DOM0_ALT_NODE: hostNodeCopy(),
      ...(process.env.XBH_BENCH_DOM0_SHOW_LOG ? { XBH_BENCH_DOM0_SHOW_LOG: '1' } : {}),
      ...Object.fromEntries(
        ['XBH_BENCH_DOM0_COW_CONCURRENCY', 'XBH_BENCH_DOM0_SCALING', 'XBH_BENCH_DOM0_SCALE_ROUNDS']
          .filter((k) => process.env[k] !== undefined)
          .map((k) => [k, process.env[k]]),
      ),
    },
  });
  const r = run.results[0];
  const parsed = parseDom0(r?.stdout ?? '');
  return {
    ...parsed,
    rounds,
    concurrency,
    ok: run.ok,
    bootMs: run.readyMs,
    totalMs: run.totalMs,
    hostLoad: run.hostLoad,
    kernel: run.tier.kernelVersion,
    nodeVersion: run.tier.nodeVersion,
    altNodeVersion: process.version,
    error: run.ok
      ? undefined
      : `${run.setupError ?? ''} exit ${r?.exitCode} ${r?.timedOut ? '(timed out) ' : ''}${(r?.stderr ?? '').split('\n').slice(-8).join('\n')} ${parsed.failures.join('\n')} ${r?.leftovers ?? ''}`.trim(),
  };
}
