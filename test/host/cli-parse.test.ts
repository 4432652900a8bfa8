/**
 * The CLI's parsers: libxl's vdev numbers, xl and xm disk specs, options, sizes.
 */
import t from 'tap';
import { vdevToDevid, VdevError } from '../../src/cli/vdev.js';
import { DiskSpecError, looksLikeXm, parseDisk, parseXlDisk, parseXmDisk } from '../../src/cli/diskspec.js';
import { parseOptions } from '../../src/cli/args.js';
import { humanBytes, table } from '../../src/cli/format.js';
import { parseGrowSize } from '../../src/cli/grow.js';
import { UsageError } from '../../src/disk/errors.js';
import { backendPaths, scriptFor, toolstackNodes } from '../../src/cli/simulate.js';

t.test('vdev → devid as libxl computes it', async (t) => {
  const cases: [string, number][] = [
    ['xvda', 51712],
    ['xvdb', 51728],
    ['xvda1', 51713],
    ['xvdb1', 51729],
    ['xvdp', 51952],
    ['xvdp15', 51967],
    ['xvdq', (1 << 28) | (16 << 8)],
    ['xvda16', (1 << 28) | 16],
    ['xvdaa', (1 << 28) | (26 << 8)],
    ['xvdz', (1 << 28) | (25 << 8)],
    ['hda', 768],
    ['hda1', 769],
    ['hdb', 832],
    ['hdc', 5632],
    ['hdd', 5696],
    ['hdd63', 5759],
    ['sda', 2048],
    ['sda1', 2049],
    ['sdb', 2064],
    ['sdp15', 2303],
    ['d0', 51712],
    ['d0p1', 51713],
    ['d1p2', 51730],
    ['d16', (1 << 28) | (16 << 8)],
    ['51712', 51712],
    ['0', 0],
    ['268439552', 268439552],
  ];
  for (const [v, n] of cases) t.equal(vdevToDevid(v), n, `${v} → ${n}`);
  for (const bad of [
    'xvd',
    'xvda0',
    'xvda01',
    'hde',
    'hda64',
    'sdq',
    'sda16',
    'vda',
    'xvdA',
    'xvda256',
    'xvda-1',
    'd0p0',
    '',
    'xvda 1',
  ]) {
    t.throws(() => vdevToDevid(bad), VdevError, `"${bad}" is refused`);
  }
});

t.test('xl disk specs, keyed', async (t) => {
  const d = parseXlDisk('vdev=xvda,access=w,script=block-cow,target=/images/base.img 64');
  t.match(d, {
    syntax: 'xl',
    vdev: 'xvda',
    devid: 51712,
    mode: 'w',
    script: 'block-cow',
    target: '/images/base.img 64',
    discard: true,
    cdrom: false,
  });
  t.equal(
    parseXlDisk('format=raw, vdev=xvda, access=rw, script=block-cow, target=/srv/xen/a.img 30').target,
    '/srv/xen/a.img 30',
    'spaces after commas are ignored',
  );
  t.equal(parseXlDisk('vdev=xvdb,target=/a,b c,d').target, '/a,b c,d', 'target takes commas and spaces');
  t.equal(parseXlDisk('vdev=xvdb,target=/a b,').target, '/a b', 'one trailing comma is dropped');
  t.equal(parseXlDisk('vdev=xvdb,target=/a b  ').target, '/a b  ', 'trailing spaces are kept');
  t.equal(parseXlDisk('vdev=xvdb,target=x=y:z').target, 'x=y:z', 'target may hold = and :');
  t.throws(
    () => parseXlDisk('target=/a,vdev=xvdc'),
    /no vdev specified/,
    'target eats what follows, so a vdev after it is lost',
  );
  t.match(parseXlDisk('vdev=hdc,access=r,devtype=cdrom,target=/iso/x.iso'), {
    devid: 5632,
    mode: 'r',
    cdrom: true,
    discard: false,
  });
  t.match(parseXlDisk('vdev=xvda,access=ro,no-discard,direct-io-safe,untrusted,target=/a'), {
    mode: 'r',
    discard: false,
    directIoSafe: true,
    trusted: false,
  });
  t.match(parseXlDisk('vdev=xvda,discard,access=r,target=/a'), { discard: true }, 'discard can be forced on for r');
  t.match(parseXlDisk('vdev=xvda,script=/opt/hooks/block-x,target=/a'), { script: '/opt/hooks/block-x' });
  t.match(parseXlDisk('vdev=xvda,backendtype=phy,specification=xen,format=raw,target=/a'), {
    backendType: 'phy',
    specification: 'xen',
    format: 'raw',
  });
  t.match(parseXlDisk('vdev=xvda'), { target: undefined }, 'a disk may have no target (empty cdrom)');
});

t.test('xl disk specs, positional and prefixes', async (t) => {
  t.match(parseXlDisk('/dev/vg/guest,raw,xvda,w'), { target: '/dev/vg/guest', format: 'raw', vdev: 'xvda', mode: 'w' });
  t.match(parseXlDisk('/dev/vg/guest,,xvda,r'), { format: 'raw', vdev: 'xvda', mode: 'r' }, 'an empty format is raw');
  t.match(
    parseXlDisk('phy:/dev/vg/guest,xvda,w'),
    { target: '/dev/vg/guest', vdev: 'xvda', mode: 'w', script: undefined },
    'phy: is dropped and the format skipped',
  );
  t.match(
    parseXlDisk('file:/srv/a b.img,hda,w'),
    { target: '/srv/a b.img', vdev: 'hda', devid: 768 },
    'positional target may hold spaces',
  );
  t.match(parseXlDisk('drbd:res0,xvda,w'), { script: 'block-drbd', target: 'res0' });
  t.match(parseXlDisk('nbd:host:1234,xvda,w'), { script: 'block-nbd', target: 'host:1234' });
  t.match(parseXlDisk('qcow2:/a.qcow2,xvda,w'), { format: 'qcow2', target: '/a.qcow2' });
  t.match(
    parseXlDisk(',hdc:cdrom,r'),
    { target: '', vdev: 'hdc', cdrom: true, format: 'empty', mode: 'r' },
    'empty cdrom drive',
  );
  t.match(
    parseXlDisk(',,hdc:cdrom,r'),
    { target: '', vdev: 'hdc', cdrom: true, format: 'raw', mode: 'r' },
    'with an empty format field the format is raw',
  );
  t.match(parseXlDisk('/x.iso,raw,hdc:cdrom,r'), { vdev: 'hdc', cdrom: true });
  t.throws(() => parseXlDisk('cow:/images/base.img 64,xvda,w'), /unknown deprecated disk prefix/);
  t.throws(() => parseXlDisk('/a,xvda,w'), /unknown value for format/, 'xl reads the second positional as the format');
  t.throws(() => parseXlDisk('/a,raw,xvda,w,extra'), /too many positional parameters/);
  t.throws(() => parseXlDisk('vdev=xvda,colour=blue,target=/a'), /unknown parameter/);
  t.throws(() => parseXlDisk('vdev=xvda,access=rwx,target=/a'), /unknown value for access/);
  t.throws(() => parseXlDisk('vdev=xvda,vdev=xvdb,target=/a'), /vdev respecified/);
  t.throws(() => parseXlDisk('vdev=xvda,format=vmdk,target=/a'), DiskSpecError);
  t.throws(() => parseXlDisk('access=w,target=/a'), /no vdev/);
});

t.test('xm disk specs', async (t) => {
  t.match(parseXmDisk('cow:/images/base.img 64,xvda,w'), {
    syntax: 'xm',
    type: 'cow',
    params: '/images/base.img 64',
    vdev: 'xvda',
    devid: 51712,
    mode: 'w',
  });
  t.match(parseXmDisk('cow:/mnt/cdrom/rootfs.img 30,sda1,w'), {
    type: 'cow',
    params: '/mnt/cdrom/rootfs.img 30',
    devid: 2049,
  });
  t.match(parseXmDisk('file:/a.img, hda , r'), { type: 'file', vdev: 'hda', mode: 'r' }, 'fields are trimmed');
  t.match(parseXmDisk('phy:/dev/sr0,hdc:cdrom,r'), { cdrom: true, vdev: 'hdc' });
  t.match(parseXmDisk('file:/a.img,ioemu:hda,w'), { vdev: 'hda' });
  t.match(parseXmDisk('file:/a.img,xvda,w!'), { mode: 'w!' });
  t.match(parseXmDisk('tap:aio:/a.img,xvda,w'), { type: 'tap', params: 'aio:/a.img' }, 'only the first colon splits');
  t.match(parseXmDisk('cow:/a,xvda,w,driver'), { backendDomain: 'driver' });
  t.throws(() => parseXmDisk('cow:/a,xvda'), /found 2/);
  t.throws(() => parseXmDisk('/a,xvda,w'), /type prefix/);
  t.throws(() => parseXmDisk('cow:,xvda,w'), /nothing after/);
  t.throws(() => parseXmDisk('cow:/a,xvda,x'), /mode/);
  t.throws(() => parseXmDisk('cow:/a,xvda:tape,w'), /cdrom or :disk/);
});

t.test('which syntax', async (t) => {
  t.ok(looksLikeXm('cow:/a 64,xvda,w'));
  t.notOk(looksLikeXm('  qcow:/a'), 'qcow: is a format prefix to xl, so xl syntax unless --xm');
  t.notOk(looksLikeXm('file:/a,xvda,w'));
  t.notOk(looksLikeXm('vdev=xvda,target=/a'));
  t.notOk(looksLikeXm('drbd:r0,xvda,w'));
  t.equal(parseDisk('cow:/a 64,xvda,w').syntax, 'xm');
  t.equal(parseDisk('file:/a,xvda,w').syntax, 'xl');
  t.equal(parseDisk('file:/a,xvda,w', 'xm').syntax, 'xm');
});

t.test('scripts and nodes', async (t) => {
  t.equal(scriptFor(parseDisk('vdev=xvda,target=/a')), 'block', 'libxl default script');
  t.equal(scriptFor(parseDisk('vdev=xvda,script=block-cow,target=/a')), 'block-cow');
  t.equal(scriptFor(parseDisk('cow:/a,xvda,w')), 'block-cow');
  t.equal(scriptFor(parseDisk('file:/a,xvda,w', 'xm')), 'block');
  const xl = parseDisk('vdev=xvdb,access=r,script=block-cow,target=/i/b.img 64');
  const p = backendPaths(xl, 7);
  t.equal(p.rel, 'backend/vbd/7/51728');
  const nodes = new Map(toolstackNodes(xl, 7, 'web', '/etc/xen/scripts/block-cow'));
  t.equal(nodes.get(`${p.back}/params`), '/i/b.img 64');
  t.equal(nodes.get(`${p.back}/type`), 'phy', 'libxl writes type=phy for script disks');
  t.equal(nodes.get(`${p.back}/mode`), 'r');
  t.equal(nodes.get(`${p.back}/script`), '/etc/xen/scripts/block-cow');
  t.equal(nodes.get(`${p.back}/frontend-id`), '7');
  t.equal(nodes.get(`${p.back}/state`), '1');
  t.equal(nodes.get(`${p.back}/discard-enable`), '0');
  t.equal(nodes.get(`${p.front}/virtual-device`), '51728');
  t.equal(nodes.get('/local/domain/7/name'), 'web');
  const xm = new Map(toolstackNodes(parseDisk('cow:/i/b.img 64,xvda,w'), 3, 'db', '/x'));
  t.equal(xm.get('/local/domain/0/backend/vbd/3/51712/type'), 'cow', 'xend writes the prefix as type');
  t.equal(xm.get('/local/domain/0/backend/vbd/3/51712/params'), '/i/b.img 64');
  t.equal(xm.get('/local/domain/0/backend/vbd/3/51712/script'), undefined, 'xend wrote no script node');
});

t.test('options', async (t) => {
  const specs = [
    { name: 'json', type: 'flag' as const },
    { name: 'domid', type: 'int' as const },
    { name: 'name', short: 'n', type: 'string' as const },
  ];
  t.same(parseOptions(['--json', '--domid', '3', '-n', 'web', 'a', 'b'], specs), {
    options: { json: true, domid: 3, name: 'web' },
    positional: ['a', 'b'],
  });
  t.same(parseOptions(['--domid=4', '--', '--json'], specs), { options: { domid: 4 }, positional: ['--json'] });
  t.same(parseOptions(['-nweb'], specs).options, { name: 'web' });
  t.throws(() => parseOptions(['--nope'], specs), UsageError);
  t.throws(() => parseOptions(['--domid'], specs), /needs a value/);
  t.throws(() => parseOptions(['--domid', 'x'], specs), /whole number/);
  t.throws(() => parseOptions(['--json=1'], specs), /takes no value/);
  t.throws(() => parseOptions(['--name', 'a', '--name', 'b'], specs), /twice/);
  t.throws(() => parseOptions(['--name='], specs), { message: 'option --name needs a value, not an empty string' });
  const ranged = [
    { name: 'timeout', type: 'int' as const, min: 1, max: 3600, unit: 'seconds' },
    { name: 'interval', type: 'int' as const, min: 100, unit: 'ms' },
  ];
  t.same(
    parseOptions(['--timeout', '1', '--interval', '100'], ranged).options,
    { timeout: 1, interval: 100 },
    'the bounds themselves are in range',
  );
  t.throws(() => parseOptions(['--timeout', '0'], ranged), {
    message: 'option --timeout must be at least 1 second, not 0',
  });
  t.throws(() => parseOptions(['--timeout', '3601'], ranged), {
    message: 'option --timeout must be at most 3600 seconds, not 3601',
  });
  t.throws(() => parseOptions(['--interval=99'], ranged), {
    message: 'option --interval must be at least 100 ms, not 99',
  });
  t.throws(() => parseOptions(['--timeout', '-1'], ranged), {
    message: 'option --timeout needs a whole number, not "-1"',
  });
  // What parseArgs alone would get wrong (src/cli/args.ts says why it runs with strict: false).
  t.same(
    parseOptions(['web', '-1G', 'xvda', '-5'], specs),
    { options: {}, positional: ['web', '-1G', 'xvda', '-5'] },
    'a negative number is an argument, in its place',
  );
  t.same(
    parseOptions(['-n', '-web', '--domid=7'], specs).options,
    { name: '-web', domid: 7 },
    'the word after an option is its value, dash or not',
  );
  t.throws(() => parseOptions(['-x'], specs), { message: 'unknown option -x' });
  t.throws(() => parseOptions(['--nope=1'], specs), { message: 'unknown option --nope' });
  t.throws(() => parseOptions(['-n'], specs), { message: 'option --name needs a value' });
  const repeated = [{ name: 'o', short: 'o', type: 'string' as const, repeat: true }];
  t.same(
    parseOptions(['-o', 'a,b', '-o+c', '--o=d'], repeated).options,
    { o: ['a,b', '+c', 'd'] },
    'a repeatable option collects its values in order',
  );
});

t.test('sizes and tables', async (t) => {
  t.same(parseGrowSize('+64M'), { relative: true, bytes: 64 * 2 ** 20 });
  t.same(parseGrowSize('+1G'), { relative: true, bytes: 2 ** 30 });
  t.same(parseGrowSize('512'), { relative: false, bytes: 512 * 2 ** 20 }, 'bare numbers are MiB');
  t.same(parseGrowSize('+1.5GiB'), { relative: true, bytes: 1.5 * 2 ** 30 });
  t.same(parseGrowSize('+256K'), { relative: true, bytes: 256 * 1024 });
  for (const bad of ['', '+', '-1G', '+0', '1X', '+1 G B']) t.throws(() => parseGrowSize(bad), `"${bad}" refused`);
  t.equal(humanBytes(64 * 2 ** 20), '64.0M');
  t.equal(humanBytes(1536 * 2 ** 20), '1.5G');
  t.equal(humanBytes(100), '100B');
  t.equal(
    table(
      ['A', 'BB'],
      [
        ['xyz', '1'],
        ['', '22'],
      ],
    ),
    'A    BB\nxyz  1\n     22',
  );
});
