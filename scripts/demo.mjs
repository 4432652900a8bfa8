#!/usr/bin/env node
// The first thing to run: two domains boot from one read-only base image through block-cow,
// each writes to its own copy-on-write disk, neither sees the other's writes, the base never
// changes, and when both are removed nothing is left.
//
//   npm run demo                  (node scripts/demo.mjs)
//
// It drives the real hook through `xen-blockhooks simulate` (the domain builder's part, against
// an embedded xenstore). That needs root and a kernel with device-mapper: on a dom0 it runs
// directly; on a machine without device-mapper it runs inside the project's QEMU guest.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync,
  existsSync,
  fsyncSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  rmSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const CLI = join(ROOT, 'dist', 'xen-blockhooks.mjs');
const BASE_MIB = 64;
const BLOCK = 4096;

function hasDeviceMapper() {
  if (existsSync('/sys/module/dm_mod')) return true;
  try {
    return readFileSync('/proc/misc', 'utf8').includes('device-mapper');
  } catch {
    return false;
  }
}

/** The recognisable base: every 4 KiB block starts with its own number. */
const header = (i) => `xen-blockhooks demo base image, block ${String(i).padStart(6, '0')}\n`;

function baseBlock(i) {
  const b = Buffer.alloc(BLOCK, 0x2e);
  b.write(header(i), 0, 'latin1');
  return b;
}

function makeBase(file) {
  const fd = openSync(file, 'wx', 0o644);
  try {
    const chunk = Buffer.alloc(BLOCK * 256, 0x2e);
    for (let c = 0; c < (BASE_MIB * 1024 * 1024) / chunk.length; c++) {
      for (let j = 0; j < 256; j++) chunk.write(header(c * 256 + j), j * BLOCK, 'latin1');
      writeSync(fd, chunk);
    }
  } finally {
    closeSync(fd);
  }
}

function sha256(file) {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

function readAt(dev, offset, length) {
  const fd = openSync(dev, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

function writeAt(dev, offset, data) {
  const fd = openSync(dev, 'r+');
  try {
    writeSync(fd, data, 0, data.length, offset);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

const line = (b) => b.toString('latin1').split('\n')[0];

async function inside() {
  if (process.getuid?.() !== 0) {
    console.error('demo: needs root (it creates loop and device-mapper devices)');
    return 1;
  }
  const work = mkdtempSync(join(process.env.XEN_BLOCKHOOKS_SCRATCH ?? tmpdir(), 'xbh-demo-'));
  const images = join(work, 'images');
  mkdirSync(images);
  const base = join(images, 'base.img');
  const sock = join(work, 'xenstored.sock');
  const env = {
    PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
    DM_DISABLE_UDEV: process.env.DM_DISABLE_UDEV ?? (existsSync('/run/udev/control') ? '' : '1'),
    XENSTORED_PATH: sock,
    XEN_BLOCKHOOKS_CONF: join(work, 'blockhooks.conf'),
    XEN_BLOCKHOOKS_STORE_DIR: join(work, 'store'),
    XEN_BLOCKHOOKS_STATE_DIR: join(work, 'state'),
    XEN_BLOCKHOOKS_IMAGE_DIRS: images,
    XEN_BLOCKHOOKS_XEN_LOCK_DIR: join(work, 'xen-hotplug'),
    XEN_BLOCKHOOKS_LOG_FILE: join(work, 'xen-hotplug.log'),
  };
  if (!env.DM_DISABLE_UDEV) delete env.DM_DISABLE_UDEV;
  let server;
  let failures = 0;
  const check = (ok, what) => {
    console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}`);
    if (!ok) failures++;
  };
  const t0 = Date.now();
  const cli = (args, { quiet = false } = {}) => {
    console.log(
      `\n[${((Date.now() - t0) / 1000).toFixed(1)} s] $ xen-blockhooks ${args.map((a) => (/[\s,']/.test(a) ? `'${a}'` : a)).join(' ')}`,
    );
    const r = spawnSync(process.execPath, [CLI, ...args], { env, encoding: 'utf8' });
    const text = `${r.stdout}${r.stderr}`.trimEnd();
    if (!quiet) console.log(text);
    return { code: r.status, stdout: r.stdout, text };
  };
  try {
    makeBase(base);
    const sumBefore = sha256(base);
    console.log(
      `base image: ${base}, ${BASE_MIB} MiB, every 4 KiB block says "${line(baseBlock(7))}" with its own number`,
    );
    console.log(`sha256 ${sumBefore}`);

    server = spawn(process.execPath, [CLI, 'xenstored', '--socket', sock], {
      env,
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    for (let i = 0; i < 600 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 50));
    if (!existsSync(sock)) throw new Error('the embedded xenstore server did not start');

    const web = cli([
      'simulate',
      '--real-xenstore',
      '--keep',
      '--domid',
      '1',
      '--name',
      'web',
      `vdev=xvda,access=w,script=block-cow,target=${base} 16`,
    ]);
    check(web.code === 0, 'domain 1 (web): block-cow add in xl syntax');
    const db = cli([
      'simulate',
      '--real-xenstore',
      '--keep',
      '--domid',
      '2',
      '--name',
      'db',
      '--xm',
      `cow:${base} 16,xvda,w`,
    ]);
    check(db.code === 0, 'domain 2 (db): block-cow add in xm syntax (backend type=cow)');
    if (web.code !== 0 || db.code !== 0) return 1;

    const dev = (r) => /^built: physical-device \S+ = (\S+)$/m.exec(r.stdout)?.[1];
    const [dWeb, dDb] = [dev(web), dev(db)];
    console.log(`web's disk is ${dWeb}, db's disk is ${dDb}`);

    console.log('\neach domain writes its own block 0; block 1 is left alone');
    writeAt(dWeb, 0, Buffer.from('written by web\n'.padEnd(BLOCK, ' ')));
    writeAt(dDb, 0, Buffer.from('written by db\n'.padEnd(BLOCK, ' ')));
    const r0w = line(readAt(dWeb, 0, BLOCK));
    const r0d = line(readAt(dDb, 0, BLOCK));
    console.log(`  web reads block 0: "${r0w}"`);
    console.log(`  db  reads block 0: "${r0d}"`);
    check(r0w === 'written by web' && r0d === 'written by db', 'each domain reads back only its own write');
    check(
      line(readAt(dWeb, BLOCK, BLOCK)) === line(baseBlock(1)) && line(readAt(dDb, BLOCK, BLOCK)) === line(baseBlock(1)),
      `both still read the base's block 1: "${line(baseBlock(1))}"`,
    );
    check(sha256(base) === sumBefore, 'the base image is unchanged');

    cli(['status']);
    const g = cli(['grow', 'web', 'xvda', '+16M']);
    check(g.code === 0, "web's store grown by 16 MiB while attached");

    const rmWeb = cli([
      'simulate',
      '--real-xenstore',
      '--action',
      'remove',
      '--domid',
      '1',
      '--name',
      'web',
      `vdev=xvda,access=w,script=block-cow,target=${base} 16`,
    ]);
    check(rmWeb.code === 0, 'domain 1 removed');
    check(line(readAt(dDb, 0, BLOCK)) === 'written by db', 'db still reads its own data after web is gone');
    const rmDb = cli([
      'simulate',
      '--real-xenstore',
      '--action',
      'remove',
      '--domid',
      '2',
      '--name',
      'db',
      '--xm',
      `cow:${base} 16,xvda,w`,
    ]);
    check(rmDb.code === 0, 'domain 2 removed');

    const dm = execFileSync('dmsetup', ['ls'], { encoding: 'utf8' });
    check(!/xbh-/.test(dm), 'no device-mapper device left');
    const loops = execFileSync('losetup', ['--list', '--noheadings', '-O', 'NAME,BACK-FILE'], { encoding: 'utf8' });
    check(!loops.includes(work), 'no loop device on the base or a store');
    check(sha256(base) === sumBefore, `the base image is unchanged (sha256 ${sumBefore.slice(0, 16)}…)`);
    console.log(failures ? `\ndemo: ${failures} check(s) failed` : '\ndemo: all checks passed');
    return failures ? 1 : 0;
  } finally {
    server?.kill('SIGTERM');
    rmSync(work, { recursive: true, force: true });
  }
}

async function outside() {
  if (!existsSync(join(ROOT, 'node_modules'))) {
    console.error('demo: run "npm ci" first');
    return 1;
  }
  const direct = hasDeviceMapper() && process.getuid?.() === 0;
  if (!direct) {
    console.log(
      "This machine has no device-mapper, so the demo runs inside the project's QEMU guest (Debian's kernel with dm, this checkout shared read-only).",
    );
  }
  console.log('building the bundles (npm run build)…');
  execFileSync(process.execPath, [join(ROOT, 'scripts', 'build.mjs')], { stdio: ['ignore', 'ignore', 'inherit'] });
  if (direct) return inside();
  const { runInGuest } = await import('./vm/run-guest.mjs');
  console.log('starting the guest (the first run builds its image; later runs take seconds)…');
  let pending = '';
  const run = await runInGuest({
    commands: [[process.execPath, join(ROOT, 'scripts', 'demo.mjs'), '--inside']],
    timeoutMs: 300_000,
    log: (m) => console.log(m),
    onConsole: (s) => {
      pending += s.replace(/\r/g, '');
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      for (const l of lines) if (!/^xbh-agent:|^\[\s*\d+\.\d+\]/.test(l)) console.log(l);
    },
  });
  const r = run.results[0];
  if (!r?.finished) {
    console.error(`demo: the guest did not finish${run.timedOut ? ' in time' : ''}; console tail:\n${run.consoleTail}`);
    return 1;
  }
  if (r.leftovers.length) console.error(`demo: left behind in the guest:\n${r.leftovers.join('\n')}`);
  console.log(`(guest: ${(run.totalMs / 1000).toFixed(1)} s in all)`);
  return r.exitCode === 0 && r.leftovers.length === 0 ? 0 : 1;
}

process.exitCode = process.argv.includes('--inside') ? await inside() : await outside();
