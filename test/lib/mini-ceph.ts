/**
 * A real single-node Ceph cluster for the block-rbd tests: one monitor, one bluestore OSD, no
 * manager, cephx off, pool size 1, everything on 127.0.0.1 and in one directory (data, logs,
 * admin sockets, pid files). Debian 12's own packages (ceph-mon, ceph-osd, ceph-common).
 *
 * In the QEMU guest the OSD's block device is a loop device over a file in /scratch (tmpfs has no
 * O_DIRECT, bluestore needs it); on a host with a real file system a plain file in DIR works.
 * Readiness is `rbd pool init` returning: it waits until the OSD is up and the PGs are active.
 * The python `ceph` CLI costs seconds per call under TCG, so it is called once, with every
 * monitor command on its stdin.
 */
import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { processAlive } from '../../src/journal/journal.js';
import { projectRoot } from './project-root.js';

export interface MiniCeph {
  dir: string;
  conf: string;
  pool: string;
  /** Environment for rbd/ceph commands run by the test itself. */
  env: NodeJS.ProcessEnv;
  /** Milliseconds from start() to a usable pool. */
  startMs: number;
  /** `rbd ARGS` against this cluster; returns stdout. */
  rbd(args: string[], opts?: { input?: Buffer; timeoutMs?: number }): string;
  stop(): Promise<void>;
}

function sh(
  file: string,
  args: string[],
  env: NodeJS.ProcessEnv,
  opts: { input?: string | Buffer; timeoutMs?: number } = {},
): string {
  return execFileSync(file, args, {
    env,
    encoding: 'utf8',
    maxBuffer: 256 * 1024 * 1024,
    timeout: opts.timeoutMs ?? 120_000,
    ...(opts.input === undefined
      ? { stdio: ['ignore', 'pipe', 'pipe'] }
      : { input: opts.input, stdio: ['pipe', 'pipe', 'pipe'] }),
  });
}

/** test/lib/mini-ceph.conf (shared with the Xen tier's scenario 70) for this cluster. */
function confText(d: string, fsid: string, block: string): string {
  return readFileSync(join(projectRoot(), 'test', 'lib', 'mini-ceph.conf'), 'utf8')
    .replaceAll('@DIR@', d)
    .replaceAll('@FSID@', fsid)
    .replaceAll('@BLOCK@', block);
}

function pidOf(file: string): number | undefined {
  try {
    const n = Number(readFileSync(file, 'utf8').trim());
    return Number.isInteger(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Start the cluster in `dir` (created). `osdBlock`: a block device for bluestore (the guest passes
 * a loop device); default a 4 GiB sparse file in `dir`. With `loopOnScratch`, the helper makes
 * that loop device itself over `<dir>/osd.img` and detaches it in stop().
 */
export async function startMiniCeph(
  dir: string,
  opts: { osdBlock?: string; loopBlock?: boolean; pool?: string } = {},
): Promise<MiniCeph> {
  const t0 = performance.now();
  const pool = opts.pool ?? 'rbd';
  mkdirSync(dir, { recursive: true });
  for (const d of ['mon', 'osd', 'run', 'log']) mkdirSync(join(dir, d), { recursive: true });
  const env: NodeJS.ProcessEnv = {
    PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
    HOME: process.env.HOME ?? '/root',
    LANG: 'C',
    CEPH_CONF: join(dir, 'ceph.conf'),
  };
  let loop: string | undefined;
  let block = opts.osdBlock ?? join(dir, 'osd-block.img');
  if (opts.loopBlock) {
    // lo is down in a fresh guest; the cluster lives on 127.0.0.1.
    sh('ip', ['link', 'set', 'lo', 'up'], env);
    const img = join(dir, 'osd.img');
    sh('truncate', ['-s', '4G', img], env);
    loop = sh('losetup', ['-f', '--show', img], env).trim();
    block = loop;
  }
  const fsid = randomUUID();
  const conf = join(dir, 'ceph.conf');
  writeFileSync(conf, confText(dir, fsid, block));
  const stop = async (): Promise<void> => {
    const pids = ['osd.0', 'mon.a']
      .map((n) => pidOf(join(dir, 'run', `${n}.pid`)))
      .filter((p): p is number => p !== undefined && processAlive(p));
    for (const p of pids) {
      try {
        process.kill(p, 'SIGTERM');
      } catch {
        /* gone */
      }
    }
    const until = Date.now() + 30_000;
    while (pids.some(processAlive) && Date.now() < until) await new Promise((r) => setTimeout(r, 200));
    for (const p of pids.filter(processAlive)) process.kill(p, 'SIGKILL');
    while (pids.some(processAlive)) await new Promise((r) => setTimeout(r, 100));
    if (loop) {
      try {
        sh('losetup', ['-d', loop], env);
      } catch {
        /* reported by the guest agent's leftover check */
      }
    }
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    sh(
      'monmaptool',
      ['--create', '--fsid', fsid, '--addv', 'a', '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]', join(dir, 'monmap')],
      env,
    );
    sh('ceph-mon', ['--mkfs', '-i', 'a', '--monmap', join(dir, 'monmap')], env);
    sh('ceph-mon', ['-i', 'a'], env);
    const osdUuid = randomUUID();
    // One python CLI start for both monitor commands (interactive mode reads stdin).
    sh('ceph', [], env, { input: `osd new ${osdUuid} 0\nosd pool create ${pool} 8 8\n`, timeoutMs: 180_000 });
    sh('ceph-osd', ['-i', '0', '--mkfs', '--osd-uuid', osdUuid], env, { timeoutMs: 180_000 });
    sh('ceph-osd', ['-i', '0'], env);
    sh('rbd', ['pool', 'init', pool], env, { timeoutMs: 240_000 });
  } catch (e) {
    const logs = ['mon.a', 'osd.0'].map((n) => {
      const f = join(dir, 'log', `${n}.log`);
      return existsSync(f) ? `--- ${n}.log (tail)\n${readFileSync(f, 'utf8').split('\n').slice(-15).join('\n')}` : '';
    });
    await stop();
    throw new Error(`mini-ceph: ${(e as Error).message}\n${logs.join('\n')}`);
  }
  return {
    dir,
    conf,
    pool,
    env,
    startMs: Math.round(performance.now() - t0),
    rbd: (args, o = {}) =>
      sh('rbd', args, env, {
        ...(o.input ? { input: o.input } : {}),
        ...(o.timeoutMs ? { timeoutMs: o.timeoutMs } : {}),
      }),
    stop,
  };
}
