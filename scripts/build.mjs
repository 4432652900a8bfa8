#!/usr/bin/env node
/**
 * Bundle every entry point in src/bin/ (except the shared hook.ts) for Node 18 and later, with
 * the package version injected. A dom0 then needs Node and no node_modules. Each entry point
 * becomes two files in dist/:
 *   <name>.cjs  the bundle (CommonJS: V8 can cache the compiled code of a classic script)
 *   <name>.mjs  the program to run, from scripts/loader.mjs.in: it runs <name>.cjs through a V8
 *               code cache kept beside it (<name>.cjs.<hash>.<node>-<arch>.v8cache)
 * and dist/snapshot.cjs, which the installer runs to make each hook's startup snapshot, and
 * dist/THIRD-PARTY-LICENSES (every npm package inside a bundle: name, version, licence and the
 * package's own licence text) with dist/licenses.json (the same list, for the Debian package's
 * copyright file). Licence comments in the bundled code are kept, at the end of each bundle.
 * Each bundle is then run once (`--version`) so this Node's cache exists before the first
 * hook call. `node scripts/build.mjs`.
 */
import { build } from 'esbuild';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const dist = join(root, 'dist');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
const LIBS = new Set(['hook.ts']);
const entries = readdirSync(join(root, 'src/bin'))
  .filter((f) => f.endsWith('.ts') && !LIBS.has(f))
  .map((f) => f.replace(/\.ts$/, ''));
const loader = readFileSync(join(root, 'scripts', 'loader.mjs.in'), 'utf8');

mkdirSync(dist, { recursive: true });
// Caches of earlier bundles can never be used again (their hash is in the name).
for (const f of readdirSync(dist))
  if (f.endsWith('.v8cache') || /\.v8cache\.\d+$/.test(f)) rmSync(join(dist, f), { force: true });

const results = await Promise.all(
  entries.map((name) =>
    build({
      entryPoints: [join(root, 'src/bin', `${name}.ts`)],
      outfile: join(dist, `${name}.cjs`),
      bundle: true,
      platform: 'node',
      target: 'node18',
      format: 'cjs',
      sourcemap: false,
      legalComments: 'eof',
      metafile: true,
      logLevel: 'warning',
      // NODE_ENV=production as bundlers set it: winston's @dabh/diagnostics then loads its no-op
      // build instead of the colour machinery of its development build (~4 ms of every start).
      define: {
        __XEN_BLOCKHOOKS_VERSION__: JSON.stringify(pkg.version),
        'import.meta.url': '__xbhModuleUrl',
        'process.env.NODE_ENV': '"production"',
      },
      banner: { js: 'var __xbhModuleUrl = require("node:url").pathToFileURL(__filename).href;' },
    }),
  ),
);
// The npm packages the bundles hold: the folder after the last node_modules/ of each input.
const packages = new Map();
for (const r of results) {
  for (const input of Object.keys(r.metafile.inputs)) {
    const parts = relative(root, join(root, input)).split(sep);
    const at = parts.lastIndexOf('node_modules');
    if (at < 0) continue;
    const n = parts[at + 1].startsWith('@') ? 2 : 1;
    const dir = join(root, ...parts.slice(0, at + 1 + n));
    if (!packages.has(dir)) packages.set(dir, JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')));
  }
}
const licences = [...packages]
  .map(([dir, p]) => {
    const file = readdirSync(dir).find((f) => /^licen[cs]e(\.(md|txt))?$/i.test(f));
    if (!file) throw new Error(`${p.name} ${p.version} is bundled but has no LICENSE file in ${dir}`);
    const license = typeof p.license === 'string' ? p.license : p.license?.type;
    if (!license) throw new Error(`${p.name} ${p.version} is bundled but its package.json names no licence`);
    return { name: p.name, version: p.version, license, text: readFileSync(join(dir, file), 'utf8').trim() };
  })
  .sort((a, b) => (a.name < b.name ? -1 : 1));
writeFileSync(join(dist, 'licenses.json'), `${JSON.stringify(licences, null, 2)}\n`);
writeFileSync(
  join(dist, 'THIRD-PARTY-LICENSES'),
  [
    `The bundles of xen-blockhooks ${pkg.version} (*.cjs) contain these npm packages, each under its own licence.\n`,
    ...licences.map(
      (l) => `${'='.repeat(72)}\n${l.name} ${l.version} (${l.license})\n${'='.repeat(72)}\n\n${l.text}\n`,
    ),
  ].join('\n'),
);
for (const name of entries) {
  const hash = createHash('sha256')
    .update(readFileSync(join(dist, `${name}.cjs`)))
    .digest('hex')
    .slice(0, 16);
  const file = join(dist, `${name}.mjs`);
  writeFileSync(
    file,
    loader.replaceAll('@NAME@', name).replaceAll('@BUNDLE@', `${name}.cjs`).replaceAll('@HASH@', hash),
  );
  chmodSync(file, 0o755);
}
// The startup snapshot builder the installer runs with the dom0's node (scripts/snapshot.cjs).
writeFileSync(join(dist, 'snapshot.cjs'), readFileSync(join(root, 'scripts', 'snapshot.cjs')));
// Warm the code caches with this Node (the hooks' test runs use it).
for (const name of entries) {
  execFileSync(process.execPath, [join(dist, `${name}.mjs`), '--version'], {
    stdio: 'ignore',
    env: { ...process.env, XEN_BLOCKHOOKS_NO_CODE_CACHE: '' },
  });
}
console.log(
  `built ${entries.length} bundle(s) in dist/: ${entries.join(', ')} (${licences.length} npm packages bundled, in dist/THIRD-PARTY-LICENSES)`,
);
