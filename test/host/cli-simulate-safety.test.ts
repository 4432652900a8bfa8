/**
 * `xen-blockhooks simulate` never endangers a real disk: a backend path with a record in the
 * real journal, or a node in a running xenstored, is refused with its record and devices
 * untouched; a --real-xenstore domain id that a real domain has is refused; the embedded
 * simulation keeps its journal in a namespace of its own; neither it nor a --real-xenstore run
 * writes to the hotplug log unless asked. block-thin and block-qcow, which share host-wide state
 * beyond the journal (the thin pool, the nbd devices), are refused in embedded mode while real
 * disks of theirs are recorded (or the pool exists), with the record untouched.
 * Tier: host, the bundled `block` hook on real loop devices, xenstore served in-process; the
 * block-thin and block-qcow refusals come before anything is built, from journal records and
 * pool files written by the test (no real pool or nbd device is made).
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cliMain } from '../../src/cli/main.js';
import { Journal } from '../../src/journal/journal.js';
import { fileIdOf } from '../../src/devices/sysfs.js';
import { startTestStore, writeDomain } from '../lib/block-harness.js';
import { writeBackendNodes } from '../lib/backend-nodes.js';
import { projectRoot } from '../lib/project-root.js';

function world(t: { teardown(f: () => unknown): void }) {
  const dir = mkdtempSync(join(tmpdir(), 'xbh-simsafe-'));
  const images = join(dir, 'images');
  mkdirSync(images);
  const img = join(images, 'disk.img');
  writeFileSync(img, Buffer.alloc(1024 * 1024));
  // The configuration names a hotplug log, as /etc/xen/blockhooks.conf does by default.
  const log = join(dir, 'xen-hotplug.log');
  writeFileSync(join(dir, 'blockhooks.conf'), `log_file = ${log}\n`);
  const env: NodeJS.ProcessEnv = {
    PATH: process.env.PATH,
    XEN_BLOCKHOOKS_CONF: join(dir, 'blockhooks.conf'),
    XEN_BLOCKHOOKS_STATE_DIR: join(dir, 'state'),
    XEN_BLOCKHOOKS_STORE_DIR: join(dir, 'store'),
    XEN_BLOCKHOOKS_IMAGE_DIRS: images,
    XEN_BLOCKHOOKS_XEN_LOCK_DIR: join(dir, 'xen-hotplug'),
    XENSTORED_PATH: join(dir, 'no-xenstored'),
  };
  const loopsOnImg = () =>
    execFileSync('losetup', ['-j', img], { encoding: 'utf8' })
      .split('\n')
      .filter(Boolean)
      .map((l) => l.split(':')[0] as string);
  t.teardown(() => {
    for (const l of loopsOnImg()) execFileSync('losetup', ['-d', l]);
    rmSync(dir, { recursive: true, force: true });
  });
  const cli = async (args: string[], extra: NodeJS.ProcessEnv = {}) => {
    const out: string[] = [];
    const err: string[] = [];
    const code = await cliMain(
      args,
      { ...env, ...extra },
      { out: (s) => out.push(s), err: (s) => err.push(s), bundleDir: join(projectRoot(), 'dist') },
    );
    return { code, out: out.join('\n'), err: err.join('\n') };
  };
  return { dir, img, log, env, cli, loopsOnImg };
}

/** A real disk's record (what `block` writes for a file: disk) with its loop attached. */
function realDisk(w: ReturnType<typeof world>, domid: number): { file: string; text: string; loop: string } {
  const loop = execFileSync('losetup', ['--find', '--show', '--', w.img], { encoding: 'utf8' }).trim();
  const journal = new Journal(join(w.dir, 'state'));
  const entry = Journal.begin('block', `backend/vbd/${domid}/51712`, {
    params: w.img,
    mode: 'w',
    frontendId: domid,
    vdev: 'xvda',
    domainName: 'prod',
  });
  entry.phase = 'ready';
  const id = fileIdOf(w.img);
  entry.steps.push({
    kind: 'block-loop',
    data: { file: w.img, ...id, readOnly: false, before: [], device: loop },
    done: true,
  });
  journal.save(entry);
  const file = journal.file(entry.backendPath);
  return { file, text: readFileSync(file, 'utf8'), loop };
}

t.test('a backend path with a record in the real journal is refused; record and device untouched', async (t) => {
  const w = world(t);
  const real = realDisk(w, 1);
  const r = await w.cli(['simulate', `file:${w.img},xvda,w`]);
  t.equal(r.code, 1, 'refused');
  t.match(
    r.err,
    /backend\/vbd\/1\/51712 is a real disk \(block record .*, domain prod\); simulate never touches it: choose another --domid/,
  );
  t.equal(readFileSync(real.file, 'utf8'), real.text, 'the record is unchanged');
  t.same(w.loopsOnImg(), [real.loop], 'its loop is still attached');
});

t.test('the embedded simulation has its own journal and writes no hotplug log line', async (t) => {
  const w = world(t);
  const real = realDisk(w, 1);
  const r = await w.cli(['simulate', '--keep', '--domid', '3', `file:${w.img},xvda,r`]);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /journal and locks in .*\/state\/simulate/);
  t.same(
    readdirSync(join(w.dir, 'state', 'journal')),
    ['backend~vbd~1~51712.json'],
    'while the simulated disk is up, the real journal has only the real record',
  );
  t.same(
    readdirSync(join(w.dir, 'state', 'simulate', 'journal')),
    ['backend~vbd~3~51712.json'],
    "the simulated record is in simulate's own journal",
  );
  const rm = await w.cli(['simulate', '--action', 'remove', '--domid', '3', `file:${w.img},xvda,r`]);
  t.equal(rm.code, 0, rm.err);
  t.equal(readFileSync(real.file, 'utf8'), real.text, 'the real record is unchanged');
  t.same(w.loopsOnImg(), [real.loop], 'only the real loop is left');
  t.notOk(existsSync(w.log), 'the configured hotplug log got no line');
  const asked = await w.cli(['simulate', '--domid', '3', `file:${w.img},xvda,r`], { XEN_BLOCKHOOKS_LOG_FILE: w.log });
  t.equal(asked.code, 0, asked.err);
  t.match(readFileSync(w.log, 'utf8'), /backend\/vbd\/3\/51712/, 'a log named in the environment is written');
});

t.test(
  'a backend node in the running xenstored is refused; with --real-xenstore, a real domain id is refused',
  async (t) => {
    const w = world(t);
    const store = await startTestStore('xbh-simsafe-xs-');
    t.teardown(() => store.close());
    await writeDomain(store.xs, { domid: 4, name: 'prod4' });
    await writeBackendNodes(store.xs, {
      domid: 4,
      devid: 51712,
      params: w.img,
      script: '/etc/xen/scripts/block',
      domainName: 'prod4',
    });
    await store.xs.write('backend/vbd/4/51712/physical-device', '7:0');
    const xsEnv = { XENSTORED_PATH: store.socketPath };
    const r = await w.cli(['simulate', '--domid', '4', `file:${w.img},xvda,r`], xsEnv);
    t.equal(r.code, 1);
    t.match(
      r.err,
      /\/local\/domain\/0\/backend\/vbd\/4\/51712 exists in the running xenstored \(physical-device 7:0\)/,
    );
    t.equal(await store.xs.read('backend/vbd/4/51712/physical-device'), '7:0', 'the node is untouched');

    const dom = await w.cli(['simulate', '--real-xenstore', '--domid', '4', `file:${w.img},xvdb,r`], xsEnv);
    t.equal(dom.code, 1);
    t.match(dom.err, /domain 4 \(prod4\) exists in the running xenstored and was not made by simulate/);

    const keep = await w.cli(['simulate', '--real-xenstore', '--keep', '--domid', '6', `file:${w.img},xvda,r`], xsEnv);
    t.equal(keep.code, 0, keep.err);
    const rm = await w.cli(
      ['simulate', '--real-xenstore', '--action', 'remove', '--domid', '6', `file:${w.img},xvda,r`],
      xsEnv,
    );
    t.equal(rm.code, 0, `simulate's own domain can be taken down again: ${rm.err}`);
    t.same(w.loopsOnImg(), [], 'nothing left');
    t.notOk(existsSync(w.log), 'with --real-xenstore too, the configured hotplug log got no simulated line');
  },
);

/** A real block-thin disk's record (what block-thin writes): its pool reference and thin id. */
function realThinDisk(w: ReturnType<typeof world>, domid: number): { file: string; text: string } {
  const journal = new Journal(join(w.dir, 'state'));
  const entry = Journal.begin('block-thin', `backend/vbd/${domid}/51712`, {
    params: `${w.img} 8M`,
    mode: 'w',
    frontendId: domid,
    vdev: 'xvda',
    domainName: 'prod',
  });
  entry.phase = 'ready';
  const store = join(w.dir, 'store');
  entry.steps.push(
    {
      kind: 'thin-pool',
      data: { pool: 'xbh-thinpool', data: join(store, 'thin-pool.data'), meta: join(store, 'thin-pool.meta') },
      done: true,
    },
    { kind: 'thin', data: { pool: 'xbh-thinpool', id: 0, persistent: false, key: 'x', existed: false }, done: true },
  );
  journal.save(entry);
  const file = journal.file(entry.backendPath);
  return { file, text: readFileSync(file, 'utf8') };
}

t.test(
  'embedded block-thin is refused while a real block-thin disk is recorded; the record is untouched',
  async (t) => {
    // Host tier: the refusal comes before anything is built, so the record needs no real pool.
    const w = world(t);
    const real = realThinDisk(w, 2);
    const spec = `vdev=xvda,access=w,script=block-thin,target=${w.img} 8M`;
    for (const args of [
      ['simulate', spec],
      ['simulate', '--action', 'remove', spec],
    ]) {
      const r = await w.cli(args);
      t.equal(r.code, 1, `${args.join(' ')}: refused`);
      t.equal(
        r.err,
        `xen-blockhooks simulate: block-thin disks share the thin pool xbh-thinpool with the real block-thin disks, and the real journal holds one: backend/vbd/2/51712 (${real.file}); with the embedded xenstore simulate keeps a journal of its own and could take or tear down what a real disk uses, so it builds nothing: run it with --real-xenstore (the hooks' own journal and locks)`,
      );
      t.equal(r.out, '', 'nothing was written or run');
    }
    t.equal(readFileSync(real.file, 'utf8'), real.text, 'the record is unchanged');
    t.notOk(existsSync(join(w.dir, 'state', 'simulate')), 'simulate made no journal');
    t.notOk(existsSync(join(w.dir, 'store')), 'no pool file was made');
  },
);

t.test('embedded block-thin is refused while the thin pool files exist, with no record', async (t) => {
  const w = world(t);
  const store = join(w.dir, 'store');
  mkdirSync(store);
  writeFileSync(join(store, 'thin-pool.transient.json'), '{"0":"backend/vbd/9/51712"}\n');
  const before = readFileSync(join(store, 'thin-pool.transient.json'), 'utf8');
  const r = await w.cli(['simulate', `vdev=xvda,access=w,script=block-thin,target=${w.img} 8M`]);
  t.equal(r.code, 1);
  t.equal(
    r.err,
    `xen-blockhooks simulate: block-thin disks share the thin pool xbh-thinpool with the real block-thin disks: ${join(store, 'thin-pool.transient.json')} exists; with the embedded xenstore simulate keeps a journal of its own and could take or tear down what a real disk uses, so it builds nothing: run it with --real-xenstore (the hooks' own journal and locks)`,
  );
  t.equal(readFileSync(join(store, 'thin-pool.transient.json'), 'utf8'), before, 'the transient list is unchanged');
});

t.test('embedded block-qcow is refused while a real block-qcow disk is recorded', async (t) => {
  const w = world(t);
  const journal = new Journal(join(w.dir, 'state'));
  const entry = Journal.begin('block-qcow', 'backend/vbd/5/51712', {
    params: w.img,
    mode: 'w',
    frontendId: 5,
    vdev: 'xvda',
    domainName: 'prod5',
  });
  entry.phase = 'ready';
  entry.steps.push({
    kind: 'nbd',
    data: { pidFile: '/run/x.pid', image: w.img, format: 'raw', readOnly: false, device: '/dev/nbd0' },
    done: true,
  });
  journal.save(entry);
  const file = journal.file(entry.backendPath);
  const text = readFileSync(file, 'utf8');
  const r = await w.cli(['simulate', `vdev=xvda,access=w,script=block-qcow,target=${w.img}`]);
  t.equal(r.code, 1);
  t.equal(
    r.err,
    `xen-blockhooks simulate: block-qcow disks share the choice of a free nbd device with the real block-qcow disks, and the real journal holds one: backend/vbd/5/51712 (${file}); with the embedded xenstore simulate keeps a journal of its own and could take or tear down what a real disk uses, so it builds nothing: run it with --real-xenstore (the hooks' own journal and locks)`,
  );
  t.equal(readFileSync(file, 'utf8'), text, 'the record is unchanged');
});
