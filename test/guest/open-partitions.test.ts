/**
 * xen-blockhooks open and close on a real kernel: the partitions of images with MBR and GPT
 * tables, of a block-cow disk (the guest's view, not the base's) and of a plain block disk are
 * mapped with kpartx, mounted and read; --rw writes; the refusals leave nothing behind; close
 * takes away exactly what open made. Killed opens and closes: open-kill.test.ts.
 */
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cli, dmNames, env, images, loopsOn, startXenstored, work } from './cli-lib.js';
import {
  assertNothingLeft,
  ext4At,
  image,
  mnt,
  mountRead,
  openRecords,
  partMaps,
  paths,
  sh,
  xsEnv,
} from './open-lib.js';

before(startXenstored);

test('an MBR image: read-only maps, mounted and read; status shows them; close refuses while mounted, then removes exactly them', () => {
  const img = image('mbr.img', 24, 'label: dos\nstart=2048, size=8192, type=83\nstart=10240, type=83\n');
  ext4At(img, 2048, 4, { 'hello.txt': 'from the first partition\n' });
  ext4At(img, 10240, 8, { 'two.txt': 'second\n' });

  const o = cli(['open', img], xsEnv);
  assert.equal(o.code, 0, o.all);
  const [p1, p2, ...more] = paths(o.out);
  assert.deepEqual(more, [], o.out);
  assert.match(p1 as string, /^\/dev\/mapper\/loop\d+p1$/);
  assert.match(p2 as string, /^\/dev\/mapper\/loop\d+p2$/);
  assert.match(o.out, /\t4\.0M\tread-only\n/);
  for (const p of [p1, p2] as string[])
    assert.equal(sh('blockdev', ['--getro', p]).trim(), '1', `${p} is read-only in the kernel`);
  assert.equal(sh('blockdev', ['--getsz', p1 as string]).trim(), '8192');
  assert.equal(mountRead(p1 as string, 'hello.txt'), 'from the first partition\n');
  assert.equal(mountRead(p2 as string, 'two.txt'), 'second\n');
  assert.equal(loopsOn(images).length, 1, 'one loop on the image');
  assert.match(
    spawnSync('losetup', ['--list', '--noheadings', '-O', 'RO,BACK-FILE'], { encoding: 'utf8' }).stdout,
    new RegExp(`^\\s*1 ${img}$`, 'm'),
    'the loop is read-only',
  );

  const st = cli(['status'], xsEnv);
  assert.equal(st.code, 0, st.all);
  assert.match(st.out, /^-\s+-\s+-\s+open\s+\S*loop\d+\s.*\sopen$/m, st.out);
  assert.ok(st.out.includes(`open: partitions ${p1}, ${p2} (read-only)`), st.out);
  const js = JSON.parse(cli(['status', '--json'], xsEnv).out) as {
    devices: { hook: string; state: string; base: string }[];
  };
  assert.deepEqual(
    js.devices.map((d) => `${d.hook} ${d.state} ${d.base}`),
    [`open open ${img}`],
  );
  const gc = cli(['gc'], xsEnv);
  assert.equal(gc.code, 0, `gc leaves an open alone: ${gc.all}`);

  const again = cli(['open', img], xsEnv);
  assert.equal(again.code, 1, again.all);
  assert.match(again.err, /is open already .*close/);
  assert.equal(partMaps().length, 2, 'a second open changes nothing');

  mkdirSync(mnt, { recursive: true });
  sh('mount', ['-t', 'ext4', '-o', 'ro', p1 as string, mnt]);
  let c = cli(['close', img], xsEnv);
  sh('umount', [mnt]);
  assert.equal(c.code, 1, c.all);
  assert.match(c.err, /mounted on .*mnt.*unmount it first/);
  assert.equal(partMaps().length, 2, 'nothing was taken away under the mount');
  assert.match(cli(['status'], xsEnv).out, /open: a close failed|failed/);

  c = cli(['close', img], xsEnv);
  assert.equal(c.code, 0, c.all);
  assert.match(c.out, /^closed .*mbr\.img: removed \/dev\/mapper\/loop\d+p1, \/dev\/mapper\/loop\d+p2$/m);
  assertNothingLeft('after close');
  const c2 = cli(['close', img], xsEnv);
  assert.equal(c2.code, 1, c2.all);
  assert.match(c2.err, /is not open/);
});

test('a GPT image: every partition is mapped and readable; a relative path works', () => {
  const img = image(
    'gpt.img',
    24,
    'label: gpt\nstart=2048, size=8192, name=one\nstart=10240, size=16384, name=two\nstart=26624, name=three\n',
  );
  ext4At(img, 10240, 8, { 'gpt.txt': 'on the second GPT partition\n' });
  const o = spawnSync(process.execPath, [join(process.cwd(), 'dist', 'xen-blockhooks.mjs'), 'open', 'gpt.img'], {
    cwd: images,
    env: { ...env, ...xsEnv },
    encoding: 'utf8',
  });
  assert.equal(o.status, 0, `${o.stdout}${o.stderr}`);
  const ps = paths(o.stdout);
  assert.equal(ps.length, 3, o.stdout);
  assert.equal(sh('blockdev', ['--getsz', ps[1] as string]).trim(), '16384');
  assert.equal(mountRead(ps[1] as string, 'gpt.txt'), 'on the second GPT partition\n');
  const c = cli(['close', img], xsEnv);
  assert.equal(c.code, 0, c.all);
  assertNothingLeft('after close');
});

test('--rw on a free image writes through; read-only again shows what was written', () => {
  const img = image('rw.img', 16, 'label: dos\nstart=2048, type=83\n');
  ext4At(img, 2048, 8, { 'a.txt': 'a\n' });
  const o = cli(['open', img, '--rw'], xsEnv);
  assert.equal(o.code, 0, o.all);
  const [p1] = paths(o.out);
  assert.match(o.out, /\twritable\n/);
  assert.equal(sh('blockdev', ['--getro', p1 as string]).trim(), '0');
  mkdirSync(mnt, { recursive: true });
  sh('mount', ['-t', 'ext4', p1 as string, mnt]);
  writeFileSync(join(mnt, 'written.txt'), 'written from dom0\n');
  sh('umount', [mnt]);
  assert.equal(cli(['close', img], xsEnv).code, 0);
  const ro = cli(['open', img], xsEnv);
  assert.equal(ro.code, 0, ro.all);
  assert.equal(mountRead(paths(ro.out)[0] as string, 'written.txt'), 'written from dom0\n');
  assert.equal(cli(['close', img], xsEnv).code, 0);
  assertNothingLeft('after the writable open');
});

test('bad input: a clear error, exit 1 (usage: 2), nothing left behind', () => {
  const blank = join(images, 'blank.img');
  sh('truncate', ['-s', '8M', blank]);
  const img = image('refuse.img', 16, 'label: dos\nstart=2048, type=83\n');
  mkdirSync(join(images, 'adir'), { recursive: true });
  const cases: [string[], number, RegExp, NodeJS.ProcessEnv?][] = [
    [['open'], 2, /expected DOMAIN VDEV or IMAGE, not 0 arguments/],
    [['open', 'a', 'b', 'c'], 2, /not 3 arguments/],
    [['open', 'web', 'nonsense!'], 2, /nonsense!/],
    [['close', img, '--rw'], 2, /--rw/],
    [['open', join(images, 'missing.img')], 1, /missing\.img: no such file/],
    [['open', join(images, 'adir')], 1, /neither a disk image file nor a block device/],
    [['open', blank], 1, /holds no partition table kpartx can read \(MBR or GPT\)/],
    [['open', blank, '--rw'], 1, /holds no partition table/],
    [['open', 'nosuchdomain', 'xvda'], 1, /no disk recorded for domain nosuchdomain, vdev xvda/],
    [['close', img], 1, /is not open/],
    [['close', 'web', 'xvda'], 1, /disk web\/xvda is not open/],
    [
      ['open', img, '--rw'],
      1,
      /--rw refused: xenstore cannot be reached/,
      { XENSTORED_PATH: join(work, 'no-such.sock') },
    ],
  ];
  for (const [args, code, msg, extra] of cases) {
    const r = cli(args, extra ?? xsEnv);
    assert.equal(r.code, code, `${args.join(' ')}: ${r.all}`);
    assert.match(r.err, msg, args.join(' '));
    // One sentence (a progress line ending in … may come first: TCG is slow).
    assert.equal(
      r.err
        .trim()
        .split('\n')
        .filter((l) => !l.endsWith('…')).length,
      1,
      `${args.join(' ')}: one line: ${r.err}`,
    );
    assertNothingLeft(args.join(' '));
  }
  // Someone else's loop on the image: read-only is fine, --rw is not.
  const theirs = sh('losetup', ['--find', '--show', '--', img]).trim();
  try {
    const rw = cli(['open', img, '--rw'], xsEnv);
    assert.equal(rw.code, 1, rw.all);
    assert.match(rw.err, new RegExp(`--rw refused: image .*refuse\\.img is attached to ${theirs}`));
    assert.deepEqual(partMaps(), []);
    assert.deepEqual(openRecords(), []);
    const ro = cli(['open', img], xsEnv);
    assert.equal(ro.code, 0, ro.all);
    assert.equal(cli(['close', img], xsEnv).code, 0);
    assert.equal(loopsOn(images).length, 1, 'only their loop is left');
  } finally {
    sh('losetup', ['-d', theirs]);
  }
  assertNothingLeft('after the loop refusal');
});

test("a block-cow disk shows the guest's view; its base never opens writable; the disk never opens writable while its domain has it", () => {
  const baseImg = image('cowbase.img', 16, 'label: dos\nstart=2048, type=83\n');
  ext4At(baseImg, 2048, 8, { 'base.txt': 'in the base\n' });
  const add = cli(
    [
      'simulate',
      '--real-xenstore',
      '--keep',
      '--domid',
      '7',
      '--name',
      'web',
      `vdev=xvda,access=w,script=block-cow,target=${baseImg} 16`,
    ],
    xsEnv,
  );
  assert.equal(add.code, 0, add.all);
  const disk = dmNames().find((n) => n.startsWith('xbh-cow-web-xvda'));
  assert.ok(disk, `the cow disk is built: ${dmNames().join(' ')}`);
  try {
    // The guest writes its own file system over the first partition (through its disk, the snapshot).
    ext4At(`/dev/mapper/${disk}`, 2048, 8, { 'guest.txt': 'the guest wrote this\n' });

    const o = cli(['open', 'web', 'xvda'], xsEnv);
    assert.equal(o.code, 0, o.all);
    const [p1] = paths(o.out);
    assert.equal(p1, `/dev/mapper/${disk}p1`);
    assert.equal(sh('blockdev', ['--getro', p1 as string]).trim(), '1');
    assert.equal(mountRead(p1 as string, 'guest.txt'), 'the guest wrote this\n', "the guest's change is seen");
    assert.equal(mountRead(p1 as string, 'base.txt'), undefined, "the base's file system is not what is seen");
    assert.match(cli(['status'], xsEnv).out, /^7\s+web\s+xvda\s+open\s/m);
    // By domain id as well: the same open.
    const byId = cli(['open', '7', 'xvda'], xsEnv);
    assert.equal(byId.code, 1, byId.all);
    assert.match(byId.err, /is open already/);

    // The base, opened as an image, is unchanged.
    const b = cli(['open', baseImg], xsEnv);
    assert.equal(b.code, 0, b.all);
    const [bp1] = paths(b.out);
    assert.equal(mountRead(bp1 as string, 'base.txt'), 'in the base\n');
    assert.equal(mountRead(bp1 as string, 'guest.txt'), undefined);
    assert.equal(cli(['close', baseImg], xsEnv).code, 0);

    const rwBase = cli(['open', baseImg, '--rw'], xsEnv);
    assert.equal(rwBase.code, 1, rwBase.all);
    assert.match(
      rwBase.err,
      /--rw refused: image .*cowbase\.img is (attached to \/dev\/loop\d+ \(read-only\)|the base image of block-cow disk web\/xvda)/,
    );
    const rwDisk = cli(['close', 'web', 'xvda'], xsEnv);
    assert.equal(rwDisk.code, 0, rwDisk.all);
    const rw = cli(['open', 'web', 'xvda', '--rw'], xsEnv);
    assert.equal(rw.code, 1, rw.all);
    assert.match(rw.err, /--rw refused: disk web\/xvda .* is attached to domain 7 \(web\)/);
    assert.deepEqual(partMaps(), []);
    assert.deepEqual(openRecords(), []);

    // The hook cannot take the disk away under open partitions, and says what sits on it.
    assert.equal(cli(['open', 'web', 'xvda'], xsEnv).code, 0);
    const busy = cli(
      [
        'simulate',
        '--real-xenstore',
        '--action',
        'remove',
        '--domid',
        '7',
        '--name',
        'web',
        `vdev=xvda,access=w,script=block-cow,target=${baseImg} 16`,
      ],
      { ...xsEnv, XEN_BLOCKHOOKS_BUSY_RETRY_MS: '500' },
    );
    assert.equal(busy.code, 1, busy.all);
    assert.match(busy.all, new RegExp(`${disk}p1 sits on it \\(partitions "xen-blockhooks open" mapped\\?`));
    assert.equal(cli(['close', 'web', 'xvda'], xsEnv).code, 0);
  } finally {
    const rm = cli(
      [
        'simulate',
        '--real-xenstore',
        '--action',
        'remove',
        '--domid',
        '7',
        '--name',
        'web',
        `vdev=xvda,access=w,script=block-cow,target=${baseImg} 16`,
      ],
      xsEnv,
    );
    assert.equal(rm.code, 0, rm.all);
  }
  assert.deepEqual(
    dmNames().filter((n) => n.startsWith('xbh-')),
    [],
  );
  assertNothingLeft('after the cow disk');
});

test("a plain block (file:) disk: its loop's partitions, opened by name and closed by id; never writable while its domain has it", () => {
  const img = image('plain.img', 16, 'label: gpt\nstart=2048, name=root\n');
  ext4At(img, 2048, 8, { 'plain.txt': 'on a plain disk\n' });
  const spec = `vdev=xvdb,access=w,script=block,target=${img}`;
  const add = cli(['simulate', '--real-xenstore', '--keep', '--domid', '8', '--name', 'mail', spec], xsEnv);
  assert.equal(add.code, 0, add.all);
  try {
    const hookLoop = loopsOn(images)[0]?.trim();
    assert.ok(hookLoop, 'the hook attached a loop');
    const o = cli(['open', 'mail', 'xvdb'], xsEnv);
    assert.equal(o.code, 0, o.all);
    const [p1, ...more] = paths(o.out);
    assert.deepEqual(more, []);
    assert.match(p1 as string, /^\/dev\/mapper\/loop\d+p1$/);
    assert.equal(mountRead(p1 as string, 'plain.txt'), 'on a plain disk\n');
    const st = JSON.parse(cli(['status', '--json'], xsEnv).out) as {
      devices: { hook: string; state: string; domain: string; vdev: string }[];
    };
    assert.deepEqual(st.devices.map((d) => `${d.hook} ${d.state} ${d.domain} ${d.vdev}`).sort(), [
      'block active mail xvdb',
      'open open mail xvdb',
    ]);
    assert.equal(cli(['close', '8', 'xvdb'], xsEnv).code, 0, 'closed by domain id');
    const rw = cli(['open', '8', 'xvdb', '--rw'], xsEnv);
    assert.equal(rw.code, 1, rw.all);
    assert.match(rw.err, /--rw refused: disk 8\/xvdb \(\/dev\/loop\d+\) is attached to domain 8 \(mail\)/);
    const rwImg = cli(['open', img, '--rw'], xsEnv);
    assert.equal(rwImg.code, 1, rwImg.all);
    assert.match(rwImg.err, /--rw refused: image .*plain\.img is attached to \/dev\/loop\d+;/);
  } finally {
    const rm = cli(
      ['simulate', '--real-xenstore', '--action', 'remove', '--domid', '8', '--name', 'mail', spec],
      xsEnv,
    );
    assert.equal(rm.code, 0, rm.all);
  }
  assertNothingLeft('after the plain disk');
});
