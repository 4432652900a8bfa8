/**
 * Shared set-up of the xen-blockhooks guest tests (not a test file itself): a scratch folder
 * with a 32 MiB base image, the hooks' settings pointed into it, the built command run as a child
 * process, and (for tests that need xenstore to outlive one command) the embedded xenstore server
 * started with `xen-blockhooks xenstored`. Importing this module registers before/after hooks.
 */
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

// The guest runs the bundled test from .cache/, with the project root as its working directory.
export const ROOT = process.cwd();
export const CLI = join(ROOT, 'dist', 'xen-blockhooks.mjs');
export const work = join(process.env.XEN_BLOCKHOOKS_SCRATCH ?? '/tmp', `cli-${process.pid}`);
export const images = join(work, 'images');
export const base = join(images, 'base.img');
export const sock = join(work, 'xenstored.sock');
export const env: NodeJS.ProcessEnv = {
  PATH: process.env.PATH,
  DM_DISABLE_UDEV: process.env.DM_DISABLE_UDEV ?? '1',
  XEN_BLOCKHOOKS_CONF: join(work, 'none.conf'),
  XEN_BLOCKHOOKS_STORE_DIR: join(work, 'store'),
  XEN_BLOCKHOOKS_STATE_DIR: join(work, 'state'),
  XEN_BLOCKHOOKS_IMAGE_DIRS: images,
  XEN_BLOCKHOOKS_XEN_LOCK_DIR: join(work, 'xen-hotplug'),
  XEN_BLOCKHOOKS_LOG_FILE: join(work, 'hotplug.log'),
};

export function cli(args: string[], extra: NodeJS.ProcessEnv = {}, file = process.execPath, pre: string[] = [CLI]) {
  const r = spawnSync(file, [...pre, ...args], { env: { ...env, ...extra }, encoding: 'utf8', timeout: 240_000 });
  return { code: r.status, out: r.stdout ?? '', err: r.stderr ?? '', all: `${r.stdout}${r.stderr}` };
}

export const dmNames = () =>
  spawnSync('dmsetup', ['ls'], { encoding: 'utf8' })
    .stdout.split('\n')
    .map((l) => l.split(/\s/)[0])
    .filter((n): n is string => !!n && n !== 'No');
export const loopsOn = (dir: string) =>
  spawnSync('losetup', ['--list', '--noheadings', '-O', 'BACK-FILE'], { encoding: 'utf8' })
    .stdout.split('\n')
    .filter((l) => l.includes(dir));

let server: ReturnType<typeof spawn> | undefined;

before(() => {
  mkdirSync(images, { recursive: true });
  writeFileSync(base, Buffer.alloc(32 * 1024 * 1024, 0x61));
});

/** Start `xen-blockhooks xenstored` on `sock` (stopped after the file). */
export async function startXenstored(): Promise<void> {
  server = spawn(process.execPath, [CLI, 'xenstored', '--socket', sock], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let serverErr = '';
  let exited: number | null | undefined;
  server.stderr?.on('data', (d: Buffer) => {
    serverErr += d.toString();
  });
  server.on('exit', (code) => {
    exited = code;
  });
  for (let i = 0; i < 2400 && !existsSync(sock) && exited === undefined; i++)
    await new Promise((r) => setTimeout(r, 50));
  assert.ok(existsSync(sock), `the embedded xenstore server is listening (exit ${exited}; stderr: ${serverErr})`);
}

after(() => {
  server?.kill('SIGTERM');
  rmSync(work, { recursive: true, force: true });
});
