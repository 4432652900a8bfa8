/**
 * block-qcow pieces that need no device: qemu-img/qemu-nbd argument vectors, qemu-img info JSON
 * as qemu-img 7.2 prints it (fixtures captured on this host), the params grammar, the chain check
 * rules and the sharing rules over journal records.
 */
import t from 'tap';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  isQemuLockConflict,
  parseQemuImgInfo,
  qemuImgCreateOverlayArgs,
  qemuImgInfoArgs,
  qemuNbdConnectArgs,
  qemuNbdDisconnectArgs,
} from '../../src/devices/qemu.js';
import { nbdName } from '../../src/devices/nbd.js';
import { checkClaims, parseQcowParams, reservedDevices, usersOf, type Claim } from '../../src/backends/qcow.js';
import { HotplugError } from '../../src/disk/errors.js';
import type { JournalEntry } from '../../src/journal/journal.js';

const FIX = join(import.meta.dirname ?? new URL('.', import.meta.url).pathname, '..', 'fixtures');
const fixture = (n: string) => readFileSync(join(FIX, `qemu-img-7.2-info-${n}.json`), 'utf8');

t.test('qemu-img info argv: -U always, format only when known, user path after --', async (t) => {
  t.strictSame(qemuImgInfoArgs('/srv/a.qcow2'), ['info', '--output=json', '-U', '--', '/srv/a.qcow2']);
  t.strictSame(qemuImgInfoArgs('-rf.img', { format: 'qcow2', backingChain: true }), [
    'info',
    '--output=json',
    '-U',
    '--backing-chain',
    '-f',
    'qcow2',
    '--',
    '-rf.img',
  ]);
});

t.test('qemu-img create argv: qcow2 overlay with the backing format explicit', async (t) => {
  t.strictSame(qemuImgCreateOverlayArgs('/s/o.qcow2', '/srv/b.raw', 'raw'), [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-b',
    '/srv/b.raw',
    '-F',
    'raw',
    '--',
    '/s/o.qcow2',
  ]);
  t.throws(() => qemuImgCreateOverlayArgs('/s/o.qcow2', 'b.raw', 'raw'), /absolute/);
});

t.test('qemu-nbd argv: connect with explicit format, pid file, cache; read-only or discard; disconnect', async (t) => {
  const base = {
    device: '/dev/nbd3',
    image: '/srv/a b.qcow2',
    format: 'qcow2',
    pidFile: '/run/x.pid',
    cache: 'writeback',
  };
  t.strictSame(qemuNbdConnectArgs({ ...base, readOnly: true, discard: true }), [
    '--connect=/dev/nbd3',
    '--format=qcow2',
    '--pid-file=/run/x.pid',
    '--cache=writeback',
    '--read-only',
    '--',
    '/srv/a b.qcow2',
  ]);
  t.strictSame(qemuNbdConnectArgs({ ...base, readOnly: false, discard: true }).slice(4), [
    '--discard=unmap',
    '--',
    '/srv/a b.qcow2',
  ]);
  t.notOk(
    qemuNbdConnectArgs({ ...base, readOnly: false }).includes('--fork'),
    'no --fork: --connect daemonises by itself',
  );
  t.throws(() => qemuNbdConnectArgs({ ...base, format: 'vvfat', readOnly: true }), /unknown image format/);
  t.strictSame(qemuNbdDisconnectArgs('/dev/nbd3'), ['--disconnect', '/dev/nbd3']);
  t.equal(nbdName('/dev/nbd12'), 'nbd12');
  t.equal(nbdName('/dev/loop1'), undefined);
});

t.test('qemu-img info JSON: raw and qcow2 images', async (t) => {
  const [raw] = parseQemuImgInfo(fixture('raw'));
  t.match(raw, {
    format: 'raw',
    virtualSize: 64 * 1024 * 1024,
    backingFilename: undefined,
    encrypted: false,
    dataFile: undefined,
  });
  const [q] = parseQemuImgInfo(fixture('qcow2'));
  t.match(q, { format: 'qcow2', virtualSize: 64 * 1024 * 1024, backingFormat: undefined, dirty: false });
});

t.test('qemu-img info JSON: a three-element backing chain', async (t) => {
  const chain = parseQemuImgInfo(fixture('chain3'));
  t.equal(chain.length, 3);
  t.strictSame(
    chain.map((c) => [c.filename.replace(/^.*\//, ''), c.format, c.backingFormat]),
    [
      ['top.qcow2', 'qcow2', 'qcow2'],
      ['mid.qcow2', 'qcow2', 'raw'],
      ['base.raw', 'raw', undefined],
    ],
  );
  t.equal(chain[0]?.fullBackingFilename, chain[1]?.filename);
});

t.test('qemu-img info JSON: external data file and encryption are seen', async (t) => {
  t.match(parseQemuImgInfo(fixture('data-file'))[0], { format: 'qcow2', dataFile: /data\.raw$/ });
  t.match(parseQemuImgInfo(fixture('encrypted'))[0], { format: 'qcow2', encrypted: true });
});

t.test('qemu-img info JSON: garbage is an error, not a guess', async (t) => {
  t.throws(() => parseQemuImgInfo('qemu-img: oops'), /not JSON/);
  t.throws(() => parseQemuImgInfo('[]'), /empty backing chain/);
  t.throws(() => parseQemuImgInfo('{"filename":"x"}'), /no filename or format/);
});

t.test('qemu lock conflicts are recognised (qemu-nbd 7.2 wording)', async (t) => {
  t.ok(
    isQemuLockConflict(
      `qemu-nbd: Failed to blk_new_open '/s/ov.qcow2': Failed to get "write" lock\nIs another process using the image [/s/ov.qcow2]?`,
    ),
  );
  t.ok(isQemuLockConflict(`qemu-img: Could not open '/s/ov.qcow2': Failed to get shared "write" lock`));
  t.notOk(isQemuLockConflict(`qemu-nbd: Failed to blk_new_open '/s/base.raw': Image is not in qcow2 format`));
});

t.test('params: an image path with spaces', async (t) => {
  t.strictSame(parseQcowParams('/media/LIVE CD/debian 12.qcow2'), {
    image: '/media/LIVE CD/debian 12.qcow2',
    overlay: 'no',
    format: undefined,
    name: undefined,
    cache: undefined,
  });
  t.strictSame(parseQcowParams(' /media/LIVE  CD/debian.qcow2  overlay=transient format=qcow2 '), {
    image: '/media/LIVE  CD/debian.qcow2',
    overlay: 'transient',
    format: 'qcow2',
    name: undefined,
    cache: undefined,
  });
  const expected =
    'Expected: <image> [overlay=no|transient|persistent] [format=FMT] [name=NAME] [cache=MODE], e.g. "/srv/xen/debian.qcow2 overlay=transient".';
  t.throws(() => parseQcowParams('/media/LIVE CD/debian.qcow2 2G overlay=transient'), {
    message: `block-qcow params "/media/LIVE CD/debian.qcow2 2G overlay=transient": "2G" is not a key=value option: block-qcow takes no size (the image's own size is the disk's), and a path cannot end in a word that looks like one. ${expected}`,
  });
});

t.test('params grammar', async (t) => {
  t.strictSame(parseQcowParams('/srv/xen/a.qcow2'), {
    image: '/srv/xen/a.qcow2',
    overlay: 'no',
    format: undefined,
    name: undefined,
    cache: undefined,
  });
  t.match(parseQcowParams('  /srv/xen/a.qcow2   overlay=transient format=raw cache=none '), {
    overlay: 'transient',
    format: 'raw',
    cache: 'none',
  });
  t.match(parseQcowParams('/srv/xen/a.qcow2 overlay=persistent name=web-root'), {
    overlay: 'persistent',
    name: 'web-root',
  });
  t.match(parseQcowParams('/srv/xen/a.qcow2 overlay=none'), { overlay: 'no' });
  const bad: [string, RegExp][] = [
    ['', /no image given/],
    ['a.qcow2', /not an absolute path/],
    ['overlay=transient /srv/a.qcow2', /looks like an option/],
    ['/srv/a.qcow2 30', /"30" is not a key=value option: block-qcow takes no size/],
    [
      '/srv/a.qcow2 persistent',
      /"persistent" is not a key=value option \(e\.g\. overlay=transient\), and a path cannot end in a word that is an option's name or value/,
    ],
    ['/srv/a\n.qcow2', /holds a tab or a line break/],
    ['/srv/a.qcow2 overlay=maybe', /no, transient or persistent/],
    ['/srv/a.qcow2 format=vvfat', /known formats/],
    ['/srv/a.qcow2 cache=fast', /known modes/],
    ['/srv/a.qcow2 overlay=persistent name=../x', /plain name/],
    ['/srv/a.qcow2 overlay=persistent name=.hidden', /must not start/],
    ['/srv/a.qcow2 name=x', /add overlay=persistent/],
    ['/srv/a.qcow2 overlay=no overlay=transient', /given twice/],
    ['/srv/a.qcow2 size=1G', /unknown option "size"/],
  ];
  for (const [p, re] of bad) {
    t.throws(() => parseQcowParams(p), re, p);
    try {
      parseQcowParams(p);
    } catch (e) {
      t.ok(e instanceof HotplugError && e.status === 'error', `${p}: a hotplug-error`);
      t.match((e as Error).message, /Expected: <image>/);
    }
  }
});

function entry(backendPath: string, steps: JournalEntry['steps'], domainName?: string): JournalEntry {
  return {
    version: 1,
    script: 'block-qcow',
    backendPath,
    phase: 'ready',
    pid: 1,
    created: '',
    updated: '',
    disk: { params: '', mode: 'w', frontendId: 1, vdev: 'xvda', domainName },
    steps,
  };
}

t.test('sharing: readers share, a writer is alone, block-cow bases count as readers', async (t) => {
  const key = '254:0:1234';
  const readerA = entry(
    'backend/vbd/1/51712',
    [{ kind: 'qcow-use', done: true, data: { claims: [{ key, path: '/srv/b.raw', role: 'r' }] } }],
    'alpha',
  );
  const writerB = entry(
    'backend/vbd/2/51712',
    [{ kind: 'qcow-use', done: true, data: { claims: [{ key, path: '/srv/b.raw', role: 'w' }] } }],
    'beta',
  );
  const cowC = {
    ...entry(
      'backend/vbd/3/51712',
      [{ kind: 'base-ref', done: true, data: { key, file: '/srv/b.raw', dev: '254:0', ino: '1234', counted: true } }],
      'gamma',
    ),
    script: 'block-cow',
  };
  const self = 'backend/vbd/9/51712';
  const r: Claim[] = [{ key, path: '/srv/b.raw', role: 'r' }];
  const w: Claim[] = [{ key, path: '/srv/b.raw', role: 'w' }];
  t.doesNotThrow(() => checkClaims(r, [readerA, cowC], self), 'two readers');
  t.throws(() => checkClaims(w, [readerA], self), /in use by backend\/vbd\/1\/51712 \(domain alpha\)/);
  t.throws(() => checkClaims(w, [cowC], self), /domain gamma\) via block-cow/);
  t.throws(() => checkClaims(r, [writerB], self), /domain beta/);
  try {
    checkClaims(w, [readerA], self);
  } catch (e) {
    t.equal((e as HotplugError).status, 'busy');
  }
  t.doesNotThrow(() => checkClaims(w, [entry(self, writerB.steps)], self), 'its own record is not another user');
  t.equal(usersOf([readerA, writerB, cowC], key, self).length, 3);
  t.equal(usersOf([readerA], '254:0:999', self).length, 0);
});

t.test('nbd reservations: devices other records name are not handed out, ours is', async (t) => {
  const nbd = { image: '/srv/b.qcow2', format: 'qcow2', readOnly: false };
  const a = entry('backend/vbd/1/51712', [
    { kind: 'nbd', done: false, data: { pidFile: '/run/a.pid', ...nbd, device: '/dev/nbd0' } },
  ]);
  const b = entry('backend/vbd/2/51712', [
    { kind: 'nbd', done: true, data: { pidFile: '/run/b.pid', ...nbd, device: '/dev/nbd3', pid: 42 } },
  ]);
  const c = entry('backend/vbd/3/51712', [{ kind: 'nbd', done: false, data: { pidFile: '/run/c.pid', ...nbd } }]);
  t.strictSame([...reservedDevices([a, b, c], 'backend/vbd/9/51712')].sort(), ['/dev/nbd0', '/dev/nbd3']);
  t.strictSame(
    [...reservedDevices([a, b], 'backend/vbd/1/51712')],
    ['/dev/nbd3'],
    'its own record does not reserve against itself',
  );
});
