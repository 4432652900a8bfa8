/**
 * Every image path an example names can be copied onto a default install: it is under one of the
 * default `image_dirs` (src/config/config.ts), which the hooks require of a base image.
 *
 * Where: the help of every command (`xen-blockhooks --help` and `xen-blockhooks COMMAND --help`
 * for each command it lists), each hook's --help, README.md, docs/*.md and packaging/man/* (font
 * escapes dropped).
 *
 * The rule, kept simple:
 *   - an image path is an absolute path ending in an image file name (.img, .qcow2, .qcow, .raw,
 *     .iso, .vmdk, .vhd, .vdi; a path segment may hold single spaces, as in "/media/LIVE CD/x.img"),
 *     or the absolute path a disk spec names after `target=` or an xm prefix (`file:`, `cow:`,
 *     `qcow:`, …) up to a comma, a quote or a space;
 *   - each must be under a default image_dirs entry, except a device (`/dev/…`) and a path under
 *     the default store_dir (a store file or overlay, which the hooks make, not an image).
 * Tier: host (texts only).
 */
import t from 'tap';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { cliMain, MAIN_HELP } from '../../src/cli/main.js';
import { HOOKS } from '../../src/backends/index.js';
import { helpText } from '../../src/hotplug/help.js';
import { defaultConfig } from '../../src/config/config.js';

const ROOT = join(import.meta.dirname, '../..');

const IMAGE =
  /(?<![\w.~/-])(\/(?:[\w.+-]+(?: [\w.+-]+)*\/)*[\w.+-]+(?: [\w.+-]+)*\.(?:img|qcow2|qcow|raw|iso|vmdk|vhd|vdi))(?!\w)/g;
const SPEC_PATH = /(?:target=|\b(?:file|cow|qcow|qcow2|thin|aio|raw|vhd):)(\/[^,\s'"`)\]]+)/g;

/** The image paths in `text`, by the rule above. */
export function imagePaths(text: string): string[] {
  const plain = text
    .replace(/\\f[BIRP]/g, '')
    .replace(/\\-/g, '-')
    .replace(/\\&/g, '');
  return [...plain.matchAll(IMAGE), ...plain.matchAll(SPEC_PATH)].map((m) => m[1] as string);
}

function allowed(path: string): boolean {
  const d = defaultConfig();
  const under = (dir: string) => path.startsWith(`${dir.replace(/\/$/, '')}/`);
  return path.startsWith('/dev/') || under(d.storeDir) || d.imageDirs.some(under);
}

async function commandHelp(argv: string[]): Promise<string> {
  const out: string[] = [];
  const code = await cliMain(argv, {}, { out: (s) => out.push(s), err: () => {} });
  if (code !== 0) throw new Error(`${argv.join(' ')} exited ${code}`);
  return out.join('\n');
}

async function sources(): Promise<[string, string][]> {
  const texts: [string, string][] = [['xen-blockhooks --help', MAIN_HELP]];
  const commands = [
    ...MAIN_HELP.split('\n\n')
      .find((b) => b.startsWith('Commands:'))!
      .matchAll(/^ {2}([a-z]+)/gm),
  ].map((m) => m[1] as string);
  for (const c of commands) texts.push([`xen-blockhooks ${c} --help`, await commandHelp([c, '--help'])]);
  for (const [hook, backend] of Object.entries(HOOKS)) texts.push([`${hook} --help`, helpText(backend)]);
  const files = [
    'README.md',
    ...readdirSync(join(ROOT, 'docs'))
      .filter((f) => f.endsWith('.md'))
      .map((f) => `docs/${f}`),
    ...readdirSync(join(ROOT, 'packaging/man')).map((f) => `packaging/man/${f}`),
  ];
  for (const f of files) texts.push([f, readFileSync(join(ROOT, f), 'utf8')]);
  return texts;
}

t.test('the rule finds image paths, with spaces, in disk specs and prose; it can fail', async (t) => {
  t.same(imagePaths("target=/media/LIVE CD/rootfs.img 512M persistent and 'cow:/srv/base 64,xvda,w'"), [
    '/media/LIVE CD/rootfs.img',
    '/media/LIVE',
    '/srv/base',
  ]);
  t.same(imagePaths('see \\fB/srv/xen/a\\-b.img\\fR, store_dir/qcow/NAME.qcow2 and phy:/dev/vg0/lv'), [
    '/srv/xen/a-b.img',
  ]);
  t.ok(allowed('/srv/xen/base.img'));
  t.ok(allowed('/media/LIVE CD/rootfs.img'));
  t.ok(allowed('/var/lib/xen-blockhooks/qcow/web-xvda.qcow2'), 'a store path');
  t.notOk(allowed('/srv/base.img'), 'beside /srv/xen is not under it');
  t.notOk(allowed('/images/base.img'));
});

t.test(
  'every image path in the help texts, README, docs and man pages is under a default image_dirs entry',
  async (t) => {
    const all = await sources();
    t.ok(all.length > 25, `${all.length} texts read`);
    let count = 0;
    const outside: string[] = [];
    for (const [where, text] of all)
      for (const p of imagePaths(text)) {
        count++;
        if (!allowed(p)) outside.push(`${where}: ${p}`);
      }
    t.ok(count > 30, `${count} image paths found`);
    t.same(outside, [], `default image_dirs: ${defaultConfig().imageDirs.join(' ')}`);
  },
);
