/**
 * The bundles' start-up through a V8 code cache (scripts/loader.mjs.in, written by
 * scripts/build.mjs): the cache is made on the first run, named after the bundle's hash and the
 * Node that made it, reused after, replaced when V8 rejects it, and never needed to run.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const DIST = join(import.meta.dirname, '..', '..', 'dist');

function copy(t: { teardown(f: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'xbh-cache-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  for (const f of ['block.mjs', 'block.cjs']) copyFileSync(join(DIST, f), join(dir, f));
  return dir;
}

const caches = (dir: string) => readdirSync(dir).filter((f) => f.includes('.v8cache'));

function version(dir: string, env: Record<string, string> = {}) {
  const r = spawnSync(process.execPath, [join(dir, 'block.mjs'), '--version'], {
    encoding: 'utf8',
    env: { ...process.env, ...env },
  });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

t.test('the first run writes the cache beside the bundle, named after its hash and this Node', async (t) => {
  if (!existsSync(join(DIST, 'block.cjs'))) return t.fail('dist/block.cjs missing: run npm run build');
  const dir = copy(t);
  t.same(caches(dir), [], 'no cache in a fresh copy');
  const first = version(dir);
  t.equal(first.code, 0, first.err);
  t.match(first.out, /^block \(xen-blockhooks\) \S+\n$/);
  const hash = createHash('sha256')
    .update(readFileSync(join(dir, 'block.cjs')))
    .digest('hex')
    .slice(0, 16);
  t.same(
    caches(dir),
    [`block.cjs.${hash}.${process.version}-${process.arch}.v8cache`],
    'one cache, hash + Node version + arch in its name',
  );
  const made = readFileSync(join(dir, caches(dir)[0]!));
  t.ok(made.length > 10_000, 'it holds compiled code');
  const second = version(dir);
  t.equal(second.out, first.out, 'the next run, from the cache, says the same');
  t.ok(readFileSync(join(dir, caches(dir)[0]!)).equals(made), 'an accepted cache is not rewritten');
});

t.test('a cache V8 rejects (garbage) costs nothing but time and is replaced', async (t) => {
  const dir = copy(t);
  version(dir);
  const name = caches(dir)[0]!;
  writeFileSync(join(dir, name), Buffer.alloc(4096, 0x5a));
  const r = version(dir);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /^block \(xen-blockhooks\)/);
  t.same(caches(dir), [name], 'still one cache, no temporary left');
  t.notOk(readFileSync(join(dir, name)).equals(Buffer.alloc(4096, 0x5a)), 'the garbage was replaced by a real cache');
});

t.test('XEN_BLOCKHOOKS_NO_CODE_CACHE: runs without reading or writing a cache', async (t) => {
  const dir = copy(t);
  const r = version(dir, { XEN_BLOCKHOOKS_NO_CODE_CACHE: '1' });
  t.equal(r.code, 0, r.err);
  t.same(caches(dir), [], 'nothing written');
});

t.test('a hook run through the loader keeps its exit code and its errors', async (t) => {
  const dir = copy(t);
  const r = spawnSync(process.execPath, [join(dir, 'block.mjs'), 'frobnicate'], {
    encoding: 'utf8',
    env: { PATH: process.env.PATH },
  });
  t.equal(r.status, 2, 'bad usage is exit 2');
  t.match(r.stderr, /block: .*--help/);
});

t.test(
  "a cache made by --version (the installer's warm-up) is replaced once by a run that does work, then kept",
  async (t) => {
    const dir = copy(t);
    version(dir);
    const name = caches(dir)[0]!;
    t.equal(readFileSync(join(dir, name)).subarray(0, 1).toString(), 'V', 'the warm-up cache is marked V');
    const v1 = readFileSync(join(dir, name));
    version(dir);
    t.ok(readFileSync(join(dir, name)).equals(v1), 'another --version keeps it');
    // An action (here one the hook refuses: still the add/remove path's start-up and parsing).
    spawnSync(process.execPath, [join(dir, 'block.mjs'), 'remove'], {
      encoding: 'utf8',
      env: { PATH: process.env.PATH },
    });
    const w = readFileSync(join(dir, name));
    t.equal(w.subarray(0, 1).toString(), 'W', 'a run with an action replaced it (marked W)');
    version(dir);
    t.ok(readFileSync(join(dir, name)).equals(w), '--version afterwards keeps the W cache');
  },
);
