/**
 * block-cow through the resident service (real kernel, real dm-snapshot): the installed wrapper
 * hands add and remove to `xen-blockhooks serve`, which builds the device (its journal record
 * carries the service's pid); the guest's writes read back and the base never changes. Then the
 * service is SIGKILLed after each command of an add, and after each command of a remove
 * (XEN_BLOCKHOOKS_FAULT_KILL_AFTER in its environment): the wrapper notices, runs the event
 * itself, and the disk ends connected (add) or gone (remove) with nothing left behind.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Journal } from '../../src/journal/journal.js';
import { formatRequest } from '../../src/serve/protocol.js';
import { runWrapper, startServe, writeWrapper, type Served } from '../lib/serve-harness.js';
import {
  backendPath,
  base,
  baseSum,
  closeBackend,
  destroyNodes,
  disk,
  env,
  explain,
  leftovers,
  listDir,
  logFile,
  pread,
  pwrite,
  root,
  sha256File,
  stateDir,
  storeDir,
  writeBackendNodes,
  xs,
  type DiskNodes,
} from './cow-lib.js';

let wrapper = '';
let chan = '';
const wenv = (): NodeJS.ProcessEnv => ({ ...env, XEN_BLOCKHOOKS_SERVE_DIR: chan });

before(() => {
  mkdirSync(join(root, 'wrappers'), { recursive: true });
  wrapper = writeWrapper(join(root, 'wrappers'), 'block-cow');
  chan = join(root, 'serve');
});

let current: Served | undefined;
after(async () => {
  await current?.stop();
});

async function serveWith(extra: NodeJS.ProcessEnv = {}): Promise<Served> {
  current = await startServe(chan, { ...env, ...extra });
  return current;
}

async function add(d: DiskNodes): Promise<string> {
  const r = await runWrapper(wrapper, 'add', backendPath(d), wenv());
  assert.equal(r.code, 0, `add ${backendPath(d)}: ${explain(r)}`);
  assert.equal(await xs.read(`${backendPath(d)}/hotplug-status`), 'connected');
  return xs.read(`${backendPath(d)}/physical-device-path`);
}

async function remove(d: DiskNodes): Promise<void> {
  await closeBackend(xs, d);
  const r = await runWrapper(wrapper, 'remove', backendPath(d), wenv());
  assert.equal(r.code, 0, `remove ${backendPath(d)}: ${explain(r)}`);
  await destroyNodes(xs, d);
}

test('block-cow add and remove handed to the service build and take down the real device', async () => {
  const s = await serveWith();
  const d = disk(3, { domainName: 'served' });
  await writeBackendNodes(xs, d);
  const dev = await add(d);
  assert.equal(new Journal(stateDir).load(backendPath(d))?.pid, s.pid, "the record is the service's");
  const mine = Buffer.alloc(4096, 0x5a);
  pwrite(dev, 3 * 1024 * 1024, mine);
  assert.deepEqual(pread(dev, 3 * 1024 * 1024, 4096), mine, 'the guest reads what it wrote');
  await remove(d);
  assert.equal(await s.stop(), 0, 'the service stops cleanly');
  current = undefined;
  assert.deepEqual(leftovers(), [], 'nothing left');
  assert.equal(sha256File(base), baseSum, 'the base is unchanged');
});

for (const action of ['add', 'remove'] as const) {
  test(`block-cow: the service SIGKILLed after each command of ${action}; the wrapper finishes it, nothing is left`, async () => {
    await (await serveWith()).stop(); // the channel exists: every command counted is the event's
    let kills = 0;
    for (let n = 1; n <= 40; n++) {
      const d = disk(10 + n, { domainName: `kill${n}` });
      await writeBackendNodes(xs, d);
      if (action === 'remove') await add(d); // no service: the wrapper adds it itself
      const s = await serveWith({ XEN_BLOCKHOOKS_FAULT_KILL_AFTER: String(n) });
      let dev = '';
      if (action === 'add') dev = await add(d);
      else await remove(d);
      const killed =
        (await Promise.race([s.exited, new Promise((r) => setTimeout(() => r('alive'), 100))])) !== 'alive';
      await s.stop();
      current = undefined;
      if (action === 'add') {
        const mine = Buffer.alloc(4096, n);
        pwrite(dev, 1024 * 1024, mine);
        assert.deepEqual(pread(dev, 1024 * 1024, 4096), mine, `kill after ${n}: the disk works`);
        await remove(d);
      }
      assert.deepEqual(leftovers(), [], `kill after ${n}: nothing left`);
      if (!killed) break;
      kills++;
    }
    assert.ok(kills >= 3, `the service was killed at ${kills} points of the ${action}`);
    assert.equal(sha256File(base), baseSum, 'the base is unchanged');
    process.stdout.write(`# ${action}: service killed at ${kills} points\n`);
  });
}

test('block-thin and block-qcow handed to the service: real dm-thin and qemu-nbd devices, the data read back, nothing left', async () => {
  const s = await serveWith();
  const hooks = [
    {
      name: 'block-thin',
      params: `${base} 48M`,
      extra: { XEN_BLOCKHOOKS_THIN_DATA_SIZE: '8M', XEN_BLOCKHOOKS_THIN_METADATA_SIZE: '4M' },
    },
    { name: 'block-qcow', params: `${base} overlay=transient`, extra: {} },
  ];
  for (const [i, hk] of hooks.entries()) {
    const w = writeWrapper(join(root, 'wrappers'), hk.name);
    const d = disk(60 + i, { domainName: `srv${hk.name}`, params: hk.params, script: `/etc/xen/scripts/${hk.name}` });
    await writeBackendNodes(xs, d);
    const e = { ...wenv(), ...hk.extra };
    const a = await runWrapper(w, 'add', backendPath(d), e);
    assert.equal(a.code, 0, `${hk.name} add: ${explain(a)}`);
    assert.equal(new Journal(stateDir).load(backendPath(d))?.pid, s.pid, `${hk.name}: the record is the service's`);
    const dev = await xs.read(`${backendPath(d)}/physical-device-path`);
    assert.match(dev, hk.name === 'block-qcow' ? /^\/dev\/nbd\d+$/ : /^\/dev\/(mapper\/|dm-)/, `${hk.name}: ${dev}`);
    assert.equal(
      pread(dev, 4096, 16).toString('latin1'),
      pread(base, 4096, 16).toString('latin1'),
      `${hk.name}: reads the base`,
    );
    const mine = Buffer.alloc(4096, 0xa5);
    pwrite(dev, 2 * 1024 * 1024, mine);
    assert.deepEqual(pread(dev, 2 * 1024 * 1024, 4096), mine, `${hk.name}: reads back what it wrote`);
    await closeBackend(xs, d);
    const r = await runWrapper(w, 'remove', backendPath(d), e);
    assert.equal(r.code, 0, `${hk.name} remove: ${explain(r)}`);
    await destroyNodes(xs, d);
  }
  await s.stop();
  current = undefined;
  // block-qcow keeps its overlay directory in the store (empty), as it does run on its own.
  assert.deepEqual(leftovers(['qcow']), [], 'nothing left');
  assert.deepEqual(listDir(join(storeDir, 'qcow')), [], 'no overlay left');
  assert.equal(sha256File(base), baseSum, 'the base is unchanged');
});

test('block-cow: hostile messages on the channel and a user who is not root are refused; no device, store or record is made', async () => {
  const s = await serveWith();
  const d = disk(90, { domainName: 'hostile' });
  await writeBackendNodes(xs, d);
  const be = backendPath(d);
  const send = (line: string) => writeFileSync(join(chan, 'in'), line, { flag: 'a' });
  const self = process.pid;
  const good = { slot: 7, pid: self, hook: 'block-cow', argv: ['add'], env: { XENBUS_PATH: be } };
  const request = (bytes: string | Buffer) => {
    writeFileSync(join(chan, '7.claim'), `${self}\n`);
    writeFileSync(join(chan, '7.req'), bytes);
    send('7\n');
  };
  const cases: [string, () => void][] = [
    ['a line that is no slot', () => send('../../etc/passwd\n')],
    ['a slot out of range', () => send('999\n')],
    ['an idle slot', () => send('3\n')],
    ['garbage in a request', () => request('hello\n')],
    ['a request for an unknown hook', () => request(formatRequest({ ...good, hook: '../../bin/sh' }))],
    [
      'an environment name that is not forwarded',
      () => request(formatRequest({ ...good, env: { ...good.env, LD_PRELOAD: '/tmp/x.so' } })),
    ],
    ["a request whose pid is not the slot claim's", () => request(formatRequest({ ...good, pid: 2 }))],
    [
      'a request that is a symbolic link',
      () => {
        writeFileSync(join(chan, '7.claim'), `${self}\n`);
        writeFileSync(join(root, 'elsewhere.req'), formatRequest(good));
        symlinkSync(join(root, 'elsewhere.req'), join(chan, '7.req'));
        send('7\n');
      },
    ],
    ['a flood of noise', () => send('x'.repeat(100_000) + '\n')],
  ];
  for (const [what, act] of cases) {
    act();
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(s.child.exitCode, null, `${what}: the service still runs`);
    assert.equal(
      await xs.read(`${be}/hotplug-status`).catch(() => undefined),
      undefined,
      `${what}: nothing in xenstore`,
    );
    assert.deepEqual(leftovers(['qcow']), [], `${what}: no device, store or record`);
  }
  const log = existsSync(logFile) ? readFileSync(logFile, 'utf8') : '';
  for (const why of [
    /serve: refused the request on slot 7: request does not end in NUL/,
    /unknown hook/,
    /environment name "LD_PRELOAD" is not forwarded/,
    /claim is not pid 2's/,
    /request is not a plain file/,
  ])
    assert.match(log, why);

  // nobody (uid 65534) runs the installed wrapper: it cannot enter the channel directory.
  chmodSync(root, 0o755);
  chmodSync(join(root, 'wrappers'), 0o755);
  const r = await new Promise<{ code: number | null; stderr: string }>((res, rej) => {
    const child = spawn(wrapper, ['add'], {
      uid: 65534,
      gid: 65534,
      env: { ...wenv(), XENBUS_PATH: be, XENBUS_TYPE: 'vbd', XENBUS_BASE_PATH: 'backend' },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (x: string) => (stderr += x));
    child.on('error', rej);
    child.on('close', (code) => res({ code, stderr }));
  });
  assert.notEqual(r.code, 0, `nobody's add fails (stderr: ${r.stderr.slice(-300)})`);
  assert.doesNotMatch(r.stderr, /serve/, 'without reaching the service');
  assert.equal(await xs.read(`${be}/physical-device`).catch(() => undefined), undefined, 'no device reported');
  assert.deepEqual(leftovers(['qcow']), [], "nobody's add left nothing");
  assert.deepEqual(
    listDir(chan).filter((n) => /\.(claim|req)$/.test(n) && !n.startsWith('7.')),
    [],
    'nothing of it in the channel',
  );

  // The service still serves a real event afterwards, on real dm.
  const dev = await add(d);
  assert.equal(new Journal(stateDir).load(be)?.pid, s.pid, 'through the service');
  const mine = Buffer.alloc(4096, 0x3c);
  pwrite(dev, 1024 * 1024, mine);
  assert.deepEqual(pread(dev, 1024 * 1024, 4096), mine);
  await remove(d);
  await s.stop();
  current = undefined;
  assert.deepEqual(leftovers(['qcow']), [], 'nothing left');
  assert.equal(sha256File(base), baseSum, 'the base is unchanged');
});
