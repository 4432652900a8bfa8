/**
 * A temporary folder laid out for a hook run in this process (runHook with a fake or real Runner):
 * images/ holding a base image, a xenstore server on a socket there and a client, and a Config
 * whose store, state and Xen lock folders are in it (none made yet), with no log file and a short
 * busy retry. Framework-neutral: the caller closes it (tap: t.teardown(() => h.close())).
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defaultConfig, type Config } from '../../src/config/config.js';
import { connectXenstore } from '../../src/xenstore/client.js';
import { startXenstoreServer, type XenstoreServer } from '../../src/xenstore/server.js';
import type { XenstoreClient } from '../../src/xenstore/types.js';

export interface HookDir {
  dir: string;
  images: string;
  /** images/base.img */
  base: string;
  sock: string;
  server: XenstoreServer;
  xs: XenstoreClient;
  config: Config;
  close(): Promise<void>;
}

export async function hookDir(opts: {
  /** mkdtemp prefix in the system's temporary folder. */
  prefix: string;
  /** The base image's content. */
  base: Buffer;
  /** Every request the xenstore server gets (op, args). */
  onRequest?: (op: number, args: string[]) => void;
  /** Settings over the folder's. */
  config?: Partial<Config>;
}): Promise<HookDir> {
  const dir = mkdtempSync(join(tmpdir(), opts.prefix));
  const images = join(dir, 'images');
  mkdirSync(images);
  const base = join(images, 'base.img');
  writeFileSync(base, opts.base);
  const sock = join(dir, 'xs.sock');
  const server = await startXenstoreServer({ socketPath: sock, onRequest: opts.onRequest });
  const xs = await connectXenstore({ path: sock });
  const config: Config = {
    ...defaultConfig(),
    storeDir: join(dir, 'store'),
    stateDir: join(dir, 'state'),
    imageDirs: [images],
    xenLockDir: join(dir, 'xen-hotplug'),
    logFile: '',
    busyRetryMs: 100,
    ...opts.config,
  };
  return {
    dir,
    images,
    base,
    sock,
    server,
    xs,
    config,
    async close() {
      await xs.close().catch(() => {});
      await server.close().catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
