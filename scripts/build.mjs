#!/usr/bin/env node
/**
 * Bundle every entry point in src/bin/ (except the shared hook.ts) into one file under dist/,
 * for Node 18 and later, with the package version injected. A dom0 then needs Node and no
 * node_modules. `node scripts/build.mjs [--watch]`.
 */
import { build } from 'esbuild';
import { readdirSync, readFileSync, chmodSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
const LIBS = new Set(['hook.ts']);
const entries = readdirSync(join(root, 'src/bin'))
  .filter((f) => f.endsWith('.ts') && !LIBS.has(f))
  .map((f) => f.replace(/\.ts$/, ''));

const bundleOptions = {
  bundle: true,
  platform: 'node',
  target: 'node18',
  format: 'esm',
  sourcemap: false,
  legalComments: 'none',
  logLevel: 'warning',
  define: { __XEN_BLOCKHOOKS_VERSION__: JSON.stringify(pkg.version) },
  // winston and its friends are CommonJS: give the ESM bundle a require().
  banner: { js: "import { createRequire as __xbhCreateRequire } from 'node:module'; const require = __xbhCreateRequire(import.meta.url);" },
};

await Promise.all(
  entries.map((name) =>
    build({
      ...bundleOptions,
      entryPoints: [join(root, 'src/bin', `${name}.ts`)],
      outfile: join(root, 'dist', `${name}.mjs`),
      banner: { js: `#!/usr/bin/env node\n${bundleOptions.banner.js}` },
    }),
  ),
);
for (const name of entries) chmodSync(join(root, 'dist', `${name}.mjs`), 0o755);
console.log(`built ${entries.length} bundle(s) in dist/: ${entries.join(', ')}`);
