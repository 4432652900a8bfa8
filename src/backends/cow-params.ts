/**
 * The block-cow params grammar:
 *
 *     <base-image> [<cow-size>] [persistent[=yes|no]] [store=<name>] [chunk=<size>]
 *
 *   base-image   absolute path of the read-only base (a regular file or a block device) below one
 *                of the configured image directories. It may hold spaces (`/media/LIVE CD/a.img`):
 *                the words after it are read from the right (params-words.ts), the rest is the path.
 *   cow-size     size of the copy-on-write store, in the one size grammar (src/units/size.ts): a
 *                bare number is MiB (`30`), or `512M`, `1.5G`, `2T`; rounded up to whole MiB; 1 MiB
 *                at least. Default: cow.default_size.
 *   persistent   keep the store after remove and reattach it on the next add of the same domain
 *                and vdev (dm-snapshot `P`); without it the store is thrown away (`N`).
 *   store=NAME   the persistent store's file name inside the store directory (implies persistent);
 *                letters, digits, `.`, `_`, `-`, `+`, `@` only, not starting with `.`.
 *   chunk=SIZE   dm-snapshot chunk size, a power of two from 4K to 512K (default cow.chunk).
 *
 * Everything else is refused with a message naming the word, why, and what to write instead.
 */
import { looksLikeSize, notASize, sizeKiB, sizeMiB } from '../units/size.js';
import { basePathOf, MAX_STORE_MIB, paramsRefusal, splitPathWords } from './params-words.js';

export interface CowParams {
  base: string;
  /** Store size in MiB, when given. */
  sizeMiB: number | undefined;
  persistent: boolean;
  /** Explicit store file name (inside storeDir), when given. */
  store: string | undefined;
  /** Chunk size in KiB, when given. */
  chunkKiB: number | undefined;
}

export { MAX_STORE_MIB } from './params-words.js';

const STORE_NAME = /^[A-Za-z0-9_+@-][A-Za-z0-9._+@-]{0,199}$/;

const bad = paramsRefusal(
  'block-cow',
  '<base-image> [<cow-size>] [persistent] [store=NAME] [chunk=SIZE]',
  '/srv/xen/rootfs.img 512M',
);

/** `4K`, `64k`, `64KiB`, `1M` → KiB, or undefined when not a size with a unit. */
export function parseChunkKiB(word: string): number | undefined {
  return sizeKiB(word, { bare: null });
}

/** Why a path's last word cannot end the path: it looks like a size that is not one. */
export function sizeLikeEnd(word: string | undefined): string | undefined {
  if (word === undefined || !looksLikeSize(word)) return undefined;
  return `${notASize(word)} (a path cannot end in a word that looks like a size)`;
}

/** Words the grammar takes after the base: a size, persistent, store/chunk (bare or with a value), key=value. */
function cowWord(w: string): boolean {
  return w === 'persistent' || w === 'store' || w === 'chunk' || /^[A-Za-z_]+=/.test(w) || sizeMiB(w) !== undefined;
}

function yesNo(params: string, key: string, v: string): boolean {
  if (/^(1|yes|true|on)$/i.test(v)) return true;
  if (/^(0|no|false|off)$/i.test(v)) return false;
  throw bad(params, `${key}=${v}: the value must be yes or no`);
}

export function parseCowParams(params: string): CowParams {
  const split = splitPathWords(params, cowWord);
  if (split === undefined) throw bad(params, 'no base image given');
  const base = basePathOf(split, (what) => bad(params, what));
  const end = sizeLikeEnd(split.lastWord);
  if (end) throw bad(params, end);
  const out: CowParams = { base, sizeMiB: undefined, persistent: false, store: undefined, chunkKiB: undefined };
  const seen = new Set<string>();
  let persistentGiven: boolean | undefined;
  split.rest.forEach((w, i) => {
    const eq = w.indexOf('=');
    if (w === 'store' || w === 'chunk')
      throw bad(params, `${w} needs a value, e.g. ${w === 'store' ? 'store=web1-root.cow' : 'chunk=16K'}`);
    if (eq < 0 && w !== 'persistent') {
      const size = sizeMiB(w) as number;
      if (out.sizeMiB !== undefined) throw bad(params, `"${w}" is a second size; give one copy-on-write size`);
      if (i !== 0) throw bad(params, `the size "${w}" must come right after the base image`);
      if (size < 1) throw bad(params, `the copy-on-write size "${w}" must be at least 1 MiB`);
      if (size > MAX_STORE_MIB)
        throw bad(params, `the copy-on-write size "${w}" is more than 16 TiB (a bare number is MiB)`);
      out.sizeMiB = size;
      return;
    }
    const key = eq < 0 ? w : w.slice(0, eq);
    const value = eq < 0 ? undefined : w.slice(eq + 1);
    if (seen.has(key)) throw bad(params, `"${key}" is given twice`);
    seen.add(key);
    switch (key) {
      case 'persistent':
        persistentGiven = value === undefined ? true : yesNo(params, key, value);
        break;
      case 'store':
        if (!value) throw bad(params, 'store= needs a file name');
        if (value.includes('/'))
          throw bad(
            params,
            `store=${value}: give a plain file name, not a path; stores always live in the store directory`,
          );
        if (!STORE_NAME.test(value) || value === '..')
          throw bad(
            params,
            `store=${value}: the name may hold letters, digits, ".", "_", "-", "+", "@" only and must not start with "."`,
          );
        out.store = value;
        break;
      case 'chunk': {
        const k = value === undefined ? undefined : parseChunkKiB(value);
        if (k === undefined) throw bad(params, `chunk=${value ?? ''}: ${notASize(value ?? '', { bare: null })}`);
        if (k < 4 || k > 512 || (k & (k - 1)) !== 0)
          throw bad(params, `chunk=${value}: the chunk size must be a power of two from 4K to 512K`);
        out.chunkKiB = k;
        break;
      }
      default:
        throw bad(params, `unknown option "${key}" (known: persistent, store=, chunk=)`);
    }
  });
  if (out.store !== undefined && persistentGiven === false)
    throw bad(params, `store=${out.store} names a persistent store; drop persistent=no or drop store=`);
  out.persistent = persistentGiven ?? out.store !== undefined;
  return out;
}
