#!/usr/bin/env node
/**
 * A Debian 12 root for trying the Debian package with real dpkg (test/host/deb-dpkg.test.ts):
 * debootstrap --variant=minbase with what the package depends on (Debian's own nodejs 18,
 * dmsetup, mount, xen-utils-common, init-system-helpers), built once into
 * .cache/deb-chroot/bookworm/ and never changed afterwards (the test lays a writable overlay over
 * it). Nothing is installed on this machine. scripts/setup.sh runs it.
 *
 *   node scripts/deb-chroot.mjs      build (or confirm) it and print its path
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
export const CHROOT_PACKAGES = ['nodejs', 'dmsetup', 'mount', 'xen-utils-common', 'init-system-helpers'];
const DIR = join(root, '.cache', 'deb-chroot');
const MIRROR = 'http://deb.debian.org/debian';

/** The root's path, built first when it is not there (minutes: debootstrap downloads ~100 MB). */
export function debChroot({ log = () => {} } = {}) {
  const tree = join(DIR, 'bookworm');
  if (existsSync(join(DIR, 'bookworm.done'))) return tree;
  try {
    execFileSync('debootstrap', ['--version'], { stdio: 'ignore' });
  } catch {
    throw new Error('debootstrap is not installed (Debian: apt-get install debootstrap; scripts/setup.sh installs it)');
  }
  rmSync(tree, { recursive: true, force: true });
  mkdirSync(DIR, { recursive: true });
  log(`debootstrap --variant=minbase --include=${CHROOT_PACKAGES.join(',')} bookworm ${tree}`);
  execFileSync(
    'debootstrap',
    ['--variant=minbase', `--include=${CHROOT_PACKAGES.join(',')}`, 'bookworm', tree, MIRROR],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  writeFileSync(join(DIR, 'bookworm.done'), `${CHROOT_PACKAGES.join(' ')}\n`);
  return tree;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  console.log(debChroot({ log: (m) => console.error(`deb-chroot: ${m}`) }));
}
