/**
 * `xen-blockhooks check` over fake machines built in a temporary directory: an installation root
 * (configuration, its directories, the installed wrappers) and a machine root (/proc, /dev, /sys,
 * /lib/modules, the tools on the hooks' PATH). Each problem is asserted as the exact line printed.
 */
import t from 'tap';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { cliMain } from '../../src/cli/main.js';
import { CONFIG_KEYS } from '../../src/config/config.js';

const RELEASE = '6.1.0-test';
const CONF = [
  'state_dir = /run/xbh',
  'store_dir = /var/lib/xbh',
  'xen_lock_dir = /run/xen-hotplug',
  'log_file = /var/log/xen/xen-hotplug.log',
  'image_dirs = /srv/images',
  '',
].join('\n');

function setup(t: { teardown(f: () => void): void }) {
  const top = mkdtempSync(join(tmpdir(), 'xbh-check-'));
  t.teardown(() => rmSync(top, { recursive: true, force: true }));
  const root = join(top, 'root');
  const machine = join(top, 'machine');
  const put = (base: string, path: string, text: string, mode = 0o644) => {
    mkdirSync(dirname(join(base, path)), { recursive: true });
    writeFileSync(join(base, path), text);
    chmodSync(join(base, path), mode);
  };
  put(root, '/etc/xen/blockhooks.conf', CONF);
  for (const d of ['/run/xbh', '/var/lib/xbh', '/run/xen-hotplug', '/var/log/xen', '/srv/images'])
    mkdirSync(join(root, d), { recursive: true, mode: 0o755 });
  const hook = (name: string) =>
    put(
      root,
      `/etc/xen/scripts/${name}`,
      `#!/bin/sh\n# xen-blockhooks: ${name} (installed by xen-blockhooks' install script; replaced on reinstall).\nexec node x "$@"\n`,
      0o755,
    );
  hook('block-cow');
  put(root, '/etc/xen/scripts/block', '#!/bin/bash\n# the stock block\n', 0o755);
  for (const tool of ['losetup', 'dmsetup', 'lvm', 'modprobe', 'kpartx'])
    put(machine, `/usr/sbin/${tool}`, '#!/bin/sh\n', 0o755);
  for (const tool of ['qemu-nbd', 'qemu-img', 'rbd']) put(machine, `/usr/bin/${tool}`, '#!/bin/sh\n', 0o755);
  put(machine, '/proc/misc', '236 device-mapper\n237 loop-control\n');
  put(machine, '/proc/devices', 'Character devices:\n  1 mem\n\nBlock devices:\n  7 loop\n254 device-mapper\n');
  put(machine, '/dev/mapper/control', '');
  put(machine, '/dev/loop-control', '');
  mkdirSync(join(machine, '/sys/module/nbd'), { recursive: true });
  mkdirSync(join(machine, '/sys/bus/rbd'), { recursive: true });
  put(machine, '/proc/xen/capabilities', 'control_d\n');
  put(machine, `/lib/modules/${RELEASE}/modules.dep`, 'kernel/drivers/md/dm-mod.ko: \nkernel/drivers/block/loop.ko:\n');
  const out: string[] = [];
  const err: string[] = [];
  const check = async (args: string[] = [], env: NodeJS.ProcessEnv = {}) => {
    out.length = 0;
    err.length = 0;
    const code = await cliMain(['check', '--root', root, ...args], env, {
      out: (s) => out.push(s),
      err: (s) => err.push(s),
      machine: { root: machine, kernelRelease: RELEASE },
    });
    return { code, out: [...out], err: [...err] };
  };
  return { root, machine, put, hook, check };
}

t.test('a ready machine: no problems, exit 0, one line', async (t) => {
  const h = setup(t);
  const r = await h.check();
  t.same(r, { code: 0, out: ['No problems found.'], err: [] });
});

t.test('the configuration: every bad line is a problem, and the rest is still checked', async (t) => {
  const h = setup(t);
  const conf = join(h.root, '/etc/xen/blockhooks.conf');
  h.put(h.root, '/etc/xen/blockhooks.conf', `${CONF}store-dir = /x\ndata_size = 8G\ncow.chunk = 3K\n`);
  rmSync(join(h.machine, '/proc/xen'), { recursive: true });
  const r = await h.check();
  t.equal(r.code, 1);
  t.same(r.out, [
    `problem: ${conf}:6: unknown key \`store-dir\`; did you mean \`store_dir\`?`,
    `problem: ${conf}:7: unknown key \`data_size\`; did you mean \`thin.data_size\`?`,
    `problem: ${conf}:8: chunk "3K" must be a power of two from 4K to 512K`,
    'problem: Xen: this machine is not running on Xen (no /proc/xen, /sys/hypervisor/type is not xen): no toolstack will run the hooks',
    '4 problems found.',
  ]);
  t.same(r.err, [], 'a broken configuration is what check reports, not a reason to stop');
  t.equal(
    await cliMain(['status'], { XEN_BLOCKHOOKS_CONF: conf }, { out: () => {}, err: () => {} }),
    1,
    'while the other commands refuse to run on it',
  );

  h.put(h.root, '/etc/xen/blockhooks.conf', 'frobnicate = 1\n');
  t.same((await h.check()).out.slice(0, 1), [
    `problem: ${conf}:1: unknown key \`frobnicate\` (known keys: ${CONFIG_KEYS.join(', ')})`,
  ]);

  rmSync(conf);
  h.put(h.machine, '/proc/xen/capabilities', 'control_d\n');
  const d = await h.check();
  t.equal(d.code, 0, 'no file: the defaults');
  t.same(d.out, [
    `note: ${conf} does not exist: the defaults are in force`,
    `note: image_dirs: ${h.root}/var/lib/xen/images does not exist (no base image can come from there)`,
    `note: image_dirs: ${h.root}/srv/xen does not exist (no base image can come from there)`,
    `note: image_dirs: ${h.root}/mnt does not exist (no base image can come from there)`,
    `note: image_dirs: ${h.root}/media does not exist (no base image can come from there)`,
    'No problems found (5 notes).',
  ]);
  const env = await h.check([], { XEN_BLOCKHOOKS_CONF: join(h.root, 'none.conf'), XEN_BLOCKHOOKS_STATE_DIR: 'run/x' });
  t.same(
    env.out[0],
    'problem: XEN_BLOCKHOOKS_STATE_DIR: "run/x" is not an absolute path',
    "the environment's overrides too",
  );
});

t.test('directories: world-writable, not a directory, cannot be made', async (t) => {
  const h = setup(t);
  chmodSync(join(h.root, '/run/xbh'), 0o777);
  chmodSync(join(h.root, '/srv/images'), 0o1777);
  rmSync(join(h.root, '/var/lib/xbh'), { recursive: true });
  h.put(h.root, '/var/lib/xbh', 'a file\n');
  rmSync(join(h.root, '/var/log'), { recursive: true });
  h.put(h.root, '/var/log', 'a file where the log directory should be\n');
  rmSync(join(h.root, '/run/xen-hotplug'), { recursive: true });
  const r = await h.check();
  t.equal(r.code, 1);
  t.same(
    r.out,
    [
      `problem: state_dir: ${h.root}/run/xbh is writable by everyone (mode 0777); make it 0755 or stricter`,
      `problem: store_dir: ${h.root}/var/lib/xbh is not a directory`,
      `problem: log_file: ${h.root}/var/log/xen cannot be made: ${h.root}/var/log is not a directory`,
      `problem: image_dirs: ${h.root}/srv/images is writable by everyone (mode 1777); make it 0755 or stricter`,
      '4 problems found.',
    ],
    'a missing xen_lock_dir whose parent exists is no problem: it is made on first use',
  );
});

t.test('tools: missing for an installed hook is a problem, for one that is not a note', async (t) => {
  const h = setup(t);
  rmSync(join(h.machine, '/usr/sbin/dmsetup'));
  rmSync(join(h.machine, '/usr/bin/qemu-img'));
  rmSync(join(h.machine, '/usr/sbin/kpartx'));
  chmodSync(join(h.machine, '/usr/bin/rbd'), 0o644);
  const path = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
  const r = await h.check();
  t.equal(r.code, 1);
  t.same(r.out, [
    `problem: block-cow is installed but cannot run: not on its PATH (${path}): dmsetup (package dmsetup)`,
    'note: block-qcow (not installed) would need: qemu-img (package qemu-utils)',
    'note: block-thin (not installed) would need: dmsetup (package dmsetup)',
    'note: block-lvsnap (not installed) would need: dmsetup (package dmsetup)',
    'note: block-rbd (not installed) would need: rbd (package ceph-common)',
    'note: "xen-blockhooks open" would need: kpartx (package kpartx)',
    '1 problem found.',
  ]);
  rmSync(join(h.root, '/etc/xen/scripts/block-cow'));
  h.put(h.root, '/etc/xen/scripts/block-cow', "#!/bin/sh\n# somebody else's block-cow\n", 0o755);
  const n = await h.check();
  t.equal(n.code, 0, 'a block-cow that is not our wrapper is not our hook');
  t.same(n.out.slice(0, 2), [
    `note: no hook is installed in ${h.root}/etc/xen/scripts (install the xen-blockhooks package, or run ./install); what a hook needs is reported as a note`,
    'note: block-cow (not installed) would need: dmsetup (package dmsetup)',
  ]);
});

t.test('the kernel: device-mapper, loop, nbd, rbd; Xen', async (t) => {
  const h = setup(t);
  h.hook('block-qcow');
  h.put(h.machine, '/proc/misc', '237 loop-control\n');
  h.put(h.machine, '/proc/devices', 'Block devices:\n  7 loop\n');
  rmSync(join(h.machine, '/sys/module/nbd'), { recursive: true });
  rmSync(join(h.machine, '/sys/bus/rbd'), { recursive: true });
  rmSync(join(h.machine, '/dev/loop-control'));
  h.put(h.machine, `/lib/modules/${RELEASE}/modules.dep`, '');
  h.put(h.machine, '/proc/xen/capabilities', '');
  const r = await h.check();
  t.equal(r.code, 1);
  t.same(r.out, [
    `problem: device-mapper: this kernel has none (no device-mapper in ${h.machine}/proc/misc, no dm_mod module): block-cow, block-thin and block-lvsnap cannot build a disk`,
    `problem: loop: this kernel has no loop devices (no ${h.machine}/dev/loop-control, no loop module): block, block-cow and block-thin cannot attach a file`,
    `problem: nbd: this kernel has no nbd (no ${h.machine}/sys/module/nbd, no nbd module): block-qcow is installed and cannot attach a disk`,
    'problem: Xen: this is a Xen guest, not dom0 (no control_d in /proc/xen/capabilities): the hooks run in dom0',
    `note: rbd: this kernel has no rbd (no ${h.machine}/sys/bus/rbd, no rbd module): block-rbd (not installed) would need it`,
    '4 problems found.',
  ]);

  h.put(
    h.machine,
    `/lib/modules/${RELEASE}/modules.dep`,
    'kernel/drivers/md/dm-mod.ko.xz: \nkernel/drivers/block/loop.ko:\nkernel/drivers/block/nbd.ko: \n',
  );
  h.put(h.machine, `/lib/modules/${RELEASE}/modules.builtin`, 'kernel/drivers/block/rbd.ko\n');
  h.put(h.machine, '/proc/xen/capabilities', 'control_d\n');
  const m = await h.check();
  t.equal(m.code, 0, 'modules that can be loaded are notes');
  t.same(m.out, [
    'note: device-mapper: the dm_mod module is not loaded; the kernel loads it when dmsetup first opens /dev/mapper/control',
    `note: loop: the module is not loaded and ${h.machine}/dev/loop-control is missing (modprobe loop)`,
    'note: nbd: the module is not loaded; block-qcow loads it on first use (modprobe nbd)',
    'note: rbd: the module is not loaded; load it with modprobe rbd',
    'No problems found (4 notes).',
  ]);

  h.put(h.machine, '/proc/misc', '236 device-mapper\n');
  rmSync(join(h.machine, '/dev/mapper/control'));
  t.equal(
    (await h.check()).out[0],
    `problem: device-mapper: the kernel has it but ${h.machine}/dev/mapper/control is missing (dmsetup mknodes makes it)`,
  );
});

t.test('usage and help', async (t) => {
  const out: string[] = [];
  const err: string[] = [];
  const deps = { out: (s: string) => out.push(s), err: (s: string) => err.push(s) };
  t.equal(await cliMain(['check', 'extra'], {}, deps), 2);
  t.same(err.pop(), 'xen-blockhooks check: unexpected argument "extra"; run "xen-blockhooks check --help" for usage');
  t.equal(await cliMain(['check', '--root', 'stage'], {}, deps), 2);
  t.same(
    err.pop(),
    'xen-blockhooks check: --root needs an absolute path, not "stage"; run "xen-blockhooks check --help" for usage',
  );
  for (const argv of [
    ['check', '--help'],
    ['help', 'check'],
  ]) {
    out.length = 0;
    t.equal(await cliMain(argv, {}, deps), 0, argv.join(' '));
    t.match(out.join('\n'), /^Usage: xen-blockhooks check \[--root DIR\]\n/);
  }
  out.length = 0;
  await cliMain(['--help'], {}, deps);
  t.match(out.join('\n'), /\n {2}check \[--root DIR\] /, 'the command list names it');
});

t.test('this machine, as it is: a last line that counts', async (t) => {
  const out: string[] = [];
  const code = await cliMain(
    ['check'],
    { XEN_BLOCKHOOKS_CONF: '/nonexistent/blockhooks.conf' },
    { out: (s) => out.push(s), err: () => {} },
  );
  const problems = out.filter((l) => l.startsWith('problem: ')).length;
  t.equal(code, problems ? 1 : 0);
  t.match(
    out.at(-1),
    problems ? new RegExp(`^${problems} problems? found\\.$`) : /^No problems found( \(\d+ notes?\))?\.$/,
  );
});
