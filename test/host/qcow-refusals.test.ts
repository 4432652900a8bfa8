/**
 * block-qcow refuses bad input before anything is built: each case runs the real hook runtime
 * (runHook) against an in-process xenstore, with real qemu-img on real image files made here,
 * and checks the toolstack's view (exit 1, hotplug-error + hotplug-status=error) and that nothing
 * was left: no journal record, no overlay, no qemu-nbd.
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, existsSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defaultConfig, type Config } from '../../src/config/config.js';
import { execRunner } from '../../src/devices/exec.js';
import { runHook } from '../../src/hotplug/main.js';
import { memoryLogger } from '../../src/log/logger.js';
import { connectXenstore } from '../../src/xenstore/client.js';
import { startXenstoreServer } from '../../src/xenstore/server.js';
import { qcowBackend } from '../../src/backends/qcow.js';
import { writeBackendNodes } from '../lib/backend-nodes.js';

function img(...args: string[]): void {
  // LUKS creation benchmarks the CPU and fails now and then on a loaded machine ("Unable to get
  // accurate CPU usage"): try again.
  for (let i = 1; ; i++) {
    try {
      execFileSync('qemu-img', args, { stdio: ['ignore', 'ignore', 'pipe'] });
      return;
    } catch (e) {
      if (i >= 5 || !/accurate CPU usage/.test(String((e as { stderr?: unknown }).stderr))) throw e;
    }
  }
}

t.test('bad inputs: hotplug-error, exit 1, nothing left behind', async (t) => {
  const root = mkdtempSync(join(tmpdir(), 'xbh-qcow-refusals-'));
  t.teardown(() => rmSync(root, { recursive: true, force: true }));
  const images = join(root, 'images');
  const outside = join(root, 'outside');
  mkdirSync(images);
  mkdirSync(outside);
  const config: Config = {
    ...defaultConfig(),
    storeDir: join(root, 'store'),
    stateDir: join(root, 'state'),
    imageDirs: [images],
    logFile: '',
    lockTimeoutMs: 5000,
  };
  const server = await startXenstoreServer({ socketPath: join(root, 'xs.sock') });
  t.teardown(() => server.close());
  const xs = await connectXenstore({ path: server.socketPath });
  t.teardown(() => xs.close());

  // Real images.
  img('create', '-q', '-f', 'raw', join(images, 'good.raw'), '16M');
  img('create', '-q', '-f', 'raw', join(outside, 'secret.raw'), '16M');
  img('create', '-q', '-f', 'qcow2', '-b', join(outside, 'secret.raw'), '-F', 'raw', join(images, 'escape.qcow2'));
  symlinkSync(join(outside, 'secret.raw'), join(images, 'link.raw'));
  img('create', '-q', '-f', 'qcow2', '-b', join(images, 'link.raw'), '-F', 'raw', join(images, 'via-link.qcow2'));
  img('create', '-q', '-f', 'qcow2', '-b', join(images, 'escape.qcow2'), '-F', 'qcow2', join(images, 'deep.qcow2'));
  execFileSync('mknod', [join(images, 'zero'), 'c', '1', '5']);
  img(
    'create',
    '-q',
    '-f',
    'qcow2',
    '-u',
    '-b',
    join(images, 'zero'),
    '-F',
    'raw',
    join(images, 'dev-backing.qcow2'),
    '16M',
  );
  img('create', '-q', '-f', 'qcow2', '-o', `data_file=${join(images, 'data.raw')}`, join(images, 'ext.qcow2'), '16M');
  img(
    'create',
    '-q',
    '-f',
    'qcow2',
    '--object',
    'secret,id=s0,data=x',
    '-o',
    'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10',
    join(images, 'enc.qcow2'),
    '16M',
  );
  symlinkSync(join(outside, 'secret.raw'), join(images, 'top-link.raw'));
  mkdirSync(join(images, 'adir'));
  writeFileSync(join(images, 'not-an-image.txt'), 'hello');

  const cases: { params: string; mode?: 'r' | 'w'; error: RegExp; name?: string }[] = [
    {
      params: `${join(images, 'escape.qcow2')} overlay=transient`,
      error: /backing file .*secret\.raw.* lies outside the allowed image directories/,
    },
    { params: join(images, 'escape.qcow2'), mode: 'r', error: /lies outside the allowed image directories/ },
    {
      params: `${join(images, 'via-link.qcow2')} overlay=transient`,
      error: /link\.raw \(it resolves to .*outside\/secret\.raw\) lies outside/,
    },
    { params: `${join(images, 'deep.qcow2')} overlay=transient`, error: /secret\.raw.* lies outside/ },
    { params: `${join(images, 'dev-backing.qcow2')} overlay=transient`, error: /zero is a character device/ },
    { params: join(images, 'ext.qcow2'), error: /external file/ },
    { params: join(images, 'enc.qcow2'), error: /is encrypted/ },
    { params: join(images, 'top-link.raw'), error: /resolves to .*secret\.raw\) lies outside/ },
    { params: join(outside, 'secret.raw'), error: /lies outside the allowed image directories/ },
    { params: `${images}/../outside/secret.raw`, error: /contains "\.\."/ },
    { params: join(images, 'missing.qcow2'), error: /does not exist/ },
    { params: join(images, 'adir'), error: /is a directory/ },
    { params: `${join(images, 'good.raw')} overlay=sometimes`, error: /no, transient or persistent/ },
    { params: `${join(images, 'good.raw')} 30`, error: /not a key=value option/ },
    { params: 'good.raw', error: /not an absolute path/ },
    { params: `${join(images, 'good.raw')} overlay=persistent`, error: /name=NAME/, name: 'no domain name' },
  ];

  let devid = 51712;
  for (const c of cases) {
    devid += 1;
    const d = {
      domid: 7,
      devid,
      params: c.params,
      mode: c.mode ?? 'w',
      vdev: 'xvdb',
      script: '/etc/xen/scripts/block-qcow',
    };
    const be = await writeBackendNodes(xs, d);
    const log = memoryLogger();
    const code = await runHook(
      qcowBackend,
      ['add'],
      { XENBUS_PATH: be },
      {
        config,
        logger: log,
        run: execRunner(),
        connect: () => connectXenstore({ path: server.socketPath }),
        err: () => {},
        out: () => {},
      },
    );
    const label = c.name ?? c.params;
    t.equal(code, 1, `${label}: exit 1`);
    t.match(await xs.tryRead(`${be}/hotplug-error`), c.error, `${label}: hotplug-error says why`);
    t.equal(await xs.tryRead(`${be}/hotplug-status`), 'error', `${label}: hotplug-status=error`);
    t.equal(await xs.tryRead(`${be}/physical-device`), undefined, `${label}: no physical-device`);
    const journal = join(config.stateDir, 'journal');
    t.strictSame(existsSync(journal) ? readdirSync(journal) : [], [], `${label}: no journal record`);
    const qdir = join(config.storeDir, 'qcow');
    t.strictSame(existsSync(qdir) ? readdirSync(qdir) : [], [], `${label}: no overlay`);
  }
  // Nothing ran qemu-nbd: no daemon names our state directory.
  const procs = execFileSync('ps', ['-eo', 'args'], { encoding: 'utf8' })
    .split('\n')
    .filter((l) => l.includes('qemu-nbd') && l.includes(config.stateDir));
  t.strictSame(procs, [], 'no qemu-nbd started');
});
