/** Resource shortages told apart by the tools' own words (recorded stderr, LANG=C). */
import t from 'tap';
import { shortageOf } from '../../src/devices/shortage.js';

const r = (stderr: string) => ({ stderr, stdout: '' });

t.test('recorded messages of each shortage', async (t) => {
  t.match(
    shortageOf(r('losetup: cannot find an unused loop device')),
    /no free loop device/,
    'util-linux 2.38 losetup --find',
  );
  t.match(shortageOf(r('losetup: could not find any free loop device')), /no free loop device/, 'older util-linux');
  t.match(
    shortageOf(r('  Volume group "xbhfullvg" has insufficient free space (0 extents): 1 required.')),
    /volume group is full/,
    'lvcreate',
  );
  t.match(
    shortageOf(r('qemu-img: /s/x.qcow2: Could not resize file: No space left on device')),
    /ran out of space/,
    'ENOSPC from a tool',
  );
  t.match(
    shortageOf(r('device-mapper: reload ioctl on xbh-cow-x  failed: Cannot allocate memory')),
    /out of memory/,
    'dmsetup ENOMEM',
  );
});

t.test('other failures are not shortages', async (t) => {
  t.equal(shortageOf(r('losetup: /x: failed to set up loop device: No such file or directory')), undefined);
  t.equal(shortageOf(r('device-mapper: create ioctl on xbh-cow-x  failed: Device or resource busy')), undefined);
  t.equal(shortageOf(r('')), undefined);
});
