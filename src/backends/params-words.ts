/**
 * A params string whose first part is a path and whose other words are options and sizes:
 * `/media/LIVE CD/rootfs.img 512M persistent`. xl passes `target=` verbatim and removable media
 * are mounted under their label, so a path may hold spaces. The words after the path are read
 * from the right, as long as the hook's grammar knows them (an option, a flag, a size); the rest,
 * spaces kept as written, is the path. What cannot be told apart is refused by the callers:
 * a path whose last word looks like a size or an option.
 */

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
  if (/[^\S ]/.test(path)) return `the ${what} ${JSON.stringify(path)} holds a tab or a line break; a path may hold spaces, but no other white space`;
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
