/**
 * Device commands that fail because something ran out, told apart by the tool's own words (LANG=C,
 * see runner.ts), so that the hotplug-error says what ran out and what to do about it instead of
 * reading like a bug. The tool's line is kept after the explanation.
 */
import type { RunResult } from './runner.js';

const SHORTAGES: [RegExp, string][] = [
  [
    /cannot find an unused loop device|could not find any free loop device|failed to find an unused loop device/i,
    'no free loop device is left: every loop device is in use and the kernel made no new one; detach the ones nothing uses (losetup -a lists them) or load the loop module with a larger max_loop',
  ],
  [
    /insufficient free (space|extents)/i,
    'the volume group is full; free some extents (vgs shows what is left) or give the disk a smaller size',
  ],
  [/no space left on device|ENOSPC/i, 'a filesystem or device ran out of space; free some and try again'],
  [
    /cannot allocate memory|out of memory|ENOMEM/i,
    'the kernel ran out of memory for the device; free some memory in dom0 and try again',
  ],
  [
    /too many open files|EMFILE|ENFILE/i,
    'the system ran out of file descriptors; raise the limit or close some and try again',
  ],
];

/** What ran out, as a sentence fragment, or undefined when the failure is not a shortage. */
export function shortageOf(r: Pick<RunResult, 'stderr' | 'stdout'>): string | undefined {
  const text = `${r.stderr}\n${r.stdout}`;
  for (const [re, what] of SHORTAGES) if (re.test(text)) return what;
  return undefined;
}
