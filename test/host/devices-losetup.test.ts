/**
 * losetup parsers on recorded util-linux 2.38.1 output, and the helpers against real loop
 * devices of this machine. Every loop device a test attaches is detached again, and the end
 * state is checked: none of this file's images is still attached.
 */
import t from 'tap';
import { linkSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execRunner } from '../../src/devices/exec.js';
import type { Runner } from '../../src/devices/runner.js';
import {
  attachArgs,
  attachLoop,
  detachArgs,
  detachLoop,
  filterBacking,
  listArgs,
  listLoops,
  loopsBacking,
  parseLoopList,
  resizeArgs,
  resizeLoop,
} from '../../src/devices/losetup.js';
import {
  decimalDevice,
  decodeDev,
  devString,
  encodeDev,
  fileIdOf,
  parseDecimalDevice,
  parsePhysicalDevice,
  holders,
  isBlockDevice,
  isReadOnly,
  loopBackingFile,
  majorMinor,
  physicalDevice,
  sizeSectors,
} from '../../src/devices/sysfs.js';

const FIX = fileURLToPath(new URL('../fixtures/', import.meta.url));
const fixture = (c: string) => readFileSync(join(FIX, `losetup-2.38.1-${c}.txt`), 'utf8');

t.test('argv builders', async (t) => {
  t.same(attachArgs('/img/base.img', { readOnly: true }), ['--find', '--show', '--read-only', '--', '/img/base.img']);
  t.same(attachArgs('/img/-odd.img', { readOnly: false, direct: true }), [
    '--find',
    '--show',
    '--direct-io=on',
    '--',
    '/img/-odd.img',
  ]);
  t.throws(() => attachArgs('-r', { readOnly: false }), /must be absolute/);
  t.throws(() => attachArgs('rel/x.img', { readOnly: false }), /must be absolute/);
  t.same(detachArgs('/dev/loop3'), ['--detach', '/dev/loop3']);
  t.same(resizeArgs('/dev/loop12'), ['--set-capacity', '/dev/loop12']);
  t.throws(() => detachArgs('/dev/sda'), /not a loop device/);
  t.throws(() => detachArgs('-D'), /not a loop device/);
  t.same(listArgs(), [
    '--list',
    '--json',
    '--output',
    'NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,MAJ:MIN,RO,OFFSET,SIZELIMIT',
  ]);
});

t.test('parser on recorded output', async (t) => {
  const three = parseLoopList(fixture('list-json-three'));
  t.same(
    three.map((l) => [l.name, l.backFile, l.backDev, l.backIno, l.readOnly]),
    [
      ['/dev/loop1', '/tmp/lt/-dash.img', '254:0', '2146754', true],
      ['/dev/loop2', '/tmp/lt/hard.img', '254:0', '2146546', true],
      ['/dev/loop0', '/tmp/lt/a.img', '254:0', '2146546', false],
    ],
  );
  t.same([three[2]!.major, three[2]!.minor], [7, 0]);
  // st_dev of /tmp/lt/a.img was 65024 (stat %d) = fe00 (stat %D): the stock script's decimal-vs-hex trap.
  t.same(
    filterBacking(three, { dev: devString(65024n), ino: '2146546' }).map((l) => l.name),
    ['/dev/loop2', '/dev/loop0'],
    'hard link and original by dev:ino',
  );
  t.same(filterBacking(three, { dev: devString(0xfe01n), ino: '2146546' }), [], 'another filesystem');

  const odd = parseLoopList(fixture('list-json-odd-names'));
  t.equal(odd[0]!.backFile, '/tmp/lt/del.img', 'the kernel\'s " (deleted)" is not part of the name');
  t.equal(odd[0]!.backDeleted, true);
  t.match(odd[1]!.backFile, /\/dir with space\/x{80}\/ün"quote\.img$/);
  t.equal(odd[1]!.backDeleted, false);

  const ac = parseLoopList(fixture('list-json-offset-autoclear'));
  t.same(
    ac.map((l) => [l.name, l.offset, l.sizeLimit]),
    [
      ['/dev/loop1', 0, 0],
      ['/dev/loop0', 512, 1048576],
    ],
  );
  t.same(parseLoopList(fixture('list-json-empty')), []);
  t.same(parseLoopList(fixture('list-json-unattached')), [], 'an unbound device is not listed');
  t.same(parseLoopList(''), []);

  const big = fixture('list-json-three').replace('"back-ino": 2146754', '"back-ino": 18446744073709551557');
  t.equal(parseLoopList(big)[0]!.backIno, '18446744073709551557', 'inode beyond 2^53 stays exact');
  t.throws(() => parseLoopList('{"x": []}'), /no "loopdevices"/);
});

t.test('dev_t encoding', async (t) => {
  t.same(decodeDev(65024), { major: 254, minor: 0 });
  t.same(decodeDev(0x0801), { major: 8, minor: 1 });
  const big = { major: 0x12345, minor: 0x6789a };
  t.same(decodeDev(encodeDev(big)), big, 'large majors and minors round-trip');
  t.equal(physicalDevice({ major: 253, minor: 3 }), 'fd:3');
  t.equal(physicalDevice({ major: 7, minor: 0 }), '7:0');
  t.equal(physicalDevice({ major: 259, minor: 16 }), '103:10');
  t.same(parsePhysicalDevice('fd:3'), { major: 253, minor: 3 });
  t.same(parsePhysicalDevice('FE:0A\n'), { major: 254, minor: 10 });
  t.throws(() => parsePhysicalDevice('253:3:1'), /not a physical-device/);
  t.same(parseDecimalDevice('     254:0  '), { major: 254, minor: 0 });
  t.equal(decimalDevice({ major: 253, minor: 3 }), '253:3');
});

const run = execRunner();
const dir = t.testdir();
const mine = new Set<string>();

t.teardown(async () => {
  // Whatever happened, leave none of our loop devices behind.
  for (const l of await listLoops(run)) if (l.backFile.startsWith(`${dir}/`)) await detachLoop(run, l.name);
});

t.test('real loop devices: attach, read-only flag, find by dev:inode, hard links, resize, detach', async (t) => {
  const base = join(dir, 'base.img');
  const link = join(dir, 'hard-link.img');
  const dash = join(dir, '-dash.img');
  truncateSync(writeAndReturn(base), 8 << 20);
  linkSync(base, link);
  truncateSync(writeAndReturn(dash), 1 << 20);

  const ro = (await attachLoop(run, base, fileIdOf(base), { readOnly: true })).name;
  mine.add(ro);
  const rw = (await attachLoop(run, link, fileIdOf(link), { readOnly: false })).name;
  mine.add(rw);
  const d = (await attachLoop(run, dash, fileIdOf(dash), { readOnly: false })).name;
  mine.add(d);
  t.match(ro, /^\/dev\/loop\d+$/);
  t.not(ro, rw);

  const mm = await majorMinor(ro);
  t.equal(mm.major, 7, 'loop major');
  t.ok(await isBlockDevice(ro));
  t.notOk(await isBlockDevice(base));
  t.notOk(await isBlockDevice(join(dir, 'nope')));
  await t.rejects(majorMinor(base), /not a device node/);
  t.equal(await isReadOnly(mm), true, 'sysfs ro=1 for --read-only');
  t.equal(await isReadOnly(await majorMinor(rw)), false);
  t.equal(await sizeSectors(mm), 16384n);
  t.equal(await loopBackingFile(mm), base);
  t.same(await holders(mm), []);
  t.equal(await sizeSectors({ major: 7, minor: 99999 }), null);

  const all = await listLoops(run);
  const ours = all.filter((l) => mine.has(l.name));
  t.equal(ours.length, 3);
  const roInfo = ours.find((l) => l.name === ro)!;
  t.equal(roInfo.readOnly, true);
  t.equal(roInfo.backFile, base);
  t.equal(ours.find((l) => l.name === rw)!.readOnly, false);
  t.equal(ours.find((l) => l.name === d)!.backFile, dash, 'a leading-dash name after -- is a file');

  const st = statSync(base, { bigint: true });
  const found = await loopsBacking(run, { dev: devString(st.dev), ino: st.ino.toString() });
  t.same(found.map((l) => l.name).sort(), [ro, rw].sort(), 'both the file and its hard link are found by dev:inode');
  t.same((await loopsBacking(run, fileIdOf(link))).map((l) => l.name).sort(), [ro, rw].sort());
  t.same(await loopsBacking(run, { dev: devString(st.dev), ino: (st.ino + 1000000n).toString() }), []);

  // Grow the file, then resize the loop.
  truncateSync(base, 16 << 20);
  await resizeLoop(run, rw);
  t.equal(await sizeSectors(await majorMinor(rw)), 32768n, 'losetup -c picked up the new size');

  for (const dev of [ro, rw, d]) {
    t.equal(await detachLoop(run, dev), true, `detached ${dev}`);
    mine.delete(dev);
  }
  // (Not re-detaching `ro` here: another test may own that loop number by now.)
  const left = (await listLoops(run)).filter((l) => l.backFile.startsWith(`${dir}/`));
  t.same(left, [], 'nothing of ours is left attached');
});

t.test('detachLoop of a device that is not attached: false, not an error (recorded stderr)', async (t) => {
  const calls: string[][] = [];
  const answer = (exitCode: number, stderr: string): Runner => ({
    async run() {
      throw new Error('run() not expected');
    },
    async probe(file, args) {
      calls.push([file, ...args]);
      return {
        command: [file, ...args].join(' '),
        exitCode,
        signal: undefined,
        stdout: '',
        stderr,
        durationMs: 1,
        failed: exitCode !== 0,
        timedOut: false,
      };
    },
  });
  t.equal(await detachLoop(answer(1, fixture('detach-unattached-stderr')), '/dev/loop5'), false);
  t.same(calls, [['losetup', '--detach', '/dev/loop5']]);
  await t.rejects(
    detachLoop(answer(1, 'losetup: /dev/loop5: detach failed: Permission denied\n'), '/dev/loop5'),
    /Permission denied/,
  );
});

t.test('helpers refuse bad input before running anything', async (t) => {
  const id = { dev: '0:0', ino: '0' };
  await t.rejects(attachLoop(run, 'relative.img', id, { readOnly: true }), /must be absolute/);
  await t.rejects(detachLoop(run, '/dev/sda'), /not a loop device/);
  await t.rejects(attachLoop(run, join(dir, 'missing.img'), id, { readOnly: true }), /losetup .* exited with status 1/);
});

function writeAndReturn(p: string): string {
  writeFileSync(p, '');
  return p;
}
