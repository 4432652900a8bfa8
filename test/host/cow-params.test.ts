import t from 'tap';
import { parseCowParams } from '../../src/backends/cow-params.js';
import { mkdirSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cowBackend, dmName, planCow, storeName } from '../../src/backends/cow.js';
import { defaultConfig } from '../../src/config/config.js';
import { HotplugError } from '../../src/disk/errors.js';

t.test('good params', async (t) => {
  const cases: [string, object][] = [
    [
      '/mnt/cdrom/rootfs.img',
      { base: '/mnt/cdrom/rootfs.img', sizeMiB: undefined, persistent: false, store: undefined, chunkKiB: undefined },
    ],
    ['/mnt/cdrom/rootfs.img 30', { sizeMiB: 30 }],
    ['/mnt/cdrom/rootfs.img 30M', { sizeMiB: 30 }],
    ['/mnt/cdrom/rootfs.img 30MiB', { sizeMiB: 30 }],
    ['/mnt/cdrom/rootfs.img 2G', { sizeMiB: 2048 }],
    ['/mnt/cdrom/rootfs.img 2g', { sizeMiB: 2048 }],
    ['  /mnt/cdrom/rootfs.img   30  ', { sizeMiB: 30 }],
    ['/i/b.img 30 persistent', { persistent: true }],
    ['/i/b.img persistent=yes', { persistent: true, sizeMiB: undefined }],
    ['/i/b.img 1G persistent=no', { persistent: false }],
    ['/i/b.img store=web-root.cow', { persistent: true, store: 'web-root.cow' }],
    ['/i/b.img 64 store=a persistent', { persistent: true, store: 'a', sizeMiB: 64 }],
    ['/i/b.img chunk=4K', { chunkKiB: 4 }],
    ['/i/b.img chunk=512k', { chunkKiB: 512 }],
    ['/i/b.img 10 chunk=16KiB persistent', { chunkKiB: 16, persistent: true, sizeMiB: 10 }],
  ];
  for (const [params, want] of cases) t.match(parseCowParams(params), want, params);
});

t.test('bad params are refused with a message naming the word and the fix', async (t) => {
  const cases: [string, RegExp][] = [
    ['', /no base image/],
    ['   ', /no base image/],
    ['rootfs.img 30', /not an absolute path.*\/srv\/xen\/rootfs\.img/],
    ['./base.img', /the base image "\.\/base\.img" is not an absolute path/],
    ['--help', /the base image "--help" is not an absolute path/],
    ['-o /i/b.img', /the base image "-o" is not an absolute path/],
    ['persistent /i/b.img', /the base image "persistent" is not an absolute path/],
    ['store=x /i/b.img', /looks like an option/],
    ['/i/b.img\n/etc/shadow', /the base image "\/i\/b\.img\\n\/etc\/shadow" holds a tab or a line break/],
    ['/i/ba\nse.img', /holds a tab or a line break/],
    ['/i/b.img 64X', /"64X" is not a size: a number with an optional unit K, M, G or T/],
    ['/i/b.img 30 40', /"40" is a second size/],
    [`/i/b.img ${'16 '.repeat(1000)}`, /"16" is a second size/],
    ['/i/b.img persistent 30', /size "30" must come right after/],
    ['/i/b.img 0', /at least 1 MiB/],
    ['/i/b.img 99999999', /more than 16 TiB/],
    ['/i/b.img 30T', /"30T" is more than 16 TiB/],
    ['/i/b.img 99999999999999999999G', /"99999999999999999999G" is more than 16 TiB/],
    ['/i/b.img -5', /"-5" is not a size/],
    ['/i/b.img 1,5G', /"1,5G" is not a size/],
    ['/i/b.img 0x10', /"0x10" is not a size/],
    ['/i/b.img bogus=1', /unknown option "bogus"/],
    ['/i/b.img persistent=maybe', /persistent=maybe: the value must be yes or no/],
    ['/i/b.img persistent persistent', /"persistent" is given twice/],
    ['/i/b.img chunk=4K chunk=8K', /"chunk" is given twice/],
    ['/i/b.img store=a store=b', /"store" is given twice/],
    ['/i/b.img store=', /store= needs a file name/],
    ['/i/b.img store=../etc/shadow', /plain file name, not a path/],
    ['/i/b.img store=/var/lib/x', /plain file name, not a path/],
    ['/i/b.img store=.hidden', /must not start with "\."/],
    ['/i/b.img store=a;b', /letters, digits/],
    ['/i/b.img store=x persistent=no', /names a persistent store/],
    ['/i/b.img chunk=3K', /power of two from 4K to 512K/],
    ['/i/b.img chunk=2K', /power of two/],
    ['/i/b.img chunk=1M', /power of two/],
    ['/i/b.img chunk=64', /chunk=64: "64" is not a size: a number with a unit K, M, G or T \(e\.g\. 16K, 64K\)/],
    ['/i/b.img chunk', /chunk needs a value, e.g. chunk=16K/],
    ['/i/b.img store', /store needs a value/],
  ];
  for (const [params, why] of cases) {
    const name = JSON.stringify(params.length > 60 ? `${params.slice(0, 60)}…` : params);
    t.throws(() => parseCowParams(params), HotplugError, name);
    try {
      parseCowParams(params);
    } catch (e) {
      t.match((e as Error).message, why, name);
      t.match((e as Error).message, /Expected: <base-image> \[<cow-size>\]/, `${name}: says what is expected`);
      t.equal((e as HotplugError).status, 'error');
    }
  }
});

t.test('sizes: the one grammar, rounded up to whole MiB, with the exact refusals', async (t) => {
  const sizes: [string, number][] = [
    ['30', 30],
    ['1G', 1024],
    ['1.5G', 1536],
    ['1.5g', 1536],
    ['2GiB', 2048],
    ['2GB', 2048],
    ['1T', 1048576],
    ['512K', 1],
    ['1.3G', 1332],
    ['.5G', 512],
  ];
  for (const [w, mib] of sizes) t.equal(parseCowParams(`/i/b.img ${w}`).sizeMiB, mib, w);
  const msg = (params: string, what: string) =>
    `block-cow params "${params}": ${what}. Expected: <base-image> [<cow-size>] [persistent] [store=NAME] [chunk=SIZE], e.g. "/srv/xen/rootfs.img 512M".`;
  const refused: [string, string][] = [
    [
      '/i/b.img 64X',
      '"64X" is not a size: a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is MiB (a path cannot end in a word that looks like a size)',
    ],
    ['/i/b.img 17T', 'the copy-on-write size "17T" is more than 16 TiB (a bare number is MiB)'],
    ['/i/b.img 0.0', 'the copy-on-write size "0.0" must be at least 1 MiB'],
  ];
  for (const [params, what] of refused) t.throws(() => parseCowParams(params), { message: msg(params, what) }, params);
});

t.test('a base path with spaces: the words after it are read from the right', async (t) => {
  const good: [string, object][] = [
    ['/media/LIVE CD/rootfs.img', { base: '/media/LIVE CD/rootfs.img', sizeMiB: undefined, persistent: false }],
    [
      '/media/LIVE CD/rootfs.img 1.5G persistent',
      { base: '/media/LIVE CD/rootfs.img', sizeMiB: 1536, persistent: true },
    ],
    [
      '  /media/LIVE  CD/root fs.img  512M  store=a chunk=16K ',
      { base: '/media/LIVE  CD/root fs.img', sizeMiB: 512, store: 'a', chunkKiB: 16 },
    ],
    ['/media/Ubuntu 24.04.iso 30', { base: '/media/Ubuntu 24.04.iso', sizeMiB: 30 }],
    ['/i/b.img thirty', { base: '/i/b.img thirty', sizeMiB: undefined }],
  ];
  for (const [params, want] of good) t.match(parseCowParams(params), want, params);
  const expected =
    'Expected: <base-image> [<cow-size>] [persistent] [store=NAME] [chunk=SIZE], e.g. "/srv/xen/rootfs.img 512M".';
  const refused: [string, string][] = [
    [
      '/media/LIVE CD 64X/rootfs.img 1X',
      '"1X" is not a size: a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is MiB (a path cannot end in a word that looks like a size)',
    ],
    ['/media/disk 2 512M', '"512M" is a second size; give one copy-on-write size'],
    ['/media/LIVE CD/rootfs.img persistent 30', 'the size "30" must come right after the base image'],
    [
      '/media/LIVE\tCD/rootfs.img 30',
      'the base image "/media/LIVE\\tCD/rootfs.img" holds a tab or a line break; a path may hold spaces, but no other white space',
    ],
  ];
  for (const [params, what] of refused) {
    const p = params.replace('\\t', '\t');
    t.throws(() => parseCowParams(p), { message: `block-cow params "${p}": ${what}. ${expected}` }, params);
  }
});

t.test('plan: a base under a directory with a space (cow needs dm to run; the planner does not)', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'cow-plan-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const images = join(dir, 'images');
  mkdirSync(join(images, 'LIVE CD'), { recursive: true });
  const base = join(images, 'LIVE CD', 'root fs.img');
  writeFileSync(base, '');
  truncateSync(base, 4 * 1048576);
  const config = { ...defaultConfig(), imageDirs: [images], storeDir: join(dir, 'store') };
  const disk = {
    params: `${base} 1.5G`,
    mode: 'w' as const,
    frontendId: 7,
    vdev: 'xvda',
    type: 'phy',
    state: 2,
    domainName: 'web',
  };
  const p = planCow(disk, { config, xenbusPath: 'backend/vbd/7/51712' });
  t.equal(p.base, base, 'the resolved base is the whole spaced path');
  t.equal(p.store?.bytes, 1536 * 1048576, '1.5G store');
  t.equal(cowBackend.source?.(disk.params), base, 'status shows the whole path');
  t.equal(cowBackend.source?.('/i/b.img 64X'), undefined, 'params that do not parse name no source');
  t.match(
    parseCowParams(`${base} 64 extra`),
    { base: `${base} 64 extra`, sizeMiB: undefined },
    'a word that is neither a size nor an option makes the words before it part of the path (hostile-cow: the sentence a missing base gets)',
  );
});

t.test('names: dm name says whose it is, stores are per disk or per domain+vdev', async (t) => {
  const named = { domainName: 'web1', frontendId: 5, vdev: 'xvda' };
  const anon = { domainName: undefined, frontendId: 7, vdev: 'sda1' };
  t.equal(dmName(named, 'backend/vbd/5/51712'), 'xbh-cow-web1-xvda-51712');
  t.equal(dmName(anon, '/local/domain/0/backend/vbd/7/2049'), 'xbh-cow-d7-sda1-2049');
  t.equal(
    dmName({ domainName: undefined, frontendId: undefined, vdev: undefined }, 'backend/vbd/9/768'),
    'xbh-cow-d9-disk-768',
  );
  const long = dmName(
    { domainName: 'a'.repeat(48), frontendId: 1, vdev: 'b'.repeat(48) },
    'backend/vbd/4294967295/4294967295',
  );
  t.ok(long.length <= 127, `dm names fit in 127 characters (${long.length})`);
  t.notMatch(long, /\//);
  const p = parseCowParams('/i/b.img 30 persistent');
  t.equal(
    storeName(p, named, 'backend/vbd/5/51712'),
    'web1-xvda.cow',
    'persistent: by domain and vdev, so the next boot finds it',
  );
  t.equal(
    storeName(parseCowParams('/i/b.img'), named, 'backend/vbd/5/51712'),
    'transient-5-51712.cow',
    'transient: by backend path',
  );
  t.equal(storeName(parseCowParams('/i/b.img store=shared.cow'), named, 'backend/vbd/5/51712'), 'shared.cow');
  t.throws(() => dmName(named, 'backend/vif/5/0'), HotplugError);
});
