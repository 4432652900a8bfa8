// Boots Debian's Xen 4.17 under QEMU TCG with Debian's kernel as a PV dom0 (this machine's root
// over 9p, with the Xen + Debian-node layer and the kernel modules stacked on it), sets dom0 up
// as a Debian dom0 (xenstored, xen-init-dom0, xenconsoled) and runs the scenarios of test/xen/
// in that one boot, each with real xl.
//
//   node scripts/xen/run.mjs [--timeout SECONDS] [--quiet] [--keep] [SCENARIO...]
//
// --keep leaves the results share (outputs, dom0's /var/log/xen and dmesg) in /tmp.
//
// SCENARIOs are files or names in test/xen/ (default: all `NN-*.sh|mjs|ts` there, in order).
// The serial console (Xen and dom0) streams to stdout unless --quiet.
import { execFileSync, spawn } from 'node:child_process';
import {
  copyFileSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildXen, CACHE_DIR, PROJECT_ROOT } from './build.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
export const SCENARIO_DIR = join(PROJECT_ROOT, 'test', 'xen');
const QEMU = 'qemu-system-x86_64';
const CONSOLE_KEEP = 256 * 1024;
const END_MARK = /XBH-XEN-TIER-(DONE|FAILED)/;

export const XEN_CMDLINE =
  'console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all noreboot ' +
  'dom0_mem=1024M,max:1024M dom0_max_vcpus=1 smap=0 smep=0 bootscrub=false';
/**
 * QEMU 7.2's TCG offers AVX/AVX2 with -cpu max; with them dom0's processes (glibc picks AVX2
 * string and malloc routines) died now and then of corrupted memory ("malloc(): corrupted top
 * size", segfaults) under Xen. Without XSAVE (so no AVX) Xen and the guests use FXSAVE and SSE.
 */
export const CPU = 'max,-xsave,-avx,-avx2';
export const DOM0_CMDLINE = 'console=hvc0 earlyprintk=xen quiet loglevel=4';

/**
 * The scenario files, in order: test/xen/NN-name.sh (run with sh), .mjs (node) or .ts (bundled
 * here with esbuild for node18, so it may import the project's sources, then run with node).
 */
export function listScenarios(dir = SCENARIO_DIR) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((f) => /^\d\d-[\w.-]+\.(sh|mjs|ts)$/.test(f))
    .sort()
    .map((f) => join(dir, f));
}

/** One .ts scenario → one ESM file for Node 18 (as scripts/build.mjs bundles the hooks). */
async function bundle(entry, outfile) {
  const { build } = await import('esbuild');
  await build({
    entryPoints: [entry],
    outfile,
    bundle: true,
    platform: 'node',
    target: 'node18',
    format: 'esm',
    logLevel: 'warning',
    legalComments: 'none',
    define: { __XEN_BLOCKHOOKS_VERSION__: JSON.stringify('xen-tier') },
    banner: {
      js: "import { createRequire as __xbhCreateRequire } from 'node:module'; const require = __xbhCreateRequire(import.meta.url);",
    },
  });
}

function qemuArgs(t, share) {
  const ro = (path, tag) => [
    '-virtfs',
    `local,path=${path},mount_tag=${tag},security_model=none,readonly=on,multidevs=remap`,
  ];
  return [
    '-accel',
    'tcg,thread=multi',
    '-machine',
    'pc',
    '-cpu',
    CPU,
    '-m',
    '3G',
    '-smp',
    '1',
    '-nodefaults',
    '-no-user-config',
    '-nographic',
    '-monitor',
    'none',
    '-serial',
    'stdio',
    '-no-reboot',
    '-kernel',
    t.xen,
    '-append',
    XEN_CMDLINE,
    // Multiboot modules, comma-separated: dom0's kernel (with its command line) and its initramfs.
    '-initrd',
    `${t.vmlinux} ${DOM0_CMDLINE},${t.dom0Initrd}`,
    ...ro('/', 'hostroot'),
    ...ro(t.xenroot, 'xenroot'),
    ...ro(t.modroot, 'modroot'),
    '-virtfs',
    `local,path=${share},mount_tag=shared,security_model=none,multidevs=remap`,
  ];
}

function readIf(file) {
  return existsSync(file) ? readFileSync(file, 'utf8') : '';
}

/** Guest console logs and dom0 logs collected into the share (name → text). */
function collectLogs(dir, base = dir, out = {}) {
  if (!existsSync(dir)) return out;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) collectLogs(p, base, out);
    else out[p.slice(base.length + 1)] = readIf(p);
  }
  return out;
}

/**
 * The Debian package dom0 installs with dpkg -i (scripts/package.mjs, from the bundles copied
 * above), the same version +1 in project/upgrade/, and in project/layer-debs/ the .debs of the
 * xenroot layer that its Depends name (xen-utils-common, Debian's nodejs and what it needs):
 * dom0's dpkg database is this machine's, which may not list them although their files are in
 * dom0 (test/xen/lib.sh records them as installed there). Without a built dist/ there is no
 * package, and dom0 uses ./install.
 */
function debForDom0(project, log) {
  if (!existsSync(join(project, 'dist', 'xen-blockhooks.cjs'))) return;
  execFileSync(
    process.execPath,
    [join(PROJECT_ROOT, 'scripts', 'package.mjs'), '--dist', join(project, 'dist'), '--out', project],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  // The same version +1, for scenario 91's upgrade.
  execFileSync(
    process.execPath,
    [
      join(PROJECT_ROOT, 'scripts', 'package.mjs'),
      '--dist',
      join(project, 'dist'),
      '--out',
      join(project, 'upgrade'),
      '--version',
      `${JSON.parse(readFileSync(join(PROJECT_ROOT, 'package.json'), 'utf8')).version}+1`,
    ],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  const debs = join(CACHE_DIR, 'debs');
  const memo = JSON.parse(readIf(join(CACHE_DIR, 'packages.json')) || '{}');
  const nodeVersion = String(memo.nodeVersion ?? '').replace(/^\d+:/, '');
  const layer = join(project, 'layer-debs');
  mkdirSync(layer);
  // xen-utils-common, and Debian's nodejs with what it needs (scenario 90 reinstalls nodejs).
  const nodeDebs = (memo.node ?? []).map((n) =>
    n === 'nodejs' || n === 'libnode108' ? `${n}_${nodeVersion}_` : `${n}_`,
  );
  for (const prefix of ['xen-utils-common_', ...nodeDebs]) {
    const f = existsSync(debs) ? readdirSync(debs).find((d) => d.startsWith(prefix) && d.endsWith('.deb')) : undefined;
    if (!f) throw new Error(`no ${prefix}*.deb in ${debs} (node scripts/xen/build.mjs downloads it)`);
    copyFileSync(join(debs, f), join(layer, f));
  }
  log(`dom0 installs ${readdirSync(project).find((f) => f.endsWith('.deb'))} with dpkg -i`);
}

/**
 * Boots once and runs `scenarios` (paths). Resolves to
 * { ok, done, timedOut, setupError, bootMs, readyMs, totalMs, consoleTail, logs, results },
 * each result { name, file, finished, exitCode, durationMs, stdout, stderr, leftovers, timedOut, ok }.
 * Rejects only when the tier cannot be built or QEMU cannot be started.
 */
export async function runXenTier({
  scenarios = listScenarios(),
  timeoutMs = 1_800_000,
  scenarioTimeoutS = 480,
  onConsole,
  log = () => {},
  keep = false,
  env = {},
} = {}) {
  // Extra variables for the scenarios (the benchmarks' sizes): simple names and values only, as
  // they pass through plan.env and a shell word list.
  for (const [k, v] of Object.entries(env)) {
    if (!/^XBH_[A-Z0-9_]+$/.test(k) || !/^[\w.,:/-]*$/.test(String(v)))
      throw new Error(`runXenTier: env ${k}=${v} is not a plain XBH_ variable`);
  }
  const t0 = Date.now();
  const loadStart = readIf('/proc/loadavg').split(' ').slice(0, 3).join(' ');
  const t = await buildXen({ log });
  try {
    execFileSync(QEMU, ['--version'], { stdio: 'ignore' });
  } catch {
    throw new Error(`${QEMU} cannot be run: install qemu-system-x86 (the Xen tier needs it)`);
  }
  const jobs = scenarios.map((file, i) => ({
    id: String(i).padStart(2, '0'),
    name: basename(file).replace(/\.(sh|mjs|ts)$/, ''),
    file: resolve(file),
    interp: file.endsWith('.sh') ? 'sh' : 'node',
  }));
  const share = mkdtempSync(join(tmpdir(), 'xbh-xen-'));
  try {
    for (const j of jobs.filter((x) => x.file.endsWith('.ts'))) {
      const out = join(share, 'bundles', `${j.name}.mjs`);
      await bundle(j.file, out);
      j.file = `/xbh-share/bundles/${j.name}.mjs`;
    }
    copyFileSync(join(HERE, 'dom0-stage2.sh'), join(share, 'stage2.sh'));
    // A snapshot of what dom0 installs (the installer, packaging/, the bundles): dist/ may be
    // rebuilt on the host while dom0 reads it over 9p.
    const project = join(share, 'project');
    mkdirSync(join(project, 'dist'), { recursive: true });
    const dist = join(PROJECT_ROOT, 'dist');
    if (existsSync(dist)) {
      for (const f of readdirSync(dist))
        if (/\.(mjs|cjs)$|^licenses\.json$/.test(f)) copyFileSync(join(dist, f), join(project, 'dist', f));
    }
    const installer = join(PROJECT_ROOT, 'install');
    if (existsSync(installer)) copyFileSync(installer, join(project, 'install'));
    if (existsSync(join(PROJECT_ROOT, 'packaging')))
      cpSync(join(PROJECT_ROOT, 'packaging'), join(project, 'packaging'), { recursive: true });
    debForDom0(project, log);
    writeFileSync(
      join(share, 'plan.env'),
      [
        `XBH_PROJECT='${PROJECT_ROOT}'`,
        "XBH_DIST='/xbh-share/project/dist'",
        `XBH_DOMU_KERNEL='${t.vmlinux}'`,
        `XBH_DOMU_RAMDISK='${t.domuInitrd}'`,
        `XBH_INSTALL='${existsSync(installer) ? '/xbh-share/project/install' : ''}'`,
        `XBH_SCENARIO_TIMEOUT=${scenarioTimeoutS}`,
        ...Object.entries(env).map(([k, v]) => `${k}='${v}'`),
        `XBH_PASS='${Object.keys(env).join(' ')}'`,
        '',
      ].join('\n'),
    );
    writeFileSync(join(share, 'scenarios'), jobs.map((j) => `${j.id} ${j.interp} ${j.file}\n`).join(''));

    let consoleText = '';
    let bootMs;
    let ended = false;
    const qemu = spawn(QEMU, qemuArgs(t, share), { stdio: ['ignore', 'pipe', 'pipe'] });
    const onData = (d) => {
      const s = d.toString();
      consoleText = (consoleText + s).slice(-CONSOLE_KEEP);
      if (bootMs === undefined && consoleText.includes('xbh-dom0:') && consoleText.includes('] ready'))
        bootMs = Date.now() - t0;
      onConsole?.(s);
      // dom0 has written its results and synced: stop QEMU (a halted Xen would sit there).
      if (!ended && END_MARK.test(consoleText.slice(-4096))) {
        ended = true;
        setTimeout(() => qemu.kill('SIGTERM'), 300);
      }
    };
    qemu.stdout.on('data', onData);
    qemu.stderr.on('data', onData);
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

    const results = jobs.map((j) => {
      const base = join(share, 'results', j.id);
      const status = readIf(`${base}.status`).trim().split(/\s+/);
      const finished = status.length === 2;
      const exitCode = finished ? Number(status[0]) : null;
      const r = {
        name: j.name,
        file: j.file,
        finished,
        exitCode,
        durationMs: finished ? Number(status[1]) : undefined,
        timedOut: finished ? exitCode === 124 || exitCode === 137 : timedOut,
        stdout: readIf(`${base}.out`),
        stderr: readIf(`${base}.err`),
        leftovers: readIf(`${base}.leftovers`).trim(),
      };
      r.ok = finished && exitCode === 0 && !r.leftovers;
      return r;
    });
    const done = /XBH-XEN-TIER-DONE/.test(consoleText);
    const setupError = readIf(join(share, 'setup-error')).trim() || undefined;
    const readyMs = Number(readIf(join(share, 'ready-ms'))) || undefined;
    return {
      ok: done && !timedOut && results.every((r) => r.ok),
      done,
      timedOut,
      setupError,
      qemuExit,
      bootMs,
      readyMs,
      totalMs: Date.now() - t0,
      hostLoad: `${loadStart} at the start, ${readIf('/proc/loadavg').split(' ').slice(0, 3).join(' ')} at the end`,
      consoleTail: consoleText.split('\n').slice(-60).join('\n'),
      logs: collectLogs(join(share, 'logs')),
      results,
      tier: t,
    };
  } finally {
    if (keep) log(`kept the results share: ${share}`);
    else rmSync(share, { recursive: true, force: true });
  }
}

/** Why a scenario failed, in a few lines (empty when it passed). */
export function describeFailure(r, run) {
  const why = [];
  if (!r.finished)
    why.push(
      run.timedOut
        ? 'the boot hit its time limit before this scenario finished'
        : 'dom0 stopped before this scenario finished',
    );
  else if (r.timedOut) why.push(`timed out after ${r.durationMs} ms`);
  else if (r.exitCode !== 0) why.push(`exited with ${r.exitCode}`);
  if (r.leftovers) why.push(`left behind (cleared afterwards):\n${r.leftovers}`);
  return why.join('\n');
}

/** The guest logs worth printing on failure: xl/hotplug logs and the domU consoles. */
export function formatLogs(logs, maxPerLog = 4000) {
  return Object.entries(logs)
    .filter(([name]) => !name.endsWith('dmesg.txt'))
    .map(([name, text]) => `--- ${name} ---\n${text.length > maxPerLog ? `…${text.slice(-maxPerLog)}` : text}`)
    .join('\n');
}

async function main(argv) {
  const picked = [];
  let timeoutMs = 1_800_000;
  let quiet = false;
  let keep = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--timeout') timeoutMs = Number(argv[++i]) * 1000;
    else if (a === '--quiet') quiet = true;
    else if (a === '--keep') keep = true;
    else if (a === '-h' || a === '--help') {
      console.log('usage: node scripts/xen/run.mjs [--timeout SECONDS] [--quiet] [--keep] [SCENARIO...]');
      return 0;
    } else if (a.startsWith('-')) {
      console.error(`unknown option ${a}`);
      return 2;
    } else picked.push(a);
  }
  const all = listScenarios();
  const scenarios = picked.length
    ? picked.map((p) => (existsSync(p) ? p : (all.find((f) => basename(f).includes(p)) ?? p)))
    : all;
  for (const s of scenarios)
    if (!existsSync(s)) {
      console.error(`no such scenario: ${s}`);
      return 2;
    }
  const run = await runXenTier({
    scenarios,
    timeoutMs,
    keep,
    onConsole: quiet ? undefined : (s) => process.stdout.write(s),
    log: (m) => console.error(m),
  });
  console.error(
    `\nxen tier: ${run.totalMs} ms total; dom0 ready after ${run.bootMs ?? '?'} ms; host load ${run.hostLoad}` +
      `${run.timedOut ? '; TIMED OUT (QEMU killed)' : ''}${run.setupError ? `; dom0 setup failed: ${run.setupError}` : ''}`,
  );
  for (const r of run.results) {
    const why = describeFailure(r, run);
    console.error(`${why ? 'FAIL' : 'ok  '} ${r.name} (${r.durationMs ?? '?'} ms)${why ? `: ${why}` : ''}`);
    const text = why ? `${r.stdout}${r.stderr}` : r.stdout;
    console.error(
      text
        .trim()
        .split('\n')
        .map((l) => `     | ${l}`)
        .join('\n'),
    );
  }
  if (!run.ok) {
    if (quiet) console.error(`console tail:\n${run.consoleTail}`);
    console.error(formatLogs(run.logs));
  }
  return run.ok ? 0 : 1;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  process.exitCode = await main(process.argv.slice(2));
}
