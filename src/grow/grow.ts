/**
 * Growing copy-on-write space online, before it overflows, through each hook's grow facet
 * (Backend.grow): block-cow grows its store file, block-thin the shared pool, block-lvsnap its
 * snapshot or the LVM pool under it. A hook without the facet has nothing that fills: that is an
 * error here, never a silent skip. Every action is logged by the hook that does it. The caller
 * holds the disk's backend-path lock (the CLI does); pool work takes the pool lock itself.
 */
import type { JournalEntry } from '../journal/journal.js';
import { hookNamed } from '../backends/index.js';
import { GrowError, type GrowAction, type GrowDeps, type GrowOptions, type GrowSize } from '../backends/growth.js';

export { GrowError, type GrowAction, type GrowDeps, type GrowOptions, type GrowSize } from '../backends/growth.js';

/** Grow what backs one disk. `size` undefined: by watch.step percent. */
export async function growStore(
  entry: JournalEntry,
  size: GrowSize | undefined,
  deps: GrowDeps,
  opts: GrowOptions = {},
): Promise<GrowAction> {
  if (entry.phase !== 'ready')
    throw new GrowError(`${entry.backendPath} is ${entry.phase}, not ready; grow it once the add has finished`);
  const grow = hookNamed(entry.script)?.grow;
  if (!grow)
    throw new GrowError(`growing is not supported for ${entry.script} (${entry.backendPath}); nothing was changed`);
  return grow(entry, size, deps, opts);
}
