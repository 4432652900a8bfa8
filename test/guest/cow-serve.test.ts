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
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { Journal } from '../../src/journal/journal.js';
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
