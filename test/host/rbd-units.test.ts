/**
 * block-rbd units: the params grammar and its refusals, clone names (live-migration suffix), the
 * rbd argv builders, and the parsers on real rbd 16.2.15 output captured in the guest tier
 * (test/fixtures/rbd-16.2.15/, printed by test/guest/rbd-hook.test.ts as FIXTURE lines).
 */
import t from 'tap';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { HotplugError } from '../../src/disk/errors.js';
import { cloneName, parseRbdParams, planRbd } from '../../src/backends/rbd.js';
import { isIncoming } from '../../src/disk/migration.js';
import {
  MOUNT_TIMEOUT_S,
  cloneArgs,
  infoArgs,
  mapArgs,
  missingWhat,
  parseInfo,
  parseMapOutput,
  parseShowMapped,
  parseSnapLs,
  parseStatus,
  rbdReason,
  rmArgs,
  showMappedArgs,
  snapProtectArgs,
  statusArgs,
  unmapArgs,
} from '../../src/devices/rbd.js';
import type { DiskSpec } from '../../src/disk/spec.js';

const FIX = join(import.meta.dirname, '..', 'fixtures', 'rbd-16.2.15');
const fix = (name: string) => readFileSync(join(FIX, name), 'utf8');

t.test('params: the accepted forms', async (t) => {
  t.strictSame(parseRbdParams('rbd/golden@base'), {
    pool: 'rbd',
    image: 'golden',
    snap: 'base',
    clone: 'transient',
    name: undefined,
    cluster: {},
    mapOptions: [],
  });
  const p = parseRbdParams(
    '  vms/deb-12.5@v1_golden clone=persistent name=web-root conf=/etc/ceph/prod.conf id=xen keyring=/etc/ceph/ceph.client.xen.keyring map_options=queue_depth=128,lock_on_read ',
  );
  t.equal(p.pool, 'vms');
  t.equal(p.image, 'deb-12.5');
  t.equal(p.snap, 'v1_golden');
  t.equal(p.clone, 'persistent');
  t.equal(p.name, 'web-root');
  t.strictSame(p.cluster, { conf: '/etc/ceph/prod.conf', id: 'xen', keyring: '/etc/ceph/ceph.client.xen.keyring' });
  t.strictSame(p.mapOptions, ['queue_depth=128', 'lock_on_read']);
});

t.test('params: every bad form is a HotplugError that says why', async (t) => {
  const cases: [string, RegExp][] = [
    ['', /no image given/],
    ['rbd/golden', /names no snapshot/],
    ['golden@base', /is not pool\/image@snapshot/],
    ['rbd/sub/golden@base', /is not pool\/image@snapshot/],
    ['rbd/golden@base@x', /is not pool\/image@snapshot/],
    ['/golden@base', /pool name is empty/],
    ['rbd/@base', /image name is empty/],
    ['rbd/golden@', /snapshot name is empty/],
    ['rb$d/golden@base', /pool name "rb\$d" is not accepted/],
    ['rbd/-golden@base', /image name "-golden" is not accepted/],
    ['rbd/golden@.base', /snapshot name "\.base" is not accepted/],
    ['rbd/gol;den@base', /image name "gol;den"/],
    [`rbd/${'x'.repeat(101)}@base`, /is not accepted/],
    ['clone=persistent rbd/golden@base', /looks like an option/],
    ['rbd/golden@base persistent', /"persistent" is not a key=value option/],
    [
      'rbd/my golden@base clone=transient',
      /"rbd\/my golden@base": pool, image and snapshot names cannot contain spaces/,
    ],
    [
      'rbd/golden@base my snap clone=transient',
      /"snap" is not a key=value option; pool\/image@snapshot comes first and its names cannot contain spaces/,
    ],
    ['rbd/golden@base clone=sometimes', /must be transient or persistent/],
    ['rbd/golden@base clone=persistent clone=transient', /"clone" is given twice/],
    ['rbd/golden@base name=mine', /names a persistent clone/],
    ['rbd/golden@base clone=persistent name=golden', /is the golden image itself/],
    ['rbd/golden@base clone=persistent name=a/b', /clone image name "a\/b" is not accepted/],
    ['rbd/golden@base conf=ceph.conf', /conf=ceph\.conf: give an absolute path/],
    ['rbd/golden@base conf=/etc/../tmp/x.conf', /absolute path without "\.\."/],
    ['rbd/golden@base keyring=relative', /keyring=relative/],
    ['rbd/golden@base id=client.$x', /id=client\.\$x/],
    ['rbd/golden@base map_options=ro', /chosen by the hook/],
    ['rbd/golden@base map_options=noudev', /chosen by the hook/],
    ['rbd/golden@base map_options=queue_depth=1;rm', /is not an option/],
    ['rbd/golden@base map_options=', /is not an option/],
    ['rbd/golden@base pool=x', /unknown option "pool"/],
  ];
  for (const [params, re] of cases) {
    let err: unknown;
    try {
      parseRbdParams(params);
    } catch (e) {
      err = e;
    }
    t.ok(err instanceof HotplugError, `"${params}" is refused`);
    t.match((err as Error | undefined)?.message, re, `"${params}": ${(err as Error | undefined)?.message}`);
    t.match(
      (err as Error | undefined)?.message,
      /Expected: <pool>\/<image>@<snapshot>/,
      `"${params}": the message shows the grammar`,
    );
  }
});

const disk = (over: Partial<DiskSpec> = {}): DiskSpec => ({
  params: 'rbd/golden@base',
  mode: 'w',
  frontendId: 5,
  vdev: 'xvda',
  type: 'phy',
  state: 2,
  domainName: 'web1',
  ...over,
});

t.test("clone names: after domain and vdev; a migration's receiving side names the same image", async (t) => {
  const p = parseRbdParams('rbd/golden@base');
  t.equal(cloneName(p, disk(), 'backend/vbd/5/51712'), 'xbh-web1-xvda');
  t.equal(
    cloneName(p, disk({ domainName: 'web1--incoming' }), 'backend/vbd/9/51712'),
    'xbh-web1-xvda',
    'the --incoming suffix is dropped',
  );
  t.equal(cloneName(p, disk({ domainName: undefined }), 'backend/vbd/5/51712'), 'xbh-d5-xvda', 'no name: the domid');
  t.equal(cloneName(p, disk({ vdev: undefined }), 'backend/vbd/5/51713'), 'xbh-web1-51713', 'no vdev: the devid');
  t.equal(
    cloneName(parseRbdParams('rbd/golden@base clone=persistent name=mine'), disk(), 'backend/vbd/5/51712'),
    'mine',
  );
  t.throws(
    () =>
      cloneName(
        parseRbdParams('rbd/golden@base clone=persistent'),
        disk({ domainName: undefined }),
        'backend/vbd/5/51712',
      ),
    /name the clone with name=IMAGE/,
  );
  t.ok(isIncoming('web1--incoming'));
  t.notOk(isIncoming('web1'));
  t.notOk(isIncoming('--incoming'), 'the suffix alone is not a migration');
  t.notOk(isIncoming(undefined));
  const ro = planRbd(disk({ mode: 'r' }), { xenbusPath: 'backend/vbd/5/51712' });
  t.equal(ro.clone, undefined, 'access=r: no clone');
  t.ok(ro.readOnly);
  const w = planRbd(disk({ domainName: 'web1--incoming' }), { xenbusPath: 'backend/vbd/5/51712' });
  t.ok(w.incoming);
  t.equal(w.clone, 'xbh-web1-xvda');
});

t.test('argv builders: argument arrays, cluster options on every command, bounded monitor wait', async (t) => {
  const c = { conf: '/etc/ceph/c.conf', id: 'xen', keyring: '/k' };
  const cl = [
    '--conf',
    '/etc/ceph/c.conf',
    '--id',
    'xen',
    '--keyring',
    '/k',
    '--client_mount_timeout',
    String(MOUNT_TIMEOUT_S),
  ];
  t.strictSame(infoArgs(c, { pool: 'rbd', image: 'g', snap: 's' }), ['info', '--format', 'json', ...cl, 'rbd/g@s']);
  t.strictSame(infoArgs({}, { pool: 'rbd', image: 'g' }), [
    'info',
    '--format',
    'json',
    '--client_mount_timeout',
    String(MOUNT_TIMEOUT_S),
    'rbd/g',
  ]);
  t.strictSame(snapProtectArgs(c, { pool: 'rbd', image: 'g', snap: 's' }), ['snap', 'protect', ...cl, 'rbd/g@s']);
  t.strictSame(cloneArgs(c, { pool: 'rbd', image: 'g', snap: 's' }, { pool: 'rbd', image: 'xbh-a-xvda' }), [
    'clone',
    '--image-feature',
    'layering',
    ...cl,
    'rbd/g@s',
    'rbd/xbh-a-xvda',
  ]);
  t.strictSame(rmArgs(c, { pool: 'rbd', image: 'x' }), ['rm', '--no-progress', ...cl, 'rbd/x']);
  t.strictSame(statusArgs(c, { pool: 'rbd', image: 'x' }), ['status', '--format', 'json', ...cl, 'rbd/x']);
  t.strictSame(showMappedArgs({}), [
    'showmapped',
    '--format',
    'json',
    '--client_mount_timeout',
    String(MOUNT_TIMEOUT_S),
  ]);
  t.strictSame(mapArgs({}, { pool: 'rbd', image: 'x' }, { readOnly: false, noudev: true }), [
    'map',
    '-o',
    'noudev',
    '--client_mount_timeout',
    '15',
    'rbd/x',
  ]);
  t.strictSame(mapArgs({}, { pool: 'rbd', image: 'g', snap: 's' }, { readOnly: true, noudev: false }), [
    'map',
    '--read-only',
    '--client_mount_timeout',
    '15',
    'rbd/g@s',
  ]);
  t.strictSame(
    mapArgs({}, { pool: 'rbd', image: 'x' }, { readOnly: false, noudev: true, options: ['queue_depth=128'] }),
    ['map', '-o', 'queue_depth=128,noudev', '--client_mount_timeout', '15', 'rbd/x'],
  );
  t.strictSame(unmapArgs({}, '/dev/rbd3', { noudev: true }), [
    'unmap',
    '-o',
    'noudev',
    '--client_mount_timeout',
    '15',
    '/dev/rbd3',
  ]);
  t.strictSame(unmapArgs({}, '/dev/rbd3', { noudev: false }), ['unmap', '--client_mount_timeout', '15', '/dev/rbd3']);
});

t.test('parsers on real output captured in the guest', async (t) => {
  const snapU = parseSnapLs(fix('snap-ls-unprotected.json'));
  t.equal(snapU.length, 1);
  t.equal(snapU[0]?.name, 'base');
  t.equal(snapU[0]?.protected, false, '"protected":"false" is false');
  t.equal(parseSnapLs(fix('snap-ls-protected.json'))[0]?.protected, true);

  const infoSnapU = parseInfo(fix('info-snap-unprotected.json'));
  t.equal(infoSnapU.protected, false);
  t.ok(infoSnapU.features.includes('layering'));
  t.equal(infoSnapU.parent, undefined, 'the golden image has no parent');
  t.equal(parseInfo(fix('info-snap.json')).protected, true);

  const clone = parseInfo(fix('info-clone.json'));
  t.equal(clone.name, 'xbh-dom1-xvda');
  t.equal(clone.protected, undefined, 'rbd info of an image (not a snapshot) says nothing about protection');
  t.match(clone.parent, { pool: 'rbd', namespace: '', image: 'golden', snapshot: 'base' });
  t.ok((clone.parent?.overlap ?? 0) > 0);

  const ws = parseStatus(fix('status-mapped.json'));
  t.equal(ws.length, 1, 'a mapped clone has one watcher');
  t.match(ws[0]?.address, /^127\.0\.0\.1:0\/\d+$/);
  t.ok(Number.isInteger(ws[0]?.client));
  t.strictSame(parseStatus('{"watchers":[]}'), []);

  const two = parseShowMapped(fix('showmapped-two.json'));
  t.strictSame(
    two.map((m) => [m.name, m.snap, m.device]),
    [
      ['xbh-dom1-xvda', undefined, '/dev/rbd0'],
      ['xbh-dom2-xvda', undefined, '/dev/rbd1'],
    ],
    '"-" means the image head',
  );
  t.strictSame(parseShowMapped('[]'), []);

  t.throws(() => parseStatus('rbd: error'), /rbd status: not JSON/);
  t.throws(() => parseShowMapped('{}'), /expected an array/);
  t.throws(() => parseInfo('{"name":1}'), /rbd info name: expected a string/);
  t.equal(parseMapOutput('/dev/rbd12\n'), '/dev/rbd12');
  t.throws(() => parseMapOutput('rbd: sysfs write failed\n'), /not a \/dev\/rbdN device/);
});

t.test("missing pool, image, snapshot: told apart from rbd's own words", async (t) => {
  const stderr = (name: string) => fix(`${name}-stderr.json`).replace(/^\d+\n/, '');
  const code = (name: string) => Number(fix(`${name}-stderr.json`).split('\n')[0]);
  for (const [name, what] of [
    ['info-nopool', 'pool'],
    ['info-noimage', 'image'],
    ['info-nosnap', 'snapshot'],
  ] as const) {
    t.equal(code(name), 2, `${name}: rbd exits with ENOENT`);
    t.equal(missingWhat(stderr(name)), what, `${name}: ${stderr(name).trim()}`);
  }
  t.equal(missingWhat('rbd: map failed: (16) Device or resource busy'), undefined);
  t.equal(
    rbdReason(
      '2026-11-25T20:41:06.531+0000 7f23 -1 librbd::image::CloneRequest: handle_create_child: error creating child: (17) File exists\n\nrbd: clone error: (17) File exists\n',
    ),
    'clone error: (17) File exists',
  );
  t.equal(
    rbdReason('Removing image: 0% complete...failed.\nrbd: delete error: (2) No such file or directory\n'),
    'delete error: (2) No such file or directory',
  );
});
