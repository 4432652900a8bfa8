import t from 'tap';
import { parseCowParams, parseSizeMiB } from '../../src/backends/cow-params.js';
import { dmName, storeName } from '../../src/backends/cow.js';
import { HotplugError } from '../../src/hotplug/errors.js';

t.test('good params', async (t) => {
  const cases: [string, object][] = [
    ['/mnt/cdrom/rootfs.img', { base: '/mnt/cdrom/rootfs.img', sizeMiB: undefined, persistent: false, store: undefined, chunkKiB: undefined }],
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
    ['store=x /i/b.img', /looks like an option/],
    ['/i/b.img thirty', /"thirty" is neither a size.*cannot contain spaces/],
    ['/my images/b.img', /"images\/b.img" is neither a size/],
    ['/i/b.img 30 40', /"40" is a second size/],
    ['/i/b.img persistent 30', /size "30" must come right after/],
    ['/i/b.img 0', /at least 1 MiB/],
    ['/i/b.img 99999999', /more than 16 TiB/],
    ['/i/b.img 30T', /"30T" is neither a size/],
    ['/i/b.img -5', /neither a size/],
    ['/i/b.img bogus=1', /unknown option "bogus"/],
    ['/i/b.img persistent=maybe', /persistent=maybe: the value must be yes or no/],
    ['/i/b.img persistent persistent', /"persistent" is given twice/],
    ['/i/b.img chunk=4K chunk=8K', /"chunk" is given twice/],
    ['/i/b.img store=', /store= needs a file name/],
    ['/i/b.img store=../etc/shadow', /plain file name, not a path/],
    ['/i/b.img store=/var/lib/x', /plain file name, not a path/],
    ['/i/b.img store=.hidden', /must not start with "\."/],
    ['/i/b.img store=a;b', /letters, digits/],
    ['/i/b.img store=x persistent=no', /names a persistent store/],
    ['/i/b.img chunk=3K', /power of two from 4K to 512K/],
    ['/i/b.img chunk=2K', /power of two/],
    ['/i/b.img chunk=1M', /power of two/],
    ['/i/b.img chunk=64', /give a size such as 16K/],
    ['/i/b.img chunk', /chunk needs a value, e.g. chunk=16K/],
    ['/i/b.img store', /store needs a value/],
  ];
  for (const [params, why] of cases) {
    t.throws(() => parseCowParams(params), HotplugError, params);
    try {
      parseCowParams(params);
    } catch (e) {
      t.match((e as Error).message, why, params);
      t.match((e as Error).message, /Expected: <base-image> \[<cow-size>\]/, `${params}: says what is expected`);
      t.equal((e as HotplugError).status, 'error');
    }
  }
});

t.test('sizes', async (t) => {
  t.equal(parseSizeMiB('30'), 30);
  t.equal(parseSizeMiB('1G'), 1024);
  t.equal(parseSizeMiB('1.5G'), undefined);
  t.equal(parseSizeMiB('G'), undefined);
});

t.test('names: dm name says whose it is, stores are per disk or per domain+vdev', async (t) => {
  const named = { domainName: 'web1', frontendId: 5, vdev: 'xvda' };
  const anon = { domainName: undefined, frontendId: 7, vdev: 'sda1' };
  t.equal(dmName(named, 'backend/vbd/5/51712'), 'xbh-cow-web1-xvda-51712');
  t.equal(dmName(anon, '/local/domain/0/backend/vbd/7/2049'), 'xbh-cow-d7-sda1-2049');
  t.equal(dmName({ domainName: undefined, frontendId: undefined, vdev: undefined }, 'backend/vbd/9/768'), 'xbh-cow-d9-disk-768');
  const long = dmName({ domainName: 'a'.repeat(48), frontendId: 1, vdev: 'b'.repeat(48) }, 'backend/vbd/4294967295/4294967295');
  t.ok(long.length <= 127, `dm names fit in 127 characters (${long.length})`);
  t.notMatch(long, /\//);
  const p = parseCowParams('/i/b.img 30 persistent');
  t.equal(storeName(p, named, 'backend/vbd/5/51712'), 'web1-xvda.cow', 'persistent: by domain and vdev, so the next boot finds it');
  t.equal(storeName(parseCowParams('/i/b.img'), named, 'backend/vbd/5/51712'), 'transient-5-51712.cow', 'transient: by backend path');
  t.equal(storeName(parseCowParams('/i/b.img store=shared.cow'), named, 'backend/vbd/5/51712'), 'shared.cow');
  t.throws(() => dmName(named, 'backend/vif/5/0'), HotplugError);
});
