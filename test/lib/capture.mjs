// What the fixture capture scripts (test/fixtures/capture-*.mjs) share. Each script runs twice: on
// the host with --host, where captureInGuest boots the guest tier, runs the script there and writes
// what it printed as test/fixtures/<tag>-<case>.txt; and inside the guest, where it records real
// tool output with the helpers below and prints one JSON object {case: text} (keys starting with
// "_" are facts about the run, not fixtures). Plain JavaScript: the scripts run with node as they
// are, on the host and in the guest.
import { execFileSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const FIXTURES = fileURLToPath(new URL('../fixtures/', import.meta.url));

/**
 * On the host: run the script at `scriptUrl` (its import.meta.url) in one guest boot and write
 * each case it printed to test/fixtures/<tag>-<case>.txt, `tag` made from the printed object.
 * The facts ("_" keys) go to stderr.
 */
export async function captureInGuest(scriptUrl, tag) {
  const { runInGuest } = await import('../../scripts/vm/run-guest.mjs');
  const r = await runInGuest({ files: [fileURLToPath(scriptUrl)], log: (m) => console.error(m) });
  const job = r.results[0];
  if (!job?.ok) {
    console.error(job?.stdout ?? '', job?.stderr ?? r.consoleTail);
    process.exitCode = 1;
    return;
  }
  const cases = JSON.parse(job.stdout);
  const prefix = tag(cases);
  for (const [k, v] of Object.entries(cases)) {
    if (k.startsWith('_')) continue;
    writeFileSync(join(FIXTURES, `${prefix}-${k}.txt`), v);
    console.error(`wrote ${prefix}-${k}.txt`);
  }
  console.error(JSON.stringify(Object.fromEntries(Object.entries(cases).filter(([k]) => k.startsWith('_')))));
}

/** A command's stdout, trimmed; throws on a non-zero exit. */
export function sh(file, ...args) {
  return execFileSync(file, args, {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, LVM_SUPPRESS_FD_WARNINGS: '1' },
  }).trim();
}

/** The major.minor of the running kernel, e.g. 6.1. */
export function kernelVersion() {
  return sh('uname', '-r').split('.').slice(0, 2).join('.');
}

/** A fresh folder in the guest's scratch space, and `img(name, mib)` making sparse images in it. */
export function scratch(prefix) {
  const dir = mkdtempSync(join(process.env.XEN_BLOCKHOOKS_SCRATCH ?? '/tmp', prefix));
  const img = (name, mib) => {
    const p = join(dir, name);
    sh('truncate', '-s', `${mib}M`, p);
    return p;
  };
  return { dir, img };
}

/** A loop device over `file` (read-only when `ro`); its path. */
export function loop(file, ro = false) {
  return sh('losetup', '--find', '--show', ...(ro ? ['--read-only'] : []), '--', file);
}

/** Write `mib` MiB of `fill` from `offsetMiB`; the error code of the first failing write or close, or null. */
export function writeMiB(dev, offsetMiB, mib, fill) {
  const fd = openSync(dev, 'r+');
  const buf = Buffer.alloc(1 << 20, fill);
  let err = null;
  try {
    for (let i = 0; i < mib; i++) writeSync(fd, buf, 0, buf.length, (offsetMiB + i) * (1 << 20));
  } catch (e) {
    err = e.code;
  } finally {
    try {
      closeSync(fd);
    } catch (e) {
      err ??= e.code;
    }
  }
  return err;
}
