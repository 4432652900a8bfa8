/**
 * A params string whose first part is a path and whose other words are options and sizes:
 * `/media/LIVE CD/rootfs.img 512M persistent`. xl passes `target=` verbatim and removable media
 * are mounted under their label, so a path may hold spaces. The words after the path are read
 * from the right, as long as the hook's grammar knows them (an option, a flag, a size); the rest,
 * spaces kept as written, is the path. What cannot be told apart is refused by the callers:
 * a path whose last word looks like a size or an option.
 */

import { HotplugError } from '../disk/errors.js';
import { sizeMiB } from '../units/size.js';

/** 16 TiB: far beyond any sensible store; stops typos such as `30000000`. */
export const MAX_STORE_MIB = 16 * 1024 * 1024;

export interface PathWords {
  /** The leading part, from the first word to the last word the grammar did not take. */
  path: string;
  /** The words after the path, in order. */
  rest: string[];
  /** The path's last word when the path holds a space (the one that could have been meant as something else). */
  lastWord: string | undefined;
}

/** Splits `params`; undefined when it holds no word at all. `known(word)`: the grammar takes the word after a path. */
export function splitPathWords(params: string, known: (word: string) => boolean): PathWords | undefined {
  const words = [...params.matchAll(/\S+/g)].map((m) => ({ text: m[0], at: m.index }));
  if (words.length === 0) return undefined;
  let i = words.length;
  while (i > 1 && known((words[i - 1] as { text: string }).text)) i--;
  const first = words[0] as { text: string; at: number };
  const last = words[i - 1] as { text: string; at: number };
  return {
    path: params.slice(first.at, last.at + last.text.length),
    rest: words.slice(i).map((w) => w.text),
    lastWord: i > 1 ? last.text : undefined,
  };
}

/** A path may hold spaces; a tab or a line break in it is refused (it cannot be told from a separator, and no label holds one). */
export function whitespaceProblem(path: string, what: string): string | undefined {
  if (/[^\S ]/.test(path))
    return `the ${what} ${JSON.stringify(path)} holds a tab or a line break; a path may hold spaces, but no other white space`;
  return undefined;
}

/** For a path from params that does not exist: when it holds a space, how the params were read (a typo after the path becomes part of it). */
export function spacedPathHint(path: string): string {
  if (!path.includes(' ')) return '';
  return ` The params were read as the path "${path}" and the words the grammar takes after it: a path may hold spaces, and a word after it that is neither a size nor an option is part of it.`;
}

/** `parse()`'s answer, or undefined when it throws (Backend.source: params that do not parse name nothing). */
export function sourceOf(parse: () => string): string | undefined {
  try {
    return parse();
  } catch {
    return undefined;
  }
}

/** A word the `[<size>] [persistent[=yes|no]]` grammar takes after the path (block-thin, block-lvsnap). */
export function sizeOrPersistentWord(w: string): boolean {
  return w === 'persistent' || /^[A-Za-z_]+=/.test(w) || sizeMiB(w) !== undefined;
}

/**
 * The words after the path in the `[<size>] [persistent[=yes|no]]` grammar: at most one size,
 * right after the path, in MiB from 1 to 16 TiB; `persistent` once. `bad(what)` makes the hook's
 * error; `size` names the size ("size", "copy-on-write size") and `path` what it follows.
 */
export function parseSizePersistent(
  rest: readonly string[],
  bad: (what: string) => Error,
  names: { size: string; path: string },
): { sizeMiB: number | undefined; persistent: boolean } {
  const out: { sizeMiB: number | undefined; persistent: boolean } = { sizeMiB: undefined, persistent: false };
  let persistentSeen = false;
  rest.forEach((w, i) => {
    const eq = w.indexOf('=');
    const key = eq < 0 ? w : w.slice(0, eq);
    if (key === 'persistent') {
      if (persistentSeen) throw bad('"persistent" is given twice');
      persistentSeen = true;
      const v = eq < 0 ? 'yes' : w.slice(eq + 1);
      if (/^(1|yes|true|on)$/i.test(v)) out.persistent = true;
      else if (/^(0|no|false|off)$/i.test(v)) out.persistent = false;
      else throw bad(`persistent=${v}: the value must be yes or no`);
      return;
    }
    if (eq >= 0) throw bad(`unknown option "${key}" (known: persistent)`);
    const size = sizeMiB(w) as number;
    if (out.sizeMiB !== undefined) throw bad(`"${w}" is a second size; give one ${names.size}`);
    if (i !== 0) throw bad(`the size "${w}" must come right after ${names.path}`);
    if (size < 1) throw bad(`the ${names.size} "${w}" must be at least 1 MiB`);
    if (size > MAX_STORE_MIB) throw bad(`the ${names.size} "${w}" is more than 16 TiB (a bare number is MiB)`);
    out.sizeMiB = size;
  });
  return out;
}

/** `key=value` words in order, each key at most once (block-qcow, block-rbd). */
export function optionPairs(words: readonly string[], bad: (what: string) => Error): [string, string][] {
  const seen = new Set<string>();
  return words.map((w) => {
    const eq = w.indexOf('=');
    const key = w.slice(0, eq);
    if (seen.has(key)) throw bad(`"${key}" is given twice`);
    seen.add(key);
    return [key, w.slice(eq + 1)];
  });
}

/**
 * The path part of a base image's params (block-cow, block-thin): an absolute path, its first
 * word not an option, no white space but spaces.
 */
export function basePathOf(split: PathWords, bad: (what: string) => Error): string {
  const base = split.path;
  const first = base.split(/\s/, 1)[0] as string;
  if (first.includes('=')) throw bad(`the first word "${first}" looks like an option; the base image path comes first`);
  if (!base.startsWith('/'))
    throw bad(
      `the base image "${first}" is not an absolute path; give the full path, e.g. /srv/xen/${first.replace(/^.*\//, '')}`,
    );
  const ws = whitespaceProblem(base, 'base image');
  if (ws) throw bad(ws);
  return base;
}

/**
 * The refusal of one hook's params: `<hook> params "<params>": <what>. Expected: <grammar>, e.g.
 * "<example>".`, the same sentence for every hook.
 */
export function paramsRefusal(
  hook: string,
  grammar: string,
  example: string,
): (params: string, what: string) => HotplugError {
  return (params, what) =>
    new HotplugError(`${hook} params "${params}": ${what}. Expected: ${grammar}, e.g. "${example}".`);
}
