/**
 * The project root: the nearest folder above this file that holds package.json. It works for the
 * test sources and for the guest tier's bundles of them (written under .cache/ in the project).
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export function projectRoot(): string {
  let d = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(d, 'package.json')) && dirname(d) !== d) d = dirname(d);
  return d;
}
