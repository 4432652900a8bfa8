/**
 * The one size grammar: every size an operator writes (a hook's params, the config file's size
 * keys, `xen-blockhooks grow`) is read here.
 *
 *     <number>[<unit>]      number: 512, 1.5, .5 (digits, at most one decimal point)
 *                           unit:   K, M, G or T, binary (KiB, MiB, GiB, TiB), any case, and
 *                                   optionally followed by B or iB: 2G = 2g = 2GB = 2GiB
 *
 * A bare number is in the place's default unit: MiB for store, disk and pool sizes, KiB for the
 * config file's chunk and block sizes; chunk= in block-cow params takes no bare number. Nothing
 * else is a size: no spaces inside, no sign, no exponent, no hex, no `B` alone. Fractions are
 * rounded up, never down: to whole bytes here, and to whole MiB (or KiB) where a place keeps MiB
 * (KiB), so a size is never smaller than what was written.
 */

export type SizeUnit = 'K' | 'M' | 'G' | 'T';

const MULTIPLIER: Record<SizeUnit, number> = { K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };
const NAME: Record<SizeUnit, string> = { K: 'KiB', M: 'MiB', G: 'GiB', T: 'TiB' };

export const MiB = MULTIPLIER.M;

const SIZE = /^(\d+(?:\.\d*)?|\.\d+)(?:([KMGT])(?:i?B)?)?$/i;

export class SizeError extends Error {
  override name = 'SizeError';
}

export interface SizeOptions {
  /** The unit of a bare number (default M); null: a unit must be given. */
  bare?: SizeUnit | null;
}

/** The grammar in one sentence, for error messages: `a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is MiB`. */
export function sizeGrammar(opts: SizeOptions = {}): string {
  const bare = opts.bare === undefined ? 'M' : opts.bare;
  if (bare === null) return 'a number with a unit K, M, G or T (e.g. 16K, 64K)';
  return `a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is ${NAME[bare]}`;
}

/** `"64X" is not a size: a number with an optional unit ...`. */
export function notASize(word: string, opts: SizeOptions = {}): string {
  return `"${word}" is not a size: ${sizeGrammar(opts)}`;
}

/** The word → bytes (rounded up to a whole byte), or undefined when the word is not a size. */
export function sizeBytes(word: string, opts: SizeOptions = {}): number | undefined {
  const m = SIZE.exec(word);
  if (!m) return undefined;
  const unit = (m[2]?.toUpperCase() as SizeUnit | undefined) ?? (opts.bare === undefined ? 'M' : opts.bare);
  if (unit === null) return undefined;
  const bytes = Math.ceil(Number(m[1]) * MULTIPLIER[unit]);
  return Number.isFinite(bytes) ? bytes : undefined;
}

/** The word → bytes; throws SizeError naming the word and the grammar. */
export function parseSizeBytes(word: string, opts: SizeOptions = {}): number {
  const b = sizeBytes(word, opts);
  if (b === undefined) throw new SizeError(notASize(word, opts));
  return b;
}

/** The word → whole MiB (rounded up), or undefined when it is not a size. A bare number is MiB. */
export function sizeMiB(word: string): number | undefined {
  const b = sizeBytes(word);
  return b === undefined ? undefined : Math.ceil(b / MiB);
}

/** The word → whole KiB (rounded up), or undefined when it is not a size. */
export function sizeKiB(word: string, opts: SizeOptions): number | undefined {
  const b = sizeBytes(word, opts);
  return b === undefined ? undefined : Math.ceil(b / MULTIPLIER.K);
}

/**
 * A word someone meant as a size but that is not one (`64X`, `-5`, `0x10`, `1,5G`), as opposed to
 * a word of a file name (`24.04.iso`, `CD/rootfs.img`): callers refuse the first kind by name.
 */
export function looksLikeSize(word: string): boolean {
  return /^[+-]?(\d+([.,]\d*)?|[.,]\d+)[A-Za-z]{0,3}$/.test(word) || /^[+-]?0x[\da-f]*$/i.test(word);
}
